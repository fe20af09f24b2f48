"""T2 mapping (workbench.knee.t2): fits on synthetic decays with known T2, masking, noise floor, depth split,
regional stats, qDESS, and the real GE MESE series (``mese`` marker: needs `workbench data fetch`)."""

from __future__ import annotations

import math

import nibabel as nib
import numpy as np
import pytest
from helpers import assert_error

from workbench.data import labels as L
from workbench.errors import ConfigError, ErrorCode, InvalidFormat
from workbench.io.volume import Volume
from workbench.knee.t2 import (
    CARTILAGE_REGIONS,
    QDessParameters,
    cartilage_depth,
    estimate_noise_sigma,
    fit_t2,
    load_echoes,
    qdess_parameters_from_dicom,
    qdess_t2,
    region_t2_stats,
    t2_from_volume,
    t2_plan,
    write_t2_map,
)

MESE_TES = np.array([6.312 * (e + 1) for e in range(8)])  # the real MESE sample's echo times
METHODS = ("loglinear", "nonlinear")
RESULT_REGIONS = ("pat_cart", "ant_fem_cart", "med_wb_fem_cart", "lat_wb_fem_cart", "med_post_fem_cart",
                  "lat_post_fem_cart", "med_tib_cart", "lat_tib_cart")


def _rician(clean: np.ndarray, sigma: float, rng) -> np.ndarray:
    return np.hypot(clean + rng.normal(0.0, sigma, clean.shape), rng.normal(0.0, sigma, clean.shape))


def _decays(t2_ms, snr: float, seed: int, n_background: int = 20_000, s0: float = 1000.0):
    """Echo-first magnitudes ``(8, n + n_background)``: decays with ``t2_ms``, then pure-noise background voxels."""
    rng = np.random.default_rng(seed)
    t2_ms = np.asarray(t2_ms, float)
    sigma = s0 / snr
    tissue = _rician(s0 * np.exp(-MESE_TES[:, None] / t2_ms[None, :]), sigma, rng)
    background = _rician(np.zeros((MESE_TES.size, n_background)), sigma, rng)
    mask = np.r_[np.ones(t2_ms.size, bool), np.zeros(n_background, bool)]
    return np.concatenate([tissue, background], axis=1), mask, sigma


# --------------------------------------------------------------------------------------------------
# accuracy on synthetic decays


def test_synthetic_known_t2_accuracy_both_methods():
    """T2 20-60 ms, MESE echo times, Rician noise: median error <= 1 ms; the nonlinear fit at least as good."""
    t2 = np.random.default_rng(0).uniform(20.0, 60.0, 20_000)
    results = {}
    for snr in (25.0, 60.0):
        data, mask, sigma = _decays(t2, snr, seed=int(snr))
        for method in METHODS:
            fit = fit_t2(data, MESE_TES, mask=mask, method=method)
            assert fit.method == method and fit.t2_ms.dtype == np.float32
            assert fit.noise_sigma == pytest.approx(sigma, rel=0.05)  # estimated from the background voxels
            err = fit.t2_ms[: t2.size] - t2
            assert np.isfinite(err).mean() > 0.99
            results[snr, method] = (np.nanmedian(np.abs(err)), np.nanmedian(err))
            # bias within every 10 ms band, at the synthetic knee's SNR
            for lo in (20, 30, 40, 50):
                band = (t2 >= lo) & (t2 < lo + 10)
                assert abs(np.nanmedian(err[band])) <= 0.5, (snr, method, lo, np.nanmedian(err[band]))
    for snr in (25.0, 60.0):
        for method in METHODS:
            assert abs(results[snr, method][1]) <= 1.0  # median (signed) error
        nl_abs, nl_bias = results[snr, "nonlinear"]
        ll_abs, ll_bias = results[snr, "loglinear"]
        assert nl_abs <= ll_abs * 1.01 and abs(nl_bias) <= abs(ll_bias) + 0.05, results
    # per-voxel median absolute error: noise-limited, <= 1 ms at SNR 60 (about 2 ms at SNR 25, as any estimator)
    for method in METHODS:
        assert results[60.0, method][0] <= 1.0, results
        assert 1.0 < results[25.0, method][0] < 3.0, results


def test_noise_free_fits_are_exact_and_echo_order_does_not_matter():
    t2 = np.linspace(15.0, 90.0, 16)
    clean = 800.0 * np.exp(-MESE_TES[:, None] / t2[None, :])
    order = np.array([3, 0, 7, 5, 1, 6, 2, 4])
    for method in METHODS:
        for echoes, tes in ((clean, MESE_TES), (clean[order], MESE_TES[order])):
            fit = fit_t2(echoes, tes, method=method, noise_floor=0.0)
            np.testing.assert_allclose(fit.t2_ms, t2, rtol=1e-4)
            np.testing.assert_allclose(fit.s0, 800.0, rtol=1e-4)
            assert np.all(fit.valid) and np.all(fit.r2 > 0.9999)
            assert fit.echo_times_ms == tuple(MESE_TES)
    # two echoes: the exact two-point solution
    fit = fit_t2(clean[[1, 4]], MESE_TES[[1, 4]], noise_floor=0.0)
    np.testing.assert_allclose(fit.t2_ms, t2, rtol=1e-4)


def test_skip_first_echo():
    """An off-curve first echo (as MESE stimulated echoes can give) biases T2 unless it is dropped."""
    clean = 1000.0 * np.exp(-MESE_TES[:, None] / np.full((1, 4), 40.0))
    clean[0] *= 0.8
    kept = fit_t2(clean, MESE_TES, noise_floor=0.0, min_r2=0.0)
    dropped = fit_t2(clean, MESE_TES, noise_floor=0.0, skip_first_echo=True)
    assert np.all(np.abs(kept.t2_ms - 40.0) > 2.0)
    np.testing.assert_allclose(dropped.t2_ms, 40.0, rtol=1e-4)
    assert dropped.echo_times_ms == tuple(MESE_TES[1:])


# --------------------------------------------------------------------------------------------------
# noise floor and masking


def test_noise_floor_handling():
    """Short T2 at low SNR: late echoes sit on the Rician floor.  Ignoring it biases T2 upwards; the
    noise-corrected nonlinear fit does not, and the log-linear fit drops the echoes at the floor."""
    data, mask, sigma = _decays(np.full(20_000, 20.0), snr=10.0, seed=3)
    assert estimate_noise_sigma(data[0]) == pytest.approx(sigma, rel=0.05)
    n = mask.sum()
    corrected = fit_t2(data, MESE_TES, mask=mask, method="nonlinear")
    ignored = fit_t2(data, MESE_TES, mask=mask, method="nonlinear", noise_floor=0.0)
    assert abs(np.nanmedian(corrected.t2_ms[:n]) - 20.0) < 1.0
    assert np.nanmedian(ignored.t2_ms[:n]) - 20.0 > 1.5
    loglinear = fit_t2(data, MESE_TES, mask=mask, method="loglinear")
    assert abs(np.nanmedian(loglinear.t2_ms[:n]) - 20.0) < 1.0
    assert 3 <= np.median(loglinear.n_echoes_used[:n]) <= 6  # echoes at the floor do not count
    assert np.all(ignored.n_echoes_used[:n] == 8)
    # a given floor is used as given (mean background magnitude = sigma * sqrt(pi/2))
    given = fit_t2(data, MESE_TES, mask=mask, noise_floor=sigma * math.sqrt(math.pi / 2))
    assert given.noise_sigma == pytest.approx(sigma)


def test_noise_estimate_ignores_tissue_and_suppressed_background():
    rng = np.random.default_rng(5)
    background = _rician(np.zeros(50_000), 20.0, rng)
    tissue = _rician(rng.normal(600.0, 80.0, 100_000), 20.0, rng)
    assert estimate_noise_sigma(np.r_[background, tissue]) == pytest.approx(20.0, rel=0.05)
    # scanner-suppressed background (zeros and a few small values): sigma is small next to the tissue
    suppressed = np.r_[np.zeros(50_000), rng.integers(1, 4, 5_000), tissue]
    assert estimate_noise_sigma(suppressed) < 5.0


def test_masking_out_of_range_poor_fits_and_mask():
    groups = {
        "good": 1000.0 * np.exp(-MESE_TES / 40.0),
        "long": 1000.0 * np.exp(-MESE_TES / 150.0),  # beyond 100 ms
        "rising": 300.0 * np.exp(MESE_TES / 60.0),  # negative T2
        "zigzag": np.array([1000, 400, 800, 250, 600, 150, 400, 80.0]),  # in-range T2, not exponential
        "nan": np.full(8, np.nan),
    }
    names = list(groups)
    echoes = np.stack([groups[n] for n in names], axis=1)[:, :, None]  # (8, 5, 1)
    for method in METHODS:
        fit = fit_t2(echoes, MESE_TES, method=method, noise_floor=0.0)
        valid = dict(zip(names, fit.valid[:, 0]))
        assert valid == {"good": True, "long": False, "rising": False, "zigzag": False, "nan": False}, method
        assert np.isnan(fit.t2_ms[~fit.valid]).all()
        assert fit.r2[names.index("zigzag"), 0] < 0.8
        # the checks are the options: a wider range keeps the long T2, min_r2=0 keeps the zigzag
        loose = fit_t2(echoes, MESE_TES, method=method, noise_floor=0.0, t2_range_ms=(0, 200), min_r2=0.0)
        assert loose.t2_ms[names.index("long"), 0] == pytest.approx(150.0, rel=1e-3)
        assert 20.0 < loose.t2_ms[names.index("zigzag"), 0] < 40.0
    # voxels outside the mask are not fitted
    mask = np.array([[True], [False], [False], [False], [False]])
    fit = fit_t2(echoes, MESE_TES, mask=mask, noise_floor=0.0)
    assert fit.valid[0, 0] and np.isnan(fit.s0[1:]).all() and np.isnan(fit.r2[1:]).all()
    with pytest.raises(InvalidFormat):
        fit_t2(echoes, MESE_TES, mask=np.ones((4, 1), bool))


def test_single_echo_and_bad_inputs_are_typed_errors():
    with pytest.raises(InvalidFormat) as excinfo:
        fit_t2(np.ones((1, 4, 4, 4)), [10.0])
    assert_error(excinfo, ErrorCode.INVALID_FORMAT, "multi-echo", "1 echo")
    with pytest.raises(InvalidFormat) as excinfo:
        fit_t2(np.ones((3, 4, 4)), [10.0, 20.0])
    assert_error(excinfo, ErrorCode.INVALID_FORMAT, "2 echo times for 3 echoes")
    with pytest.raises(InvalidFormat):
        fit_t2(np.ones((2, 4)), [10.0, 10.0])  # echo times not distinct
    with pytest.raises(InvalidFormat):
        fit_t2(np.ones((2, 4)), [10.0, 20.0], skip_first_echo=True)
    with pytest.raises(ConfigError):
        fit_t2(np.ones((2, 4)), [10.0, 20.0], method="magic")
    single = Volume(np.ones((4, 4, 4), np.float32), np.eye(4), meta={"series_description": "sag DESS"})
    plan = t2_plan(single)
    assert plan.kind is None and "single-echo" in plan.reason
    with pytest.raises(InvalidFormat) as excinfo:
        t2_from_volume(single)
    assert_error(excinfo, ErrorCode.INVALID_FORMAT, "single-echo", "sag DESS")


def test_t2_from_volume_takes_echoes_last_and_writes_a_finite_nifti(tmp_path):
    """``Volume.echoes`` is ``(I, J, K, E)`` as the DICOM reader and load_input give it."""
    truth = np.linspace(20.0, 60.0, 6 * 5 * 4).reshape(6, 5, 4)
    truth[0, 0, 0] = 300.0  # fluid: masked
    echoes = (1000.0 * np.exp(-MESE_TES / truth[..., None])).astype(np.float32)
    affine = np.diag([0.6, 0.6, 3.0, 1.0])
    volume = Volume(echoes[..., 0], affine, echoes, list(MESE_TES), {"flip_angle_deg": 90.0})
    plan = t2_plan(volume)
    assert plan.kind == "multi_echo" and "8 echoes" in plan.reason
    fit = t2_from_volume(volume, noise_floor=0.0)
    assert fit.t2_ms.shape == (6, 5, 4)
    np.testing.assert_allclose(fit.t2_ms[fit.valid], truth[fit.valid], rtol=1e-4)
    assert not fit.valid[0, 0, 0] and fit.valid.sum() == truth.size - 1
    path = write_t2_map(fit, affine, tmp_path / "case_t2.nii.gz")
    img = nib.load(path)
    data = np.asarray(img.dataobj)
    assert data.dtype == np.float32 and np.all(np.isfinite(data)) and data[0, 0, 0] == 0.0
    np.testing.assert_allclose(img.affine, affine)
    np.testing.assert_allclose(data[fit.valid], truth[fit.valid], rtol=1e-4)
    summary = fit.summary()
    assert summary["t2_method"] == "nonlinear" and summary["n_valid"] == truth.size - 1


def test_echoes_from_load_input_round_trip(tmp_path):
    """The pipeline path: a multi-echo DICOM series -> load_input -> <case>_echoes.nii.gz + input.json -> T2."""
    from workbench.io.dicom_write import write_dicom_series
    from workbench.knee.steps import load_input
    from workbench.runner import StepContext

    rng = np.random.default_rng(2)
    base = rng.uniform(800.0, 1200.0, (12, 10, 5)).astype(np.float32)
    tes = [10.0, 20.0, 30.0, 40.0]
    echoes = np.stack([base * np.exp(-te / 35.0) for te in tes], axis=-1)
    volume = Volume(echoes[..., 0], np.diag([0.6, 0.6, 3.0, 1.0]), echoes=echoes, echo_times_ms=tes)
    write_dicom_series(volume, tmp_path / "mese", series_description="MESE", echo_times_ms=tes)
    ctx = StepContext.for_testing(tmp_path / "work")
    load_input(ctx, str(tmp_path / "mese"), "mese")
    loaded = load_echoes(ctx.work_dir / "mese_echoes.nii.gz", ctx.work_dir / "input.json")
    assert loaded.echoes.shape == (12, 10, 5, 4) and loaded.echo_times_ms == pytest.approx(tes)
    assert t2_plan(loaded).kind == "multi_echo"
    fit = t2_from_volume(loaded, noise_floor=0.0)
    assert fit.valid.all()
    np.testing.assert_allclose(fit.t2_ms, 35.0, atol=0.5)  # DICOM stores rounded integers
    with pytest.raises(InvalidFormat):
        load_echoes(ctx.work_dir / "mese_image.nii.gz", ctx.work_dir / "input.json")


# --------------------------------------------------------------------------------------------------
# depth split and regional stats


def test_deep_and_superficial_halves_of_a_slab():
    """Tibia below, 6 voxels of cartilage above: the 3 voxels next to the bone are deep."""
    labels = np.zeros((10, 10, 24), np.uint8)
    labels[:, :, :10] = L.TIBIA
    labels[:, :, 10:16] = L.MED_TIB_CART
    depth = cartilage_depth(labels, (1.0, 1.0, 1.0))
    np.testing.assert_allclose(depth[5, 5, 10:16], np.arange(1, 7) / 7.0, rtol=1e-6)
    assert np.isnan(depth[5, 5, :10]).all() and np.isnan(depth[5, 5, 16:]).all()
    t2 = np.full(labels.shape, np.nan, np.float32)
    t2[:, :, 10:16] = np.arange(30.0, 60.0, 5.0)  # 30, 35, ... 55 from the bone up
    stats = region_t2_stats(t2, labels, (1.0, 1.0, 1.0), method="nonlinear")
    assert stats["t2_method"] == "nonlinear"
    assert stats["med_tib_cart_deep_t2_ms_mean"] == pytest.approx(35.0)
    assert stats["med_tib_cart_superficial_t2_ms_mean"] == pytest.approx(50.0)
    assert stats["med_tib_cart_t2_ms_median"] == pytest.approx(42.5)
    assert stats["med_tib_cart_t2_ms_std"] == pytest.approx(np.std(np.arange(30.0, 60.0, 5.0)))
    assert stats["med_tib_cart_t2_n_voxels"] == 600


def test_depth_uses_the_voxel_spacing():
    """A 5 mm cartilage shell on a 10 mm sphere of bone, on a strongly anisotropic grid."""
    spacing = (0.3, 0.3, 2.0)
    shape = tuple(int(36 / s) for s in spacing)
    axes = [(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing)]
    radius = np.sqrt(sum(g ** 2 for g in np.meshgrid(*axes, indexing="ij")))
    labels = np.zeros(shape, np.uint8)
    labels[radius < 10] = L.FEMUR
    labels[(radius >= 10) & (radius < 15)] = L.FEM_CART_MWB
    cart = labels == L.FEM_CART_MWB
    truth = (radius[cart] - 10.0) / 5.0
    right = cartilage_depth(labels, spacing)[cart]
    wrong = cartilage_depth(labels, (1.0, 1.0, 1.0))[cart]
    assert np.mean(np.abs(right - truth)) < 0.05
    assert np.mean((right < 0.5) == (truth < 0.5)) > 0.97
    assert np.mean(np.abs(wrong - truth)) > 2 * np.mean(np.abs(right - truth))


def _knee_blocks() -> np.ndarray:
    """Each cartilage label as a 3-voxel layer on its bone (femoral subregions side by side on the femur)."""
    labels = np.zeros((40, 12, 40), np.uint8)
    labels[:, :, 24:34] = L.FEMUR
    for n, value in enumerate((11, 12, 13, 14, 15)):
        labels[8 * n: 8 * n + 8, :, 21:24] = value
    labels[:, :, 8:15] = L.TIBIA
    labels[:20, :, 15:18] = L.MED_TIB_CART
    labels[20:, :, 15:18] = L.LAT_TIB_CART
    labels[:, :, 0:4] = L.PATELLA
    labels[:, :, 4:7] = L.PAT_CART
    return labels


def test_region_stats_field_names_and_values():
    labels = _knee_blocks()
    t2 = np.where(np.isin(labels, [1, 3, 4, 11, 12, 13, 14, 15]), 40.0, np.nan).astype(np.float32)
    t2[labels == L.FEM_CART_ANT] = 30.0
    t2[(labels == L.MED_TIB_CART) & (np.arange(40)[:, None, None] < 10)] = 0.0  # 0 = no value (as in the NIfTI)
    stats = region_t2_stats(t2, labels, (0.5, 0.5, 0.7), method="loglinear")
    expected = {"t2_method"}
    for region in (*RESULT_REGIONS, "fem_cart"):
        expected.add(f"{region}_t2_n_voxels")
        for part in ("", "_deep", "_superficial"):
            expected.update(f"{region}{part}_t2_ms_{stat}" for stat in ("mean", "std", "median"))
    assert set(stats) == expected
    assert set(RESULT_REGIONS) < set(CARTILAGE_REGIONS)
    for region in RESULT_REGIONS:
        assert stats[f"{region}_t2_ms_mean"] is not None, region
        assert stats[f"{region}_deep_t2_ms_mean"] is not None and stats[f"{region}_superficial_t2_ms_mean"] \
            is not None, region
    assert stats["ant_fem_cart_t2_ms_mean"] == pytest.approx(30.0) and stats["ant_fem_cart_t2_ms_std"] == 0.0
    assert stats["med_wb_fem_cart_t2_ms_median"] == pytest.approx(40.0)
    assert stats["fem_cart_t2_ms_mean"] == pytest.approx(38.0)  # one fifth at 30 ms
    assert stats["med_tib_cart_t2_n_voxels"] == 10 * 12 * 3  # the zeros are left out
    # a label map with whole femoral cartilage (2) and no subregions: fem_cart only
    whole = np.where(np.isin(labels, [11, 12, 13, 14, 15]), L.FEM_CART, labels).astype(np.uint8)
    stats = region_t2_stats(np.where(whole > 0, 45.0, np.nan), whole, (0.5, 0.5, 0.7))
    assert stats["fem_cart_t2_ms_mean"] == pytest.approx(45.0) and "t2_method" not in stats
    assert stats["med_wb_fem_cart_t2_ms_mean"] is None and stats["med_wb_fem_cart_deep_t2_ms_median"] is None
    assert stats["med_wb_fem_cart_t2_n_voxels"] == 0
    with pytest.raises(InvalidFormat):
        region_t2_stats(t2[:-1], labels, (0.5, 0.5, 0.7))


# --------------------------------------------------------------------------------------------------
# qDESS


QDESS = {"tr_ms": 20.36, "te_ms": 6.43, "flip_angle_deg": 20.0, "gl_area": 3132.0, "tg_us": 1560.0}


def _qdess_ratio(t2_ms, tr_ms, te_ms, flip_angle_deg, gl_area, tg_us, t1_ms=1200.0, d_mm2_s=1.25e-3):
    """S-/S+ of the DESS signal model (Sveinsson et al. 2017), written out independently of the module."""
    tr, te, tg, t1, t2 = tr_ms / 1e3, te_ms / 1e3, tg_us / 1e6, t1_ms / 1e3, np.asarray(t2_ms) / 1e3
    dk = 2 * np.pi * 42.58e6 * (gl_area / tg_us * 1e-2) * tg  # gamma (rad/s/T) x G (T/m; G/cm -> T/m) x TG
    b = dk ** 2 * d_mm2_s * 1e-6
    e1 = np.exp(-tr / t1 - tr * b)
    a = np.radians(flip_angle_deg)
    steady = np.sin(a / 2) ** 2 * (1 + e1) / (1 - np.cos(a) * e1)
    return steady * np.exp(-2 * (tr - te) / t2) * np.exp(-(tr - tg / 3) * b)


def test_qdess_recovers_t2_from_the_signal_model():
    t2 = np.linspace(15.0, 80.0, 27).reshape(3, 3, 3)
    s_plus = np.full(t2.shape, 900.0)
    s_minus = s_plus * _qdess_ratio(t2, **QDESS)
    params = QDessParameters(**QDESS)
    fit = qdess_t2(s_plus, s_minus, params)
    assert fit.method == "qdess" and fit.valid.all()
    np.testing.assert_allclose(fit.t2_ms, t2, rtol=1e-4)
    # diffusion (spoiler) correction: small but present for a typical spoiler
    no_diffusion = qdess_t2(s_plus, s_minus, params, diffusivity_mm2_s=0.0)
    change = np.abs(no_diffusion.t2_ms / fit.t2_ms - 1)
    assert 1e-3 < change.max() < 0.1  # a unit slip in GL or TG would make it huge or nil
    # out of range and non-positive echoes are masked
    s_minus[0, 0, 0] = s_plus[0, 0, 0] * _qdess_ratio(150.0, **QDESS)
    s_plus[0, 0, 1] = 0.0
    fit = qdess_t2(s_plus, s_minus, params)
    assert not fit.valid[0, 0, 0] and not fit.valid[0, 0, 1] and fit.valid.sum() == 25


def test_qdess_parameters_missing_tags_give_a_reason():
    meta = {"repetition_time_ms": 20.36, "echo_times_ms": [6.43, 6.43], "flip_angle_deg": 20.0}
    params, reason = qdess_parameters_from_dicom(meta)
    assert params is None and "(0019,10B6)" in reason and "(0019,10B7)" in reason and "anonymis" in reason
    params, reason = qdess_parameters_from_dicom({**meta, "ge_0019_10b6": "3132", "ge_0019_10b7": b"1560\x00"})
    assert reason is None and params == QDessParameters(**QDESS)
    params, reason = qdess_parameters_from_dicom({**meta, "ge_0019_10b6": "3132\\0", "ge_0019_10b7": -5})
    assert params is None and "out of range" in reason
    # a pydicom header
    from pydicom.dataset import Dataset

    ds = Dataset()
    ds.RepetitionTime, ds.EchoTime, ds.FlipAngle = "20.36", "6.43", "20"
    ds.add_new((0x0019, 0x10B6), "DS", "3132")
    params, reason = qdess_parameters_from_dicom(ds)
    assert params is None and "TG (0019,10B7)" in reason and "GL" not in reason.split("missing")[1].split(";")[0]
    ds.add_new((0x0019, 0x10B7), "DS", "1560")
    params, reason = qdess_parameters_from_dicom(ds)
    assert params == QDessParameters(**QDESS) and reason is None


def test_qdess_plan_skips_without_tags_and_maps_with_them():
    t2 = np.full((4, 4, 3), 35.0)
    s_plus = np.full(t2.shape, 700.0)
    echoes = np.stack([s_plus, s_plus * _qdess_ratio(t2, **QDESS)], axis=-1).astype(np.float32)
    meta = {"repetition_time_ms": 20.36, "echo_times_ms": [6.43, 6.43], "flip_angle_deg": 20.0,
            "series_description": "qDESS anon"}
    volume = Volume(echoes[..., 0], np.eye(4), echoes, [6.43, 6.43], meta)
    plan = t2_plan(volume)
    assert plan.kind is None and "qDESS anon" in plan.reason and "(0019,10B6)" in plan.reason
    with pytest.raises(InvalidFormat) as excinfo:
        t2_from_volume(volume)
    assert_error(excinfo, ErrorCode.INVALID_FORMAT, "GL")
    volume.meta.update(ge_0019_10b6=3132.0, ge_0019_10b7=1560.0)
    assert t2_plan(volume).kind == "qdess"
    fit = t2_from_volume(volume)
    assert fit.method == "qdess" and fit.summary()["noise_sigma"] is None
    np.testing.assert_allclose(fit.t2_ms, 35.0, rtol=1e-4)


# --------------------------------------------------------------------------------------------------
# the real MESE series


def _mese_cartilage_roi(shape) -> np.ndarray:
    """A hand-placed ROI on tibiofemoral cartilage of the GE MESE sample (canonical RAS grid, 24 x 256 x 256).

    The series has no labels.  The boxes were placed by reading the first echo
    slice by slice: in slices 7 and 16 (sagittal, 4 mm apart) the femoral
    cortex lies at k ~ 110-112 and the tibial cortex at k ~ 99-101 over the
    chosen j range, and the boxes cover the intermediate-signal layers
    between them (femoral and tibial cartilage in contact, 3-5 mm).  The
    test checks that geometry (bright marrow above) so a change of
    orientation does not silently move the ROI.
    """
    roi = np.zeros(shape, bool)
    roi[7, 116:133, 103:108] = True
    roi[16, 110:123, 102:110] = True
    return roi


@pytest.mark.mese
def test_mese_cartilage_t2_in_physiological_range(mskt_dir):
    from workbench.io.load import load_volume

    volume = load_volume(mskt_dir / "MESE_T2_dicom_data_anon")
    assert volume.echoes.shape[-1] == 8 and t2_plan(volume).kind == "multi_echo"
    roi = _mese_cartilage_roi(volume.shape)
    first = volume.echoes[..., 0].astype(np.float64)
    marrow_above = np.roll(roi, 9, axis=2)  # femoral condyle, 5.6 mm above the ROI
    assert first[marrow_above].mean() > 1.5 * first[roi].mean()
    medians = {}
    for method in METHODS:
        fit = t2_from_volume(volume, method=method, mask=roi)
        t2 = fit.t2_ms[roi]
        assert np.mean(np.isfinite(t2)) >= 0.85, method
        assert np.nanmedian(fit.r2[roi]) >= 0.95, method
        medians[method] = float(np.nanmedian(t2))
        assert 25.0 <= medians[method] <= 60.0, medians
        assert np.nanpercentile(t2, 90) < 60.0
    assert abs(medians["nonlinear"] - medians["loglinear"]) < 1.0
