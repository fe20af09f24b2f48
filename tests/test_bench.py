"""The knee analysis benchmark runs and reports its targets (a smoke test: no timings are asserted)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import knee_analysis  # noqa: E402


def test_knee_analysis_bench_reports_thickness_against_its_target(mskt_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("WORKBENCH_PYMSKT_PYTHON", raising=False)
    out = tmp_path / "bench.json"
    assert knee_analysis.main(["--quick", "--only", "phantoms,pymskt", "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    phantoms = results["phantoms"]
    assert phantoms["meets_target"] and phantoms["mae_mm_max"] <= 0.1
    assert {r["kind"] for r in phantoms["aligned_with_slices"]} == {"flat"}
    real = results["pymskt"]
    # without a pymskt interpreter the workbench side still runs and the peer is skipped with the reason
    assert "pymskt" in real["pymskt"]["skipped"] and real["workbench"]["seconds"]["meshes_thickness_regions"] > 0
    assert 1.0 < real["workbench"]["regions"]["med_wb_fem_cart_mm_mean"] < 3.0
    assert "phantoms: " in capsys.readouterr().out


def test_leave_one_subject_out_summaries_are_collected(tmp_path):
    row = {"case": "holdout-sag_3d_dess", "side": "right", "seconds": 20.0, "iterations": 300, "stop": "converged",
           "assd_mm": {"femur": 0.8, "femoral_cartilage": 0.5}, "assd_mean_shape_mm": {"femur": 1.4}}
    training = {"sources": ["right_knee_example"], "shapes": 64, "seconds": 420.0, "augmentation": {"warp_mm": 5.0}}
    other = dict(row, case="augmented-x-0", assd_mm={"femur": 0.1, "femoral_cartilage": 0.1})
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "summary.json").write_text(json.dumps(
        {"bone_and_cart": {"training": training, "evaluation": [other, row]}}))
    summary = knee_analysis.loso_summary(tmp_path)
    assert len(summary["fits"]) == 1 and summary["assd_mm_max"] == {"femur": 0.8, "femoral_cartilage": 0.5}
    assert "skipped" in knee_analysis.loso_summary(tmp_path / "none")
