"""Run steps in isolated child processes with hard timeouts; write ``result.json``.

The one path every pipeline takes::

    with Run(run_dir, pipeline="knee", config=job_config) as run:
        loaded = run.step("load_input", "workbench.knee.steps:load_input", input_path=...)
        seg = run.step("segmentation", "workbench.knee.steps:segment", model="nnunet_fullres",
                       image=loaded.outputs["image"])

Each :meth:`Run.step` starts a fresh Python child (``python -m
workbench._child``, a new session, so it leads its own process group), which
imports the step function by its ``"module:function"`` name and calls it with a :class:`StepContext` and the
keyword arguments.  The parent follows the child's progress events over a
pipe, and when the step's timeout (or what is left of the run's) passes it
kills the whole process group (SIGTERM, then SIGKILL two seconds later): the
step ends ``TIMEOUT`` within a few seconds of its limit and leaves no orphan.

The step writes files into ``ctx.work_dir`` and returns a :class:`StepResult`
declaring them; the runner verifies them by content and only then moves them
into the run folder (:mod:`workbench.outputs`).  ``result.json`` is rewritten
after every step, so another process always sees how far the run got.
"""

from __future__ import annotations

import importlib
import json
import os
import platform
import shutil
import signal
import subprocess
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from workbench import __version__
from workbench.errors import (
    Cancelled,
    ErrorCode,
    PipelineError,
    StepTimeout,
    WorkbenchError,
    classify,
)
from workbench.outputs import Output, commit_outputs
from workbench.progress import (
    RUN_END,
    RUN_START,
    STEP_END,
    STEP_START,
    UPDATE,
    Progress,
    ProgressEvent,
)

#: Seconds between SIGTERM and SIGKILL when a step's process group is stopped.
KILL_GRACE_S = 2.0
#: A file in the run folder that asks the run to stop (another process, e.g. the launcher, writes it).
CANCEL_FILE = "cancel.request"
RESULT_SCHEMA_VERSION = 1


@dataclass
class StepResult:
    """What a step function returns.

    Attributes:
        outputs: files written under ``ctx.work_dir``, by a short name (e.g. ``"image"``).
        metrics: numbers for ``result.json`` and the report (JSON-serialisable).
        values: small JSON-serialisable values passed on to later steps.
    """

    outputs: dict[str, Output] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    values: dict[str, Any] = field(default_factory=dict)


@dataclass
class StepContext:
    """What a step function receives besides its own keyword arguments.

    Attributes:
        step: the step's name.
        work_dir: private folder for the step's outputs (moved into the run folder once verified).
        device: ``cpu`` or ``cuda[:N]``, already resolved.
        progress: ``progress(fraction, message="")`` reports how far the step is.
        model: the model the step runs, if any.
    """

    step: str
    work_dir: Path
    device: str = "cpu"
    progress: Callable[..., None] = lambda fraction, message="": None
    model: str | None = None

    @classmethod
    def for_testing(cls, work_dir: str | Path, step: str = "test", device: str = "cpu") -> "StepContext":
        """A context for calling a step function directly, without the runner."""
        Path(work_dir).mkdir(parents=True, exist_ok=True)
        return cls(step=step, work_dir=Path(work_dir), device=device)


@dataclass
class StepRecord:
    """A finished step as recorded in ``result.json`` (plus the final output paths)."""

    name: str
    status: str
    seconds: float
    model: str | None = None
    peak_rss_mb: float | None = None
    peak_gpu_mb: float | None = None
    gpu_after_mb: float | None = None
    error: dict[str, Any] | None = None
    outputs: dict[str, Path] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    values: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "status": self.status,
            "model": self.model,
            "seconds": round(self.seconds, 3),
            "peak_rss_mb": _round(self.peak_rss_mb),
            "peak_gpu_mb": _round(self.peak_gpu_mb),
            "gpu_after_mb": _round(self.gpu_after_mb),
            "error": self.error,
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(float(value), 1)


# --------------------------------------------------------------------------- child side


def _resolve(func_ref: str | Callable) -> Callable:
    if callable(func_ref):
        return func_ref
    module_name, _, attr = func_ref.partition(":")
    if not attr:
        raise PipelineError(f"Step function {func_ref!r} must be given as 'module:function'")
    return getattr(importlib.import_module(module_name), attr)


def child_main(write_fd: int) -> None:
    """Body of a step's child process (``python -m workbench._child FD``).

    Reads the pickled step spec from stdin, runs the step, and sends progress
    messages and one final ``ok``/``error`` message over the pipe ``write_fd``.
    """
    import pickle
    import sys
    from multiprocessing.connection import Connection

    conn = Connection(write_fd, readable=False)
    spec = pickle.loads(sys.stdin.buffer.read())
    for entry in reversed(spec["sys_path"]):  # so test and user modules import as in the parent
        if entry not in sys.path:
            sys.path.insert(0, entry)
    step = spec["step"]
    last = {"t": 0.0, "f": -1.0}

    def progress(fraction: float, message: str = "") -> None:
        now = time.monotonic()
        fraction = min(max(float(fraction), 0.0), 1.0)
        # Throttle at the source: at most ~5 events a second unless the step finishes.
        if fraction < 1.0 and now - last["t"] < 0.2 and fraction - last["f"] < 0.05:
            return
        last["t"], last["f"] = now, fraction
        conn.send(("progress", fraction, str(message)))

    ctx = StepContext(step=step, work_dir=Path(spec["work_dir"]), device=spec["device"], progress=progress,
                      model=spec["model"])
    try:
        func = _resolve(spec["func"])
        result = func(ctx, **spec["kwargs"])
        if result is None:
            result = StepResult()
        if not isinstance(result, StepResult):
            raise PipelineError(f"Step {step!r} returned {type(result).__name__}, expected StepResult")
        peak_gpu, gpu_after = _gpu_figures()
        conn.send(("ok", result, _peak_rss_mb(), peak_gpu, gpu_after))
    except BaseException as exc:  # noqa: BLE001 - everything must reach the parent as a typed error
        error = classify(exc, step=step)
        peak_gpu, gpu_after = _gpu_figures()
        conn.send(("error", error.to_dict(), traceback.format_exc(), _peak_rss_mb(), peak_gpu, gpu_after))
    finally:
        conn.close()


def _peak_rss_mb() -> float:
    from workbench.gpu import peak_rss_mb

    return peak_rss_mb()


def _gpu_figures() -> tuple[float | None, float | None]:
    """Peak and remaining CUDA memory of this process, only if the step used torch with CUDA."""
    import sys

    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None, None
    from workbench.gpu import cleanup_gpu_memory, gpu_memory_mb

    peak = gpu_memory_mb()["peak_mb"]
    cleanup_gpu_memory()
    return peak, gpu_memory_mb()["reserved_mb"]


# --------------------------------------------------------------------------- parent side


def kill_process_group(pgid: int, grace_s: float = KILL_GRACE_S, process: subprocess.Popen | None = None) -> None:
    """SIGTERM the process group ``pgid``, then SIGKILL what is left after ``grace_s``.

    ``process`` (the group's leader, if we started it) is reaped while waiting,
    so a dead leader is not mistaken for a live one.
    """
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 2.0)):
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if process is not None:
                process.poll()
            if not group_members(pgid):
                return
            time.sleep(0.05)


def group_members(pgid: int) -> list[int]:
    """PIDs of live (non-zombie) processes in process group ``pgid``."""
    import psutil

    members = []
    for proc in psutil.process_iter(["status"]):
        try:
            if proc.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(proc.pid) == pgid:
                members.append(proc.pid)
        except (ProcessLookupError, psutil.Error, OSError):
            continue
    return members


class Run:
    """One run of a pipeline: a run folder, its steps, its ``result.json``.

    Args:
        run_dir: the run folder (created).
        pipeline: ``knee`` or ``recon``.
        config: the job config (written as ``config.json`` unless it exists).
        models: the run's model sequence, in order (for "model k of n" progress).
        timeout_s: limit for the whole run; each step gets at most what is left of it.
        device: resolved device passed to every step.
        progress: where events go (see :func:`workbench.progress.default_sinks`).
        parameters: the user-facing options, recorded in ``result.json``.
    """

    def __init__(
        self,
        run_dir: str | Path,
        *,
        pipeline: str,
        config: dict[str, Any] | None = None,
        models: list[str] | None = None,
        timeout_s: float | None = None,
        device: str = "cpu",
        progress: Progress | None = None,
        parameters: dict[str, Any] | None = None,
        n_steps: int = 0,
    ) -> None:
        self.run_dir = Path(run_dir).resolve()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.pipeline = pipeline
        self.config = config or {}
        self.models = list(models or [])
        self.timeout_s = timeout_s
        self.device = device
        self.progress = progress or Progress()
        self.parameters = parameters or {}
        self.n_steps = n_steps
        self.steps: list[StepRecord] = []
        self.outputs: list[dict[str, Any]] = []
        self.metrics: dict[str, Any] = {}
        self.error: WorkbenchError | None = None
        self.status = "running"
        self.started = datetime.now(timezone.utc)
        self.ended: datetime | None = None
        self._t0 = time.monotonic()
        self._cancel = threading.Event()
        self._child_pid: int | None = None
        if config is not None and not (self.run_dir / "config.json").exists():
            (self.run_dir / "config.json").write_text(json.dumps(config, indent=2, default=str))

    # -- context manager --------------------------------------------------------------
    def __enter__(self) -> "Run":
        self.progress.emit(ProgressEvent(RUN_START, n_steps=self.n_steps, n_models=len(self.models),
                                         message=f"{self.pipeline} → {self.run_dir}"))
        self.write_result()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is not None and self.error is None:
            self.error = classify(exc)
            self._append_error_log(f"{self.error}\n" + "".join(traceback.format_exception(exc_type, exc, tb)))
        self.finish()
        return False

    def finish(self) -> None:
        """Mark the run ended (``ok``/``failed``/``timeout``/``cancelled``) and write ``result.json``."""
        if self.ended is not None:
            return
        self.ended = datetime.now(timezone.utc)
        if self.error is None:
            self.status = "ok"
        elif self.error.code is ErrorCode.TIMEOUT:
            self.status = "timeout"
        elif self.error.code is ErrorCode.CANCELLED:
            self.status = "cancelled"
        else:
            self.status = "failed"
        shutil.rmtree(self.run_dir / ".work", ignore_errors=True)
        (self.run_dir / CANCEL_FILE).unlink(missing_ok=True)
        self.write_result()
        message = str(self.error) if self.error else f"{len(self.steps)} steps in {self.elapsed():.1f} s"
        self.progress.emit(ProgressEvent(RUN_END, n_steps=self.n_steps, status=self.status, message=message))

    # -- control ----------------------------------------------------------------------
    def cancel(self) -> None:
        """Ask the run to stop: the running step's process group is killed and the run ends CANCELLED."""
        self._cancel.set()

    def cancel_requested(self) -> bool:
        """True after :meth:`cancel`, or once another process wrote ``<run_dir>/cancel.request``."""
        return self._cancel.is_set() or (self.run_dir / CANCEL_FILE).exists()

    def elapsed(self) -> float:
        return time.monotonic() - self._t0

    def remaining(self) -> float | None:
        return None if self.timeout_s is None else self.timeout_s - self.elapsed()

    # -- steps ------------------------------------------------------------------------
    def step(
        self,
        name: str,
        func: str | Callable,
        *,
        timeout_s: float | None = None,
        model: str | None = None,
        optional: bool = False,
        **kwargs: Any,
    ) -> StepRecord | None:
        """Run one step in a child process and return its record with final output paths.

        ``func`` is ``"module:function"`` (or a module-level function) taking
        ``(ctx: StepContext, **kwargs)`` and returning a :class:`StepResult`.
        A failing step raises its :class:`WorkbenchError`, unless ``optional``:
        then it is recorded as failed and ``None`` is returned so the run goes on.
        """
        index = len(self.steps) + 1
        n_steps = max(self.n_steps, index)
        model_index = self.models.index(model) + 1 if model in self.models else 0
        base = dict(step=name, step_index=index, n_steps=n_steps, model=model, model_index=model_index,
                    n_models=len(self.models))
        self.progress.emit(ProgressEvent(STEP_START, **base))
        t0 = time.monotonic()
        limit, limited_by_run = self._limit_for(timeout_s)
        record = StepRecord(name=name, status="running", seconds=0.0, model=model)
        work_dir = self.run_dir / ".work" / f"{name}-{uuid.uuid4().hex[:8]}"
        work_dir.mkdir(parents=True)
        try:
            if self.cancel_requested():
                raise Cancelled(f"Run cancelled before step {name!r}", step=name)
            if limit is not None and limit <= 0:
                raise StepTimeout(f"Run timeout of {self.timeout_s:.0f} s reached before step {name!r}",
                                  "Raise timeouts.run_s in the config.", step=name)
            outcome = self._run_child(name, func, kwargs, work_dir, model, limit, limited_by_run, base)
            record.peak_rss_mb, record.peak_gpu_mb, record.gpu_after_mb = outcome[1:4]
            result: StepResult = outcome[0]
            committed = commit_outputs(work_dir, self.run_dir, list(result.outputs.values()))
            record.outputs = {key: self.run_dir / out.path for key, out in result.outputs.items()}
            record.metrics = dict(result.metrics)
            record.values = dict(result.values)
            self.outputs.extend(committed)
            if result.metrics:
                self.metrics[name] = dict(result.metrics)
            record.status = "ok"
        except BaseException as exc:  # noqa: BLE001
            error = classify(exc, step=name)
            record.status = {"TIMEOUT": "timeout", "CANCELLED": "cancelled"}.get(error.code.value, "failed")
            record.error = error.to_dict()
            shutil.rmtree(work_dir, ignore_errors=True)
            if not isinstance(exc, WorkbenchError) or not getattr(exc, "_logged", False):
                self._append_error_log(f"[{name}] {error}\n" + getattr(exc, "child_traceback",
                                                                         traceback.format_exc()))
            record.seconds = time.monotonic() - t0
            self.steps.append(record)
            self.progress.emit(ProgressEvent(STEP_END, status=record.status, message=str(error), **base))
            run_over = error.code is ErrorCode.CANCELLED or (error.code is ErrorCode.TIMEOUT and limited_by_run)
            if optional and not run_over:
                self.write_result()
                return None
            self.error = error
            self.write_result()
            raise error from (None if exc is error else exc)
        record.seconds = time.monotonic() - t0
        self.steps.append(record)
        self.progress.emit(ProgressEvent(STEP_END, status="ok", fraction=1.0,
                                         message=f"{record.seconds:.1f} s", **base))
        self.write_result()
        return record

    def skip(self, name: str, reason: str, model: str | None = None) -> None:
        """Record a step that was not run (e.g. T2 on single-echo input) with its reason."""
        self.steps.append(StepRecord(name=name, status="skipped", seconds=0.0, model=model,
                                     error={"code": None, "message": reason, "hint": None, "step": name}))
        self.progress.emit(ProgressEvent(STEP_END, step=name, step_index=len(self.steps),
                                         n_steps=max(self.n_steps, len(self.steps)), status="skipped",
                                         message=reason))
        self.write_result()

    def _limit_for(self, timeout_s: float | None) -> tuple[float | None, bool]:
        remaining = self.remaining()
        if remaining is None:
            return timeout_s, False
        if timeout_s is None or remaining < timeout_s:
            return remaining, True
        return timeout_s, False

    def _run_child(self, name, func, kwargs, work_dir, model, limit, limited_by_run, base):
        import pickle
        import sys
        from multiprocessing.connection import Connection

        spec = {"func": func, "kwargs": kwargs, "step": name, "work_dir": str(work_dir), "device": self.device,
                "model": model, "sys_path": [p for p in sys.path if p]}
        read_fd, write_fd = os.pipe()
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", "workbench._child", str(write_fd)],
                stdin=subprocess.PIPE, pass_fds=(write_fd,), start_new_session=True,  # own process group
                env=dict(os.environ, MPLBACKEND="Agg"),  # steps draw to files, never to a screen or notebook
            )
        finally:
            os.close(write_fd)
        parent_conn = Connection(read_fd, writable=False)
        self._child_pid = process.pid
        try:
            process.stdin.write(pickle.dumps(spec))
            process.stdin.close()
        except BrokenPipeError:
            pass
        deadline = None if limit is None else time.monotonic() + limit
        message = None
        try:
            while True:
                if self.cancel_requested():
                    kill_process_group(process.pid, process=process)
                    raise Cancelled(f"Step {name!r} was cancelled", step=name)
                if deadline is not None and time.monotonic() >= deadline:
                    kill_process_group(process.pid, process=process)
                    what = "the run's remaining time" if limited_by_run else "its timeout"
                    raise StepTimeout(
                        f"Step {name!r} exceeded {what} of {limit:.0f} s and was stopped",
                        "Raise timeouts." + ("run_s" if limited_by_run else f"{name}_s")
                        + " in the config, or use a smaller input or a faster device.",
                        step=name,
                    )
                try:
                    ready = parent_conn.poll(0.1)
                except (EOFError, OSError):
                    ready = True
                if not ready:
                    if process.poll() is not None and not parent_conn.poll(0):
                        break
                    continue
                try:
                    message = parent_conn.recv()
                except (EOFError, OSError):
                    message = None
                    break
                if message[0] == "progress":
                    self.progress.emit(ProgressEvent(UPDATE, fraction=message[1], message=message[2], **base))
                    message = None
                    continue
                break
        except BaseException:
            # Timeout, cancel, or the user interrupting the kernel: the step's group must not outlive it.
            kill_process_group(process.pid, grace_s=1.0, process=process)
            raise
        finally:
            parent_conn.close()
            try:
                process.wait(timeout=KILL_GRACE_S + 3)
            except subprocess.TimeoutExpired:
                kill_process_group(process.pid, grace_s=0.5, process=process)
                process.wait(timeout=2)
            if group_members(process.pid):
                kill_process_group(process.pid, grace_s=0.5)  # grandchildren left behind
            self._child_pid = None
        if message is None:
            code = process.returncode
            how = f"signal {signal.Signals(-code).name}" if code and code < 0 else f"exit code {code}"
            hint = "The process was killed (often by the out-of-memory killer); use a smaller input or more RAM." \
                if code == -signal.SIGKILL else None
            raise PipelineError(f"Step {name!r} ended without a result ({how})", hint, step=name)
        if message[0] == "ok":
            return message[1], message[2], message[3], message[4]
        error = WorkbenchError.from_dict(message[1])
        error.child_traceback = message[2]
        self._append_error_log(f"[{name}] {error}\n{message[2]}")
        error._logged = True
        raise error

    def steps_from_result(self, result: dict[str, Any]) -> None:
        """Adopt the finished steps and outputs of an earlier ``result.json`` of this run folder."""
        for step in result.get("steps", []):
            self.steps.append(StepRecord(
                name=step["name"], status=step["status"], seconds=step.get("seconds") or 0.0,
                model=step.get("model"), peak_rss_mb=step.get("peak_rss_mb"), peak_gpu_mb=step.get("peak_gpu_mb"),
                gpu_after_mb=step.get("gpu_after_mb"), error=step.get("error")))
        self.outputs.extend(result.get("outputs", []))
        self.metrics.update(result.get("metrics", {}))
        self.models = self.models or list(result.get("models", []))

    # -- result.json ------------------------------------------------------------------
    def _append_error_log(self, text: str) -> None:
        with open(self.run_dir / "error.log", "a", encoding="utf-8") as fh:
            fh.write(text.rstrip() + "\n")

    def result(self) -> dict[str, Any]:
        """The ``result.json`` document (see ``docs/result-schema.md``)."""
        return {
            "schema_version": RESULT_SCHEMA_VERSION,
            "status": self.status,
            "pipeline": self.pipeline,
            "models": self.models,
            "parameters": self.parameters,
            "error": self.error.to_dict() if self.error else None,
            "steps": [s.to_dict() for s in self.steps],
            "outputs": self.outputs,
            "metrics": self.metrics,
            "versions": versions(),
            "device": self.device,
            "started": self.started.isoformat(timespec="seconds"),
            "ended": self.ended.isoformat(timespec="seconds") if self.ended else None,
            "seconds": round(self.elapsed(), 3),
        }

    def write_result(self) -> Path:
        """Write ``result.json`` atomically (temp file, then rename)."""
        path = self.run_dir / "result.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.result(), indent=2, default=str), encoding="utf-8")
        os.replace(tmp, path)
        return path


def record_failure(run_dir: str | Path, *, pipeline: str, parameters: dict[str, Any],
                   error: WorkbenchError) -> dict[str, Any]:
    """Write ``result.json`` for a run that ended outside the runner's hands and return it.

    For a dead notebook kernel, a killed job or options rejected before any step:
    the steps of an earlier ``result.json`` in ``run_dir`` are kept, so the
    record still shows how far the run got.
    """
    path = Path(run_dir) / "result.json"
    earlier = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    run = Run(run_dir, pipeline=pipeline, parameters=parameters)
    if earlier is not None:
        run.steps_from_result(earlier)
    run.error = error
    run.finish()
    return run.result()
_VERSIONS: dict[str, Any] | None = None


def versions() -> dict[str, Any]:
    """Versions of the package, Python, torch, CUDA and the git commit of the source tree."""
    global _VERSIONS
    if _VERSIONS is None:
        info: dict[str, Any] = {"workbench": __version__, "python": platform.python_version()}
        try:
            import torch

            info["torch"] = torch.__version__
            info["cuda"] = torch.version.cuda if torch.cuda.is_available() else None
        except Exception:
            info["torch"] = None
            info["cuda"] = None
        try:
            commit = subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                text=True, timeout=5,
            )
            info["git_commit"] = commit.stdout.strip() or None if commit.returncode == 0 else None
        except Exception:
            info["git_commit"] = None
        _VERSIONS = info
    return dict(_VERSIONS)


def new_run_dir(pipeline: str, parent: str | Path | None = None) -> Path:
    """A new, empty run folder ``<parent>/<YYYYmmdd-HHMMSS>-<pipeline>-<6 hex>`` (parent: ``outputs/``)."""
    from workbench.config import outputs_dir

    parent = Path(parent) if parent is not None else outputs_dir()
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    path = parent / f"{stamp}-{pipeline}-{uuid.uuid4().hex[:6]}"
    path.mkdir(parents=True, exist_ok=False)
    return path
