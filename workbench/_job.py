"""One job in its own process: ``python -m workbench._job < job.json``.

What the launcher (and, later, a batch executor) starts for a run.  It takes
the same path as ``workbench run``: the options are validated, then
:func:`workbench.notebook.run_job` executes the pipeline's notebook with
papermill into the run folder and builds ``report.html``.

stdin holds ``{"pipeline": ..., "options": {...}, "run_dir": ..., "report": true}``.
SIGTERM (or SIGINT) asks the run to stop the way the launcher's Cancel does: it
writes ``<run_dir>/cancel.request``, the runner kills the running step's
process group, and the run ends ``CANCELLED`` with its report.
Exit codes are the CLI's (0 ok, 2 configuration error, 3 failure).
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from typing import Any


def request_cancel(run_dir: str | Path) -> None:
    """Ask the run in ``run_dir`` to stop (see :data:`workbench.runner.CANCEL_FILE`)."""
    from workbench.runner import CANCEL_FILE

    (Path(run_dir) / CANCEL_FILE).touch()


def run_spec(spec: dict[str, Any]) -> int:
    """Run the job ``spec`` and return the exit code; errors are printed as code, message and hint."""
    from workbench.cli import _print_error
    from workbench.config import notebook_timeout_s, validate_job
    from workbench.errors import EXIT_OK, WorkbenchError, classify, exit_code_for
    from workbench.notebook import run_job
    from workbench.runner import record_failure

    pipeline, options, run_dir = spec["pipeline"], dict(spec["options"]), Path(spec["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: request_cancel(run_dir))
    try:
        validated = validate_job(pipeline, options)
        result = run_job(pipeline, options, run_dir, timeout_s=notebook_timeout_s(pipeline, validated),
                         report=bool(spec.get("report", True)))
    except Exception as exc:  # noqa: BLE001 - reported as code, message and hint, never a traceback
        error = exc if isinstance(exc, WorkbenchError) else classify(exc)
        if not (run_dir / "result.json").exists():  # every failure ends with a result file
            record_failure(run_dir, pipeline=pipeline, parameters=options, error=error)
        _print_error(error)
        return exit_code_for(error)
    if result["status"] == "ok":
        return EXIT_OK
    error = WorkbenchError.from_dict(result["error"])
    _print_error(error)
    return exit_code_for(error)


def main() -> int:
    return run_spec(json.loads(sys.stdin.read()))


if __name__ == "__main__":
    sys.exit(main())
