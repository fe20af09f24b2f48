"""The run gallery (workbench.ui.gallery), the report header and thumbnail, `workbench report --index`."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import nbformat
import pytest

from workbench.cli import main
from workbench.notebook import build_report, execute_notebook, notebooks_dir
from workbench.schemas import RESULT_SCHEMA
from workbench.ui.gallery import (
    KEY_METRICS,
    find_runs,
    key_metrics,
    metrics_side_by_side,
    runs_table,
    summarize_run,
    thumbnail_source,
    write_index,
    write_thumbnail,
)

EVIL = '<script>alert("x")</script> & co'

KNEE_METRICS = {
    "load_input": {"shape": [64, 128, 128], "spacing_mm": [1.5, 1.0, 1.0], "n_echoes": 4},
    "segmentation": {"volumes_mm3": {"femur": 1000.0}, "dice": {"femur": 0.98, "fem_cart": 0.90, "pat_cart": None}},
    "subregions": {"side": "right"},
    "meshes": {"ant_fem_cart_mm_mean": 2.0, "med_wb_fem_cart_mm_mean": 2.5, "lat_wb_fem_cart_mm_mean": 2.0,
               "med_post_fem_cart_mm_mean": 1.5, "lat_post_fem_cart_mm_mean": 2.0, "med_tib_cart_mm_mean": 3.0},
    "t2": {"fem_cart_t2_ms_median": 41.5, "ant_fem_cart_t2_ms_median": 40.0, "t2_method": "nonlinear"},
    "nsm_bone_only": {"assd_bone_mm": 0.9, "assd_cartilage_mm": None, "Bscore": 0.1},
    "nsm_bone_and_cart": {"assd_bone_mm": 0.7, "assd_cartilage_mm": 0.5, "Bscore": 0.2},
}
RECON_METRICS = {
    "load_input": {"n_train": 16, "n_test": 4},
    "nvdiffrec": {"triangles": 4208, "vertices": 2106, "seconds_pass1": 22.2, "seconds_pass2": 0.3},
    "evaluate_nvdiffrec": {"psnr": 38.5, "ssim": 0.98, "chamfer_l1": 0.004, "fscore_0.5": 0.97, "fscore_1": 0.996,
                           "normal_consistency": 0.99, "genus": 0},
}


def result_doc(pipeline: str, status: str = "ok", metrics: dict | None = None, started: str = "2026-01-01T10:00:00+00:00",
               error: dict | None = None, steps: list | None = None, models: list | None = None) -> dict:
    """A result.json document as the runner writes it."""
    models = models or (["nnunet_fullres"] if pipeline == "knee" else ["nvdiffrec"])
    if steps is None:
        steps = [{"name": name, "status": "ok", "model": None, "seconds": 1.5, "peak_rss_mb": 321.0,
                  "peak_gpu_mb": None, "gpu_after_mb": None, "error": None} for name in (metrics or {})]
    doc = {"schema_version": 1, "status": status, "pipeline": pipeline, "models": models,
           "parameters": {"input": "/data/scan.nii.gz", "device": "cpu", "overrides": {"nnunet.folds": [0, 1]}},
           "error": error, "steps": steps, "outputs": [], "metrics": metrics or {},
           "versions": {"workbench": "0.1.0", "python": "3.11.7", "torch": "2.4.0", "cuda": None,
                        "git_commit": "abc123"},
           "device": "cpu", "started": started, "ended": started, "seconds": 12.5}
    jsonschema.validate(doc, RESULT_SCHEMA)
    return doc


def write_run(folder: Path, doc: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "result.json").write_text(json.dumps(doc))
    return folder


def png(path: Path, size=(40, 20), colour=(200, 30, 30)) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


FAILED_ERROR = {"code": "INVALID_FORMAT", "message": f"{EVIL} holds a 2-D image\nsecond line",
                "hint": "Pass one 3-D volume.", "step": "load_input"}
FAILED_STEPS = [{"name": "load_input", "status": "failed", "model": None, "seconds": 0.6, "peak_rss_mb": 99.0,
                 "peak_gpu_mb": None, "gpu_after_mb": None, "error": FAILED_ERROR}]


@pytest.fixture
def root(tmp_path) -> Path:
    """Four runs at depths 1-3 (knee ok, recon ok, knee failed, recon timeout), plus folders to be skipped."""
    root = tmp_path / "outputs"
    knee = write_run(root / "20260101-knee-aaa", result_doc("knee", metrics=KNEE_METRICS,
                                                            started="2026-01-01T10:00:00+00:00"))
    png(knee / "case_thickness.png", size=(640, 200))
    png(knee / "case_preview.png")
    (knee / "report.html").write_text("<html></html>")
    recon = write_run(root / "20260102-recon-bbb", result_doc("recon", metrics=RECON_METRICS,
                                                              started="2026-01-02T10:00:00+00:00"))
    png(recon / "nvdiffrec" / "preview_pass1.png", size=(100, 50))
    png(recon / "input_views.png")
    (recon / "report.html").write_text("<html></html>")
    write_run(root / "batch" / "week 1" / "failed-run", result_doc(
        "knee", status="failed", error=FAILED_ERROR, steps=FAILED_STEPS, started="2026-01-03T10:00:00+00:00"))
    write_run(root / "timeout-run", result_doc("recon", status="timeout", started="2025-12-31T10:00:00+00:00",
                                               error={"code": "TIMEOUT", "message": "nvdiffrec ran past 10 s",
                                                      "hint": "Raise --timeout.", "step": "nvdiffrec"}))
    write_run(root / ".hidden" / "run", result_doc("knee"))
    write_run(root / "a" / "b" / "c" / "too-deep", result_doc("knee"))
    return root


def test_find_runs_depth_and_hidden(root, tmp_path):
    names = [p.name for p in find_runs(root)]
    assert sorted(names) == ["20260101-knee-aaa", "20260102-recon-bbb", "failed-run", "timeout-run"]
    assert find_runs(tmp_path / "absent") == []


def test_key_metrics_knee():
    metrics = key_metrics(result_doc("knee", metrics=KNEE_METRICS))
    assert list(metrics) == list(KEY_METRICS["knee"])
    assert metrics["dice_mean"] == pytest.approx(0.94)  # labels without a score are left out
    assert metrics["fem_cart_thickness_mm"] == pytest.approx(2.0)  # mean of the five femoral subregions
    assert metrics["fem_cart_t2_ms"] == 41.5
    assert metrics["nsm_assd_bone_mm"] == 0.7  # the last shape-model fit
    # without subregions, the whole femoral cartilage's mean; no T2, no shape model, no ground truth
    plain = key_metrics(result_doc("knee", metrics={"meshes": {"fem_cart_mm_mean": 2.4}}))
    assert plain == {"dice_mean": None, "fem_cart_thickness_mm": 2.4, "fem_cart_t2_ms": None,
                     "nsm_assd_bone_mm": None}


def test_key_metrics_recon_and_failed():
    assert key_metrics(result_doc("recon", metrics=RECON_METRICS)) == {"psnr": 38.5, "fscore_1": 0.996,
                                                                        "chamfer_l1": 0.004}
    failed = key_metrics(result_doc("knee", status="failed", error=FAILED_ERROR, steps=FAILED_STEPS))
    assert set(failed) == set(KEY_METRICS["knee"]) and all(v is None for v in failed.values())
    assert all(v is None for v in key_metrics(result_doc("recon", status="failed")).values())


def test_summarize_run(root):
    ok = summarize_run(root / "20260101-knee-aaa")
    assert (ok.name, ok.pipeline, ok.models, ok.status, ok.error_code) == (
        "20260101-knee-aaa", "knee", ["nnunet_fullres"], "ok", None)
    assert ok.date == "2026-01-01T10:00:00+00:00" and ok.seconds == 12.5
    assert ok.report == root / "20260101-knee-aaa" / "report.html" and ok.thumbnail is None
    failed = summarize_run(root / "batch" / "week 1" / "failed-run")
    assert failed.status == "failed" and failed.error_code == "INVALID_FORMAT"
    assert failed.error_message == f"{EVIL} holds a 2-D image"  # one line
    assert failed.report is None


def test_runs_table_columns(root):
    df = runs_table(root)
    assert len(df) == 4
    assert list(df.columns[:7]) == ["run", "started", "pipeline", "models", "status", "error_code", "seconds"]
    assert list(df.columns[7:14]) == [*KEY_METRICS["knee"], *KEY_METRICS["recon"]]
    assert df.columns[-1] == "folder"
    for column in ("meshes.ant_fem_cart_mm_mean", "t2.fem_cart_t2_ms_median", "nsm_bone_and_cart.assd_bone_mm",
                   "evaluate_nvdiffrec.psnr", "nvdiffrec.triangles", "load_input.n_echoes"):
        assert column in df.columns, column
    # not flat numbers: nested dicts, lists, strings, None
    for column in ("segmentation.dice", "load_input.shape", "subregions.side", "t2.t2_method",
                   "nsm_bone_only.assd_cartilage_mm"):
        assert column not in df.columns, column
    knee = df.set_index("run").loc["20260101-knee-aaa"]
    assert knee["dice_mean"] == pytest.approx(0.94) and knee["models"] == "nnunet_fullres"
    # a list of folders works too, in the order given
    subset = runs_table([root / "20260102-recon-bbb", root / "timeout-run"])
    assert list(subset["run"]) == ["20260102-recon-bbb", "timeout-run"]
    assert list(subset["status"]) == ["ok", "timeout"] and "dice_mean" not in subset.columns


def test_thumbnail_choice_and_size(root, tmp_path):
    knee, recon = root / "20260101-knee-aaa", root / "20260102-recon-bbb"
    assert thumbnail_source(knee).name == "case_thickness.png"
    assert thumbnail_source(recon) == recon / "nvdiffrec" / "preview_pass1.png"
    png(recon / "nvdiffrec" / "preview_pass2.png")
    assert thumbnail_source(recon) == recon / "nvdiffrec" / "preview_pass2.png"
    (knee / "case_thickness.png").unlink()
    assert thumbnail_source(knee).name == "case_preview.png"
    assert thumbnail_source(root / "timeout-run") is None
    assert write_thumbnail(root / "timeout-run") is None
    png(root / "timeout-run" / "input_views.png")
    assert thumbnail_source(root / "timeout-run").name == "input_views.png"
    other = tmp_path / "other"
    png(other / "thumbnail.png")
    assert thumbnail_source(other) is None  # never its own thumbnail
    png(other / "b.png")
    png(other / "a.png")
    assert thumbnail_source(other).name == "a.png"

    from PIL import Image

    png(knee / "case_thickness.png", size=(1000, 400))
    path = write_thumbnail(knee)
    assert path == knee / "thumbnail.png"
    assert Image.open(path).size == (320, 128)
    assert Image.open(write_thumbnail(recon)).size == (40, 20)  # never scaled up
    assert summarize_run(knee).thumbnail == path


def test_write_index(root):
    write_thumbnail(root / "20260101-knee-aaa")
    path = write_index(root)
    assert path == root / "index.html" and not list(root.glob(".index*"))
    page = path.read_text()
    # every text escaped: the error message and code appear only escaped
    assert EVIL not in page and "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; co" in page
    # offline: nothing fetched, sorting in a few lines of inline script
    assert "http://" not in page and "https://" not in page and "<script src" not in page
    assert "<link" not in page and page.count("<script>") == 1 and "addEventListener" in page
    # newest first, each run links to its report or to its result.json
    links = re.findall(r'<a href="([^"]+)">', page)
    assert links == ["batch/week%201/failed-run/result.json", "20260102-recon-bbb/report.html",
                     "20260101-knee-aaa/report.html", "timeout-run/result.json"]
    for link in links:
        assert (root / link.replace("%20", " ")).is_file()
    # thumbnails embedded (the recon one made in memory), none for runs without a picture
    assert page.count('src="data:image/png;base64,') == 2
    assert not (root / "20260102-recon-bbb" / "thumbnail.png").exists()
    # status colours, key metrics, error codes
    assert 'style="color: #1a7f37">ok<' in page and 'style="color: #cf222e">failed<' in page
    assert 'style="color: #b7791f">timeout<' in page
    assert ">0.94<" in page and ">38.5<" in page and ">INVALID_FORMAT<" in page and ">TIMEOUT<" in page
    for header in ("date", "pipeline", "models", "status", "error", "dice_mean", "psnr", "fscore_1"):
        assert f"<th>{header}</th>" in page


def test_metrics_side_by_side(root):
    import matplotlib.pyplot as plt

    df = runs_table(root)
    fig = metrics_side_by_side(df)
    titles = [ax.get_title() for ax in fig.axes if ax.get_visible()]
    assert titles == ["dice_mean", "fem_cart_thickness_mm", "fem_cart_t2_ms", "nsm_assd_bone_mm", "psnr",
                      "fscore_1", "chamfer_l1"]
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == list(df["run"])
    plt.close(fig)
    fig = metrics_side_by_side(df, ["psnr"])
    assert len(fig.axes) == 1
    plt.close(fig)
    assert metrics_side_by_side(runs_table([root / "timeout-run"])) is None


def _tiny_run(folder: Path, doc: dict | None) -> Path:
    folder.mkdir(parents=True)
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# The notebook's own title")])
    nbformat.write(nb, str(folder / "report.ipynb"))
    if doc is not None:
        (folder / "result.json").write_text(json.dumps(doc))
    return folder


def test_report_header_for_a_failed_run(tmp_path):
    doc = result_doc("knee", status="failed", error=FAILED_ERROR, steps=[
        {"name": "load_input", "status": "ok", "model": None, "seconds": 2.25, "peak_rss_mb": 456.0,
         "peak_gpu_mb": None, "gpu_after_mb": None, "error": None},
        {"name": "segmentation", "status": "failed", "model": "nnunet_fullres", "seconds": 7.5, "peak_rss_mb": 1234.0,
         "peak_gpu_mb": None, "gpu_after_mb": None, "error": FAILED_ERROR}])
    run = _tiny_run(tmp_path / "run", doc)
    png(run / "case_preview.png", size=(400, 100))
    page = build_report(run).read_text()
    header = page.index("workbench-report-header")
    assert header < page.index("own title")
    for text in ("failed", "#cf222e", "knee", "nnunet_fullres", "2026-01-01T10:00:00+00:00", "12.5", "cpu",
                 "INVALID_FORMAT", "Pass one 3-D volume.", "load_input", "segmentation", "1234", "7.5",
                 "/data/scan.nii.gz", "nnunet.folds", "abc123", "3.11.7", "peak RSS"):
        assert text in page, text
    assert EVIL not in page and "&lt;script&gt;" in page and "second line" not in page.split("<h3>Steps")[0]
    # only the exported copy has the header
    assert len(nbformat.read(str(run / "report.ipynb"), as_version=4).cells) == 1
    # the thumbnail beside the report
    from PIL import Image

    assert Image.open(run / "thumbnail.png").size == (320, 80)
    # rebuilt: one header, not two
    assert build_report(run).read_text().count('class="workbench-report-header"') == 1


def test_report_without_result_json(tmp_path):
    run = _tiny_run(tmp_path / "run", None)
    page = build_report(run).read_text()
    assert "workbench-report-header" not in page and "own title" in page
    assert not (run / "thumbnail.png").exists()


def test_cli_report_index(root, capsys):
    assert main(["report", "--index", str(root)]) == 0
    assert capsys.readouterr().out.strip() == str(root / "index.html")
    assert (root / "index.html").is_file()
    assert main(["report"]) == 2
    err = capsys.readouterr().err
    assert "--index" in err and "hint:" in err
    assert main(["report", "--index", str(root / "absent")]) == 2
    # a run folder still works, and both at once
    run = _tiny_run(root / "new-run", result_doc("knee"))
    assert main(["report", str(run), "--index", str(root)]) == 0
    out = capsys.readouterr().out.split()
    assert out == [str(run / "report.html"), str(root / "index.html")]
    assert "new-run/report.html" in (root / "index.html").read_text()


@pytest.mark.slow
def test_compare_runs_notebook_headless(root, tmp_path):
    out = tmp_path / "compare.ipynb"
    runs = [str(root / "20260101-knee-aaa"), str(root / "20260102-recon-bbb"), str(root / "batch/week 1/failed-run")]
    execute_notebook(notebooks_dir() / "compare_runs.ipynb", out, {"runs": runs, "interactive": False},
                     cwd=tmp_path, timeout_s=300)
    nb = nbformat.read(str(out), as_version=4)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    tables = "".join(o.get("data", {}).get("text/html", "") for o in outputs)
    assert "20260101-knee-aaa" in tables and "failed-run" in tables and "dice_mean" in tables
    assert "evaluate_nvdiffrec.psnr" in tables
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 1  # the bar charts, once
    # the default: every run under root
    execute_notebook(notebooks_dir() / "compare_runs.ipynb", out, {"root": str(root), "interactive": False},
                     cwd=tmp_path, timeout_s=300)
    nb = nbformat.read(str(out), as_version=4)
    assert "4 run(s)" in "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
