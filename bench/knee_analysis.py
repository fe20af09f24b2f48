"""Benchmark: every figure of the knee analysis (thickness, T2, neural shape models), with pymskt side by side.

Sections (``--only`` picks some; each skips cleanly when its data is absent):

``phantoms``
    Cartilage thickness on synthetic shells of known thickness (flat, sphere,
    cylinder; 1, 2, 4 mm; MRI-like anisotropic voxels rotated against the
    object), from ``bench/thickness_accuracy.py``: mean absolute error per case.
    Target: MAE <= 0.1 mm.  Surfaces parallel to thick slices are reported apart:
    there a label map quantises the thickness to whole slices.
``pymskt``
    The real label map ``right_knee_example.nrrd`` (mskt 0.1.22 sdist; its labels
    mapped onto the workbench table): the workbench's femoral subregions, then
    meshes, thickness and regional statistics of femur, tibia and patella with
    the pipeline's vertex counts (``configs/knee.yaml``: 20000/20000/10000), and
    pymskt on the same label maps in its own interpreter
    (``bench/pymskt_reference.py``; ``--pymskt-python`` or
    ``$WORKBENCH_PYMSKT_PYTHON``), one after the other.  Targets: regional
    means within 0.15 mm of pymskt's; the workbench >= 3x faster.
``t2``
    From ``bench/t2_accuracy.py``: synthetic decays with known T2 (20-60 ms,
    SNR 15-60), a synthetic multi-echo knee, and the real GE MESE series
    (cartilage ROI median T2, whole-volume fit time); with ``--figures`` a
    T2 overlay of the MESE series.  Targets: median error <= 1 ms; MESE
    cartilage 25-60 ms.
``nsm``
    The shipped shape models (``models/nsm_femur``, ``models/nsm_femur_cartilage``)
    fitted, one fit at a time, to unseen synthetic knees (a left and a right)
    through ``fit_nsm``: ASSD per surface beside the aligned mean shape's, and
    seconds per fit (target <= 60 s).  With ``--nsm-loso DIR``: the
    leave-one-subject-out results of ``bench/train_nsm.py --holdout`` runs
    (any ``summary.json`` below ``DIR``): femurs of a subject never seen in training.
    Targets: ASSD <= 1.0 mm bone, <= 0.5 mm cartilage.
``pipeline``
    ``run_knee`` on the bundled sample with its given label map and
    ``nsm_type: both``: seconds per step.

Usage::

    python bench/knee_analysis.py --json /tmp/knee_analysis.json --figures /tmp/knee_figures \\
        --pymskt-python /tmp/msktvenv/bin/python --nsm-loso /tmp/nsm_loso
    python bench/knee_analysis.py --quick --only phantoms,pymskt

Install pymskt as ``bench/pymskt_reference.py`` describes; the mskt data
with ``workbench data fetch``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "bench"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

SECTIONS = ("phantoms", "pymskt", "t2", "nsm", "pipeline")
THICKNESS_TOLERANCE_MM = 0.15


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def _mskt_label_map():
    from workbench.data import labels as L
    from workbench.data.samples import label_map_paths
    from workbench.data.synthetic_knee import read_nrrd_labels
    from workbench.errors import WorkbenchError

    try:
        path = label_map_paths(fetch=False)["right_knee_example"]
    except WorkbenchError as exc:
        return None, None, f"mskt sample data absent ({exc.message}); run `workbench data fetch`"
    if not path.is_file():
        return None, None, f"{path} absent; run `workbench data fetch`"
    data, affine = read_nrrd_labels(path)
    return L.remap_labels(data, L.SOURCE_MAPPINGS["right_knee_example"], source=path.name), affine, None


# --- sections -----------------------------------------------------------------------------------------

def phantoms(args) -> dict:
    from thickness_accuracy import accuracy

    rows = accuracy(args.quick, 8000, "mesh")
    # surfaces parallel to thick slices: a label map holds the thickness only in whole slices there
    oblique = [r for r in rows if any(r["angles_deg"])]
    aligned = [r for r in rows if not any(r["angles_deg"])]
    mae = [r["mae_mm"] for r in oblique]
    return {"cases": rows, "mae_mm_max": max(mae), "mae_mm_mean": float(np.mean(mae)),
            "bias_mm_max_abs": max(abs(r["bias_mm"]) for r in oblique), "target_mae_mm": 0.1,
            "meets_target": max(mae) <= 0.1,
            "aligned_with_slices": [{k: r[k] for k in ("kind", "thickness_mm", "spacing_mm", "mae_mm", "bias_mm")}
                                    for r in aligned]}


def pymskt(args) -> dict:
    import nibabel as nib

    from workbench.config import load_base_config
    from workbench.knee.subregions import femoral_subregions
    from workbench.knee.thickness import knee_thickness

    labels, affine, why = _mskt_label_map()
    if labels is None:
        return {"skipped": why}
    bones = load_base_config("knee")["bones"]
    n_vertices = {b: int(v["n_points"]) for b, v in bones.items()}
    out: dict = {"input": "right_knee_example.nrrd", "shape": list(labels.shape),
                 "spacing_mm": [round(float(s), 4) for s in np.linalg.norm(affine[:3, :3], axis=0)],
                 "n_vertices": n_vertices}
    t0, c0 = time.perf_counter(), time.process_time()
    sub = femoral_subregions(labels, affine)
    t1 = time.perf_counter()
    per_bone, stats = knee_thickness(sub.labels, affine, n_vertices=n_vertices)
    t2, c2 = time.perf_counter(), time.process_time()
    out["workbench"] = {"regions": stats, "seconds": {
        "subregions": round(t1 - t0, 2), "meshes_thickness_regions": round(t2 - t1, 2),
        "per_bone": {b: {k: round(v, 2) for k, v in r.seconds.items()} for b, r in per_bone.items()},
        "cpu_total": round(c2 - c0, 2)}}
    python = args.pymskt_python or os.environ.get("WORKBENCH_PYMSKT_PYTHON")
    if not python or not Path(python).is_file():
        out["pymskt"] = {"skipped": "no pymskt interpreter (--pymskt-python or $WORKBENCH_PYMSKT_PYTHON); "
                                    "see bench/pymskt_reference.py"}
        return out
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        nib.save(nib.Nifti1Image(labels.astype(np.uint8), affine), str(tmp / "labels.nii.gz"))
        nib.save(nib.Nifti1Image(sub.labels.astype(np.uint8), affine), str(tmp / "subregions.nii.gz"))
        cmd = [python, str(ROOT / "bench" / "pymskt_reference.py"), str(tmp / "labels.nii.gz"),
               str(tmp / "subregions.nii.gz"), "--json", str(tmp / "pymskt.json")]
        proc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True)
        if proc.returncode != 0:
            out["pymskt"] = {"failed": proc.stderr[-2000:]}
            return out
        ref = json.loads((tmp / "pymskt.json").read_text())
    out["pymskt"] = ref
    rows = []
    for key, value in ref["regions"].items():
        if key.endswith("_mean") and value is not None and stats.get(key) is not None:
            region = key[: -len("_mm_mean")]
            rows.append({"region": region, "workbench_mean": stats[key], "pymskt_mean": value,
                         "diff_mean": stats[key] - value,
                         "workbench_median": stats[f"{region}_mm_median"],
                         "pymskt_median": ref["regions"][f"{region}_mm_median"],
                         "workbench_std": stats[f"{region}_mm_std"], "pymskt_std": ref["regions"][f"{region}_mm_std"]})
    out["comparison"] = rows
    out["max_abs_diff_mean_mm"] = max(abs(r["diff_mean"]) for r in rows)
    # like for like: meshes + thickness + regions of the three bones (pymskt is given the subregions)
    out["speed_ratio"] = ref["seconds"]["total"] / max(1e-9, t2 - t1)
    out["speed_ratio_incl_subregions"] = ref["seconds"]["total"] / max(1e-9, t2 - t0)
    out["meets_target"] = out["max_abs_diff_mean_mm"] <= THICKNESS_TOLERANCE_MM and out["speed_ratio"] >= 3.0
    return out


def t2(args) -> dict:
    import t2_accuracy

    from workbench.errors import WorkbenchError

    out: dict = {"voxels": t2_accuracy.voxels(), "knee": t2_accuracy.knee()}
    nonlinear = [r for r in out["voxels"] if r["method"] == "nonlinear"]
    out["voxels_nonlinear_max_abs_median_err_ms"] = max(abs(r["median_err_ms"]) for r in nonlinear)
    interior = [r for r in out["knee"] if r["method"] == "nonlinear" and r["voxels"] == "interior"]
    out["knee_nonlinear_max_abs_median_err_ms"] = max(abs(r["median_err_ms"]) for r in interior)
    try:
        out["mese"] = t2_accuracy.mese()
    except (WorkbenchError, FileNotFoundError) as exc:
        out["mese"] = {"skipped": f"MESE series absent ({exc}); run `workbench data fetch`"}
        return out
    if args.figures:
        out["mese_figure"] = str(mese_figure(Path(args.figures)))
    return out


def mese_figure(folder: Path) -> Path:
    """The MESE series' nonlinear T2 map over its first echo, two slices, with the cartilage ROI outlined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from t2_accuracy import MESE_ROI

    from workbench.data.samples import mese_dir
    from workbench.io.load import load_volume
    from workbench.knee.t2 import fit_t2

    volume = load_volume(mese_dir(fetch=False))
    echoes = np.moveaxis(volume.echoes, -1, 0)
    fit = fit_t2(echoes, volume.echo_times_ms, method="nonlinear")
    fig, axes = plt.subplots(2, 2, figsize=(9, 8))
    for column, (k, (rows, cols)) in enumerate(MESE_ROI.items()):
        t2_map = np.where(fit.valid[k], fit.t2_ms[k], np.nan)
        centre = ((rows.start + rows.stop) // 2, (cols.start + cols.stop) // 2)
        for row, half in ((0, None), (1, 45)):  # the slice, then the joint around the ROI
            ax = axes[row, column]
            ax.imshow(echoes[0][k].T, cmap="gray", origin="lower")
            shown = ax.imshow(t2_map.T, cmap="magma", vmin=0, vmax=80, alpha=0.55, origin="lower")
            ax.add_patch(matplotlib.patches.Rectangle((rows.start, cols.start), rows.stop - rows.start,
                                                      cols.stop - cols.start, fill=False, ec="cyan", lw=1.2))
            if half:
                ax.set_xlim(centre[0] - half, centre[0] + half)
                ax.set_ylim(centre[1] - half, centre[1] + half)
            ax.axis("off")
        roi = fit.t2_ms[k][rows, cols]
        axes[0, column].set_title(f"slice {k}: cartilage ROI median {np.nanmedian(roi):.1f} ms", fontsize=9)
    fig.colorbar(shown, ax=axes, shrink=0.8, label="T2 (ms)")
    fig.suptitle("GE 3T MESE knee (mskt sdist), mono-exponential T2, noise-corrected fit", fontsize=10)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "t2_mese.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def nsm(args) -> dict:
    import torch
    from train_nsm import MODELS, SURFACE_LABELS, fit_row, generator_case

    from workbench.config import models_dir
    from workbench.errors import WorkbenchError
    from workbench.knee.nsm.model import load_nsm
    from workbench.knee.nsm.sdf import mesh_from_mask

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    out: dict = {"threads": torch.get_num_threads(), "shipped": {}}
    cache = Path(args.cache or tempfile.gettempdir()) / "workbench_nsm_bench"
    cases = [(3000, False, "right_knee_example"), (3001, True, "sag_3d_dess")][: 1 if args.quick else 2]
    for name, spec in MODELS.items():
        try:
            model = load_nsm(models_dir() / spec["folder"], "cpu")
        except WorkbenchError as exc:
            out["shipped"][name] = {"skipped": exc.message}
            continue
        rows = []
        for seed, flip, source in cases:
            try:
                labels, affine, side = generator_case(seed, flip, source, cache)
            except WorkbenchError as exc:
                out["shipped"][name] = {"skipped": f"mskt sample data absent ({exc.message})"}
                break
            meshes = [mesh_from_mask(np.isin(labels, SURFACE_LABELS[s]), affine) for s in spec["surfaces"]]
            rows.append(fit_row(model, f"generator-{source}-{seed}", meshes, side))
            log(f"  {name} {rows[-1]['case']}: {rows[-1]['assd_mm']} in {rows[-1]['seconds']} s")
        if rows:
            out["shipped"][name] = {"fits": rows, "fit_seconds_max": max(r["seconds"] for r in rows)}
    if args.nsm_loso:
        out["leave_one_subject_out"] = loso_summary(Path(args.nsm_loso))
    return out


def loso_summary(folder: Path) -> dict:
    """Hold-out rows of ``bench/train_nsm.py --holdout`` runs (any ``summary.json`` below ``folder``)."""
    from train_nsm import holdout_rows

    rows = holdout_rows(folder)
    if not rows:
        return {"skipped": f"no bench/train_nsm.py --holdout summaries under {folder}"}
    worst: dict[str, float] = {}
    for r in rows:
        for surface, v in r["assd_mm"].items():
            worst[surface] = max(worst.get(surface, 0.0), v)
    return {"fits": rows, "assd_mm_max": worst, "fit_seconds_max": max(r["seconds"] for r in rows)}


def pipeline(args) -> dict:
    from workbench.data.samples import write_sample
    from workbench.knee.pipeline import run_knee

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sample = write_sample(tmp / "sample", preset="small", seed=21, name="knee", n_echoes=6)
        t0 = time.perf_counter()
        run = run_knee({"input": str(sample["dicom"] if "dicom" in sample else sample["image"]),
                        "segmentation": str(sample["labels"]), "nsm_type": "both", "device": "cpu"},
                       run_dir=tmp / "run")
        total = time.perf_counter() - t0
        result = json.loads((run.run_dir / "result.json").read_text())
    return {"input": "bundled sample (preset small, 6 echoes) with its label map", "total_s": round(total, 1),
            "status": result["status"],
            "steps": {s["name"]: {"status": s["status"], "seconds": s.get("seconds")} for s in result["steps"]}}


# --- report -----------------------------------------------------------------------------------------

def report(results: dict) -> str:
    lines = []
    ph = results.get("phantoms")
    if ph:
        lines.append(f"phantoms: {len(ph['cases']) - len(ph['aligned_with_slices'])} oblique cases, MAE max "
                     f"{ph['mae_mm_max']:.3f} mm, mean {ph['mae_mm_mean']:.3f} mm, |bias| max "
                     f"{ph['bias_mm_max_abs']:.3f} mm; aligned with the slices (label-map limit): " + ", ".join(
                         f"{r['kind']} {r['thickness_mm']} mm MAE {r['mae_mm']:.2f}" for r in ph["aligned_with_slices"]))
    pm = results.get("pymskt")
    if pm and "comparison" in pm:
        lines.append("| region | workbench mean | pymskt mean | diff | workbench median | pymskt median |")
        lines.append("|---|---|---|---|---|---|")
        for r in pm["comparison"]:
            lines.append(f"| {r['region']} | {r['workbench_mean']:.3f} | {r['pymskt_mean']:.3f} | "
                         f"{r['diff_mean']:+.3f} | {r['workbench_median']:.3f} | {r['pymskt_median']:.3f} |")
        lines.append(f"max |diff| {pm['max_abs_diff_mean_mm']:.3f} mm; workbench "
                     f"{pm['workbench']['seconds']['meshes_thickness_regions']} s (+ subregions "
                     f"{pm['workbench']['seconds']['subregions']} s), pymskt {pm['pymskt']['seconds']['total']} s: "
                     f"ratio {pm['speed_ratio']:.1f}x ({pm['speed_ratio_incl_subregions']:.1f}x with subregions)")
    elif pm:
        lines.append(f"pymskt: {pm.get('skipped') or pm.get('pymskt')}")
    t = results.get("t2")
    if t:
        lines.append(f"T2 voxels (nonlinear): max |median error| {t['voxels_nonlinear_max_abs_median_err_ms']:.2f} ms; "
                     f"synthetic knee interior: {t['knee_nonlinear_max_abs_median_err_ms']:.2f} ms")
        if isinstance(t.get("mese"), list):
            for r in t["mese"]:
                lines.append(f"MESE {r['method']} skip_first={r['skip_first_echo']}: ROI median "
                             f"{r['roi_median_ms']:.1f} ms, whole volume {r['whole_volume_seconds']:.1f} s")
    n = results.get("nsm")
    if n:
        for name, info in n["shipped"].items():
            for r in info.get("fits", []):
                lines.append(f"NSM {name} {r['case']} ({r['side']}): ASSD {r['assd_mm']} (mean shape "
                             f"{r['assd_mean_shape_mm']}), {r['seconds']} s")
        lo = n.get("leave_one_subject_out")
        if lo and "fits" in lo:
            for r in lo["fits"]:
                lines.append(f"NSM LOSO {r['model']} trained on {r['trained_on']} -> {r['case']}: ASSD {r['assd_mm']} "
                             f"(mean shape {r['assd_mean_shape_mm']}), {r['seconds']} s")
    pl = results.get("pipeline")
    if pl:
        lines.append(f"pipeline ({pl['status']}): {pl['total_s']} s; " + ", ".join(
            f"{k} {v['seconds']}" for k, v in pl["steps"].items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"sections, comma-separated: {', '.join(SECTIONS)}")
    parser.add_argument("--quick", action="store_true", help="fewer phantom voxel sizes and one NSM case")
    parser.add_argument("--json", help="write every figure to this JSON file")
    parser.add_argument("--figures", help="folder for figures (the MESE T2 overlay)")
    parser.add_argument("--pymskt-python", help="python of an environment with pymskt (see bench/pymskt_reference.py)")
    parser.add_argument("--nsm-loso", help="folder of bench/train_nsm.py --holdout runs (one subfolder per run)")
    parser.add_argument("--cache", help="cache folder for synthetic NSM cases (default: the temp folder)")
    args = parser.parse_args(argv)
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    for s in sections:
        if s not in SECTIONS:
            parser.error(f"unknown section {s!r}; allowed: {', '.join(SECTIONS)}")
    results: dict = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                 "python": platform.python_version()},
                     "date": time.strftime("%Y-%m-%d %H:%M")}
    for s in sections:
        log(f"section {s}")
        t0 = time.perf_counter()
        results[s] = globals()[s](args)
        log(f"section {s} done in {time.perf_counter() - t0:.0f} s")
    text = report(results)
    print(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2, default=float) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
