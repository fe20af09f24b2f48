"""Reconstruction quality: surface distances to a ground-truth mesh and image metrics of novel views.

Geometry (:func:`chamfer_fscore`) compares points sampled uniformly on both
surfaces: Chamfer-L1 (mean Euclidean nearest-neighbour distance, averaged over
both directions), precision / recall / F-score at distance thresholds given as
fractions of the ground truth's bounding-box diagonal, and normal consistency.

Images (:func:`image_metrics`) are compared after compositing both the
prediction and the ground truth over the same background and encoding to sRGB
clamped to [0, 1]: PSNR and SSIM (Gaussian window, sigma 1.5, 11 taps, as Wang
et al. 2004 and ``skimage.metrics.structural_similarity``).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from scipy.spatial import cKDTree

from workbench.io.multiview import linear_to_srgb


def _numpy(x, dtype=np.float64) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


# --------------------------------------------------------------------------- geometry


def sample_surface(verts, faces, n: int, seed: int = 0):
    """Area-weighted uniform samples on a triangle mesh.

    Args:
        verts: [V, 3] float (numpy or torch).
        faces: [F, 3] int.
        n: number of points.
        seed: random seed (same seed, same points).

    Returns:
        (points [n, 3], normals [n, 3]) unit face normals of the sampled triangles; torch
        tensors on ``verts``' device when ``verts`` is a tensor, else float64 numpy arrays.
    """
    v, f = _numpy(verts), _numpy(faces, np.int64)
    rng = np.random.default_rng(seed)
    tri = v[f]
    cross = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    area = 0.5 * np.linalg.norm(cross, axis=1)
    if len(f) == 0 or area.sum() <= 0:
        points, normals = np.zeros((0, 3)), np.zeros((0, 3))
    else:
        idx = rng.choice(len(f), size=n, p=area / area.sum())
        r1, r2 = rng.random(n), rng.random(n)
        s = np.sqrt(r1)
        w0, w1, w2 = 1.0 - s, s * (1.0 - r2), s * r2
        t = tri[idx]
        points = w0[:, None] * t[:, 0] + w1[:, None] * t[:, 1] + w2[:, None] * t[:, 2]
        normals = cross[idx] / np.maximum(2.0 * area[idx], 1e-20)[:, None]
    if isinstance(verts, torch.Tensor):
        return (
            torch.as_tensor(points, dtype=verts.dtype, device=verts.device),
            torch.as_tensor(normals, dtype=verts.dtype, device=verts.device),
        )
    return points, normals


def chamfer_fscore(
    pred_verts,
    pred_faces,
    gt_verts,
    gt_faces,
    n_points: int = 100_000,
    thresholds: Sequence[float] = (0.005, 0.01),
    seed: int = 0,
) -> dict[str, float]:
    """Surface distances between a predicted and a ground-truth mesh.

    Args:
        pred_verts, pred_faces: predicted mesh, [V, 3] and [F, 3] (numpy or torch).
        gt_verts, gt_faces: ground-truth mesh, in the same coordinates.
        n_points: points sampled on each surface.
        thresholds: F-score distance thresholds as fractions of the GT bounding-box diagonal.
        seed: sampling seed.

    Returns:
        A dict of floats:
        ``chamfer_l1`` (mean of both directions' mean distances, in mesh units),
        ``chamfer_l1_rel`` (the same divided by the GT diagonal),
        ``accuracy`` (mean pred->GT distance), ``completeness`` (mean GT->pred distance),
        for each threshold ``t``: ``precision_{100t}``, ``recall_{100t}``, ``fscore_{100t}``
        (keys ``fscore_0.5`` and ``fscore_1`` for the defaults),
        ``normal_consistency`` (mean |cos| between nearest-neighbour normals, both directions),
        ``diagonal`` (GT bounding-box diagonal) and ``n_points``.
        An empty prediction gives infinite distances and zero scores.

    Both surfaces are sampled independently (seeds ``seed`` and ``seed + 1``), so
    identical meshes score a small floor of about ``0.5 * sqrt(area / n_points)``
    rather than 0 (0.003 for a unit-diameter sphere at 100k points; F@0.5 % ~ 1).
    """
    gv = _numpy(gt_verts)
    diagonal = float(np.linalg.norm(gv.max(axis=0) - gv.min(axis=0)))
    pred_pts, pred_nrm = sample_surface(_numpy(pred_verts), _numpy(pred_faces, np.int64), n_points, seed)
    gt_pts, gt_nrm = sample_surface(gv, _numpy(gt_faces, np.int64), n_points, seed + 1)
    keys = [f"{100 * t:g}" for t in thresholds]
    if len(pred_pts) == 0 or len(gt_pts) == 0:
        out = {"chamfer_l1": math.inf, "chamfer_l1_rel": math.inf, "accuracy": math.inf, "completeness": math.inf}
        for k in keys:
            out.update({f"precision_{k}": 0.0, f"recall_{k}": 0.0, f"fscore_{k}": 0.0})
        out.update({"normal_consistency": 0.0, "diagonal": diagonal, "n_points": n_points})
        return out

    d_pred, i_pred = cKDTree(gt_pts).query(pred_pts, workers=-1)  # pred -> GT
    d_gt, i_gt = cKDTree(pred_pts).query(gt_pts, workers=-1)  # GT -> pred
    accuracy, completeness = float(d_pred.mean()), float(d_gt.mean())
    chamfer = 0.5 * (accuracy + completeness)
    out = {
        "chamfer_l1": chamfer,
        "chamfer_l1_rel": chamfer / diagonal if diagonal > 0 else math.inf,
        "accuracy": accuracy,
        "completeness": completeness,
    }
    for t, k in zip(thresholds, keys):
        tau = t * diagonal
        precision = float((d_pred < tau).mean())
        recall = float((d_gt < tau).mean())
        fscore = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
        out.update({f"precision_{k}": precision, f"recall_{k}": recall, f"fscore_{k}": fscore})
    nc_pred = np.abs(np.einsum("nc,nc->n", pred_nrm, gt_nrm[i_pred])).mean()
    nc_gt = np.abs(np.einsum("nc,nc->n", gt_nrm, pred_nrm[i_gt])).mean()
    out.update({"normal_consistency": float(0.5 * (nc_pred + nc_gt)), "diagonal": diagonal, "n_points": n_points})
    return out


def normal_consistency(pred_verts, pred_faces, gt_verts, gt_faces, n_points: int = 100_000, seed: int = 0) -> float:
    """Mean |cos| between the normals of nearest surface samples, averaged over both directions (1 = perfect)."""
    return chamfer_fscore(pred_verts, pred_faces, gt_verts, gt_faces, n_points, (0.01,), seed)["normal_consistency"]


# --------------------------------------------------------------------------- images


def _tensor(x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().double()
    return torch.as_tensor(np.asarray(x), dtype=torch.float64)


def psnr(pred, gt, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB of [H, W, C] images (numpy or torch); inf for identical images."""
    mse = float(torch.mean((_tensor(pred) - _tensor(gt).to(_tensor(pred).device)) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(data_range**2 / mse)


def _gaussian_window(sigma: float = 1.5, radius: int = 5) -> torch.Tensor:
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    w = torch.exp(-0.5 * (x / sigma) ** 2)
    return w / w.sum()


def ssim(pred, gt, data_range: float = 1.0, sigma: float = 1.5) -> float:
    """Structural similarity of [H, W, C] (or [H, W]) images, mean over pixels and channels.

    Gaussian-weighted local statistics (sigma 1.5, 11-tap window, population
    covariances), K1 = 0.01, K2 = 0.03, averaged over the pixels whose window lies
    inside the image; equal to ``skimage.metrics.structural_similarity(...,
    gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1,
    channel_axis=-1)``.  Images smaller than 11 pixels fall back to a smaller window.
    """
    x, y = _tensor(pred), _tensor(gt)
    y = y.to(x.device)
    if x.ndim == 2:
        x, y = x[..., None], y[..., None]
    h, w = x.shape[:2]
    radius = min(int(3.5 * sigma + 0.5), (min(h, w) - 1) // 2)
    win = _gaussian_window(sigma, radius).to(x.device)
    k = win.numel()

    def blur(img: torch.Tensor) -> torch.Tensor:  # [C, 1, H, W] -> valid-only separable filter
        img = torch.nn.functional.conv2d(img, win.view(1, 1, k, 1))
        return torch.nn.functional.conv2d(img, win.view(1, 1, 1, k))

    a = x.permute(2, 0, 1).unsqueeze(1)
    b = y.permute(2, 0, 1).unsqueeze(1)
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return float(s.mean())


def composite(rgba, background=(1.0, 1.0, 1.0)):
    """``rgb * alpha + background * (1 - alpha)`` for [..., 4] images (numpy or torch) -> [..., 3]."""
    if isinstance(rgba, torch.Tensor):
        bg = torch.as_tensor(background, dtype=rgba.dtype, device=rgba.device)
        alpha = rgba[..., 3:4]
        return rgba[..., :3] * alpha + bg * (1.0 - alpha)
    rgba = np.asarray(rgba, dtype=np.float32)
    alpha = rgba[..., 3:4]
    return rgba[..., :3] * alpha + np.asarray(background, dtype=np.float32) * (1.0 - alpha)


def image_metrics(pred_rgba_list, gt_rgba_list, background=(1.0, 1.0, 1.0)) -> dict:
    """PSNR and SSIM of predicted against ground-truth views.

    Args:
        pred_rgba_list: N images [H, W, 4] (a list, or a [N, H, W, 4] array/tensor), linear RGB + alpha.
        gt_rgba_list: the matching ground-truth images, same layout.
        background: linear RGB both are composited over before sRGB encoding and clamping.

    Returns:
        ``{"psnr": mean, "ssim": mean, "psnr_per_view": [...], "ssim_per_view": [...], "n_views": N}``.
    """
    if len(pred_rgba_list) != len(gt_rgba_list):
        raise ValueError(f"{len(pred_rgba_list)} predicted views but {len(gt_rgba_list)} ground-truth views")
    psnrs, ssims = [], []
    for pred, gt in zip(pred_rgba_list, gt_rgba_list):
        p = linear_to_srgb(composite(_tensor(pred), background))
        g = linear_to_srgb(composite(_tensor(gt).to(p.device), background))
        psnrs.append(psnr(p, g))
        ssims.append(ssim(p, g))
    return {
        "psnr": float(np.mean(psnrs)) if psnrs else math.nan,
        "ssim": float(np.mean(ssims)) if ssims else math.nan,
        "psnr_per_view": psnrs,
        "ssim_per_view": ssims,
        "n_views": len(psnrs),
    }
