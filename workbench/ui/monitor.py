"""What the launcher shows while a run goes: its state, built from the run's progress events.

:class:`RunMonitor` is fed :class:`~workbench.progress.ProgressEvent` objects
(read from the run folder's ``progress.jsonl``) and log lines; it holds one
:class:`StepState` per step, the overall fraction, the current model
("reconviagen (1 of 2)"), elapsed and remaining time and the last log lines.
It knows nothing about widgets, so it is tested without a browser.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

from workbench.progress import (
    RUN_END,
    RUN_START,
    STEP_END,
    STEP_START,
    UPDATE,
    ProgressEvent,
)

#: Step statuses that mean the step is over.
FINISHED = ("ok", "failed", "skipped", "timeout", "cancelled")


@dataclass
class StepState:
    """One step as the launcher shows it.

    Attributes:
        name: the step's name (``segmentation``).
        index: 1-based position in the run.
        model: the model it runs, if any.
        model_index: position of ``model`` in the run's model sequence (1-based; 0 when none).
        n_models: length of the run's model sequence.
        fraction: progress in [0, 1].
        status: ``pending``, ``running`` or one of :data:`FINISHED`.
        message: the last message of the step.
        started: UNIX time the step started (None while pending).
        ended: UNIX time the step ended (None until then).
    """

    name: str
    index: int
    model: str | None = None
    model_index: int = 0
    n_models: int = 0
    fraction: float = 0.0
    status: str = "pending"
    message: str = ""
    started: float | None = None
    ended: float | None = None

    @property
    def model_label(self) -> str:
        """``nnunet_fullres`` or ``reconviagen (1 of 2)`` when the run has a model sequence."""
        if not self.model:
            return ""
        return f"{self.model} ({self.model_index} of {self.n_models})" if self.n_models > 1 else self.model


class RunMonitor:
    """A run's state from its progress events; thread-safe.

    Args:
        clock: time source (UNIX seconds); tests pass a fake one.
        max_log_lines: how many of the last log lines to keep.
    """

    def __init__(self, clock: Callable[[], float] = time.time, max_log_lines: int = 8):
        self._clock = clock
        self._lock = threading.Lock()
        self.steps: list[StepState] = []
        self.n_steps = 0
        self.started: float | None = None
        self.ended: float | None = None
        self.status: str | None = None  # None while running; the run's final status after run_end
        self.final_message = ""
        self.log_lines: deque[str] = deque(maxlen=max_log_lines)

    # -- input ------------------------------------------------------------------------
    def feed(self, event: ProgressEvent) -> None:
        """Take one progress event."""
        with self._lock:
            if self.started is None:
                self.started = event.time
            if event.kind == RUN_START:
                self.started = event.time
                self.n_steps = max(self.n_steps, event.n_steps)
            elif event.kind in (STEP_START, UPDATE, STEP_END) and event.step:
                self.n_steps = max(self.n_steps, event.n_steps, event.step_index)
                step = self._step(event)
                if event.kind == STEP_START:
                    step.status, step.started, step.fraction = "running", event.time, 0.0
                elif event.kind == UPDATE:
                    step.status = "running" if step.status == "pending" else step.status
                    step.started = step.started or event.time
                    step.fraction = max(step.fraction, min(max(event.fraction, 0.0), 1.0))
                else:
                    step.status = event.status or "ok"
                    step.ended = event.time
                    if step.status == "ok":
                        step.fraction = 1.0
                if event.message:
                    step.message = event.message
            elif event.kind == RUN_END:
                self.status = event.status or "ok"
                self.ended = event.time
                self.final_message = event.message

    def log(self, line: str) -> None:
        """Take one line of the run's log (the job's stderr, which carries a line per step and per 10 %)."""
        line = line.rstrip()
        if line:
            with self._lock:
                if not self.log_lines or self.log_lines[-1] != line:
                    self.log_lines.append(line)

    def _step(self, event: ProgressEvent) -> StepState:
        for step in self.steps:
            if step.name == event.step:
                break
        else:
            step = StepState(name=event.step, index=event.step_index or len(self.steps) + 1)
            self.steps.append(step)
            self.steps.sort(key=lambda s: s.index)
        if event.model:
            step.model, step.model_index, step.n_models = event.model, event.model_index, event.n_models
        return step

    # -- what to show -----------------------------------------------------------------
    @property
    def finished(self) -> bool:
        return self.status is not None

    @property
    def current(self) -> StepState | None:
        """The running step, else the last one that started."""
        running = [s for s in self.steps if s.status == "running"]
        if running:
            return running[-1]
        started = [s for s in self.steps if s.started is not None]
        return started[-1] if started else None

    @property
    def model_label(self) -> str:
        """The current model as ``name (k of n)``; empty when the current step runs no model."""
        current = self.current
        return current.model_label if current else ""

    @property
    def overall_fraction(self) -> float:
        """Finished steps plus the running step's fraction, over the run's steps."""
        with self._lock:
            if self.status == "ok":
                return 1.0
            total = max(self.n_steps, len(self.steps), 1)
            done = sum(1.0 if s.status in FINISHED else s.fraction for s in self.steps)
            return min(done / total, 1.0)

    def elapsed_s(self) -> float:
        """Seconds since the run started (until it ended)."""
        if self.started is None:
            return 0.0
        return max((self.ended or self._clock()) - self.started, 0.0)

    def remaining_s(self) -> float | None:
        """An estimate of the seconds left: elapsed × (1 − f) / f over the overall fraction f.

        None until the run is 2 % through (too early to say) and once it has ended.
        """
        if self.finished:
            return None
        fraction = self.overall_fraction
        if fraction < 0.02:
            return None
        return self.elapsed_s() * (1.0 - fraction) / fraction

    def headline(self) -> str:
        """One line: current step and model, overall percentage, elapsed and remaining time."""
        if self.finished:
            return f"run {self.status} after {format_seconds(self.elapsed_s())}: {self.final_message}"
        current = self.current
        what = "starting"
        if current is not None:
            show_model = current.model and (current.model != current.name or current.n_models > 1)
            what = current.name + (f" · {current.model_label}" if show_model else "")
        remaining = self.remaining_s()
        left = f", about {format_seconds(remaining)} left" if remaining is not None else ""
        return f"{what} — {self.overall_fraction:.0%} overall, {format_seconds(self.elapsed_s())} elapsed{left}"


def format_seconds(seconds: float | None) -> str:
    """``42 s``, ``3 min 05 s``, ``1 h 02 min``."""
    if seconds is None:
        return "–"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {(seconds % 3600) // 60:02d} min"

