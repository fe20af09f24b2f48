"""The runner: child processes, hard timeouts, atomic outputs, result.json, error codes."""

from __future__ import annotations

import json
import os
import time

import jsonschema
import psutil
import pytest

from workbench.errors import ErrorCode, WorkbenchError
from workbench.progress import JsonlSink, Progress, read_events
from workbench.runner import Run, group_members, new_run_dir
from workbench.schemas import RESULT_SCHEMA


def make_run(tmp_path, **kw):
    run_dir = tmp_path / "run"
    kw.setdefault("progress", Progress([JsonlSink(run_dir / "progress.jsonl")]))
    return Run(run_dir, pipeline="knee", config={"k": 1}, **kw)


def test_step_outputs_are_moved_into_place_and_recorded(tmp_path):
    with make_run(tmp_path, n_steps=1) as run:
        record = run.step("write", "step_fixtures:write_json_step", value=5)
    assert record.values == {"value": 5}
    assert json.loads(record.outputs["value"].read_text()) == {"value": 5}
    result = json.loads((run.run_dir / "result.json").read_text())
    jsonschema.validate(result, RESULT_SCHEMA)
    assert result["status"] == "ok" and result["error"] is None
    assert result["outputs"][0]["path"] == "value.json" and len(result["outputs"][0]["sha256"]) == 64
    assert result["steps"][0]["peak_rss_mb"] > 0
    assert not (run.run_dir / ".work").exists()
    assert json.loads((run.run_dir / "config.json").read_text()) == {"k": 1}


def test_progress_events_are_throttled_and_written(tmp_path):
    with make_run(tmp_path) as run:
        run.step("write", "step_fixtures:write_json_step", value=1)
    events = read_events(run.run_dir / "progress.jsonl")
    kinds = [e.kind for e in events]
    assert kinds[0] == "run_start" and kinds[-1] == "run_end" and "step_start" in kinds and "step_end" in kinds
    updates = [e for e in events if e.kind == "update"]
    assert 1 <= len(updates) < 40  # 100 progress calls in the step, never one event per iteration


def test_timeout_kills_the_process_group_promptly(tmp_path):
    pid_file = tmp_path / "pids"
    t0 = time.monotonic()
    with pytest.raises(WorkbenchError) as info, make_run(tmp_path) as run:
        run.step("sleepy", "step_fixtures:sleep_step", timeout_s=2, seconds=60, spawn_grandchild=True,
                 pid_file=str(pid_file))
    elapsed = time.monotonic() - t0
    assert info.value.code is ErrorCode.TIMEOUT
    assert elapsed < 2 + 5
    child, grandchild = (int(p) for p in pid_file.read_text().split())
    time.sleep(0.2)
    for pid in (child, grandchild):
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert group_members(child) == []
    result = json.loads((run.run_dir / "result.json").read_text())
    assert result["status"] == "timeout" and result["error"]["code"] == "TIMEOUT"
    assert result["steps"][0]["status"] == "timeout"


def test_run_timeout_bounds_each_step(tmp_path):
    with pytest.raises(WorkbenchError) as info, make_run(tmp_path, timeout_s=1.5) as run:
        run.step("sleepy", "step_fixtures:sleep_step", timeout_s=100, seconds=30)
    assert info.value.code is ErrorCode.TIMEOUT
    assert "run's remaining time" in info.value.message


@pytest.mark.parametrize("kind, code", [
    ("typed", ErrorCode.INVALID_FORMAT),
    ("oom", ErrorCode.GPU_OOM),
    ("missing", ErrorCode.FILE_NOT_FOUND),
    ("crash", ErrorCode.PIPELINE_ERROR),
    ("kill", ErrorCode.PIPELINE_ERROR),
    ("other", ErrorCode.PIPELINE_ERROR),
])
def test_failures_carry_their_code_and_leave_no_outputs(tmp_path, kind, code):
    with pytest.raises(WorkbenchError) as info, make_run(tmp_path) as run:
        run.step("bad", "step_fixtures:failing_step", kind=kind)
    assert info.value.code is code
    assert "\n" not in info.value.message and info.value.hint
    assert not (run.run_dir / "half.json").exists()
    assert not (run.run_dir / ".work").exists()
    result = json.loads((run.run_dir / "result.json").read_text())
    assert result["status"] == "failed" and result["error"]["code"] == code.value
    assert result["error"]["step"] == "bad"
    log = (run.run_dir / "error.log").read_text()
    assert code.value in log
    if kind == "typed":
        assert "Traceback" in log and "bad.png" in info.value.message


def test_killed_child_is_reported(tmp_path):
    with pytest.raises(WorkbenchError) as info, make_run(tmp_path) as run:
        run.step("bad", "step_fixtures:failing_step", kind="kill")
    assert "SIGKILL" in info.value.message and "memory" in info.value.hint


def test_outputs_are_verified_by_content(tmp_path):
    with pytest.raises(WorkbenchError) as info, make_run(tmp_path) as run:
        run.step("nifti", "step_fixtures:write_nifti_step", bad_label=True)
    assert "unexpected labels [42]" in info.value.message
    # the JSON written beside it verified fine but must not be moved in alone
    assert not (run.run_dir / "partial.json").exists() and not (run.run_dir / "labels.nii.gz").exists()


def test_wrong_shape_and_missing_output_are_caught(tmp_path):
    with pytest.raises(WorkbenchError, match="did not write"), make_run(tmp_path) as run:
        run.step("none", "step_fixtures:undeclared_output_step")


def test_optional_step_failure_keeps_the_run_going(tmp_path):
    with make_run(tmp_path) as run:
        assert run.step("t2", "step_fixtures:failing_step", optional=True, kind="typed") is None
        run.skip("nsm", "no shape model requested")
        run.step("write", "step_fixtures:write_json_step", value=2)
    result = run.result()
    assert result["status"] == "ok"
    assert [s["status"] for s in result["steps"]] == ["failed", "skipped", "ok"]
    assert result["steps"][0]["error"]["code"] == "INVALID_FORMAT"


def test_cancel_kills_the_running_step(tmp_path):
    import threading

    run = make_run(tmp_path)
    threading.Timer(1.0, run.cancel).start()
    t0 = time.monotonic()
    with pytest.raises(WorkbenchError) as info, run:
        run.step("sleepy", "step_fixtures:sleep_step", seconds=60)
    assert info.value.code is ErrorCode.CANCELLED and time.monotonic() - t0 < 6
    assert run.result()["status"] == "cancelled"


def test_model_sequence_in_progress_events(tmp_path):
    with make_run(tmp_path, models=["reconviagen", "nvdiffrec"]) as run:
        run.step("a", "step_fixtures:write_json_step", model="reconviagen", value=1)
        run.step("b", "step_fixtures:sleep_step", model="nvdiffrec", seconds=0.1)
    starts = [e for e in read_events(run.run_dir / "progress.jsonl") if e.kind == "step_start"]
    assert [(e.model, e.model_index, e.n_models) for e in starts] == [("reconviagen", 1, 2), ("nvdiffrec", 2, 2)]
    assert starts[1].label().endswith("nvdiffrec (2 of 2)")


def test_new_run_dir_names(tmp_path):
    a, b = new_run_dir("knee", tmp_path), new_run_dir("knee", tmp_path)
    assert a != b and a.name.split("-")[2] == "knee" and a.is_dir()


def test_no_step_processes_left_behind(tmp_path):
    before = {p.pid for p in psutil.Process(os.getpid()).children(recursive=True)}
    with make_run(tmp_path) as run:
        run.step("s", "step_fixtures:sleep_step", seconds=0.1)
    after = {p.pid for p in psutil.Process(os.getpid()).children(recursive=True)}
    assert after <= before


def test_interrupting_the_parent_kills_the_step(tmp_path, monkeypatch):
    """A KeyboardInterrupt in the parent (Jupyter's stop button) ends the step's process group at once."""
    import workbench.runner as runner_module

    pid_file = tmp_path / "pid"
    real_sleep = time.sleep

    def interrupting_poll(self, timeout=0.0):
        if pid_file.exists():  # the step is running: the user presses stop
            raise KeyboardInterrupt
        real_sleep(timeout)
        return False

    from multiprocessing.connection import Connection

    monkeypatch.setattr(Connection, "poll", interrupting_poll)
    t0 = time.monotonic()
    with pytest.raises(WorkbenchError) as info, make_run(tmp_path) as run:
        run.step("sleepy", "step_fixtures:sleep_step", seconds=60, pid_file=str(pid_file))
    assert info.value.code is ErrorCode.CANCELLED and time.monotonic() - t0 < 20
    pid = int(pid_file.read_text())
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert runner_module.group_members(pid) == []
