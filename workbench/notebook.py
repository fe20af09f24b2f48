"""Executing pipeline notebooks headless (papermill) and building their HTML reports.

``workbench run`` calls :func:`execute_pipeline_notebook`: the notebook in
``notebooks/`` is executed with papermill into ``<run_dir>/report.ipynb``,
with the options as plain-typed parameters; :func:`build_report` turns the
executed notebook into ``report.html`` with the code cells hidden and images
embedded, also for failed runs (the report then shows how far it got).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from workbench.config import REPO_ROOT
from workbench.errors import ConfigError

#: Parameters every pipeline notebook receives besides the pipeline's options.
RUN_PARAMETERS = ("run_dir", "interactive")


def notebooks_dir() -> Path:
    """Folder of the pipeline notebooks (``$WORKBENCH_NOTEBOOKS`` or the repository's ``notebooks/``)."""
    value = os.environ.get("WORKBENCH_NOTEBOOKS")
    path = Path(value) if value else REPO_ROOT / "notebooks"
    if not path.is_dir():
        raise ConfigError(f"Notebook folder {path} does not exist",
                          "Set WORKBENCH_NOTEBOOKS to the workbench's notebooks/ folder.")
    return path


def notebook_parameters(path: str | Path) -> dict[str, dict[str, Any]]:
    """The parameters declared in a notebook's ``parameters`` cell (papermill's inspection)."""
    import papermill

    return papermill.inspect_notebook(str(path))


def check_parameters(path: str | Path, parameters: dict[str, Any]) -> None:
    """CONFIG_ERROR unless every parameter sent is declared in the notebook and is a plain type."""
    declared = notebook_parameters(path)
    unknown = sorted(set(parameters) - set(declared))
    if unknown:
        raise ConfigError(f"Notebook {Path(path).name} has no parameter(s) {', '.join(unknown)}",
                          f"Declared parameters: {', '.join(declared)}")
    for key, value in parameters.items():
        if not _plain(value):
            raise ConfigError(f"Parameter {key} of type {type(value).__name__} cannot pass through papermill",
                              "Pass str, int, float, bool, None, or lists/dicts of them.")


def _plain(value: Any) -> bool:
    if value is None or isinstance(value, (str, int, float, bool)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return False


def kernel_name() -> str:
    """Kernel for headless runs: ``$WORKBENCH_KERNEL``, else ``python3`` (this interpreter, via ipykernel)."""
    return os.environ.get("WORKBENCH_KERNEL", "python3")


def _ipc_kernel_manager():
    """A kernel manager on Unix-domain sockets: nothing listens on TCP, and no unencrypted-TCP warning."""
    from jupyter_client.manager import AsyncKernelManager

    class IpcKernelManager(AsyncKernelManager):
        def __init__(self, *args, **kwargs):
            kwargs.setdefault("transport", "ipc")
            super().__init__(*args, **kwargs)

    return IpcKernelManager


def execute_notebook(
    notebook: str | Path,
    output: str | Path,
    parameters: dict[str, Any],
    *,
    cwd: str | Path | None = None,
    timeout_s: float | None = None,
    log_output: bool = False,
) -> Path:
    """Execute ``notebook`` with papermill into ``output``; papermill's exceptions propagate.

    ``timeout_s`` bounds each cell (the run's own limit is enforced by the
    runner inside; this is a backstop for a hung kernel).
    """
    import papermill

    check_parameters(notebook, parameters)
    env_backup = os.environ.get("MPLBACKEND")
    os.environ["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
    try:
        papermill.execute_notebook(
            str(notebook), str(output), parameters=parameters, kernel_name=kernel_name(),
            cwd=str(cwd) if cwd else None, execution_timeout=int(timeout_s) if timeout_s else None,
            progress_bar=False, log_output=log_output, request_save_on_cell_execute=True,
            kernel_manager_class=_ipc_kernel_manager() if os.name == "posix" else None,
        )
    finally:
        if env_backup is None:
            os.environ.pop("MPLBACKEND", None)
        else:
            os.environ["MPLBACKEND"] = env_backup
    return Path(output)


def build_report(run_dir: str | Path, notebook: str = "report.ipynb", html: str = "report.html") -> Path:
    """Write ``report.html`` from the run's executed notebook: code hidden, images embedded, no prompts.

    When the run folder holds a ``result.json``, the report opens with a header
    (status, pipeline, models, times, device, the error if any, the steps with
    their seconds and peak memory, the parameters and versions); it is added to
    the exported copy only, not to ``report.ipynb``.  ``thumbnail.png`` (at most
    320 px wide, from the run's pictures) is written beside the report when the
    folder has a picture.
    """
    import json

    import nbformat
    from nbconvert import HTMLExporter

    run_dir = Path(run_dir)
    source = run_dir / notebook
    if not source.is_file():
        raise ConfigError(f"{source} does not exist", "Is this a run folder? It needs report.ipynb.")
    nb = nbformat.read(str(source), as_version=4)
    result_path = run_dir / "result.json"
    result = None
    if result_path.is_file():
        try:
            result = json.loads(result_path.read_text(encoding="utf-8"))
        except ValueError:  # a torn or hand-edited file: the report without its header
            result = None
    if isinstance(result, dict):
        nb.cells.insert(0, _header_cell(result, run_dir))
    exporter = HTMLExporter(template_name="workbench_report",
                            extra_template_basedirs=[str(Path(__file__).resolve().parent / "templates")])
    exporter.exclude_input = True
    exporter.exclude_input_prompt = True
    exporter.exclude_output_prompt = True
    exporter.embed_images = True
    body, _ = exporter.from_notebook_node(nb, resources={"metadata": {"name": _title(run_dir)}})
    target = run_dir / html
    tmp = target.with_suffix(".html.tmp")
    tmp.write_text(body, encoding="utf-8")
    os.replace(tmp, target)
    try:
        from workbench.ui.gallery import write_thumbnail

        write_thumbnail(run_dir)
    except Exception:  # a picture that cannot be read must not cost the report
        pass
    return target


def _title(run_dir: Path) -> str:
    return f"workbench run {run_dir.name}"


def _header_cell(result: dict[str, Any], run_dir: Path):
    """An output-only code cell showing the run's header (its empty input is hidden in the report)."""
    import nbformat

    from workbench.display import run_header_html

    cell = nbformat.v4.new_code_cell(source="", metadata={"tags": ["workbench-report-header"]})
    cell.outputs = [nbformat.v4.new_output("display_data",
                                           data={"text/html": run_header_html(result, run_dir.name)})]
    return cell


def run_job(pipeline: str, parameters: dict[str, Any], run_dir: str | Path, *,
            timeout_s: float | None = None, report: bool = True) -> dict[str, Any]:
    """Execute a pipeline's notebook for one job and return its ``result.json`` document.

    This is what ``workbench run`` (and a batch executor) does for one run:
    papermill executes the pipeline notebook into ``report.ipynb``; the
    notebook runs the steps, which write ``result.json``.  If the notebook
    fails before the runner could record anything (a kernel crash, a bad
    parameter), the failure is classified and ``result.json`` is written here.
    The HTML report is built in both cases.
    """
    import json
    import sys
    import traceback

    from workbench.errors import classify
    from workbench.progress import JsonlFollower, LogSink
    from workbench.registry import REGISTRY
    from workbench.runner import record_failure

    spec = REGISTRY.pipeline(pipeline)
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    notebook = notebooks_dir() / spec.notebook
    params = dict(parameters, run_dir=str(run_dir), interactive=False)
    failure: BaseException | None = None
    try:
        with JsonlFollower(run_dir / "progress.jsonl", LogSink(sys.stderr)):
            execute_notebook(notebook, run_dir / "report.ipynb", params, cwd=run_dir, timeout_s=timeout_s)
    except Exception as exc:  # papermill's execution error, a dead kernel, ...
        failure = exc
    result_path = run_dir / "result.json"
    result = json.loads(result_path.read_text()) if result_path.is_file() else None
    if failure is not None and (result is None or result.get("status") in ("ok", "running")):
        error = _notebook_error(failure)
        with open(run_dir / "error.log", "a", encoding="utf-8") as fh:
            fh.write(f"{error}\n" + "".join(traceback.format_exception(failure)))
        result = record_failure(run_dir, pipeline=pipeline, parameters=parameters, error=error)
    elif result is None:
        error = classify(RuntimeError("the notebook finished without writing result.json"))
        result = record_failure(run_dir, pipeline=pipeline, parameters=parameters, error=error)
    if report and (run_dir / "report.ipynb").is_file():
        try:
            build_report(run_dir)
        except Exception as exc:  # a report problem must not hide the run's own outcome
            with open(run_dir / "error.log", "a", encoding="utf-8") as fh:
                fh.write(f"report.html could not be built: {exc}\n")
    return result


def _notebook_error(exc: BaseException):
    """Classify a papermill failure: a WorkbenchError raised in the notebook keeps its code."""
    from workbench.errors import ErrorCode, WorkbenchError, classify

    ename = getattr(exc, "ename", None)
    evalue = getattr(exc, "evalue", None)
    if ename and evalue:
        code = evalue.split(":", 1)[0].strip()
        if code in ErrorCode.__members__:
            return WorkbenchError(evalue.split(":", 1)[1].strip(), code=code)
        if ename == "DeadKernelError" or "Kernel died" in str(evalue):
            return WorkbenchError("The notebook kernel died (often out of memory)", code="PIPELINE_ERROR")
        return WorkbenchError(f"{ename}: {evalue.splitlines()[0] if evalue else ''}", code="PIPELINE_ERROR")
    if type(exc).__name__ == "DeadKernelError":
        return WorkbenchError("The notebook kernel died (often out of memory)", code="PIPELINE_ERROR")
    return classify(exc)


def run_quickstart(out_dir: str | Path, seed: int = 0) -> Path:
    """Execute ``notebooks/quickstart.ipynb`` headless into ``out_dir``; return its ``report.html``.

    The folder receives the sample case (``sample/``), the knee run
    (``knee-run/``) and the executed notebook with its report.
    """
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    params = {"sample_dir": str(out_dir / "sample"), "run_dir": str(out_dir / "knee-run"), "seed": seed,
              "interactive": False}
    try:
        execute_notebook(notebooks_dir() / "quickstart.ipynb", out_dir / "report.ipynb", params, cwd=out_dir,
                         timeout_s=1800)
    finally:
        if (out_dir / "report.ipynb").is_file():
            build_report(out_dir)
    return out_dir / "report.html"
