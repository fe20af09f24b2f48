"""Run folders made by the real CLI, opened from disk in headless chromium with the network blocked.

Three runs (about a minute on two cores): a small reconstruction of a sphere, a knee run on
the synthetic sample (shipped segmentation) and a knee run that fails on a 4-D NIfTI.  Then,
in the browser: each report.html, the standalone 3-D views (``<name>_3d.html``) the reports
link to, and the gallery ``workbench report --index`` writes.  Screenshots go to the
artefacts folder (tests/browser.py: ``$WORKBENCH_TEST_ARTIFACTS`` or
``outputs/test-artifacts/browser/``).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from browser import canvas_not_blank, offline_browser, screenshot, skip_reason, wait_for

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or ""),
]

# The smallest reconstruction that still gives a mesh, previews and test-view metrics (about 20 s on 2 cores).
RECON_SETTINGS = ["nvdiffrec.iter=60", "nvdiffrec.iter_pass2=10", "nvdiffrec.dmtet_grid=16",
                  "nvdiffrec.train_res=[64,64]", "nvdiffrec.texture_res=[64,64]", "evaluate.sample_points=20000"]


def _cli(*args: str, cwd: Path, ok: bool = True) -> subprocess.CompletedProcess:
    """``workbench ARGS`` in a child process (as a user runs it); ``ok``: exit code 0 is required."""
    env = dict(os.environ, MPLBACKEND="Agg", WORKBENCH_OUTPUTS=str(cwd / "outputs"))
    proc = subprocess.run([sys.executable, "-m", "workbench.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    if ok:
        assert proc.returncode == 0, f"workbench {' '.join(args)}: exit {proc.returncode}\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Three run folders under one root: ``recon`` (ok), ``knee`` (ok) and ``failed`` (knee on a 4-D NIfTI)."""
    import nibabel as nib
    import numpy as np

    work = tmp_path_factory.mktemp("browser-runs")
    data, root = work / "data", work / "runs"
    root.mkdir()

    _cli("data", "sample", "recon", "--shape", "sphere", "--views", "16", "--test-views", "4", "--res", "64",
         "--out", str(data / "sphere"), cwd=work)
    _cli("run", "recon", "--images", str(data / "sphere"), "--out", str(root / "recon-sphere"), "--device", "cpu",
         *[a for kv in RECON_SETTINGS for a in ("--set", kv)], cwd=work)

    _cli("data", "sample", "knee", "--out", str(data / "knee"), "--seed", "3", cwd=work)
    _cli("run", "knee", "--input", str(data / "knee" / "knee_sample_dicom"), "--ground-truth",
         str(data / "knee" / "knee_sample_labels.nii.gz"), "--out", str(root / "knee-sample"), "--device", "cpu",
         cwd=work)

    four_d = data / "four_d.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8, 3), np.float32), np.eye(4)), str(four_d))
    failed = _cli("run", "knee", "--input", str(four_d), "--out", str(root / "knee-4d-failed"), "--device", "cpu",
                  cwd=work, ok=False)
    assert failed.returncode == 3, failed.stderr[-3000:]

    return {"root": root, "recon": root / "recon-sphere", "knee": root / "knee-sample",
            "failed": root / "knee-4d-failed"}


@pytest.fixture(scope="module")
def browser():
    with offline_browser(viewport=(1200, 900)) as b:
        yield b


@pytest.fixture
def page(browser):
    guarded = browser.new_page()
    yield guarded
    guarded.close()


def _text(page) -> str:
    """The page's visible text with runs of white space as one space."""
    return " ".join(page.inner_text("body").split())


def _local_links(page, selector: str = "a[href]") -> list[str]:
    """Absolute ``file:`` URLs of the links at ``selector`` (fragments dropped, in-page anchors left out)."""
    hrefs = page.eval_on_selector_all(selector, "els => els.map(e => e.href)")
    links = []
    for href in hrefs:
        if href.startswith("file:"):
            url = href.split("#", 1)[0]
            if url != page.url.split("#", 1)[0]:
                links.append(url)
    return links


def _path(url: str) -> Path:
    return Path(unquote(urlsplit(url).path))


def _assert_offline_and_clean(page, what: str) -> None:
    problems = page.problems()
    assert problems == [], f"{what}:\n" + "\n".join(problems)
    remote = [u for u in page.requests if not u.startswith(("file:", "data:", "blob:", "about:"))]
    assert remote == [], f"{what} made requests: {remote}"


# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["recon", "knee", "failed"])
def test_report_opens_offline(runs, page, name):
    run = runs[name]
    result = json.loads((run / "result.json").read_text())
    page.goto(run / "report.html")
    _assert_offline_and_clean(page, f"{name}/report.html")
    assert page.broken_images() == [], "images that did not load"
    images = page.images()
    text = _text(page)
    screenshot(page, f"report-{name}")

    assert re.search(rf"status:\s*{result['status']}\b", text), text[-2000:]
    assert "Traceback" not in text
    for url in _local_links(page):  # links into the run folder (3-D views, files) point at files that exist
        assert _path(url).is_file(), f"{name}/report.html links to a missing file: {url}"
    if name == "failed":
        assert result["status"] == "failed"
        error = result["error"]
        assert error["code"] == "INVALID_FORMAT"
        assert error["code"] in text
        assert " ".join(error["hint"].split()) in text, "the hint is not shown"
        assert "4-D image" in text
    else:
        assert result["status"] == "ok"
        assert len(images) >= (4 if name == "recon" else 3), images  # input views, previews, loss curves / figures
        assert all(i["naturalWidth"] > 0 for i in images)
    if name == "recon":
        assert "test-view PSNR" in text


def _notebooks_call_view_3d() -> bool:
    return any("view_3d" in p.read_text() for p in (ROOT / "notebooks").glob("*.ipynb"))


def test_3d_views_open_offline(runs, page):
    viewers = pytest.importorskip("workbench.ui.viewers", reason="workbench.ui.viewers is not there yet")
    if not hasattr(viewers, "view_3d"):
        pytest.skip("workbench.ui.viewers.view_3d is not there yet")
    views: list[tuple[str, str]] = []
    for name in ("recon", "knee"):
        page.goto(runs[name] / "report.html")
        views += [(name, url) for url in _local_links(page, 'a[href$="_3d.html"]')]
    if not views:
        if not _notebooks_call_view_3d():
            pytest.skip("no notebook calls workbench.ui.viewers.view_3d yet, so reports link no *_3d.html")
        pytest.fail("the notebooks call view_3d but neither the recon nor the knee report links a *_3d.html")
    page.clear()

    for name, url in dict.fromkeys(views):
        path = _path(url)
        assert path.is_file(), f"{name}/report.html links to a missing 3-D view: {url}"
        assert path.with_name(path.name.removesuffix("_3d.html") + ".png").is_file(), f"no picture beside {path}"
        page.clear()
        page.goto(url)
        page.wait_for_selector("canvas", state="attached", timeout=20_000)
        label = f"3d-{name}-{path.stem}"
        # the object is fitted into the middle of the view; the corners hold the axes helper and k3d's panel
        wait_for(lambda: canvas_not_blank(page, "canvas", centre=0.5), timeout=30, interval=1.0,
                 message=f"{name}/{path.name}: the canvas to show the mesh")
        screenshot(page, label, full_page=False)
        _assert_offline_and_clean(page, f"{name}/{path.name}")


def _row_names(page) -> list[str]:
    return page.eval_on_selector_all("table.runs tbody tr", "rows => rows.map(r => r.cells[1].innerText.trim())")


def _column(page, header: str) -> int:
    headers = page.eval_on_selector_all("table.runs thead th", "ths => ths.map(t => t.innerText.trim())")
    labels = [h.rstrip(" ▲▼") for h in headers]
    assert header in labels, headers
    return labels.index(header)


def test_gallery_index_opens_offline_and_sorts(runs, page):
    pytest.importorskip("workbench.ui.gallery", reason="workbench.ui.gallery (workbench report --index) is not there yet")
    root = runs["root"]
    _cli("report", "--index", str(root), cwd=root.parent)
    index = root / "index.html"
    assert index.is_file()

    page.goto(index)
    _assert_offline_and_clean(page, "index.html")
    screenshot(page, "gallery-index")

    names = _row_names(page)
    assert sorted(names) == sorted(p.name for p in (runs["recon"], runs["knee"], runs["failed"])), names
    for url in _local_links(page, "table.runs tbody a[href]"):
        target = _path(url)
        assert target.name == "report.html" and target.is_file(), f"index.html links to {url}"
    assert len(_local_links(page, "table.runs tbody a[href]")) == 3
    assert page.broken_images() == [], "thumbnails that did not load"
    thumbnails = page.eval_on_selector_all("table.runs tbody img", "imgs => imgs.map(i => i.naturalWidth)")
    assert len(thumbnails) >= 2 and all(w > 0 for w in thumbnails), thumbnails  # the two ok runs have pictures

    text = _text(page)
    assert "failed" in text and "INVALID_FORMAT" in text

    # clicking a header sorts by that column, a second click reverses
    run_header = page.locator("table.runs thead th").nth(_column(page, "run"))
    run_header.click()
    ascending = _row_names(page)
    assert ascending == sorted(names, key=str.lower), ascending
    run_header.click()
    descending = _row_names(page)
    assert descending == ascending[::-1] and descending != ascending

    seconds_col = _column(page, "seconds")
    page.locator("table.runs thead th").nth(seconds_col).click()
    seconds = page.eval_on_selector_all(
        "table.runs tbody tr", f"rows => rows.map(r => parseFloat(r.cells[{seconds_col}].getAttribute('data-sort')))")
    assert seconds == sorted(seconds), seconds
    screenshot(page, "gallery-index-sorted")

    # a row's link opens that run's report, still offline
    page.clear()
    page.locator("table.runs tbody a[href]").first.click()
    page.wait_for_load_state("load")
    assert page.url.endswith("/report.html")
    _assert_offline_and_clean(page, "a report opened from index.html")


def test_network_is_blocked_and_recorded(page, tmp_path):
    # the guard itself: a page that reaches out is caught, so the clean results below mean something
    html = tmp_path / "leaky.html"
    html.write_text('<html><body><img src="https://example.com/x.png">'
                    '<script src="https://cdn.example.org/lib.js"></script>'
                    '<script>console.error("oops"); undefinedFunction();</script></body></html>')
    page.goto(html)
    assert sorted(page.blocked) == ["https://cdn.example.org/lib.js", "https://example.com/x.png"]
    assert len(page.failed) == 2 and page.page_errors and any("oops" in e for e in page.console_errors)
    assert page.broken_images() == ["https://example.com/x.png"]
