"""Helpers for tests that drive a real browser: Debian's chromium, headless, through Playwright (Python).

Not a test module.  Browser tests mark themselves ``@pytest.mark.browser`` and skip with
:func:`skip_reason` when the browser is missing::

    from browser import offline_browser, skip_reason

    pytestmark = [pytest.mark.browser, pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or "")]

    with offline_browser() as browser:
        page = browser.new_page()
        page.goto(run / "report.html")
        assert page.problems() == []
        screenshot(page, "report")

The browser is the system's ``/usr/bin/chromium`` (``make browser`` installs Debian's
``chromium`` and ``chromium-driver``; ``$WORKBENCH_CHROMIUM`` names another binary);
Playwright starts it through ``executable_path``, so ``playwright install`` (a
browser download) is never needed.  Every browser gets a new temporary profile, and
the network is blocked: requests to anything but ``file:``, ``data:``, ``blob:`` and
the origins a test allows (a local server, e.g. ``http://127.0.0.1:8888``) are
aborted and recorded, so a page that would fetch a script or font from a CDN fails
its test.  Screenshots go to ``$WORKBENCH_TEST_ARTIFACTS`` or
``<repo>/outputs/test-artifacts/browser/``.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CHROMIUM = "/usr/bin/chromium"

# Headless without a GPU (WebGL falls back to SwiftShader), and nothing the browser does on its own
# (updates, sync, safe-browsing lists, first-run pages) goes to the network.
CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--disable-quic",
)

LOCAL_SCHEMES = ("file:", "data:", "blob:", "about:")


# --------------------------------------------------------------------------------------------------------------
# finding the browser


def chromium_path() -> str | None:
    """The chromium binary to drive (``$WORKBENCH_CHROMIUM`` or ``/usr/bin/chromium``), or None when absent."""
    path = os.environ.get("WORKBENCH_CHROMIUM") or DEFAULT_CHROMIUM
    found = shutil.which(path)
    return found if found and os.access(found, os.X_OK) else None


def skip_reason() -> str | None:
    """Why browser tests cannot run here (no Playwright, no chromium), or None when they can."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is missing: pip install -e '.[dev]' (make test does)"
    if chromium_path() is None:
        wanted = os.environ.get("WORKBENCH_CHROMIUM") or DEFAULT_CHROMIUM
        return (f"no chromium at {wanted}: run `make browser` as root (apt-get install chromium chromium-driver) "
                "or set WORKBENCH_CHROMIUM")
    return None


def require_browser() -> None:
    """``pytest.skip`` with :func:`skip_reason` when the browser cannot run."""
    import pytest

    reason = skip_reason()
    if reason:
        pytest.skip(reason)


# --------------------------------------------------------------------------------------------------------------
# launching


def _origin(url: str) -> tuple[str, str]:
    """(scheme family, host:port) of a URL; ws/wss count as http/https."""
    parts = urlsplit(url)
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    port = parts.port or {"http": 80, "https": 443}.get(scheme)
    return scheme, f"{(parts.hostname or '').lower()}:{port}"


def is_allowed(url: str, allow: Iterable[str] = ()) -> bool:
    """True for ``file:``, ``data:``, ``blob:``, ``about:`` URLs and URLs on one of the ``allow`` origins."""
    if url.startswith(LOCAL_SCHEMES):
        return True
    origin = _origin(url)
    return any(_origin(a) == origin for a in allow)


def launch(playwright, *, allow: Iterable[str] = (), viewport: tuple[int, int] = (1200, 900),
           args: Iterable[str] = (), **kwargs):
    """A fresh headless chromium as a Playwright ``BrowserContext`` with a new temporary profile.

    Uses ``launch_persistent_context`` so the profile (``--user-data-dir``) is a new empty
    folder, removed when the context closes.  Requests from pages not made through
    :class:`GuardedPage` (popups, workers) to anything but local URLs and ``allow`` are
    aborted and listed in ``context.workbench_blocked``; service workers are blocked.

    Args:
        playwright: the object ``sync_playwright()`` gives.
        allow: origins that may be reached, e.g. ``["http://127.0.0.1:8888"]`` (websockets too).
        viewport: width, height in CSS pixels.
        args: more chromium flags.
        kwargs: passed on to ``launch_persistent_context``.
    """
    executable = chromium_path()
    if executable is None:
        raise RuntimeError(skip_reason() or "chromium not found")
    allow = tuple(allow)
    profile = tempfile.mkdtemp(prefix="workbench-chromium-")
    try:
        context = playwright.chromium.launch_persistent_context(
            profile, executable_path=executable, headless=True, args=[*CHROMIUM_FLAGS, *args],
            viewport={"width": viewport[0], "height": viewport[1]}, service_workers="block", **kwargs)
    except BaseException:
        shutil.rmtree(profile, ignore_errors=True)
        raise
    context.on("close", lambda _ctx: shutil.rmtree(profile, ignore_errors=True))
    blocked: list[str] = []
    context.workbench_blocked = blocked
    context.workbench_allow = allow

    def block(route) -> None:
        blocked.append(route.request.url)
        route.abort("blockedbyclient")

    context.route(lambda url: not is_allowed(url, allow), block)
    if hasattr(context, "route_web_socket"):  # Playwright >= 1.48
        def block_ws(ws) -> None:
            blocked.append(ws.url)
            ws.close()

        context.route_web_socket(lambda url: not is_allowed(url, allow), block_ws)
    return context


class GuardedPage:
    """A page whose network is blocked except local URLs and allowed origins, and what went wrong on it.

    Attributes (lists of strings, in order):
        blocked: URLs of requests that were aborted because they would have left the machine.
        failed: ``"URL (error)"`` of every request that failed (blocked ones included).
        console_errors: ``console.error`` messages and resources the page failed to load.
        page_errors: uncaught exceptions in the page's scripts.
        requests: URLs of every request the page made.

    Any other attribute is the Playwright ``Page``'s (``page.locator``, ``page.evaluate``...).
    """

    def __init__(self, context, *, allow: Iterable[str] | None = None):
        self.context = context
        self.allow = tuple(allow if allow is not None else getattr(context, "workbench_allow", ()))
        self.blocked: list[str] = []
        self.failed: list[str] = []
        self.console_errors: list[str] = []
        self.page_errors: list[str] = []
        self.requests: list[str] = []
        self.page = context.new_page()
        self.page.route(lambda url: not is_allowed(url, self.allow), self._block)
        self.page.on("request", lambda request: self.requests.append(request.url))
        self.page.on("requestfailed", lambda request: self.failed.append(f"{request.url} ({request.failure})"))
        self.page.on("console", self._console)
        self.page.on("pageerror", lambda error: self.page_errors.append(str(error)))

    def _block(self, route) -> None:
        self.blocked.append(route.request.url)
        route.abort("blockedbyclient")

    def _console(self, message) -> None:
        if message.type == "error":
            location = message.location or {}
            where = f" [{location.get('url', '')}:{location.get('lineNumber', '')}]" if location.get("url") else ""
            self.console_errors.append(f"{message.text}{where}")

    def __getattr__(self, name: str) -> Any:
        return getattr(self.page, name)

    def goto(self, target: str | os.PathLike, *, wait_until: str = "load", timeout: float = 30_000, **kwargs):
        """Open a URL or a local file (a path becomes a ``file://`` URL)."""
        url = target if isinstance(target, str) and re.match(r"^[a-z][a-z0-9+.-]*:", target) \
            else Path(target).resolve().as_uri()
        return self.page.goto(url, wait_until=wait_until, timeout=timeout, **kwargs)

    def problems(self, *, console: bool = True, ignore: Iterable[str] = ()) -> list[str]:
        """Everything recorded that a clean offline page would not have: blocked and failed requests,
        page errors and (``console``) console errors; messages matching a regular expression in
        ``ignore`` are left out."""
        patterns = [re.compile(p) for p in ignore]
        found = ([f"blocked: {u}" for u in self.blocked] + [f"request failed: {f}" for f in self.failed]
                 + [f"page error: {e}" for e in self.page_errors]
                 + ([f"console error: {e}" for e in self.console_errors] if console else []))
        return [p for p in found if not any(rx.search(p) for rx in patterns)]

    def clear(self) -> None:
        """Forget what was recorded (before opening the next page in the same tab)."""
        for records in (self.blocked, self.failed, self.console_errors, self.page_errors, self.requests):
            records.clear()

    def images(self) -> list[dict]:
        """Every ``<img>`` of the page: ``src`` (first 80 characters), ``complete`` and ``naturalWidth``."""
        return self.page.evaluate(
            "() => Array.from(document.images).map(i => ({src: (i.currentSrc || i.src).slice(0, 80),"
            " complete: i.complete, naturalWidth: i.naturalWidth, naturalHeight: i.naturalHeight}))")

    def broken_images(self) -> list[str]:
        """``src`` of images that did not load (``naturalWidth`` 0); waits for pending ones first."""
        self.page.wait_for_function("() => Array.from(document.images).every(i => i.complete)", timeout=15_000)
        return [i["src"] for i in self.images() if not i["naturalWidth"]]


class OfflineBrowser:
    """A fresh headless chromium with its network blocked; see :func:`offline_browser`."""

    def __init__(self, playwright, *, allow: Iterable[str] = (), **kwargs):
        self.playwright = playwright
        self.context = launch(playwright, allow=allow, **kwargs)

    @property
    def blocked(self) -> list[str]:
        """URLs blocked outside :class:`GuardedPage` pages (popups, workers)."""
        return self.context.workbench_blocked

    def new_page(self, *, allow: Iterable[str] | None = None) -> GuardedPage:
        return GuardedPage(self.context, allow=allow)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.context.close()


@contextlib.contextmanager
def offline_browser(*, allow: Iterable[str] = (), **kwargs) -> Iterator[OfflineBrowser]:
    """Start Playwright and a fresh offline chromium (:func:`launch`), close both on exit."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = OfflineBrowser(playwright, allow=allow, **kwargs)
        try:
            yield browser
        finally:
            browser.close()


# --------------------------------------------------------------------------------------------------------------
# artefacts and pixels


def artifacts_dir() -> Path:
    """Where screenshots go: ``$WORKBENCH_TEST_ARTIFACTS`` or ``<repo>/outputs/test-artifacts/browser`` (created)."""
    folder = Path(os.environ.get("WORKBENCH_TEST_ARTIFACTS") or ROOT / "outputs" / "test-artifacts" / "browser")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _safe_name(name: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "page"
    return name if name.endswith(".png") else f"{name}.png"


def screenshot(page, name: str, *, full_page: bool = True, selector: str | None = None) -> Path:
    """Save a screenshot of ``page`` (a :class:`GuardedPage` or a Playwright page), or of the element at
    ``selector``, as ``<artefacts>/<name>.png``; return the path."""
    page = getattr(page, "page", page)
    path = artifacts_dir() / _safe_name(name)
    if selector:
        page.locator(selector).first.screenshot(path=str(path))
    else:
        page.screenshot(path=str(path), full_page=full_page)
    return path


def pixel_stats(png: bytes | str | os.PathLike, *, centre: float = 1.0) -> dict[str, float]:
    """``std`` (grey levels, over all RGB pixels) and ``colours`` (distinct RGB values) of a picture,
    or of its central part (``centre``: that fraction of the width and height)."""
    import numpy as np
    from PIL import Image

    source = io.BytesIO(png) if isinstance(png, bytes) else png
    with Image.open(source) as image:
        rgb = np.asarray(image.convert("RGB"))
    if centre < 1.0:
        h, w = rgb.shape[:2]
        dh, dw = round(h * (1 - centre) / 2), round(w * (1 - centre) / 2)
        rgb = rgb[dh:h - dh or None, dw:w - dw or None]
    flat = rgb.reshape(-1, 3)
    return {"std": float(rgb.std()), "colours": len(np.unique(flat, axis=0)),
            "width": int(rgb.shape[1]), "height": int(rgb.shape[0])}


def canvas_not_blank(page, selector: str = "canvas", *, min_std: float = 2.0, min_colours: int = 8,
                     centre: float = 1.0, name: str | None = None) -> bool:
    """True when the (first) element at ``selector`` shows more than one flat colour.

    Screenshots the element with everything else on the page hidden (overlays such as
    k3d's panel, colour bar and axis labels would otherwise count as content), saved as
    ``<artefacts>/<name>.png`` when ``name`` is given, and asks for a grey-level standard
    deviation above ``min_std`` or more than ``min_colours`` distinct colours: an empty
    WebGL canvas is one colour.  ``centre`` < 1 judges only that central fraction of the
    element (where a fitted 3-D view has its object, away from corner widgets).
    """
    page = getattr(page, "page", page)
    element = page.locator(selector).first
    element.evaluate("e => e.setAttribute('data-workbench-shot', '')")
    try:
        png = element.screenshot(
            path=str(artifacts_dir() / _safe_name(name)) if name else None, animations="disabled",
            style="* { visibility: hidden !important; } [data-workbench-shot] { visibility: visible !important; }")
    finally:
        element.evaluate("e => e.removeAttribute('data-workbench-shot')")
    stats = pixel_stats(png, centre=centre)
    return stats["std"] > min_std or stats["colours"] > min_colours


def wait_for(condition: Callable[[], Any], *, timeout: float = 10.0, interval: float = 0.25,
             message: str = "condition") -> Any:
    """Call ``condition`` until it returns something truthy (returned) or ``timeout`` seconds pass
    (AssertionError naming ``message``).  Exceptions inside ``condition`` count as not yet."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            value = condition()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - retried until the deadline
            last_error = exc
        if time.monotonic() >= deadline:
            suffix = f" (last error: {last_error!r})" if last_error else ""
            raise AssertionError(f"timed out after {timeout:g} s waiting for {message}{suffix}")
        time.sleep(interval)
