"""Knee segmentation benchmark: Dice, seconds and peak RSS per case, and the overhead over nnU-Net's own CLI.

For each held-out synthetic case (seeds never used in training) and each model
(``nnunet_fullres``, ``nnunet_cascade``):

* the workbench: ``run_knee`` on the case's NIfTI, as ``workbench run knee`` runs
  it inside the notebook (each step in its own child process), timing the
  segmentation step, the input and segmentation steps together (what nnU-Net's
  command line also does: read the image, predict, write the labels) and, for
  information, the whole run with the analysis steps after segmentation;
* nnU-Net itself: ``nnUNetv2_predict_from_modelfolder`` on the same NIfTI
  (for the cascade: the 3d_lowres stage, then 3d_cascade_fullres with
  ``-prev_stage_predictions``), same folds, checkpoint, step size and no mirroring.

Usage: ``python bench/knee_segmentation.py [--cases 8] [--cli-cases 2] [--models nnunet_fullres nnunet_cascade]``
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from workbench.config import KneeOptions, knee_job_config
from workbench.data.labels import KNEE_LABELS
from workbench.data.synthetic_knee import SyntheticKneeConfig, generate_case, write_case
from workbench.knee.pipeline import nnunet_overrides, run_knee
from workbench.knee.segmentation import (
    dice_scores,
    find_configuration,
    postprocess,
    resolve_model_root,
)
from workbench.progress import Progress
from workbench.registry import REGISTRY

HELD_OUT_SEED_START = 90_000  # training used seeds far below this


def make_cases(folder: Path, n: int, preset: str) -> list[dict[str, Path]]:
    cases = []
    for index in range(n):
        seed = HELD_OUT_SEED_START + index
        config = SyntheticKneeConfig.from_preset(preset, seed=seed, source="sag_3d_dess")
        cases.append(write_case(generate_case(config), folder, f"heldout_{seed}"))
    return cases


def nnunet_cli(image: Path, model: str, out: Path) -> tuple[float, np.ndarray]:
    """Run nnU-Net's own command line on one image; return (seconds, labels in the workbench table)."""
    spec = REGISTRY.model(model)
    overrides = nnunet_overrides(knee_job_config(KneeOptions(input=str(image))))
    root = resolve_model_root(overrides["model_folder"])
    inputs = out / "in"
    inputs.mkdir(parents=True, exist_ok=True)
    target = inputs / "case_0000.nii.gz"
    if not target.exists():
        os.symlink(image.resolve(), target)
    previous = None
    t0 = time.perf_counter()
    for name in spec.config.configuration:
        stage = find_configuration(root, name, overrides["folds"], overrides["checkpoint"])
        stage_out = out / name
        cmd = [str(Path(sys.executable).parent / "nnUNetv2_predict_from_modelfolder"), "-i", str(inputs),
               "-o", str(stage_out), "-m", str(stage.folder), "-f", *stage.folds, "-chk", stage.checkpoint,
               "-step_size", str(overrides["tile_step_size"]), "--disable_tta", "-device", "cpu",
               "-npp", "1", "-nps", "1", "--disable_progress_bar"]
        if previous is not None:
            cmd += ["-prev_stage_predictions", str(previous)]
        subprocess.run(cmd, check=True, capture_output=True)
        previous = stage_out
    seconds = time.perf_counter() - t0
    from workbench.knee.segmentation import remap

    raw = np.asarray(nib.load(str(previous / "case.nii.gz")).dataobj)
    return seconds, remap(raw, stage.label_map)


def canonical(array: np.ndarray, affine: np.ndarray) -> np.ndarray:
    ornt = nib.orientations.io_orientation(affine)
    return nib.orientations.apply_orientation(array, nib.orientations.ornt_transform(
        ornt, nib.orientations.axcodes2ornt(("R", "A", "S"))))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=8)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--models", nargs="+", default=["nnunet_fullres", "nnunet_cascade"])
    parser.add_argument("--cli-cases", type=int, default=2,
                        help="how many of the cases also go through nnU-Net's own CLI (0: none)")
    parser.add_argument("--json", help="write all figures to this JSON file")
    args = parser.parse_args()
    root = resolve_model_root("knee_nnunet")
    if not root.is_dir():
        print(f"skipped: no shipped model folder at {root}")
        return 0
    figures: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        cases = make_cases(tmp / "cases", args.cases, args.preset)
        print(f"{len(cases)} held-out cases ({args.preset}, seeds {HELD_OUT_SEED_START}+) in "
              f"{time.perf_counter() - t0:.0f} s; {os.cpu_count()} CPUs")
        for model in args.models:
            dice: dict[str, list[float]] = {label.key: [] for label in KNEE_LABELS}
            wb_run, wb_step, cli_s, rss, agree, paired, full_run = [], [], [], [], [], [], []
            for index, case in enumerate(cases):
                run_dir = tmp / "runs" / f"{model}-{index}"
                t = time.perf_counter()
                run = run_knee({"input": str(case["image"]), "segmentation_model": model, "device": "cpu"},
                               run_dir=run_dir, progress=Progress([]))
                full_run.append(time.perf_counter() - t)
                # input + segmentation: the two steps' wall times, each with its child process start
                wb_run.append(sum(s.seconds for s in run.steps if s.name in ("load_input", "segmentation")))
                step = next(s for s in run.steps if s.name == "segmentation")
                wb_step.append(step.seconds)
                rss.append(step.peak_rss_mb or 0.0)
                labels_img = next(run_dir.glob("*_all-labels.nii.gz"))
                pred = np.asarray(nib.load(str(labels_img)).dataobj)
                truth_img = nib.load(str(case["labels"]))
                truth = canonical(np.asarray(truth_img.dataobj), truth_img.affine)
                scores = dice_scores(pred, truth)
                for label in KNEE_LABELS:
                    if scores[label.value] is not None:
                        dice[label.key].append(scores[label.value])
                if index < args.cli_cases:
                    seconds, cli_labels = nnunet_cli(case["image"], model, tmp / "cli" / f"{model}-{index}")
                    cli_s.append(seconds)
                    paired.append((wb_step[-1], wb_run[-1]))
                    img = nib.load(str(case["image"]))
                    cli_canonical = postprocess(canonical(cli_labels, img.affine))
                    agree.append(float(np.mean(cli_canonical == pred)))
            row = {
                "dice_mean": {k: round(statistics.mean(v), 4) for k, v in dice.items() if v},
                "dice_min": {k: round(min(v), 4) for k, v in dice.items() if v},
                "workbench_input_plus_segmentation_s": round(statistics.median(wb_run), 2),
                "workbench_whole_run_with_analysis_s": round(statistics.median(full_run), 2),
                "workbench_segmentation_step_s": round(statistics.median(wb_step), 2),
                "segmentation_step_peak_rss_mb": round(max(rss), 0),
            }
            if cli_s:
                # ratios over the same cases: workbench time / nnU-Net CLI time (< 1.1 meets the 10 % bound)
                row["nnunet_cli_s"] = round(statistics.median(cli_s), 2)
                row["ratio_segmentation_step_to_cli"] = round(
                    statistics.median(p[0] for p in paired) / statistics.median(cli_s), 3)
                row["ratio_input_plus_segmentation_to_cli"] = round(statistics.median(p[1] for p in paired) / statistics.median(cli_s), 3)
                row["voxel_agreement_with_cli"] = round(min(agree), 6)
            figures[model] = row
            print(f"\n{model}:")
            for key, value in row.items():
                print(f"  {key}: {value}")
    print(f"\nbench process peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
