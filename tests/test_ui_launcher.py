"""The launcher's logic without a browser: fields from the registry, input checks, options, runs and cancel."""

from __future__ import annotations

import json
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from dicom_factory import random_stored, write_series

from workbench.errors import ErrorCode, WorkbenchError
from workbench.progress import (
    RUN_END,
    RUN_START,
    STEP_END,
    STEP_START,
    UPDATE,
    ProgressEvent,
)
from workbench.registry import REGISTRY, ModelSpec, NnUNetModelConfig, Registry
from workbench.runner import CANCEL_FILE, Run
from workbench.ui.launcher import BackgroundJob, Launcher, check_input, launcher_fields
from workbench.ui.monitor import RunMonitor, format_seconds

# ---------------------------------------------------------------- fields follow the registry


def _registry_with_extra_model() -> Registry:
    registry = Registry()
    for spec in REGISTRY.pipelines.values():
        registry.add_pipeline(replace(spec))
    for model in REGISTRY.models.values():
        registry.add_model(model)
    registry.add_model(ModelSpec(name="nnunet_lowres", pipeline="knee", option="segmentation_model",
                                 description="a model registered by a test", config=NnUNetModelConfig(),
                                 setup="workbench.knee.segmentation:setup_nnunet"))
    return registry


def test_fields_follow_the_registry():
    fields = {f.name: f for f in launcher_fields("knee", devices=("auto", "cpu"))}
    assert fields["input"].kind == "path"
    assert fields["segmentation_model"].choices == REGISTRY.choices("knee", "segmentation_model")
    assert fields["nsm_type"].choices == ("none", "bone_only", "bone_and_cart", "both")
    assert fields["t2"].choices == ("auto", "on", "off") and fields["t2"].default == "auto"
    assert fields["device"].choices == ("auto", "cpu")
    assert "cartilage" not in fields["segmentation_model"].description or fields["segmentation_model"].description
    recon = {f.name: f for f in launcher_fields("recon", devices=("auto", "cpu"))}
    assert recon["images"].kind == "path"
    assert recon["model"].choices == REGISTRY.choices("recon", "model")
    assert recon["preset"].choices == ("cpu", "default", "paper")
    # a model registered elsewhere shows up in the form and in the widget, with nothing changed here
    registry = _registry_with_extra_model()
    extra = {f.name: f for f in launcher_fields("knee", registry, devices=("auto",))}
    assert "nnunet_lowres" in extra["segmentation_model"].choices
    ui = Launcher("knee", registry=registry)
    assert "nnunet_lowres" in ui._inputs["segmentation_model"].options
    ui.pipeline_picker.value = "recon"  # switching pipelines rebuilds the form
    assert set(ui._inputs) == {"images", "model", "preset", "device"}


# ---------------------------------------------------------------- input checks as you type


def test_input_checks(tmp_path):
    assert not check_input("knee", "").ok and "Enter the path" in check_input("knee", " ").message
    missing = check_input("knee", str(tmp_path / "nope"))
    assert not missing.ok and "No file or folder" in missing.message
    volume = tmp_path / "knee.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), np.eye(4)), volume)
    assert check_input("knee", str(volume)).ok and "NIfTI" in check_input("knee", str(volume)).message
    write_series(tmp_path / "dicom", random_stored((8, 8, 3)), np.eye(4))
    dicom = check_input("knee", str(tmp_path / "dicom"))
    assert dicom.ok and "DICOM folder (3 files)" in dicom.message
    (tmp_path / "notes.txt").write_text("x")
    assert not check_input("knee", str(tmp_path / "notes.txt")).ok
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "No DICOM files" in check_input("knee", str(empty)).message
    # reconstruction layouts
    nerf = tmp_path / "nerf"
    nerf.mkdir()
    (nerf / "transforms_train.json").write_text(json.dumps({"frames": [{}, {}, {}]}))
    assert check_input("recon", str(nerf)) == check_input("recon", str(nerf))
    assert check_input("recon", str(nerf)).message == "NeRF-synthetic views (3 training frames)"
    cams = tmp_path / "cams"
    cams.mkdir()
    (cams / "cameras.json").write_text("{}")
    assert not check_input("recon", str(cams)).ok  # no images/
    colmap = tmp_path / "colmap" / "sparse" / "0"
    colmap.mkdir(parents=True)
    (colmap / "cameras.txt").write_text("")
    (colmap / "images.txt").write_text("")
    assert check_input("recon", str(tmp_path / "colmap")).ok
    assert not check_input("recon", str(empty)).ok and "docs/recon-inputs.md" in check_input("recon", str(empty)).message
    assert not check_input("recon", str(volume)).ok


def test_options_take_defaults_and_widgets(tmp_path, monkeypatch):
    volume = tmp_path / "knee.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), np.eye(4)), volume)
    monkeypatch.chdir(tmp_path)
    ui = Launcher("knee", defaults={"input": "knee.nii.gz", "ground_truth": "gt.nii.gz", "nsm_type": "both",
                                    "images": "not a knee option", "series": None})
    assert not ui.run_button.disabled and "NIfTI" in ui.input_message.value
    ui._inputs["segmentation_model"].value = "nnunet_cascade"
    options = ui.options()
    assert options["input"] == str(volume.resolve())  # relative paths resolve where the notebook runs
    assert options["ground_truth"] == "gt.nii.gz" and options["nsm_type"] == "both"
    assert options["segmentation_model"] == "nnunet_cascade" and "images" not in options and "series" not in options
    ui._inputs["input"].value = str(tmp_path / "missing.nii.gz")  # as you type: Run is disabled with a reason
    assert ui.run_button.disabled and "No file or folder" in ui.input_message.value


def test_invalid_options_show_code_message_and_hint_and_start_nothing(tmp_path):
    scene = tmp_path / "scene"
    scene.mkdir()
    (scene / "transforms_train.json").write_text(json.dumps({"frames": []}))
    runs = tmp_path / "runs"
    ui = Launcher("recon", defaults={"images": str(scene), "overrides": {"nvdiffrec.no_such_key": 1}}, runs_dir=runs)
    assert ui.run() is None
    assert "CONFIG_ERROR" in ui.message.value and "hint:" in ui.message.value and "no_such_key" in ui.message.value
    assert not runs.exists() and ui.job is None
    ui._inputs["images"].value = ""
    assert ui.run() is None and "Enter the path" in ui.message.value


# ---------------------------------------------------------------- the monitor


def _event(kind, t, **kw):
    return ProgressEvent(kind, time=t, **kw)


def test_monitor_bars_model_label_and_times():
    now = [100.0]
    monitor = RunMonitor(clock=lambda: now[0])
    monitor.feed(_event(RUN_START, 100.0, n_steps=4, n_models=2))
    assert monitor.overall_fraction == 0.0 and monitor.remaining_s() is None
    common = dict(n_steps=4, n_models=2)
    monitor.feed(_event(STEP_START, 100.0, step="load_input", step_index=1, **common))
    monitor.feed(_event(STEP_END, 102.0, step="load_input", step_index=1, status="ok", **common))
    monitor.feed(_event(STEP_START, 102.0, step="reconviagen", step_index=2, model="reconviagen", model_index=1,
                        **common))
    monitor.feed(_event(UPDATE, 110.0, step="reconviagen", step_index=2, model="reconviagen", model_index=1,
                        fraction=0.5, message="sampling", **common))
    now[0] = 110.0
    assert monitor.model_label == "reconviagen (1 of 2)"
    assert monitor.overall_fraction == pytest.approx(1.5 / 4)
    assert monitor.elapsed_s() == pytest.approx(10.0)
    assert monitor.remaining_s() == pytest.approx(10.0 * (1 - 0.375) / 0.375)
    assert "reconviagen · reconviagen (1 of 2)" in monitor.headline() and "left" in monitor.headline()
    step = monitor.steps[1]
    assert (step.status, step.fraction, step.message) == ("running", 0.5, "sampling")
    monitor.feed(_event(STEP_END, 120.0, step="reconviagen", step_index=2, status="cancelled", model="reconviagen",
                        model_index=1, **common))
    monitor.feed(_event(RUN_END, 120.0, status="cancelled", message="Step 'reconviagen' was cancelled"))
    assert monitor.finished and monitor.status == "cancelled" and monitor.remaining_s() is None
    assert monitor.elapsed_s() == pytest.approx(20.0)
    assert monitor.headline().startswith("run cancelled after 20 s")
    monitor.log("line 1\n")
    monitor.log("line 1")  # repeated lines are kept once
    assert list(monitor.log_lines) == ["line 1"]
    assert [format_seconds(s) for s in (5, 65, 3725)] == ["5 s", "1 min 05 s", "1 h 02 min"]


# ---------------------------------------------------------------- cancel


def test_cancel_file_stops_a_running_step(tmp_path):
    run_dir = tmp_path / "run"
    errors = []

    def body():
        try:
            with Run(run_dir, pipeline="knee") as run:
                run.step("slow", "step_fixtures:sleep_step", seconds=60)
        except WorkbenchError as exc:
            errors.append(exc)

    worker = threading.Thread(target=body)
    t0 = time.monotonic()
    worker.start()
    time.sleep(2.0)
    (run_dir / CANCEL_FILE).touch()  # what the launcher's Cancel and a SIGTERM to workbench._job write
    worker.join(30)
    assert not worker.is_alive() and time.monotonic() - t0 < 15
    assert errors and errors[0].code is ErrorCode.CANCELLED
    result = json.loads((run_dir / "result.json").read_text())
    assert result["status"] == "cancelled" and not (run_dir / CANCEL_FILE).exists()
    assert not (run_dir / ".work").exists()


class _StubbornJob(BackgroundJob):
    """A job whose process ignores the cancel file, so Cancel has to kill it."""

    def start(self):
        import subprocess

        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [sys.executable, "-c", "import subprocess, sys, time; "
             "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); time.sleep(120)"],
            stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
        threading.Thread(target=self._read_log, daemon=True).start()
        threading.Thread(target=self._wait, daemon=True).start()
        return self


def test_cancel_kills_a_job_that_does_not_stop(tmp_path):
    import psutil

    job = _StubbornJob("recon", {"images": "x"}, tmp_path / "run").start()
    time.sleep(1.0)
    children = psutil.Process(job.process.pid).children(recursive=True)
    assert children
    job.cancel(grace_s=0.5)
    result = job.wait(30)
    assert result is not None and result["status"] == "cancelled" and result["error"]["code"] == "CANCELLED"
    assert json.loads((tmp_path / "run" / "result.json").read_text())["status"] == "cancelled"
    time.sleep(0.5)
    assert not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children)


@pytest.mark.slow
def test_launcher_run_and_cancel_end_to_end(tmp_path):
    # a real run through workbench._job (papermill, runner, report), cancelled while nvdiffrec optimises
    from workbench.data.synthetic_scenes import sample_recon

    scene = sample_recon("blob", None, views=16, res=48, out=tmp_path / "scene", test_views=4)
    slow = {"nvdiffrec.iter": 100000, "nvdiffrec.dmtet_grid": 16, "nvdiffrec.train_res": [48, 48]}
    ui = Launcher("recon", defaults={"images": str(scene), "overrides": slow, "device": "cpu"},
                  runs_dir=tmp_path / "runs")
    job = ui.run()
    assert job is not None and ui.run_button.disabled and not ui.cancel_button.disabled
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        steps = {s.name: s for s in job.monitor.steps}
        if "nvdiffrec" in steps and steps["nvdiffrec"].fraction > 0:
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"nvdiffrec did not start: {list(job.monitor.log_lines)}")
    ui.refresh()
    assert "nvdiffrec" in ui.headline.value and len(ui.steps_box.children) == 2
    ui.cancel()
    result = job.wait(120)
    assert result is not None and result["status"] == "cancelled"
    assert result["error"]["code"] == "CANCELLED" and result["error"]["step"] == "nvdiffrec"
    run_dir = ui.run_dir
    assert not (run_dir / "nvdiffrec").exists() and not (run_dir / ".work").exists()  # no half-written outputs
    assert (run_dir / "input.json").is_file()  # the finished step's outputs stay
    assert (run_dir / "report.html").is_file() and "CANCELLED" in (run_dir / "report.html").read_text()
    assert "CANCELLED" in ui.message.value and "hint:" in ui.message.value and "Traceback" not in ui.message.value
    assert ui.results_box.children and "wb-done" in ui.widget._dom_classes
    assert not ui.run_button.disabled and ui.cancel_button.disabled
    assert job.process.returncode == 3


@pytest.mark.mese
def test_use_the_sample_fills_in_the_form(tmp_path):
    # "use the sample" writes the bundled knee case once and passes its ground truth through
    ui = Launcher("knee")
    ui.use_sample()
    options = ui.options()
    assert Path(options["input"]).is_dir() and "DICOM folder" in ui.input_message.value
    assert Path(options["ground_truth"]).is_file() and not ui.run_button.disabled
