"""DICOM reading: geometry, grouping, rescaling, multi-echo, multi-frame, typed errors, SimpleITK cross-checks."""

from __future__ import annotations

import shutil
from pathlib import Path

import dicom_factory as factory
import numpy as np
import pydicom
import pytest
from helpers import assert_error

from workbench.errors import ConfigError, DicomError, ErrorCode, InputNotFound, InvalidFormat
from workbench.io.dicom import SeriesInfo, is_dicom_file, list_series, read_dicom
from workbench.io.load import load_volume
from workbench.io.volume import Volume

SHAPE = (20, 16, 7)  # columns, rows, slices


# --------------------------------------------------------------------------- helpers


def _sitk():
    sitk = pytest.importorskip("SimpleITK")
    sitk.ProcessObject_SetGlobalWarningDisplay(False)
    return sitk


def sitk_read(files: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Read ``files`` with SimpleITK's series reader; return ``[i, j, k]`` data and a RAS+ affine."""
    sitk = _sitk()
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(f) for f in files])
    image = reader.Execute()
    data = sitk.GetArrayFromImage(image).transpose(2, 1, 0)  # sitk arrays are [k, j, i]
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = direction * np.asarray(image.GetSpacing())
    lps[:3, 3] = image.GetOrigin()
    return data, np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def gdcm_files_by_echo(folder: Path) -> list[list[str]]:
    """GDCM's sorted file names of the folder's only series, split by echo (order kept)."""
    sitk = _sitk()
    names = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder))
    groups: dict[float, list[str]] = {}
    for name in names:
        te = float(pydicom.dcmread(name, stop_before_pixels=True).EchoTime)
        groups.setdefault(te, []).append(name)
    return [groups[te] for te in sorted(groups)]


def world(affine: np.ndarray, ijk) -> np.ndarray:
    return (affine @ np.append(np.asarray(ijk, float), 1.0))[:3]


# --------------------------------------------------------------------------- shared synthetic data


@pytest.fixture(scope="module")
def oblique(tmp_path_factory):
    """An oblique single-echo int16 series, files in random order."""
    folder = tmp_path_factory.mktemp("oblique")
    affine = factory.oblique_affine()
    stored = factory.random_stored(SHAPE, seed=1)
    factory.write_series(folder, stored, affine)
    return folder, stored, affine


@pytest.fixture(scope="module")
def multi_echo(tmp_path_factory):
    """Three echoes written with TEs out of order (25, 5, 15 ms) and a rescale slope/intercept."""
    folder = tmp_path_factory.mktemp("mecho")
    affine = factory.oblique_affine(spacing=(0.5, 0.55, 2.5), angles_deg=(-8, 15, 30))
    stored = factory.random_stored((*SHAPE, 3), seed=2)
    factory.write_series(folder, stored, affine, echo_times_ms=[25.0, 5.0, 15.0], slope=0.25, intercept=-10,
                         private_ge={0x10B6: "123.5", 0x10B7: "4.25"})
    return folder, stored, affine


# --------------------------------------------------------------------------- geometry and voxels


def test_round_trip_oblique_affine_and_voxels(oblique):
    folder, stored, affine = oblique
    volume = read_dicom(folder)
    assert isinstance(volume, Volume)
    assert volume.shape == SHAPE
    np.testing.assert_allclose(volume.affine, affine, atol=1e-4)
    assert volume.data.dtype == np.int16  # no rescale: stored dtype kept
    np.testing.assert_array_equal(volume.data, stored)
    assert volume.echoes is None and volume.echo_times_ms == [10.0]
    meta = volume.meta
    assert meta["source"] == str(folder) and meta["format"] == "dicom"
    assert meta["series_number"] == 5 and meta["series_description"] == "synthetic sag"
    assert meta["modality"] == "MR" and meta["manufacturer"] == "GE MEDICAL SYSTEMS"
    assert meta["magnetic_field_strength_t"] == 3.0 and meta["repetition_time_ms"] == 2450.0
    assert meta["flip_angle_deg"] == 90.0 and meta["echo_times_ms"] == [10.0]
    assert "ge_0019_10b6" not in meta and "ge_0019_10b7" not in meta
    assert meta["rescaled"] is False and meta["sheared"] is False


def test_matches_simpleitk_on_synthetic_series(oblique):
    folder, _, _ = oblique
    volume = read_dicom(folder)
    (files,) = gdcm_files_by_echo(folder)
    data, affine = sitk_read(files)
    np.testing.assert_allclose(volume.affine, affine, atol=1e-4)
    np.testing.assert_array_equal(volume.data, data)


def test_reversed_slice_order_keeps_world_coordinates(tmp_path):
    affine = factory.oblique_affine()
    affine[:3, 2] *= -1  # slices written against the DICOM normal
    stored = factory.random_stored((10, 9, 5), seed=3)
    factory.write_series(tmp_path, stored, affine)
    volume = read_dicom(tmp_path)
    np.testing.assert_array_equal(volume.data, stored[:, :, ::-1])
    for ijk in [(0, 0, 0), (9, 8, 4), (3, 5, 2)]:
        i, j, k = ijk
        np.testing.assert_allclose(world(volume.affine, (i, j, 4 - k)), world(affine, ijk), atol=1e-4)


def test_rescale_gives_float32(tmp_path):
    stored = factory.random_stored((12, 10, 4), seed=4, dtype=np.uint16)
    factory.write_series(tmp_path, stored, factory.oblique_affine(), slope=0.5, intercept=-100)
    volume = read_dicom(tmp_path)
    assert volume.data.dtype == np.float32 and volume.meta["rescaled"] is True
    np.testing.assert_allclose(volume.data, stored * 0.5 - 100, rtol=0, atol=1e-3)
    assert volume.meta["rescale_slope"] == 0.5 and volume.meta["rescale_intercept"] == -100


def test_folder_walk_skips_hidden_dicomdir_and_non_dicom(tmp_path, oblique):
    folder, stored, affine = oblique
    nested = tmp_path / "study" / "series"
    nested.mkdir(parents=True)
    for i, src in enumerate(sorted(folder.iterdir())):
        shutil.copy(src, nested / f"{i:05d}")  # no .dcm ending
    factory.strip_preamble(next(nested.iterdir()))  # one bare dataset without the DICM preamble
    (tmp_path / "study" / "README.txt").write_text("notes\n")
    (tmp_path / "study" / "DICOMDIR").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 64)
    (nested / ".hidden").write_bytes(b"junk")
    hidden_dir = tmp_path / ".cache"
    hidden_dir.mkdir()
    shutil.copy(next(folder.iterdir()), hidden_dir / "copy.dcm")  # would be a duplicate slice if read
    (nested / "notes").write_bytes(b"plain text, no extension\n")
    volume = read_dicom(tmp_path)
    np.testing.assert_array_equal(volume.data, stored)
    np.testing.assert_allclose(volume.affine, affine, atol=1e-4)
    assert volume.meta["skipped_files"] == 1  # 'notes' (the .txt is not even opened)


def test_single_slice_file(oblique):
    folder, stored, affine = oblique
    one = sorted(folder.iterdir())[0]
    volume = read_dicom(one)
    assert volume.shape[:2] == SHAPE[:2] and volume.shape[2] == 1
    k = int(pydicom.dcmread(one).InstanceNumber) - 1
    np.testing.assert_array_equal(volume.data[..., 0], stored[:, :, k])
    np.testing.assert_allclose(volume.affine[:3, :2], affine[:3, :2], atol=1e-4)
    np.testing.assert_allclose(volume.affine[:3, 3], world(affine, (0, 0, k)), atol=1e-4)


# --------------------------------------------------------------------------- multi-echo


def test_multi_echo_sorted_by_echo_time(multi_echo):
    folder, stored, affine = multi_echo
    volume = read_dicom(folder)
    assert volume.echo_times_ms == [5.0, 15.0, 25.0]
    assert volume.echoes.shape == (*SHAPE, 3) and volume.echoes.dtype == np.float32
    expected = stored.astype(np.float64) * 0.25 - 10
    order = [1, 2, 0]  # written TEs were 25, 5, 15
    for e, source in enumerate(order):
        np.testing.assert_allclose(volume.echoes[..., e], expected[..., source], atol=1e-4)
    np.testing.assert_array_equal(volume.data, volume.echoes[..., 0])
    assert not np.shares_memory(volume.data, volume.echoes)
    np.testing.assert_allclose(volume.affine, affine, atol=1e-4)
    assert volume.meta["n_echoes"] == 3 and volume.meta["echo_times_ms"] == [5.0, 15.0, 25.0]
    assert volume.meta["ge_0019_10b6"] == pytest.approx(123.5)
    assert volume.meta["ge_0019_10b7"] == pytest.approx(4.25)


def test_multi_echo_matches_simpleitk_per_echo(multi_echo):
    folder, _, _ = multi_echo
    volume = read_dicom(folder)
    groups = gdcm_files_by_echo(folder)
    assert len(groups) == 3
    for e, files in enumerate(groups):
        data, affine = sitk_read(files)
        np.testing.assert_allclose(volume.affine, affine, atol=1e-4)
        np.testing.assert_allclose(volume.echoes[..., e], data, atol=1e-4)


def test_echoes_with_equal_echo_time_are_split_by_echo_number(tmp_path):
    stored = factory.random_stored((6, 5, 4, 2), seed=7)
    factory.write_series(tmp_path, stored, factory.oblique_affine(), echo_times_ms=[8.0, 8.0])
    volume = read_dicom(tmp_path)
    assert volume.echo_times_ms == [8.0, 8.0] and volume.meta["echo_numbers"] == [1, 2]
    np.testing.assert_array_equal(volume.echoes, stored)


def test_gantry_tilt_keeps_sheared_step(tmp_path):
    affine = factory.oblique_affine()
    affine[:3, 2] += 0.4 * affine[:3, 0] / np.linalg.norm(affine[:3, 0])  # slices shifted along the rows
    stored = factory.random_stored((8, 7, 5), seed=8)
    factory.write_series(tmp_path, stored, affine)
    volume = read_dicom(tmp_path)
    assert volume.meta["sheared"] is True
    np.testing.assert_allclose(volume.affine, affine, atol=1e-4)
    np.testing.assert_array_equal(volume.data, stored)


def _echo_files(folder: Path, te: float) -> list[Path]:
    return sorted(p for p in folder.iterdir() if float(pydicom.dcmread(p, stop_before_pixels=True).EchoTime) == te)


def test_echo_with_shifted_positions_is_an_error(tmp_path, multi_echo):
    folder, _, _ = multi_echo
    target = tmp_path / "shifted"
    shutil.copytree(folder, target)
    for path in _echo_files(target, 15.0):
        ds = pydicom.dcmread(path)
        ds.ImagePositionPatient = [float(v) + 0.8 for v in ds.ImagePositionPatient]
        ds.save_as(path)
    with pytest.raises(DicomError) as excinfo:
        read_dicom(target)
    assert_error(excinfo, ErrorCode.DICOM_ERROR, "shifted", "different slice positions", "TE 15")


def test_echo_with_missing_file_is_an_error(tmp_path, multi_echo):
    folder, _, _ = multi_echo
    target = tmp_path / "short_echo"
    shutil.copytree(folder, target)
    files = _echo_files(target, 25.0)
    by_position = sorted(files, key=lambda p: int(pydicom.dcmread(p, stop_before_pixels=True).InstanceNumber))
    by_position[-1].unlink()  # the last slice of one echo: no gap within that echo
    with pytest.raises(DicomError) as excinfo:
        read_dicom(target)
    assert_error(excinfo, ErrorCode.DICOM_ERROR, "short_echo", "slice count")


# --------------------------------------------------------------------------- several series


@pytest.fixture(scope="module")
def two_series(tmp_path_factory):
    folder = tmp_path_factory.mktemp("two")
    affine = factory.oblique_affine()
    pd = factory.random_stored((10, 8, 4), seed=5)
    t2 = factory.random_stored((10, 8, 5), seed=6)
    factory.write_series(folder / "a", pd, affine, series_number=1, description="sag PD", name_prefix="A")
    factory.write_series(folder / "b", t2, affine, series_number=2, description="sag T2", name_prefix="B")
    return folder, pd, t2


def test_two_series_without_choice_lists_them(two_series):
    folder, _, _ = two_series
    with pytest.raises(DicomError) as excinfo:
        read_dicom(folder)
    assert_error(excinfo, ErrorCode.DICOM_ERROR, str(folder), "2 DICOM series", "#1 'sag PD' (4 files)",
                 "#2 'sag T2' (5 files)")
    assert "--series" in excinfo.value.hint


def test_pick_series_by_number_description_or_uid(two_series):
    folder, pd, t2 = two_series
    np.testing.assert_array_equal(read_dicom(folder, series="2").data, t2)
    np.testing.assert_array_equal(read_dicom(folder, series=1).data, pd)
    np.testing.assert_array_equal(read_dicom(folder, series="SAG t2").data, t2)
    infos = list_series(folder)
    assert [(i.number, i.description, i.n_files, i.shape) for i in infos] == [
        (1, "sag PD", 4, (10, 8, 4)), (2, "sag T2", 5, (10, 8, 5))]
    assert all(isinstance(i, SeriesInfo) and i.n_echoes == 1 and i.echo_times_ms == [10.0] for i in infos)
    np.testing.assert_array_equal(read_dicom(folder, series=infos[0].uid).data, pd)
    with pytest.raises(DicomError) as excinfo:
        read_dicom(folder, series="cor PD")
    assert_error(excinfo, ErrorCode.DICOM_ERROR, "cor PD", "sag PD", "sag T2")


def test_list_series_multi_echo(multi_echo):
    folder, _, _ = multi_echo
    (info,) = list_series(folder)
    assert info.n_echoes == 3 and info.echo_times_ms == [5.0, 15.0, 25.0]
    assert info.n_files == 3 * SHAPE[2] and info.shape == SHAPE and info.modality == "MR"


# --------------------------------------------------------------------------- multi-frame


def test_enhanced_multiframe_matches_single_frame(tmp_path, multi_echo):
    folder, stored, affine = multi_echo
    path = factory.write_multiframe(tmp_path / "mf" / "enhanced.dcm", stored, affine,
                                    echo_times_ms=[25.0, 5.0, 15.0], slope=0.25, intercept=-10)
    single = read_dicom(folder)
    for source in (path, path.parent):  # the file itself, or a folder holding it
        volume = read_dicom(source)
        assert volume.meta["multiframe"] is True and volume.meta["n_files"] == 1
        assert volume.echo_times_ms == [5.0, 15.0, 25.0]
        np.testing.assert_allclose(volume.affine, single.affine, atol=1e-6)
        np.testing.assert_array_equal(volume.echoes, single.echoes)
    (info,) = list_series(path)
    assert info.n_files == 1 and info.n_echoes == 3 and info.shape == SHAPE


def test_enhanced_multiframe_single_echo_without_rescale(tmp_path, oblique):
    _, stored, affine = oblique
    path = factory.write_multiframe(tmp_path / "mf.dcm", stored, affine)
    volume = read_dicom(path)
    assert volume.data.dtype == np.int16 and volume.echoes is None
    np.testing.assert_array_equal(volume.data, stored)
    np.testing.assert_allclose(volume.affine, affine, atol=1e-4)


# --------------------------------------------------------------------------- bad input


def _copy(folder: Path, tmp: Path, name: str) -> tuple[Path, list[Path]]:
    target = tmp / name
    shutil.copytree(folder, target)
    files = sorted(target.iterdir(), key=lambda p: int(pydicom.dcmread(p, stop_before_pixels=True).InstanceNumber))
    return target, files


def test_missing_path(tmp_path):
    with pytest.raises(InputNotFound) as excinfo:
        read_dicom(tmp_path / "does_not_exist")
    assert_error(excinfo, ErrorCode.FILE_NOT_FOUND, "does_not_exist")


def test_empty_folder(tmp_path):
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(InvalidFormat) as excinfo:
        read_dicom(tmp_path / "empty_dir")
    assert_error(excinfo, ErrorCode.INVALID_FORMAT, "no DICOM files", "empty_dir")


def test_folder_of_text_files(tmp_path):
    folder = tmp_path / "texts"
    folder.mkdir()
    for i in range(3):
        (folder / f"note{i}.txt").write_text("not an image\n")
        (folder / f"raw{i}").write_bytes(b"\x08\x00 looks like a group-8 tag, but is not DICOM" * 3)
    with pytest.raises(InvalidFormat) as excinfo:
        read_dicom(folder)
    assert_error(excinfo, ErrorCode.INVALID_FORMAT, "no DICOM files", "texts", "6 file(s)")
    assert "empty" not in excinfo.value.message


def test_non_image_dicom_is_skipped_in_folders_and_refused_alone(tmp_path, oblique):
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    folder, stored, _ = oblique
    target = tmp_path / "with_sr"
    shutil.copytree(folder, target)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    report = FileDataset(str(target / "report.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
    report.SOPClassUID = meta.MediaStorageSOPClassUID
    report.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    report.Modality = "SR"
    report.SeriesInstanceUID = generate_uid()
    report.save_as(target / "report.dcm", enforce_file_format=True)
    volume = read_dicom(target)
    np.testing.assert_array_equal(volume.data, stored)
    assert volume.meta["skipped_files"] == 1
    with pytest.raises(InvalidFormat) as excinfo:
        read_dicom(target / "report.dcm")
    assert_error(excinfo, ErrorCode.INVALID_FORMAT, "report.dcm", "without an image", "Basic Text SR")


def test_single_non_dicom_file(tmp_path):
    path = tmp_path / "photo.jpg.dcm"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 300)
    with pytest.raises(InvalidFormat) as excinfo:
        read_dicom(path)
    assert_error(excinfo, ErrorCode.INVALID_FORMAT, "photo.jpg.dcm", "not a DICOM file")
    assert not is_dicom_file(path)


@pytest.mark.parametrize("keep", [0.8, 0.5, 0.12, 0.07, 0.0])  # in the pixels, the header, the file meta, ...
def test_truncated_file(tmp_path, oblique, keep):
    target, files = _copy(oblique[0], tmp_path, "trunc")
    victim = files[-1]  # the last slice: losing it must not pass silently
    data = victim.read_bytes()
    victim.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(DicomError) as excinfo:
        read_dicom(target)
    assert_error(excinfo, ErrorCode.DICOM_ERROR, victim.name)


def test_compressed_without_decoder(tmp_path, oblique):
    from pydicom.pixels import get_decoder
    from pydicom.uid import JPEGLSLossless

    if get_decoder(JPEGLSLossless).is_available:
        pytest.skip("a JPEG-LS decoder is installed here")
    target, files = _copy(oblique[0], tmp_path, "jpegls")
    factory.recompress_as(files[2], JPEGLSLossless)
    with pytest.raises(DicomError) as excinfo:
        read_dicom(target)
    assert_error(excinfo, ErrorCode.DICOM_ERROR, files[2].name, "JPEG-LS", "1.2.840.10008.1.2.4.80")
    assert "pylibjpeg" in excinfo.value.hint and "dcmdjpeg" in excinfo.value.hint


def test_missing_slice(tmp_path, oblique):
    target, files = _copy(oblique[0], tmp_path, "gap")
    files[3].unlink()
    with pytest.raises(DicomError) as excinfo:
        read_dicom(target)
    assert_error(excinfo, ErrorCode.DICOM_ERROR, "missing slice", str(target), files[2].name, files[4].name)


def test_duplicate_positions(tmp_path, oblique):
    target, files = _copy(oblique[0], tmp_path, "dups")
    ds = pydicom.dcmread(files[2])
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(target / "copy_of_slice3.dcm")
    with pytest.raises(DicomError) as excinfo:
        read_dicom(target)
    assert_error(excinfo, ErrorCode.DICOM_ERROR, "duplicate slice positions", "dups", "copy_of_slice3.dcm")


def test_uneven_spacing(tmp_path, oblique):
    target, files = _copy(oblique[0], tmp_path, "uneven")
    normal = factory.LPS[:3, :3] @ oblique[2][:3, 2]
    for path in files[4:]:
        ds = pydicom.dcmread(path)
        ds.ImagePositionPatient = [float(v) for v in np.asarray(ds.ImagePositionPatient, float) + 0.1 * normal]
        ds.save_as(path)
    with pytest.raises(DicomError) as excinfo:
        read_dicom(target)
    assert_error(excinfo, ErrorCode.DICOM_ERROR, "uneven slice spacing", "uneven", files[3].name)


def test_mixed_orientation(tmp_path, oblique):
    target, files = _copy(oblique[0], tmp_path, "mixed_orient")
    ds = pydicom.dcmread(files[1])
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.save_as(files[1])
    with pytest.raises(DicomError) as excinfo:
        read_dicom(target)
    assert_error(excinfo, ErrorCode.DICOM_ERROR, "mixed slice orientations", "mixed_orient", files[1].name)


def test_mixed_rows_columns(tmp_path, oblique):
    target, files = _copy(oblique[0], tmp_path, "mixed_size")
    ds = pydicom.dcmread(files[2])
    ds.Rows, ds.Columns = 8, 10
    ds.PixelData = np.zeros((8, 10), np.int16).tobytes()
    ds.save_as(files[2])
    with pytest.raises(DicomError) as excinfo:
        read_dicom(target)
    assert_error(excinfo, ErrorCode.DICOM_ERROR, "mixed image sizes", "mixed_size", files[2].name)


# --------------------------------------------------------------------------- load_volume dispatch


def test_load_volume_dicom_folder_and_file(oblique):
    folder, stored, affine = oblique
    raw = load_volume(folder, canonical=False)
    np.testing.assert_allclose(raw.affine, affine, atol=1e-4)
    canonical = load_volume(folder)
    assert canonical.meta["canonical"] is True
    # canonical axes point along +R, +A, +S
    directions = canonical.affine[:3, :3]
    assert np.all(np.argmax(np.abs(directions), axis=0) == [0, 1, 2])
    assert np.all(np.diag(directions) > 0)
    assert np.isclose(canonical.data.sum(dtype=np.int64), stored.sum(dtype=np.int64))
    one = sorted(folder.iterdir())[0]
    assert load_volume(one, canonical=False).shape == (*SHAPE[:2], 1)


def test_load_volume_unknown_file(tmp_path):
    path = tmp_path / "scan.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 200)
    with pytest.raises(InvalidFormat) as excinfo:
        load_volume(path)
    assert_error(excinfo, ErrorCode.INVALID_FORMAT, "scan.png", "DICOM", "NIfTI", "NRRD")
    with pytest.raises(InputNotFound):
        load_volume(tmp_path / "nothing_here")


def test_series_option_rejected_for_nifti(tmp_path):
    import nibabel as nib

    path = tmp_path / "img.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), str(path))
    with pytest.raises(ConfigError) as excinfo:
        load_volume(path, series="2")
    assert_error(excinfo, ErrorCode.CONFIG_ERROR, "img.nii.gz", "--series")


def test_fast_pixel_path_equals_pydicom(oblique):
    from workbench.io.dicom import _native_pixels

    for path in sorted(oblique[0].iterdir())[:3]:
        ds = pydicom.dcmread(path)
        np.testing.assert_array_equal(_native_pixels(ds), ds.pixel_array)


# --------------------------------------------------------------------------- the real MESE series


@pytest.fixture(scope="module")
def mese(mskt_dir):
    return mskt_dir / "MESE_T2_dicom_data_anon"


@pytest.mark.mese
def test_mese_shape_and_echoes(mese):
    volume = read_dicom(mese)
    assert volume.shape == (256, 256, 24) and volume.echoes.shape == (256, 256, 24, 8)
    assert volume.data.dtype == np.int16
    tes = volume.echo_times_ms
    assert len(tes) == 8 and tes == sorted(tes)
    assert tes[0] == pytest.approx(6.3, abs=0.05) and tes[-1] == pytest.approx(50.5, abs=0.05)
    assert volume.spacing == pytest.approx((0.625, 0.625, 4.0), abs=1e-3)
    meta = volume.meta
    assert meta["manufacturer"].startswith("GE") and meta["magnetic_field_strength_t"] == 3.0
    assert meta["repetition_time_ms"] == 2450.0 and meta["flip_angle_deg"] == 90.0
    assert meta["series_number"] == 8 and meta["n_files"] == 192
    (info,) = list_series(mese)
    assert (info.n_files, info.n_echoes, info.shape) == (192, 8, (256, 256, 24))


@pytest.mark.mese
def test_mese_matches_simpleitk_per_echo(mese):
    volume = read_dicom(mese)
    groups = gdcm_files_by_echo(mese)
    assert [len(g) for g in groups] == [24] * 8
    for e, files in enumerate(groups):
        data, affine = sitk_read(files)
        np.testing.assert_allclose(volume.affine, affine, atol=1e-4)
        np.testing.assert_array_equal(volume.echoes[..., e], data)


@pytest.mark.mese
def test_mese_fast_pixel_path_big_endian(mese):
    from workbench.io.dicom import _native_pixels

    ds = pydicom.dcmread(sorted(mese.iterdir())[0])
    assert not ds.file_meta.TransferSyntaxUID.is_little_endian
    np.testing.assert_array_equal(_native_pixels(ds), ds.pixel_array)


@pytest.mark.mese
def test_mese_load_volume_canonical_keeps_world_coordinates(mese):
    raw = read_dicom(mese)
    canonical = load_volume(mese)
    assert canonical.echoes.shape[-1] == 8
    inverse = np.linalg.inv(raw.affine)
    rng = np.random.default_rng(0)
    for ijk in rng.integers(0, [c - 1 for c in canonical.shape], size=(20, 3)):
        source = np.rint(inverse @ canonical.affine @ np.append(ijk, 1.0))[:3].astype(int)
        assert canonical.data[tuple(ijk)] == raw.data[tuple(source)]
        assert canonical.echoes[(*ijk, 7)] == raw.echoes[(*source, 7)]
