"""Reference cartilage thickness with pymskt, for ``bench/knee_analysis.py`` (run side by side).

Runs under a separate interpreter that has pymskt (``mskt`` on PyPI) and
never imports the workbench, so the two tools share nothing but the input
files.  Install it once, beside the project's environment::

    python3.11 -m venv /tmp/msktvenv
    /tmp/msktvenv/bin/pip install --no-deps mskt
    /tmp/msktvenv/bin/pip install numpy scipy vtk pyvista pyacvd SimpleITK point-cloud-utils nibabel \\
        cycpd param traittypes "pymeshfix<0.18"

Input: a label map in the workbench's label table (femur 7 with femoral
cartilage 2, tibia 8 with tibial cartilage 3/4, patella 9 with patellar
cartilage 1) and the same map with the femoral cartilage split into the
subregions 11-15.  Per bone, the way the original knee pipeline used pymskt:
``BoneMesh.create_mesh`` and ``resample_surface`` to ``n_points``,
``calc_cartilage_thickness`` from the cartilage labels, then
``assign_cartilage_regions`` from the subregion map.  Regional statistics
count vertices with thickness > 0, like the workbench's.

    /tmp/msktvenv/bin/python bench/pymskt_reference.py LABELS SUBREGIONS --json OUT.json

Writes ``{"regions": {name_mm_mean: ...}, "seconds": {...}, "versions": ...}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

# pymskt's package has a ``statistics`` subpackage that shadows the standard
# library when the working directory is pymskt's own folder; never run from there.
sys.path = [p for p in sys.path if not p.endswith(os.sep + "pymskt")]

import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402

warnings.filterwarnings("ignore")

BONES = {  # bone: (label, cartilage labels for thickness, region labels, n_points, crop_percent)
    "femur": (7, [2], [11, 12, 13, 14, 15], 20000, 0.7),
    "tibia": (8, [3, 4], [3, 4], 20000, None),
    "patella": (9, [1], [1], 10000, None),
}
REGION_NAMES = {1: "pat_cart", 3: "med_tib_cart", 4: "lat_tib_cart", 11: "ant_fem_cart", 12: "med_wb_fem_cart",
                13: "lat_wb_fem_cart", 14: "med_post_fem_cart", 15: "lat_post_fem_cart"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("labels", help="label map (workbench labels)")
    parser.add_argument("subregions", help="the same label map with femoral subregions 11-15")
    parser.add_argument("--json", required=True, help="where to write the results")
    parser.add_argument("--bones", default="femur,tibia,patella")
    args = parser.parse_args(argv)

    import pymskt  # noqa: E402
    from pymskt.mesh import BoneMesh  # noqa: E402  (slow import, after argument parsing)

    t_all = time.perf_counter()
    cpu_all = time.process_time()
    seg = sitk.ReadImage(args.labels)
    sub = sitk.ReadImage(args.subregions)
    seconds: dict[str, float] = {}
    stats: dict[str, float | None] = {}
    n_points: dict[str, int] = {}
    for bone in [b.strip() for b in args.bones.split(",") if b.strip()]:
        label, cart, regions, points, crop = BONES[bone]
        t0 = time.perf_counter()
        mesh = BoneMesh(seg_image=seg, label_idx=label, list_cartilage_labels=cart, crop_percent=crop, bone=bone)
        mesh.create_mesh()
        mesh.resample_surface(clusters=points)
        mesh.calc_cartilage_thickness()
        mesh.seg_image = sub
        mesh.list_cartilage_labels = regions
        mesh.assign_cartilage_regions()
        seconds[bone] = round(time.perf_counter() - t0, 2)
        thickness = np.asarray(mesh.get_scalar("thickness (mm)"), dtype=np.float64)
        region = np.asarray(mesh.get_scalar("labels"))
        n_points[bone] = int(thickness.size)
        valid = np.isfinite(thickness) & (thickness > 0)
        for value in regions:
            values = thickness[valid & (region == value)]
            name = REGION_NAMES[value]
            for stat, fn in (("mean", np.mean), ("std", np.std), ("median", np.median)):
                stats[f"{name}_mm_{stat}"] = float(fn(values)) if values.size else None
    seconds["total"] = round(time.perf_counter() - t_all, 2)
    seconds["cpu_total"] = round(time.process_time() - cpu_all, 2)
    out = {"regions": stats, "seconds": seconds, "n_points": n_points,
           "versions": {"pymskt": getattr(pymskt, "__version__", "unknown"), "python": sys.version.split()[0]}}
    with open(args.json, "w", encoding="utf-8") as f:
        json.dump(out, f, indent=2)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
