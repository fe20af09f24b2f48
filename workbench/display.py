"""Notebook display helpers: run summaries as tables (no pipeline logic)."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

#: Colour of each run status in reports and the gallery.
STATUS_COLOURS = {"ok": "#1a7f37", "failed": "#cf222e", "cancelled": "#b7791f", "timeout": "#b7791f",
                  "running": "#0969da"}


def load_result(run_dir: str | Path) -> dict[str, Any]:
    """The ``result.json`` of a run folder."""
    return json.loads((Path(run_dir) / "result.json").read_text(encoding="utf-8"))


def steps_html(result: dict[str, Any]) -> str:
    """An HTML table of the run's steps: status, model, seconds, peak memory, error code."""
    rows = []
    for step in result.get("steps", []):
        error = step.get("error") or {}
        rows.append(
            "<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in (
                step["name"], step["status"], step.get("model") or "", f"{step.get('seconds') or 0:.1f}",
                "" if step.get("peak_rss_mb") is None else f"{step['peak_rss_mb']:.0f}",
                "" if step.get("peak_gpu_mb") is None else f"{step['peak_gpu_mb']:.0f}",
                error.get("code") or "", error.get("message") or "",
            )) + "</tr>"
        )
    head = "".join(f"<th>{h}</th>" for h in (
        "step", "status", "model", "seconds", "peak RSS (MiB)", "peak GPU (MiB)", "code", "message"))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def summary_html(result: dict[str, Any]) -> str:
    """Status line, error (code, message, hint) if any, and the steps table."""
    status = result.get("status", "?")
    parts = [f"<p><b>status:</b> {html.escape(status)} &nbsp; <b>pipeline:</b> {html.escape(result.get('pipeline', ''))}"
             f" &nbsp; <b>seconds:</b> {result.get('seconds', 0):.1f} &nbsp; <b>device:</b> "
             f"{html.escape(str(result.get('device')))}</p>"]
    error = result.get("error")
    if error:
        parts.append(f"<p><b>error {html.escape(error['code'])}</b>: {html.escape(error['message'])}<br>"
                     f"<i>hint:</i> {html.escape(error.get('hint') or '')}</p>")
    parts.append(steps_html(result))
    return "\n".join(parts)


def show_result(result: dict[str, Any]) -> None:
    """Display :func:`summary_html` in the notebook."""
    from IPython.display import HTML, display

    display(HTML(summary_html(result)))


def install_error_display() -> bool:
    """Show workbench errors in this IPython kernel as code, message and hint instead of a traceback.

    The cell still fails (papermill still sees the error and stops), but the
    notebook and its HTML report show three lines; the traceback is in the run
    folder's ``error.log``.  Returns False outside IPython.
    """
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover - IPython ships with ipykernel
        return False
    shell = get_ipython()
    if shell is None:
        return False
    from workbench.errors import WorkbenchError

    def _show(shell, etype, value, tb, tb_offset=None):
        lines = [f"{value.code.value}: {value.message}", f"hint: {value.hint}"]
        if value.step:
            lines.append(f"step: {value.step} (traceback in the run folder's error.log)")
        shell._showtraceback(etype, value, lines)
        return lines

    shell.set_custom_exc((WorkbenchError,), _show)
    return True


def segmentation_html(summary: dict[str, Any]) -> str:
    """A table per structure: volume (mm³) and, when a ground truth was given, Dice."""
    from workbench.data.labels import KNEE_LABELS

    dice = summary.get("dice") or {}
    head = "<th>label</th><th>structure</th><th>volume (mm³)</th>" + ("<th>Dice</th>" if dice else "")
    rows = []
    for label in KNEE_LABELS:
        cells = [str(label.value), html.escape(label.name), f"{summary['volumes_mm3'].get(label.key, 0):,.0f}"]
        if dice:
            value = dice.get(label.key)
            cells.append("–" if value is None else f"{value:.3f}")
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    caption = (f"<p><b>model:</b> {html.escape(summary.get('model', ''))} "
               f"({html.escape(', '.join(summary.get('configurations', [])))})</p>")
    return f"{caption}<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def results_html(document: dict[str, Any]) -> str:
    """The results table (``<case>_results.json``): thickness and T2 per region, volumes, side, step status."""
    results = document.get("results", {})
    regions = sorted({k.split("_mm_")[0] for k in results if "_mm_" in k and "_t2_" not in k})

    def cell(key: str) -> str:
        value = results.get(key)
        return "–" if value is None else f"{value:.2f}"

    rows = []
    for region in regions:
        cells = [region] + [cell(f"{region}_mm_{s}") for s in ("mean", "std", "median")]
        cells += [cell(f"{region}_t2_ms_{s}") for s in ("mean", "median")]
        rows.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    head = ("<th>region</th><th>thickness mean (mm)</th><th>std</th><th>median</th>"
            "<th>T2 mean (ms)</th><th>T2 median (ms)</th>")
    steps = ", ".join(f"{html.escape(k)}: {html.escape(str(v))}" for k, v in document.get("steps", {}).items())
    side = html.escape(str(results.get("knee_side") or "unknown"))
    return (f"<p><b>case:</b> {html.escape(str(document.get('case', '')))} &nbsp; <b>knee side:</b> {side}"
            f" &nbsp; <b>T2 method:</b> {html.escape(str(results.get('t2_method') or '–'))}</p>"
            f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
            f"<p><small>steps: {steps}</small></p>")


def nsm_html(fits: list) -> str:
    """A table of shape-model fits (:func:`workbench.knee.nsm.read_saved_fits`): ASSD per surface, B-score, effort."""

    def num(value, digits=3) -> str:
        return "–" if value is None else f"{value:.{digits}f}"

    rows = []
    for fit in fits:
        p = fit.params
        base = p.get("assd_mean_shape_mm") or {}
        for surface, assd in (p.get("assd_mm") or {}).items():
            cells = [fit.model, surface, num(assd), num(base.get(surface)), num(p.get("Bscore"), 2),
                     str(p.get("iterations", "")), num(p.get("seconds"), 1), str(p.get("stop_reason", ""))]
            rows.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    head = "".join(f"<th>{h}</th>" for h in ("model", "surface", "ASSD (mm)", "aligned mean shape ASSD (mm)",
                                              "B-score", "iterations", "seconds", "stop"))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def recon_metrics_html(metrics: dict[str, Any]) -> str:
    """A reconstruction's quality and effort (``<model>/metrics.json``) as one table."""

    def num(value, digits=3) -> str:
        return "–" if value is None else (f"{value:.{digits}f}" if isinstance(value, float) else str(value))

    views = metrics.get("test_views") or {}
    geo = metrics.get("geometry") or {}
    training = metrics.get("training") or {}
    passes = training.get("passes") or {}
    rows = [
        ("test-view PSNR (dB)", num(views.get("psnr"), 2)), ("test-view SSIM", num(views.get("ssim"))),
        ("test views", num(views.get("n_views"))),
        ("Chamfer-L1 (fraction of GT diagonal)", num(geo.get("chamfer_l1_rel"), 4)),
        ("F-score @ 0.5 %", num(geo.get("fscore_0.5"))), ("F-score @ 1 %", num(geo.get("fscore_1"))),
        ("normal consistency", num(geo.get("normal_consistency"))),
        ("genus (ground truth)", f"{num(geo.get('genus'))} ({num(geo.get('gt_genus'))})" if geo else "–"),
        ("vertices / triangles", f"{num(training.get('vertices'))} / {num(training.get('triangles'))}"),
        ("watertight", num(training.get("watertight"))),
    ] + [(f"{name}: iterations, seconds", f"{p.get('iterations')}, {num(p.get('seconds'), 1)}")
         for name, p in passes.items()]
    body = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>" for k, v in rows)
    return f"<p><b>model:</b> {html.escape(str(metrics.get('model', '')))}</p><table><tbody>{body}</tbody></table>"


def run_header_html(result: dict[str, Any], name: str) -> str:
    """A report's header: the run at a glance, its error, steps, parameters and versions (all text escaped)."""

    def esc(value: Any) -> str:
        return html.escape("–" if value is None else str(value))

    def table(values: dict[str, Any], styles: dict[str, str] | None = None) -> str:
        rows = "".join(
            f"<tr><th style=\"text-align:left\">{esc(k)}</th><td style=\"text-align:left;{(styles or {}).get(k, '')}\">"
            f"{esc(v if isinstance(v, (str, int, float, type(None))) else json.dumps(v, default=str))}</td></tr>"
            for k, v in values.items())
        return f"<table><tbody>{rows}</tbody></table>"

    status = str(result.get("status", "?"))
    seconds = result.get("seconds")
    overview = {
        "status": status, "pipeline": result.get("pipeline"), "models": ", ".join(result.get("models") or []) or None,
        "started": result.get("started"), "ended": result.get("ended"),
        "seconds": f"{seconds:.1f}" if isinstance(seconds, (int, float)) else seconds, "device": result.get("device"),
    }
    status_style = {"status": f"font-weight:bold;color:{STATUS_COLOURS.get(status, '#57606a')}"}
    parts = [f"<h2>Run {esc(name)}</h2>", table(overview, status_style)]
    error = result.get("error")
    if error:
        message = str(error.get("message") or "").strip().splitlines()
        parts.append(
            f"<div style=\"border-left:4px solid {STATUS_COLOURS['failed']};padding:0.3em 0.8em;margin:0.8em 0\">"
            f"<p><b>error {esc(error.get('code'))}</b>: {esc(message[0] if message else '')}</p>"
            f"<p><i>hint:</i> {esc(error.get('hint') or '')}</p>"
            f"<p><i>step:</i> {esc(error.get('step'))}</p></div>")
    parts.append("<h3>Steps</h3>")
    parts.append(steps_html(result) if result.get("steps") else "<p>No step ran.</p>")
    if result.get("parameters"):
        parts += ["<h3>Parameters</h3>", table(result["parameters"])]
    if result.get("versions"):
        parts += ["<h3>Versions</h3>", table(result["versions"])]
    return "<div class=\"workbench-report-header\">" + "\n".join(parts) + "</div>"

