"""Image-based lighting for the reconstruction: a trainable cube-map environment with split-sum PBR shading.

The environment is an HDR cube map (linear RGB) in OpenGL's face order ``+x, -x, +y, -y, +z, -z`` and
orientation.  Shading follows the split-sum approximation (Karis 2013) used by nvdiffrec
(Munkberg et al., CVPR 2022):

* a **specular** mip chain, each level prefiltered with a GGX lobe under the split-sum assumption
  n = v = r, roughness going linearly from 0.08 (level 0) to 0.5 (last level, 16² by default);
* a **diffuse** irradiance cube (Lambert, 1/π folded in: a constant environment ``L`` gives ``kd·L``);
* the **environment BRDF** table :func:`bsdf_lut` (scale A and bias B applied to F0).

Roughness convention, used everywhere in this module: ``alpha = roughness**2`` is the GGX width,
``D(h) = alpha² / (π ((n·h)² (alpha² − 1) + 1)²)`` and Smith's G for IBL uses ``k = alpha / 2``.

Prefiltering is linear in the environment, so each level is one fixed sparse matrix (depending only on
the resolutions and the roughness) applied to the flattened cube; the matrices are computed once per
device and cached, which keeps :meth:`EnvironmentLight.build_mips` cheap enough to call every iteration.

Also here: a small Radiance ``.hdr`` (RGBE) reader and writer and lat-long probe conversion.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from workbench.errors import InputNotFound, InvalidFormat

MIN_ROUGHNESS = 0.08
MAX_ROUGHNESS = 0.5
MIN_MIP_RES = 16

__all__ = [
    "MAX_ROUGHNESS",
    "MIN_ROUGHNESS",
    "EnvironmentLight",
    "bsdf_lut",
    "create_trainable_env",
    "cube_dirs",
    "cube_lookup",
    "cube_lookup_mip",
    "latlong_dirs",
    "load_probe_hdr",
    "read_hdr",
    "save_probe_hdr",
    "write_hdr",
]


# --------------------------------------------------------------------------------------------------
# Cube map geometry
# --------------------------------------------------------------------------------------------------


def _face_dirs(face: int, s: Tensor, t: Tensor) -> Tensor:
    """Unnormalised direction for face coordinates ``s, t`` in [-1, 1] (OpenGL cube map table)."""
    one = torch.ones_like(s)
    if face == 0:  # +x
        return torch.stack([one, -t, -s], -1)
    if face == 1:  # -x
        return torch.stack([-one, -t, s], -1)
    if face == 2:  # +y
        return torch.stack([s, one, t], -1)
    if face == 3:  # -y
        return torch.stack([s, -one, -t], -1)
    if face == 4:  # +z
        return torch.stack([s, -t, one], -1)
    return torch.stack([-s, -t, -one], -1)  # -z


def cube_dirs(resolution: int, device: torch.device | str | None = None) -> Tensor:
    """Unit direction through the centre of every cube-map texel.

    Texel ``[f, i, j]`` (face f, row i, column j) has face coordinates ``s = 2(j+0.5)/R − 1``,
    ``t = 2(i+0.5)/R − 1`` mapped to a direction with OpenGL's cube-map table.

    Args:
        resolution: face size R.
        device: torch device of the result.

    Returns:
        Tensor [6, R, R, 3] of unit vectors.
    """
    c = (torch.arange(resolution, dtype=torch.float32, device=device) + 0.5) * (2.0 / resolution) - 1.0
    t, s = torch.meshgrid(c, c, indexing="ij")
    dirs = torch.stack([_face_dirs(f, s, t) for f in range(6)], 0)
    return F.normalize(dirs, dim=-1)


def _cube_solid_angles(resolution: int, device: torch.device | str | None = None) -> Tensor:
    """Exact solid angle of each texel, [6, R, R]; they sum to 4π."""
    e = torch.linspace(-1.0, 1.0, resolution + 1, dtype=torch.float64, device=device)

    def area(x: Tensor, y: Tensor) -> Tensor:  # solid angle of the rectangle [0,x]×[0,y] on the z=1 plane
        return torch.atan2(x * y, torch.sqrt(x * x + y * y + 1.0))

    y0, x0 = torch.meshgrid(e[:-1], e[:-1], indexing="ij")
    y1, x1 = torch.meshgrid(e[1:], e[1:], indexing="ij")
    omega = area(x1, y1) - area(x0, y1) - area(x1, y0) + area(x0, y0)
    return omega.float().expand(6, resolution, resolution).contiguous()


def _dir_to_face_st(dirs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Face index and face coordinates (s, t in [-1, 1]) of directions [..., 3] (need not be unit)."""
    x, y, z = dirs.unbind(-1)
    ax, ay, az = x.abs(), y.abs(), z.abs()
    is_x = (ax >= ay) & (ax >= az)
    is_y = ~is_x & (ay >= az)
    face = torch.where(is_x, (x < 0).long(), torch.where(is_y, 2 + (y < 0).long(), 4 + (z < 0).long()))
    ma = torch.where(is_x, ax, torch.where(is_y, ay, az)).clamp_min(1e-12)
    # sc, tc per face: +x (-z, -y), -x (z, -y), +y (x, z), -y (x, -z), +z (x, -y), -z (-x, -y)
    sc = torch.where(is_x, torch.where(x >= 0, -z, z), torch.where(is_y, x, torch.where(z >= 0, x, -x)))
    tc = torch.where(is_y, torch.where(y >= 0, z, -z), -y)
    return face, sc / ma, tc / ma


def cube_lookup(cube: Tensor, dirs: Tensor) -> Tensor:
    """Bilinear lookup in a cube map.

    Texel centres sit at ``(i + 0.5) / R`` on each face; lookups within half a texel of a face edge
    clamp to the edge texels of that face (an approximate seam, never a hole or NaN).
    Differentiable w.r.t. ``cube`` and (through the bilinear weights) ``dirs``.

    Args:
        cube: [6, R, R, C] cube map.
        dirs: [..., 3] directions (normalisation not required; zero vectors give a finite value).

    Returns:
        [..., C] interpolated values.
    """
    res, ch = cube.shape[1], cube.shape[-1]
    lead = dirs.shape[:-1]
    face, s, t = _dir_to_face_st(dirs.reshape(-1, 3))
    x = ((s + 1.0) * 0.5 * res - 0.5).clamp(0.0, res - 1.0)
    y = ((t + 1.0) * 0.5 * res - 0.5).clamp(0.0, res - 1.0)
    x0 = x.detach().floor().clamp(max=res - 2).long() if res > 1 else torch.zeros_like(face)
    y0 = y.detach().floor().clamp(max=res - 2).long() if res > 1 else torch.zeros_like(face)
    x1 = (x0 + 1).clamp(max=res - 1)
    y1 = (y0 + 1).clamp(max=res - 1)
    wx = (x - x0).unsqueeze(-1)
    wy = (y - y0).unsqueeze(-1)
    flat = cube.reshape(-1, ch)
    base = face * (res * res)

    def tap(yi: Tensor, xi: Tensor) -> Tensor:
        return flat.index_select(0, base + yi * res + xi)

    top = tap(y0, x0) * (1 - wx) + tap(y0, x1) * wx
    bottom = tap(y1, x0) * (1 - wx) + tap(y1, x1) * wx
    return (top * (1 - wy) + bottom * wy).reshape(*lead, ch)


def cube_lookup_mip(levels: list[Tensor], dirs: Tensor, level_float: Tensor) -> Tensor:
    """Trilinear lookup: bilinear in each mip level, linear between the two nearest levels.

    Args:
        levels: cube maps [6, R_k, R_k, C], finest first.
        dirs: [..., 3] directions.
        level_float: fractional level, [...] or [..., 1]; clamped to [0, len(levels) − 1].

    Returns:
        [..., C] interpolated values.
    """
    lf = level_float.reshape(dirs.shape[:-1] + (1,)).clamp(0.0, len(levels) - 1.0)
    out = None
    for k, level in enumerate(levels):
        w = (1.0 - (lf - k).abs()).clamp_min(0.0)
        term = cube_lookup(level, dirs) * w
        out = term if out is None else out + term
    return out


# --------------------------------------------------------------------------------------------------
# Lat-long conversion
# --------------------------------------------------------------------------------------------------


def latlong_dirs(height: int, width: int, device: torch.device | str | None = None) -> Tensor:
    """Unit direction through each pixel centre of a lat-long (equirectangular) map.

    Convention: row 0 is straight up (+y), the bottom row straight down; with
    ``theta = π (i+0.5)/H`` and ``phi = 2π ((j+0.5)/W − 0.5)`` the direction is
    ``(sinθ sinφ, cosθ, −sinθ cosφ)``, so the image centre looks down −z and the left edge down +z.

    Returns:
        Tensor [H, W, 3].
    """
    theta = (torch.arange(height, dtype=torch.float32, device=device) + 0.5) * (math.pi / height)
    phi = ((torch.arange(width, dtype=torch.float32, device=device) + 0.5) / width - 0.5) * (2 * math.pi)
    th, ph = torch.meshgrid(theta, phi, indexing="ij")
    return torch.stack([th.sin() * ph.sin(), th.cos(), -th.sin() * ph.cos()], -1)


def _latlong_lookup(img: Tensor, dirs: Tensor) -> Tensor:
    """Bilinear lookup of a lat-long image [H, W, C] at directions [..., 3] (wraps in longitude)."""
    h, w, ch = img.shape
    d = F.normalize(dirs.reshape(-1, 3), dim=-1)
    u = torch.atan2(d[:, 0], -d[:, 2]) / (2 * math.pi) + 0.5
    v = torch.acos(d[:, 1].clamp(-1.0, 1.0)) / math.pi
    x = u * w - 0.5
    y = (v * h - 0.5).clamp(0.0, h - 1.0)
    x0 = x.floor()
    y0 = y.floor().clamp(max=max(h - 2, 0))
    wx = (x - x0).unsqueeze(-1)
    wy = (y - y0).unsqueeze(-1)
    x0 = x0.long() % w
    x1 = (x0 + 1) % w
    y0 = y0.long()
    y1 = (y0 + 1).clamp(max=h - 1)
    flat = img.reshape(-1, ch)

    def tap(yi: Tensor, xi: Tensor) -> Tensor:
        return flat.index_select(0, yi * w + xi)

    top = tap(y0, x0) * (1 - wx) + tap(y0, x1) * wx
    bottom = tap(y1, x0) * (1 - wx) + tap(y1, x1) * wx
    return (top * (1 - wy) + bottom * wy).reshape(*dirs.shape[:-1], ch)


# --------------------------------------------------------------------------------------------------
# Prefiltering
# --------------------------------------------------------------------------------------------------


def _ggx_d(cos_h: Tensor, alpha: float) -> Tensor:
    """GGX normal distribution D(n·h) with width ``alpha`` (= roughness²)."""
    a2 = alpha * alpha
    denom = cos_h * cos_h * (a2 - 1.0) + 1.0
    return a2 / (math.pi * denom * denom)


def _ggx_cutoff_cos(alpha: float, cutoff: float) -> float:
    """cos of the widest n·l kept by a GGX prefilter holding ``cutoff`` of the lobe's energy.

    The lobe's energy in half-vector angle (measure D(h)(n·h) dω) has the closed-form CDF
    ``cos²θh = (1 − ξ) / (1 + (α² − 1) ξ)``; with l the reflection of n about h, θl = 2θh.
    """
    if cutoff >= 1.0:
        return 0.0
    a2 = alpha * alpha
    cos2_h = (1.0 - cutoff) / (1.0 + (a2 - 1.0) * cutoff)
    theta_l = 2.0 * math.acos(math.sqrt(min(max(cos2_h, 0.0), 1.0)))
    return max(math.cos(theta_l), 0.0)


_FILTER_CACHE: dict[tuple, Tensor] = {}


def _cube_tiles(res: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Group texels of a cube into square tiles for culling.

    Returns:
        texel ids [n_tiles, T²] into the flattened [6·R²] cube, unit tile centres [n_tiles, 3] and each
        tile's angular radius [n_tiles] (widest angle from its centre to one of its texel centres).
    """
    t = res // 8 if res % 8 == 0 else 1
    idx = torch.arange(6 * res * res, device=device).reshape(6, res // t, t, res // t, t)
    ids = idx.permute(0, 1, 3, 2, 4).reshape(-1, t * t)
    dirs = cube_dirs(res, device).reshape(-1, 3)[ids]  # [n_tiles, T², 3]
    centre = F.normalize(dirs.mean(1), dim=-1)
    radius = torch.acos((dirs * centre[:, None]).sum(-1).clamp(-1.0, 1.0)).amax(1)
    return ids, centre, radius


def _nearest_texel(dirs: Tensor, res: int) -> Tensor:
    """Flattened index of the texel containing each direction [N, 3] → [N]."""
    face, s, t = _dir_to_face_st(dirs)
    x = ((s + 1.0) * 0.5 * res).long().clamp(0, res - 1)
    y = ((t + 1.0) * 0.5 * res).long().clamp(0, res - 1)
    return face * res * res + y * res + x


def _filter_matrix(res_out: int, res_in: int, alpha: float | None, cutoff: float, device: torch.device) -> Tensor:
    """Row-normalised sparse matrix [6·R_out², 6·R_in²] of a spherical convolution.

    ``alpha=None`` gives the cosine (Lambert) kernel ``max(n·l, 0)``; otherwise the split-sum GGX
    kernel ``D(n·h)·(n·l)`` with ``h = normalize(n + l)`` (so ``(n·h)² = (1 + n·l)/2``), cut where
    ``n·l`` falls below :func:`_ggx_cutoff_cos`.  Input texels are weighted by their solid angle.
    Input tiles wholly outside the kernel's cone are culled before texels are tested; a row whose
    cone holds no texel centre gets the nearest texel, so no output is a hole.
    """
    key = (res_out, res_in, alpha, cutoff, str(device))
    if key in _FILTER_CACHE:
        return _FILTER_CACHE[key]
    n_out = cube_dirs(res_out, device).reshape(-1, 3)
    d_in = cube_dirs(res_in, device).reshape(-1, 3)
    omega = _cube_solid_angles(res_in, device).reshape(-1)
    cos_cut = 0.0 if alpha is None else _ggx_cutoff_cos(alpha, cutoff)
    tile_ids, tile_centre, tile_radius = _cube_tiles(res_in, device)
    cone = math.acos(cos_cut)
    reach = min(math.pi, cone + float(tile_radius.max()))
    per_row = max(1.0, (1.0 - math.cos(reach)) / 2.0 * d_in.shape[0] * 1.5)  # expected candidates per row
    chunk = max(1, int(2_000_000 / per_row))
    rows, cols, vals = [], [], []
    for start in range(0, n_out.shape[0], chunk):
        n = n_out[start : start + chunk]
        ang = torch.acos((n @ tile_centre.T).clamp(-1.0, 1.0))  # [c, n_tiles]
        r, tile = (ang <= cone + tile_radius + 1e-5).nonzero(as_tuple=True)
        ids = tile_ids[tile]  # [P, T²]
        cos = (n[r][:, None, :] * d_in[ids]).sum(-1)
        keep = cos > cos_cut
        r = r[:, None].expand_as(ids)[keep]
        c = ids[keep]
        cl = cos[keep]
        empty = torch.ones(n.shape[0], dtype=torch.bool, device=device)
        empty[r] = False
        if empty.any():
            e = empty.nonzero(as_tuple=True)[0]
            near = _nearest_texel(n[e], res_in)
            r = torch.cat([r, e])
            c = torch.cat([c, near])
            cl = torch.cat([cl, (n[e] * d_in[near]).sum(-1)])
        cl = cl.clamp_min(1e-6)
        w = cl if alpha is None else _ggx_d(torch.sqrt((1.0 + cl) * 0.5), alpha) * cl
        w = w * omega[c]
        row_sum = torch.zeros(n.shape[0], device=device).index_add_(0, r, w)
        rows.append(r + start)
        cols.append(c)
        vals.append(w / row_sum[r])
    mat = torch.sparse_coo_tensor(
        torch.stack([torch.cat(rows), torch.cat(cols)]),
        torch.cat(vals),
        (n_out.shape[0], d_in.shape[0]),
        check_invariants=False,
    ).coalesce()
    if mat._nnz() > 0.05 * mat.shape[0] * mat.shape[1]:  # wide lobes (diffuse): a dense product is far faster
        mat = mat.to_dense()
    _FILTER_CACHE[key] = mat
    return mat


def _apply_filter(mat: Tensor, cube: Tensor, res_out: int) -> Tensor:
    """Apply a filter matrix from :func:`_filter_matrix` to a cube [6, R_in, R_in, C]."""
    flat = cube.reshape(-1, cube.shape[-1])
    out = torch.sparse.mm(mat, flat) if mat.is_sparse else mat @ flat
    return out.reshape(6, res_out, res_out, cube.shape[-1])


def _input_level(sizes: list[int], alpha: float) -> int:
    """Coarsest mip whose texels (≈2/R rad) fit in the lobe's half-energy radius 2·atan(α) (≥ finest)."""
    need = 1.0 / math.atan(alpha)
    best = 0
    for k, r in enumerate(sizes):
        if r >= need:
            best = k
    return best


# --------------------------------------------------------------------------------------------------
# Environment BRDF (split-sum LUT)
# --------------------------------------------------------------------------------------------------


def _hammersley(n: int, device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """The Hammersley point set: (i/n, radical inverse base 2 of i), each [n], float64."""
    i = torch.arange(n, dtype=torch.int64, device=device)
    bits = torch.zeros(n, dtype=torch.float64, device=device)
    scale = 0.5
    for b in range(32):
        bits = bits + ((i >> b) & 1).double() * scale
        scale *= 0.5
    return (i.double() + 0.5) / n, bits


def _env_brdf(ndotv: Tensor, roughness: Tensor, samples: int) -> Tensor:
    """Split-sum environment BRDF (A, B) at matching points ``ndotv``, ``roughness`` [P] → [P, 2].

    Importance-samples GGX half vectors (Hammersley), reflects v about them, and accumulates
    ``G_vis = G·(v·h) / ((n·h)(n·v))`` times ``(1 − Fc)`` (A) and ``Fc = (1 − v·h)^5`` (B);
    Smith G for IBL with ``k = α/2``, ``α = roughness²``.  Computed in float64.
    """
    device = ndotv.device
    nv = ndotv.double().clamp(1e-4, 1.0)[:, None]
    alpha = (roughness.double() ** 2).clamp_min(1e-8)[:, None]
    u1, u2 = _hammersley(samples, device)
    phi = (2 * math.pi * u1)[None, :]
    cos_h = torch.sqrt((1.0 - u2[None, :]) / (1.0 + (alpha * alpha - 1.0) * u2[None, :]))
    sin_h = torch.sqrt((1.0 - cos_h * cos_h).clamp_min(0.0))
    hx, hz = sin_h * phi.cos(), cos_h  # the y component never enters (v lies in the xz plane)
    vx, vz = torch.sqrt(1.0 - nv * nv), nv  # v in the xz plane, n = +z
    vdoth = vx * hx + vz * hz
    nl = 2.0 * vdoth * hz - vz
    ok = (nl > 0) & (vdoth > 0)
    k = alpha / 2.0
    g = (nv / (nv * (1 - k) + k)) * (nl / (nl * (1 - k) + k))
    g_vis = torch.where(ok, g * vdoth / (hz * nv), torch.zeros_like(g))
    fc = (1.0 - vdoth.clamp(0.0, 1.0)) ** 5
    a = ((1.0 - fc) * g_vis).mean(1)
    b = (fc * g_vis).mean(1)
    return torch.stack([a, b], -1)


_LUT_CACHE: dict[tuple, Tensor] = {}
_LUT_VERSION = 1


def _cache_dir() -> Path:
    root = os.environ.get("WORKBENCH_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "workbench"


def bsdf_lut(
    resolution: int = 128,
    samples: int = 1024,
    device: torch.device | str | None = None,
    disk_cache: bool = True,
) -> Tensor:
    """The split-sum environment BRDF table: ``F0·A + B`` scales the prefiltered radiance.

    Texel ``[i, j]`` holds (A, B) for ``NdotV = (j + 0.5)/R`` (u, columns) and
    ``roughness = (i + 0.5)/R`` (v, rows), with ``alpha = roughness²`` (see :func:`_env_brdf`).
    Look it up like a texture: ``x = NdotV·R − 0.5``, ``y = roughness·R − 0.5``.

    The table is computed here (vectorised, about a second on a CPU), kept in memory per device and,
    with ``disk_cache``, stored as ``.npy`` under ``$WORKBENCH_CACHE`` (or ``~/.cache/workbench``)
    ``/recon/``; an unwritable cache is ignored.

    Returns:
        Tensor [R, R, 2] float32.
    """
    dev = torch.device(device) if device is not None else torch.device("cpu")
    key = (resolution, samples, str(dev))
    if key in _LUT_CACHE:
        return _LUT_CACHE[key]
    path = _cache_dir() / "recon" / f"bsdf_lut_v{_LUT_VERSION}_{resolution}_{samples}.npy"
    lut = None
    if disk_cache and path.is_file():
        try:
            arr = np.load(path)
            if arr.shape == (resolution, resolution, 2) and np.isfinite(arr).all():
                lut = torch.from_numpy(arr.astype(np.float32))
        except (OSError, ValueError):
            lut = None
    if lut is None:
        c = (torch.arange(resolution, dtype=torch.float64) + 0.5) / resolution
        rough, ndotv = torch.meshgrid(c, c, indexing="ij")
        rows = []
        for i in range(resolution):  # one roughness row at a time keeps memory small
            rows.append(_env_brdf(ndotv[i], rough[i], samples))
        lut = torch.stack(rows, 0).float()
        if disk_cache:
            _atomic_save_npy(path, lut.numpy())
    lut = lut.to(dev)
    _LUT_CACHE[key] = lut
    return lut


def _atomic_save_npy(path: Path, arr: np.ndarray) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                np.save(fh, arr)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError:
        pass


def _lut_lookup(lut: Tensor, ndotv: Tensor, roughness: Tensor) -> Tensor:
    """Bilinear lookup of the [R, R, 2] LUT at ``ndotv``, ``roughness`` [...] → [..., 2] (clamped)."""
    res = lut.shape[0]
    x = (ndotv * res - 0.5).clamp(0.0, res - 1.0)
    y = (roughness * res - 0.5).clamp(0.0, res - 1.0)
    x0 = x.detach().floor().clamp(max=res - 2).long()
    y0 = y.detach().floor().clamp(max=res - 2).long()
    wx = (x - x0).unsqueeze(-1)
    wy = (y - y0).unsqueeze(-1)
    flat = lut.reshape(-1, 2)

    def tap(yi: Tensor, xi: Tensor) -> Tensor:
        return flat[yi * res + xi]

    top = tap(y0, x0) * (1 - wx) + tap(y0, x0 + 1) * wx
    bottom = tap(y0 + 1, x0) * (1 - wx) + tap(y0 + 1, x0 + 1) * wx
    return top * (1 - wy) + bottom * wy


# --------------------------------------------------------------------------------------------------
# The environment light
# --------------------------------------------------------------------------------------------------


class EnvironmentLight(nn.Module):
    """A trainable HDR cube-map environment light with split-sum PBR shading.

    Attributes:
        base: ``nn.Parameter`` [6, R, R, 3], linear HDR radiance (faces +x, -x, +y, -y, +z, -z).
        specular: after :meth:`build_mips`, prefiltered levels [6, R_k, R_k, 3], finest first.
        diffuse: after :meth:`build_mips`, the irradiance cube [6, R_last, R_last, 3].

    :meth:`shade` rebuilds the mips itself when ``base`` changed in place since the last build
    (an optimiser step, :meth:`clamp_`), so calling :meth:`build_mips` explicitly once per
    iteration is optional.
    """

    def __init__(self, base: Tensor, min_res: int = MIN_MIP_RES):
        super().__init__()
        if base.ndim != 4 or base.shape[0] != 6 or base.shape[1] != base.shape[2] or base.shape[3] != 3:
            raise ValueError(f"cube map must be [6, R, R, 3], got {tuple(base.shape)}")
        self.base = nn.Parameter(base.detach().clone().float())
        self.min_res = min_res
        self.specular: list[Tensor] | None = None
        self.diffuse: Tensor | None = None
        self._built_version: int | None = None

    @property
    def resolution(self) -> int:
        return int(self.base.shape[1])

    def mip_sizes(self) -> list[int]:
        """Face sizes of the mip chain: R, R/2, ... while even and not below ``min_res``."""
        sizes = [self.resolution]
        while sizes[-1] % 2 == 0 and sizes[-1] // 2 >= self.min_res:
            sizes.append(sizes[-1] // 2)
        return sizes

    def level_roughness(self) -> list[float]:
        """Roughness each specular level is prefiltered for (linear 0.08 → 0.5; a single level gets 0.08)."""
        n = len(self.mip_sizes())
        if n == 1:
            return [MIN_ROUGHNESS]
        return [MIN_ROUGHNESS + (MAX_ROUGHNESS - MIN_ROUGHNESS) * k / (n - 1) for k in range(n)]

    def build_mips(self, cutoff: float = 0.99) -> None:
        """Build the prefiltered specular chain and the diffuse irradiance cube from ``base``.

        Level k has face size ``R / 2^k`` and is the GGX prefilter (split-sum, n = v = r) for
        ``level_roughness()[k]``, integrated over the coarsest plain mip that still resolves the lobe;
        ``cutoff`` is the fraction of the GGX lobe's energy kept (see :func:`_ggx_cutoff_cos`).
        The diffuse cube convolves the last plain mip with max(n·l, 0), normalised so a constant
        environment maps to itself.  Differentiable w.r.t. ``base``.
        """
        sizes = self.mip_sizes()
        plain = [self.base]
        for _ in sizes[1:]:
            prev = plain[-1].permute(0, 3, 1, 2)
            plain.append(F.avg_pool2d(prev, 2).permute(0, 2, 3, 1))
        device = self.base.device
        spec = []
        for k, rough in enumerate(self.level_roughness()):
            alpha = rough * rough
            src = _input_level(sizes, alpha)
            mat = _filter_matrix(sizes[k], sizes[src], alpha, cutoff, device)
            spec.append(_apply_filter(mat, plain[src], sizes[k]))
        mat = _filter_matrix(sizes[-1], sizes[-1], None, 1.0, device)
        self.specular = spec
        self.diffuse = _apply_filter(mat, plain[-1], sizes[-1])
        self._built_version = self.base._version

    def _ensure_mips(self) -> None:
        if self.specular is None or self._built_version != self.base._version:
            self.build_mips()

    def get_mip(self, roughness: Tensor) -> Tensor:
        """Fractional specular level for ``roughness`` [...]: 0 below 0.08, linear to the last level at 0.5."""
        n = len(self.mip_sizes())
        r = roughness.clamp(MIN_ROUGHNESS, MAX_ROUGHNESS)
        return (r - MIN_ROUGHNESS) / (MAX_ROUGHNESS - MIN_ROUGHNESS) * (n - 1)

    def shade(
        self,
        gb_pos: Tensor,
        gb_normal: Tensor,
        kd: Tensor,
        ks: Tensor,
        view_pos: Tensor,
        lut: Tensor | None = None,
    ) -> Tensor:
        """Split-sum PBR shading of G-buffer samples.

        ``out = (kd(1−m)·irradiance(n) + prefiltered(r, roughness)·(F0·A + B)) · (1 − occlusion)``
        with ``F0 = 0.04(1−m) + kd·m``, ``r`` the view vector reflected about ``n`` and
        ``(A, B) = bsdf_lut(NdotV, roughness)``.

        Args:
            gb_pos: [B, H, W, 3] world positions.
            gb_normal: [B, H, W, 3] world normals (normalised here).
            kd: [B, H, W, 3] base colour (linear).
            ks: [B, H, W, 3] (occlusion, roughness, metalness).
            view_pos: [B, 1, 1, 3] camera positions (broadcast).
            lut: optional precomputed :func:`bsdf_lut` table on the right device.

        Returns:
            [B, H, W, 3] linear RGB radiance.
        """
        self._ensure_mips()
        occlusion, roughness, metal = ks[..., 0:1], ks[..., 1:2], ks[..., 2:3]
        n = F.normalize(gb_normal, dim=-1, eps=1e-8)
        wo = F.normalize(view_pos - gb_pos, dim=-1, eps=1e-8)
        ndotv = (n * wo).sum(-1, keepdim=True)
        refl = 2.0 * ndotv * n - wo
        diff_col = kd * (1.0 - metal)
        spec_col = 0.04 * (1.0 - metal) + kd * metal
        diffuse = cube_lookup(self.diffuse, n) * diff_col
        if lut is None:
            lut = bsdf_lut(device=gb_pos.device)
        ab = _lut_lookup(lut, ndotv.clamp(1e-4, 1.0)[..., 0], roughness[..., 0])
        spec_env = cube_lookup_mip(self.specular, refl, self.get_mip(roughness))
        specular = spec_env * (spec_col * ab[..., 0:1] + ab[..., 1:2])
        return (diffuse + specular) * (1.0 - occlusion)

    def regularizer(self) -> Tensor:
        """White-balance prior: mean |c − mean_rgb(c)| over the base texels (scalar)."""
        white = self.base.mean(-1, keepdim=True)
        return (self.base - white).abs().mean()

    @torch.no_grad()
    def clamp_(self, min: float = 0.0, max: float | None = None) -> EnvironmentLight:
        """Clamp ``base`` in place (radiance is non-negative); the mips rebuild on the next shade."""
        self.base.clamp_(min=min, max=max)
        return self

    @classmethod
    def from_latlong(cls, img: Tensor | np.ndarray, resolution: int = 64, min_res: int = MIN_MIP_RES) -> EnvironmentLight:
        """Build a light from a lat-long image [H, W, 3] (convention of :func:`latlong_dirs`)."""
        img = torch.as_tensor(np.asarray(img, dtype=np.float32)) if isinstance(img, np.ndarray) else img.float()
        cube = _latlong_lookup(img, cube_dirs(resolution, img.device))
        return cls(cube, min_res=min_res)

    @torch.no_grad()
    def to_latlong(self, width: int = 256) -> Tensor:
        """Resample ``base`` to a lat-long image [width // 2, width, 3] (convention of :func:`latlong_dirs`)."""
        dirs = latlong_dirs(width // 2, width, self.base.device)
        return cube_lookup(self.base.detach(), dirs)


def create_trainable_env(
    resolution: int = 64,
    scale: float = 0.5,
    bias: float = 0.25,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> EnvironmentLight:
    """A random environment ``rand·scale + bias`` of face size ``resolution``, ready for training."""
    base = torch.rand(6, resolution, resolution, 3, generator=generator) * scale + bias
    return EnvironmentLight(base.to(device) if device is not None else base)


# --------------------------------------------------------------------------------------------------
# Radiance .hdr (RGBE) IO
# --------------------------------------------------------------------------------------------------


def _float_to_rgbe(img: np.ndarray) -> np.ndarray:
    """[H, W, 3] float → [H, W, 4] uint8 RGBE (negatives and non-finite values become 0)."""
    rgb = np.nan_to_num(img.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0).clip(min=0.0)
    v = rgb.max(-1)
    mant, exp = np.frexp(v)  # v = mant·2^exp, mant in [0.5, 1)
    small = v < 1e-32
    scale = np.where(small, 0.0, mant * 256.0 / np.where(small, 1.0, v))
    out = np.zeros(img.shape[:2] + (4,), np.uint8)
    out[..., :3] = np.clip(np.floor(rgb * scale[..., None]), 0, 255).astype(np.uint8)
    out[..., 3] = np.where(small, 0, np.clip(exp + 128, 0, 255)).astype(np.uint8)
    return out


def _rgbe_to_float(rgbe: np.ndarray) -> np.ndarray:
    """[H, W, 4] uint8 RGBE → [H, W, 3] float32 (bytes decoded at their bucket centre)."""
    e = rgbe[..., 3].astype(np.int32)
    scale = np.where(e == 0, 0.0, np.ldexp(1.0, e - 136))
    return ((rgbe[..., :3].astype(np.float64) + 0.5) * scale[..., None]).astype(np.float32)


def _rle_encode_channel(row: np.ndarray) -> bytes:
    """New-style Radiance RLE of one channel of a scanline: runs (128+n, byte) and dumps (n, bytes)."""
    out = bytearray()
    n = len(row)
    i = 0
    while i < n:
        run = 1
        while i + run < n and run < 127 and row[i + run] == row[i]:
            run += 1
        if run >= 4:
            out += bytes([128 + run, row[i]])
            i += run
            continue
        j = i  # literal dump until the next run of >= 4
        while j < n and j - i < 128:
            if j + 3 < n and row[j] == row[j + 1] == row[j + 2] == row[j + 3]:
                break
            j += 1
        out += bytes([j - i]) + row[i:j].tobytes()
        i = j
    return bytes(out)


def write_hdr(path: str | Path, img: Tensor | np.ndarray, rle: bool = False) -> Path:
    """Write a linear RGB image [H, W, 3] as a Radiance ``.hdr`` (RGBE, ``-Y H +X W``, row 0 on top).

    Scanlines are stored uncompressed unless ``rle`` (new-style run-length encoding).
    """
    arr = img.detach().cpu().numpy() if isinstance(img, Tensor) else np.asarray(img)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"write_hdr expects [H, W, 3], got {arr.shape}")
    h, w = arr.shape[:2]
    rgbe = _float_to_rgbe(arr)
    header = f"#?RADIANCE\nFORMAT=32-bit_rle_rgbe\n\n-Y {h} +X {w}\n".encode("ascii")
    path = Path(path)
    with open(path, "wb") as fh:
        fh.write(header)
        if not rle or not 8 <= w < 32768:
            fh.write(rgbe.tobytes())
        else:
            for row in rgbe:
                fh.write(bytes([2, 2, w >> 8, w & 255]))
                for c in range(4):
                    fh.write(_rle_encode_channel(row[:, c]))
    return path


def read_hdr(path: str | Path) -> np.ndarray:
    """Read a Radiance ``.hdr`` (uncompressed or new-style RLE scanlines) → float32 [H, W, 3], row 0 on top.

    Raises:
        InputNotFound: the file does not exist.
        InvalidFormat: not an RGBE Radiance file, an unsupported orientation or truncated data.
    """
    path = Path(path)
    if not path.is_file():
        raise InputNotFound(f"HDR file not found: {path}", "Check the path of the environment probe.")
    data = path.read_bytes()
    hint = "Give a Radiance RGBE .hdr file (header '#?RADIANCE' or '#?RGBE', resolution '-Y H +X W')."
    if not data.startswith(b"#?"):
        raise InvalidFormat(f"{path} is not a Radiance .hdr file", hint)
    pos = 0
    while True:  # header lines until an empty line
        end = data.find(b"\n", pos)
        if end < 0:
            raise InvalidFormat(f"{path}: truncated header", hint)
        line = data[pos:end].strip()
        pos = end + 1
        if not line:
            break
        if line.startswith(b"FORMAT=") and line != b"FORMAT=32-bit_rle_rgbe":
            raise InvalidFormat(f"{path}: unsupported {line.decode(errors='replace')}", hint)
    end = data.find(b"\n", pos)
    parts = data[pos:end].split()
    pos = end + 1
    if len(parts) != 4 or parts[2] != b"+X" or parts[0] not in (b"-Y", b"+Y"):
        raise InvalidFormat(f"{path}: unsupported resolution line {data[pos:end]!r}", hint)
    h, w = int(parts[1]), int(parts[3])
    buf = np.frombuffer(data, dtype=np.uint8)
    rgbe = np.empty((h, w, 4), np.uint8)
    try:
        for y in range(h):
            if 8 <= w < 32768 and buf[pos] == 2 and buf[pos + 1] == 2 and (int(buf[pos + 2]) << 8 | int(buf[pos + 3])) == w:
                pos += 4
                for c in range(4):
                    x = 0
                    while x < w:
                        count = int(buf[pos])
                        pos += 1
                        if count > 128:
                            count -= 128
                            rgbe[y, x : x + count, c] = buf[pos]
                            pos += 1
                        else:
                            if count == 0 or x + count > w:
                                raise InvalidFormat(f"{path}: corrupt run-length data in scanline {y}", hint)
                            rgbe[y, x : x + count, c] = buf[pos : pos + count]
                            pos += count
                        x += count
            else:
                if pos + 4 * w > len(buf):
                    raise IndexError
                rgbe[y] = buf[pos : pos + 4 * w].reshape(w, 4)
                pos += 4 * w
    except (IndexError, ValueError) as exc:
        raise InvalidFormat(f"{path}: truncated or corrupt pixel data", hint) from exc
    img = _rgbe_to_float(rgbe)
    return img[::-1].copy() if parts[0] == b"+Y" else img


def save_probe_hdr(light: EnvironmentLight, path: str | Path, width: int = 256) -> Path:
    """Write the light's ``base`` as a lat-long Radiance ``.hdr`` [width/2, width]."""
    return write_hdr(path, light.to_latlong(width))


def load_probe_hdr(
    path: str | Path,
    resolution: int = 64,
    device: torch.device | str | None = None,
    min_res: int = MIN_MIP_RES,
) -> EnvironmentLight:
    """Load a lat-long Radiance ``.hdr`` probe as an :class:`EnvironmentLight` of face size ``resolution``."""
    img = torch.from_numpy(read_hdr(path))
    if device is not None:
        img = img.to(device)
    return EnvironmentLight.from_latlong(img, resolution, min_res=min_res)
