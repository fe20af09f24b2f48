"""The results panel of a run folder: what the launcher shows when a run ends, usable from any notebook.

:func:`panel_sections` says which sections a run folder has (pure, from file
names); :func:`results_panel` builds the ipywidgets panel.  Everything missing
is skipped and a file that cannot be read becomes a one-line note, so a failed
run still shows its summary and error.
"""

from __future__ import annotations

import html
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["panel_sections", "results_panel"]

KNEE_BONES = ("femur", "tibia", "patella")
RECON_PREVIEWS = ("preview_pass1.png", "preview_pass2.png")


def _read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from ``path``, or None when the file is missing or unreadable."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return document if isinstance(document, dict) else None


def _case(run_dir: Path) -> str | None:
    """The case name of a knee run (``input.json``'s ``case``)."""
    info = _read_json(run_dir / "input.json") or {}
    case = info.get("case")
    return str(case) if case else None


def _report_href(run_dir: Path, report_href: str | None) -> str | None:
    if report_href is not None:
        return report_href
    report = run_dir / "report.html"
    if not report.is_file():
        return None
    return Path(os.path.relpath(report.resolve(), Path.cwd().resolve())).as_posix()


def _models(result: dict[str, Any]) -> list[str]:
    models = result.get("models") or []
    return [str(m) for m in models if isinstance(m, str) and m and "/" not in m and m not in (".", "..")]


def panel_sections(run_dir: str | os.PathLike, *, report_href: str | None = None) -> list[str]:
    """The sections :func:`results_panel` shows for ``run_dir``, in order (from file names only).

    ``"summary"`` always; ``"report"`` with a report; a knee run adds ``"slices"``
    (image, with labels when present), ``"meshes"`` (bone meshes), ``"results"`` and
    ``"segmentation"`` (their JSON files); a reconstruction run adds ``"inputs"``
    (``input_views.png``) and, per model folder, ``"mesh:<model>"``,
    ``"previews:<model>"`` and ``"metrics:<model>"``.
    """
    run_dir = Path(run_dir)
    sections = ["summary"]
    if _report_href(run_dir, report_href) is not None:
        sections.append("report")
    result = _read_json(run_dir / "result.json") or {}
    pipeline = result.get("pipeline")
    if pipeline == "knee":
        case = _case(run_dir)
        if case and (run_dir / f"{case}_image.nii.gz").is_file():
            sections.append("slices")
        if any((run_dir / f"{bone}_mesh.vtk").is_file() for bone in KNEE_BONES):
            sections.append("meshes")
        if case and (run_dir / f"{case}_results.json").is_file():
            sections.append("results")
        if case and (run_dir / f"{case}_segmentation.json").is_file():
            sections.append("segmentation")
    elif pipeline == "recon":
        if (run_dir / "input_views.png").is_file():
            sections.append("inputs")
        for model in _models(result):
            folder = run_dir / model
            if (folder / "mesh.ply").is_file():
                sections.append(f"mesh:{model}")
            if any((folder / name).is_file() for name in RECON_PREVIEWS):
                sections.append(f"previews:{model}")
            if (folder / "metrics.json").is_file():
                sections.append(f"metrics:{model}")
    return sections


# --------------------------------------------------------------------------------------------------------------
# section builders: each returns a list of widgets


def _heading(text: str):
    import ipywidgets as widgets

    return widgets.HTML(f"<h3 class='wb-results-heading'>{html.escape(text)}</h3>")


def _note(text: str):
    import ipywidgets as widgets

    return widgets.HTML(f"<p class='wb-results-note'><i>{html.escape(text)}</i></p>")


def _image(path: Path):
    import ipywidgets as widgets

    return widgets.Image(value=path.read_bytes(), format="png", layout=widgets.Layout(max_width="100%"))


def _summary(run_dir: Path, result: dict[str, Any] | None) -> list:
    import ipywidgets as widgets

    from workbench.display import summary_html

    if result is None:
        return [_note(f"no readable result.json in {run_dir}")]
    return [widgets.HTML(summary_html(result))]


def _report(href: str) -> list:
    import ipywidgets as widgets

    return [widgets.HTML(f'<a href="{html.escape(href)}" target="_blank" '
                         f'style="color:#1565c0;text-decoration:underline">open the HTML report</a> '
                         f'<span style="color:#666">({html.escape(href)})</span>')]


def _mesh_widget(layers, colour_range=(0.0, 4.0)):
    """A k3d plot of ``layers`` (a widget itself)."""
    import ipywidgets as widgets

    from workbench.viewer3d import mesh_plot

    plot = mesh_plot(layers, colour_range=colour_range)
    if isinstance(plot, widgets.Widget):
        return plot
    out = widgets.Output()
    with out:
        from IPython.display import display

        display(plot)
    return out


def _knee_slices(run_dir: Path, case: str) -> list:
    from workbench.ui.viewers import SliceViewer

    labels = run_dir / f"{case}_all-labels.nii.gz"
    viewer = SliceViewer.from_files(run_dir / f"{case}_image.nii.gz", labels if labels.is_file() else None,
                                    title=case)
    return [viewer.widget]


def _knee_meshes(run_dir: Path) -> list:
    from workbench.viewer3d import knee_thickness_layers

    return [_mesh_widget(knee_thickness_layers(run_dir), colour_range=(0.0, 4.0))]


def _html_of(render: Callable[[dict[str, Any]], str], path: Path) -> list:
    import ipywidgets as widgets

    document = json.loads(path.read_text(encoding="utf-8"))
    return [widgets.HTML(render(document))]


def _recon_previews(folder: Path) -> list:
    return [_image(folder / name) for name in RECON_PREVIEWS if (folder / name).is_file()]


def _section(title: str, build: Callable[[], list]) -> list:
    """A heading and the widgets ``build`` makes, or a one-line note when it fails."""
    try:
        body = build()
    except Exception as exc:  # noqa: BLE001 - a broken file must not break the panel
        body = [_note(f"could not show {title}: {type(exc).__name__}: {exc}".splitlines()[0][:300])]
    return [_heading(title)] + body


def results_panel(run_dir: str | os.PathLike, *, report_href: str | None = None):
    """The results of a run folder as an ipywidgets ``VBox`` (CSS class ``wb-results``).

    Shows the summary (status, error with hint, steps), a link to the HTML report
    (``report_href``, else ``report.html`` relative to the current folder when it
    exists) and, per pipeline: for a knee run a slice viewer of the image and its
    labels, the bone meshes coloured by cartilage thickness (k3d), the results and
    segmentation tables; for a reconstruction run the input views and, per model,
    the mesh (k3d), the training previews and the metrics.  Sections follow
    :func:`panel_sections`; a file that cannot be read becomes a one-line note.
    """
    import ipywidgets as widgets

    from workbench.display import recon_metrics_html, results_html, segmentation_html
    from workbench.viewer3d import recon_layers

    run_dir = Path(run_dir)
    result = _read_json(run_dir / "result.json")
    href = _report_href(run_dir, report_href)
    case = _case(run_dir)
    children: list = []
    for name in panel_sections(run_dir, report_href=report_href):
        kind, _, model = name.partition(":")
        folder = run_dir / model if model else run_dir
        if kind == "summary":
            children += _section("summary", lambda: _summary(run_dir, result))
        elif kind == "report":
            children += _report(href) if href else []
        elif kind == "slices":
            children += _section("slices", lambda: _knee_slices(run_dir, case))
        elif kind == "meshes":
            children += _section("cartilage thickness (mm) on the bones", lambda: _knee_meshes(run_dir))
        elif kind == "results":
            children += _section("results", lambda: _html_of(results_html, run_dir / f"{case}_results.json"))
        elif kind == "segmentation":
            children += _section("segmentation",
                                 lambda: _html_of(segmentation_html, run_dir / f"{case}_segmentation.json"))
        elif kind == "inputs":
            children += _section("input views", lambda: [_image(run_dir / "input_views.png")])
        elif kind == "mesh":
            children += _section(f"{model}: mesh", lambda f=folder: [_mesh_widget(recon_layers(f))])
        elif kind == "previews":
            children += _section(f"{model}: training previews", lambda f=folder: _recon_previews(f))
        elif kind == "metrics":
            children += _section(f"{model}: metrics",
                                 lambda f=folder: _html_of(recon_metrics_html, f / "metrics.json"))
    panel = widgets.VBox(children)
    panel.add_class("wb-results")
    return panel
