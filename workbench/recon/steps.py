"""Step functions of the reconstruction pipeline (each runs in its own child process under the runner).

Each takes a :class:`~workbench.runner.StepContext` and plain arguments and
returns a :class:`~workbench.runner.StepResult`; they can be called from tests
without the runner (``StepContext.for_testing``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from workbench.outputs import Output
from workbench.runner import StepContext, StepResult


def load_views(ctx: StepContext, images: str, resolution: int | None = None, min_views: int = 4) -> StepResult:
    """Check and describe the posed views: ``input.json`` and a contact sheet ``input_views.png``.

    Bad input (missing masks, inconsistent sizes, too few views, broken cameras)
    raises INVALID_FORMAT naming the file.
    """
    from PIL import Image

    from workbench.io.multiview import load_multiview

    ctx.progress(0.0, "reading the training views")
    train = load_multiview(Path(images), "train", resolution=resolution, min_views=min_views)
    ctx.progress(0.6, "reading the test views")
    test = _load_test(images, resolution)
    info = {
        "images": str(images), "n_train": len(train.images), "n_test": len(test.images) if test is not None else 0,
        "resolution": list(train.images.shape[1:3]), "names": list(train.names)[:1000],
        "camera_distance": [float(np.min(train.campos.norm(dim=-1).numpy())),
                            float(np.max(train.campos.norm(dim=-1).numpy()))],
    }
    (ctx.work_dir / "input.json").write_text(json.dumps(info, indent=2))
    sheet = _contact_sheet(train.images.numpy())
    Image.fromarray(sheet).save(ctx.work_dir / "input_views.png")
    ctx.progress(1.0, f"{info['n_train']} training views, {info['n_test']} test views")
    return StepResult(
        outputs={"info": Output("input.json", "json", description="views, resolution, cameras"),
                 "sheet": Output("input_views.png", "png", description="the first training views")},
        metrics={"n_train": info["n_train"], "n_test": info["n_test"]},
        values={"n_test": info["n_test"]})


def _load_test(images: str, resolution: int | None):
    from workbench.errors import InvalidFormat
    from workbench.io.multiview import load_multiview

    try:
        return load_multiview(Path(images), "test", resolution=resolution, min_views=1)
    except InvalidFormat:
        return None


def _contact_sheet(images: np.ndarray, n: int = 8) -> np.ndarray:
    """Up to ``n`` linear RGBA views over white, side by side, as sRGB uint8."""
    picks = images[np.linspace(0, len(images) - 1, min(n, len(images))).round().astype(int)]
    from workbench.io.multiview import linear_to_srgb

    rgb = picks[..., :3] * picks[..., 3:4] + (1 - picks[..., 3:4])
    return (np.concatenate(list(linear_to_srgb(rgb)), axis=1) * 255 + 0.5).astype(np.uint8)


MODEL_FILES = {
    "mesh.obj": "mesh", "mesh.mtl": "file", "texture_kd.png": "png", "texture_ks.png": "png",
    "texture_n.png": "png", "probe.hdr": "file", "mesh.ply": "mesh", "preview_pass1.png": "png",
    "preview_pass2.png": "png", "config.json": "json",
}


def nvdiffrec(ctx: StepContext, images: str, config: dict[str, Any], resolution: int | None = None) -> StepResult:
    """Reconstruct with nvdiffrec into ``nvdiffrec/`` (mesh, textures, light, previews, training figures)."""
    from workbench.io.multiview import load_multiview
    from workbench.recon.nvdiffrec_config import NvdiffrecConfig
    from workbench.registry import REGISTRY

    ctx.progress(0.0, "loading views")
    train = load_multiview(Path(images), "train", resolution=resolution)
    cfg = NvdiffrecConfig.from_dict(config)
    model = REGISTRY.model("nvdiffrec").load(device=ctx.device, **{k: getattr(cfg, k) for k in config})
    out = ctx.work_dir / "nvdiffrec"
    figures = model.reconstruct(train, out, progress=lambda f, m: ctx.progress(0.01 + 0.98 * f, m))
    (out / "training.json").write_text(json.dumps(figures, indent=2))
    outputs = {name: Output(f"nvdiffrec/{name}", kind, description=f"nvdiffrec {name}")
               for name, kind in MODEL_FILES.items()}
    outputs["training"] = Output("nvdiffrec/training.json", "json", description="loss curves, timings, mesh")
    metrics = {"triangles": figures["triangles"], "vertices": figures["vertices"],
               "seconds_pass1": figures["passes"]["pass1"]["seconds"],
               "seconds_pass2": figures["passes"]["pass2"]["seconds"]}
    return StepResult(outputs=outputs, metrics=metrics)


def evaluate(ctx: StepContext, images: str, model_dir: str, model_name: str, resolution: int | None = None,
             gt_mesh: str | None = None, thresholds: list[float] | None = None, n_points: int = 100_000,
             test_split: bool = True) -> StepResult:
    """``<model>/metrics.json``: training figures, held-out view PSNR/SSIM and geometry metrics when possible."""
    from workbench.recon.evaluate import evaluate as evaluate_folder

    folder = Path(model_dir)
    ctx.progress(0.0, "loading the test views")
    test = _load_test(images, resolution) if test_split else None
    if gt_mesh is None and (Path(images) / "gt_mesh.ply").is_file():
        gt_mesh = str(Path(images) / "gt_mesh.ply")
    ctx.progress(0.1, "rendering held-out views from the exported mesh")
    figures = evaluate_folder(folder, test, gt_mesh, tuple(thresholds or (0.005, 0.01)), n_points,
                              device=ctx.device)
    training_path = folder / "training.json"
    training = json.loads(training_path.read_text()) if training_path.is_file() else {}
    document = {"model": model_name, "training": training, **figures,
                "notes": [] if test is not None else ["no test split: no held-out image metrics"]}
    (ctx.work_dir / model_name).mkdir(parents=True, exist_ok=True)
    (ctx.work_dir / model_name / "metrics.json").write_text(json.dumps(document, indent=2, default=float))
    flat: dict[str, Any] = {}
    if "test_views" in figures:
        flat.update(psnr=figures["test_views"]["psnr"], ssim=figures["test_views"]["ssim"])
    if "geometry" in figures:
        geo = figures["geometry"]
        flat.update({k: geo[k] for k in geo if k.startswith("fscore") or k in ("chamfer_l1", "normal_consistency",
                                                                                "genus")})
    ctx.progress(1.0, "done")
    return StepResult(outputs={"metrics": Output(f"{model_name}/metrics.json", "json", description="quality figures")},
                      metrics=flat)
