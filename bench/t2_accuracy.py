"""T2 mapping accuracy: synthetic decays with known T2, a synthetic knee, the real GE MESE series.

Usage::

    python bench/t2_accuracy.py                 # all three parts (the last two need `workbench data fetch`)
    python bench/t2_accuracy.py --only voxels   # voxels | knee | mese
    python bench/t2_accuracy.py --json out.json

1. Voxels: 40 000 voxels with T2 uniform in 20-60 ms, S0 = 1000, the MESE echo
   times (6.3-50.5 ms, 8 echoes), Rician noise at SNR = S0 / sigma in
   {15, 25, 40, 60}, plus as many pure-noise background voxels (the noise floor
   is estimated from them).  Per method: median absolute error, median signed
   error (bias), fraction valid, seconds.
2. Synthetic knee: ``workbench.data.synthetic_knee`` (preset ``small``, 8 echoes,
   SNR 25, bias field, partial volume) with its ground-truth T2 map (the block
   mean of sub-voxel T2s); per cartilage label, over all its voxels and over its
   interior (eroded by one voxel, away from partial volume with fluid, fat and
   bone): median signed and absolute per-voxel error, median fitted and true T2,
   and the deep/superficial medians of ``region_t2_stats``.
3. MESE: the hand-placed tibiofemoral cartilage ROI of ``tests/test_t2.py``
   (two slices), median T2 per method, and the whole-volume fit time.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from workbench.knee.t2 import fit_t2, region_t2_stats

MESE_TES = tuple(6.312 * (e + 1) for e in range(8))
METHODS = ("loglinear", "nonlinear")
#: Hand-placed tibiofemoral cartilage ROI of the MESE series (slice: rows, columns), as in tests/test_t2.py.
MESE_ROI = {7: (slice(116, 133), slice(103, 108)), 16: (slice(110, 123), slice(102, 110))}


def voxels(seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    tes = np.asarray(MESE_TES)
    rows = []
    for snr in (15, 25, 40, 60):
        n = 40_000
        t2 = rng.uniform(20.0, 60.0, n)
        sigma = 1000.0 / snr
        clean = 1000.0 * np.exp(-tes[:, None] / t2)
        tissue = np.hypot(clean + rng.normal(0, sigma, clean.shape), rng.normal(0, sigma, clean.shape))
        background = np.hypot(rng.normal(0, sigma, (8, n)), rng.normal(0, sigma, (8, n)))
        data = np.concatenate([tissue, background], axis=1)
        mask = np.r_[np.ones(n, bool), np.zeros(n, bool)]
        for method in METHODS:
            start = time.perf_counter()
            fit = fit_t2(data, tes, mask=mask, method=method)
            seconds = time.perf_counter() - start
            err = fit.t2_ms[:n] - t2
            ok = np.isfinite(err)
            rows.append({"snr": snr, "method": method, "median_abs_err_ms": float(np.median(np.abs(err[ok]))),
                         "median_err_ms": float(np.median(err[ok])), "valid": float(ok.mean()),
                         "noise_sigma_true": sigma, "noise_sigma_est": fit.noise_sigma, "seconds": seconds})
    return rows


def knee(seed: int = 0) -> list[dict]:
    from scipy import ndimage

    from workbench.data.synthetic_knee import SyntheticKneeConfig, generate_case

    case = generate_case(SyntheticKneeConfig.from_preset("small", seed=seed, n_echoes=8))
    labels = case.labels.data
    truth = case.t2_map.data
    echoes = np.moveaxis(case.image.echoes, -1, 0)
    cartilage = np.isin(labels, [1, 2, 3, 4])
    rows = []
    for method in METHODS:
        start = time.perf_counter()
        fit = fit_t2(echoes, case.image.echo_times_ms, mask=cartilage, method=method)
        seconds = time.perf_counter() - start
        stats = region_t2_stats(fit.t2_ms, labels, case.labels.spacing, method=method)
        for value, name in ((1, "pat_cart"), (2, "fem_cart"), (3, "med_tib_cart"), (4, "lat_tib_cart")):
            label = labels == value
            interior = ndimage.binary_erosion(label)  # away from partial volume with other tissues
            for part, region in (("all", label), ("interior", interior)):
                sel = region & fit.valid
                err = fit.t2_ms[sel] - truth[sel]
                rows.append({
                    "method": method, "label": name, "voxels": part, "n": int(sel.sum()),
                    "valid": float(sel.sum() / max(1, region.sum())),
                    "median_err_ms": float(np.median(err)), "median_abs_err_ms": float(np.median(np.abs(err))),
                    "median_fit_ms": float(np.median(fit.t2_ms[sel])), "median_true_ms": float(np.median(truth[sel])),
                    "deep_median_ms": stats[f"{name}_deep_t2_ms_median"],
                    "superficial_median_ms": stats[f"{name}_superficial_t2_ms_median"],
                    "noise_sigma_est": fit.noise_sigma, "noise_sigma_true": case.params["noise_sigma"],
                    "seconds": seconds,
                })
    return rows


def mese() -> list[dict]:
    from workbench.data.samples import mese_dir
    from workbench.io.load import load_volume

    volume = load_volume(mese_dir(fetch=False))
    echoes = np.moveaxis(volume.echoes, -1, 0)
    roi = np.zeros(volume.shape, bool)
    for k, (rows, cols) in MESE_ROI.items():
        roi[k, rows, cols] = True
    rows = []
    for method in METHODS:
        for skip in (False, True):
            fit = fit_t2(echoes, volume.echo_times_ms, mask=roi, method=method, skip_first_echo=skip)
            start = time.perf_counter()
            whole = fit_t2(echoes, volume.echo_times_ms, method=method, skip_first_echo=skip)
            rows.append({"method": method, "skip_first_echo": skip,
                         "roi_median_ms": float(np.nanmedian(fit.t2_ms[roi])),
                         "roi_valid": float(fit.valid[roi].mean()),
                         "whole_volume_seconds": time.perf_counter() - start,
                         "whole_volume_fitted": whole.summary()["n_fitted"],
                         "noise_sigma_est": fit.noise_sigma})
    return rows


def _table(rows: list[dict]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in rows:
        lines.append("| " + " | ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in row.values()) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=("voxels", "knee", "mese"))
    parser.add_argument("--json", help="write every row to this JSON file")
    args = parser.parse_args()
    results = {}
    for name, func in (("voxels", voxels), ("knee", knee), ("mese", mese)):
        if args.only and args.only != name:
            continue
        results[name] = func()
        print(f"\n## {name}\n\n{_table(results[name])}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
