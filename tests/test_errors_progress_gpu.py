"""Error classification, progress sinks and GPU housekeeping."""

from __future__ import annotations

import io
import pickle

import pytest

from workbench import gpu
from workbench.errors import (
    DicomError,
    ErrorCode,
    WorkbenchError,
    classify,
    exit_code_for,
)
from workbench.progress import LogSink, ProgressEvent


def test_every_original_code_exists():
    for code in ("TIMEOUT", "GPU_OOM", "FILE_NOT_FOUND", "INVALID_FORMAT", "DICOM_ERROR", "PIPELINE_ERROR",
                 "CONFIG_ERROR", "MODEL_UNAVAILABLE", "SEGMENTATION_FAILED", "NSM_FAILED",
                 "RECONSTRUCTION_FAILED", "CANCELLED"):
        assert ErrorCode(code).value == code


def test_typed_errors_survive_pickling_and_dicts():
    err = DicomError("slice 3 of s.dcm is missing\nsecond line", "re-export", step="load_input")
    again = pickle.loads(pickle.dumps(err))
    assert isinstance(again, DicomError) and again.to_dict() == err.to_dict()
    assert err.message == "slice 3 of s.dcm is missing second line"
    assert isinstance(WorkbenchError.from_dict(err.to_dict()), DicomError)


def test_classify_foreign_errors():
    import torch

    assert classify(torch.cuda.OutOfMemoryError("CUDA out of memory")).code is ErrorCode.GPU_OOM
    assert classify(RuntimeError("CUDA error: out of memory")).code is ErrorCode.GPU_OOM
    assert classify(FileNotFoundError(2, "No such file", "/x.nii")).code is ErrorCode.FILE_NOT_FOUND
    assert "/x.nii" in classify(FileNotFoundError(2, "No such file", "/x.nii")).message
    assert classify(KeyboardInterrupt()).code is ErrorCode.CANCELLED
    assert classify(ValueError("odd")).code is ErrorCode.PIPELINE_ERROR
    assert classify(MemoryError()).code is ErrorCode.PIPELINE_ERROR
    # text alone about memory without CUDA is not a GPU OOM
    assert classify(RuntimeError("out of memory in the parser")).code is ErrorCode.PIPELINE_ERROR


def test_exit_codes():
    assert exit_code_for(None) == 0
    assert exit_code_for(WorkbenchError("x", code="CONFIG_ERROR")) == 2
    assert exit_code_for(WorkbenchError("x", code="DICOM_ERROR")) == 3


def test_log_sink_writes_one_line_per_few_percent():
    stream = io.StringIO()
    sink = LogSink(stream, every=0.1)
    sink(ProgressEvent("step_start", step="s", step_index=1, n_steps=1))
    for i in range(1000):
        sink(ProgressEvent("update", step="s", step_index=1, n_steps=1, fraction=i / 1000))
    sink(ProgressEvent("update", step="s", step_index=1, n_steps=1, fraction=1.0))
    sink(ProgressEvent("step_end", step="s", step_index=1, n_steps=1, status="ok"))
    lines = stream.getvalue().splitlines()
    assert 10 <= len(lines) <= 14
    assert "[1/1] s" in lines[0]


def test_tqdm_sink_runs_headless():
    from workbench.progress import TqdmSink

    sink = TqdmSink()
    for event in (ProgressEvent("run_start", n_steps=2), ProgressEvent("step_start", step="a", n_steps=2),
                  ProgressEvent("update", step="a", fraction=0.5), ProgressEvent("step_end", step="a", status="ok"),
                  ProgressEvent("run_end", status="ok")):
        sink(event)


def test_cleanup_gpu_memory_is_a_measured_no_op_on_cpu():
    info = gpu.cleanup_gpu_memory()
    assert info["cuda"] == gpu.cuda_available()
    assert info["seconds"] >= 0 and "gc_objects" in info
    if not info["cuda"]:
        assert gpu.gpu_memory_mb() is None


def test_resolve_device():
    assert gpu.resolve_device("cpu") == "cpu"
    assert gpu.resolve_device("auto") in ("cpu", "cuda")
    if not gpu.cuda_available():
        with pytest.raises(WorkbenchError) as info:
            gpu.resolve_device("cuda")
        assert info.value.code is ErrorCode.CONFIG_ERROR
    with pytest.raises(WorkbenchError):
        gpu.resolve_device("tpu")


def test_peak_rss_is_positive():
    assert gpu.peak_rss_mb() > 1


def test_jsonl_follower_sees_events_written_by_another_writer(tmp_path):
    from workbench.progress import JsonlFollower, JsonlSink

    seen = []
    path = tmp_path / "progress.jsonl"
    writer = JsonlSink(path)
    with JsonlFollower(path, seen.append, interval=0.05):
        for i in range(5):
            writer(ProgressEvent("update", step="s", fraction=i / 5))
        with open(path, "a") as fh:
            fh.write('{"kind": "upd')  # a line still being written is not read half
    assert [e.fraction for e in seen] == [0.0, 0.2, 0.4, 0.6, 0.8]
