"""The label table, the DICOM writer and the synthetic knee generator.

Tests marked ``mese`` need the cached mskt sample data (``workbench data fetch``)
and are skipped cleanly without it; the others build their own inputs.
"""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pydicom
import pytest
from scipy import ndimage

from workbench.data import labels as L
from workbench.data.synthetic_knee import (
    PRESETS,
    SyntheticKneeConfig,
    generate_case,
    read_nrrd_labels,
    write_case,
)
from workbench.errors import ConfigError, DicomError, InvalidFormat, WorkbenchError
from workbench.io.dicom_write import write_dicom_series
from workbench.io.volume import Volume

sitk = pytest.importorskip("SimpleITK")


def _mskt_missing() -> bool:
    from workbench.data.samples import mskt_data_dir

    try:
        mskt_data_dir(fetch=False)
        return False
    except WorkbenchError:
        return True


#: skip cleanly (also outside this repository's conftest) when the mskt data is not cached
needs_mskt = pytest.mark.skipif(_mskt_missing(), reason="mskt sample data not cached; run `workbench data fetch`")


# --------------------------------------------------------------------------------------------------
# helpers


def _rotation(angles_deg):
    ax, ay, az = np.deg2rad(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _oblique_affine(spacing=(0.7, 0.6, 2.5), angles=(12.0, -20.0, 7.0), origin=(-40.5, 25.25, 60.0), flip_k=False):
    """RAS affine with oblique axes; k along (or against) the DICOM normal of i x j in LPS."""
    base = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])  # i->A, j->-S, k->R
    axes = _rotation(angles) @ base
    lps = np.diag([-1.0, -1.0, 1.0]) @ axes
    normal = np.cross(lps[:, 0], lps[:, 1])
    if (normal @ lps[:, 2] < 0) != flip_k:
        axes[:, 2] = -axes[:, 2]
    affine = np.eye(4)
    affine[:3, :3] = axes * np.asarray(spacing)
    affine[:3, 3] = origin
    return affine


def _read_sitk(folder, echo=None):
    """Read a series folder with SimpleITK/GDCM (GDCM's slice order); RAS array and affine."""
    names = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder))
    if echo is not None:
        names = [n for n in names if int(pydicom.dcmread(n, stop_before_pixels=True).EchoNumbers) == echo]
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(names)
    image = reader.Execute()
    direction = np.asarray(image.GetDirection()).reshape(3, 3) * np.asarray(image.GetSpacing())
    affine = np.eye(4)
    affine[:3, :3] = direction
    affine[:3, 3] = image.GetOrigin()
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine  # SimpleITK works in LPS
    return sitk.GetArrayFromImage(image).transpose(2, 1, 0), affine  # (z, y, x) -> (i, j, k)


def _world_corners(shape, affine):
    idx = np.array([[i, j, k, 1.0] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1) for k in (0, shape[2] - 1)])
    return (affine @ idx.T).T[:, :3]


def _toy_right_knee():
    """A small geometric right knee (RAS, 1 mm) with all nine workbench labels."""
    shape = (100, 100, 140)
    affine = np.eye(4)
    affine[:3, 3] = (10.0, -50.0, -70.0)
    x, y, z = np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij")
    x, y, z = x + 10.0, y - 50.0, z - 70.0
    x0, y0 = 60.0, 0.0
    lab = np.zeros(shape, np.uint8)
    femur = ((x - x0) ** 2 + (y - y0) ** 2 <= 14.0 ** 2) & (z >= 20)
    for dx in (-14.0, 14.0):
        femur |= ((x - x0 - dx) / 13.0) ** 2 + ((y - y0 + 2) / 20.0) ** 2 + ((z - 16.0) / 14.0) ** 2 <= 1.0
    plateau = ((x - x0) / 30.0) ** 2 + ((y - y0) / 22.0) ** 2
    tibia = ((plateau <= 1.0) & (z <= -4) & (z > -20)) | (((x - x0) ** 2 + (y - y0) ** 2 <= 15.0 ** 2) & (z <= -20))
    patella = ((x - x0 - 3) / 20.0) ** 2 + ((y - y0 - 30) / 8.0) ** 2 + ((z - 22.0) / 20.0) ** 2 <= 1.0
    fem_cart = ndimage.binary_dilation(femur, iterations=2) & ~femur & (z < 28)
    pat_cart = ndimage.binary_dilation(patella, iterations=2) & ~patella & (y < y0 + 30)
    tib_cart = (plateau <= 0.85) & (z > -4) & (z <= -1)
    menisci = (plateau > 0.6) & (plateau <= 1.0) & (z > -1) & (z <= 2) & (np.abs(x - x0) > 5)
    lab[femur] = L.FEMUR
    lab[tibia] = L.TIBIA
    lab[patella] = L.PATELLA
    lab[menisci & (x < x0)] = L.MED_MEN  # a right knee: medial towards -x
    lab[menisci & (x >= x0)] = L.LAT_MEN
    lab[tib_cart & (x < x0)] = L.MED_TIB_CART
    lab[tib_cart & (x >= x0)] = L.LAT_TIB_CART
    lab[fem_cart & (lab == 0)] = L.FEM_CART
    lab[pat_cart & (lab == 0)] = L.PAT_CART
    return Volume(lab, affine)


TOY = dict(shape=(48, 56, 40), spacing_mm=(1.5, 1.5, 2.0), seed=4)


@pytest.fixture(scope="module")
def toy_map():
    return _toy_right_knee()


# --------------------------------------------------------------------------------------------------
# label table


def test_label_table_is_consistent():
    assert L.KNEE_LABEL_VALUES == tuple(range(1, 10))
    assert [lab.value for lab in L.FEMORAL_SUBREGIONS] == [11, 12, 13, 14, 15]
    assert all(lab.parent == L.FEM_CART for lab in L.FEMORAL_SUBREGIONS)
    assert len(L.BY_KEY) == len(L.LABELS) == 14
    assert {L.BY_KEY[k].value for k in ("pat_cart", "fem_cart", "med_tib_cart", "lat_tib_cart", "med_men",
                                         "lat_men", "femur", "tibia", "patella")} == set(range(1, 10))
    rows = L.label_table()
    assert rows[0]["value"] == 0 and json.dumps(rows)
    assert L.color_lut().shape == (16, 3)
    assert L.label_name(3) == "medial tibial cartilage"
    with pytest.raises(ConfigError):
        L.label_name(10)


def test_mskt_mappings_cover_every_source_label():
    assert sorted(L.MSKT_RIGHT_KNEE_EXAMPLE) == list(range(1, 8))
    assert sorted(L.MSKT_SAG_3D_DESS) == list(range(1, 11))
    # every knee structure reachable; only the fibula dropped (explicitly)
    assert set(L.MSKT_SAG_3D_DESS.values()) == set(range(0, 10))
    assert [k for k, v in L.MSKT_SAG_3D_DESS.items() if v == 0] == [8]
    assert set(L.MSKT_RIGHT_KNEE_EXAMPLE.values()) == {1, 2, 3, 4, 7, 8, 9}


def test_remap_labels_refuses_silent_deletion():
    src = np.array([[[0, 1, 2], [3, 8, 10]]], np.int8)
    out = L.remap_labels(src, L.MSKT_SAG_3D_DESS)
    assert out.dtype == np.uint8
    assert out.tolist() == [[[0, L.FEM_CART, L.MED_TIB_CART], [L.LAT_TIB_CART, 0, L.MED_MEN]]]
    with pytest.raises(InvalidFormat, match=r"\[8, 10\]"):
        L.remap_labels(src, L.MSKT_RIGHT_KNEE_EXAMPLE)  # no entry for fibula / meniscus
    with pytest.raises(ConfigError):
        L.remap_labels(src, {1: 42, 2: 1, 3: 1, 8: 0, 10: 1})
    with pytest.raises(InvalidFormat):
        L.remap_labels(np.array([0.5, 1.0]), {1: 1})
    assert L.remap_labels(np.array([-1, 0, 1]), {-1: 7, 1: 9}).tolist() == [7, 0, 9]


# --------------------------------------------------------------------------------------------------
# DICOM writer (no mskt data needed)


@pytest.mark.parametrize("flip_k", [False, True])
def test_dicom_round_trip_oblique_float(tmp_path, flip_k):
    rng = np.random.default_rng(0)
    affine = _oblique_affine(flip_k=flip_k)
    data = (rng.random((20, 16, 7)) * 1234.5 - 100.0).astype(np.float32)
    files = write_dicom_series(Volume(data, affine), tmp_path / "s", series_description="oblique", series_number=7)
    assert [f.name for f in files] == [f"IM{n:05d}.dcm" for n in range(1, 8)]
    ds = pydicom.dcmread(files[0])
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert ds.SOPClassUID == pydicom.uid.MRImageStorage and ds.Modality == "MR"
    assert (ds.Rows, ds.Columns) == (16, 20) and ds.SeriesNumber == 7
    assert len({pydicom.dcmread(f).SOPInstanceUID for f in files}) == 7
    slope = float(ds.RescaleSlope)
    back, back_affine = _read_sitk(tmp_path / "s")
    if flip_k:  # readers order slices along the normal: the same world grid, k reversed
        back = back[:, :, ::-1]
        back_affine = back_affine @ np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, -1, 6], [0, 0, 0, 1.0]])
    assert np.abs(back_affine - affine).max() < 1e-3
    assert np.abs(back - data).max() <= slope / 2 + 1e-4


def test_dicom_multi_echo_and_integer_data(tmp_path):
    affine = _oblique_affine(spacing=(0.5, 0.5, 3.0), angles=(0, 0, 0))
    rng = np.random.default_rng(1)
    echoes = rng.integers(0, 4000, (12, 10, 5, 3)).astype(np.uint16)
    files = write_dicom_series(Volume(echoes[..., 0], affine, echoes, [10.0, 20.0, 30.0]), tmp_path / "me",
                               series_description="mese", laterality="left")
    assert len(files) == 15
    headers = [pydicom.dcmread(f) for f in files]
    assert len({h.SeriesInstanceUID for h in headers}) == 1
    assert [int(h.InstanceNumber) for h in headers] == list(range(1, 16))
    assert all("RescaleSlope" not in h for h in headers)  # integers stored as is
    assert headers[0].Laterality == "L"
    for e in range(3):
        group = [f for f, h in zip(files, headers) if int(h.EchoNumbers) == e + 1]
        assert {float(pydicom.dcmread(f).EchoTime) for f in group} == {10.0 * (e + 1)}
        back, back_affine = _read_sitk(tmp_path / "me", echo=e + 1)
        assert np.abs(back_affine - affine).max() < 1e-3
        assert np.array_equal(back, echoes[..., e])


def test_dicom_writer_rejects_bad_input(tmp_path):
    sheared = np.eye(4)
    sheared[0, 2] = 0.5
    with pytest.raises(DicomError, match="perpendicular"):
        write_dicom_series(Volume(np.zeros((4, 4, 3)), sheared), tmp_path / "a", series_description="x")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "other.txt").write_text("x")
    with pytest.raises(DicomError, match="not empty"):
        write_dicom_series(Volume(np.zeros((4, 4, 3)), np.eye(4)), tmp_path / "b", series_description="x")
    with pytest.raises(DicomError, match="NaN"):
        write_dicom_series(Volume(np.full((4, 4, 3), np.nan), np.eye(4)), tmp_path / "c", series_description="x")


# --------------------------------------------------------------------------------------------------
# generator on a small geometric label map (no mskt data needed)


def test_config_validation_and_presets():
    small = SyntheticKneeConfig.from_preset("small", seed=3, flip=True, n_echoes=2)
    assert small.shape == PRESETS["small"]["shape"] and small.flip_probability == 1.0
    assert small.echo_times_ms == (6.3, 12.6) and small.supersample_factors() == (2, 2, 2)
    assert SyntheticKneeConfig.from_preset("standard").spacing_mm == (0.6, 0.6, 1.0)
    with pytest.raises(ConfigError, match="preset"):
        SyntheticKneeConfig.from_preset("huge")
    with pytest.raises(ConfigError, match="elastic_mm"):
        SyntheticKneeConfig(elastic_mm=20.0, elastic_smoothness_mm=10.0)
    with pytest.raises(ConfigError, match="Unknown"):
        SyntheticKneeConfig(noise=3)
    with pytest.raises(ConfigError, match="tissues"):
        SyntheticKneeConfig(intensities={"brain": (1.0, 2.0)})


def test_toy_label_map_case(toy_map, tmp_path):
    cfg = SyntheticKneeConfig(**TOY)
    case = generate_case(cfg, label_map=toy_map)
    img, lab = case.image, case.labels
    assert case.source == "custom" and case.side == "right"
    assert img.shape == lab.shape == cfg.shape and np.array_equal(img.affine, lab.affine)
    assert np.allclose(img.spacing, cfg.spacing_mm)
    assert lab.data.dtype == np.uint8 and img.data.dtype == np.float32
    assert set(np.unique(lab.data)) == set(range(10))  # no label lost
    # every label keeps roughly its volume (random scale is at most 5 %)
    src_ml = np.bincount(toy_map.data.ravel(), minlength=10)[1:] * 1e-3
    out_ml = np.bincount(lab.data.ravel(), minlength=10)[1:] * np.prod(cfg.spacing_mm) * 1e-3
    assert np.all(np.abs(out_ml / src_ml - 1) < 0.5), (src_ml, out_ml)
    # the image follows the labels: cartilage bright, marrow intermediate, menisci dark
    mean = {v: float(img.data[lab.data == v].mean()) for v in range(1, 10)}
    assert min(mean[v] for v in (1, 2, 3, 4)) > max(mean[v] for v in (7, 8, 9))
    assert max(mean[v] for v in (5, 6)) < min(mean[v] for v in (7, 8, 9))
    # same seed, same case
    again = generate_case(cfg, label_map=toy_map)
    assert np.array_equal(again.image.data, img.data) and np.array_equal(again.labels.data, lab.data)
    other = generate_case(cfg.model_copy(update={"seed": 5}), label_map=toy_map)
    assert not np.array_equal(other.image.data, img.data)
    # files
    paths = write_case(case, tmp_path, "toy")
    record = json.loads(paths["case"].read_text())
    assert record["side"] == "right" and record["source"]["name"] == "custom"
    assert nib.load(paths["labels"]).get_data_dtype() == np.uint8


def test_toy_label_map_left_flip_mirrors(toy_map):
    base = dict(TOY, snr=None, bias_field=0.0)
    right = generate_case(SyntheticKneeConfig(**base, flip_probability=0.0), label_map=toy_map)
    left = generate_case(SyntheticKneeConfig(**base, flip_probability=1.0), label_map=toy_map)
    assert (right.side, left.side) == ("right", "left")
    # sagittal grid: slices run along x, so the mirror is a reversal of k
    agree = np.mean(left.labels.data == right.labels.data[:, :, ::-1])
    assert agree > 0.999
    assert np.allclose(left.image.data, right.image.data[:, :, ::-1], atol=1e-2)
    # the left knee lies at -x and its medial compartment is still labelled medial (towards the midline)
    for case, sign in ((right, 1), (left, -1)):
        a = case.labels.affine
        med = (np.argwhere(case.labels.data == L.MED_TIB_CART) @ a[:3, :3].T + a[:3, 3]).mean(axis=0)
        lat = (np.argwhere(case.labels.data == L.LAT_TIB_CART) @ a[:3, :3].T + a[:3, 3]).mean(axis=0)
        assert sign * med[0] > 0 and abs(med[0]) < abs(lat[0])


def test_toy_multi_echo_case(toy_map, tmp_path):
    cfg = SyntheticKneeConfig(**TOY, echo_times_ms=(10.0, 20.0, 40.0), snr=None, bias_field=0.0)
    case = generate_case(cfg, label_map=toy_map)
    echoes = case.image.echoes
    assert echoes.shape == cfg.shape + (3,) and case.image.echo_times_ms == [10.0, 20.0, 40.0]
    assert case.t2_map is not None and case.t2_map.shape == cfg.shape
    marrow = case.labels.data == L.TIBIA
    decay = echoes[marrow].mean(axis=0)
    assert decay[0] > decay[1] > decay[2] > 0
    paths = write_case(case, tmp_path, "me")
    assert len(list(paths["dicom"].glob("*.dcm"))) == 3 * cfg.shape[2]
    assert nib.load(paths["echoes"]).shape == cfg.shape + (3,)


# --------------------------------------------------------------------------------------------------
# generator on the real mskt label maps


@pytest.fixture(scope="module")
def dess_case():
    return generate_case(SyntheticKneeConfig.from_preset("small", seed=11))


@pytest.mark.mese
@needs_mskt
def test_mskt_mapping_is_anatomically_right():
    """Medial/lateral of both maps checked against the fibula (lateral) and each other."""
    from workbench.data.samples import label_map_paths

    paths = label_map_paths(fetch=False)
    data, affine = read_nrrd_labels(paths["sag_3d_dess"])

    def centroid(values, arr=data, aff=affine):
        idx = np.argwhere(np.isin(arr, values))
        return (idx @ aff[:3, :3].T + aff[:3, 3]).mean(axis=0)

    fibula, med_tc, lat_tc = centroid([8]), centroid([2]), centroid([3])
    lat_men, med_men = centroid([9]), centroid([10])
    knee = centroid([1, 2, 3, 4])
    assert knee[0] > 0  # a right knee sits at +x (patient's right)
    assert fibula[0] > lat_tc[0] > knee[0] > med_tc[0]  # fibula is lateral: lateral = +x in a right knee
    assert abs(lat_men[0] - lat_tc[0]) < abs(lat_men[0] - med_tc[0])
    assert abs(med_men[0] - med_tc[0]) < abs(med_men[0] - lat_tc[0])
    assert fibula[2] < med_tc[2] and centroid([7])[1] > knee[1]  # fibula below the joint, patella in front
    data2, affine2 = read_nrrd_labels(paths["right_knee_example"])
    c2 = {v: centroid([v], data2, affine2) for v in (1, 2, 3, 4, 5, 6, 7)}
    assert c2[1][0] > 0 and c2[2][0] < c2[1][0] < c2[3][0]  # 2 medial (-x), 3 lateral (+x)
    assert c2[7][1] > c2[5][1] and c2[6][2] < c2[5][2]  # patella anterior, tibia below femur


@pytest.mark.mese
@needs_mskt
def test_dess_case_keeps_every_label_and_aligns(dess_case):
    img, lab = dess_case.image, dess_case.labels
    assert set(np.unique(lab.data)) == set(range(10))
    assert np.array_equal(img.affine, lab.affine) and img.shape == lab.shape == (128, 128, 64)
    mean = {v: float(img.data[lab.data == v].mean()) for v in range(10)}
    cartilage = min(mean[v] for v in (1, 2, 3, 4))
    assert cartilage > 1.5 * max(mean[v] for v in (7, 8, 9)) > 0  # cartilage bright over marrow
    assert max(mean[5], mean[6]) < min(mean[v] for v in (7, 8, 9))  # menisci dark
    # labels sit on the bright cartilage: the label's core is brighter than a shell 3 voxels outside it
    cart = lab.data == L.FEM_CART
    shell = ndimage.binary_dilation(cart, iterations=3) & ~ndimage.binary_dilation(cart, iterations=2)
    assert img.data[cart].mean() > 1.5 * img.data[shell].mean()
    # the knee sits in the middle of the field of view, sagittal slices (k along x)
    centre = np.argwhere(lab.data > 0).mean(axis=0) / np.asarray(lab.shape)
    assert np.all(np.abs(centre - 0.5) < 0.2)
    assert abs(img.affine[0, 2]) > 0.99 * img.spacing[2]
    assert dess_case.side == "right" and dess_case.params["source"] == "sag_3d_dess"


@pytest.mark.mese
@needs_mskt
def test_dess_case_is_deterministic(dess_case):
    again = generate_case(SyntheticKneeConfig.from_preset("small", seed=11))
    assert np.array_equal(again.image.data, dess_case.image.data)
    assert np.array_equal(again.labels.data, dess_case.labels.data)
    assert again.params == dess_case.params


@pytest.mark.mese
@needs_mskt
def test_dess_flip_gives_mirrored_left_knee(dess_case):
    left = generate_case(SyntheticKneeConfig.from_preset("small", seed=11, flip=True))
    assert left.side == "left" and left.params["flipped"] is True
    assert np.mean(left.labels.data == dess_case.labels.data[:, :, ::-1]) > 0.999
    # noise and bias belong to the scanner, not the anatomy: images agree up to them
    r = np.corrcoef(left.image.data.ravel(), dess_case.image.data[:, :, ::-1].ravel())[0, 1]
    assert r > 0.9
    a = left.labels.affine
    knee = (np.argwhere(left.labels.data > 0) @ a[:3, :3].T + a[:3, 3]).mean(axis=0)
    assert knee[0] < 0  # a left knee lies at -x


@pytest.mark.mese
@needs_mskt
def test_right_knee_example_labels():
    case = generate_case(SyntheticKneeConfig.from_preset("small", seed=2, source="right_knee_example"))
    assert set(np.unique(case.labels.data)) == {0, 1, 2, 3, 4, 7, 8, 9}  # no menisci in this map


@pytest.mark.mese
@needs_mskt
def test_dess_case_files_round_trip(dess_case, tmp_path):
    paths = write_case(dess_case, tmp_path, "knee")
    assert set(paths) == {"dicom", "image", "labels", "case"}
    files = sorted(paths["dicom"].glob("*.dcm"))
    assert len(files) == 64
    back, back_affine = _read_sitk(paths["dicom"])
    slope = float(pydicom.dcmread(files[0]).RescaleSlope)
    assert np.abs(back_affine - dess_case.image.affine).max() < 1e-3
    assert np.abs(back - dess_case.image.data).max() <= slope / 2 + 1e-3
    ds = pydicom.dcmread(files[0])
    assert ds.Laterality == "R" and ds.MRAcquisitionType == "3D" and float(ds.MagneticFieldStrength) == 3.0
    image, labels = nib.load(paths["image"]), nib.load(paths["labels"])
    assert labels.get_data_dtype() == np.uint8 and int(labels.header["sform_code"]) == 1
    assert np.allclose(image.affine, dess_case.image.affine, atol=1e-4)
    assert np.allclose(labels.affine, dess_case.image.affine, atol=1e-4)
    assert np.array_equal(np.asarray(labels.dataobj), dess_case.labels.data)
    assert np.allclose(_world_corners(image.shape, image.affine), _world_corners(back.shape, back_affine), atol=1e-3)
    record = json.loads(paths["case"].read_text())
    assert record["side"] == "right" and record["source"]["licence"] == "MIT"
    assert record["source"]["mapping_to_workbench"]["8"] == 0
    assert record["labels_present"] == list(range(10))
    assert record["config"]["seed"] == 11 and "forward_source_to_output" in record["params"]["transform"]
