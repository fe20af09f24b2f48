"""The launcher: run a pipeline from a notebook with widgets, in the background, as ``workbench run`` does.

``workbench.ui.launcher()`` in any notebook shows:

* the pipeline and, for it, one drop-down per option whose values come from
  the model registry (segmentation model, NSM type; reconstruction model),
  the other choice options of the pipeline's options class (T2 mode, preset),
  and the device;
* the input path, checked as you type, and a button that writes the bundled sample;
* Run and Cancel.

Run validates the options exactly as the CLI does, makes a run folder and
starts :mod:`workbench._job` in a child process (its own session): the
same path as ``workbench run``, papermill, the runner and ``report.html``
included, while the kernel stays free.  The launcher follows the run's
``progress.jsonl`` (:class:`~workbench.progress.JsonlFollower` into a
:class:`~workbench.ui.monitor.RunMonitor`): an overall bar, one bar per step,
the current model ("reconviagen (1 of 2)"), elapsed and remaining time and
the last log lines.  Cancel writes ``cancel.request`` into the run folder: the
runner kills the running step's process group, the run ends ``CANCELLED``,
and only verified outputs of finished steps stay.  If the job has not ended
within :data:`CANCEL_GRACE_S`, its whole process tree is killed.  When the run
ends, the results panel (:func:`workbench.ui.results.results_panel`) shows
under it.

The form's logic (:func:`launcher_fields`, :func:`check_input`,
:meth:`Launcher.options`) and :class:`BackgroundJob` work without a browser.
"""

from __future__ import annotations

import html
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, get_args, get_origin

from workbench.errors import ErrorCode, WorkbenchError, classify
from workbench.registry import REGISTRY, Registry
from workbench.ui.monitor import RunMonitor, format_seconds

#: Seconds the launcher waits for a cancelled job to end by itself before it kills the job's processes.
CANCEL_GRACE_S = 20.0
#: Seconds between two refreshes of the progress widgets.
REFRESH_S = 0.5


# --------------------------------------------------------------------------- the form's logic


@dataclass(frozen=True)
class FieldSpec:
    """One field of the launcher's form.

    Attributes:
        name: the option it sets (``segmentation_model``).
        label: what the widget shows.
        kind: ``path`` (the input) or ``choice``.
        choices: allowed values of a choice.
        default: the initial value.
        description: the option's documentation (the widget's tooltip).
    """

    name: str
    label: str
    kind: str
    choices: tuple[Any, ...] = ()
    default: Any = None
    description: str = ""


def device_choices() -> tuple[str, ...]:
    """``auto`` and ``cpu``, plus ``cuda`` and ``cuda:N`` for each GPU that ``nvidia-smi`` lists."""
    choices = ["auto", "cpu"]
    if shutil.which("nvidia-smi"):
        try:
            listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10).stdout
            gpus = [line for line in listed.splitlines() if line.startswith("GPU ")]
        except (OSError, subprocess.TimeoutExpired):
            gpus = []
        if gpus:
            choices += ["cuda"] + [f"cuda:{i}" for i in range(len(gpus))]
    return tuple(choices)


def launcher_fields(pipeline: str, registry: Registry = REGISTRY,
                    devices: tuple[str, ...] | None = None) -> list[FieldSpec]:
    """The form of ``pipeline``: the input, the registry's options, the other choice options, the device.

    Options that select models take their values from ``registry``
    (:meth:`~workbench.registry.Registry.choices`), so a newly registered model
    shows up here with no change to the launcher.
    """
    spec = registry.pipeline(pipeline)
    model_fields = spec.options_class().model_fields

    def describe(name: str) -> str:
        field = model_fields.get(name)
        return (field.description or "") if field is not None else ""

    def default(name: str, choices: tuple[Any, ...]) -> Any:
        field = model_fields.get(name)
        value = getattr(field, "default", None) if field is not None else None
        return value if value in choices else (choices[0] if choices else None)

    fields = [FieldSpec(spec.input_option, spec.input_option, "path", description=describe(spec.input_option))]
    registry_options = list(dict.fromkeys(m.option for m in registry.models_for(pipeline)))
    for option in registry_options:
        choices = registry.choices(pipeline, option)
        fields.append(FieldSpec(option, option.replace("_", " "), "choice", choices, default(option, choices),
                                describe(option)))
    for name, field in model_fields.items():
        if name in registry_options or name == spec.input_option or get_origin(field.annotation) is not Literal:
            continue
        choices = get_args(field.annotation)
        fields.append(FieldSpec(name, name.replace("_", " "), "choice", choices, default(name, choices),
                                describe(name)))
    devices = devices or device_choices()
    fields.append(FieldSpec("device", "device", "choice", devices, "auto", describe("device")))
    return fields


@dataclass(frozen=True)
class InputCheck:
    """The result of checking an input path as the user types it."""

    ok: bool
    message: str


def check_input(pipeline: str, text: str) -> InputCheck:
    """Whether ``text`` names a plausible input of ``pipeline``, with a one-line message either way.

    Cheap enough to run on every key stroke: it looks at names and at most a
    few files' first bytes, and never reads a whole volume or image set.
    """
    text = (text or "").strip()
    if not text:
        return InputCheck(False, "Enter the path of the input, or use the sample.")
    path = Path(text).expanduser()
    if not path.exists():
        return InputCheck(False, f"No file or folder at {path}")
    checker = _INPUT_CHECKS.get(pipeline)
    return checker(path) if checker else InputCheck(True, f"{path}")


def _check_knee_input(path: Path) -> InputCheck:
    from workbench.io.dicom import is_dicom_file

    if path.is_file():
        if path.name.endswith((".nii", ".nii.gz")):
            return InputCheck(True, f"NIfTI volume ({path.stat().st_size / 1e6:.1f} MB)")
        if is_dicom_file(path):
            return InputCheck(True, "a DICOM file (its series is read from the folder it is in)")
        return InputCheck(False, f"{path.name} is neither a NIfTI volume (.nii, .nii.gz) nor a DICOM file")
    files = []
    for entry in path.rglob("*"):
        if entry.is_file():
            files.append(entry)
            if len(files) >= 5000:
                break
    dicoms = sum(1 for f in files[:40] if is_dicom_file(f))
    if dicoms:
        more = "+" if len(files) >= 5000 else ""
        return InputCheck(True, f"DICOM folder ({len(files)}{more} files)")
    if any(f.name.endswith((".nii", ".nii.gz")) for f in files[:200]):
        return InputCheck(False, "This folder holds NIfTI files: pick one volume, not the folder")
    return InputCheck(False, f"No DICOM files in {path}")


def _check_recon_input(path: Path) -> InputCheck:
    if not path.is_dir():
        return InputCheck(False, "Give the folder of the views, not a file (docs/recon-inputs.md)")
    if (path / "transforms_train.json").is_file():
        try:
            frames = len(json.loads((path / "transforms_train.json").read_text()).get("frames", []))
        except (ValueError, OSError):
            return InputCheck(False, "transforms_train.json is not valid JSON")
        return InputCheck(True, f"NeRF-synthetic views ({frames} training frames)")
    if (path / "cameras.json").is_file():
        images = path / "images"
        n = sum(1 for _ in images.iterdir()) if images.is_dir() else 0
        return InputCheck(bool(n), f"images/ with cameras.json ({n} images)" if n else "cameras.json but no images/")
    from workbench.io.multiview import colmap_model_folder

    folder = colmap_model_folder(path)
    if folder is not None:
        return InputCheck(True, f"COLMAP text model in {folder.relative_to(path) if folder != path else '.'}")
    return InputCheck(False, "No transforms_train.json, cameras.json or COLMAP sparse/0/ here (docs/recon-inputs.md)")


_INPUT_CHECKS: dict[str, Callable[[Path], InputCheck]] = {"knee": _check_knee_input, "recon": _check_recon_input}


# --------------------------------------------------------------------------- the run in the background


class BackgroundJob:
    """One run of :mod:`workbench._job` in a child process, followed through its ``progress.jsonl``.

    Args:
        pipeline: the pipeline's name.
        options: its options (validated again in the child).
        run_dir: the run folder (created; ``job.log`` there receives the job's stderr).
        monitor: receives the run's progress events and log lines.
        on_done: called with the ``result.json`` document once the job has ended.
    """

    def __init__(self, pipeline: str, options: dict[str, Any], run_dir: str | Path,
                 monitor: RunMonitor | None = None, on_done: Callable[[dict[str, Any]], None] | None = None):
        self.pipeline = pipeline
        self.options = dict(options)
        self.run_dir = Path(run_dir).resolve()
        self.monitor = monitor or RunMonitor()
        self.on_done = on_done
        self.process: subprocess.Popen | None = None
        self.result: dict[str, Any] | None = None
        self.cancelled = False
        self._done = threading.Event()
        self._follower = None

    def start(self) -> "BackgroundJob":
        """Start the child process and the threads that follow it."""
        from workbench.progress import JsonlFollower

        self.run_dir.mkdir(parents=True, exist_ok=True)
        spec = {"pipeline": self.pipeline, "options": self.options, "run_dir": str(self.run_dir), "report": True}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "workbench._job"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True, start_new_session=True,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )
        self.process.stdin.write(json.dumps(spec))
        self.process.stdin.close()
        self._follower = JsonlFollower(self.run_dir / "progress.jsonl", self.monitor.feed, interval=0.25)
        self._follower.__enter__()
        threading.Thread(target=self._read_log, name="job-log", daemon=True).start()
        threading.Thread(target=self._wait, name="job-wait", daemon=True).start()
        return self

    @property
    def running(self) -> bool:
        return self.process is not None and not self._done.is_set()

    def wait(self, timeout: float | None = None) -> dict[str, Any] | None:
        """Wait for the job to end; return its ``result.json`` document (None on timeout)."""
        self._done.wait(timeout)
        return self.result

    def cancel(self, grace_s: float = CANCEL_GRACE_S) -> None:
        """Ask the run to stop; kill the job's process tree if it has not ended within ``grace_s``."""
        from workbench._job import request_cancel

        if not self.running:
            return
        self.cancelled = True
        request_cancel(self.run_dir)
        self.monitor.log("cancel requested: stopping the running step")

        def enforce() -> None:
            if not self._done.wait(grace_s):
                self.monitor.log(f"the job did not stop within {grace_s:.0f} s: killing its processes")
                kill_process_tree(self.process.pid)

        threading.Thread(target=enforce, name="job-cancel", daemon=True).start()

    def _read_log(self) -> None:
        with open(self.run_dir / "job.log", "a", encoding="utf-8") as log:
            for line in self.process.stderr:
                log.write(line)
                log.flush()
                self.monitor.log(line)

    def _wait(self) -> None:
        self.process.wait()
        if self._follower is not None:
            self._follower.__exit__(None, None, None)
        self.result = self._final_result()
        if self.on_done is not None:
            try:
                self.on_done(self.result)
            except Exception as exc:  # noqa: BLE001 - a display problem must not lose the result
                self.monitor.log(f"could not show the results: {exc}")
        self._done.set()

    def _final_result(self) -> dict[str, Any]:
        """``result.json``; written here (as the runner would) when the job died before finishing it."""
        from workbench.runner import record_failure

        path = self.run_dir / "result.json"
        result = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
        if result is not None and result.get("status") not in ("running", None):
            return result
        if self.cancelled:
            error = WorkbenchError("The run was cancelled and its processes were stopped", code="CANCELLED",
                                   hint="Start it again when you are ready.")
        else:
            error = classify(RuntimeError(f"the job process ended with exit code {self.process.returncode} "
                                          "before the run was recorded"))
        return record_failure(self.run_dir, pipeline=self.pipeline, parameters=self.options, error=error)


def kill_process_tree(pid: int, grace_s: float = 2.0) -> None:
    """SIGTERM ``pid`` and every descendant (any session or process group), SIGKILL what is left."""
    import psutil

    try:
        root = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    processes = root.children(recursive=True) + [root]
    for process in processes:
        try:
            process.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(processes, timeout=grace_s)
    for process in alive:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass


# --------------------------------------------------------------------------- the widget


class Launcher:
    """The launcher widget; ``display(launcher)`` or leave it as a cell's last value.

    Args:
        pipeline: the pipeline shown first (default: the registry's first).
        defaults: options to start from (a notebook's parameters); the widgets show
            the ones they have, and the others (e.g. ``ground_truth``) are passed through.
        registry: the model registry (tests pass their own).
        runs_dir: parent of the run folders (default: ``outputs/`` or ``$WORKBENCH_OUTPUTS``).

    Attributes:
        widget: the root ipywidgets box (CSS class ``wb-launcher``).
        job: the current or last :class:`BackgroundJob`.
        run_dir: the current or last run folder.
    """

    def __init__(self, pipeline: str | None = None, defaults: dict[str, Any] | None = None, *,
                 registry: Registry = REGISTRY, runs_dir: str | Path | None = None):
        import ipywidgets as w

        self.registry = registry
        self.defaults = {k: v for k, v in (defaults or {}).items() if v is not None}
        self.runs_dir = Path(runs_dir) if runs_dir else None
        self.job: BackgroundJob | None = None
        self.run_dir: Path | None = None
        self._devices = device_choices()
        self._inputs: dict[str, Any] = {}
        self._refresh_lock = threading.Lock()
        self._step_bars: dict[str, Any] = {}

        names = list(registry.pipelines)
        first = pipeline or names[0]
        registry.pipeline(first)  # CONFIG_ERROR for an unknown pipeline
        self.pipeline_picker = w.ToggleButtons(
            options=[(name, name) for name in names], value=first, description="pipeline",
            tooltips=[registry.pipelines[n].description for n in names])
        self.pipeline_picker.observe(lambda change: self._build_form(), names="value")
        self.pipeline_description = w.HTML()
        self.form = w.VBox()
        self.input_message = w.HTML().add_class("wb-input-message")
        self.sample_button = w.Button(description="use the sample", icon="flask",
                                      tooltip="write the bundled sample and fill in its path")
        self.sample_button.add_class("wb-sample")
        self.sample_button.on_click(lambda _: self.use_sample())
        self.run_button = w.Button(description="Run", button_style="success", icon="play")
        self.run_button.add_class("wb-run")
        self.run_button.on_click(lambda _: self.run())
        self.cancel_button = w.Button(description="Cancel", button_style="danger", icon="stop", disabled=True)
        self.cancel_button.add_class("wb-cancel")
        self.cancel_button.on_click(lambda _: self.cancel())
        self.message = w.HTML().add_class("wb-message")
        self.headline = w.HTML().add_class("wb-headline")
        self.overall_bar = w.FloatProgress(value=0.0, min=0.0, max=1.0, description="overall",
                                           layout=w.Layout(width="60%"))
        self.overall_bar.add_class("wb-overall")
        self.steps_box = w.VBox().add_class("wb-steps")
        self.log_view = w.HTML().add_class("wb-log")
        self.progress_box = w.VBox([self.headline, self.overall_bar, self.steps_box, self.log_view],
                                   layout=w.Layout(display="none"))
        self.results_box = w.VBox().add_class("wb-results-box")
        self.widget = w.VBox([
            w.HTML("<b>workbench launcher</b>"), self.pipeline_picker, self.pipeline_description, self.form,
            w.HBox([self.run_button, self.cancel_button]), self.message, self.progress_box, self.results_box,
        ]).add_class("wb-launcher")
        self._build_form()

    # -- form -------------------------------------------------------------------------
    @property
    def pipeline(self) -> str:
        return self.pipeline_picker.value

    def _build_form(self) -> None:
        import ipywidgets as w

        pipeline = self.pipeline
        spec = self.registry.pipeline(pipeline)
        self.pipeline_description.value = f"<i>{html.escape(spec.description)}</i>"
        self._inputs = {}
        rows = []
        for field in launcher_fields(pipeline, self.registry, self._devices):
            if field.kind == "path":
                text = w.Text(value=str(self.defaults.get(field.name) or ""), description=field.label,
                              placeholder="path of the input", continuous_update=True,
                              layout=w.Layout(width="70%"), tooltip=field.description)
                text.add_class("wb-input")
                text.observe(lambda change: self._check_input(), names="value")
                self._inputs[field.name] = text
                rows.append(w.HBox([text, self.sample_button]))
                rows.append(self.input_message)
            else:
                value = self.defaults.get(field.name, field.default)
                picker = w.Dropdown(options=list(field.choices), value=value if value in field.choices
                                    else field.default, description=field.label, tooltip=field.description,
                                    style={"description_width": "initial"})
                picker.add_class(f"wb-option-{field.name}")
                self._inputs[field.name] = picker
                rows.append(picker)
        self.sample_button.disabled = not spec.sample
        self.form.children = rows
        self._check_input()

    def _check_input(self) -> InputCheck:
        spec = self.registry.pipeline(self.pipeline)
        check = check_input(self.pipeline, self._inputs[spec.input_option].value)
        colour = "#2e7d32" if check.ok else "#c62828"
        self.input_message.value = f'<span style="color:{colour}">{"✓" if check.ok else "✗"} ' \
                                   f"{html.escape(check.message)}</span>"
        if not (self.job and self.job.running):
            self.run_button.disabled = not check.ok
        return check

    def options(self) -> dict[str, Any]:
        """The options the Run button would start: the defaults this pipeline knows, overridden by the widgets."""
        spec = self.registry.pipeline(self.pipeline)
        known = spec.options_class().model_fields
        options = {k: v for k, v in self.defaults.items() if k in known}
        for name, widget in self._inputs.items():
            value = widget.value
            if name == spec.input_option:
                value = str(Path(str(value).strip()).expanduser().resolve()) if str(value).strip() else ""
            options[name] = value
        return options

    def use_sample(self) -> None:
        """Write the pipeline's bundled sample (once) and fill in its options."""
        from workbench.config import outputs_dir

        spec = self.registry.pipeline(self.pipeline)
        self.message.value = "writing the sample…"
        try:
            options = spec.write_sample(outputs_dir() / f"sample-{spec.name}")
        except Exception as exc:  # noqa: BLE001
            self._show_error(exc if isinstance(exc, WorkbenchError) else classify(exc))
            return
        self.defaults.update(options)
        for name, value in options.items():
            if name in self._inputs:
                self._inputs[name].value = value
        self.message.value = ""
        self._check_input()

    # -- running ----------------------------------------------------------------------
    def run(self) -> BackgroundJob | None:
        """Validate the options as the CLI does and start the run in the background; None if they are invalid."""
        from workbench.config import validate_job
        from workbench.runner import new_run_dir

        if self.job is not None and self.job.running:
            return self.job
        check = self._check_input()
        if not check.ok:
            self.message.value = f'<span style="color:#c62828">{html.escape(check.message)}</span>'
            return None
        options = self.options()
        try:
            validate_job(self.pipeline, options)
            self.run_dir = new_run_dir(self.pipeline, parent=self.runs_dir)
        except Exception as exc:  # noqa: BLE001 - shown as code, message and hint
            self._show_error(exc if isinstance(exc, WorkbenchError) else classify(exc))
            return None
        self.message.value = f"run folder: <code>{html.escape(str(self.run_dir))}</code>"
        self.results_box.children = ()
        self._step_bars = {}
        self.steps_box.children = ()
        self.progress_box.layout.display = None
        self.widget.remove_class("wb-done")
        self.run_button.disabled = True
        self.cancel_button.disabled = False
        self.job = BackgroundJob(self.pipeline, options, self.run_dir, RunMonitor(), on_done=self._finished)
        self.job.start()
        threading.Thread(target=self._tick, args=(self.job,), name="launcher-refresh", daemon=True).start()
        return self.job

    def cancel(self) -> None:
        """Cancel the running job (see :meth:`BackgroundJob.cancel`)."""
        if self.job is not None and self.job.running:
            self.cancel_button.disabled = True
            self.job.cancel()
            self.refresh()

    def _tick(self, job: BackgroundJob) -> None:
        while job.running:
            self.refresh()
            time.sleep(REFRESH_S)

    def refresh(self) -> None:
        """Show the job's state: headline, overall bar, one bar per step, the last log lines."""
        import ipywidgets as w

        job = self.job
        if job is None:
            return
        with self._refresh_lock:
            monitor = job.monitor
            self.headline.value = f"<b>{html.escape(monitor.headline())}</b>"
            self.overall_bar.value = monitor.overall_fraction
            self.overall_bar.description = f"{monitor.overall_fraction:.0%}"
            for step in list(monitor.steps):
                if step.name not in self._step_bars:
                    bar = w.FloatProgress(min=0.0, max=1.0, layout=w.Layout(width="40%"))
                    label = w.HTML(layout=w.Layout(width="45%"))
                    row = w.HBox([bar, label]).add_class("wb-step")
                    self._step_bars[step.name] = (bar, label)
                    self.steps_box.children = (*self.steps_box.children, row)
                bar, label = self._step_bars[step.name]
                bar.value = step.fraction
                bar.bar_style = {"ok": "success", "failed": "danger", "timeout": "danger", "cancelled": "warning",
                                 "skipped": "info"}.get(step.status, "")
                model = f" · {step.model_label}" if step.model and step.model != step.name else ""
                took = ""
                if step.started is not None:
                    took = f", {format_seconds((step.ended or time.time()) - step.started)}"
                label.value = (f"[{step.index}/{max(monitor.n_steps, step.index)}] <b>{html.escape(step.name)}</b>"
                               f"{html.escape(model)}: {html.escape(step.status)}{took} "
                               f"<span style='color:#666'>{html.escape(step.message[:80])}</span>")
            lines = "\n".join(monitor.log_lines)
            self.log_view.value = f"<pre style='font-size:85%;margin:0'>{html.escape(lines)}</pre>"

    def _finished(self, result: dict[str, Any]) -> None:
        self.refresh()
        self.run_button.disabled = not self._check_input().ok
        self.cancel_button.disabled = True
        error = result.get("error")
        if error:
            self._show_error(WorkbenchError.from_dict(error))
        else:
            self.message.value = f"run folder: <code>{html.escape(str(self.run_dir))}</code>"
        try:
            from workbench.ui.results import results_panel

            self.results_box.children = (results_panel(self.run_dir),)
        except Exception as exc:  # noqa: BLE001 - the run's outcome is already shown above
            import ipywidgets as w

            self.results_box.children = (w.HTML(f"results could not be shown: {html.escape(str(exc))}"),)
        self.widget.add_class("wb-done")

    def _show_error(self, error: WorkbenchError) -> None:
        code = error.code.value if isinstance(error.code, ErrorCode) else str(error.code)
        self.message.value = (f'<div class="wb-error" style="color:#c62828"><b>{html.escape(code)}</b>: '
                              f"{html.escape(error.message)}<br><i>hint:</i> {html.escape(error.hint or '')}</div>")

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)


def launcher(pipeline: str | None = None, defaults: dict[str, Any] | None = None, **kwargs: Any) -> Launcher:
    """The launcher widget for ``pipeline`` (default: the first registered), starting from ``defaults``.

    Leave it as the last value of a cell (or ``display()`` it) to show it::

        from workbench.ui import launcher
        launcher("knee", defaults={"input": "data/sample/knee_sample_dicom"})
    """
    return Launcher(pipeline, defaults, **kwargs)
