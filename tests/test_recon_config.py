"""Reconstruction options → job config, presets, nvdiffrec config validation, CLI and registry."""

from __future__ import annotations

import pytest

from workbench.cli import build_parser, main, recon_parameters
from workbench.config import (
    ReconOptions,
    load_base_config,
    parse_options,
    recon_job_config,
)
from workbench.errors import ConfigError
from workbench.notebook import notebook_parameters, notebooks_dir
from workbench.recon.nvdiffrec_config import NvdiffrecConfig
from workbench.registry import REGISTRY

BASE = load_base_config("recon")


@pytest.mark.parametrize("preset", ["cpu", "default", "paper"])
def test_every_preset_gives_a_valid_nvdiffrec_config(preset):
    config = recon_job_config(parse_options(ReconOptions, {"images": "x", "preset": preset}), BASE)
    assert config["preset"] == preset and "presets" not in config
    cfg = NvdiffrecConfig.from_dict(config["nvdiffrec"])
    assert cfg.iter == BASE["presets"][preset]["iter"]
    assert list(cfg.train_res) == BASE["presets"][preset]["train_res"]


def test_set_overrides_any_nvdiffrec_key_and_other_sections():
    options = parse_options(ReconOptions, {"images": "x", "overrides": {
        "nvdiffrec.iter": "12", "nvdiffrec.lock_pos": "true", "evaluate.sample_points": "500"}})
    config = recon_job_config(options, BASE)
    cfg = NvdiffrecConfig.from_dict(config["nvdiffrec"])
    assert cfg.iter == 12 and cfg.lock_pos is True
    assert config["evaluate"]["sample_points"] == 500


def test_bare_upstream_keys_set_the_model_section():
    options = parse_options(ReconOptions, {"images": "x", "overrides": {"iter": "800", "train_res": "[96, 96]",
                                                                        "timeouts.run_s": "60"}})
    config = recon_job_config(options, BASE)
    cfg = NvdiffrecConfig.from_dict(config["nvdiffrec"])
    assert cfg.iter == 800 and tuple(cfg.train_res) == (96, 96) and config["timeouts"]["run_s"] == 60


def test_unknown_or_bad_keys_are_config_errors():
    options = parse_options(ReconOptions, {"images": "x", "overrides": {"nvdiffrec.itr": "12"}})
    with pytest.raises(ConfigError, match="itr"):
        NvdiffrecConfig.from_dict(recon_job_config(options, BASE)["nvdiffrec"])
    with pytest.raises(ConfigError, match="dmtet_grid"):
        NvdiffrecConfig.from_dict({"dmtet_grid": 1})
    with pytest.raises(ConfigError, match="preset"):
        parse_options(ReconOptions, {"images": "x", "preset": "fast"})
    with pytest.raises(ConfigError, match="evaluat"):
        recon_job_config(parse_options(ReconOptions, {"images": "x", "overrides": {"evaluat.x": 1}}), BASE)


def test_registry_and_learning_rate_forms():
    spec = REGISTRY.model("nvdiffrec")
    assert spec.pipeline == "recon" and REGISTRY.choices("recon", "model") == ("nvdiffrec",)
    assert isinstance(spec.config, NvdiffrecConfig)
    assert NvdiffrecConfig(learning_rate=0.02).lr_geometry == 0.02
    cfg = NvdiffrecConfig.from_dict({"learning_rate": [0.01, 0.002]})
    assert (cfg.lr_geometry, cfg.lr_material) == (0.01, 0.002)


def test_cli_parameters_match_the_notebook():
    args = build_parser().parse_args(["run", "recon", "--images", "views", "--set", "nvdiffrec.iter=5"])
    params = recon_parameters(args)
    declared = notebook_parameters(notebooks_dir() / REGISTRY.pipeline("recon").notebook)
    assert set(params) | {"run_dir", "interactive"} == set(declared)
    assert params["overrides"] == {"nvdiffrec.iter": "5"}


def test_cli_bad_set_key_exits_2_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["run", "recon", "--images", str(tmp_path), "--out", str(out), "--set", "nvdiffrec.bogus=1"])
    assert code == 2 and not out.exists()
    assert "bogus" in capsys.readouterr().err
