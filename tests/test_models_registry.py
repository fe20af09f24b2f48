"""Model registry and self-describing model folders."""

from __future__ import annotations

import json

import pytest

from workbench.errors import ErrorCode, WorkbenchError
from workbench.models import list_model_folders, read_model_folder, verify_model_folder, write_metadata
from workbench.registry import REGISTRY


def make_folder(root, name="toy"):
    folder = root / name
    (folder / "fold_all").mkdir(parents=True)
    (folder / "fold_all" / "weights.pth").write_bytes(b"\x00\x01weights" * 100)
    (folder / "model_card.md").write_text("# toy\n")
    write_metadata(folder, name=name, version="1.0", licence="MIT", provenance="unit test")
    return folder


def test_verify_detects_corruption_and_missing_files(tmp_path):
    folder = make_folder(tmp_path)
    assert verify_model_folder(folder).ok
    weights = folder / "fold_all" / "weights.pth"
    data = bytearray(weights.read_bytes())
    data[0] ^= 0xFF
    weights.write_bytes(bytes(data))
    report = verify_model_folder(folder)
    assert not report.ok and "sha256" in report.problems[0]
    weights.unlink()
    assert "missing" in verify_model_folder(folder).problems[0]


def test_metadata_problems_are_model_unavailable(tmp_path):
    with pytest.raises(WorkbenchError) as info:
        read_model_folder(tmp_path / "nope")
    assert info.value.code is ErrorCode.MODEL_UNAVAILABLE
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "metadata.json").write_text(json.dumps({"name": "bad"}))
    with pytest.raises(WorkbenchError, match="lacks version, licence, provenance, files"):
        read_model_folder(tmp_path / "bad")


def test_list_model_folders(tmp_path):
    make_folder(tmp_path, "a")
    make_folder(tmp_path, "b")
    assert [f.name for f in list_model_folders(tmp_path)] == ["a", "b"]


def test_registry_models_have_documented_configs():
    for spec in REGISTRY.models.values():
        assert spec.description and spec.setup.count(":") == 1
        assert spec.config.__doc__ and "Attributes" in spec.config.__doc__
        assert spec.config_fields()


def test_model_without_implementation_is_model_unavailable():
    from dataclasses import replace

    spec = replace(REGISTRY.model("nnunet_fullres"), setup="workbench.no_such_module:setup")
    with pytest.raises(WorkbenchError) as info:
        spec.load()
    assert info.value.code is ErrorCode.MODEL_UNAVAILABLE and "no_such_module" in info.value.message
    with pytest.raises(WorkbenchError) as info:
        REGISTRY.model("unet")
    assert info.value.code is ErrorCode.CONFIG_ERROR
