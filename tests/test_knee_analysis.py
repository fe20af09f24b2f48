"""The knee analysis after segmentation, through run_knee with a given label map (no nnU-Net needed):
subregions, meshes and thickness, T2, the results table, and their failures."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest

from helpers import assert_error
from workbench.data.samples import write_sample
from workbench.errors import ErrorCode, WorkbenchError
from workbench.knee.analysis import meshes_and_thickness
from workbench.knee.meshes import read_vtk
from workbench.knee.pipeline import run_knee
from workbench.knee.steps import load_input
from workbench.runner import StepContext

REGIONS = ("pat_cart", "ant_fem_cart", "med_wb_fem_cart", "lat_wb_fem_cart", "med_post_fem_cart",
           "lat_post_fem_cart", "med_tib_cart", "lat_tib_cart")


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    # a multi-echo DICOM series (6 echoes, known T2 per tissue) and a single-echo NIfTI of the same knee
    return write_sample(tmp_path_factory.mktemp("sample"), preset="small", seed=21, name="knee", n_echoes=6)


def _statuses(run_dir):
    result = json.loads((run_dir / "result.json").read_text())
    return {s["name"]: s["status"] for s in result["steps"]}, result


def test_given_segmentation_is_analysed_and_failing_optional_steps_stay_alone(sample, tmp_path, monkeypatch):
    # T2 asked for on a single-echo input, shape models asked for with no model folders installed
    (tmp_path / "no_models").mkdir()
    monkeypatch.setenv("WORKBENCH_MODELS", str(tmp_path / "no_models"))
    run = run_knee({"input": str(sample["image"]), "segmentation": str(sample["labels"]), "t2": "on",
                    "nsm_type": "both", "device": "cpu"}, run_dir=tmp_path / "run")
    steps, result = _statuses(run.run_dir)
    assert steps == {"load_input": "ok", "segmentation": "skipped", "subregions": "ok", "meshes": "ok",
                     "t2": "failed", "nsm_bone_only": "failed", "nsm_bone_and_cart": "failed", "results": "ok"}
    errors = {s["name"]: s["error"] for s in result["steps"] if s.get("error")}
    assert errors["t2"]["code"] == "INVALID_FORMAT" and "echo" in errors["t2"]["message"]
    assert errors["nsm_bone_only"]["code"] == "MODEL_UNAVAILABLE" and "nsm_femur" in errors["nsm_bone_only"]["message"]
    assert errors["nsm_bone_and_cart"]["code"] == "MODEL_UNAVAILABLE"
    folder = run.run_dir
    # the given labels are analysed unchanged; subregions replace only the femoral cartilage
    given = np.asarray(nib.load(str(sample["labels"])).dataobj)
    labels = np.asarray(nib.load(str(folder / "knee_all-labels.nii.gz")).dataobj)
    sub = np.asarray(nib.load(str(folder / "knee_subregions-labels.nii.gz")).dataobj)
    assert np.count_nonzero(labels) == np.count_nonzero(given)
    assert set(np.unique(sub[labels == 2])) == {11, 12, 13, 14, 15}
    assert np.array_equal(sub[labels != 2], labels[labels != 2])
    # meshes in scanner mm with the point arrays
    vertices, faces, arrays = read_vtk(folder / "femur_mesh.vtk")
    assert len(faces) > 1000 and set(arrays) >= {"thickness_mm", "region"}
    img = nib.load(str(folder / "knee_all-labels.nii.gz"))
    femur_world = nib.affines.apply_affine(img.affine, np.argwhere(labels == 7))
    assert np.allclose(vertices.min(axis=0), femur_world.min(axis=0), atol=2.0)
    covered = arrays["thickness_mm"] > 0
    assert 0.2 < covered.mean() < 0.9 and set(np.unique(arrays["region"][covered])) <= {11, 12, 13, 14, 15}
    for name in ("tibia_mesh.ply", "patella_mesh.vtk", "fem_cart_mesh.vtk", "tib_cart_mesh.ply", "knee_thickness.png"):
        assert (folder / name).stat().st_size > 1000, name
    # the results table, JSON and one CSV row with the original field names
    document = json.loads((folder / "knee_results.json").read_text())
    row = document["results"]
    assert row["knee_side"] == "right" and document["steps"]["t2"] == "failed"
    assert document["steps"]["nsm_bone_only"] == "failed" and "nsm_assd_bone_mm" not in row
    for region in REGIONS:
        assert 0.5 < row[f"{region}_mm_mean"] < 5.0, region
        assert row[f"{region}_mm_std"] >= 0 and row[f"{region}_mm_median"] > 0
    assert row["femur_volume_mm3"] > 10_000 and document["units"]["femur_volume_mm3"] == "mm^3"
    with open(folder / "knee_results.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 1 and float(rows[0]["med_wb_fem_cart_mm_mean"]) == pytest.approx(
        row["med_wb_fem_cart_mm_mean"])


def test_multi_echo_input_gives_a_t2_map_near_the_truth(sample, tmp_path):
    run = run_knee({"input": str(sample["dicom"]), "segmentation": str(sample["labels"]), "device": "cpu"},
                   run_dir=tmp_path / "run")
    steps, _ = _statuses(run.run_dir)
    assert steps["t2"] == "ok" and steps["results"] == "ok"
    row = json.loads(next(run.run_dir.glob("*_results.json")).read_text())["results"]
    assert row["t2_method"] == "nonlinear"
    # the synthetic knee's cartilage T2: femoral 40 ms, tibial 35 ms, patellar 42 ms (with partial volume at edges)
    for region, truth in (("med_wb_fem_cart", 40.0), ("lat_wb_fem_cart", 40.0), ("med_tib_cart", 35.0),
                          ("lat_tib_cart", 35.0)):
        assert row[f"{region}_t2_ms_median"] == pytest.approx(truth, abs=3.0), region
        assert row[f"{region}_deep_t2_ms_median"] is not None
    t2_map = nib.load(str(next(run.run_dir.glob("*_t2.nii.gz"))))
    assert t2_map.shape == nib.load(str(next(run.run_dir.glob("*_image.nii.gz")))).shape


def test_missing_femur_fails_the_meshes_and_keeps_earlier_outputs(sample, tmp_path):
    img = nib.load(str(sample["labels"]))
    labels = np.asarray(img.dataobj).copy()
    labels[labels == 7] = 0
    nib.save(nib.Nifti1Image(labels, img.affine), str(tmp_path / "no_femur.nii.gz"))
    with pytest.raises(WorkbenchError) as info:
        run_knee({"input": str(sample["image"]), "segmentation": str(tmp_path / "no_femur.nii.gz"),
                  "device": "cpu"}, run_dir=tmp_path / "run")
    assert info.value.code is ErrorCode.INVALID_FORMAT and "femur" in info.value.message
    steps, result = _statuses(tmp_path / "run")
    assert steps["meshes"] == "failed" and result["error"]["code"] == "INVALID_FORMAT"
    for name in ("knee_image.nii.gz", "knee_all-labels.nii.gz", "knee_subregions-labels.nii.gz"):
        assert (tmp_path / "run" / name).is_file(), name
    assert not list((tmp_path / "run").glob("*_mesh.vtk"))


def test_empty_label_map_is_an_invalid_format(tmp_path):
    nib.save(nib.Nifti1Image(np.zeros((30, 30, 20), np.uint8), np.eye(4)), str(tmp_path / "empty.nii.gz"))
    with pytest.raises(WorkbenchError) as info:
        meshes_and_thickness(StepContext.for_testing(tmp_path / "work"), str(tmp_path / "empty.nii.gz"), "e")
    assert_error(info, ErrorCode.INVALID_FORMAT, "none")


def test_labels_outside_the_table_are_refused_on_load(sample, tmp_path):
    img = nib.load(str(sample["labels"]))
    labels = np.asarray(img.dataobj).astype(np.uint8)
    labels[0, 0, 0] = 42
    nib.save(nib.Nifti1Image(labels, img.affine), str(tmp_path / "bad.nii.gz"))
    with pytest.raises(WorkbenchError) as info:
        load_input(StepContext.for_testing(tmp_path / "work"), str(sample["image"]), "knee",
                   segmentation=str(tmp_path / "bad.nii.gz"))
    assert_error(info, ErrorCode.INVALID_FORMAT, "42")


def test_shipped_shape_model_fits_the_femur_and_its_cartilage(sample, tmp_path):
    run = run_knee({"input": str(sample["image"]), "segmentation": str(sample["labels"]), "t2": "off",
                    "nsm_type": "bone_and_cart", "device": "cpu"}, run_dir=tmp_path / "run")
    steps, _ = _statuses(run.run_dir)
    assert steps["nsm_bone_and_cart"] == "ok"
    params = json.loads((run.run_dir / "NSM_recon_params.json").read_text())
    assert {"latent", "Bscore", "icp_transform", "center", "scale", "assd_bone_mm", "assd_cartilage_mm"} <= set(params)
    assert params["Bscore"] is None  # no B-score folder configured
    # a synthetic knee made from a training subject: a floor well above the model card's figures
    assert params["assd_bone_mm"] < 1.0 and params["assd_cartilage_mm"] < 0.6
    for name in ("NSM_recon_femur.ply", "NSM_recon_femoral_cartilage.ply"):
        assert (run.run_dir / name).stat().st_size > 10_000, name
    row = json.loads((run.run_dir / "knee_results.json").read_text())["results"]
    assert row["nsm_assd_bone_mm"] == pytest.approx(params["assd_bone_mm"], abs=1e-3)
