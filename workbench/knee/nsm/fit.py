"""Fitting a neural shape model to a new knee: alignment, latent optimisation, meshes, ASSD, B-score.

:func:`fit_nsm` takes the input surfaces (trimesh meshes in scanner RAS
millimetres, in the model's surface order: femur; femur and femoral
cartilage) and the knee's side:

1. **Left/right.**  A left knee is mirrored to a right knee (x -> -x in RAS,
   winding reversed), as the original pipeline did; everything below runs on
   the mirrored copy and the reconstructed meshes are mirrored back at the end.
2. **Crop.**  Models of a bone cut by the field of view (the femoral shaft)
   record a crop rule in ``config.json`` (``crop``: the shaft is cut
   ``ratio`` x the medio-lateral width above the most distal point, along
   the superior axis).  Points within ``rim_mm`` of that cut, or of the
   input's own top if that is lower, are left out of alignment, fitting and
   scoring: the cut's cap is not anatomy.
3. **Similarity alignment** to the model's mean shape (surface points decoded
   from the mean latent, stored in the model folder): centre on the
   centroid, scale to the mean shape's RMS radius, then a symmetric, trimmed
   ICP estimating rotation, translation and one scale (Umeyama's closed form
   per iteration).  Knee volumes arrive in canonical RAS orientation, so the
   rotation starts from the identity.  Model space = ``icp_transform @
   ((x - center) / scale)``.
4. **Latent optimisation.**  Signed-distance samples near the input surfaces
   (surface points plus Gaussian noise at two scales, exact distances to the
   input meshes; see :mod:`workbench.knee.nsm.sdf`) are mapped to model
   space; Adam optimises the latent alone (decoder frozen), starting from
   the mean latent, on a random subset per iteration with the clamped L1
   loss the model was trained with plus a small L2 prior on the latent.
   Early stopping: when the smoothed loss has not improved by ``tol`` for
   ``patience`` iterations the learning rate is halved (twice at most), then
   the fit stops; ``max_iterations`` and ``max_seconds`` bound it.  Every
   random draw comes from ``seed``: the same input gives the same latent.
5. **Meshes**: marching cubes of the decoded signed distances on a grid over
   model space, mapped back to scanner mm (and mirrored back for a left knee).
6. **Fit error**: ASSD (mm) per surface between reconstruction and input,
   outside the cut rim.
7. **B-score** when a B-score folder is given: ``(latent . direction -
   healthy_mean) / healthy_std`` from its ``bscore.json``; None otherwise.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import trimesh
from scipy.spatial import cKDTree

from workbench.errors import ModelUnavailable, NsmFailed
from workbench.knee.nsm.model import NsmModel
from workbench.knee.nsm.sdf import (
    MeshSdf,
    assd,
    mirror_mesh,
    sample_near_surface,
    sample_surface,
)

Progress = Callable[[float, str], None]

#: Defaults of the fit (a model's ``config.json`` ``fit`` section overrides them; arguments override both).
FIT_DEFAULTS: dict[str, Any] = {
    "lr": 0.005,
    "latent_l2": 1e-4,
    "points_per_iteration": 4000,
    "samples_per_surface": 20000,
    "sigmas_mm": [1.0, 4.0],
    "max_iterations": 2000,
    "max_seconds": 30.0,
    "patience": 40,
    "tol": 0.002,
    "grid_resolution": 128,
    "icp_iterations": 40,
    "icp_trim": 0.1,
    "alignment_points": 4000,
}
BSCORE_FILE = "bscore.json"


# --------------------------------------------------------------------------------------------------
# crop rule


def crop_level(points: np.ndarray, ratio: float, *, axis: int = 2, width_axis: int = 0,
               band_mm: float = 40.0) -> float:
    """Height (along ``axis``) at which the shaft is cut: the most distal point + ``ratio`` x the width.

    The width is the extent along ``width_axis`` (medio-lateral) of the points
    within ``band_mm`` of the most distal point (the condyles); robust
    percentiles keep stray points out.
    """
    z = points[:, axis]
    z0 = float(np.percentile(z, 0.2))
    near = points[z < z0 + band_mm, width_axis]
    width = float(np.percentile(near, 99.8) - np.percentile(near, 0.2))
    return z0 + ratio * width


def rim_level(points: np.ndarray, crop: Mapping[str, Any] | None) -> float:
    """Height above which points are left out (the cut or the input's own top, minus the rim margin)."""
    if not crop:
        return math.inf
    axis = int(crop.get("axis", 2))
    cut = crop_level(points, float(crop["ratio"]), axis=axis, width_axis=int(crop.get("width_axis", 0)),
                     band_mm=float(crop.get("band_mm", 40.0)))
    top = float(np.percentile(points[:, axis], 99.9))
    return min(cut, top) - float(crop.get("rim_mm", 4.0))


# --------------------------------------------------------------------------------------------------
# similarity alignment


def umeyama(source: np.ndarray, target: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Least-squares similarity (4x4: scale x rotation, translation) taking ``source`` onto ``target``."""
    w = np.ones(len(source)) if weights is None else np.asarray(weights, float)
    w = w / w.sum()
    mu_s = (w[:, None] * source).sum(axis=0)
    mu_t = (w[:, None] * target).sum(axis=0)
    xs, xt = source - mu_s, target - mu_t
    cov = (w[:, None] * xt).T @ xs
    u, d, vt = np.linalg.svd(cov)
    s = np.eye(3)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        s[2, 2] = -1.0
    rot = u @ s @ vt
    var_s = (w * (xs ** 2).sum(axis=1)).sum()
    scale = float(np.trace(np.diag(d) @ s) / var_s) if var_s > 0 else 1.0
    out = np.eye(4)
    out[:3, :3] = scale * rot
    out[:3, 3] = mu_t - scale * rot @ mu_s
    return out


def apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ matrix[:3, :3].T + matrix[:3, 3]


def similarity_icp(source: np.ndarray, target: np.ndarray, *, iterations: int = 40, trim: float = 0.1,
                   init: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """Symmetric trimmed ICP with one scale: the 4x4 taking ``source`` onto ``target`` and the final RMS.

    Each iteration pairs every source point with its nearest target point and
    every target point with its nearest (transformed) source point, drops the
    ``trim`` fraction of worst pairs in each direction, and solves for the
    similarity in closed form.
    """
    tree_t = cKDTree(target)
    transform = np.eye(4) if init is None else np.array(init, float)
    rms = math.inf
    for _ in range(iterations):
        moved = apply(transform, source)
        d_st, i_st = tree_t.query(moved)
        d_ts, i_ts = cKDTree(moved).query(target)
        keep_st = d_st <= np.quantile(d_st, 1.0 - trim)
        keep_ts = d_ts <= np.quantile(d_ts, 1.0 - trim)
        src = np.concatenate([source[keep_st], source[i_ts[keep_ts]]])
        dst = np.concatenate([target[i_st[keep_st]], target[keep_ts]])
        transform = umeyama(src, dst)
        new_rms = float(np.sqrt(((apply(transform, src) - dst) ** 2).sum(axis=1).mean()))
        if abs(rms - new_rms) < 1e-6 * max(new_rms, 1e-12):
            rms = new_rms
            break
        rms = new_rms
    return transform, rms


@dataclass
class Alignment:
    """Input mm -> model space: ``icp_transform @ ((x - center) / scale)``."""

    center: np.ndarray
    scale: float
    icp_transform: np.ndarray
    rms: float = float("nan")

    @property
    def units_per_mm(self) -> float:
        return float(np.cbrt(np.linalg.det(self.icp_transform[:3, :3]))) / self.scale

    def to_model(self, points: np.ndarray) -> np.ndarray:
        return apply(self.icp_transform, (np.asarray(points, float) - self.center) / self.scale)

    def to_mm(self, points: np.ndarray) -> np.ndarray:
        inv = np.linalg.inv(self.icp_transform)
        return apply(inv, np.asarray(points, float)) * self.scale + self.center


def align_points(points: np.ndarray, target: np.ndarray, *, iterations: int = 40, trim: float = 0.1) -> Alignment:
    """Similarity alignment of ``points`` (mm) onto ``target`` (model space) as in step 3 of the module notes."""
    center = points.mean(axis=0)
    rms_in = float(np.sqrt(((points - center) ** 2).sum(axis=1).mean()))
    t_center = target.mean(axis=0)
    rms_t = float(np.sqrt(((target - t_center) ** 2).sum(axis=1).mean()))
    if not (rms_in > 0 and rms_t > 0):
        raise NsmFailed("The input surface is degenerate (all points coincide); nothing to align")
    scale = rms_in / rms_t
    init = np.eye(4)
    init[:3, 3] = t_center
    transform, rms = similarity_icp((points - center) / scale, target, iterations=iterations, trim=trim, init=init)
    if not np.all(np.isfinite(transform)):
        raise NsmFailed("The similarity alignment to the model's mean shape did not converge")
    return Alignment(center, scale, transform, rms)


# --------------------------------------------------------------------------------------------------
# B-score


@dataclass(frozen=True)
class BScoreModel:
    """A B-score direction in latent space with the healthy population's mean and standard deviation."""

    direction: np.ndarray
    healthy_mean: float
    healthy_std: float
    source: str = ""

    def __call__(self, latent: np.ndarray) -> float:
        latent = np.asarray(latent, float).ravel()
        if latent.shape != self.direction.shape:
            raise ModelUnavailable(f"B-score direction {self.source} has {self.direction.size} values but the "
                                   f"shape model's latent has {latent.size}",
                                   "Use the B-score folder published with this shape model.")
        return float((latent @ self.direction - self.healthy_mean) / self.healthy_std)


def load_bscore(folder: str | Path) -> BScoreModel:
    """Read a B-score folder (``bscore.json``: ``direction``, ``healthy_mean``, ``healthy_std``) or that file."""
    path = Path(folder).expanduser()
    if path.is_dir():
        path = path / BSCORE_FILE
    if not path.is_file():
        raise ModelUnavailable(f"B-score model {path} does not exist",
                               f"A B-score folder holds {BSCORE_FILE} with direction, healthy_mean and healthy_std.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        direction = np.asarray(data["direction"], float).ravel()
        mean, std = float(data["healthy_mean"]), float(data["healthy_std"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ModelUnavailable(f"{path} is not a valid B-score file ({type(exc).__name__}: {exc})",
                               "It needs direction (list of numbers), healthy_mean and healthy_std.") from None
    if not (std > 0 and np.all(np.isfinite(direction)) and direction.size):
        raise ModelUnavailable(f"{path}: healthy_std must be > 0 and direction finite and non-empty")
    return BScoreModel(direction, mean, std, str(path))


# --------------------------------------------------------------------------------------------------
# the fit


@dataclass
class NsmFit:
    """The outcome of one fit.

    Attributes:
        model: the model's name.
        surfaces: surface names, in the model's order.
        latent: the fitted latent vector.
        meshes: reconstructed meshes in scanner mm, on the input's side (mirrored back for a left knee).
        side: ``right`` or ``left``.
        center, scale, icp_transform: the alignment (of the mirrored input for a left knee):
            model space = ``icp_transform @ ((x - center) / scale)``.
        assd_mm: ASSD (mm) per surface between reconstruction and input (outside the cut rim).
        bscore: the B-score, or None without a B-score folder.
        iterations, seconds, loss, stop_reason: how the optimisation went.
        assd_mean_shape_mm: ASSD of the aligned mean shape (the baseline), when asked for.
    """

    model: str
    surfaces: tuple[str, ...]
    latent: np.ndarray
    meshes: list[trimesh.Trimesh]
    side: str
    center: np.ndarray
    scale: float
    icp_transform: np.ndarray
    assd_mm: dict[str, float]
    bscore: float | None = None
    iterations: int = 0
    seconds: float = 0.0
    loss: float = float("nan")
    stop_reason: str = ""
    assd_mean_shape_mm: dict[str, float] | None = None
    timings: dict[str, float] = field(default_factory=dict)

    def recon_params(self) -> dict[str, Any]:
        """The ``NSM_recon_params.json`` content (the original pipeline's keys first, then details)."""

        def num(v):
            return None if v is None or not np.isfinite(v) else round(float(v), 4)

        bone = self.assd_mm.get(self.surfaces[0])
        cart = self.assd_mm.get(self.surfaces[1]) if len(self.surfaces) > 1 else None
        return {
            "latent": [float(v) for v in self.latent],
            "Bscore": None if self.bscore is None else float(self.bscore),
            "icp_transform": np.asarray(self.icp_transform, float).tolist(),
            "center": [float(v) for v in self.center],
            "scale": float(self.scale),
            "assd_bone_mm": num(bone),
            "assd_cartilage_mm": num(cart),
            "model": self.model,
            "surfaces": list(self.surfaces),
            "side": self.side,
            "mirrored": self.side == "left",
            "transform_convention": "model = icp_transform @ ((x_ras_mm - center) / scale), x mirrored "
                                    "(x -> -x) first for a left knee",
            "assd_mm": {k: num(v) for k, v in self.assd_mm.items()},
            "assd_mean_shape_mm": None if self.assd_mean_shape_mm is None
            else {k: num(v) for k, v in self.assd_mean_shape_mm.items()},
            "iterations": int(self.iterations),
            "seconds": round(float(self.seconds), 2),
            "loss": num(self.loss),
            "stop_reason": self.stop_reason,
        }

    def save(self, out_dir: str | Path, params_name: str = "NSM_recon_params.json",
             mesh_prefix: str | None = "NSM_recon") -> dict[str, Path]:
        """Write the parameters JSON and (with ``mesh_prefix``) one PLY mesh per surface; returns the paths."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = {"params": out_dir / params_name}
        paths["params"].write_text(json.dumps(self.recon_params(), indent=2) + "\n", encoding="utf-8")
        if mesh_prefix:
            for name, mesh in zip(self.surfaces, self.meshes):
                path = out_dir / f"{mesh_prefix}_{name}.ply"
                mesh.export(path)
                paths[name] = path
        return paths


def _as_list(model: NsmModel, surfaces: Sequence[trimesh.Trimesh] | Mapping[str, trimesh.Trimesh]):
    if isinstance(surfaces, Mapping):
        missing = [s for s in model.surfaces if s not in surfaces]
        if missing:
            raise NsmFailed(f"NSM {model.name} needs the surface(s) {', '.join(missing)}; got "
                            f"{', '.join(surfaces) or 'none'}")
        surfaces = [surfaces[s] for s in model.surfaces]
    surfaces = list(surfaces)
    if len(surfaces) != len(model.surfaces):
        raise NsmFailed(f"NSM {model.name} decodes {len(model.surfaces)} surface(s) "
                        f"({', '.join(model.surfaces)}) but {len(surfaces)} were given")
    for name, mesh in zip(model.surfaces, surfaces):
        if mesh is None or len(mesh.faces) == 0:
            raise NsmFailed(f"The input {name} surface is empty; the shape model cannot be fitted",
                            "Check the segmentation: the structure was not found.")
    return surfaces


def fit_nsm(model: NsmModel, surfaces: Sequence[trimesh.Trimesh] | Mapping[str, trimesh.Trimesh],
            side: str = "right", *, bscore: BScoreModel | str | Path | None = None, seed: int = 0,
            max_iterations: int | None = None, max_seconds: float | None = None,
            points_per_iteration: int | None = None, lr: float | None = None,
            grid_resolution: int | None = None, baseline: bool = False,
            progress: Progress | None = None) -> NsmFit:
    """Fit ``model`` to the input surfaces (scanner mm, model surface order) of a ``side`` knee.

    See the module notes for the steps.  Settings default to the model's
    ``config.json`` ``fit`` section, then :data:`FIT_DEFAULTS`.

    Raises:
        NsmFailed: empty or degenerate input, or a fit that decodes no surface.
        ModelUnavailable: a B-score folder that is missing or does not match the model.
    """
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    report = progress or (lambda fraction, message: None)
    if side not in ("right", "left"):
        raise NsmFailed(f"side must be 'right' or 'left', got {side!r}")
    meshes_in = _as_list(model, surfaces)
    if isinstance(bscore, (str, Path)):
        bscore = load_bscore(bscore)

    def setting(key: str, value: Any) -> Any:
        return value if value is not None else model.fit_setting(key, FIT_DEFAULTS[key])

    max_iterations = int(setting("max_iterations", max_iterations))
    max_seconds = float(setting("max_seconds", max_seconds))
    n_batch = int(setting("points_per_iteration", points_per_iteration))
    lr = float(setting("lr", lr))
    resolution = int(setting("grid_resolution", grid_resolution))
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)

    # 1. left -> right
    mirrored = side == "left"
    work = [mirror_mesh(m) if mirrored else m for m in meshes_in]

    # 2. crop rim, 3. alignment
    crop = model.config.get("crop")
    axis = int(crop.get("axis", 2)) if crop else 2
    bone_vertices = np.asarray(work[0].vertices, float)
    z_rim = rim_level(bone_vertices, crop)
    n_align = int(setting("alignment_points", None))
    bone_pts, _ = sample_surface(work[0], 2 * n_align, rng)
    bone_pts = bone_pts[bone_pts[:, axis] < z_rim][:n_align]
    if len(bone_pts) < 100:
        raise NsmFailed(f"Too little of the {model.surfaces[0]} surface lies below the shaft cut to align it")
    report(0.02, "aligning to the mean shape")
    align = align_points(bone_pts, model.mean_points, iterations=int(setting("icp_iterations", None)),
                         trim=float(setting("icp_trim", None)))
    timings["align_s"] = time.perf_counter() - t_start

    # 4. samples near the input surfaces, in model space
    t0 = time.perf_counter()
    sdfs = [MeshSdf(m) for m in work]
    n_per = int(setting("samples_per_surface", None))
    sigmas = [float(s) for s in setting("sigmas_mm", None)]
    pts_all, tgt_all = [], []
    for mesh in work:
        surf, _ = sample_surface(mesh, n_per, rng)
        pts, tgt = sample_near_surface(surf, sdfs, rng, n_near=n_per, sigmas=sigmas)
        keep = pts[:, axis] < z_rim
        pts_all.append(pts[keep])
        tgt_all.append(tgt[keep])
    pts_mm = np.concatenate(pts_all)
    targets = np.concatenate(tgt_all) * align.units_per_mm
    points = torch.as_tensor(align.to_model(pts_mm), dtype=torch.float32, device=model.device)
    targets_t = torch.as_tensor(targets, dtype=torch.float32, device=model.device)
    timings["samples_s"] = time.perf_counter() - t0

    # optimise the latent
    t0 = time.perf_counter()
    latent, iterations, loss, reason = _optimise_latent(
        model, points, targets_t, gen, lr=lr, n_batch=n_batch, max_iterations=max_iterations,
        max_seconds=max_seconds, l2=float(setting("latent_l2", None)), patience=int(setting("patience", None)),
        tol=float(setting("tol", None)), report=report)
    timings["optimise_s"] = time.perf_counter() - t0

    # 5. meshes, 6. ASSD
    t0 = time.perf_counter()
    report(0.85, "extracting meshes")
    recon = _decode_to_mm(model, latent, align, resolution)
    if len(recon[0].faces) == 0:
        raise NsmFailed(f"The fitted latent of {model.name} decodes to an empty {model.surfaces[0]} surface")
    timings["mesh_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()

    def keep(p):
        return p[:, axis] < z_rim

    errors = {name: assd(r, m, keep=keep, seed=seed) for name, r, m in zip(model.surfaces, recon, work)}
    baseline_errors = None
    if baseline:
        mean_recon = _decode_to_mm(model, model.mean_latent, align, resolution)
        baseline_errors = {name: assd(r, m, keep=keep, seed=seed)
                           for name, r, m in zip(model.surfaces, mean_recon, work)}
    timings["assd_s"] = time.perf_counter() - t0
    if mirrored:
        recon = [mirror_mesh(m) for m in recon]
    latent_np = latent.detach().cpu().numpy().astype(float)
    score = bscore(latent_np) if bscore is not None else None
    report(1.0, "fitted")
    return NsmFit(model.name, model.surfaces, latent_np, recon, side, align.center, align.scale,
                  align.icp_transform, errors, score, iterations, time.perf_counter() - t_start, loss, reason,
                  baseline_errors, timings)


def _optimise_latent(model: NsmModel, points: torch.Tensor, targets: torch.Tensor, gen: torch.Generator, *,
                     lr: float, n_batch: int, max_iterations: int, max_seconds: float, l2: float, patience: int,
                     tol: float, report: Progress) -> tuple[torch.Tensor, int, float, str]:
    clamp = model.clamp
    latent = model.mean_latent.detach().clone().requires_grad_(True)
    optimiser = torch.optim.Adam([latent], lr=lr)
    targets = targets.clamp(-clamp, clamp)
    n = points.shape[0]
    ema = best = math.inf
    wait = drops = 0
    reason = "max_iterations"
    t0 = time.perf_counter()
    it = 0
    for it in range(1, max_iterations + 1):
        idx = torch.randint(0, n, (min(n_batch, n),), generator=gen).to(points.device)
        pred = model.sdf(latent, points[idx]).clamp(-clamp, clamp)
        data = (pred - targets[idx]).abs().mean()
        loss = data + l2 * (latent ** 2).sum()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        value = data.item()
        ema = value if not math.isfinite(ema) else 0.9 * ema + 0.1 * value
        if ema < best * (1.0 - tol):
            best, wait = ema, 0
        else:
            wait += 1
        if wait >= patience and it >= 2 * patience:
            if drops < 2:
                drops += 1
                wait = 0
                for group in optimiser.param_groups:
                    group["lr"] *= 0.5
            else:
                reason = "converged"
                break
        if time.perf_counter() - t0 > max_seconds:
            reason = "max_seconds"
            break
        if it % 25 == 0:
            report(0.1 + 0.75 * min(it / max_iterations, 1.0), f"latent optimisation, iteration {it}, loss {ema:.4f}")
    if not torch.isfinite(latent).all():
        raise NsmFailed(f"The latent optimisation of {model.name} diverged (non-finite latent)")
    return latent.detach(), it, ema, reason


def _decode_to_mm(model: NsmModel, latent: torch.Tensor, align: Alignment, resolution: int) -> list[trimesh.Trimesh]:
    out = []
    for mesh in model.meshes(latent, resolution=resolution):
        if len(mesh.faces):
            mesh = trimesh.Trimesh(align.to_mm(np.asarray(mesh.vertices)), np.asarray(mesh.faces), process=False)
            if mesh.volume < 0:  # a reflection in the alignment would flip the winding
                mesh.invert()
        out.append(mesh)
    return out
