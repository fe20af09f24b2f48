"""Training neural shape models: shapes from label maps, shape augmentation, auto-decoder training, model folders.

Data (:class:`SourceShape`, :func:`source_from_labels`)
    A source is one knee label map: a signed-distance grid per network
    channel (:class:`~workbench.knee.nsm.sdf.GridSdf`, voxel EDT with
    sub-voxel refinement) and a mesh per surface, in RAS mm, always as a
    right knee (a left map is mirrored: x -> -x).  Channels follow the
    model's composition: ``independent`` (femur; femoral cartilage) or
    ``nested``/``offset`` (femur; femur plus cartilage: the targets are the
    unions' signed distances, see :mod:`workbench.knee.nsm.model`).

Augmentation (:class:`Deformation`)
    Many shapes from few label maps: each augmented shape is the source
    under a random smooth map ``p = M (q + w(q) - c) + c + t``: ``M`` a small
    rotation with per-axis scaling, ``w`` a sum of Gaussian bumps (a smooth
    displacement of a few mm).  Its signed distance at ``p`` is taken as the
    source's at ``q = map^-1(p)`` (a fixed-point inversion, the warp being
    small and smooth) times the mean scale: exact on the surface and within a
    few per cent near it, which the clamped loss tolerates.  No label map is
    resampled, so an augmented shape costs milliseconds.  Shapes from the
    synthetic knee generator (:mod:`workbench.data.synthetic_knee`) can be
    added as further sources.

Frame (:class:`ModelFrame`)
    The model's space is that of a reference shape (the first source, cropped
    by the crop rule of :mod:`workbench.knee.nsm.fit`), centred and scaled to
    ``target_radius``; every training shape is brought into it by the same
    similarity alignment a fit uses, so the latent space describes shape,
    not pose or size, and training and fitting see shapes alike.

Training (:func:`train_decoder`)
    DeepSDF's auto-decoder: one latent per shape (``nn.Embedding``, N(0,
    0.01^2) at start) optimised jointly with the decoder by Adam; loss =
    L1 between predicted and true signed distances, both clamped to
    ``+-clamp`` (model units), plus ``latent_l2`` x the mean squared latent
    norm; cosine learning-rate decay over the epoch or time budget.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import trimesh

from workbench.knee.nsm.fit import Alignment, align_points, crop_level, rim_level
from workbench.knee.nsm.model import (
    NsmArchitecture,
    NsmModel,
    SdfDecoder,
    mean_shape_points,
    save_nsm,
)
from workbench.knee.nsm.sdf import GridSdf, MeshSdf, mesh_from_mask, sample_surface

Log = Callable[[str], None]

#: Label values (workbench table) of each surface.
SURFACE_LABELS: dict[str, tuple[int, ...]] = {
    "femur": (7,),
    "femoral_cartilage": (2, 11, 12, 13, 14, 15),
}
#: The crop rule of femur models (see :func:`workbench.knee.nsm.fit.crop_level`).
FEMUR_CROP: dict[str, Any] = {"axis": 2, "width_axis": 0, "ratio": 0.7, "band_mm": 40.0, "rim_mm": 4.0}


def channel_labels(surfaces: Sequence[str], composition: str) -> list[tuple[int, ...]]:
    """Label values inside each network channel: one surface each, or nested unions."""
    labels = [SURFACE_LABELS[s] for s in surfaces]
    if composition in ("nested", "offset"):
        out, acc = [], ()
        for values in labels:
            acc = acc + values
            out.append(acc)
        return out
    return labels


# --------------------------------------------------------------------------------------------------
# sources


@dataclass
class SourceShape:
    """One shape as training material: a signed-distance function per channel and a mesh per surface.

    ``grids`` are callables on (N, 3) points in mm (:class:`GridSdf` from a
    label map, or :class:`MeshSdf` from meshes); everything in RAS mm of a
    right knee.
    """

    name: str
    grids: list[Callable[[np.ndarray], np.ndarray]]
    meshes: list[trimesh.Trimesh]


def source_from_labels(labels: np.ndarray, affine: np.ndarray, surfaces: Sequence[str], *, composition: str,
                       name: str, side: str = "right", smooth_mm: float = 0.75,
                       margin_mm: float = 12.0) -> SourceShape:
    """Signed-distance grids (per channel) and meshes (per surface) of a label map; left maps are mirrored."""
    affine = np.asarray(affine, float)
    if side == "left":
        affine = np.diag([-1.0, 1.0, 1.0, 1.0]) @ affine
    labels = np.asarray(labels)
    grids = [GridSdf.from_mask(np.isin(labels, values), affine, margin_mm=margin_mm, smooth_mm=smooth_mm)
             for values in channel_labels(surfaces, composition)]
    meshes = [mesh_from_mask(np.isin(labels, SURFACE_LABELS[s]), affine, sigma_mm=smooth_mm) for s in surfaces]
    for s, mesh in zip(surfaces, meshes):
        if len(mesh.faces) == 0:
            raise ValueError(f"{name}: no {s} in the label map")
    return SourceShape(name, grids, meshes)


def source_from_meshes(meshes: Sequence[trimesh.Trimesh], *, composition: str = "independent",
                       name: str = "mesh") -> SourceShape:
    """A source from closed meshes (one per surface); nested channels use ``min`` of the surfaces' distances
    (exact outside the union, an approximation inside it)."""
    sdfs = [MeshSdf(m) for m in meshes]
    if composition in ("nested", "offset"):
        channels: list[Callable[[np.ndarray], np.ndarray]] = []
        for k in range(len(sdfs)):
            channels.append(lambda p, k=k: np.min(np.stack([f(p) for f in sdfs[:k + 1]]), axis=0))
    else:
        channels = list(sdfs)
    return SourceShape(name, channels, list(meshes))


# --------------------------------------------------------------------------------------------------
# augmentation


@dataclass(frozen=True)
class Augmentation:
    """Ranges of the random shape augmentation.

    Attributes:
        rotation_deg: rotation up to +- this per axis.
        axis_scale: per-axis scale in [1 - s, 1 + s].
        warp_mm: largest displacement of the smooth warp (drawn in [0.5, 1] x this per shape).
        warp_length_mm: length scale (Gaussian sigma) of the warp's bumps.
        n_bumps: bumps per warp.
        thickness_scale: nested channels (femur + cartilage) only: the offset between consecutive
            channels, i.e. the cartilage thickness, is scaled by a smooth random factor in
            ``[1 - s, 1 + s]`` (0: cartilage keeps the source's thickness).  Warps alone keep
            each subject's thickness pattern, which new knees do not share.
    """

    rotation_deg: float = 4.0
    axis_scale: float = 0.08
    warp_mm: float = 2.5
    warp_length_mm: float = 20.0
    n_bumps: int = 16
    thickness_scale: float = 0.0


@dataclass
class Deformation:
    """``p = matrix @ (q + warp(q) - center) + center + shift`` with a Gaussian-bump warp."""

    matrix: np.ndarray = field(default_factory=lambda: np.eye(3))
    center: np.ndarray = field(default_factory=lambda: np.zeros(3))
    shift: np.ndarray = field(default_factory=lambda: np.zeros(3))
    bump_centers: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))
    bump_vectors: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))
    length: float = 1.0

    @property
    def mean_scale(self) -> float:
        return float(np.cbrt(abs(np.linalg.det(self.matrix))))

    def warp(self, q: np.ndarray) -> np.ndarray:
        if len(self.bump_centers) == 0:
            return np.zeros_like(q)
        d2 = ((q[:, None, :] - self.bump_centers[None]) ** 2).sum(axis=2)
        return np.exp(-0.5 * d2 / self.length ** 2) @ self.bump_vectors

    def forward(self, q: np.ndarray) -> np.ndarray:
        q = np.asarray(q, float)
        return (q + self.warp(q) - self.center) @ self.matrix.T + self.center + self.shift

    def inverse(self, p: np.ndarray, iterations: int = 10) -> np.ndarray:
        r = (np.asarray(p, float) - self.center - self.shift) @ np.linalg.inv(self.matrix).T + self.center
        q = r.copy()
        for _ in range(iterations):
            q = r - self.warp(q)
        return q

    def apply_mesh(self, mesh: trimesh.Trimesh) -> trimesh.Trimesh:
        return trimesh.Trimesh(self.forward(np.asarray(mesh.vertices)), np.asarray(mesh.faces), process=False)


def random_deformation(rng: np.random.Generator, aug: Augmentation, surface_points: np.ndarray) -> Deformation:
    """A random :class:`Deformation` around the shape given by ``surface_points`` (mm)."""
    angles = np.deg2rad(rng.uniform(-aug.rotation_deg, aug.rotation_deg, 3))
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    matrix = rz @ ry @ rx @ np.diag(1.0 + rng.uniform(-aug.axis_scale, aug.axis_scale, 3))
    center = surface_points.mean(axis=0)
    k = max(int(aug.n_bumps), 0)
    centers = surface_points[rng.integers(0, len(surface_points), k)] + rng.normal(0, aug.warp_length_mm / 2, (k, 3))
    vectors = rng.normal(size=(k, 3))
    deformation = Deformation(matrix, center, np.zeros(3), centers, vectors, aug.warp_length_mm)
    if k and aug.warp_mm > 0:
        probe = surface_points[rng.integers(0, len(surface_points), min(len(surface_points), 3000))]
        peak = float(np.linalg.norm(deformation.warp(probe), axis=1).max())
        deformation.bump_vectors = vectors * (aug.warp_mm * rng.uniform(0.5, 1.0) / max(peak, 1e-9))
    else:
        deformation.bump_vectors = np.zeros((k, 3))
    return deformation


def random_thickness_factor(rng: np.random.Generator, scale: float, surface_points: np.ndarray, *,
                            length_mm: float = 25.0, n_bumps: int = 8) -> Callable[[np.ndarray], np.ndarray]:
    """A smooth random field ``f(q)`` in ``(1 - scale, 1 + scale)`` over the source's space (mm).

    ``1 + scale * tanh(g + l(q))``: a global level ``g`` and ``l``, the Gaussian-weighted average of
    random values at ``n_bumps`` points of ``surface_points`` (an average, so it never saturates
    where bumps overlap).
    """
    centres = surface_points[rng.integers(0, len(surface_points), n_bumps)]
    values = rng.normal(0.0, 1.0, n_bumps)
    level = rng.normal(0.0, 0.5)

    def factor(q: np.ndarray) -> np.ndarray:
        weights = np.exp(-((q[:, None, :] - centres[None]) ** 2).sum(axis=2) / (2 * length_mm ** 2))
        local = weights @ values / (weights.sum(axis=1) + 1e-12)
        return 1.0 + scale * np.tanh(level + local)

    return factor


# --------------------------------------------------------------------------------------------------
# frame and training shapes


@dataclass
class TrainingShape:
    """Samples of one training shape in model space: points (N, 3) and per-channel targets (N, C), float32."""

    name: str
    points: np.ndarray
    sdf: np.ndarray
    alignment: Alignment | None = None


@dataclass
class ModelFrame:
    """The model space: reference surface points (model units) and the crop in model units."""

    points: np.ndarray
    crop: dict[str, Any] | None
    model_cut: float | None = None
    model_rim: float | None = None


def reference_frame(source: SourceShape, crop: Mapping[str, Any] | None, *, target_radius: float = 0.8,
                    n_points: int = 4000, seed: int = 0) -> ModelFrame:
    """Model space from the first surface of ``source``: centred on its (cropped) centroid, max radius ``target_radius``."""
    rng = np.random.default_rng(seed)
    pts, _ = sample_surface(source.meshes[0], 3 * n_points, rng)
    axis = int(crop.get("axis", 2)) if crop else 2
    z_rim = rim_level(pts, crop)
    sel = pts[pts[:, axis] < z_rim][:n_points]
    center = sel.mean(axis=0)
    scale = float(np.linalg.norm(sel - center, axis=1).max()) / target_radius
    model_cut = model_rim = None
    if crop:
        cut = crop_level(pts, float(crop["ratio"]), axis=axis, width_axis=int(crop.get("width_axis", 0)),
                         band_mm=float(crop.get("band_mm", 40.0)))
        model_cut = (cut - center[axis]) / scale
        model_rim = (z_rim - center[axis]) / scale
    return ModelFrame((sel - center) / scale, dict(crop) if crop else None, model_cut, model_rim)


def make_training_shape(source: SourceShape, deformation: Deformation, frame: ModelFrame, *,
                        rng: np.random.Generator, n_points: int = 24000, uniform_fraction: float = 0.12,
                        surface_weights: Sequence[float] | None = None, sigmas_mm: Sequence[float] = (1.0, 4.0),
                        thickness_factor: Callable[[np.ndarray], np.ndarray] | None = None,
                        name: str = "") -> TrainingShape:
    """Sample one (augmented) shape: near-surface and uniform points with channel targets, in model space.

    ``thickness_factor`` (nested channels): scales each channel's offset from the one before it
    (``u_k = u_{k-1} - f(q) (u_{k-1} - u_k)``, ``q`` in source mm), which moves the outer surface.
    """
    crop = frame.crop
    axis = int(crop.get("axis", 2)) if crop else 2
    jac = deformation.mean_scale
    # the shape's bone surface after deformation: crop and alignment
    bone_src, _ = sample_surface(source.meshes[0], 12000, rng)
    bone = deformation.forward(bone_src)
    if crop:
        cut = crop_level(bone, float(crop["ratio"]), axis=axis, width_axis=int(crop.get("width_axis", 0)),
                         band_mm=float(crop.get("band_mm", 40.0)))
        z_rim = rim_level(bone, crop)
    else:
        cut = z_rim = math.inf
    align = align_points(bone[bone[:, axis] < z_rim][:4000], frame.points)

    n_uniform = round(n_points * uniform_fraction)
    n_near = n_points - n_uniform
    weights = np.asarray(surface_weights if surface_weights is not None else [1.0] * len(source.meshes), float)
    counts = np.floor(n_near * weights / weights.sum()).astype(int)
    counts[0] += n_near - counts.sum()
    near_parts = []
    for mesh, count in zip(source.meshes, counts):
        # oversample, then drop points far above the cut (shaft that the model does not hold)
        surf, _ = sample_surface(mesh, int(count * 1.6) + 10, rng)
        sig = np.repeat(np.asarray(sigmas_mm, float), math.ceil(len(surf) / len(sigmas_mm)))[: len(surf)]
        q = surf + rng.normal(size=surf.shape) * (sig / jac)[:, None]
        p = deformation.forward(q)
        keep = p[:, axis] < cut + 10.0
        near_parts.append((q[keep][:count], p[keep][:count]))
    below = bone[bone[:, axis] < cut]
    centre = below.mean(axis=0)
    radius = 1.15 * float(np.linalg.norm(below - centre, axis=1).max())
    direction = rng.normal(size=(n_uniform, 3))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    p_uni = centre + direction * (radius * rng.random(n_uniform) ** (1.0 / 3.0))[:, None]
    q_all = np.concatenate([q for q, _ in near_parts] + [deformation.inverse(p_uni)])
    p_all = np.concatenate([p for _, p in near_parts] + [p_uni])
    targets = np.stack([grid(q_all) * jac for grid in source.grids], axis=1)
    if thickness_factor is not None and targets.shape[1] > 1:
        f = thickness_factor(q_all)
        for k in range(1, targets.shape[1]):
            targets[:, k] = targets[:, k - 1] - f * (targets[:, k - 1] - targets[:, k])
    if crop:
        targets = np.maximum(targets, (p_all[:, axis] - cut)[:, None])
    points = align.to_model(p_all)
    return TrainingShape(name, points.astype(np.float32), (targets * align.units_per_mm).astype(np.float32), align)


def build_training_set(sources: Sequence[SourceShape], n_shapes: int, frame: ModelFrame, aug: Augmentation, *,
                       seed: int = 0, n_points: int = 24000, surface_weights: Sequence[float] | None = None,
                       nested: bool = False, log: Log | None = None) -> list[TrainingShape]:
    """``n_shapes`` shapes: each source as it is, then random augmentations of the sources in turn.

    ``nested``: the sources' channels are nested unions (``nested``/``offset`` compositions), so
    ``aug.thickness_scale`` applies.
    """
    rng = np.random.default_rng(seed)
    shapes = []
    t0 = time.perf_counter()
    for i in range(n_shapes):
        source = sources[i % len(sources)]
        thickness = None
        if i < len(sources):
            deformation = Deformation()
        else:
            pts, _ = sample_surface(source.meshes[0], 4000, rng)
            deformation = random_deformation(rng, aug, pts)
            if nested and aug.thickness_scale > 0 and len(source.grids) > 1:
                thickness = random_thickness_factor(rng, aug.thickness_scale, pts)
        shapes.append(make_training_shape(source, deformation, frame, rng=rng, n_points=n_points,
                                          surface_weights=surface_weights, thickness_factor=thickness,
                                          name=f"{source.name}#{i}"))
        if log and (i + 1) % 20 == 0:
            log(f"  {i + 1}/{n_shapes} training shapes ({time.perf_counter() - t0:.0f} s)")
    return shapes


# --------------------------------------------------------------------------------------------------
# training


@dataclass
class TrainResult:
    decoder: SdfDecoder
    latents: np.ndarray
    history: list[dict[str, float]]
    seconds: float
    epochs: int
    steps: int


def train_decoder(shapes: Sequence[TrainingShape], arch: NsmArchitecture, *, epochs: int = 200,
                  max_seconds: float | None = None, shapes_per_batch: int = 8, points_per_shape: int = 2048,
                  lr: float = 1e-3, latent_lr: float = 1e-3, clamp: float = 0.1, latent_l2: float = 1e-4,
                  latent_init_std: float = 0.01, composition: str = "independent", seed: int = 0,
                  device: str = "cpu", log: Log | None = None) -> TrainResult:
    """Auto-decoder training (see the module notes); stops after ``epochs`` or ``max_seconds``.

    The shapes' targets are per channel (``independent``) or the nested unions'
    signed distances (``nested``, ``offset``).  For ``offset`` the targets of
    channels ``k > 0`` become the offsets ``clamp(u_{k-1}) - clamp(u_k) >= 0``;
    where an offset is zero only a positive prediction is penalised (any
    negative pre-activation is an exact zero after the ReLU), elsewhere the
    L1 distance to the offset.
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    n_min = min(len(s.points) for s in shapes)
    pts = torch.as_tensor(np.stack([s.points[:n_min] for s in shapes]), device=device)
    tgt = torch.as_tensor(np.stack([s.sdf[:n_min] for s in shapes]), device=device).clamp(-clamp, clamp)
    if tgt.shape[2] != arch.n_outputs:
        raise ValueError(f"shapes have {tgt.shape[2]} channels, the architecture {arch.n_outputs}")
    offset = composition == "offset" and arch.n_outputs > 1
    if offset:
        unions = tgt
        tgt = unions.clone()
        tgt[..., 1:] = (unions[..., :-1] - unions[..., 1:]).clamp(min=0.0)
    n_shapes = len(shapes)
    decoder = SdfDecoder(arch).to(device)
    if offset:
        _zero_offsets(decoder)
    latents = torch.nn.Embedding(n_shapes, arch.latent_dim).to(device)
    torch.nn.init.normal_(latents.weight, 0.0, latent_init_std)
    optimiser = torch.optim.Adam([{"params": decoder.parameters(), "lr": lr},
                                  {"params": latents.parameters(), "lr": latent_lr}])
    base = [lr, latent_lr]
    batch = min(shapes_per_batch, n_shapes)
    history: list[dict[str, float]] = []
    t0 = time.perf_counter()
    steps = 0
    epoch = 0
    for epoch in range(1, epochs + 1):
        order = torch.randperm(n_shapes, generator=gen)
        total, count = 0.0, 0
        for start in range(0, n_shapes, batch):
            frac = max((epoch - 1) / epochs, (time.perf_counter() - t0) / max_seconds if max_seconds else 0.0)
            factor = 0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * min(frac, 1.0)))
            for group, lr0 in zip(optimiser.param_groups, base):
                group["lr"] = lr0 * factor
            ids = order[start:start + batch].to(device)
            idx = torch.randint(0, n_min, (len(ids), points_per_shape), generator=gen).to(device)
            p = pts[ids[:, None], idx].reshape(-1, 3)
            t = tgt[ids[:, None], idx].reshape(-1, tgt.shape[2])
            z = latents(ids)
            raw = decoder(z.repeat_interleave(points_per_shape, dim=0), p)
            if offset:
                err0 = (raw[:, :1].clamp(-clamp, clamp) - t[:, :1]).abs()
                r, o = raw[:, 1:], t[:, 1:]
                err = torch.where(o > 1e-4, (r - o).abs(), torch.relu(r))
                data = torch.cat([err0, err], dim=1).mean()
            else:
                data = (raw.clamp(-clamp, clamp) - t).abs().mean()
            loss = data + latent_l2 * (z ** 2).sum(dim=1).mean()
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            total += data.item() * len(ids)
            count += len(ids)
            steps += 1
        elapsed = time.perf_counter() - t0
        history.append({"epoch": epoch, "loss": total / count, "seconds": elapsed})
        if log and (epoch == 1 or epoch % 10 == 0):
            log(f"  epoch {epoch}: clamped L1 {total / count:.5f} ({elapsed:.0f} s)")
        if max_seconds is not None and elapsed > max_seconds:
            break
    decoder.eval()
    return TrainResult(decoder, latents.weight.detach().cpu().numpy(), history, time.perf_counter() - t0,
                       epoch, steps)


def _zero_offsets(decoder: SdfDecoder, bias: float = -0.02) -> None:
    """Start the offset channels at "no offset anywhere": tiny weights, a negative bias (then ReLU gives 0)."""
    last = decoder.layers[-1]
    with torch.no_grad():
        if hasattr(last, "parametrizations"):
            last.parametrizations.weight.original0[1:] *= 1e-3  # the norm g of weight = g v / |v|
        else:
            last.weight[1:] *= 1e-3
        last.bias[1:] = bias


def model_from_training(result: TrainResult, config: dict[str, Any], frame: ModelFrame,
                        device: str = "cpu") -> NsmModel:
    """An in-memory :class:`NsmModel` from a training result: mean latent and mean-shape points."""
    mean_latent = torch.as_tensor(result.latents.mean(axis=0), dtype=torch.float32, device=device)
    for p in result.decoder.parameters():
        p.requires_grad_(False)
    model = NsmModel(result.decoder.to(device).eval(), config, mean_latent, np.zeros((0, 3)), None, device,
                     result.latents)
    max_height = frame.model_rim if frame.model_rim is not None else None
    model.mean_points = mean_shape_points(model, mean_latent, max_height=max_height)
    return model


def nsm_config(name: str, surfaces: Sequence[str], composition: str, frame: ModelFrame, *, clamp: float,
               fit: Mapping[str, Any] | None = None, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The ``config.json`` content (the architecture is added by :func:`~workbench.knee.nsm.model.save_nsm`)."""
    crop = None
    if frame.crop:
        crop = {**frame.crop, "model_cut": frame.model_cut, "model_rim": frame.model_rim}
    return {
        "name": name,
        "surfaces": list(surfaces),
        "composition": composition,
        "units": "model space: RAS millimetres of a right knee, similarity-aligned to the reference and scaled",
        "sdf": {"clamp": clamp, "sign": "negative inside"},
        "crop": crop,
        "fit": dict(fit or {}),
        **dict(extra or {}),
    }


def save_trained(folder: str | Path, model: NsmModel) -> Path:
    """Write ``config.json``, ``weights.pt`` and ``mean_shape.npz`` of a trained in-memory model."""
    return save_nsm(folder, model.decoder, {k: v for k, v in model.config.items() if k != "architecture"},
                    mean_latent=model.mean_latent.cpu().numpy(), mean_points=model.mean_points,
                    training_latents=model.training_latents)
