"""Cartilage T2 mapping: mono-exponential fits of multi-echo series, the analytic qDESS estimate, regional stats.

How multi-echo data arrives
    :func:`workbench.io.load.load_volume` gives a :class:`~workbench.io.volume.Volume`
    whose ``echoes`` is ``(I, J, K, E)`` (echo axis *last*, ascending echo time)
    and ``echo_times_ms`` the matching times; ``load_input`` writes the same
    array as ``<case>_echoes.nii.gz``.  :func:`fit_t2` takes the echo axis
    *first* (``(E, I, J, K)``, or ``(E, N)`` for a list of voxels);
    :func:`t2_from_volume` does the move for a volume, and :func:`load_echoes`
    reads a run's ``<case>_echoes.nii.gz`` and ``input.json`` back into one.

Mono-exponential fit (:func:`fit_t2`)
    Model ``S(TE) = S0 * exp(-TE / T2)`` per voxel, vectorised over all voxels.

    * ``"loglinear"``: linear regression of ``ln S`` on TE, weighted by the
      signal squared (the variance of ``ln S`` is about ``sigma**2 / S**2``),
      in two passes (weights from the measured, then from the fitted signal);
      echoes at or below ``floor_factor`` times the noise floor are dropped per
      voxel (a log fit cannot model the floor, and keeping them biases T2
      upwards).
    * ``"nonlinear"`` (default): Levenberg-Marquardt on the magnitudes, started
      from the log-linear fit, with a noise-corrected model: each echo is
      fitted to the *expected Rician magnitude* of ``S0 * exp(-TE / T2)``
      given the noise sigma, so echoes near the floor keep their information
      without biasing T2 (the noise-corrected fits of Raya et al., MRM 2010,
      were the accurate ones at low SNR; truncation and plain exponentials
      over-estimate T2).  With ``noise_floor=0`` it is the plain exponential.

    Noise: ``noise_floor`` is the mean magnitude of pure-noise voxels (what a
    background ROI shows, ``sigma * sqrt(pi / 2)``).  ``None`` estimates it
    from the background of the first echo (:func:`estimate_noise_sigma`).
    Scanners that suppress the background (outside the knee the real GE MESE
    sample holds zeros and values of a few units next to tissue in the
    thousands) give a floor near 0: the fits then reduce to
    the uncorrected ones, which is what that data allows.

    Masking: a voxel's T2 is NaN (``valid`` false) outside ``mask``, when fewer
    than ``min_echoes`` echoes lie above the floor, when T2 falls outside
    ``t2_range_ms`` (open interval, 0-100 ms by default) or when the fit's
    coefficient of determination ``r2`` is below ``min_r2``.

    First echo: in multi-echo spin echo (MESE) imperfect refocusing adds
    stimulated-echo pathways to the later echoes but not to the first, and many
    cartilage studies drop the first echo.  Here every echo is kept by default
    (``skip_first_echo=False``, also in :func:`t2_from_volume`): on the real GE
    MESE sample the first echo lies on the exponential through echoes 2-8
    (measured/extrapolated median 1.00 in a cartilage ROI; the contamination
    shows as an even/odd ripple of a few per cent instead), dropping it moved
    the ROI's median T2 by 0.3 ms and costs the echo with the most signal.
    Pass ``skip_first_echo=True`` for series where echo 1 is visibly off.

qDESS (:func:`qdess_t2`)
    The analytic two-echo estimate of Sveinsson et al. 2017 when TR, TE, flip
    angle and the GE private gradient tags GL ``(0019,10B6)`` and TG
    ``(0019,10B7)`` are known; :func:`qdess_parameters_from_dicom` says why
    not otherwise (anonymised data often lacks the private tags).

Regions (:func:`region_t2_stats`)
    Mean, std and median of T2 per cartilage region of the workbench label
    table, each also split into a deep half (nearer the bone) and a
    superficial half (nearer the articular surface) by the relative depth of
    :func:`cartilage_depth`.  Field names: ``{region}_t2_ms_{mean,std,median}``,
    ``{region}_deep_t2_ms_{...}``, ``{region}_superficial_t2_ms_{...}``,
    ``{region}_t2_n_voxels``; ``None`` where a region has no valid voxel.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from workbench.data import labels as L
from workbench.errors import ConfigError, InvalidFormat
from workbench.io.volume import Volume

__all__ = [
    "CARTILAGE_REGIONS",
    "CartilageRegion",
    "QDessParameters",
    "T2Fit",
    "T2Plan",
    "cartilage_depth",
    "estimate_noise_sigma",
    "fit_t2",
    "load_echoes",
    "qdess_parameters_from_dicom",
    "qdess_t2",
    "region_t2_stats",
    "t2_from_volume",
    "t2_plan",
    "write_t2_map",
]

METHODS = ("nonlinear", "loglinear")
#: Two-echo series with a flip angle below this (degrees) are steady-state gradient echo (qDESS), not spin echo.
QDESS_MAX_FLIP_DEG = 60.0
_SQRT_HALF_PI = math.sqrt(math.pi / 2.0)
_CHUNK = 1 << 17  # voxels per block of a fit (bounds memory)


# --------------------------------------------------------------------------------------------------
# result type


@dataclass
class T2Fit:
    """A T2 map and how it was made.

    Attributes:
        t2_ms: T2 in ms (float32, the spatial shape of the input); NaN where not ``valid``.
        s0: fitted signal at TE = 0 (float32); NaN where no fit was made (outside the mask).
            ``None`` for qDESS.
        r2: coefficient of determination of the fit in the magnitude domain (float32),
            NaN where no fit was made; 1 for two-echo fits.  ``None`` for qDESS.
        valid: voxels whose T2 passed every check.
        method: ``"nonlinear"``, ``"loglinear"`` or ``"qdess"``.
        echo_times_ms: the echo times used (after ``skip_first_echo``).
        noise_sigma: the Gaussian noise sigma per channel the fit assumed (``noise_floor / sqrt(pi/2)``);
            ``None`` for qDESS.
        n_echoes_used: per voxel, the echoes above the noise floor (uint8); ``None`` for qDESS.
    """

    t2_ms: np.ndarray
    s0: np.ndarray | None
    r2: np.ndarray | None
    valid: np.ndarray
    method: str
    echo_times_ms: tuple[float, ...]
    noise_sigma: float | None
    n_echoes_used: np.ndarray | None = None

    def filled(self, value: float = 0.0) -> np.ndarray:
        """``t2_ms`` with masked voxels set to ``value`` (NIfTI outputs must be finite)."""
        return np.where(self.valid, self.t2_ms, np.float32(value)).astype(np.float32)

    def summary(self) -> dict[str, Any]:
        """Small JSON-ready figures: method, echoes, noise, voxel counts and the valid T2 quartiles."""
        values = self.t2_ms[self.valid]
        fitted = int(np.count_nonzero(np.isfinite(self.r2))) if self.r2 is not None else int(self.valid.sum())
        quartiles = [float(q) for q in np.percentile(values, [25, 50, 75])] if values.size else [None] * 3
        return {
            "t2_method": self.method,
            "echo_times_ms": [float(t) for t in self.echo_times_ms],
            "noise_sigma": None if self.noise_sigma is None else float(self.noise_sigma),
            "n_fitted": fitted,
            "n_valid": int(values.size),
            "t2_ms_quartiles": quartiles,
        }


# --------------------------------------------------------------------------------------------------
# mono-exponential fit


def fit_t2(
    echoes: np.ndarray,
    echo_times_ms: Sequence[float],
    *,
    mask: np.ndarray | None = None,
    method: Literal["nonlinear", "loglinear"] = "nonlinear",
    noise_floor: float | None = None,
    floor_factor: float = 2.0,
    t2_range_ms: tuple[float, float] = (0.0, 100.0),
    min_r2: float = 0.8,
    min_echoes: int = 3,
    skip_first_echo: bool = False,
    max_iter: int = 60,
) -> T2Fit:
    """Fit ``S0 * exp(-TE / T2)`` to every voxel of a multi-echo magnitude series.

    Args:
        echoes: magnitudes with the echo axis first, ``(E, I, J, K)`` (or ``(E, N)``).
        echo_times_ms: the E echo times in ms (any order; sorted here with the echoes).
        mask: voxels to fit (spatial shape); ``None``: voxels whose first used echo is
            above ``floor_factor`` times the noise floor.
        method: ``"nonlinear"`` (noise-corrected Levenberg-Marquardt, started from the
            log-linear fit) or ``"loglinear"`` (weighted, echoes at the floor dropped).
        noise_floor: mean magnitude of pure-noise voxels, ``sigma * sqrt(pi/2)``;
            ``None`` estimates it from the background (:func:`estimate_noise_sigma`);
            0 turns noise handling off.
        floor_factor: echoes at or below ``floor_factor * noise_floor`` do not count as
            signal: dropped by the log-linear fit, not counted in ``n_echoes_used``.
        t2_range_ms: T2 outside this open interval is masked.
        min_r2: fits with a coefficient of determination below this are masked.
        min_echoes: fewest echoes above the floor for a valid voxel (capped at the
            number of echoes used).
        skip_first_echo: drop the first echo (MESE stimulated-echo contamination).
        max_iter: Levenberg-Marquardt iteration limit.

    Returns:
        A :class:`T2Fit` with maps of the spatial shape of ``echoes``.

    Raises:
        InvalidFormat: fewer than two echoes (after ``skip_first_echo``), echo
            times that do not match the echoes or are not positive and distinct.
        ConfigError: an unknown ``method`` or a bad option value.
    """
    if method not in METHODS:
        raise ConfigError(f"Unknown T2 fit method {method!r}", f"Use one of {', '.join(METHODS)}.")
    if not (t2_range_ms[0] < t2_range_ms[1]) or floor_factor < 0 or min_echoes < 2:
        raise ConfigError(f"Bad T2 fit options: t2_range_ms={t2_range_ms}, floor_factor={floor_factor}, "
                          f"min_echoes={min_echoes}", "Use lo < hi, floor_factor >= 0 and min_echoes >= 2.")
    echoes, tes = _check_echoes(echoes, echo_times_ms, skip_first_echo)
    spatial = echoes.shape[1:]
    if noise_floor is None:
        sigma = estimate_noise_sigma(echoes[0])
    else:
        if not (np.isfinite(noise_floor) and noise_floor >= 0):
            raise ConfigError(f"noise_floor must be a finite number >= 0, got {noise_floor!r}")
        sigma = float(noise_floor) / _SQRT_HALF_PI
    floor = floor_factor * sigma * _SQRT_HALF_PI
    if mask is None:
        mask = np.isfinite(echoes[0]) & (echoes[0] > floor)
    else:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != spatial:
            raise InvalidFormat(f"T2 mask shape {list(mask.shape)} does not match the echoes' {list(spatial)}",
                                "Give a mask on the image grid.")

    t2_map = np.full(spatial, np.nan, np.float32)
    s0_map = np.full(spatial, np.nan, np.float32)
    r2_map = np.full(spatial, np.nan, np.float32)
    valid = np.zeros(spatial, bool)
    used = np.zeros(spatial, np.uint8)
    coords = np.nonzero(mask)
    need = min(min_echoes, tes.size)
    for start in range(0, coords[0].size, _CHUNK):  # blocks of voxels bound the memory of big volumes
        where = tuple(c[start:start + _CHUNK] for c in coords)
        y = np.asarray(echoes[(slice(None),) + where], dtype=np.float64)  # (E, n)
        finite = np.all(np.isfinite(y), axis=0)
        y[:, ~finite] = 0.0
        above = y > floor
        n_used = above.sum(axis=0)
        s0, rate = _loglinear(y, tes, above, floor)
        if method == "loglinear":
            with np.errstate(over="ignore", invalid="ignore"):
                r2 = _r_squared(y, s0 * np.exp(-rate * tes[:, None]), above)
        else:
            s0, rate = _levenberg_marquardt(y, tes, s0, rate, sigma, max_iter)
            r2 = _r_squared(y, _rician_mean(s0 * np.exp(-rate * tes[:, None]), sigma), None)
        with np.errstate(divide="ignore", invalid="ignore"):
            t2 = 1.0 / rate
        ok = finite & (n_used >= need) & np.isfinite(t2) & (t2 > t2_range_ms[0]) & (t2 < t2_range_ms[1])
        ok &= np.isfinite(r2) & (r2 >= min_r2) & (s0 > 0)
        t2_map[where] = np.where(ok, t2, np.nan)
        s0_map[where] = np.where(finite, s0, np.nan)
        r2_map[where] = np.where(finite, r2, np.nan)
        valid[where] = ok
        used[where] = n_used
    return T2Fit(t2_map, s0_map, r2_map, valid, method, tuple(float(t) for t in tes), float(sigma), used)


def _check_echoes(echoes: np.ndarray, echo_times_ms: Sequence[float], skip_first: bool):
    echoes = np.asarray(echoes)
    tes = np.asarray(list(echo_times_ms), dtype=np.float64)
    if echoes.ndim < 2 or echoes.shape[0] < 2:
        raise InvalidFormat(
            f"T2 mapping needs a multi-echo series; got {echoes.shape[0] if echoes.ndim else 1} echo "
            f"(array shape {list(echoes.shape)}, echo axis first)",
            "Give a multi-echo (MESE) series or a two-echo qDESS; single-echo images have no T2 information.")
    if tes.ndim != 1 or tes.size != echoes.shape[0]:
        raise InvalidFormat(f"{tes.size} echo times for {echoes.shape[0]} echoes",
                            "Give one echo time (ms) per echo; the echo axis is the first.")
    if not np.all(np.isfinite(tes)) or np.any(tes <= 0) or np.unique(tes).size != tes.size:
        raise InvalidFormat(f"Echo times must be positive and distinct, got {[float(t) for t in tes]} ms",
                            "Check the series' EchoTime values.")
    order = np.argsort(tes)
    if not np.array_equal(order, np.arange(tes.size)):
        echoes, tes = echoes[order], tes[order]
    if skip_first:
        echoes, tes = echoes[1:], tes[1:]
    if tes.size < 2:
        raise InvalidFormat("T2 mapping needs at least two echoes after dropping the first",
                            "Keep the first echo (skip_first_echo=False) for two-echo series.")
    return echoes, tes


def _loglinear(y: np.ndarray, tes: np.ndarray, above: np.ndarray, floor: float):
    """Weighted log-linear fit per voxel; returns ``(s0, rate)`` (rate in 1/ms).

    Two passes: the first weights each echo by its magnitude squared (the
    variance of ``ln S`` is about ``sigma**2 / S**2``) over the echoes measured
    above the floor; the second weights by the *fitted* signal squared over the
    echoes the fit puts above the floor, so noise does not choose the weights
    (weights from measured values favour echoes that noise pushed up and bias
    T2 upwards).  Magnitudes are not corrected for the Rician bias: in the log
    domain the Rician bias (about ``+sigma**2 / 2A**2``) and the log's own
    bias (about ``-sigma**2 / 2A**2``) cancel to second order, and measured
    on synthetic decays a ``sqrt(M**2 - sigma**2)`` correction made T2 worse.
    """
    z = np.log(np.where(y > 0, y, 1.0))
    t = tes[:, None]
    use = above & (y > 0)
    s0, rate = _weighted_line(z, t, use, np.where(use, y * y, 0.0))
    with np.errstate(over="ignore", invalid="ignore"):
        predicted = s0 * np.exp(-rate * t)
    again = np.isfinite(predicted) & (predicted > floor) & (y > 0)
    s0_2, rate_2 = _weighted_line(z, t, again, np.where(again, predicted * predicted, 0.0))
    keep = (again.sum(0) >= 2) & np.isfinite(rate_2)
    return np.where(keep, s0_2, s0), np.where(keep, rate_2, rate)


def _weighted_line(z, t, use, w):
    w = w / np.maximum(w.max(axis=0, keepdims=True), 1e-300)  # per-voxel scale keeps the sums well conditioned
    sw, st, stt = w.sum(0), (w * t).sum(0), (w * t * t).sum(0)
    sz, stz = (w * z).sum(0), (w * t * z).sum(0)
    det = sw * stt - st * st
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        slope = (sw * stz - st * sz) / det
        intercept = (stt * sz - st * stz) / det
    good = (use.sum(0) >= 2) & np.isfinite(slope) & (np.abs(det) > 1e-12 * np.maximum(sw * stt, 1e-300))
    rate = np.where(good, -slope, np.nan)
    s0 = np.where(good, np.exp(np.clip(intercept, -700, 700)), np.nan)
    return s0, rate


def _rician_mean(a: np.ndarray, sigma: float) -> np.ndarray:
    """Expected magnitude of a signal ``a`` in Gaussian noise ``sigma`` per channel (``a`` itself for sigma 0)."""
    return _rician_mean_and_slope(a, sigma)[0]


#: Above this signal-to-noise ratio the Rician mean uses its asymptotic series (relative error < 1e-6).
_ASYMPTOTIC_SNR = 10.0


def _rician_mean_and_slope(a: np.ndarray, sigma: float):
    """Expected Rician magnitude of ``a`` (noise ``sigma`` per channel) and its derivative with respect to ``a``.

    ``E = sigma sqrt(pi/2) L_1/2(-x)``, ``x = a**2 / (2 sigma**2)``, written with
    the exponentially scaled Bessel functions:
    ``E = sigma sqrt(pi/2) [(1 + x) i0e(x/2) + x i1e(x/2)]`` and
    ``dE/da = sqrt(pi/2) a / (2 sigma) [i0e(x/2) + i1e(x/2)]``.  Where
    ``a > 10 sigma``: ``E = a + sigma**2 / 2a + sigma**4 / 8a**3``.
    """
    if sigma <= 0:
        return a, np.ones_like(a)
    from scipy.special import i0e, i1e

    low = ~(np.abs(a) >= _ASYMPTOTIC_SNR * sigma)  # NaN goes the exact way
    mean = np.empty_like(a)
    slope = np.empty_like(a)
    high = ~low
    inv = sigma * sigma / (a[high] * a[high])
    mean[high] = np.abs(a[high]) * (1.0 + 0.5 * inv + 0.125 * inv * inv)  # even in a
    slope[high] = np.sign(a[high]) * (1.0 - 0.5 * inv - 0.375 * inv * inv)
    if low.any():
        al = a[low]
        x = (al * al) / (2.0 * sigma * sigma)
        b0, b1 = i0e(x / 2.0), i1e(x / 2.0)
        mean[low] = sigma * _SQRT_HALF_PI * ((1.0 + x) * b0 + x * b1)
        slope[low] = _SQRT_HALF_PI * (al / (2.0 * sigma)) * (b0 + b1)
    return mean, slope


def _levenberg_marquardt(y, tes, s0, rate, sigma, max_iter):
    """Vectorised LM for ``y ~ RicianMean(s0 * exp(-rate * TE); sigma)`` over all voxels (columns of ``y``)."""
    s0 = s0.copy()
    rate = rate.copy()
    # voxels without a log-linear start: begin at a generic cartilage-like decay through the first echo
    bad = ~(np.isfinite(s0) & np.isfinite(rate) & (s0 > 0))
    rate[bad] = 1.0 / 40.0
    s0[bad] = np.maximum(y[0, bad], 1e-6) * np.exp(rate[bad] * tes[0])
    rate = np.clip(rate, -0.05, 2.0)
    return _lm_block(y, tes[:, None], s0, rate, sigma, max_iter)


def _lm_block(y, t, s0, rate, sigma, max_iter):
    """Levenberg-Marquardt with a damping factor per voxel; converged voxels leave the active set."""

    def evaluate(s0_, rate_):
        decay = np.exp(-rate_ * t)
        a = s0_ * decay
        mean, slope = _rician_mean_and_slope(a, sigma)
        return mean, slope * decay, -slope * a * t  # model, d/ds0, d/drate

    f, j0, j1 = evaluate(s0, rate)
    res = y - f
    cost = (res * res).sum(0)
    lam = np.full(s0.shape, 1e-3)
    active = np.flatnonzero(np.isfinite(cost))
    for _ in range(max_iter):
        if active.size == 0:
            break
        a0, a1, r = j0[:, active], j1[:, active], res[:, active]
        h00, h01, h11 = (a0 * a0).sum(0), (a0 * a1).sum(0), (a1 * a1).sum(0)
        g0, g1 = (a0 * r).sum(0), (a1 * r).sum(0)
        damp = 1.0 + lam[active]
        d00, d11 = h00 * damp, h11 * damp
        det = d00 * d11 - h01 * h01
        with np.errstate(divide="ignore", invalid="ignore"):
            step0 = (d11 * g0 - h01 * g1) / det
            step1 = (d00 * g1 - h01 * g0) / det
        new_s0 = s0[active] + step0
        new_rate = np.clip(rate[active] + step1, -0.05, 2.0)
        nf, n0, n1 = evaluate(new_s0, new_rate)
        nres = y[:, active] - nf
        ncost = (nres * nres).sum(0)
        better = np.isfinite(ncost) & (ncost < cost[active])
        take = active[better]
        gain = (cost[take] - ncost[better]) / np.maximum(cost[take], 1e-300)
        s0[take], rate[take], cost[take] = new_s0[better], new_rate[better], ncost[better]
        f[:, take], j0[:, take], j1[:, take], res[:, take] = nf[:, better], n0[:, better], n1[:, better], \
            nres[:, better]
        lam[take] = np.maximum(lam[take] * 0.2, 1e-9)
        lam[active[~better]] *= 10.0
        small = np.zeros(active.size, bool)
        small[better] = (gain < 1e-9) | (
            (np.abs(step1[better]) <= 1e-7 * np.abs(rate[take]) + 1e-10)
            & (np.abs(step0[better]) <= 1e-7 * np.abs(s0[take]) + 1e-10))
        done = small | (lam[active] > 1e8) | ~np.isfinite(step0) | ~np.isfinite(step1)
        active = active[~done]
    return s0, rate


def _r_squared(y: np.ndarray, model: np.ndarray, use: np.ndarray | None) -> np.ndarray:
    """1 - SS_res / SS_tot per voxel over the echoes in ``use`` (all when None); 1 for exact two-point fits."""
    if use is None:
        use = np.ones(y.shape, bool)
    n = use.sum(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = np.where(use, y, 0.0).sum(0) / n
        ss_tot = np.where(use, (y - mean) ** 2, 0.0).sum(0)
        ss_res = np.where(use, (y - model) ** 2, 0.0).sum(0)
        r2 = 1.0 - ss_res / ss_tot
    r2 = np.where(n == 2, 1.0, r2)
    return np.where(n >= 2, r2, np.nan)


def estimate_noise_sigma(image: np.ndarray) -> float:
    """Gaussian noise sigma per channel, from the background (Rayleigh-distributed) voxels of a magnitude image.

    The background of a magnitude image is Rayleigh distributed with its mode
    at sigma.  The mode is the lowest-intensity prominent peak of a smoothed
    histogram of the intensities below half the 99th percentile (exact zeros,
    from zero-filled or background-suppressed regions, left out; tissue peaks
    lie above the background's), refined by a straight-line fit of
    ``log(h(m) / m)`` against ``m**2`` (slope ``-1 / (2 sigma**2)``) around
    the peak.  Images whose background was suppressed by the scanner give a
    small sigma, which turns the noise corrections practically off.

    Args:
        image: one magnitude image (any shape), e.g. the first echo.
    """
    from scipy.ndimage import gaussian_filter1d
    from scipy.signal import find_peaks

    values = np.asarray(image).reshape(-1)
    values = values[:: max(1, values.size // 4_000_000)].astype(np.float64)  # a few million voxels are plenty
    values = values[np.isfinite(values) & (values > 0)]
    if values.size < 100:
        return 0.0
    top = 0.5 * float(np.percentile(values, 99.0))
    values = values[values <= top]
    if values.size < 100 or top <= 0:
        return 0.0
    counts, edges = np.histogram(values, bins=int(np.clip(np.sqrt(values.size), 30, 250)), range=(0.0, top))
    centers = 0.5 * (edges[:-1] + edges[1:])
    smooth = gaussian_filter1d(counts.astype(np.float64), 1.5, mode="nearest")
    # a leading 0 lets a histogram that falls from its first bin (suppressed background) peak there
    peaks, _ = find_peaks(np.r_[0.0, smooth], prominence=0.1 * smooth.max())
    mode = float(centers[peaks[0] - 1]) if peaks.size else float(centers[int(np.argmax(smooth))])
    fit = (centers >= 0.3 * mode) & (centers <= 1.5 * mode) & (counts > 0)
    if np.count_nonzero(fit) < 5:
        return mode
    slope = np.polyfit(centers[fit] ** 2, np.log(counts[fit] / centers[fit]), 1)[0]
    if not (np.isfinite(slope) and slope < 0):
        return mode
    sigma = math.sqrt(-1.0 / (2.0 * slope))
    return sigma if 0.5 * mode <= sigma <= 2.0 * mode else mode


# --------------------------------------------------------------------------------------------------
# volumes in, files out


@dataclass(frozen=True)
class T2Plan:
    """What T2 mapping a volume allows.

    Attributes:
        kind: ``"multi_echo"`` (mono-exponential fit), ``"qdess"`` (analytic two-echo
            estimate) or ``None`` (no T2 possible: the pipeline records the step as skipped).
        reason: one line saying why (shown in the step log / ``result.json``).
        qdess: the sequence parameters for ``kind == "qdess"``.
    """

    kind: Literal["multi_echo", "qdess"] | None
    reason: str
    qdess: QDessParameters | None = None


def t2_plan(volume: Volume) -> T2Plan:
    """Decide how (and whether) T2 can be mapped from ``volume`` (as :func:`~workbench.io.load.load_volume` gives it).

    * one echo: no T2;
    * two echoes with a flip angle below :data:`QDESS_MAX_FLIP_DEG` (a DESS):
      the analytic qDESS estimate when :func:`qdess_parameters_from_dicom`
      finds its parameters in ``volume.meta``, else no T2 with that reason;
    * otherwise (two or more spin echoes with distinct echo times): the
      mono-exponential fit.
    """
    n = volume.n_echoes
    name = volume.meta.get("series_description") or Path(str(volume.meta.get("source", "input"))).name
    if n < 2 or volume.echoes is None:
        return T2Plan(None, f"single-echo input ({name}): T2 mapping needs a multi-echo (MESE) series or a "
                            "two-echo qDESS")
    flip = _number(volume.meta.get("flip_angle_deg"))
    if n == 2 and flip is not None and flip < QDESS_MAX_FLIP_DEG:
        params, reason = qdess_parameters_from_dicom(volume.meta)
        if params is None:
            return T2Plan(None, f"two-echo steady-state input ({name}, flip angle {flip:g} deg): {reason}")
        return T2Plan("qdess", f"qDESS ({name}): analytic two-echo T2 (Sveinsson et al. 2017)", params)
    tes = [float(t) for t in volume.echo_times_ms]
    if len(tes) != n or len(set(tes)) != n or min(tes) <= 0:
        return T2Plan(None, f"{n}-echo input ({name}) without {n} distinct echo times ({tes} ms): no T2 fit")
    return T2Plan("multi_echo", f"{n} echoes, TE {min(tes):g}-{max(tes):g} ms ({name}): mono-exponential fit")


def t2_from_volume(volume: Volume, *, method: Literal["nonlinear", "loglinear"] = "nonlinear",
                   mask: np.ndarray | None = None, **fit_options: Any) -> T2Fit:
    """T2 map of a loaded volume: :func:`fit_t2` for multi-echo series, :func:`qdess_t2` for qDESS.

    Args:
        volume: a volume with ``echoes`` ``(I, J, K, E)`` and ``echo_times_ms``
            (``Volume.meta`` supplies the qDESS parameters).
        method: fit method for multi-echo series (ignored for qDESS).
        mask: voxels to map (the volume's grid); ``None``: see :func:`fit_t2`.
        fit_options: further :func:`fit_t2` (or :func:`qdess_t2`) keyword arguments.

    Raises:
        InvalidFormat: the volume allows no T2 map; the message is :attr:`T2Plan.reason`
            (call :func:`t2_plan` first to skip instead of failing).
    """
    plan = t2_plan(volume)
    if plan.kind is None:
        raise InvalidFormat(plan.reason, "T2 maps need a multi-echo spin-echo series (MESE) or a qDESS with its "
                                         "GE private tags; skip T2 for this input.")
    if plan.kind == "qdess":
        assert plan.qdess is not None
        return qdess_t2(volume.echoes[..., 0], volume.echoes[..., 1], plan.qdess, mask=mask, **fit_options)
    return fit_t2(np.moveaxis(volume.echoes, -1, 0), volume.echo_times_ms, mask=mask, method=method, **fit_options)


def load_echoes(echoes_path: str | os.PathLike, info_path: str | os.PathLike) -> Volume:
    """The multi-echo volume as ``load_input`` leaves it in a run: ``<case>_echoes.nii.gz`` and ``input.json``.

    The NIfTI holds the echoes ``(I, J, K, E)`` on the canonical (possibly
    resampled) grid; ``input.json`` gives ``echo_times_ms`` and ``meta`` (TR,
    flip angle, the GE private values the qDESS estimate needs).

    Raises:
        InputNotFound: a file is missing.
        InvalidFormat: the NIfTI is not 4-D or its echo count does not match the echo times.
    """
    import json

    import nibabel as nib

    from workbench.errors import InputNotFound

    for path in (echoes_path, info_path):
        if not Path(path).is_file():
            raise InputNotFound(f"{path} does not exist", "Run load_input first: it writes the echoes and input.json.")
    img = nib.load(str(echoes_path))
    data = np.asarray(img.dataobj, dtype=np.float32)
    info = json.loads(Path(info_path).read_text())
    tes = [float(t) for t in info.get("echo_times_ms") or []]
    if data.ndim != 4 or len(tes) != data.shape[-1]:
        raise InvalidFormat(f"{Path(echoes_path).name} has shape {list(data.shape)} but {Path(info_path).name} "
                            f"lists {len(tes)} echo times", "Give the echoes and input.json of the same run.")
    meta = dict(info.get("meta") or {}, echo_times_ms=tes)
    return Volume(np.ascontiguousarray(data[..., 0]), np.asarray(img.affine, dtype=np.float64), data, tes, meta)


def write_t2_map(fit: T2Fit, affine: np.ndarray, path: str | os.PathLike) -> Path:
    """Write ``fit.t2_ms`` as float32 NIfTI (``.nii.gz``) with masked voxels 0 (outputs must be finite)."""
    from workbench.io.nifti import write_nifti

    return write_nifti(fit.filled(0.0), np.asarray(affine, dtype=np.float64), path, dtype=np.float32)


# --------------------------------------------------------------------------------------------------
# regions, depth


@dataclass(frozen=True)
class CartilageRegion:
    """A cartilage region: its label values and the bone it lies on (deep = towards that bone)."""

    labels: tuple[int, ...]
    bone: int


#: The result regions (names as upstream's results) plus ``fem_cart``, the whole femoral cartilage
#: (label 2 and its subregions 11-15), which also covers label maps without subregions.
CARTILAGE_REGIONS: dict[str, CartilageRegion] = {
    "pat_cart": CartilageRegion((L.PAT_CART,), L.PATELLA),
    "ant_fem_cart": CartilageRegion((L.FEM_CART_ANT,), L.FEMUR),
    "med_wb_fem_cart": CartilageRegion((L.FEM_CART_MWB,), L.FEMUR),
    "lat_wb_fem_cart": CartilageRegion((L.FEM_CART_LWB,), L.FEMUR),
    "med_post_fem_cart": CartilageRegion((L.FEM_CART_MPOST,), L.FEMUR),
    "lat_post_fem_cart": CartilageRegion((L.FEM_CART_LPOST,), L.FEMUR),
    "med_tib_cart": CartilageRegion((L.MED_TIB_CART,), L.TIBIA),
    "lat_tib_cart": CartilageRegion((L.LAT_TIB_CART,), L.TIBIA),
    "fem_cart": CartilageRegion((L.FEM_CART, L.FEM_CART_ANT, L.FEM_CART_MWB, L.FEM_CART_LWB, L.FEM_CART_MPOST,
                                 L.FEM_CART_LPOST), L.FEMUR),
}

#: Every cartilage label on each bone: the "plate" whose far side is the articular surface.
_PLATES: dict[int, tuple[int, ...]] = {
    L.FEMUR: CARTILAGE_REGIONS["fem_cart"].labels,
    L.TIBIA: (L.MED_TIB_CART, L.LAT_TIB_CART),
    L.PATELLA: (L.PAT_CART,),
}
_STATS = ("mean", "std", "median")
_DEPTH_MARGIN_MM = 10.0


def cartilage_depth(labels: np.ndarray, spacing_mm: Sequence[float], *,
                    regions: Mapping[str, CartilageRegion] = CARTILAGE_REGIONS) -> np.ndarray:
    """Relative depth of every cartilage voxel: 0 at the bone, 1 at the articular surface.

    For each bone, the cartilage on it (every cartilage label of that bone, so
    that subregion borders are not surfaces) gets ``d_bone / (d_bone +
    d_surface)``: ``d_bone`` the distance (mm, Euclidean distance transform
    with the voxel ``spacing_mm``) to the nearest bone voxel, ``d_surface`` to
    the nearest voxel that is neither that cartilage nor that bone (joint
    fluid, the opposing cartilage, menisci, ...).  Deep means below 0.5.  The
    transforms run on the plate's bounding box plus 10 mm.

    Returns:
        float32 array of ``labels``' shape; NaN outside cartilage and for
        cartilage whose bone is absent.
    """
    from scipy import ndimage

    labels = np.asarray(labels)
    spacing = _spacing(spacing_mm, labels.ndim)
    depth = np.full(labels.shape, np.nan, np.float32)
    plates: dict[int, set[int]] = {bone: set(values) for bone, values in _PLATES.items()}
    for region in regions.values():
        plates.setdefault(region.bone, set()).update(region.labels)
    for bone, values in plates.items():
        plate = np.isin(labels, sorted(values))
        if not plate.any():
            continue
        box = _padded_box(plate, spacing, _DEPTH_MARGIN_MM)
        plate_c = plate[box]
        bone_c = labels[box] == bone
        if not bone_c.any():
            continue
        d_bone = ndimage.distance_transform_edt(~bone_c, sampling=spacing)
        d_surface = ndimage.distance_transform_edt(plate_c | bone_c, sampling=spacing)
        with np.errstate(invalid="ignore", divide="ignore"):
            rel = d_bone / (d_bone + d_surface)
        sub = depth[box]
        sub[plate_c] = rel[plate_c]
        depth[box] = sub
    return depth


def region_t2_stats(
    t2_ms: np.ndarray,
    labels: np.ndarray,
    spacing_mm: Sequence[float],
    *,
    regions: Mapping[str, CartilageRegion] = CARTILAGE_REGIONS,
    method: str | None = None,
    depth: np.ndarray | None = None,
) -> dict[str, Any]:
    """Cartilage T2 per region: mean, std and median, whole and split into deep and superficial halves.

    Args:
        t2_ms: T2 map (ms), NaN where not valid (``T2Fit.t2_ms``); 0 also counts as
            no value (as in the written NIfTI).
        labels: label map on the same grid (workbench label table).
        spacing_mm: voxel size along each axis (for the depth split).
        regions: name -> :class:`CartilageRegion`; default :data:`CARTILAGE_REGIONS`.
        method: stored as ``t2_method`` when given (``T2Fit.method``).
        depth: precomputed :func:`cartilage_depth` (computed when None).

    Returns:
        ``{region}_t2_ms_{mean,std,median}``, ``{region}_deep_t2_ms_{...}``,
        ``{region}_superficial_t2_ms_{...}`` (floats, ``None`` without valid
        voxels; std is the population std), ``{region}_t2_n_voxels`` and
        ``t2_method``.  Deep: relative depth below 0.5 (nearer the bone).
    """
    t2 = np.asarray(t2_ms)
    labels = np.asarray(labels)
    if t2.shape != labels.shape:
        raise InvalidFormat(f"T2 map shape {list(t2.shape)} does not match the label map's {list(labels.shape)}",
                            "Give the T2 map and the labels on the same grid.")
    if depth is None:
        depth = cartilage_depth(labels, spacing_mm, regions=regions)
    has_value = np.isfinite(t2) & (t2 != 0)
    out: dict[str, Any] = {}
    if method is not None:
        out["t2_method"] = method
    for name, region in regions.items():
        inside = np.isin(labels, region.labels) & has_value
        out[f"{name}_t2_n_voxels"] = int(np.count_nonzero(inside))
        for part, select in (("", inside), ("_deep", inside & (depth < 0.5)),
                             ("_superficial", inside & (depth >= 0.5))):
            values = t2[select].astype(np.float64)
            stats = (float(values.mean()), float(values.std()), float(np.median(values))) if values.size else \
                (None, None, None)
            for stat, value in zip(_STATS, stats):
                out[f"{name}{part}_t2_ms_{stat}"] = value
    return out


def _spacing(spacing_mm: Sequence[float], ndim: int) -> tuple[float, ...]:
    spacing = tuple(float(s) for s in spacing_mm)
    if len(spacing) != ndim or not all(np.isfinite(s) and s > 0 for s in spacing):
        raise ConfigError(f"spacing_mm must be {ndim} positive numbers, got {list(spacing_mm)}")
    return spacing


def _padded_box(mask: np.ndarray, spacing: Sequence[float], margin_mm: float) -> tuple[slice, ...]:
    idx = np.argwhere(mask)
    lo, hi = idx.min(0), idx.max(0) + 1
    pad = np.ceil(margin_mm / np.asarray(spacing)).astype(int)
    return tuple(slice(max(0, int(a - p)), min(n, int(b + p))) for a, b, p, n in zip(lo, hi, pad, mask.shape))


# --------------------------------------------------------------------------------------------------
# qDESS


@dataclass(frozen=True)
class QDessParameters:
    """What the analytic qDESS T2 needs from the header.

    Attributes:
        tr_ms: repetition time.
        te_ms: echo time of the first (S+) echo.
        flip_angle_deg: flip angle.
        gl_area: spoiler gradient area, GE tag (0019,10B6), in G/cm x us.
        tg_us: spoiler gradient duration, GE tag (0019,10B7), in us.
    """

    tr_ms: float
    te_ms: float
    flip_angle_deg: float
    gl_area: float
    tg_us: float


_GL_TAG, _TG_TAG = (0x0019, 0x10B6), (0x0019, 0x10B7)


def qdess_parameters_from_dicom(header: Any) -> tuple[QDessParameters | None, str | None]:
    """The qDESS parameters from a DICOM header, or ``None`` and the reason they are not there.

    Args:
        header: a pydicom ``Dataset`` of the series, or a mapping as
            ``Volume.meta`` / ``input.json``'s ``meta`` (``repetition_time_ms``,
            ``echo_times_ms``, ``flip_angle_deg``, ``ge_0019_10b6``, ``ge_0019_10b7``).

    Returns:
        ``(parameters, None)``, or ``(None, reason)`` naming what is missing or
        out of range (anonymisation usually strips GL and TG, the GE private tags).
    """
    if isinstance(header, Mapping):
        tes = header.get("echo_times_ms") or []
        te = _number(tes[0] if isinstance(tes, (list, tuple)) and tes else header.get("echo_time_ms"))
        values = {"TR": _number(header.get("repetition_time_ms")), "TE": te,
                  "flip angle": _number(header.get("flip_angle_deg")),
                  "GL (0019,10B6)": _number(header.get("ge_0019_10b6")),
                  "TG (0019,10B7)": _number(header.get("ge_0019_10b7"))}
    else:
        def element(tag):
            item = header.get(tag) if hasattr(header, "get") else None
            return getattr(item, "value", item)

        values = {"TR": _number(element("RepetitionTime")), "TE": _number(element("EchoTime")),
                  "flip angle": _number(element("FlipAngle")),
                  "GL (0019,10B6)": _number(element(_GL_TAG)), "TG (0019,10B7)": _number(element(_TG_TAG))}
    missing = [name for name, value in values.items() if value is None]
    if missing:
        private = "; GL and TG are GE private tags that anonymisation often removes" if any(
            "(0019" in m for m in missing) else ""
        return None, f"qDESS T2 needs TR, TE, flip angle, GL and TG; missing {', '.join(missing)}{private}"
    tr, te, flip = values["TR"], values["TE"], values["flip angle"]
    gl, tg = values["GL (0019,10B6)"], values["TG (0019,10B7)"]
    if not (tr > 0 and 0 < te < tr and 0 < flip < 180 and tg > 0 and gl != 0):
        return None, (f"qDESS parameters out of range: TR {tr:g} ms, TE {te:g} ms, flip {flip:g} deg, GL {gl:g}, "
                      f"TG {tg:g} us (need 0 < TE < TR, 0 < flip < 180, TG > 0, GL != 0)")
    return QDessParameters(tr, te, flip, abs(gl), tg), None


#: Gyromagnetic ratio of 1H in rad / (s * G) (42.58 MHz/T = 4258 Hz/G).
_GAMMA_RAD_PER_S_G = 2.0 * math.pi * 4258.0


def qdess_t2(
    echo1: np.ndarray,
    echo2: np.ndarray,
    params: QDessParameters,
    *,
    t1_ms: float = 1200.0,
    diffusivity_mm2_s: float = 1.25e-3,
    t2_range_ms: tuple[float, float] = (0.0, 100.0),
    mask: np.ndarray | None = None,
) -> T2Fit:
    """Analytic T2 from the two qDESS echoes (S+ = ``echo1``, S- = ``echo2``).

    Source: B. Sveinsson, A.S. Chaudhari, G.E. Gold, B.A. Hargreaves, "A simple
    analytic method for estimating T2 in the knee from DESS", Magn Reson Imaging
    38:63-70 (2017).  With the ratio ``r = S- / S+``, the spoiler's dephasing
    ``dk = gamma * G * TG`` (``G = GL / TG``, so ``dk = gamma * GL``), the
    diffusion term ``b = dk**2 * D``, ``E = exp(-TR/T1 - TR * b)`` and

        ``K = sin(a/2)**2 * (1 + E) / (1 - cos(a) * E)``,

    the ratio is ``r = K * exp(-2 (TR - TE) / T2) * exp(-(TR - TG/3) * b)``, so

        ``T2 = -2 (TR - TE) / (ln(r / K) + (TR - TG/3) * b)``.

    T1 and D are assumed (cartilage at 3 T: 1200 ms, 1.25e-3 mm^2/s, as the
    paper's knee defaults); the unit conventions of GL (G/cm x us) and TG (us)
    are those of the GE tags.  T2 outside ``t2_range_ms`` (open) is masked.

    Args:
        echo1, echo2: the two echoes (same shape).
        params: from :func:`qdess_parameters_from_dicom`.
        t1_ms, diffusivity_mm2_s: assumed tissue T1 and diffusivity.
        t2_range_ms: valid T2 range (ms).
        mask: voxels to map; ``None``: every voxel with both echoes positive.
    """
    s1 = np.asarray(echo1, dtype=np.float64)
    s2 = np.asarray(echo2, dtype=np.float64)
    if s1.shape != s2.shape:
        raise InvalidFormat(f"qDESS echoes differ in shape: {list(s1.shape)} and {list(s2.shape)}")
    tr, te, tg = params.tr_ms * 1e-3, params.te_ms * 1e-3, params.tg_us * 1e-6  # seconds
    alpha = math.radians(params.flip_angle_deg)
    dk = _GAMMA_RAD_PER_S_G * params.gl_area * 1e-4  # G/cm*us -> G/m*s (x 100 x 1e-6): rad/m
    b = dk * dk * diffusivity_mm2_s * 1e-6  # D in m^2/s -> 1/s
    e = math.exp(-tr / (t1_ms * 1e-3) - tr * b)
    k = math.sin(alpha / 2.0) ** 2 * (1.0 + e) / (1.0 - math.cos(alpha) * e)
    c = (tr - tg / 3.0) * b
    region = (s1 > 0) & (s2 > 0) & np.isfinite(s1) & np.isfinite(s2)
    if mask is not None:
        mask = np.asarray(mask, bool)
        if mask.shape != s1.shape:
            raise InvalidFormat(f"T2 mask shape {list(mask.shape)} does not match the echoes' {list(s1.shape)}")
        region &= mask
    with np.errstate(divide="ignore", invalid="ignore"):
        t2 = -2000.0 * (tr - te) / (np.log(np.where(region, s2 / s1, 1.0) / k) + c)  # ms
    valid = region & np.isfinite(t2) & (t2 > t2_range_ms[0]) & (t2 < t2_range_ms[1])
    t2_map = np.where(valid, t2, np.nan).astype(np.float32)
    return T2Fit(t2_map, None, None, valid, "qdess", (float(params.te_ms),), None)


def _number(value: Any) -> float | None:
    """A finite float from a header value (number, numeric string, bytes, first of a multi-value), else None."""
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value).decode("latin-1").strip("\x00 ")
    if isinstance(value, str):
        value = value.split("\\")[0].strip()
    elif isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return _number(value[0]) if len(value) else None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None
