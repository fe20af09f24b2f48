"""Femoral cartilage subregions (labels 11-15): ``workbench.knee.subregions``.

Most tests use a small geometric right knee built here (no data needed).  Tests on a synthetic
case and on the real mskt label maps need the cached mskt sample data (``workbench data fetch``)
and are skipped cleanly without it.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import assert_error
from scipy import ndimage

from workbench.data import labels as L
from workbench.errors import ConfigError, ErrorCode, InvalidFormat
from workbench.knee.subregions import (
    FRAMES,
    SUBREGION_VALUES,
    femoral_subregions,
    subregions_filename,
)

ANT, MWB, LWB, MPOST, LPOST = SUBREGION_VALUES
MEDIAL = (MWB, MPOST)
LATERAL = (LWB, LPOST)


# --------------------------------------------------------------------------------------------------
# helpers


def _geometric_knee():
    """A right knee on a 1 mm RAS grid (medial towards -x) with a trochlea, two condyles and a notch.

    Returns ``(labels, affine)``; the joint centre is near world (0, 0, 0).
    """
    shape = (72, 84, 76)
    affine = np.eye(4)
    affine[:3, 3] = (-36.0, -44.0, -30.0)
    x, y, z = np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij")
    x, y, z = x - 36.0, y - 44.0, z - 30.0
    condyles = np.zeros(shape, bool)
    for cx in (-13.0, 13.0):  # round condyles, separated by the notch at |x| < 4
        condyles |= ((x - cx) / 9.0) ** 2 + ((y + 4.0) / 20.0) ** 2 + ((z - 12.0) / 12.0) ** 2 <= 1.0
    trochlea = ((x / 24.0) ** 2 + ((y - 12.0) / 10.0) ** 2 + ((z - 22.0) / 14.0) ** 2 <= 1.0)
    shaft = (x ** 2 + (y - 2.0) ** 2 <= 15.0 ** 2) & (z >= 24)
    femur = condyles | trochlea | shaft
    shell = ndimage.binary_dilation(femur, iterations=2) & ~femur & (z < 36)
    notch = (np.abs(x) < 6) & (y < 3)  # no cartilage in the intercondylar fossa
    fem_cart = shell & ~notch
    plateau = (x / 28.0) ** 2 + ((y + 2.0) / 22.0) ** 2 <= 1.0
    tibia = plateau & (z <= -6) & (z > -28)
    tib_cart = plateau & (z > -6) & (z <= -3) & (np.abs(x) > 3)
    lab = np.zeros(shape, np.uint8)
    lab[femur] = L.FEMUR
    lab[tibia] = L.TIBIA
    lab[tib_cart & (x < 0)] = L.MED_TIB_CART  # right knee: medial towards -x
    lab[tib_cart & (x > 0)] = L.LAT_TIB_CART
    lab[fem_cart & (lab == 0)] = L.FEM_CART
    return lab, affine


@pytest.fixture(scope="module")
def knee():
    return _geometric_knee()


def _world(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    return np.argwhere(mask) @ affine[:3, :3].T + affine[:3, 3]


def _mean(labels, affine, values) -> np.ndarray:
    return _world(np.isin(labels, values), affine).mean(axis=0)


def _check_regions(before: np.ndarray, after: np.ndarray, affine: np.ndarray, side: str) -> None:
    """The checks every valid split must pass."""
    fem = before == L.FEM_CART
    assert after.shape == before.shape and after.dtype == before.dtype
    assert np.array_equal(after[~fem], before[~fem])  # only femoral cartilage changed
    assert set(np.unique(after[fem]).tolist()) == set(SUBREGION_VALUES)  # all five, nothing else
    assert not np.any(after == L.FEM_CART)
    y = {v: _mean(after, affine, [v])[1] for v in SUBREGION_VALUES}
    assert y[ANT] > max(y[MWB], y[LWB])  # anterior lies in front of the weight-bearing band
    assert min(y[MWB], y[LWB]) > max(y[MPOST], y[LPOST])  # the posterior regions lie behind it
    # medial regions sit on the side of the medial tibial cartilage, towards the body's midline
    med_tib = _mean(before, affine, [L.MED_TIB_CART])[0]
    lat_tib = _mean(before, affine, [L.LAT_TIB_CART])[0]
    med = _mean(after, affine, MEDIAL)[0]
    lat = _mean(after, affine, LATERAL)[0]
    assert np.sign(med - lat) == np.sign(med_tib - lat_tib)
    assert (med < lat) == (side == "right")  # RAS+: +x is the patient's right


# --------------------------------------------------------------------------------------------------
# geometric knee (no data needed)


def test_geometric_knee_regions(knee):
    labels, affine = knee
    result = femoral_subregions(labels, affine)
    _check_regions(labels, result.labels, affine, "right")
    g = result.geometry
    assert g.side == result.side == "right" and not g.side_given and g.frame == "image"
    assert abs(g.notch_ml_mm) <= 1.0  # the notch is at x = 0
    assert 1.0 <= g.anterior_boundary_mm <= 4.0  # behind it the fossa holds no cartilage (y < 3)
    assert g.posterior_end_mm < g.posterior_boundary_mm < g.anterior_boundary_mm
    assert g.medial_direction == [-1.0, 0.0, 0.0] and g.ap_axis == [0.0, 1.0, 0.0]
    # regions respect the planes
    a = _world(np.ones(labels.shape, bool), affine).reshape(labels.shape + (3,))
    out = result.labels
    assert a[out == ANT][:, 1].min() > g.anterior_boundary_mm
    wb = np.isin(out, (MWB, LWB))
    assert g.posterior_boundary_mm < a[wb][:, 1].min() and a[wb][:, 1].max() < g.anterior_boundary_mm
    assert a[np.isin(out, MEDIAL)][:, 0].max() < g.notch_ml_mm < a[np.isin(out, LATERAL)][:, 0].min()
    # record: JSON-ready, volumes add up
    record = json.loads(json.dumps(result.to_dict()))
    assert set(record["volumes_ml"]) == {lab.key for lab in L.FEMORAL_SUBREGIONS}
    assert sum(record["fractions"].values()) == pytest.approx(1.0, abs=1e-3)
    assert sum(g.volumes_ml.values()) == pytest.approx(np.count_nonzero(labels == L.FEM_CART) * 1e-3)
    assert all(0.05 < f < 0.5 for f in g.fractions.values()), g.fractions
    assert subregions_filename("case1") == "case1_subregions-labels.nii.gz"


def test_mirrored_left_knee_mirrors_the_split(knee):
    labels, affine = knee
    right = femoral_subregions(labels, affine)
    left_labels = labels[::-1].copy()  # same grid, anatomy mirrored along x: a left knee
    left = femoral_subregions(left_labels, affine)
    assert left.side == "left"
    _check_regions(left_labels, left.labels, affine, "left")
    assert np.array_equal(left.labels, right.labels[::-1])  # mirroring changes no label
    assert left.geometry.medial_direction == [1.0, 0.0, 0.0]
    assert left.geometry.fractions == right.geometry.fractions


@pytest.mark.parametrize("frame", FRAMES)
def test_voxel_order_and_lps_storage_do_not_matter(knee, frame):
    labels, affine = knee
    expected = femoral_subregions(labels, affine, frame=frame).labels
    # store the same knee with permuted, flipped voxel axes (e.g. a sagittal LPS-style grid)
    perm, flips = (2, 0, 1), (True, False, True)
    data = labels.transpose(perm)
    moved = affine[:, list(perm) + [3]].copy()
    for axis, flip in enumerate(flips):
        if flip:
            moved[:3, 3] += moved[:3, axis] * (data.shape[axis] - 1)
            moved[:3, axis] *= -1
            data = np.flip(data, axis)
    data = np.ascontiguousarray(data)
    assert np.allclose(_world(data == L.FEMUR, moved).mean(0), _world(labels == L.FEMUR, affine).mean(0))
    got = femoral_subregions(data, moved, frame=frame).labels
    for axis, flip in enumerate(flips):
        if flip:
            got = np.flip(got, axis)
    assert np.array_equal(got.transpose(np.argsort(perm)), expected)


def _rotated(affine: np.ndarray, axis: str, degrees: float) -> np.ndarray:
    c, s = np.cos(np.deg2rad(degrees)), np.sin(np.deg2rad(degrees))
    rot = np.eye(4)
    i, j = {"z": (0, 1), "x": (1, 2)}[axis]
    rot[[i, i, j, j], [i, j, i, j]] = (c, -s, s, c)
    return rot @ affine


@pytest.mark.parametrize(("frame", "axis"), [("image", "z"), ("image", "x"), ("tibia", "z")])
def test_rotated_knee_keeps_its_split(knee, frame, axis):
    """The whole knee turned in the scanner: frames tied to the anatomy give the same voxels."""
    labels, affine = knee
    expected = femoral_subregions(labels, affine, frame=frame).labels
    turned = _rotated(affine, axis, 12.0)
    result = femoral_subregions(labels, turned, frame=frame)
    assert np.array_equal(result.labels, expected)
    assert result.side == "right"


def test_scanner_frame_ignores_a_turned_grid_only_by_design(knee):
    labels, affine = knee
    turned = _rotated(affine, "z", 12.0)
    scanner = femoral_subregions(labels, turned, frame="scanner")
    image = femoral_subregions(labels, turned, frame="image")
    _check_regions(labels, scanner.labels, turned, "right")
    assert scanner.geometry.ap_axis == [0.0, 1.0, 0.0]
    assert image.geometry.ap_axis[0] == pytest.approx(-np.sin(np.deg2rad(12.0)))
    assert not np.array_equal(scanner.labels, image.labels)


def test_side_option_and_parameters(knee):
    labels, affine = knee
    given = femoral_subregions(labels, affine, side="right")
    assert given.geometry.side_given and np.array_equal(given.labels, femoral_subregions(labels, affine).labels)
    with pytest.raises(ConfigError) as exc:
        femoral_subregions(labels, affine, side="left")
    assert_error(exc, ErrorCode.CONFIG_ERROR, "side='left'", "right knee")
    for bad in ({"side": "both"}, {"frame": "femur"}, {"wb_fraction": 1.0}, {"wb_fraction": "0.5"},
                {"superior_ratio": -0.1}):
        with pytest.raises(ConfigError):
            femoral_subregions(labels, affine, **bad)
    # a wider weight-bearing band takes cartilage from the posterior regions only
    narrow = femoral_subregions(labels, affine, wb_fraction=0.4).geometry.fractions
    wide = femoral_subregions(labels, affine, wb_fraction=0.8).geometry.fractions
    assert wide["fem_cart_ant"] == narrow["fem_cart_ant"]
    assert wide["fem_cart_mwb"] > narrow["fem_cart_mwb"] and wide["fem_cart_mpost"] < narrow["fem_cart_mpost"]


def test_existing_subregions_are_derived_again(knee):
    labels, affine = knee
    first = femoral_subregions(labels, affine)
    again = femoral_subregions(first.labels, affine)
    assert np.array_equal(again.labels, first.labels)
    wide = femoral_subregions(labels.astype(np.int16), affine)
    assert wide.labels.dtype == np.int16 and np.array_equal(wide.labels, first.labels)


@pytest.mark.parametrize(("remove", "words"), [
    (L.FEM_CART, ("femoral cartilage", "label 2")),
    (L.MED_TIB_CART, ("medial tibial cartilage", "label 3")),
    (L.LAT_TIB_CART, ("lateral tibial cartilage", "label 4")),
])
def test_missing_structures_are_named(knee, remove, words):
    labels, affine = knee
    broken = labels.copy()
    broken[broken == remove] = 0
    with pytest.raises(InvalidFormat) as exc:
        femoral_subregions(broken, affine)
    assert_error(exc, ErrorCode.INVALID_FORMAT, *words)
    assert "remap_labels" in exc.value.hint


def test_unusable_inputs(knee):
    labels, affine = knee
    both = labels.copy()
    both[both == L.LAT_TIB_CART] = L.MED_TIB_CART
    both[both == L.TIBIA] = L.LAT_TIB_CART  # lateral "cartilage" centred under the medial one
    cases = [
        (labels.astype(np.float32), affine, "dtype"),
        (labels[..., 0], affine, "dimensions"),
        (labels, affine[:3], "4x4"),
        (labels, np.diag([1.0, 0.0, 1.0, 1.0]), "singular"),
        (both, affine, "apart along x"),
    ]
    for data, aff, word in cases:
        with pytest.raises(InvalidFormat) as exc:
            femoral_subregions(data, aff)
        assert_error(exc, ErrorCode.INVALID_FORMAT, word)


# --------------------------------------------------------------------------------------------------
# synthetic case and real label maps (mskt sample data)


@pytest.fixture(scope="module")
def synthetic_case(request):
    request.getfixturevalue("mskt_dir")  # skips cleanly without the cached data
    from workbench.data.synthetic_knee import SyntheticKneeConfig, generate_case

    return generate_case(SyntheticKneeConfig.from_preset("small", seed=11, flip=False))


def test_synthetic_case(synthetic_case):
    labels, affine = synthetic_case.labels.data, synthetic_case.labels.affine
    result = femoral_subregions(labels, affine)
    assert result.side == synthetic_case.side == "right"
    _check_regions(labels, result.labels, affine, "right")
    assert all(0.05 <= f <= 0.45 for f in result.geometry.fractions.values()), result.geometry.fractions
    # the same knee mirrored along the voxel axis that runs along x is a left knee
    x_axis = int(np.argmax(np.abs(affine[0, :3])))
    mirrored = np.flip(labels, x_axis)
    left = femoral_subregions(mirrored, affine)
    assert left.side == "left"
    _check_regions(mirrored, left.labels, affine, "left")
    assert np.array_equal(np.flip(left.labels, x_axis), result.labels)


def _real_map(name: str):
    from workbench.data.samples import label_map_paths
    from workbench.data.synthetic_knee import read_nrrd_labels

    data, affine = read_nrrd_labels(label_map_paths(fetch=False)[name])
    return L.remap_labels(data, L.SOURCE_MAPPINGS[name], source=name), affine


def test_real_dess_label_map(mskt_dir):
    labels, affine = _real_map("sag_3d_dess")  # LPS NRRD, sagittal, 384 x 384 x 160, a right knee
    result = femoral_subregions(labels, affine)
    assert result.side == "right"
    _check_regions(labels, result.labels, affine, "right")
    fractions = result.geometry.fractions
    assert all(0.05 <= f <= 0.45 for f in fractions.values()), fractions
    # measured when written (pymskt's registered split agrees on 97.9 % of the voxels)
    expected = {"fem_cart_ant": 0.417, "fem_cart_mwb": 0.121, "fem_cart_lwb": 0.114, "fem_cart_mpost": 0.175,
                "fem_cart_lpost": 0.173}
    assert fractions == pytest.approx(expected, abs=0.01)
    # the weight-bearing regions sit over their own tibial plateau
    for wb, tib in ((MWB, L.MED_TIB_CART), (LWB, L.LAT_TIB_CART)):
        assert abs(_mean(result.labels, affine, [wb])[0] - _mean(labels, affine, [tib])[0]) < 10.0


def test_real_reference_knee_matches_the_original_rule(mskt_dir):
    """pymskt splits in the frame of this very knee (its registration reference): same voxels."""
    labels, affine = _real_map("right_knee_example")
    result = femoral_subregions(labels, affine)
    assert result.side == "right"
    _check_regions(labels, result.labels, affine, "right")
    counts = np.bincount(result.labels[labels == L.FEM_CART], minlength=16)[list(SUBREGION_VALUES)]
    # counted from pymskt's get_cartilage_subregions on the same map (identity registration)
    assert counts.tolist() == [70166, 15447, 15928, 30886, 25169]
