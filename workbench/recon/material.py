"""Materials of the reconstruction: a volumetric field in pass 1, 2-D textures in pass 2.

Pass 1 (DMTet) evaluates the material anywhere in space with a small MLP on a
multiresolution hash encoding (Müller et al. 2022, as nvdiffrec uses through
tiny-cuda-nn), here in plain PyTorch.  It gives 9 channels: base colour ``kd``
(3), ``ks`` = (occlusion, roughness, metalness) (3) and a tangent-space normal
(3), each squashed into its configured ``[min, max]`` range.

Between the passes the field is baked into textures over an xatlas UV layout
(:func:`bake_textures`); pass 2 optimises those textures directly
(:class:`TextureMaterial`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

# Primes of the spatial hash (Teschner et al. 2003, as in instant-NGP); the first is 1 so that
# neighbouring x stay coherent in the table.
_PRIMES = (1, 2654435761, 805459861)


@dataclass(frozen=True)
class MaterialRange:
    """Value ranges of the material channels (upstream's ``kd_min``/``kd_max``, ``ks_*``, ``nrm_*``)."""

    kd_min: tuple[float, float, float] = (0.0, 0.0, 0.0)
    kd_max: tuple[float, float, float] = (1.0, 1.0, 1.0)
    ks_min: tuple[float, float, float] = (0.0, 0.08, 0.0)
    ks_max: tuple[float, float, float] = (1.0, 1.0, 1.0)
    nrm_min: tuple[float, float, float] = (-1.0, -1.0, 0.0)
    nrm_max: tuple[float, float, float] = (1.0, 1.0, 1.0)

    def tensors(self, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(min, max) as [9] tensors in channel order kd, ks, normal."""
        lo = torch.tensor(self.kd_min + self.ks_min + self.nrm_min, dtype=torch.float32, device=device)
        hi = torch.tensor(self.kd_max + self.ks_max + self.nrm_max, dtype=torch.float32, device=device)
        return lo, hi


class HashGridEncoding(nn.Module):
    """Multiresolution hash encoding of points in [0, 1]³.

    Args:
        levels: number of resolution levels.
        features: features per level.
        log2_table: log2 of the hash table size per level.
        base_resolution: grid resolution of the coarsest level.
        max_resolution: grid resolution of the finest level (levels grow geometrically in between).
    """

    def __init__(self, levels: int = 16, features: int = 2, log2_table: int = 19, base_resolution: int = 16,
                 max_resolution: int = 2048) -> None:
        super().__init__()
        growth = np.exp((np.log(max_resolution) - np.log(base_resolution)) / max(levels - 1, 1))
        self.resolutions = [int(np.floor(base_resolution * growth ** i)) for i in range(levels)]
        self.table_size = 2 ** log2_table
        self.features = features
        sizes = [min(self.table_size, (r + 1) ** 3) for r in self.resolutions]
        self.offsets = [0] + list(np.cumsum(sizes))
        # instant-NGP initialises the tables uniformly in ±1e-4
        self.table = nn.Parameter(torch.empty(self.offsets[-1], features).uniform_(-1e-4, 1e-4))
        corners = torch.tensor([[(c >> 2) & 1, (c >> 1) & 1, c & 1] for c in range(8)], dtype=torch.long)
        self.register_buffer("corners", corners, persistent=False)

    @property
    def out_features(self) -> int:
        return len(self.resolutions) * self.features

    def _index(self, cell: torch.Tensor, level: int) -> torch.Tensor:
        """Table rows of integer grid corners ``cell`` [N, 8, 3] at ``level`` (dense when the grid fits)."""
        res = self.resolutions[level] + 1
        if res ** 3 <= self.table_size:
            idx = cell[..., 0] + res * (cell[..., 1] + res * cell[..., 2])
        else:
            idx = (cell[..., 0] * _PRIMES[0]) ^ (cell[..., 1] * _PRIMES[1]) ^ (cell[..., 2] * _PRIMES[2])
            idx = idx % self.table_size
        return idx + self.offsets[level]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Encode points ``x`` [N, 3] in [0, 1]³ → [N, levels · features]."""
        x = x.clamp(0.0, 1.0)
        rows, weights = [], []
        for level, res in enumerate(self.resolutions):
            scaled = x * res
            base = torch.floor(scaled).long().clamp(max=res - 1)
            frac = scaled - base
            rows.append(self._index(base[:, None, :] + self.corners[None], level))  # [N, 8]
            weights.append(torch.where(self.corners[None].bool(), frac[:, None, :], 1.0 - frac[:, None, :]).prod(-1))
        # One gather for all levels: its backward is one scatter into the table, not one per level
        feats = self.table[torch.stack(rows, dim=1)]  # [N, L, 8, F]
        encoded = (feats * torch.stack(weights, dim=1)[..., None]).sum(2)  # [N, L, F]
        return encoded.reshape(len(x), -1)


class MaterialMLP(nn.Module):
    """Volumetric material: hash encoding → MLP → 9 channels in their ranges.

    Args:
        aabb: (min corner, max corner) of the region the field covers (the tet grid's box).
        ranges: channel ranges.
        hidden: width of the hidden layers; ``layers``: number of hidden layers.
        levels, log2_table, max_resolution: of the hash encoding.
    """

    def __init__(self, aabb: tuple[list[float], list[float]], ranges: MaterialRange = MaterialRange(),
                 hidden: int = 32, layers: int = 2, levels: int = 16, log2_table: int = 19,
                 max_resolution: int = 2048) -> None:
        super().__init__()
        self.register_buffer("aabb_min", torch.tensor(aabb[0], dtype=torch.float32), persistent=False)
        self.register_buffer("aabb_max", torch.tensor(aabb[1], dtype=torch.float32), persistent=False)
        lo, hi = ranges.tensors()
        self.register_buffer("lo", lo, persistent=False)
        self.register_buffer("hi", hi, persistent=False)
        self.encoding = HashGridEncoding(levels=levels, log2_table=log2_table, max_resolution=max_resolution)
        dims = [self.encoding.out_features] + [hidden] * layers
        mlp: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:]):
            mlp += [nn.Linear(a, b), nn.ReLU()]
        mlp.append(nn.Linear(dims[-1], 9))
        self.net = nn.Sequential(*mlp)

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        """Material of world-space ``points`` [..., 3] → [..., 9] (kd, ks, tangent-space normal)."""
        shape = points.shape[:-1]
        unit = (points.reshape(-1, 3) - self.aabb_min) / (self.aabb_max - self.aabb_min)
        raw = self.net(self.encoding(unit))
        out = torch.sigmoid(raw) * (self.hi - self.lo) + self.lo
        return out.reshape(*shape, 9)


class TextureMaterial(nn.Module):
    """Pass-2 material: kd, ks and normal textures [1, H, W, 3] optimised directly, clamped to their ranges."""

    def __init__(self, kd: torch.Tensor, ks: torch.Tensor, normal: torch.Tensor,
                 ranges: MaterialRange = MaterialRange()) -> None:
        super().__init__()
        self.kd = nn.Parameter(kd.clone())
        self.ks = nn.Parameter(ks.clone())
        self.normal = nn.Parameter(normal.clone())
        lo, hi = ranges.tensors(kd.device)
        self.register_buffer("lo", lo, persistent=False)
        self.register_buffer("hi", hi, persistent=False)

    @torch.no_grad()
    def clamp_(self) -> None:
        """Project the textures back into their ranges (after each optimiser step, as upstream)."""
        for i, tex in enumerate((self.kd, self.ks, self.normal)):
            tex.data = torch.max(torch.min(tex.data, self.hi[3 * i:3 * i + 3]), self.lo[3 * i:3 * i + 3])

    def sample(self, uv: torch.Tensor, texture_fn) -> torch.Tensor:
        """Look up all three textures at ``uv`` [B, H, W, 2] with ``texture_fn`` → [B, H, W, 9]."""
        return torch.cat([texture_fn(t, uv, filter_mode="linear", boundary_mode="clamp")
                          for t in (self.kd, self.ks, self.normal)], dim=-1)


def bake_textures(material: MaterialMLP, split_verts: torch.Tensor, uvs: torch.Tensor, uv_faces: torch.Tensor,
                  resolution: tuple[int, int], raster) -> tuple[torch.Tensor, torch.Tensor]:
    """Evaluate the volumetric material on the surface over a UV layout.

    Args:
        material: the pass-1 field.
        split_verts: [N, 3] positions of the UV-split vertices.
        uvs: [N, 2] their texture coordinates in [0, 1] (v = 0 is texture row 0).
        uv_faces: [F, 3] triangles over the split vertices.
        resolution: texture (height, width).
        raster: the rasteriser backend (:func:`workbench.recon.render.raster.backend`).

    Returns:
        (textures [1, H, W, 9] with empty texels filled from the nearest covered texel, coverage mask [H, W]).
    """
    height, width = resolution
    clip = torch.cat([uvs * 2.0 - 1.0, torch.zeros_like(uvs[:, :1]), torch.ones_like(uvs[:, :1])], dim=-1)[None]
    with torch.no_grad():
        rast = raster.rasterize(clip.contiguous(), uv_faces, (height, width))
        points = raster.interpolate(split_verts[None], rast, uv_faces)[0]
        covered = rast[0, ..., 3] > 0
        values = torch.zeros(height, width, 9, device=split_verts.device)
        chunk = 1 << 16
        flat_points = points[covered]
        filled = [material(flat_points[i:i + chunk]) for i in range(0, len(flat_points), chunk)]
        if filled:
            values[covered] = torch.cat(filled)
    values = dilate_into_empty(values, covered)
    return values[None], covered


def dilate_into_empty(values: torch.Tensor, covered: torch.Tensor) -> torch.Tensor:
    """Fill texels outside the charts with the nearest covered texel's value (avoids seams under filtering)."""
    from scipy import ndimage

    mask = covered.detach().cpu().numpy()
    if mask.all() or not mask.any():
        return values
    _, (rows, cols) = ndimage.distance_transform_edt(~mask, return_indices=True)
    rows_t = torch.from_numpy(rows).to(values.device)
    cols_t = torch.from_numpy(cols).to(values.device)
    return values[rows_t, cols_t]
