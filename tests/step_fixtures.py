"""Step functions used by the runner tests (importable by spawned children)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from workbench.errors import InvalidFormat
from workbench.outputs import Output
from workbench.runner import StepResult


def sleep_step(ctx, seconds: float, spawn_grandchild: bool = False, pid_file: str | None = None):
    """Sleep (optionally with a grandchild that also sleeps), reporting progress."""
    if spawn_grandchild:
        child = subprocess.Popen([sys.executable, "-c", f"import time; time.sleep({seconds})"])
        if pid_file:
            Path(pid_file).write_text(f"{os.getpid()} {child.pid}")
    elif pid_file:
        Path(pid_file).write_text(str(os.getpid()))
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        ctx.progress((time.monotonic() - t0) / seconds, "sleeping")
        time.sleep(0.05)
    return StepResult(metrics={"slept_s": seconds})


def write_json_step(ctx, value: int):
    (ctx.work_dir / "value.json").write_text(json.dumps({"value": value}))
    for i in range(100):
        ctx.progress(i / 100, f"item {i}")
    return StepResult(outputs={"value": Output("value.json", "json")}, values={"value": value})


def write_nifti_step(ctx, shape=(4, 5, 6), bad_label: bool = False):
    import nibabel as nib

    data = np.zeros(shape, np.uint8)
    data[1:3, 1:3, 1:3] = 7
    if bad_label:
        data[0, 0, 0] = 42
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(ctx.work_dir / "labels.nii.gz"))
    (ctx.work_dir / "partial.json").write_text("{}")
    return StepResult(outputs={
        "partial": Output("partial.json", "json"),
        "labels": Output("labels.nii.gz", "nifti", expect={"shape": list(shape), "labels": list(range(10))}),
    })


def failing_step(ctx, kind: str = "typed"):
    (ctx.work_dir / "half.json").write_text('{"half": ')
    if kind == "typed":
        raise InvalidFormat("bad.png is not an image volume", "Give a NIfTI file.")
    if kind == "oom":
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
    if kind == "missing":
        open("/nonexistent/file.nii")
    if kind == "crash":
        os._exit(9)
    if kind == "kill":
        os.kill(os.getpid(), 9)
    raise ValueError("something odd")


def undeclared_output_step(ctx):
    return StepResult(outputs={"x": Output("missing.nii.gz", "nifti")})
