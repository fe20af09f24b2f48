"""NIfTI reading/writing, NRRD label maps, load_volume dispatch and to_canonical."""

from __future__ import annotations

import shutil

import nibabel as nib
import numpy as np
import pytest
from helpers import assert_error

from workbench.errors import ErrorCode, InputNotFound, InvalidFormat
from workbench.io.load import load_volume
from workbench.io.nifti import read_label_map, read_nifti, write_nifti
from workbench.io.volume import Volume, to_canonical


def oblique_affine(spacing=(0.8, 0.7, 2.5), origin=(-30.0, 12.5, 40.0)) -> np.ndarray:
    theta = np.deg2rad(17.0)
    rot = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag(spacing)
    affine[:3, 3] = origin
    return affine


# --------------------------------------------------------------------------- NIfTI


@pytest.mark.parametrize("name", ["vol.nii", "vol.nii.gz"])
def test_write_read_round_trip(tmp_path, name):
    rng = np.random.default_rng(0)
    data = rng.normal(size=(9, 8, 7)).astype(np.float32)
    affine = oblique_affine()
    path = write_nifti(data, affine, tmp_path / "sub" / name)
    assert path == tmp_path / "sub" / name and path.is_file()
    assert [p.name for p in path.parent.iterdir()] == [name]  # no temporary left behind
    img = nib.load(str(path))
    assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 1
    np.testing.assert_allclose(img.get_qform(), affine, atol=1e-5)
    np.testing.assert_allclose(img.get_sform(), affine, atol=1e-6)
    assert img.header.get_xyzt_units() == ("mm", "sec")
    volume = read_nifti(path)
    np.testing.assert_array_equal(volume.data, data)
    assert volume.data.dtype == np.float32
    np.testing.assert_allclose(volume.affine, affine, atol=1e-6)
    assert volume.meta["source"] == str(path) and volume.meta["sform_code"] == 1


def test_write_volume_4d_and_label_dtypes(tmp_path):
    affine = oblique_affine()
    echoes = np.random.default_rng(1).random((5, 4, 3, 6)).astype(np.float32)
    volume = Volume(echoes[..., 0], affine, echoes=echoes, echo_times_ms=list(range(6)))
    write_nifti(volume, tmp_path / "first.nii.gz")  # (volume, path) form
    np.testing.assert_array_equal(np.asanyarray(nib.load(str(tmp_path / "first.nii.gz")).dataobj), echoes[..., 0])
    write_nifti(echoes, affine, tmp_path / "echoes.nii.gz")
    assert nib.load(str(tmp_path / "echoes.nii.gz")).shape == (5, 4, 3, 6)

    labels = np.array([0.0, 1.0, 2.0000001, 15.0] * 15).reshape(5, 4, 3)
    write_nifti(labels, affine, tmp_path / "labels.nii.gz", dtype=np.uint8)
    img = nib.load(str(tmp_path / "labels.nii.gz"))
    assert img.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), np.rint(labels))
    write_nifti(labels > 1, affine, tmp_path / "mask.nii.gz")
    assert nib.load(str(tmp_path / "mask.nii.gz")).get_data_dtype() == np.uint8
    write_nifti(np.arange(60, dtype=np.int64).reshape(5, 4, 3), affine, tmp_path / "int.nii.gz")
    assert nib.load(str(tmp_path / "int.nii.gz")).get_data_dtype() == np.int32
    with pytest.raises(ValueError):
        write_nifti(labels * 100, affine, tmp_path / "too_big.nii.gz", dtype=np.uint8)
    with pytest.raises(InvalidFormat):
        write_nifti(labels, affine, tmp_path / "labels.png")


def test_read_scaled_integers_as_float32(tmp_path):
    img = nib.Nifti1Image(np.arange(24, dtype=np.int16).reshape(2, 3, 4), np.eye(4))
    img.header.set_slope_inter(0.5, 10)
    nib.save(img, str(tmp_path / "scaled.nii"))
    volume = read_nifti(tmp_path / "scaled.nii")
    assert volume.data.dtype == np.float32
    np.testing.assert_allclose(volume.data, np.arange(24).reshape(2, 3, 4) * 0.5 + 10)
    nib.save(nib.Nifti1Image(np.ones((2, 3, 4), np.uint16), np.eye(4)), str(tmp_path / "plain.nii"))
    assert read_nifti(tmp_path / "plain.nii").data.dtype == np.uint16


def test_trailing_singleton_is_dropped(tmp_path):
    nib.save(nib.Nifti1Image(np.ones((4, 5, 6, 1), np.float32), np.eye(4)), str(tmp_path / "t1.nii.gz"))
    assert read_nifti(tmp_path / "t1.nii.gz").shape == (4, 5, 6)


def test_4d_nifti_is_rejected(tmp_path):
    path = tmp_path / "four_d.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8, 3), np.float32), np.eye(4)), str(path))
    with pytest.raises(InvalidFormat) as excinfo:
        read_nifti(path)
    assert_error(excinfo, ErrorCode.INVALID_FORMAT, "four_d.nii.gz", "3-D volume was expected", "[8, 8, 8, 3]")
    with pytest.raises(InvalidFormat):
        load_volume(path)


def test_2d_nifti_is_rejected(tmp_path):
    path = tmp_path / "flat.nii"
    nib.save(nib.Nifti1Image(np.zeros((8, 8), np.float32), np.eye(4)), str(path))
    with pytest.raises(InvalidFormat) as excinfo:
        read_nifti(path)
    assert_error(excinfo, ErrorCode.INVALID_FORMAT, "flat.nii", "3-D")


def test_png_renamed_nii(tmp_path):
    from PIL import Image

    Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "picture.png")
    shutil.copy(tmp_path / "picture.png", tmp_path / "picture.nii")
    for reader in (read_nifti, load_volume, read_label_map):
        with pytest.raises(InvalidFormat) as excinfo:
            reader(tmp_path / "picture.nii")
        assert_error(excinfo, ErrorCode.INVALID_FORMAT, "picture.nii")


def test_truncated_gzip_nifti(tmp_path):
    path = tmp_path / "cut.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(2).random((20, 20, 20)).astype(np.float32), np.eye(4)), str(path))
    path.write_bytes(path.read_bytes()[:4000])
    with pytest.raises(InvalidFormat) as excinfo:
        read_nifti(path)
    assert_error(excinfo, ErrorCode.INVALID_FORMAT, "cut.nii.gz")


def test_missing_nifti(tmp_path):
    with pytest.raises(InputNotFound) as excinfo:
        read_nifti(tmp_path / "gone.nii.gz")
    assert_error(excinfo, ErrorCode.FILE_NOT_FOUND, "gone.nii.gz")


# --------------------------------------------------------------------------- NRRD label maps


def _write_nrrd(path, data, directions, origin, space="left-posterior-superior", **extra):
    import nrrd

    header = {"space": space, "space directions": np.asarray(directions, float),
              "space origin": np.asarray(origin, float), "kinds": ["domain"] * data.ndim, "encoding": "gzip", **extra}
    nrrd.write(str(path), data, header)


def test_nrrd_lps_geometry_to_ras(tmp_path):
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 5, size=(6, 5, 4)).astype(np.uint8)
    directions = np.array([[0.05, 0.36, 0.0], [0.0, 0.0, -0.36], [-0.69, 0.1, 0.0]])  # rows: one per axis, LPS
    origin = np.array([-24.3, -87.7, 71.9])
    _write_nrrd(tmp_path / "seg.nrrd", labels, directions, origin,
                Segment0_Name="femur", Segment0_LabelValue="1")
    volume = read_label_map(tmp_path / "seg.nrrd")
    assert volume.data.dtype == np.uint8 and volume.meta["kind"] == "label_map"
    np.testing.assert_array_equal(volume.data, labels)
    flip = np.array([-1.0, -1.0, 1.0])
    for ijk in [(0, 0, 0), (5, 4, 3), (2, 1, 3)]:
        lps = origin + np.asarray(ijk) @ directions
        np.testing.assert_allclose((volume.affine @ np.append(ijk, 1.0))[:3], flip * lps, atol=1e-9)
    assert volume.meta["segments"] == {"1": "femur"}
    canonical = load_volume(tmp_path / "seg.nrrd")
    assert canonical.data.dtype == np.uint8 and sorted(canonical.shape) == sorted(labels.shape)


def test_nrrd_ras_space_and_float_labels(tmp_path):
    labels = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    _write_nrrd(tmp_path / "ras.nrrd", labels, np.diag([1.0, 2.0, 3.0]), [1.0, 2.0, 3.0], space="RAS")
    volume = read_label_map(tmp_path / "ras.nrrd")
    assert volume.data.dtype == np.uint8
    np.testing.assert_array_equal(volume.data, labels)
    np.testing.assert_allclose(volume.affine, [[1, 0, 0, 1], [0, 2, 0, 2], [0, 0, 3, 3], [0, 0, 0, 1]])


def test_nrrd_bad_inputs(tmp_path):
    _write_nrrd(tmp_path / "soft.nrrd", np.full((2, 3, 4), 0.5, np.float32), np.eye(3), [0, 0, 0])
    with pytest.raises(InvalidFormat) as excinfo:
        read_label_map(tmp_path / "soft.nrrd")
    assert_error(excinfo, ErrorCode.INVALID_FORMAT, "soft.nrrd", "non-integer")

    import nrrd

    nrrd.write(str(tmp_path / "layers.nrrd"), np.zeros((3, 4, 5, 6), np.uint8), {
        "space": "left-posterior-superior", "kinds": ["list", "domain", "domain", "domain"],
        "space directions": np.array([[np.nan] * 3, [1, 0, 0], [0, 1, 0], [0, 0, 1]], float),
        "space origin": np.zeros(3)})
    with pytest.raises(InvalidFormat) as excinfo:
        read_label_map(tmp_path / "layers.nrrd")
    assert_error(excinfo, ErrorCode.INVALID_FORMAT, "layers.nrrd", "3-D label map", "[3, 4, 5, 6]")

    (tmp_path / "junk.nrrd").write_text("this is not NRRD\n")
    with pytest.raises(InvalidFormat) as excinfo:
        read_label_map(tmp_path / "junk.nrrd")
    assert_error(excinfo, ErrorCode.INVALID_FORMAT, "junk.nrrd")

    (tmp_path / "labels.csv").write_text("0,1\n")
    with pytest.raises(InvalidFormat) as excinfo:
        read_label_map(tmp_path / "labels.csv")
    assert_error(excinfo, ErrorCode.INVALID_FORMAT, "labels.csv")


def test_nifti_label_map(tmp_path):
    labels = np.random.default_rng(4).integers(0, 300, size=(4, 4, 4)).astype(np.float64)
    nib.save(nib.Nifti1Image(labels, np.eye(4)), str(tmp_path / "lab.nii.gz"))
    volume = read_label_map(tmp_path / "lab.nii.gz")
    assert volume.data.dtype == np.int16  # smallest type holding 0..299
    np.testing.assert_array_equal(volume.data, labels)


@pytest.fixture(scope="module")
def mskt_labels(mskt_dir):
    from workbench.data.samples import label_map_paths

    return label_map_paths(fetch=False)


@pytest.mark.mese
def test_real_knee_nrrd_label_map(mskt_labels):
    import nrrd

    path = mskt_labels["right_knee_example"]
    volume = read_label_map(path)
    assert volume.shape == (384, 384, 160)
    assert volume.data.dtype.kind in "iu" and int(volume.data.max()) > 0
    header = nrrd.read_header(str(path))
    expected = np.eye(4)
    expected[:3, :3] = np.diag([-1.0, -1.0, 1.0]) @ np.asarray(header["space directions"]).T
    expected[:3, 3] = np.array([-1.0, -1.0, 1.0]) * header["space origin"]
    np.testing.assert_allclose(volume.affine, expected, atol=1e-9)
    assert volume.spacing == pytest.approx((0.3646, 0.3646, 0.7), abs=1e-3)


# --------------------------------------------------------------------------- to_canonical


def test_to_canonical_keeps_world_coordinates():
    rng = np.random.default_rng(5)
    data = rng.random((6, 5, 4)).astype(np.float32)
    echoes = rng.random((6, 5, 4, 2)).astype(np.float32)
    # voxel axes: i -> -S, j -> +R, k -> -A (a permuted, flipped and slightly rotated grid)
    affine = np.zeros((4, 4))
    affine[:3, 0] = [0.0, 0.05, -1.2]
    affine[:3, 1] = [0.7, 0.0, 0.02]
    affine[:3, 2] = [0.0, -3.0, 0.0]
    affine[:3, 3] = [-20.0, 35.0, 12.0]
    affine[3, 3] = 1.0
    volume = Volume(data, affine, echoes=echoes, echo_times_ms=[1.0, 2.0], meta={"x": 1})
    canonical = to_canonical(volume)
    assert canonical.shape == (5, 4, 6)
    assert np.all(np.argmax(np.abs(canonical.affine[:3, :3]), axis=0) == [0, 1, 2])
    assert np.all(np.diag(canonical.affine[:3, :3]) > 0)
    inverse = np.linalg.inv(affine)
    for ijk in np.ndindex(canonical.shape):
        source = inverse @ canonical.affine @ np.append(ijk, 1.0)
        index = np.rint(source[:3]).astype(int)
        np.testing.assert_allclose(source[:3], index, atol=1e-9)  # same voxel centres, no resampling
        assert canonical.data[ijk] == data[tuple(index)]
        assert canonical.echoes[(*ijk, 1)] == echoes[(*index, 1)]
    assert canonical.meta == {"x": 1} and canonical.echo_times_ms == [1.0, 2.0]


def test_load_volume_nifti_is_canonical(tmp_path):
    affine = np.diag([-0.5, 0.6, -2.0, 1.0])
    affine[:3, 3] = [10, -5, 3]
    data = np.random.default_rng(6).random((4, 5, 6)).astype(np.float32)
    write_nifti(data, affine, tmp_path / "lpi.nii.gz")
    raw = load_volume(tmp_path / "lpi.nii.gz", canonical=False)
    np.testing.assert_allclose(raw.affine, affine)
    canonical = load_volume(tmp_path / "lpi.nii.gz")
    np.testing.assert_array_equal(canonical.data, data[::-1, :, ::-1])
    np.testing.assert_allclose(canonical.affine[:3, 3], (affine @ [3, 0, 5, 1])[:3])
    assert canonical.meta["canonical"] is True
