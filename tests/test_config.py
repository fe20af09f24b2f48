"""Option → job-config mapping (table-driven, every row) and validation errors."""

from __future__ import annotations

import pytest

from workbench.config import (
    NSM_TYPES,
    SEGMENTATION_MODELS,
    KneeOptions,
    knee_job_config,
    load_base_config,
    nsm_type_from_config,
    parse_options,
)
from workbench.errors import ConfigError, ErrorCode
from workbench.registry import REGISTRY

BASE = load_base_config("knee")


@pytest.mark.parametrize("option, seg_model, nnunet_type", [
    ("nnunet_fullres", "nnunet_knee", "fullres"),
    ("nnunet_cascade", "nnunet_knee", "cascade"),
])
def test_segmentation_mapping(option, seg_model, nnunet_type):
    config = knee_job_config(parse_options(KneeOptions, {"input": "x", "segmentation_model": option}), BASE)
    assert config["default_seg_model"] == seg_model
    assert config["nnunet"]["type"] == nnunet_type


@pytest.mark.parametrize("nsm, bone_only, bone_and_cart", [
    ("none", False, False),
    ("bone_only", True, False),
    ("bone_and_cart", False, True),
    ("both", True, True),
])
def test_nsm_mapping(nsm, bone_only, bone_and_cart):
    config = knee_job_config(parse_options(KneeOptions, {"input": "x", "nsm_type": nsm}), BASE)
    assert config["perform_bone_only_nsm"] is bone_only
    assert config["perform_bone_and_cart_nsm"] is bone_and_cart
    assert nsm_type_from_config(config) == nsm


def test_mapping_is_pure_and_keeps_original_keys():
    before = repr(BASE)
    config = knee_job_config(KneeOptions(input="scan.nii.gz", model_dir="/models/oai", timeout_s=100,
                                         step_timeouts={"load_input": 50}), BASE)
    assert repr(BASE) == before
    for key in ("default_seg_model", "nnunet", "perform_bone_only_nsm", "perform_bone_and_cart_nsm", "nsm",
                "nsm_bone_only", "bscore", "bscore_bone_only", "regions", "bones", "timeouts", "clip_femur_top",
                "batch_size"):
        assert key in config
    assert config["nnunet"]["model_name"] == "/models/oai"
    assert config["timeouts"]["run_s"] == 100 and config["timeouts"]["load_input_s"] == 50
    assert all(v <= 100 for v in config["timeouts"].values())  # no step outlives its run
    assert config["input"]["path"] == "scan.nii.gz"


def test_base_config_defaults_match_original_system():
    assert BASE["timeouts"]["run_s"] == 1800
    assert BASE["bones"]["femur"]["tissue_idx"] == 7 and BASE["bones"]["tibia"]["list_cart_labels"] == [3, 4]


@pytest.mark.parametrize("values, words", [
    ({"input": "x", "segmentation_model": "unet"}, ["segmentation_model", "'nnunet_fullres'", "'nnunet_cascade'"]),
    ({"input": "x", "nsm_type": "femur"}, ["nsm_type", "'bone_only'", "'both'", "'none'"]),
    ({}, ["input", "required"]),
    ({"input": "x", "device": "tpu"}, ["device", "auto, cpu, cuda"]),
    ({"input": "x", "colour": "red"}, ["colour", "known options"]),
    ({"input": "x", "timeout_s": 10, "step_timeouts": {"load_input": 20}}, ["load_input", "exceeds"]),
    ({"input": "x", "resample_mm": -1}, ["resample_mm"]),
    ({"input": "  "}, ["input"]),
])
def test_bad_options_are_config_errors_naming_the_option(values, words):
    with pytest.raises(ConfigError) as info:
        parse_options(KneeOptions, values)
    assert info.value.code is ErrorCode.CONFIG_ERROR
    for word in words:
        assert word in info.value.message
    assert info.value.hint


def test_registry_and_config_agree_on_choices():
    import typing

    assert set(REGISTRY.choices("knee", "segmentation_model")) == set(SEGMENTATION_MODELS)
    assert set(REGISTRY.choices("knee", "nsm_type")) == set(NSM_TYPES)
    assert set(typing.get_args(KneeOptions.model_fields["nsm_type"].annotation)) == set(NSM_TYPES)
    assert REGISTRY.choices("knee", "nsm_type")[0] == "none"


def test_missing_config_folder_gives_a_helpful_error(monkeypatch, tmp_path):
    monkeypatch.setenv("WORKBENCH_CONFIGS", str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="WORKBENCH_CONFIGS"):
        load_base_config("knee")


def test_set_overrides_parse_values_and_reject_unknown_keys():
    options = KneeOptions(input="x", overrides={"nnunet.folds": "[0, 1]", "nnunet.use_mirroring": "true",
                                                 "nnunet.tile_step_size": 0.25})
    config = knee_job_config(options, BASE)
    assert config["nnunet"]["folds"] == [0, 1] and config["nnunet"]["use_mirroring"] is True
    assert config["nnunet"]["tile_step_size"] == 0.25
    for bad in ({"nnunet.fold": "1"}, {"nnunett.folds": "1"}, {"bones.femur.tissue_idx.x": "1"}):
        with pytest.raises(ConfigError) as info:
            knee_job_config(KneeOptions(input="x", overrides=bad), BASE)
        assert list(bad)[0].split(".")[0] in info.value.message
