"""The knee pipeline's input step, called through run_knee (no papermill)."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from workbench.errors import ErrorCode, WorkbenchError
from workbench.io.volume import Volume
from workbench.knee.pipeline import run_knee
from workbench.knee.steps import case_name, load_input
from workbench.outputs import sha256_of
from workbench.runner import StepContext


def _nifti(path, shape=(20, 16, 12), affine=None, seed=0):
    rng = np.random.default_rng(seed)
    data = rng.random(shape).astype(np.float32) * 100
    if affine is None:  # LPS-like, non-canonical: x and y flipped, axes permuted
        affine = np.array([[0, -1.0, 0, 30], [-0.8, 0, 0, 40], [0, 0, 2.0, -5], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return data, affine


def _world(affine, ijk):
    return (affine @ np.array([*ijk, 1.0]))[:3]


def test_case_names():
    assert case_name("/a/b/knee_01.nii.gz") == "knee_01"
    assert case_name("/scans/Series 5/") == "Series_5"
    assert case_name("x.NII") == "x"


def test_run_knee_writes_canonical_image(tmp_path, monkeypatch):
    # no segmentation model installed: the run fails with MODEL_UNAVAILABLE, the loaded input stays
    monkeypatch.setenv("WORKBENCH_MODELS", str(tmp_path / "no_models"))
    (tmp_path / "no_models").mkdir()
    data, affine = _nifti(tmp_path / "scan.nii.gz")
    with pytest.raises(WorkbenchError) as info:
        run_knee({"input": str(tmp_path / "scan.nii.gz"), "device": "cpu"}, run_dir=tmp_path / "run")
    assert info.value.code is ErrorCode.MODEL_UNAVAILABLE and "no_models" in info.value.message
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["status"] == "failed" and result["error"]["code"] == "MODEL_UNAVAILABLE"
    assert [(s["name"], s["status"]) for s in result["steps"]] == [("load_input", "ok"), ("segmentation", "failed")]
    run_dir = tmp_path / "run"
    img = nib.load(str(run_dir / "scan_image.nii.gz"))
    assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
    out = np.asarray(img.dataobj)
    # the same voxel value sits at the same world position after reorientation
    for ijk in [(0, 0, 0), (5, 3, 7), (19, 15, 11)]:
        world = _world(affine, ijk)
        new_ijk = np.rint(np.linalg.solve(img.affine[:3, :3], world - img.affine[:3, 3])).astype(int)
        assert out[tuple(new_ijk)] == pytest.approx(data[ijk])
    for record in result["outputs"]:
        assert sha256_of(run_dir / record["path"]) == record["sha256"]
    info = json.loads((run_dir / "input.json").read_text())
    assert info["orientation"] == "RAS" and sorted(info["spacing_mm"]) == pytest.approx([0.8, 1.0, 2.0])
    assert json.loads((run_dir / "config.json").read_text())["nnunet"]["type"] == "fullres"


def test_resampling_and_ground_truth(tmp_path):
    affine = np.diag([0.5, 0.5, 1.5, 1.0])
    _nifti(tmp_path / "img.nii.gz", shape=(40, 40, 12), affine=affine)
    labels = np.zeros((40, 40, 12), np.uint8)
    labels[10:20, 10:30, 3:8] = 7
    labels[20:24, 10:30, 3:8] = 2
    nib.save(nib.Nifti1Image(labels, affine), str(tmp_path / "gt.nii.gz"))
    ctx = StepContext.for_testing(tmp_path / "work")
    result = load_input(ctx, str(tmp_path / "img.nii.gz"), "img", resample_mm=1.0,
                        ground_truth=str(tmp_path / "gt.nii.gz"))
    image = nib.load(str(ctx.work_dir / "img_image.nii.gz"))
    gt = nib.load(str(ctx.work_dir / "img_ground-truth.nii.gz"))
    assert image.header.get_zooms() == pytest.approx((1.0, 1.0, 1.0))
    assert gt.shape == image.shape and np.allclose(gt.affine, image.affine)
    assert set(np.unique(np.asarray(gt.dataobj))) == {0, 2, 7}
    femur_ml = result.metrics["ground_truth_volumes_ml"]["7"]
    assert femur_ml == pytest.approx(10 * 20 * 5 * 0.5 * 0.5 * 1.5 / 1000, rel=0.2)


def test_ground_truth_on_another_grid_is_invalid_format(tmp_path):
    _nifti(tmp_path / "img.nii.gz", shape=(20, 16, 12))
    nib.save(nib.Nifti1Image(np.zeros((10, 10, 10), np.uint8), np.eye(4)), str(tmp_path / "gt.nii.gz"))
    with pytest.raises(WorkbenchError) as info:
        run_knee({"input": str(tmp_path / "img.nii.gz"), "ground_truth": str(tmp_path / "gt.nii.gz"),
                  "device": "cpu"}, run_dir=tmp_path / "run")
    assert info.value.code is ErrorCode.INVALID_FORMAT and "gt.nii.gz" in info.value.message
    assert not list((tmp_path / "run").glob("*.nii.gz"))


def test_constant_image_is_rejected(tmp_path):
    nib.save(nib.Nifti1Image(np.ones((8, 8, 8), np.float32), np.eye(4)), str(tmp_path / "flat.nii.gz"))
    with pytest.raises(WorkbenchError, match="constant"):
        load_input(StepContext.for_testing(tmp_path / "work"), str(tmp_path / "flat.nii.gz"), "flat")


def test_multi_echo_dicom_keeps_every_echo(tmp_path):
    from workbench.io.dicom_write import write_dicom_series

    rng = np.random.default_rng(1)
    base = rng.random((16, 16, 6)).astype(np.float32) * 1000 + 50
    tes = [10.0, 20.0, 30.0]
    echoes = np.stack([base * np.exp(-te / 35.0) for te in tes], axis=-1)
    volume = Volume(echoes[..., 0], np.diag([0.6, 0.6, 3.0, 1.0]), echoes=echoes, echo_times_ms=tes)
    write_dicom_series(volume, tmp_path / "mese", series_description="MESE", echo_times_ms=tes)
    ctx = StepContext.for_testing(tmp_path / "work")
    load_input(ctx, str(tmp_path / "mese"), "mese")
    echo_img = nib.load(str(ctx.work_dir / "mese_echoes.nii.gz"))
    assert echo_img.shape == (16, 16, 6, 3)
    info = json.loads((ctx.work_dir / "input.json").read_text())
    assert info["n_echoes"] == 3 and info["echo_times_ms"] == pytest.approx(tes)
    decay = np.asarray(echo_img.dataobj)[8, 8, 3]
    assert decay[0] > decay[1] > decay[2]


@pytest.mark.mese
def test_real_mese_series(tmp_path, mskt_dir):
    ctx = StepContext.for_testing(tmp_path / "work")
    load_input(ctx, str(mskt_dir / "MESE_T2_dicom_data_anon"), "mese")
    info = json.loads((ctx.work_dir / "input.json").read_text())
    assert info["n_echoes"] == 8 and sorted(info["shape"]) == [24, 256, 256]
    assert info["echo_times_ms"][0] == pytest.approx(6.3, abs=0.2)
    assert info["echo_times_ms"][-1] == pytest.approx(50.5, abs=0.5)
