"""Progress events and where they go.

A run emits :class:`ProgressEvent` objects (step k of n, step name, current
model, fraction, message).  Sinks decide how they show:

* :class:`JsonlSink` appends every event to ``progress.jsonl`` so another
  process can follow a run (``tail -f`` or :func:`read_events`);
* :class:`LogSink` writes one line per step start/end and per few percent of
  progress, never a line per iteration (headless runs);
* :class:`TqdmSink` shows ``tqdm.auto`` bars (widgets in JupyterLab), one per
  step plus an overall bar.

Model code never prints: it calls the ``progress`` callback a step receives
(see :class:`workbench.runner.StepContext`).
"""

from __future__ import annotations

import json
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Protocol

#: Event kinds.
RUN_START, STEP_START, UPDATE, STEP_END, RUN_END, LOG = (
    "run_start", "step_start", "update", "step_end", "run_end", "log",
)


@dataclass
class ProgressEvent:
    """One progress event.

    Attributes:
        kind: one of ``run_start``, ``step_start``, ``update``, ``step_end``, ``run_end``, ``log``.
        step: the step's name (``None`` for run-level events).
        step_index: 1-based index of the step in the run.
        n_steps: number of steps in the run.
        model: the model the step runs, if any (e.g. ``nnunet_fullres``).
        model_index: 1-based position of ``model`` in the run's model sequence.
        n_models: number of models in the run's sequence.
        fraction: progress of the step in [0, 1].
        message: short human text.
        status: for ``step_end``/``run_end``: ``ok``, ``failed``, ``skipped``, ``timeout``, ``cancelled``.
        time: UNIX time of the event.
    """

    kind: str
    step: str | None = None
    step_index: int = 0
    n_steps: int = 0
    model: str | None = None
    model_index: int = 0
    n_models: int = 0
    fraction: float = 0.0
    message: str = ""
    status: str | None = None
    time: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ProgressEvent":
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})

    def label(self) -> str:
        """``[2/4] segmentation · nnunet_fullres (1 of 2)`` style label."""
        text = f"[{self.step_index}/{self.n_steps}] {self.step}" if self.step else "run"
        if self.model:
            text += f" · {self.model}"
            if self.n_models > 1:
                text += f" ({self.model_index} of {self.n_models})"
        return text


class ProgressSink(Protocol):
    def __call__(self, event: ProgressEvent) -> None: ...


class JsonlSink:
    """Append each event as one JSON line to ``path`` (flushed per line)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def __call__(self, event: ProgressEvent) -> None:
        line = json.dumps(event.to_dict()) + "\n"
        with self._lock, open(self.path, "a", encoding="utf-8") as fh:
            fh.write(line)


class LogSink:
    """One log line per step start/end and per ``every`` of progress (default 10 %), to ``stream`` (stdout)."""

    def __init__(self, stream: IO[str] | None = None, every: float = 0.1):
        self.stream = stream
        self.every = every
        self._last: dict[str | None, float] = {}

    def __call__(self, event: ProgressEvent) -> None:
        if event.kind == UPDATE:
            last = self._last.get(event.step, 0.0)
            if event.fraction < 1.0 and event.fraction - last < self.every:
                return
            self._last[event.step] = event.fraction
        elif event.kind == STEP_START:
            self._last[event.step] = 0.0
        stamp = time.strftime("%H:%M:%S", time.localtime(event.time))
        if event.kind == UPDATE:
            body = f"{event.label()} {event.fraction:4.0%} {event.message}"
        elif event.kind == STEP_START:
            body = f"{event.label()} started {event.message}"
        elif event.kind == STEP_END:
            body = f"{event.label()} {event.status} {event.message}"
        elif event.kind == RUN_START:
            body = f"run started: {event.message}"
        elif event.kind == RUN_END:
            body = f"run {event.status}: {event.message}"
        else:
            body = f"{event.label()} {event.message}"
        print(f"{stamp} {body}".rstrip(), file=self.stream or sys.stdout, flush=True)


class TqdmSink:
    """tqdm.auto bars: an overall bar over steps plus one bar for the current step."""

    def __init__(self) -> None:
        from tqdm.auto import tqdm

        self._tqdm = tqdm
        self._overall = None
        self._step_bar = None

    def __call__(self, event: ProgressEvent) -> None:
        if event.kind == RUN_START or (self._overall is None and event.n_steps):
            self._overall = self._tqdm(total=max(event.n_steps, 1), desc="overall", position=0)
        if event.kind == STEP_START:
            self._close_step()
            self._step_bar = self._tqdm(total=100, desc=event.label(), position=1, leave=False)
        elif event.kind == UPDATE and self._step_bar is not None:
            self._step_bar.n = int(round(event.fraction * 100))
            self._step_bar.set_postfix_str(event.message[:40], refresh=True)
        elif event.kind == STEP_END:
            self._close_step()
            if self._overall is not None:
                self._overall.update(1)
                self._overall.set_postfix_str(f"{event.step}: {event.status}")
        elif event.kind == RUN_END and self._overall is not None:
            self._overall.close()
            self._overall = None

    def _close_step(self) -> None:
        if self._step_bar is not None:
            self._step_bar.n = self._step_bar.total
            self._step_bar.close()
            self._step_bar = None


class Progress:
    """Fan-out of events to sinks; thread-safe."""

    def __init__(self, sinks: Iterable[Callable[[ProgressEvent], None]] = ()):
        self.sinks = list(sinks)
        self._lock = threading.Lock()

    def emit(self, event: ProgressEvent) -> None:
        with self._lock:
            for sink in self.sinks:
                try:
                    sink(event)
                except Exception:  # a display problem must never fail a run
                    pass


def default_sinks(run_dir: str | Path | None, interactive: bool) -> list[Callable[[ProgressEvent], None]]:
    """``progress.jsonl`` in the run folder plus tqdm bars (interactive) or log lines (headless)."""
    sinks: list[Callable[[ProgressEvent], None]] = []
    if run_dir is not None:
        sinks.append(JsonlSink(Path(run_dir) / "progress.jsonl"))
    sinks.append(TqdmSink() if interactive else LogSink())
    return sinks


def read_events(path: str | Path) -> list[ProgressEvent]:
    """All events of a ``progress.jsonl`` so far (a partly written last line is ignored)."""
    events = []
    path = Path(path)
    if not path.exists():
        return events
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            events.append(ProgressEvent.from_dict(json.loads(line)))
        except (json.JSONDecodeError, TypeError):
            continue
    return events


class JsonlFollower:
    """Follow a ``progress.jsonl`` written by another process and pass each new event to ``sink``.

    ``workbench run`` uses it to print log lines in the terminal while the
    notebook runs in its kernel.  Use as a context manager; it polls every
    ``interval`` seconds in a daemon thread and drains the file on exit.
    """

    def __init__(self, path: str | Path, sink: Callable[[ProgressEvent], None], interval: float = 0.3):
        self.path = Path(path)
        self.sink = sink
        self.interval = interval
        self._offset = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="progress-follower", daemon=True)

    def __enter__(self) -> "JsonlFollower":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._poll()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._poll()

    def _poll(self) -> None:
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self._offset)
                chunk = fh.read()
        except FileNotFoundError:
            return
        complete = chunk.rfind(b"\n") + 1  # leave a partly written last line for the next poll
        self._offset += complete
        for line in chunk[:complete].decode("utf-8", "replace").splitlines():
            try:
                self.sink(ProgressEvent.from_dict(json.loads(line)))
            except (json.JSONDecodeError, TypeError):
                continue
