"""Benchmark: one differentiable view (forward + backward to vertex positions), workbench rasteriser vs Mitsuba 3.

Same UV sphere, camera (45° vertical field of view, 3.5 units away) and
resolution on both sides:

* workbench: ``workbench.recon.render.raster`` — rasterize → interpolate
  (vertex positions as a 3-channel colour) → antialias, loss = sum of the
  image, ``loss.backward()`` to the world vertex positions (through the
  projection).
* Mitsuba 3 (variant ``llvm_ad_rgb``): ``direct_projective`` integrator (it
  gives silhouette gradients), constant white environment, diffuse sphere,
  box filter, 1 sample per pixel (``sppc = sppp = spp = 1``, ``sppi = 0``:
  there are no indirect silhouettes in this scene), ``sample_border`` on,
  vertex positions as the differentiated parameter, loss = sum of the image,
  ``dr.backward``.

A last case renders a batch of 4 views at 128² of a ~20k-triangle sphere (the
optimiser's inner loop): one batched rasterize → interpolate → antialias and
one backward for the workbench, 4 renders and one ``dr.backward`` of their sum
for Mitsuba (the sphere is symmetric, so its 4 views cost the same as one
repeated); the table gives ms per batch there.

Each case runs once untimed (Mitsuba compiles its kernels then), then
``--repeats`` times; the medians in ms per view (per batch for the batch case)
and their ratio are printed as a markdown table.  Both use 2 CPU threads.
Mitsuba missing or failing to load is reported and skipped.

    python bench/rasterizer.py [--repeats 5] [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

THREADS = 2
DISTANCE = 3.5
FOVY_DEG = 45.0
MESHES = {"5k": [36, 36], "20k": [72, 72], "50k": [114, 114]}  # trimesh.creation.uv_sphere counts
BATCH = 4  # views in the batch case


def sphere(size: str) -> tuple[np.ndarray, np.ndarray]:
    import trimesh

    mesh = trimesh.creation.uv_sphere(radius=1.0, count=MESHES[size])
    return np.asarray(mesh.vertices, np.float32), np.asarray(mesh.faces, np.int64)


def mvp_matrix(azimuth: float = 0.0) -> np.ndarray:
    """Projection @ view for a camera ``DISTANCE`` from the origin, turned ``azimuth`` radians about +y."""
    near, far = 0.1, 100.0
    t = math.tan(math.radians(FOVY_DEG) / 2)
    proj = np.array([[1 / t, 0, 0, 0], [0, -1 / t, 0, 0],
                     [0, 0, -(far + near) / (far - near), -2 * far * near / (far - near)], [0, 0, -1, 0]])
    view = np.eye(4)
    view[2, 3] = -DISTANCE
    c, s = math.cos(azimuth), math.sin(azimuth)
    turn = np.array([[c, 0, s, 0], [0, 1, 0, 0], [-s, 0, c, 0], [0, 0, 0, 1]])
    return (proj @ view @ turn).astype(np.float32)


def time_workbench(verts: np.ndarray, faces: np.ndarray, res: int, repeats: int, views: int = 1) -> dict:
    import torch

    from workbench.recon.render import raster

    torch.set_num_threads(THREADS)
    v = torch.tensor(verts, requires_grad=True)
    f = torch.tensor(faces)
    mvp = torch.tensor(np.stack([mvp_matrix(2 * math.pi * i / views) for i in range(views)]))  # [views, 4, 4]

    def one_view() -> float:
        v.grad = None
        start = time.perf_counter()
        pos = torch.cat([v, torch.ones_like(v[:, :1])], 1) @ mvp.transpose(1, 2)  # [views, V, 4]
        rast = raster.rasterize(pos, f, (res, res))
        color = raster.interpolate(v[None], rast, f)
        image = raster.antialias(color, rast, pos, f)
        image.sum().backward()
        return time.perf_counter() - start

    one_view()
    times = [one_view() for _ in range(repeats)]
    return {"median_ms": 1000 * statistics.median(times), "times_ms": [1000 * t for t in times]}


def time_mitsuba(verts: np.ndarray, faces: np.ndarray, res: int, repeats: int, views: int = 1) -> dict:
    import drjit as dr
    import mitsuba as mi

    mi.set_variant("llvm_ad_rgb")
    mi.set_log_level(mi.LogLevel.Error)
    dr.set_thread_count(THREADS)
    mesh = mi.Mesh("sphere", len(verts), len(faces))
    mesh_params = mi.traverse(mesh)
    mesh_params["vertex_positions"] = mi.Float(verts.ravel())
    mesh_params["faces"] = mi.UInt32(faces.astype(np.uint32).ravel())
    mesh_params.update()
    scene = mi.load_dict({
        "type": "scene",
        "integrator": {"type": "direct_projective", "sppi": 0},
        "sensor": {
            "type": "perspective", "fov": FOVY_DEG, "fov_axis": "y",
            "to_world": mi.ScalarTransform4f().look_at(origin=[0, 0, DISTANCE], target=[0, 0, 0], up=[0, 1, 0]),
            "film": {"type": "hdrfilm", "width": res, "height": res, "rfilter": {"type": "box"},
                     "sample_border": True},
            "sampler": {"type": "independent", "sample_count": 1},
        },
        "mesh": mesh,
        "emitter": {"type": "constant"},
    })
    params = mi.traverse(scene)
    key = "mesh.vertex_positions"
    dr.enable_grad(params[key])
    params.update()

    def one_view(seed: int) -> float:
        start = time.perf_counter()
        dr.set_grad(params[key], 0)
        loss = sum(dr.sum(mi.render(scene, params, spp=1, seed=views * seed + i), axis=None) for i in range(views))
        dr.backward(loss)
        np.asarray(dr.grad(params[key]))  # forces evaluation
        return time.perf_counter() - start

    one_view(0)
    times = [one_view(seed + 1) for seed in range(repeats)]
    return {"median_ms": 1000 * statistics.median(times), "times_ms": [1000 * t for t in times],
            "settings": "direct_projective, spp=1, sppi=0, box filter, sample_border, constant emitter"}


def mitsuba_problem() -> str | None:
    """Why Mitsuba cannot run here (None when it can)."""
    if "DRJIT_LIBLLVM_PATH" not in os.environ:  # Debian's libllvm19 (Dr.Jit's LLVM backend wants a recent LLVM)
        for candidate in sorted(Path("/usr/lib/x86_64-linux-gnu").glob("libLLVM*19*")):
            os.environ["DRJIT_LIBLLVM_PATH"] = str(candidate)
            break
    try:
        import drjit  # noqa: F401
        import mitsuba as mi

        mi.set_variant("llvm_ad_rgb")
    except Exception as exc:  # ImportError, or the LLVM backend failing to load
        return f"{type(exc).__name__}: {exc}"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="only 128² with the ~5k-triangle sphere")
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args(argv)

    cases = [(128, "5k", 1)] if args.quick else [(128, "5k", 1), (128, "50k", 1), (512, "5k", 1), (512, "50k", 1),
                                                  (128, "20k", BATCH)]
    problem = mitsuba_problem()
    if problem:
        print(f"Mitsuba 3 skipped: {problem}", flush=True)
    rows = []
    for res, size, views in cases:
        verts, faces = sphere(size)
        row = {"resolution": res, "triangles": int(len(faces)), "views": views,
               "workbench": time_workbench(verts, faces, res, args.repeats, views)}
        if problem:
            row["mitsuba"] = {"skipped": problem}
        else:
            try:
                row["mitsuba"] = time_mitsuba(verts, faces, res, args.repeats, views)
            except Exception as exc:
                row["mitsuba"] = {"skipped": f"{type(exc).__name__}: {exc}"}
        if "median_ms" in row["mitsuba"]:
            row["speedup"] = row["mitsuba"]["median_ms"] / row["workbench"]["median_ms"]
        rows.append(row)
        print(json.dumps({k: row[k] for k in ("resolution", "triangles", "views")}
                         | {"workbench_ms": round(row["workbench"]["median_ms"], 1),
                            "mitsuba_ms": round(row["mitsuba"].get("median_ms", float("nan")), 1)}), flush=True)

    print(f"\nForward + backward per view (per batch of {BATCH} views in the last row), median of {args.repeats}, "
          f"{THREADS} CPU threads "
          f"({platform.processor() or platform.machine()}):\n")
    print("| resolution | triangles | workbench (ms) | Mitsuba 3 direct_projective (ms) | workbench faster by |")
    print("|---|---|---|---|---|")
    for row in rows:
        mitsuba = row["mitsuba"]
        m_text = f"{mitsuba['median_ms']:.1f}" if "median_ms" in mitsuba else "skipped"
        s_text = f"{row['speedup']:.1f}×" if "speedup" in row else "–"
        res_text = f"{row['resolution']}²" + (f" × {row['views']} views" if row["views"] > 1 else "")
        print(f"| {res_text} | {row['triangles']:,} | {row['workbench']['median_ms']:.1f} | {m_text} "
              f"| {s_text} |")
    if args.json:
        import torch

        out = {"machine": {"cpus": os.cpu_count(), "threads": THREADS, "platform": platform.platform()},
               "torch": torch.__version__, "rows": rows}
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
