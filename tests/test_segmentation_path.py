"""The nnU-Net inference path end to end with a real (random-weight) nnU-Net model folder.

Trained weights are not needed to check the plumbing: loading through nnUNetPredictor, the cascade, the
voxel order handed to nnU-Net and back, label mapping, outputs and errors.
"""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from nnunet_fixture import make_random_model
from workbench.cli import main
from workbench.errors import ErrorCode, WorkbenchError
from workbench.knee.steps import load_input, segment
from workbench.runner import StepContext


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_random_model(tmp_path_factory.mktemp("model"))


def _image(path, shape=(40, 36, 24), affine=None):
    rng = np.random.default_rng(0)
    data = rng.random(shape).astype(np.float32) * 100
    data[10:30, 8:28, 6:18] += 300
    if affine is None:  # LPS-like and permuted: far from canonical
        affine = np.array([[0, -1.0, 0, 30], [-1.2, 0, 0, 40], [0, 0, 1.5, -5], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return data, affine


@pytest.mark.parametrize("model_name, stages", [("nnunet_fullres", ["3d_fullres"]),
                                               ("nnunet_cascade", ["3d_lowres", "3d_cascade_fullres"])])
def test_random_weight_model_runs_through_the_pipeline(model, tmp_path, model_name, stages):
    from workbench.knee.pipeline import run_knee

    _image(tmp_path / "scan.nii.gz")
    try:
        run_knee({"input": str(tmp_path / "scan.nii.gz"), "model_dir": str(model), "device": "cpu",
                  "segmentation_model": model_name}, run_dir=tmp_path / "run")
    except WorkbenchError as exc:  # random labels: the analysis after segmentation may find no usable femur
        assert exc.code is ErrorCode.INVALID_FORMAT and exc.step != "segmentation", exc
    run_dir = tmp_path / "run"
    result = json.loads((run_dir / "result.json").read_text())
    assert [s["name"] for s in result["steps"]][:2] == ["load_input", "segmentation"]
    assert result["steps"][1]["status"] == "ok"
    seg = nib.load(str(run_dir / "scan_all-labels.nii.gz"))
    img = nib.load(str(run_dir / "scan_image.nii.gz"))
    assert seg.shape == img.shape and np.allclose(seg.affine, img.affine)
    assert set(np.unique(np.asarray(seg.dataobj))) <= set(range(10))
    summary = json.loads((run_dir / "scan_segmentation.json").read_text())
    assert summary["configurations"] == stages and summary["dice"] is None
    assert result["steps"][1]["model"] == model_name and result["steps"][1]["peak_rss_mb"] > 100


def test_voxel_order_round_trip(tmp_path, monkeypatch):
    """nnU-Net gets the file's voxel order (z, y, x) and its labels land on the canonical grid unchanged."""
    from types import SimpleNamespace

    seen = {}

    class BrightIsFemur:
        """Stands in for the nnU-Net segmenter: label 7 wherever the image is bright."""

        stages = [SimpleNamespace(name="3d_fullres", folder="stand-in")]

        def predict(self, image_zyx, spacing_zyx, progress=None):
            seen["shape"], seen["spacing"] = image_zyx.shape, spacing_zyx
            return (image_zyx > 250).astype(np.uint8) * 7

    monkeypatch.setattr("workbench.registry.REGISTRY.model",
                        lambda name: SimpleNamespace(load=lambda device="cpu", **kw: BrightIsFemur()))
    data, affine = _image(tmp_path / "scan.nii.gz")
    ctx = StepContext.for_testing(tmp_path / "work")
    loaded = load_input(ctx, str(tmp_path / "scan.nii.gz"), "scan")
    segment(ctx, str(ctx.work_dir / "scan_image.nii.gz"), "scan", "nnunet_fullres",
            original_affine=loaded.values["original_affine"], largest_component=False, fill_bone_holes=False)
    assert seen["shape"] == data.shape[::-1]  # SimpleITK's order of the file's voxels
    assert seen["spacing"] == pytest.approx((1.5, 1.0, 1.2))
    image = np.asarray(nib.load(str(ctx.work_dir / "scan_image.nii.gz")).dataobj)
    labels = np.asarray(nib.load(str(ctx.work_dir / "scan_all-labels.nii.gz")).dataobj)
    assert np.array_equal(labels == 7, image > 250)


def test_missing_model_folder_is_model_unavailable(tmp_path, capsys):
    _image(tmp_path / "scan.nii.gz")
    code = main(["run", "knee", "--input", str(tmp_path / "scan.nii.gz"), "--model-dir", str(tmp_path / "nowhere"),
                 "--out", str(tmp_path / "run"), "--no-report", "--device", "cpu"])
    assert code == 3
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["error"]["code"] == "MODEL_UNAVAILABLE" and "nowhere" in result["error"]["message"]
    assert result["error"]["step"] == "segmentation"
    assert not list((tmp_path / "run").glob("*_all-labels.nii.gz"))


def test_unmappable_labels_are_a_config_error(model, tmp_path):
    from workbench.knee.pipeline import run_knee

    copy = tmp_path / "model"
    shutil.copytree(model, copy)
    for dataset_json in copy.rglob("dataset.json"):
        data = json.loads(dataset_json.read_text())
        data["labels"] = {("ACL" if name == "patella" else name): value for name, value in data["labels"].items()}
        dataset_json.write_text(json.dumps(data))
    _image(tmp_path / "scan.nii.gz")
    with pytest.raises(WorkbenchError) as info:
        run_knee({"input": str(tmp_path / "scan.nii.gz"), "model_dir": str(copy), "device": "cpu"},
                 run_dir=tmp_path / "run")
    assert info.value.code is ErrorCode.CONFIG_ERROR and "ACL=9" in info.value.message
