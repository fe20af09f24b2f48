"""Shared fixtures: keep every test's outputs and caches out of the repository."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:  # step fixtures must import in spawned step processes too
    sys.path.insert(0, str(TESTS))


@pytest.fixture(autouse=True)
def _isolated_outputs(tmp_path, monkeypatch):
    """Run folders created without --out go to a temporary outputs folder."""
    monkeypatch.setenv("WORKBENCH_OUTPUTS", str(tmp_path / "outputs"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    yield


def mskt_available() -> bool:
    from workbench.data.samples import mskt_data_dir
    from workbench.errors import WorkbenchError

    try:
        mskt_data_dir(fetch=False)
        return True
    except WorkbenchError:
        return False


def pytest_collection_modifyitems(config, items):
    if mskt_available():
        return
    skip = pytest.mark.skip(reason="mskt sample data not cached; run `workbench data fetch` (make test does)")
    for item in items:
        if "mese" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def mskt_dir():
    """The cached mskt sample data folder; the test is skipped when it is absent."""
    from workbench.data.samples import mskt_data_dir
    from workbench.errors import WorkbenchError

    try:
        return mskt_data_dir(fetch=False)
    except WorkbenchError as exc:
        pytest.skip(f"mskt sample data absent: {exc.message}")
