"""Benchmark: cartilage thickness on synthetic shells of known thickness, and timing on a real knee.

Accuracy.  :func:`workbench.knee.thickness.shell_phantom` voxelises a bone
with a cartilage shell of known thickness (flat slab, sphere, cylinder; 1, 2,
4 mm) on anisotropic grids rotated against the object (and one mirrored,
LPS-like grid).  The bone is meshed with
:func:`~workbench.knee.meshes.mesh_from_labels` (``--n-vertices``) and the
thickness measured at every vertex with
:func:`~workbench.knee.thickness.cartilage_thickness` (default settings).
Per case: the mean absolute error over the vertices on the covered part of
the surface (``mae``), its mean error (``bias``, what a regional mean
inherits), the 95th percentile of the absolute error, the share of covered
vertices measured as bare (``miss``) and of bare vertices measured as covered
(``false_pos``).  An ``aligned`` case (surface parallel to the slices) shows
the limit of what a label map can tell.

Timing.  When the mskt sample data is cached, ``right_knee_example.nrrd``
(384x384x160, 0.36x0.36x0.7 mm; its labels mapped onto the workbench table)
is meshed (femur, tibia, patella with :data:`DEFAULT_N_VERTICES`, and the
cartilages) and measured; wall and CPU seconds per bone, the regional
statistics, and the files written (.vtk, .ply) are reported.  Absent data is
skipped with a message.

    python bench/thickness_accuracy.py [--quick] [--json] [--n-vertices 8000] [--no-knee]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from workbench.knee.meshes import mesh_from_labels, write_ply, write_vtk
from workbench.knee.thickness import (
    BONES,
    bone_thickness,
    cartilage_thickness,
    region_names,
    region_thickness_stats,
    shell_phantom,
    thickness_sigma_mm,
)

SPACINGS = [(0.3, 0.3, 0.7), (0.5, 0.5, 1.0), (0.4, 0.4, 1.2), (0.7, 0.7, 1.5)]
QUICK_SPACINGS = [(0.5, 0.5, 1.0), (0.7, 0.7, 1.5)]
KINDS = ("flat", "sphere", "cylinder")
THICKNESSES = (1.0, 2.0, 4.0)


def accuracy_case(kind: str, thickness: float, spacing, *, n_vertices: int, flip: bool = False,
                  angles=(25.0, 35.0, 10.0), normals: str = "mesh") -> dict:
    phantom = shell_phantom(kind, thickness, spacing, flip=flip, angles_deg=angles)
    t0, c0 = time.perf_counter(), time.process_time()
    mesh = mesh_from_labels(phantom.labels, phantom.affine, phantom.bone_value, n_vertices=n_vertices)
    t1, c1 = time.perf_counter(), time.process_time()
    result = cartilage_thickness(mesh, phantom.labels, phantom.affine, phantom.bone_value, phantom.cartilage_value,
                                 normals=normals)
    t2, c2 = time.perf_counter(), time.process_time()
    truth = phantom.truth(mesh.vertices)
    covered, bare = truth > 0, truth == 0
    error = result.thickness_mm[covered] - truth[covered]
    return {
        "kind": kind, "thickness_mm": thickness, "spacing_mm": list(spacing), "flip": flip, "angles_deg": list(angles),
        "sigma_mm": result.sigma_mm, "n_vertices": len(mesh.vertices), "n_covered": int(covered.sum()),
        "n_bare": int(bare.sum()),
        "mae_mm": float(np.abs(error).mean()), "bias_mm": float(error.mean()),
        "p95_abs_mm": float(np.percentile(np.abs(error), 95)),
        "miss": float(np.mean(result.thickness_mm[covered] == 0)),
        "false_pos": float(np.mean(result.thickness_mm[bare] > 0)) if bare.any() else 0.0,
        "mesh_s": t1 - t0, "thickness_s": t2 - t1, "mesh_cpu_s": c1 - c0, "thickness_cpu_s": c2 - c1,
    }


def accuracy(quick: bool, n_vertices: int, normals: str) -> list[dict]:
    rows = []
    for spacing in QUICK_SPACINGS if quick else SPACINGS:
        for kind in KINDS:
            for thickness in THICKNESSES:
                rows.append(accuracy_case(kind, thickness, spacing, n_vertices=n_vertices, normals=normals))
    # a mirrored (LPS-like) grid, and surfaces parallel to thick slices (the limit of a label map)
    rows.append(accuracy_case("sphere", 2.0, (0.5, 0.5, 1.0), n_vertices=n_vertices, flip=True, normals=normals))
    for thickness in (1.0, 2.0):
        rows.append(accuracy_case("flat", thickness, (0.7, 0.7, 1.5), n_vertices=n_vertices, angles=(0.0, 0.0, 0.0),
                                  normals=normals))
    return rows


def knee_timing(out_dir: Path) -> dict:
    from workbench.data.labels import MSKT_RIGHT_KNEE_EXAMPLE, remap_labels
    from workbench.data.samples import label_map_paths
    from workbench.errors import WorkbenchError
    from workbench.io.nifti import read_label_map

    try:
        path = label_map_paths(fetch=False)["right_knee_example"]
    except WorkbenchError as exc:
        return {"skipped": f"mskt sample data absent ({exc.message})"}
    if not path.is_file():
        return {"skipped": f"{path} absent"}
    t0 = time.perf_counter()
    volume = read_label_map(path)
    labels = remap_labels(volume.data, MSKT_RIGHT_KNEE_EXAMPLE, source=path.name)
    out: dict = {"file": str(path), "shape": list(labels.shape),
                 "spacing_mm": [round(s, 4) for s in volume.spacing], "read_s": time.perf_counter() - t0,
                 "sigma_mm": thickness_sigma_mm(volume.spacing), "bones": {}, "cartilage_meshes": {}}
    total_wall, total_cpu = time.perf_counter(), time.process_time()
    thickness, region = [], []
    for bone in BONES:
        w0, c0 = time.perf_counter(), time.process_time()
        result = bone_thickness(labels, volume.affine, bone)
        w1, c1 = time.perf_counter(), time.process_time()
        write_vtk(out_dir / f"{bone}_mesh.vtk", result.mesh, result.point_data())
        write_ply(out_dir / f"{bone}_mesh.ply", result.mesh, result.point_data())
        w2 = time.perf_counter()
        thickness.append(result.thickness_mm)
        region.append(result.region)
        mesh = result.mesh
        out["bones"][bone] = {
            "n_vertices": len(mesh.vertices), "watertight": bool(mesh.is_watertight),
            "volume_ml": float(mesh.volume) / 1000.0, "covered": float(np.mean(result.thickness_mm > 0)),
            "no_surface": result.n_no_surface, "unbounded": result.n_unbounded,
            "mesh_s": result.seconds["mesh"], "thickness_s": result.seconds["thickness"], "wall_s": w1 - w0,
            "cpu_s": c1 - c0, "write_s": w2 - w1,
        }
    for bone, (_, cartilage) in BONES.items():
        w0 = time.perf_counter()
        try:
            mesh = mesh_from_labels(labels, volume.affine, cartilage, n_vertices=None, keep_largest=False)
        except WorkbenchError:
            continue
        write_vtk(out_dir / f"{bone}_cartilage_mesh.vtk", mesh)
        out["cartilage_meshes"][bone] = {"n_vertices": len(mesh.vertices), "seconds": time.perf_counter() - w0}
    out["total_wall_s"] = time.perf_counter() - total_wall
    out["total_cpu_s"] = time.process_time() - total_cpu
    out["stats"] = region_thickness_stats(np.concatenate(thickness), np.concatenate(region), region_names(False))
    out["files"] = {p.name: p.stat().st_size for p in sorted(out_dir.iterdir())}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="two voxel sizes instead of four")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    parser.add_argument("--n-vertices", type=int, default=8000, help="bone mesh size of the phantoms")
    parser.add_argument("--normals", choices=("mesh", "field"), default="mesh")
    parser.add_argument("--no-knee", action="store_true", help="skip the real-knee timing")
    parser.add_argument("--no-accuracy", action="store_true", help="skip the phantoms")
    args = parser.parse_args(argv)
    report: dict = {"machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                                "platform": platform.platform()}}
    if not args.no_accuracy:
        report["accuracy"] = accuracy(args.quick, args.n_vertices, args.normals)
    if not args.no_knee:
        with tempfile.TemporaryDirectory() as tmp:
            report["knee"] = knee_timing(Path(tmp))
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    if "accuracy" in report:
        print(f"{'shape':9} {'t mm':>5} {'voxel mm':>15} {'grid':>7} {'sigma':>5} {'mae':>6} {'bias':>7} {'p95':>6} "
              f"{'miss':>5} {'fpos':>5} {'mesh s':>6} {'thick s':>7}")
        for r in report["accuracy"]:
            grid = "flip" if r["flip"] else ("aligned" if not any(r["angles_deg"]) else "oblique")
            voxel = "x".join(f"{s:g}" for s in r["spacing_mm"])
            print(f"{r['kind']:9} {r['thickness_mm']:5.1f} {voxel:>15} {grid:>7} {r['sigma_mm']:5.2f} "
                  f"{r['mae_mm']:6.3f} {r['bias_mm']:+7.3f} {r['p95_abs_mm']:6.3f} {r['miss']:5.3f} "
                  f"{r['false_pos']:5.3f} {r['mesh_s']:6.2f} {r['thickness_s']:7.2f}")
        oblique = [r for r in report["accuracy"] if any(r["angles_deg"])]
        print(f"worst MAE over oblique/flipped cases: {max(r['mae_mm'] for r in oblique):.3f} mm; "
              f"worst |bias|: {max(abs(r['bias_mm']) for r in oblique):.3f} mm")
    knee = report.get("knee")
    if knee:
        if "skipped" in knee:
            print(f"real knee: skipped ({knee['skipped']})")
        else:
            print(f"\nreal knee {Path(knee['file']).name} {knee['shape']} voxels {knee['spacing_mm']} mm, "
                  f"sigma {knee['sigma_mm']:.2f} mm")
            for bone, b in knee["bones"].items():
                print(f"  {bone:8} {b['n_vertices']:6d} vertices  mesh {b['mesh_s']:5.2f} s  thickness "
                      f"{b['thickness_s']:5.2f} s  (wall {b['wall_s']:5.2f} s, cpu {b['cpu_s']:5.2f} s)  "
                      f"covered {b['covered']:.2f}  watertight {b['watertight']}")
            for bone, c in knee["cartilage_meshes"].items():
                print(f"  {bone} cartilage mesh: {c['n_vertices']} vertices, {c['seconds']:.2f} s")
            print(f"  total (three bones + cartilage meshes + files): wall {knee['total_wall_s']:.2f} s, "
                  f"cpu {knee['total_cpu_s']:.2f} s")
            for key, value in knee["stats"].items():
                if key.endswith("_mean") and value is not None:
                    name = key[: -len("_mm_mean")]
                    print(f"  {name:14} mean {value:.2f}  std {knee['stats'][name + '_mm_std']:.2f}  "
                          f"median {knee['stats'][name + '_mm_median']:.2f} mm")
    return 0


if __name__ == "__main__":
    sys.exit(main())
