"""Papermill runs of every notebook, the HTML report, and nbval on the quickstart."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest

from workbench.cli import main
from workbench.data.samples import write_sample
from workbench.notebook import notebooks_dir, run_quickstart
from workbench.outputs import sha256_of
from workbench.schemas import RESULT_SCHEMA

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    return write_sample(tmp_path_factory.mktemp("sample"), preset="small", seed=3, name="knee_sample")


def test_notebooks_are_committed_without_outputs():
    for path in notebooks_dir().glob("*.ipynb"):
        nb = json.loads(path.read_text())
        assert all(not c.get("outputs") for c in nb["cells"]), path.name
        tagged = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
        assert len(tagged) == 1, f"{path.name} needs exactly one cell tagged 'parameters'"


@pytest.mark.slow
def test_workbench_run_knee_end_to_end(sample, tmp_path, capsys):
    # the whole pipeline as a user runs it: shipped segmentation, analysis, both shipped shape models, report
    out = tmp_path / "run"
    code = main(["run", "knee", "--input", str(sample["dicom"]), "--ground-truth", str(sample["labels"]),
                 "--out", str(out), "--device", "cpu", "--nsm", "both"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.out.strip().endswith("report.html")
    for name in ("report.ipynb", "report.html", "result.json", "config.json", "progress.jsonl"):
        assert (out / name).is_file(), name
    assert not (out / "error.log").exists()
    result = json.loads((out / "result.json").read_text())
    jsonschema.validate(result, RESULT_SCHEMA)
    assert result["status"] == "ok" and result["parameters"]["input"] == str(sample["dicom"])
    statuses = {s["name"]: s["status"] for s in result["steps"]}
    assert statuses["segmentation"] == "ok" and statuses["meshes"] == "ok" and statuses["results"] == "ok"
    assert statuses["nsm_bone_only"] == "ok" and statuses["nsm_bone_and_cart"] == "ok"
    bone_only = json.loads((out / "NSM_bone_only_recon_params.json").read_text())
    both = json.loads((out / "NSM_recon_params.json").read_text())
    assert len(bone_only["latent"]) == len(both["latent"]) > 0
    assert bone_only["assd_bone_mm"] < 1.5 and bone_only["assd_cartilage_mm"] is None
    assert both["assd_bone_mm"] < 1.5 and both["assd_cartilage_mm"] < 1.0
    row = json.loads(next(out.glob("*_results.json")).read_text())["results"]
    assert row["nsm_assd_bone_mm"] == pytest.approx(both["assd_bone_mm"], abs=1e-3)
    assert result["metrics"]["segmentation"]["dice"]["femur"] > 0.8  # the shipped model on a held-out sample
    for record in result["outputs"]:
        assert sha256_of(out / record["path"]) == record["sha256"]
    html = (out / "report.html").read_text()
    # segmentation, ground truth, thickness maps and bars, two shape-model sections: embedded
    assert html.count("data:image/png;base64") >= 6
    assert "aligned mean shape ASSD" in html  # the shape-model table
    assert "knee side:" in html  # the results table
    assert "run_knee(options" not in html  # code hidden
    assert "<script src=" not in html and "cdnjs" not in html  # nothing fetched from the network
    events = [json.loads(line) for line in (out / "progress.jsonl").read_text().splitlines()]
    assert events[0]["kind"] == "run_start" and events[-1]["kind"] == "run_end"
    # the report can be rebuilt
    (out / "report.html").unlink()
    assert main(["report", str(out)]) == 0 and (out / "report.html").is_file()


@pytest.mark.slow
def test_quickstart_runs_headless(tmp_path):
    report = run_quickstart(tmp_path / "demo", seed=1)
    assert report.is_file() and "data:image/png;base64" in report.read_text()  # the sample's slice figure
    result = json.loads((tmp_path / "demo" / "knee-run" / "result.json").read_text())
    assert result["status"] == "ok"
    assert {s["name"]: s["status"] for s in result["steps"]}["segmentation"] == "ok"
    assert "femur_mesh.vtk" in {Path(o["path"]).name for o in result["outputs"]}


@pytest.mark.slow
def test_quickstart_nbval_lax(tmp_path):
    env = dict(os.environ, WORKBENCH_OUTPUTS=str(tmp_path / "outputs"), MPLBACKEND="Agg")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbval-lax", "--nbval-current-env",
         str(notebooks_dir() / "quickstart.ipynb"), "--rootdir", str(tmp_path)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.slow
def test_workbench_run_recon_end_to_end(tmp_path, capsys):
    # as a user runs it: a sample scene, then `workbench run recon` through papermill, then the report
    scene = tmp_path / "scene"
    assert main(["data", "sample", "recon", "--shape", "blob", "--views", "16", "--test-views", "4", "--res", "48",
                 "--out", str(scene)]) == 0
    out = tmp_path / "run"
    small = ["nvdiffrec.iter=60", "nvdiffrec.iter_pass2=10", "nvdiffrec.dmtet_grid=16", "nvdiffrec.train_res=[48,48]",
             "nvdiffrec.texture_res=[64,64]", "evaluate.sample_points=20000"]
    code = main(["run", "recon", "--images", str(scene), "--out", str(out), "--device", "cpu"]
                + [arg for kv in small for arg in ("--set", kv)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.out.strip().endswith("report.html")
    result = json.loads((out / "result.json").read_text())
    jsonschema.validate(result, RESULT_SCHEMA)
    assert result["status"] == "ok" and result["models"] == ["nvdiffrec"]
    for name in ("mesh.obj", "mesh.mtl", "texture_kd.png", "probe.hdr", "mesh.ply", "metrics.json"):
        assert (out / "nvdiffrec" / name).is_file(), name
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64") >= 4  # input views, two previews, loss curves
    assert "test-view PSNR" in html and "<script src=" not in html
