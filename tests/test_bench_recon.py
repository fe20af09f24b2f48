"""The reconstruction benchmarks run and report their figures (smoke tests: no timings are asserted)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import nvdiffrec as nvdiffrec_bench  # noqa: E402
import rasterizer  # noqa: E402


def test_rasterizer_bench_times_the_workbench_and_reports_the_peer(tmp_path):
    out = tmp_path / "raster.json"
    assert rasterizer.main(["--quick", "--repeats", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert rows and all(r["workbench"]["median_ms"] > 0 for r in rows)
    # Mitsuba is measured when installed (pip install -e '.[bench]'), otherwise skipped with the reason
    assert all("median_ms" in r["mitsuba"] or r["mitsuba"]["skipped"] for r in rows)


def test_nvdiffrec_bench_quick_reports_quality(tmp_path, capsys):
    out = tmp_path / "nvdiffrec.json"
    assert nvdiffrec_bench.main(["--quick", "--device", "cpu", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["scene"] for r in rows] == ["sphere"]
    assert 0.0 <= rows[0]["fscore_1"] <= 1.0 and rows[0]["psnr"] > 10
    assert "| sphere |" in capsys.readouterr().out
