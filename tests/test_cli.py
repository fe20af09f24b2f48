"""The command line: help, exit codes, models, parameters sent to the notebooks."""

from __future__ import annotations

import subprocess
import sys

import pytest

from workbench.cli import build_parser, knee_parameters, main
from workbench.models import write_metadata
from workbench.notebook import RUN_PARAMETERS, check_parameters, notebook_parameters, notebooks_dir


@pytest.mark.parametrize("argv", [
    [], ["run"], ["run", "knee"], ["data"], ["data", "sample"], ["data", "fetch"], ["models"], ["models", "list"],
    ["models", "verify"], ["report"], ["demo"],
])
def test_every_command_has_help(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv + ["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "usage:" in out and "examples:" in out


@pytest.mark.parametrize("argv", [["run", "knee", "--input", "x", "--example"], ["dance"]])
def test_usage_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert "hint:" in capsys.readouterr().err


def test_runs_with_examples_in_help(capsys):
    with pytest.raises(SystemExit):
        main(["run", "knee", "--help"])
    out = capsys.readouterr().out
    assert "examples:" in out and "nnunet_cascade" in out and "bone_and_cart" in out


@pytest.mark.parametrize("argv, word", [
    (["run", "knee", "--input", "x.nii.gz", "--segmentation-model", "unet"], "invalid choice"),
    (["run", "knee", "--input", "x.nii.gz", "--device", "tpu"], "device"),
    (["run", "knee", "--input", "x.nii.gz", "--timeout", "10", "--step-timeout", "load_input=20"], "exceeds"),
    (["run", "knee", "--input", "x.nii.gz", "--step-timeout", "load_input"], "NAME=SECONDS"),
])
def test_bad_options_exit_2_before_anything_is_written(argv, word, capsys, tmp_path):
    out = tmp_path / "run"
    try:
        code = main(argv + ["--out", str(out)])
    except SystemExit as exc:
        code = exc.code
    assert code == 2
    assert word in capsys.readouterr().err
    assert not out.exists()


def test_data_sample_writes_a_case(tmp_path, capsys):
    assert main(["data", "sample", "knee", "--out", str(tmp_path), "--seed", "2"]) == 0
    out = capsys.readouterr().out
    for key in ("dicom", "image", "labels", "case"):
        assert f"{key}: " in out
    assert len(list((tmp_path / "knee_sample_dicom").iterdir())) > 10
    assert (tmp_path / "knee_sample_labels.nii.gz").stat().st_size > 1000


def test_models_list_and_verify(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORKBENCH_MODELS", str(tmp_path))
    assert main(["models", "list"]) == 0
    assert "nnunet_cascade" in capsys.readouterr().out
    folder = tmp_path / "toy"
    folder.mkdir()
    (folder / "w.pth").write_bytes(b"weights" * 10)
    (folder / "model_card.md").write_text("# toy")
    write_metadata(folder, name="toy", version="1", licence="MIT", provenance="test")
    assert main(["models", "verify"]) == 0
    (folder / "w.pth").write_bytes(b"tampered" * 10)
    assert main(["models", "verify"]) == 3
    assert "toy" in capsys.readouterr().out


def test_knee_notebook_parameters_match_what_the_cli_sends():
    args = build_parser().parse_args(["run", "knee", "--input", "x", "--step-timeout", "load_input=5"])
    sent = dict(knee_parameters(args), run_dir="/tmp/r", interactive=False)
    notebook = notebooks_dir() / "knee_mri.ipynb"
    check_parameters(notebook, sent)  # every value is plain and declared
    assert set(notebook_parameters(notebook)) == set(sent)


def test_quickstart_parameters_are_declared():
    declared = notebook_parameters(notebooks_dir() / "quickstart.ipynb")
    assert {"sample_dir", "seed", *RUN_PARAMETERS} == set(declared)


def test_console_script_runs():
    proc = subprocess.run([sys.executable, "-m", "workbench.cli", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and "workbench" in proc.stdout
