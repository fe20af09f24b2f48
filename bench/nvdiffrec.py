"""Quality and time of nvdiffrec reconstructions on scenes with known ground truth.

For each scene: render 64 training views (and 16 held-out test views) at
128×128 with the workbench's ray-cast scene renderer (independent of the
optimiser's rasteriser), reconstruct through the pipeline's runner with a
preset, and report F-score at 0.5 % / 1 % of the ground-truth diagonal,
Chamfer-L1, normal consistency, genus, held-out PSNR/SSIM (rendered from the
exported files) and wall-clock time.

Scenes: procedural ``torus`` (genus 1), ``blob`` and ``box``, and Keenan
Crane's Spot (public domain) from ``../shared/data/meshes/spot`` when present
(skipped cleanly when absent).

    python bench/nvdiffrec.py                              # cpu preset, all scenes
    python bench/nvdiffrec.py --scenes torus --json out.json
    python bench/nvdiffrec.py --preset paper --device cuda --res 512   # on a GPU
    python bench/nvdiffrec.py --quick                      # a small smoke run (CI-sized)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SPOT = REPO.parent / "shared" / "data" / "meshes" / "spot" / "spot.obj"

TARGETS = {"fscore_1": 0.90, "psnr": 26.0, "minutes": 10.0}


def run_scene(name: str, out: Path, preset: str, views: int, res: int, device: str,
              overrides: dict[str, str]) -> dict:
    """Render the scene, reconstruct it and return its figures."""
    from workbench.data.synthetic_scenes import sample_recon
    from workbench.progress import Progress
    from workbench.recon.pipeline import run_recon

    scene = out / f"scene_{name}"
    if name == "spot":
        sample_recon(shape=None, mesh=SPOT, views=views, res=res, out=scene, test_views=16, seed=0)
    else:
        sample_recon(shape=name, mesh=None, views=views, res=res, out=scene, test_views=16, seed=0)
    t0 = time.perf_counter()
    run = run_recon({"images": str(scene), "preset": preset, "device": device, "overrides": overrides},
                    run_dir=out / f"run_{name}", progress=Progress([]))
    seconds = time.perf_counter() - t0
    metrics = json.loads((run.run_dir / "nvdiffrec" / "metrics.json").read_text())
    geo = metrics.get("geometry", {})
    views_m = metrics.get("test_views", {})
    training = metrics.get("training", {})
    return {
        "scene": name, "preset": preset, "device": device, "seconds": round(seconds, 1),
        "fscore_0.5": geo.get("fscore_0.5"), "fscore_1": geo.get("fscore_1"),
        "chamfer_l1_rel": geo.get("chamfer_l1_rel"), "normal_consistency": geo.get("normal_consistency"),
        "genus": geo.get("genus"), "gt_genus": geo.get("gt_genus"), "watertight": geo.get("watertight"),
        "psnr": views_m.get("psnr"), "ssim": views_m.get("ssim"),
        "triangles": training.get("triangles"),
        "seconds_pass1": training.get("passes", {}).get("pass1", {}).get("seconds"),
        "seconds_pass2": training.get("passes", {}).get("pass2", {}).get("seconds"),
    }


def table(rows: list[dict]) -> str:
    head = ("| scene | F@0.5 % | F@1 % | Chamfer-L1 (of diag.) | NC | genus (GT) | PSNR dB | SSIM | "
            "triangles | pass 1 s | pass 2 s | total s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]

    def f(v, d=3):
        return "–" if v is None else (f"{v:.{d}f}" if isinstance(v, float) else str(v))

    for r in rows:
        lines.append(f"| {r['scene']} | {f(r['fscore_0.5'])} | {f(r['fscore_1'])} | {f(r['chamfer_l1_rel'], 4)} | "
                     f"{f(r['normal_consistency'])} | {f(r['genus'])} ({f(r['gt_genus'])}) | {f(r['psnr'], 2)} | "
                     f"{f(r['ssim'])} | {f(r['triangles'])} | {f(r['seconds_pass1'], 0)} | "
                     f"{f(r['seconds_pass2'], 0)} | {f(r['seconds'], 0)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenes", nargs="+", default=["spot", "torus", "blob", "box"])
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--views", type=int, default=64)
    parser.add_argument("--res", type=int, default=128)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--quick", action="store_true", help="one small scene, few iterations (a smoke run)")
    parser.add_argument("--out", default=None, help="keep scenes and runs here (default: a temporary folder)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(max(1, torch.get_num_threads()))
    overrides = dict(kv.split("=", 1) for kv in args.overrides)
    scenes = args.scenes
    if args.quick:
        scenes, args.views, args.res = ["sphere"], 16, 64
        overrides = {"nvdiffrec.iter": "150", "nvdiffrec.iter_pass2": "30", "nvdiffrec.train_res": "[64,64]",
                     "nvdiffrec.dmtet_grid": "16", "nvdiffrec.texture_res": "[64,64]", **overrides}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out) if args.out else Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        for name in scenes:
            if name == "spot" and not SPOT.is_file():
                print(f"skipped spot: {SPOT} is absent (the benchmark data of ../shared)", file=sys.stderr)
                continue
            print(f"scene {name} ...", file=sys.stderr, flush=True)
            rows.append(run_scene(name, out, args.preset, args.views, args.res, args.device, overrides))
            print(table(rows[-1:]), file=sys.stderr, flush=True)
    device_name = torch.cuda.get_device_name(0) if torch.cuda.is_available() and args.device != "cpu" else "CPU"
    print(f"preset {args.preset}, {args.views} views at {args.res}², device {device_name}, "
          f"{torch.get_num_threads()} threads")
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device_name, "views": args.views, "res": args.res,
                                               "preset": args.preset, "targets": TARGETS, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
