"""Benchmark: the knee pipeline's GPU paths (nnU-Net segmentation, shape-model fits) beside the CPU, one machine.

Runs ``run_knee`` on one case with ``device=cuda`` for each segmentation
model, with ``nsm_type: both`` (bone_only, then bone_and_cart, GPU memory
released between the steps), and once with ``device=cpu`` as the baseline on
the same machine.  Per run and step: seconds, peak GPU memory (MB) and the
GPU memory still reserved after the step's child process released it, from
``result.json``.

    python bench/knee_gpu.py --json /tmp/knee_gpu.json                     # writes a sample case first
    python bench/knee_gpu.py --image case.nii.gz --labels case_labels.nii.gz --json out.json

Needs CUDA (the runs with ``device=cuda`` are skipped without it).
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

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def one_run(image: str, labels: str | None, device: str, model: str, nsm_type: str, run_dir: Path) -> dict:
    from workbench.errors import WorkbenchError
    from workbench.knee.pipeline import run_knee

    options = {"input": image, "ground_truth": labels, "segmentation_model": model, "nsm_type": nsm_type,
               "device": device}
    t0 = time.perf_counter()
    try:
        run_knee(options, run_dir=run_dir)
    except WorkbenchError as exc:
        print(f"{device} {model}: {exc.code} {exc.message}", flush=True)
    total = time.perf_counter() - t0
    result = json.loads((run_dir / "result.json").read_text())
    steps = {s["name"]: {k: s.get(k) for k in ("status", "seconds", "peak_gpu_mb", "gpu_after_mb", "peak_rss_mb")}
             for s in result["steps"]}
    metrics = result.get("metrics", {})
    dice = (metrics.get("segmentation") or {}).get("dice") or {}
    row = {"device": device, "segmentation_model": model, "nsm_type": nsm_type, "status": result["status"],
           "total_s": round(total, 1), "steps": steps,
           "dice_mean": round(sum(dice.values()) / len(dice), 4) if dice else None,
           "nsm": {k: metrics.get(k) for k in ("nsm_bone_only", "nsm_bone_and_cart") if k in metrics}}
    print(json.dumps(row), flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", help="knee image (NIfTI or DICOM); default: a sample case written first")
    parser.add_argument("--labels", help="its ground-truth label map (for Dice)")
    parser.add_argument("--models", default="nnunet_fullres,nnunet_cascade")
    parser.add_argument("--nsm", default="both")
    parser.add_argument("--no-cpu", action="store_true", help="skip the CPU baseline")
    parser.add_argument("--json", help="write the rows to this file")
    args = parser.parse_args(argv)

    import torch

    work = Path(tempfile.mkdtemp(prefix="knee_gpu_"))
    image, labels = args.image, args.labels
    if image is None:
        from workbench.data.samples import write_sample

        paths = write_sample(work / "sample", preset="small", seed=21, name="knee", n_echoes=6)
        image, labels = str(paths["image"]), str(paths["labels"])
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    out = {"machine": {"gpu": gpu, "cpus": os.cpu_count(), "platform": platform.platform()},
           "torch": torch.__version__, "rows": []}
    print(json.dumps(out["machine"]), flush=True)
    devices = (["cuda"] if torch.cuda.is_available() else []) + ([] if args.no_cpu else ["cpu"])
    for device in devices:
        for model in [m.strip() for m in args.models.split(",") if m.strip()]:
            if device == "cpu" and model != "nnunet_fullres":
                continue  # one CPU baseline is enough
            out["rows"].append(one_run(image, labels, device, model, args.nsm, work / f"{device}_{model}"))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
