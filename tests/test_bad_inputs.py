"""Bad input through the whole CLI path: its code, a clear message, exit 3, no completed-looking output."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from workbench.cli import main
from workbench.io.dicom_write import write_dicom_series
from workbench.io.volume import Volume
from workbench.schemas import RESULT_SCHEMA


def _volume(shape=(24, 20, 8), spacing=(1.0, 1.0, 2.0), seed=0):
    rng = np.random.default_rng(seed)
    data = (rng.random(shape) * 500 + 100).astype(np.float32)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = (-10, 20, 5)
    return Volume(data, affine)


def _series(folder: Path, **kw) -> list[Path]:
    kw.setdefault("series_description", "test series")
    return sorted(write_dicom_series(_volume(), folder, **kw))


def _by_position(files):
    return sorted(files, key=lambda f: float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]))


def make_missing(tmp):
    return tmp / "does_not_exist"


def make_empty(tmp):
    (tmp / "empty").mkdir()
    return tmp / "empty"


def make_text_files(tmp):
    folder = tmp / "texts"
    folder.mkdir()
    for i in range(3):
        (folder / f"note{i}.txt").write_text("not an image\n")
    return folder


def make_truncated(tmp):
    folder = tmp / "truncated"
    files = _series(folder)
    victim = files[3]
    victim.write_bytes(victim.read_bytes()[: len(victim.read_bytes()) // 2])
    return folder


def make_two_series(tmp):
    folder = tmp / "two"
    _series(folder / "a", series_number=1, series_description="sag PD")
    _series(folder / "b", series_number=2, series_description="sag T2")
    return folder


def make_slice_removed(tmp):
    folder = tmp / "gap"
    files = _by_position(_series(folder))
    files[4].unlink()
    return folder


def make_uneven(tmp):
    folder = tmp / "uneven"
    files = _by_position(_series(folder))
    for f in files[5:]:
        ds = pydicom.dcmread(f)
        pos = [float(v) for v in ds.ImagePositionPatient]
        pos[2] += 0.7
        ds.ImagePositionPatient = pos
        ds.save_as(f)
    return folder


def make_4d_nifti(tmp):
    path = tmp / "four_d.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8, 3), np.float32), np.eye(4)), str(path))
    return path


def make_png_as_nifti(tmp):
    from PIL import Image

    path = tmp / "picture.nii"
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp / "picture.png")
    shutil.copy(tmp / "picture.png", path)
    return path


CASES = [
    ("missing path", make_missing, "FILE_NOT_FOUND", "does_not_exist"),
    ("empty folder", make_empty, "INVALID_FORMAT", "empty"),
    ("folder of text files", make_text_files, "INVALID_FORMAT", "texts"),
    ("truncated DICOM", make_truncated, "DICOM_ERROR", ".dcm"),
    ("two series", make_two_series, "DICOM_ERROR", "sag T2"),
    ("slice removed", make_slice_removed, "DICOM_ERROR", "gap"),
    ("uneven spacing", make_uneven, "DICOM_ERROR", "spacing"),
    ("4-D NIfTI", make_4d_nifti, "INVALID_FORMAT", "four_d.nii.gz"),
    ("PNG renamed .nii", make_png_as_nifti, "INVALID_FORMAT", "picture.nii"),
]


@pytest.mark.slow
@pytest.mark.parametrize("label, make, code, word", CASES, ids=[c[0] for c in CASES])
def test_bad_input_fails_cleanly(tmp_path, capsys, label, make, code, word):
    source = make(tmp_path)
    out = tmp_path / "run"
    exit_code = main(["run", "knee", "--input", str(source), "--out", str(out), "--device", "cpu"])
    err = capsys.readouterr().err
    assert exit_code == 3, err
    assert f"[{code}]" in err and "hint:" in err
    result = json.loads((out / "result.json").read_text())
    import jsonschema

    jsonschema.validate(result, RESULT_SCHEMA)
    assert result["status"] == "failed"
    assert result["error"]["code"] == code, result["error"]
    assert word.lower() in result["error"]["message"].lower(), result["error"]["message"]
    assert "\n" not in result["error"]["message"] and result["error"]["hint"]
    assert result["outputs"] == []
    leftovers = [p.name for p in out.iterdir() if p.suffix in (".gz", ".png") or p.name == "input.json"]
    assert leftovers == [], leftovers
    assert not (out / ".work").exists()
    assert (out / "error.log").read_text().strip()
    report = (out / "report.html").read_text()  # a failed run still has its report
    assert code in report and "Traceback" not in report  # code, message, hint; the traceback is in error.log
