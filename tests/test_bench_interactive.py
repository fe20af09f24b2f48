"""bench/interactive.py runs (its quick part) and reports its figures."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_interactive_bench_pictures_part(tmp_path):
    out = tmp_path / "bench.json"
    bench = runpy.run_path(str(ROOT / "bench" / "interactive.py"))
    assert bench["main"](["--parts", "pictures", "--json", str(out)]) == 0
    figures = json.loads(out.read_text())["pictures"]
    assert figures["faces"] == 81920 and figures["mesh_png_s"] > 0 and figures["k3d_snapshot_mb"] > 0.5
