"""nnU-Net integration pieces that need no trained model: label mapping, model folders, post-processing."""

from __future__ import annotations

import json

import numpy as np
import pytest

from workbench.errors import ErrorCode, WorkbenchError
from workbench.knee.segmentation import (
    dice_scores,
    find_configuration,
    map_model_labels,
    postprocess,
    remap,
)


def test_labels_map_by_name_whatever_the_spelling():
    labels = {"background": 0, "Femur": 1, "Tibia": 2, "Patella": 3, "Femoral Cartilage": 4,
              "medial_tibial_cartilage": 5, "LateralTibialCartilage": 6, "patellar cartilage": 7,
              "med_men": 8, "lateral meniscus": 9}
    mapping = map_model_labels(labels)
    assert mapping == {0: 0, 1: 7, 2: 8, 3: 9, 4: 2, 5: 3, 6: 4, 7: 1, 8: 5, 9: 6}
    seg = np.array([[0, 1, 2, 3, 4, 5, 6, 7, 8, 9]])
    assert remap(seg, mapping).tolist() == [[0, 7, 8, 9, 2, 3, 4, 1, 5, 6]]


def test_every_workbench_label_survives_the_identity_mapping():
    from workbench.data.labels import KNEE_LABELS

    labels = {"background": 0, **{label.key: label.value for label in KNEE_LABELS}}
    assert map_model_labels(labels) == {v: v for v in range(10)}


def test_unmappable_labels_are_a_config_error_listing_them():
    with pytest.raises(WorkbenchError) as info:
        map_model_labels({"background": 0, "femur": 1, "ACL": 2, "fibula": 3})
    assert info.value.code is ErrorCode.CONFIG_ERROR
    assert "ACL=2" in info.value.message and "fibula=3" in info.value.message
    with pytest.raises(WorkbenchError, match="region-based"):
        map_model_labels({"background": 0, "bones": [1, 2]})


def _model_folder(root, configuration="3d_fullres", labels=None, fold="all"):
    folder = root / "Dataset501_X" / f"nnUNetTrainer__nnUNetPlans__{configuration}"
    (folder / f"fold_{fold}").mkdir(parents=True)
    (folder / "dataset.json").write_text(json.dumps({"labels": labels or {"background": 0, "femur": 1},
                                                     "channel_names": {"0": "MRI"}, "numTraining": 4}))
    (folder / "plans.json").write_text(json.dumps({"configurations": {configuration: {}}}))
    (folder / f"fold_{fold}" / "checkpoint_final.pth").write_bytes(b"not really a checkpoint")
    return folder


def test_find_configuration_from_any_level(tmp_path):
    folder = _model_folder(tmp_path)
    for root in (tmp_path, tmp_path / "Dataset501_X", folder):
        found = find_configuration(root, "3d_fullres", ("all",), "checkpoint_final.pth")
        assert found.folder == folder and found.label_map == {0: 0, 1: 7}
    assert find_configuration(tmp_path, "3d_fullres", ("auto",), "checkpoint_final.pth").folds == ("all",)


def test_a_sibling_configuration_folder_is_found(tmp_path):
    fullres = _model_folder(tmp_path, "3d_fullres")
    lowres = _model_folder(tmp_path, "3d_lowres")
    assert find_configuration(fullres, "3d_lowres", ("all",), "checkpoint_final.pth").folder == lowres


@pytest.mark.parametrize("damage, words", [
    ("no_folder", ["does not exist"]),
    ("no_config", ["No 3d_lowres configuration", "3d_fullres"]),
    ("no_checkpoint", ["checkpoint_final.pth", "missing"]),
    ("bad_json", ["not valid JSON"]),
])
def test_broken_model_folders_are_model_unavailable(tmp_path, damage, words):
    folder = _model_folder(tmp_path)
    configuration = "3d_fullres"
    root = tmp_path
    if damage == "no_folder":
        root = tmp_path / "nowhere"
    elif damage == "no_config":
        configuration = "3d_lowres"
    elif damage == "no_checkpoint":
        (folder / "fold_all" / "checkpoint_final.pth").unlink()
    elif damage == "bad_json":
        (folder / "dataset.json").write_text("{")
    with pytest.raises(WorkbenchError) as info:
        find_configuration(root, configuration, ("all",), "checkpoint_final.pth")
    assert info.value.code is ErrorCode.MODEL_UNAVAILABLE
    for word in words:
        assert word in info.value.message


def test_corrupt_checkpoint_is_model_unavailable(tmp_path):
    from workbench.knee.segmentation import NnUNetSegmenter
    from workbench.registry import NnUNetModelConfig

    _model_folder(tmp_path)
    segmenter = NnUNetSegmenter(NnUNetModelConfig(model_folder=str(tmp_path)), device="cpu")
    with pytest.raises(WorkbenchError) as info:
        segmenter.predict(np.zeros((8, 8, 8), np.float32), (1.0, 1.0, 1.0))
    assert info.value.code is ErrorCode.MODEL_UNAVAILABLE and "corrupt" in info.value.hint


def test_postprocess_keeps_largest_component_and_fills_bone_holes():
    labels = np.zeros((20, 20, 20), np.uint8)
    labels[2:12, 2:12, 2:12] = 7          # femur with a hole
    labels[6:8, 6:8, 6:8] = 0
    labels[15:17, 15:17, 15:17] = 7       # a stray femur fragment
    labels[2:12, 12:14, 2:12] = 2         # cartilage touching it
    out = postprocess(labels)
    assert out[16, 16, 16] == 0 and out[7, 7, 7] == 7
    assert (out == 2).sum() == (labels == 2).sum()
    assert postprocess(labels, largest_component=False, fill_bone_holes=False).tolist() == labels.tolist()


def test_dice():
    a = np.zeros((4, 4), np.uint8)
    b = a.copy()
    a[:2] = 7
    b[:1] = 7
    scores = dice_scores(a, b, values=[7, 8])
    assert scores[7] == pytest.approx(2 * 4 / (8 + 4)) and scores[8] is None
