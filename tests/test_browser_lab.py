"""JupyterLab in a real browser: open the quickstart, run it, start a run from the launcher, watch it end.

A JupyterLab server on loopback with a token, its root a temporary folder
holding a copy of ``notebooks/quickstart.ipynb``; Debian's chromium, headless,
through Playwright, with every request off the server's origin blocked.
Screenshots go to the browser tests' artefacts folder (``tests/browser.py``).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from browser import canvas_not_blank, offline_browser, screenshot, skip_reason, wait_for

from workbench.notebook import notebooks_dir
from workbench.ui.launcher import kill_process_tree

pytestmark = [pytest.mark.browser, pytest.mark.slow,
              pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or "")]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def lab(tmp_path):
    """A JupyterLab server on 127.0.0.1 with a token, rooted in a temporary folder."""
    root = tmp_path / "lab"
    root.mkdir()
    shutil.copy(notebooks_dir() / "quickstart.ipynb", root / "quickstart.ipynb")
    port, token = _free_port(), secrets.token_hex(16)
    jupyter_home = tmp_path / "jupyter"
    env = dict(os.environ, WORKBENCH_OUTPUTS=str(root / "outputs"), WORKBENCH_NOTEBOOKS=str(notebooks_dir()),
               JUPYTER_CONFIG_DIR=str(jupyter_home / "config"), JUPYTER_RUNTIME_DIR=str(jupyter_home / "runtime"),
               JUPYTERLAB_WORKSPACES_DIR=str(jupyter_home / "workspaces"), MPLBACKEND="")
    env.pop("MPLBACKEND")
    log = open(tmp_path / "jupyterlab.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}", "--ServerApp.port_retries=0",
         "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
         "--LabApp.extension_manager=readonly", *(["--allow-root"] if os.geteuid() == 0 else [])],
        cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2) as reply:
            return reply.status == 200

    try:
        wait_for(up, timeout=90, interval=0.5, message="JupyterLab to answer")
        yield {"base": base, "token": token, "root": root, "log": tmp_path / "jupyterlab.log"}
    finally:
        kill_process_tree(server.pid, grace_s=5)
        log.close()


def _run_all_cells(page) -> None:
    page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
    page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()


def test_quickstart_launcher_runs_the_sample_in_jupyterlab(lab):
    base, token, root = lab["base"], lab["token"], lab["root"]
    with offline_browser(allow=[base], viewport=(1400, 1000)) as browser:
        page = browser.new_page()
        try:
            _drive(page, browser, base, token)
        except BaseException:
            screenshot(page, "lab-failure")
            errors = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']")
            print("notebook errors:", errors.all_inner_texts()[-3:], "\nlog:", lab["log"].read_text()[-3000:])
            raise

    runs = [p for p in (root / "outputs").iterdir() if (p / "result.json").is_file() and "-knee-" in p.name]
    assert len(runs) == 1
    result = json.loads((runs[0] / "result.json").read_text())
    assert result["status"] == "ok" and (runs[0] / "report.html").is_file()


def _drive(page, browser, base: str, token: str) -> None:
    """Open the quickstart, run all cells, start the launcher's run and wait for its results."""
    page.goto(f"{base}/lab/tree/quickstart.ipynb?token={token}", timeout=90_000)
    page.locator(".jp-NotebookPanel").first.wait_for(timeout=90_000)
    dialog = page.locator(".jp-Dialog")  # "Select Kernel" when the notebook has no session yet
    try:
        dialog.locator("button.jp-mod-accept").first.click(timeout=15_000)
    except Exception:  # noqa: BLE001 - no dialog: the kernel was started directly
        pass
    wait_for(lambda: "Idle" in page.locator("#jp-main-statusbar").inner_text(timeout=2_000), timeout=90,
             message="the kernel to be idle")
    _run_all_cells(page)

    # the sample is written and shown, then the launcher appears with the sample's path checked
    launcher = page.locator(".wb-launcher").first
    launcher.wait_for(timeout=150_000)
    wait_for(lambda: "DICOM folder" in page.locator(".wb-input-message").first.inner_text(), timeout=60,
             message="the input check")
    launcher.scroll_into_view_if_needed()
    screenshot(page, "lab-1-launcher", full_page=False)
    assert page.locator("button.wb-run").first.is_enabled()

    page.locator("button.wb-run").first.click()
    page.locator(".wb-overall").first.wait_for(timeout=60_000)
    wait_for(lambda: page.locator(".wb-step").count() >= 2, timeout=240, message="two steps to show")
    headline = page.locator(".wb-headline").first.inner_text()
    assert "overall" in headline and "elapsed" in headline
    screenshot(page, "lab-2-progress", full_page=False)

    # the run ends and the results view appears under the launcher
    page.locator(".wb-launcher.wb-done").first.wait_for(timeout=900_000)
    results = page.locator(".wb-results").first
    results.wait_for(timeout=60_000)
    results.scroll_into_view_if_needed()
    assert "status: ok" in results.inner_text()
    assert "100%" in page.locator(".wb-overall").first.inner_text() or \
        page.locator(".wb-headline").first.inner_text().startswith("run ok")
    viewer = results.locator(".wb-slice-viewer").first
    viewer.wait_for(timeout=60_000)
    viewer.locator("img").first.wait_for(timeout=30_000)
    wait_for(lambda: results.locator("canvas").count() > 0, timeout=60, message="the k3d view")
    time.sleep(3)  # let WebGL draw
    screenshot(page, "lab-3-results", full_page=False)
    assert canvas_not_blank(results, "canvas", name="lab-4-k3d")
    link = results.locator("a", has_text="open the HTML report").first
    href = link.evaluate("a => a.href")  # JupyterLab opens a relative link to a file inside Lab
    assert href.startswith(f"{base}/lab/tree/outputs/") and href.endswith("/report.html")
    reply = page.context.request.get(href.replace("/lab/tree/", "/files/", 1) + f"?token={token}")
    assert reply.status == 200 and "status:" in reply.text() and "<script src=" not in reply.text()

    blocked = [u for u in browser.blocked + page.blocked if not u.startswith(base)]
    assert not page.page_errors, page.page_errors
    print("requests blocked (would have left the machine):", blocked)

