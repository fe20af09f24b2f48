"""The gallery of run folders: run tables, headline metrics, thumbnails and ``index.html``.

A run folder is any folder holding a ``result.json`` (``docs/result-schema.md``).
:func:`runs_table` puts runs side by side as a pandas DataFrame (used by
``notebooks/compare_runs.ipynb``), :func:`write_index` writes a self-contained,
offline HTML gallery of every run under a folder (``workbench report --index``),
and :func:`write_thumbnail` writes the small ``thumbnail.png`` that
``build_report`` leaves beside each ``report.html``.

Key metrics (:func:`key_metrics`), read from ``result.json``'s ``metrics``:

* knee: ``dice_mean`` (mean Dice over the labels scored against a ground truth,
  ``segmentation.dice``), ``fem_cart_thickness_mm`` (femoral cartilage thickness:
  ``meshes.fem_cart_mm_mean``, or the mean of the five femoral subregions' mean
  thickness when the femoral cartilage was split into subregions),
  ``fem_cart_t2_ms`` (median T2 of the whole femoral cartilage,
  ``t2.fem_cart_t2_ms_median``, multi-echo input only) and ``nsm_assd_bone_mm``
  (bone ASSD of the last shape-model fit, ``nsm_*.assd_bone_mm``);
* recon (the last model's ``evaluate_<model>`` step): ``psnr`` (held-out test
  views, dB), ``fscore_1`` (F-score at 1 % of the ground-truth diagonal) and
  ``chamfer_l1`` (Chamfer-L1 in the mesh's units).

A metric the run did not record (no ground truth, a failed step, single-echo
input) is ``None``.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from workbench.display import STATUS_COLOURS

#: Headline metrics per pipeline, in display order (see the module docstring).
KEY_METRICS: dict[str, tuple[str, ...]] = {
    "knee": ("dice_mean", "fem_cart_thickness_mm", "fem_cart_t2_ms", "nsm_assd_bone_mm"),
    "recon": ("psnr", "fscore_1", "chamfer_l1"),
}

#: Width of ``thumbnail.png`` and of the gallery's thumbnails (pixels, at most).
THUMBNAIL_WIDTH = 320

#: How deep below the root :func:`find_runs` looks for run folders.
MAX_DEPTH = 3

FEMORAL_SUBREGIONS = ("ant_fem_cart", "med_wb_fem_cart", "lat_wb_fem_cart", "med_post_fem_cart", "lat_post_fem_cart")


# ---------------------------------------------------------------------------------------------------------------
# finding and reading runs


def find_runs(root: str | Path) -> list[Path]:
    """Run folders (holding a ``result.json``) at or below ``root``, at most three levels down, sorted.

    Folders whose name starts with ``.`` are skipped; a missing root gives an empty list.
    """
    root = Path(root)
    found: list[Path] = []

    def walk(folder: Path, depth: int) -> None:
        if (folder / "result.json").is_file():
            found.append(folder)
        if depth >= MAX_DEPTH:
            return
        try:
            children = sorted(e.path for e in os.scandir(folder)
                              if e.is_dir(follow_symlinks=False) and not e.name.startswith("."))
        except OSError:
            return
        for child in children:
            walk(Path(child), depth + 1)

    if root.is_dir():
        walk(root, 0)
    return found


def _read_result(folder: Path) -> dict[str, Any]:
    """``result.json`` of a run folder; an unreadable one gives a stand-in document with status ``unknown``."""
    try:
        result = json.loads((folder / "result.json").read_text(encoding="utf-8"))
        if isinstance(result, dict):
            return result
    except (OSError, ValueError):
        pass
    return {"status": "unknown", "error": {"code": "UNREADABLE", "message": "result.json could not be read"}}


def _number(value: Any) -> float | None:
    """A finite float, or None for anything else (booleans, strings, NaN, infinities)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _mean(values: Iterable[Any]) -> float | None:
    numbers = [v for v in (_number(x) for x in values) if v is not None]
    return sum(numbers) / len(numbers) if numbers else None


def key_metrics(result: dict[str, Any]) -> dict[str, float | str | None]:
    """The run's headline numbers by pipeline (see the module docstring for which); None where not recorded."""
    metrics = result.get("metrics") or {}
    pipeline = result.get("pipeline")
    if pipeline == "knee":
        dice = (metrics.get("segmentation") or {}).get("dice") or {}
        thickness = metrics.get("meshes") or {}
        femoral = _number(thickness.get("fem_cart_mm_mean"))
        if femoral is None:
            femoral = _mean(thickness.get(f"{region}_mm_mean") for region in FEMORAL_SUBREGIONS)
        nsm = [metrics[name] for name in metrics if name.startswith("nsm_") and isinstance(metrics[name], dict)]
        return {
            "dice_mean": _mean(dice.values()),
            "fem_cart_thickness_mm": femoral,
            "fem_cart_t2_ms": _number((metrics.get("t2") or {}).get("fem_cart_t2_ms_median")),
            "nsm_assd_bone_mm": _number(nsm[-1].get("assd_bone_mm")) if nsm else None,
        }
    if pipeline == "recon":
        models = result.get("models") or []
        steps = [f"evaluate_{models[-1]}"] if models else []
        steps += [name for name in metrics if name.startswith("evaluate_")]
        evaluation = next((metrics[s] for s in steps if isinstance(metrics.get(s), dict)), {})
        return {key: _number(evaluation.get(key)) for key in KEY_METRICS["recon"]}
    return {}


def flat_metrics(result: dict[str, Any]) -> dict[str, float]:
    """Every number recorded directly under a step in ``metrics``, as ``{"step.metric": value}``."""
    flat: dict[str, float] = {}
    for step, values in (result.get("metrics") or {}).items():
        if not isinstance(values, dict):
            continue
        for key, value in values.items():
            number = _number(value)
            if number is not None:
                flat[f"{step}.{key}"] = number
    return flat


# ---------------------------------------------------------------------------------------------------------------
# thumbnails


def thumbnail_source(run_dir: str | Path, result: dict[str, Any] | None = None) -> Path | None:
    """The run's picture to make the thumbnail from, or None when the folder has no PNG.

    Knee: ``<case>_thickness.png``, else ``<case>_preview.png``; recon:
    ``<last model>/preview_pass2.png``, else ``preview_pass1.png``, else
    ``input_views.png``; otherwise the first ``*.png`` in the folder (not ``thumbnail.png``).
    """
    run_dir = Path(run_dir)
    if result is None:
        result = _read_result(run_dir) if (run_dir / "result.json").is_file() else {}
    pipeline = result.get("pipeline")
    candidates: list[Path] = []
    if pipeline == "knee":
        candidates += sorted(run_dir.glob("*_thickness.png")) + sorted(run_dir.glob("*_preview.png"))
    elif pipeline == "recon":
        models = result.get("models") or []
        if models:
            candidates += [run_dir / models[-1] / "preview_pass2.png", run_dir / models[-1] / "preview_pass1.png"]
        candidates.append(run_dir / "input_views.png")
    candidates += [p for p in sorted(run_dir.glob("*.png")) if p.name != "thumbnail.png"]
    return next((p for p in candidates if p.is_file()), None)


def thumbnail_png(source: str | Path, width: int = THUMBNAIL_WIDTH) -> bytes:
    """PNG bytes of ``source`` scaled down to at most ``width`` pixels wide (never scaled up)."""
    from PIL import Image

    with Image.open(source) as image:
        image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
        if image.width > width:
            height = max(1, round(image.height * width / image.width))
            image = image.resize((width, height), Image.LANCZOS)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def write_thumbnail(run_dir: str | Path) -> Path | None:
    """Write ``<run_dir>/thumbnail.png`` (at most 320 px wide) from :func:`thumbnail_source`; None without a picture."""
    run_dir = Path(run_dir)
    source = thumbnail_source(run_dir)
    if source is None:
        return None
    target = run_dir / "thumbnail.png"
    tmp = target.with_name(".thumbnail.png.tmp")
    tmp.write_bytes(thumbnail_png(source))
    os.replace(tmp, target)
    return target


# ---------------------------------------------------------------------------------------------------------------
# summaries and tables


@dataclass
class RunSummary:
    """What the gallery and the run table show of one run folder."""

    folder: Path
    name: str
    date: str | None
    pipeline: str | None
    models: list[str]
    status: str
    error_code: str | None
    error_message: str | None
    seconds: float | None
    metrics: dict[str, float | str | None] = field(default_factory=dict)
    report: Path | None = None
    thumbnail: Path | None = None


def summarize_run(folder: str | Path) -> RunSummary:
    """Read one run folder into a :class:`RunSummary` (report and thumbnail paths when those files exist)."""
    folder = Path(folder)
    result = _read_result(folder)
    error = result.get("error") or {}
    message = error.get("message")
    report = folder / "report.html"
    thumbnail = folder / "thumbnail.png"
    return RunSummary(
        folder=folder,
        name=folder.name,
        date=result.get("started"),
        pipeline=result.get("pipeline"),
        models=list(result.get("models") or []),
        status=str(result.get("status") or "unknown"),
        error_code=error.get("code"),
        error_message=message.splitlines()[0] if message else None,
        seconds=_number(result.get("seconds")),
        metrics=key_metrics(result),
        report=report if report.is_file() else None,
        thumbnail=thumbnail if thumbnail.is_file() else None,
    )


def _folders(folders_or_root: str | Path | Iterable[str | Path]) -> list[Path]:
    if isinstance(folders_or_root, (str, os.PathLike)):
        return find_runs(folders_or_root)
    return [Path(f) for f in folders_or_root]


def runs_table(folders_or_root: str | Path | Iterable[str | Path]):
    """One row per run as a pandas DataFrame, from a root folder (searched with :func:`find_runs`) or run folders.

    Columns: ``run``, ``started``, ``pipeline``, ``models``, ``status``,
    ``error_code``, ``seconds``, the key metrics (:data:`KEY_METRICS` of the
    pipelines present), every flat numeric metric as ``step.metric``, and ``folder``.
    """
    import pandas as pd

    rows = []
    key_columns: list[str] = []
    flat_columns: list[str] = []
    for folder in _folders(folders_or_root):
        summary = summarize_run(folder)
        flat = flat_metrics(_read_result(folder))
        for key in summary.metrics:
            if key not in key_columns:
                key_columns.append(key)
        for key in flat:
            if key not in flat_columns:
                flat_columns.append(key)
        rows.append({"run": summary.name, "started": summary.date, "pipeline": summary.pipeline,
                     "models": ", ".join(summary.models), "status": summary.status,
                     "error_code": summary.error_code, "seconds": summary.seconds,
                     **summary.metrics, **flat, "folder": str(summary.folder)})
    columns = ["run", "started", "pipeline", "models", "status", "error_code", "seconds"]
    columns += key_columns + [c for c in flat_columns if c not in key_columns] + ["folder"]
    return pd.DataFrame(rows, columns=columns)


def metrics_side_by_side(df, metrics: Iterable[str] | None = None):
    """One bar chart per metric with the runs on the x axis; returns the matplotlib figure, or None if nothing to plot.

    ``metrics`` defaults to the key metrics (:data:`KEY_METRICS`) that some run in ``df`` recorded.
    """
    import matplotlib.pyplot as plt
    import numpy as np
    import pandas as pd

    if metrics is None:
        known = [m for keys in KEY_METRICS.values() for m in keys]
        metrics = [m for m in known if m in df.columns]
    metrics = [m for m in metrics if m in df.columns and pd.to_numeric(df[m], errors="coerce").notna().any()]
    if not metrics or df.empty:
        return None
    labels = [str(r) for r in (df["run"] if "run" in df.columns else df.index)]
    positions = np.arange(len(labels))
    width = max(3.0, 0.45 * len(labels) + 1.5)  # per chart
    ncols = min(len(metrics), 4)
    nrows = math.ceil(len(metrics) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, 3.6 * nrows), squeeze=False)
    for ax in axes.flat[len(metrics):]:
        ax.set_visible(False)
    for ax, metric in zip(axes.flat, metrics):
        values = pd.to_numeric(df[metric], errors="coerce").to_numpy(dtype=float)
        ax.bar(positions, np.nan_to_num(values, nan=0.0), color="#4c72b0")
        for x, value in zip(positions, values):
            if np.isnan(value):
                ax.text(x, 0, "–", ha="center", va="bottom", color="grey")
        ax.set_xticks(positions)
        ax.set_xticklabels(labels, rotation=45, ha="right", fontsize=8)
        ax.set_title(metric, fontsize=10)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------------------------
# index.html


def _format(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _cell(text: Any, sort: Any = None, attrs: str = "") -> str:
    sort_attr = "" if sort is None else f' data-sort="{html.escape(str(sort), quote=True)}"'
    return f"<td{sort_attr}{attrs}>{html.escape(_format(text))}</td>"


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _thumbnail_uri(summary: RunSummary) -> str | None:
    """The run's thumbnail as a data URI: ``thumbnail.png`` when present, else made in memory from its pictures."""
    try:
        if summary.thumbnail is not None:
            return _data_uri(summary.thumbnail.read_bytes())
        source = thumbnail_source(summary.folder)
        return _data_uri(thumbnail_png(source)) if source is not None else None
    except Exception:  # an unreadable picture must not stop the gallery
        return None


def _link(target: Path, root: Path) -> str:
    relative = os.path.relpath(target.resolve(), root.resolve())
    return "/".join(quote(part) for part in Path(relative).parts)


_INDEX_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.5em; color: #1f2328; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border-bottom: 1px solid #d0d7de; padding: 0.35em 0.6em; text-align: left; vertical-align: middle; }
th { cursor: pointer; background: #f6f8fa; user-select: none; position: sticky; top: 0; }
th.asc::after { content: " \\25B2"; } th.desc::after { content: " \\25BC"; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.status { font-weight: 600; }
img { max-width: 160px; max-height: 120px; display: block; }
tr:hover td { background: #f6f8fa; }
"""

_INDEX_SCRIPT = """
(function () {
  function key(cell) {
    var text = cell.hasAttribute("data-sort") ? cell.getAttribute("data-sort") : cell.textContent.trim();
    var number = parseFloat(text);
    return (text !== "" && !isNaN(number) && isFinite(text)) ? number : text.toLowerCase();
  }
  document.querySelectorAll("table.runs th").forEach(function (th, column) {
    th.addEventListener("click", function () {
      var body = th.closest("table").tBodies[0];
      var ascending = !th.classList.contains("asc");
      th.parentNode.querySelectorAll("th").forEach(function (h) { h.classList.remove("asc", "desc"); });
      th.classList.add(ascending ? "asc" : "desc");
      var rows = Array.prototype.slice.call(body.rows);
      rows.sort(function (a, b) {
        var x = key(a.cells[column]), y = key(b.cells[column]);
        var order = (typeof x === typeof y) ? (x < y ? -1 : x > y ? 1 : 0) : (typeof x === "number" ? -1 : 1);
        return ascending ? order : -order;
      });
      rows.forEach(function (row) { body.appendChild(row); });
    });
  });
})();
"""


def index_html(root: str | Path, summaries: list[RunSummary] | None = None) -> str:
    """The gallery page of the runs under ``root`` (newest first); links are relative to ``root``."""
    root = Path(root)
    if summaries is None:
        summaries = [summarize_run(f) for f in find_runs(root)]
    summaries = sorted(summaries, key=lambda s: s.date or "", reverse=True)
    metric_keys: list[str] = []
    for summary in summaries:
        metric_keys += [k for k in summary.metrics if k not in metric_keys]
    head = ["date", "run", "pipeline", "models", "status", "error", "seconds", *metric_keys, "picture"]
    rows = []
    for s in summaries:
        target = s.report or s.folder / "result.json"
        link = f'<a href="{html.escape(_link(target, root), quote=True)}">{html.escape(s.name)}</a>'
        colour = STATUS_COLOURS.get(s.status, "#57606a")
        title = f' title="{html.escape(s.error_message, quote=True)}"' if s.error_message else ""
        uri = _thumbnail_uri(s)
        picture = f'<img src="{uri}" alt="{html.escape(s.name, quote=True)}">' if uri else "–"
        cells = [
            _cell((s.date or "").replace("T", " "), sort=s.date or ""),
            f'<td data-sort="{html.escape(s.name, quote=True)}">{link}</td>',
            _cell(s.pipeline or ""),
            _cell(", ".join(s.models)),
            _cell(s.status, attrs=f' class="status" style="color: {colour}"'),
            _cell(s.error_code or "", attrs=title),
            _cell(s.seconds, sort="" if s.seconds is None else s.seconds, attrs=' class="num"'),
        ]
        for key in metric_keys:
            value = s.metrics.get(key)
            cells.append(_cell(value, sort="" if value is None else value, attrs=' class="num"'))
        cells.append(f'<td data-sort="">{picture}</td>')
        rows.append("<tr>" + "".join(cells) + "</tr>")
    header = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    title = f"workbench runs in {root.resolve().name or root.resolve()}"
    empty = "" if rows else "<p>No run folders (with a result.json) found.</p>"
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>{html.escape(title)}</title>\n<style>{_INDEX_STYLE}</style>\n</head>\n<body>\n"
        f"<h1>{html.escape(title)}</h1>\n<p>{len(summaries)} run(s), newest first; click a column to sort, "
        "a run to open its report.</p>\n"
        f"{empty}<table class=\"runs\">\n<thead><tr>{header}</tr></thead>\n<tbody>\n" + "\n".join(rows)
        + f"\n</tbody>\n</table>\n<script>{_INDEX_SCRIPT}</script>\n</body>\n</html>\n"
    )


def write_index(root: str | Path) -> Path:
    """Write ``<root>/index.html`` (atomically): the offline gallery of every run folder under ``root``."""
    root = Path(root)
    if not root.is_dir():
        from workbench.errors import ConfigError

        raise ConfigError(f"{root} is not a folder", "Give the folder that holds the run folders (e.g. outputs/).")
    target = root / "index.html"
    tmp = root / ".index.html.tmp"
    tmp.write_text(index_html(root), encoding="utf-8")
    os.replace(tmp, target)
    return target
