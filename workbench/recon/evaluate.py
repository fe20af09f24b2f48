"""Evaluation of an exported reconstruction: held-out views and geometry.

The held-out views are rendered from the *files* the run wrote (``mesh.obj``,
its textures and ``probe.hdr``), so the figures also check the export.  The
references come from the input's test split, which the optimiser never saw.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from workbench.errors import InvalidFormat
from workbench.io.multiview import linear_to_srgb, srgb_to_linear
from workbench.recon import mesh as meshes
from workbench.recon import metrics
from workbench.recon.material import TextureMaterial
from workbench.recon.nvdiffrec import SurfaceMesh, render
from workbench.recon.render import light as lights
from workbench.recon.render.raster import backend


def load_exported(folder: str | Path, device: str | torch.device = "cpu", env_res: int = 32):
    """Load ``mesh.obj``, its three textures and ``probe.hdr`` from a run's model folder.

    Returns:
        (surface to render, texture material, environment light).
    """
    from PIL import Image

    folder = Path(folder)
    for name in ("mesh.obj", "texture_kd.png", "texture_ks.png", "texture_n.png", "probe.hdr"):
        if not (folder / name).is_file():
            raise InvalidFormat(f"{folder / name} is missing", "Evaluate a complete nvdiffrec output folder.")
    verts, faces, uvs, uv_faces, _ = meshes.load_mesh(folder / "mesh.obj")
    verts = np.asarray(verts, dtype=np.float32)
    faces = np.asarray(faces, dtype=np.int64)
    if uvs is None:
        raise InvalidFormat(f"{folder / 'mesh.obj'} has no texture coordinates", "Export with textures.")
    uvs = np.asarray(uvs, dtype=np.float32)  # one per vertex: load_mesh splits vertices at UV seams

    def read(name: str) -> torch.Tensor:
        img = np.asarray(Image.open(folder / name).convert("RGB"), dtype=np.float32) / 255.0
        return torch.from_numpy(img)[None].to(device)

    kd = srgb_to_linear(read("texture_kd.png"))
    ks = read("texture_ks.png")
    normal = read("texture_n.png") * 2.0 - 1.0
    tex = TextureMaterial(kd, ks, normal)
    v = torch.from_numpy(verts).to(device)
    f = torch.from_numpy(faces).to(device)
    uv = torch.from_numpy(uvs).to(device)
    normals = meshes.vertex_normals(v, f)
    tangents = meshes.compute_tangents(v, f, uv, f, normals)
    surface = SurfaceMesh(v, f, uvs=uv, tangents=tangents, normals=normals)
    light = lights.load_probe_hdr(folder / "probe.hdr", env_res)
    light = light.to(device)
    return surface, tex, light


def render_test_views(folder: str | Path, dataset, near: float = 0.1, far: float = 1000.0,
                      device: str | torch.device = "cpu", batch: int = 4) -> list[np.ndarray]:
    """Render every view of ``dataset`` from the exported files: sRGB RGBA images [H, W, 4] in [0, 1]."""
    surface, tex, light = load_exported(folder, device)
    raster = backend(torch.device(device))
    height, width = dataset.images.shape[1:3]
    mvp = dataset.mvp(near, far).to(device).float()
    campos = dataset.campos.to(device).float()
    images = []
    with torch.no_grad():
        light.build_mips()

        def material(points, uv):
            return tex.sample(uv[None, None], raster.texture)[0, 0]

        for start in range(0, len(mvp), batch):
            idx = torch.arange(start, min(start + batch, len(mvp)), device=device)
            background = torch.zeros(len(idx), height, width, 3, device=device)
            out = render(surface, material, light, mvp[idx], campos[idx], (height, width), background, raster)
            alpha = out["alpha"].clamp(0, 1)
            rgb = linear_to_srgb(out["rgb"] / alpha.clamp(min=1e-6)) * (alpha > 0)
            images.extend(torch.cat([rgb, alpha], dim=-1).cpu().numpy())
    return images


def evaluate(folder: str | Path, test_dataset=None, gt_mesh: str | Path | None = None,
             thresholds: tuple[float, ...] = (0.005, 0.01), n_points: int = 100_000,
             device: str | torch.device = "cpu") -> dict[str, Any]:
    """Image metrics on held-out views and geometry metrics against a ground-truth mesh (each when given)."""
    folder = Path(folder)
    result: dict[str, Any] = {}
    if test_dataset is not None:
        predicted = render_test_views(folder, test_dataset, device=device)
        reference = [np.concatenate([linear_to_srgb(img[..., :3]), img[..., 3:4]], -1)
                     for img in test_dataset.images.cpu().numpy()]
        result["test_views"] = metrics.image_metrics(predicted, reference)
        result["test_views"]["n_views"] = len(predicted)
    if gt_mesh is not None:
        import trimesh

        gt = trimesh.load(str(gt_mesh), force="mesh", process=False)
        verts, faces, _, _, _ = meshes.load_mesh(folder / "mesh.obj")
        pred_v, pred_f = meshes.weld_vertices(np.asarray(verts, dtype=np.float64), np.asarray(faces), 1e-6)
        geo = metrics.chamfer_fscore(pred_v, pred_f, np.asarray(gt.vertices), np.asarray(gt.faces),
                                     n_points=n_points, thresholds=thresholds)
        geo["genus"] = int(meshes.genus(pred_v, pred_f))
        geo["watertight"] = bool(meshes.is_watertight(pred_f))
        gt_v, gt_f = meshes.weld_vertices(np.asarray(gt.vertices), np.asarray(gt.faces), 1e-6)
        geo["gt_genus"] = int(meshes.genus(gt_v, gt_f))
        result["geometry"] = geo
    return result
