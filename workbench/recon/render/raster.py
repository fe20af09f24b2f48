"""Differentiable triangle rasteriser in pure PyTorch, split like nvdiffrast.

The four stages and what each differentiates:

* :func:`rasterize` finds, for every pixel centre, the nearest triangle (a
  discrete search under ``no_grad``), then recomputes that triangle's
  perspective-correct barycentrics from ``pos_clip`` so that gradients flow to
  the vertex positions *inside* triangles.
* :func:`interpolate` blends vertex attributes with those barycentrics.
* :func:`texture` samples a texture bilinearly (optionally from a mip pyramid).
* :func:`antialias` blends the colours of pixel pairs that straddle a
  silhouette edge by the fraction of the pair's segment that the edge covers;
  this is what gives gradients w.r.t. the *silhouette* (visibility).

Conventions (see the module map of ``workbench.recon``): images are
``[B, H, W, C]`` with row 0 at the top, the pixel centre of column ``i`` and
row ``j`` is at NDC ``(2(i+0.5)/W - 1, 2(j+0.5)/H - 1)``.  In this module
"screen coordinates" are pixel units where the centre of pixel ``(i, j)`` is
exactly ``(i, j)``.

Clipping: triangles with any vertex at ``w <= 0`` (at or behind the camera
plane) are culled rather than clipped, and pixels whose depth ``z/w`` falls
outside ``[-1, 1]`` are rejected (the near and far planes).  Both windings are
rasterised (no back-face culling), like nvdiffrast.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F

_W_EPS = 1e-8  # vertices with w below this are treated as behind the camera
_PAIR_BUDGET = 1 << 20  # candidate (triangle, pixel) pairs per chunk of the search
_INT64_MAX = torch.iinfo(torch.int64).max


# --------------------------------------------------------------------------- helpers


def _batched(pos_clip: torch.Tensor) -> torch.Tensor:
    return pos_clip[None] if pos_clip.dim() == 2 else pos_clip


def _to_screen(pos: torch.Tensor, height: int, width: int):
    """Clip coordinates [..., 4] -> screen x, y (pixel centres at integers), NDC depth z/w and w."""
    w = pos[..., 3]
    safe_w = torch.where(w.abs() > _W_EPS, w, torch.full_like(w, _W_EPS))
    sx = (pos[..., 0] / safe_w + 1.0) * (0.5 * width) - 0.5
    sy = (pos[..., 1] / safe_w + 1.0) * (0.5 * height) - 0.5
    return sx, sy, pos[..., 2] / safe_w, w


def _sortable_float(x: torch.Tensor) -> torch.Tensor:
    """Map float32 values to int64 keys with the same ordering (for integer scatter_reduce)."""
    bits = x.float().contiguous().view(torch.int32)
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).long()


def _expand_ranges(counts: torch.Tensor):
    """For ``counts = [2, 0, 3]`` return owner ``[0, 0, 2, 2, 2]`` and local index ``[0, 1, 0, 1, 2]``."""
    owner = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts)
    starts = torch.cumsum(counts, 0) - counts
    local = torch.arange(owner.numel(), device=counts.device) - starts[owner]
    return owner, local


def _chunks(counts: torch.Tensor, budget: int):
    """Split items into consecutive ranges whose summed ``counts`` stay near ``budget``."""
    total = torch.cumsum(counts, 0)
    n = counts.numel()
    start = 0
    while start < n:
        done = int(total[start - 1]) if start > 0 else 0
        stop = int(torch.searchsorted(total, done + budget, right=True))
        stop = max(stop, start + 1)
        yield start, min(stop, n)
        start = stop


# --------------------------------------------------------------------------- rasterize


@torch.no_grad()
def _visible_triangles(pos_clip: torch.Tensor, tris: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Index of the nearest triangle covering each pixel centre, ``[B, H, W]`` int64, -1 for background.

    Enumerates (triangle, pixel) pairs inside each triangle's screen bounding box,
    keeps pairs whose pixel centre is inside the triangle (edge functions, a
    centre exactly on an edge counts as inside so shared edges leave no holes)
    and keeps, per pixel, the smallest ``(depth, triangle index)`` key.
    """
    batch, n_faces = pos_clip.shape[0], tris.shape[0]
    sx, sy, sz, w = _to_screen(pos_clip, height, width)
    # per-triangle screen vertices [B*F, 3]
    tx, ty, tz = (a[:, tris].reshape(-1, 3) for a in (sx, sy, sz))
    ok = (w[:, tris].reshape(-1, 3) > _W_EPS).all(1)
    area = (tx[:, 1] - tx[:, 0]) * (ty[:, 2] - ty[:, 0]) - (tx[:, 2] - tx[:, 0]) * (ty[:, 1] - ty[:, 0])
    ok &= area != 0
    # clamp before ceil/floor so huge coordinates (w close to 0) cannot overflow the integer cast
    x0 = tx.min(1).values.clamp(-1, width).ceil().long().clamp(min=0)
    x1 = tx.max(1).values.clamp(-1, width).floor().long().clamp(max=width - 1)
    y0 = ty.min(1).values.clamp(-1, height).ceil().long().clamp(min=0)
    y1 = ty.max(1).values.clamp(-1, height).floor().long().clamp(max=height - 1)
    box_w = (x1 - x0 + 1).clamp(min=0)
    counts = torch.where(ok, box_w * (y1 - y0 + 1).clamp(min=0), torch.zeros_like(box_w))

    keys = torch.full((batch * height * width,), _INT64_MAX, dtype=torch.int64, device=pos_clip.device)
    live = counts.nonzero().squeeze(1)  # triangles with at least one candidate pixel
    counts_live = counts[live]
    # pack per-triangle data so each pair needs two gathers: floats (x, y, z of 3 vertices, area), ints (box);
    # stored row-wise ([10, T]) so every gathered quantity is a contiguous row
    tri_float = torch.cat([tx, ty, tz, area[:, None]], 1)[live].T.contiguous()
    tri_int = torch.stack([x0[live], y0[live], box_w[live], live % n_faces, live // n_faces], 0)
    for start, stop in _chunks(counts_live, _PAIR_BUDGET):
        owner, local = _expand_ranges(counts_live[start:stop])
        owner += start
        ti, tf = tri_int.index_select(1, owner), tri_float.index_select(1, owner)
        px = ti[0] + local % ti[2]
        py = ti[1] + local // ti[2]
        vx = tf[0:3] - px.to(tf.dtype)  # vertices relative to the pixel centre
        vy = tf[3:6] - py.to(tf.dtype)
        # e_k: twice the signed area of the sub-triangle opposite vertex k (its barycentric times area)
        e0 = vx[1] * vy[2] - vx[2] * vy[1]
        e1 = vx[2] * vy[0] - vx[0] * vy[2]
        e2 = vx[0] * vy[1] - vx[1] * vy[0]
        sign = torch.sign(tf[9])
        z = (e0 * tf[6] + e1 * tf[7] + e2 * tf[8]) / tf[9]
        inside = (e0 * sign >= 0) & (e1 * sign >= 0) & (e2 * sign >= 0) & (z >= -1) & (z <= 1)
        keep = inside.nonzero().squeeze(1)
        ti, px, py, z = ti.index_select(1, keep), px.index_select(0, keep), py.index_select(0, keep), z[keep]
        pixel = (ti[4] * height + py) * width + px
        key = (_sortable_float(z) << 32) | ti[3]  # nearest first, then lowest triangle index
        keys.scatter_reduce_(0, pixel, key, reduce="amin")
    face = torch.where(keys == _INT64_MAX, torch.full_like(keys, -1), keys & 0xFFFFFFFF)
    return face.view(batch, height, width)


def _clip_barycentrics(verts: torch.Tensor, ndc_x: torch.Tensor, ndc_y: torch.Tensor):
    """Perspective-correct barycentrics of NDC points ``[N]`` in triangles with clip vertices ``[4, 3, N]``.

    (Component-major layout: ``verts[c, k]`` is component ``c`` of corner ``k``, so all
    arithmetic runs on contiguous ``[N]`` rows.)  Homogeneous 2D rasterisation: with
    ``r_k = (x_k, y_k, w_k)`` and ``p = (ndc_x, ndc_y, 1)`` the clip-space weights are
    ``b_0 ∝ p·(r_1×r_2)``, ``b_1 ∝ p·(r_2×r_0)``, ``b_2 ∝ p·(r_0×r_1)``.
    Returns ``(u, v, depth z/w)``, differentiable w.r.t. ``verts``.
    """
    x, y, z, w = verts

    def weight(i: int, j: int) -> torch.Tensor:  # p · (r_i × r_j)
        return (ndc_x * (y[i] * w[j] - w[i] * y[j]) + ndc_y * (w[i] * x[j] - x[i] * w[j])
                + (x[i] * y[j] - y[i] * x[j]))

    b0, b1, b2 = weight(1, 2), weight(2, 0), weight(0, 1)
    total = b0 + b1 + b2
    total = torch.where(total.abs() > 1e-20, total, torch.full_like(total, 1e-20))
    u, v = b0 / total, b1 / total
    t = 1 - u - v
    depth_z = u * z[0] + v * z[1] + t * z[2]
    depth_w = u * w[0] + v * w[1] + t * w[2]
    return u, v, depth_z / torch.where(depth_w.abs() > _W_EPS, depth_w, torch.full_like(depth_w, _W_EPS))


def rasterize(pos_clip: torch.Tensor, tris: torch.Tensor, resolution: tuple[int, int]) -> torch.Tensor:
    """Rasterise triangles into a buffer of barycentrics, depth and triangle ids.

    Args:
        pos_clip: clip-space vertex positions ``[B, V, 4]`` (``[V, 4]`` is taken as ``B = 1``).
        tris: triangle vertex indices ``[F, 3]`` (int64).
        resolution: ``(H, W)``.

    Returns:
        ``[B, H, W, 4]``: ``(u, v)`` perspective-correct barycentrics (the point is
        ``u*v0 + v*v1 + (1-u-v)*v2``, differentiable w.r.t. ``pos_clip``), ``z/w``
        (NDC depth, nearest wins) and ``triangle index + 1`` as float (0 = background,
        no gradient).  Background pixels are all zero.
    """
    pos_clip = _batched(pos_clip)
    height, width = int(resolution[0]), int(resolution[1])
    tris = tris.to(device=pos_clip.device, dtype=torch.long)
    batch = pos_clip.shape[0]
    face = _visible_triangles(pos_clip.detach(), tris, height, width)

    flat = face.reshape(-1)
    idx = (flat >= 0).nonzero().squeeze(1)
    f = flat[idx]
    b = idx // (height * width)
    pix = idx % (height * width)
    ndc_x = (2 * (pix % width) + 1).to(pos_clip.dtype) / width - 1
    ndc_y = (2 * (pix // width) + 1).to(pos_clip.dtype) / height - 1
    n_verts = pos_clip.shape[1]
    corner_index = (b * n_verts + tris.index_select(0, f).T).reshape(-1)  # corner-major [3 * N]
    # index_select (not fancy indexing): its backward is a fast index_add
    verts = pos_clip.reshape(-1, 4).T.index_select(1, corner_index).view(4, 3, -1)
    u, v, z = _clip_barycentrics(verts, ndc_x, ndc_y)
    values = torch.stack([u, v, z, (f + 1).to(pos_clip.dtype)])  # [4, N]
    out = pos_clip.new_zeros(4, batch * height * width).index_copy(1, idx, values)
    return out.T.reshape(batch, height, width, 4)


# --------------------------------------------------------------------------- interpolate


def interpolate(attr: torch.Tensor, rast: torch.Tensor, tris: torch.Tensor) -> torch.Tensor:
    """Interpolate per-vertex attributes at every covered pixel.

    Args:
        attr: vertex attributes ``[B or 1, V, C]`` (``[V, C]`` is taken as batch 1).
        rast: output of :func:`rasterize`, ``[B, H, W, 4]``.
        tris: ``[F, 3]`` int64.

    Returns:
        ``[B, H, W, C]``, zero on background; gradients flow to ``attr`` and
        through ``rast``'s ``u, v`` channels.
    """
    attr = _batched(attr)
    batch, height, width, _ = rast.shape
    tris = tris.to(device=rast.device, dtype=torch.long)
    face = rast[..., 3].detach().reshape(-1).round().long() - 1
    idx = (face >= 0).nonzero().squeeze(1)
    b = idx // (height * width) if attr.shape[0] > 1 else torch.zeros_like(idx)
    channels = attr.shape[-1]
    # channel-first, corner-major gathers keep the arithmetic on contiguous [N] rows
    corner_index = (b * attr.shape[1] + tris.index_select(0, face[idx]).T).reshape(-1)
    corners = attr.reshape(-1, channels).T.index_select(1, corner_index).view(channels, 3, -1)
    uv = rast.reshape(-1, 4).index_select(0, idx)
    u, v = uv[:, 0], uv[:, 1]
    values = u * corners[:, 0] + v * corners[:, 1] + (1 - u - v) * corners[:, 2]  # [C, N]
    dtype = torch.promote_types(attr.dtype, rast.dtype)
    out = attr.new_zeros(channels, batch * height * width, dtype=dtype).index_copy(1, idx, values.to(dtype))
    return out.T.reshape(batch, height, width, channels)


# --------------------------------------------------------------------------- texture


def _bilinear(flat_tex: torch.Tensor, offset, tex_h, tex_w, uv: torch.Tensor, boundary_mode: str) -> torch.Tensor:
    """Bilinear lookup in textures stored channel-first and flat as ``[C, texels]``; returns ``[..., C]``.

    ``offset``, ``tex_h`` and ``tex_w`` (ints or tensors broadcastable to ``uv[..., 0]``)
    give each lookup's texture: its first texel in ``flat_tex`` and its size.  Channels
    first keeps the blending arithmetic on contiguous per-pixel rows (much faster on CPU
    than broadcasting weights over a short trailing channel axis).
    """
    x = uv[..., 0] * tex_w - 0.5
    y = uv[..., 1] * tex_h - 0.5
    x0, y0 = x.detach().floor(), y.detach().floor()
    fx, fy = (x - x0).reshape(-1), (y - y0).reshape(-1)
    x0, y0 = x0.long(), y0.long()
    x1, y1 = x0 + 1, y0 + 1
    if boundary_mode == "wrap":
        x0, x1, y0, y1 = x0 % tex_w, x1 % tex_w, y0 % tex_h, y1 % tex_h
    elif boundary_mode == "clamp":
        x0, x1 = (torch.where(a >= tex_w, tex_w - 1, a.clamp(min=0)) for a in (x0, x1))
        y0, y1 = (torch.where(a >= tex_h, tex_h - 1, a.clamp(min=0)) for a in (y0, y1))
    else:
        raise ValueError(f"boundary_mode must be 'wrap' or 'clamp', got {boundary_mode!r}")

    def fetch(yy, xx):
        index = (offset + yy * tex_w + xx).reshape(-1)
        return flat_tex.index_select(1, index)  # [C, N]

    top = fetch(y0, x0) * (1 - fx) + fetch(y0, x1) * fx
    bottom = fetch(y1, x0) * (1 - fx) + fetch(y1, x1) * fx
    out = top * (1 - fy) + bottom * fy
    return out.T.reshape(*uv.shape[:-1], flat_tex.shape[0])


def _uv_pixel_derivatives(uv: torch.Tensor) -> torch.Tensor:
    """Screen-space derivatives of ``uv`` ``[B, H, W, 2]`` by finite differences -> ``[B, H, W, 4]``.

    Layout ``(du/dx, du/dy, dv/dx, dv/dy)`` (nvdiffrast's ``uv_da``).  Of the
    forward and backward difference the smaller one is taken, so that a pixel
    next to a silhouette or a uv seam uses its smooth side.
    """

    def one_sided(dim: int) -> torch.Tensor:
        n = uv.shape[dim]
        if n < 2:
            return torch.zeros_like(uv)
        diff = uv.narrow(dim, 1, n - 1) - uv.narrow(dim, 0, n - 1)
        forward = torch.cat([diff, diff.narrow(dim, n - 2, 1)], dim)
        backward = torch.cat([diff.narrow(dim, 0, 1), diff], dim)
        use_forward = forward.norm(dim=-1, keepdim=True) <= backward.norm(dim=-1, keepdim=True)
        return torch.where(use_forward, forward, backward)

    d_dx, d_dy = one_sided(2), one_sided(1)
    return torch.stack([d_dx[..., 0], d_dy[..., 0], d_dx[..., 1], d_dy[..., 1]], -1)


def texture(
    tex: torch.Tensor,
    uv: torch.Tensor,
    filter_mode: str = "linear",
    boundary_mode: str = "wrap",
) -> torch.Tensor:
    """Sample a texture at per-pixel uv coordinates.

    Texel ``(row j, col i)`` has its centre at ``uv = ((i+0.5)/Wt, (j+0.5)/Ht)``, i.e.
    ``x = u*Wt - 0.5``, ``y = v*Ht - 0.5`` (``v = 0`` is row 0).

    ``"linear-mipmap-linear"`` builds a pyramid by 2×2 average pooling, picks the
    level ``log2`` of the larger screen-space footprint (uv finite differences
    between neighbouring pixels, in texels) and blends the two nearest levels
    (trilinear).  The level choice itself carries no gradient.

    Args:
        tex: ``[B or 1, Ht, Wt, C]``.
        uv: ``[B, H, W, 2]``.
        filter_mode: ``"linear"`` or ``"linear-mipmap-linear"``.
        boundary_mode: ``"wrap"`` or ``"clamp"``.

    Returns:
        ``[B, H, W, C]``, differentiable w.r.t. ``tex`` and ``uv``.
    """
    tex = tex.to(uv.device)
    tex_b, tex_h, tex_w, channels = tex.shape
    batch = uv.shape[0]
    per_batch = (torch.arange(batch, device=uv.device) if tex_b > 1 else torch.zeros(batch, dtype=torch.long,
                                                                                       device=uv.device))
    per_batch = per_batch.view(batch, 1, 1)
    if filter_mode == "linear":
        flat = tex.permute(3, 0, 1, 2).reshape(channels, -1)
        return _bilinear(flat, per_batch * tex_h * tex_w, tex_h, tex_w, uv, boundary_mode)
    if filter_mode != "linear-mipmap-linear":
        raise ValueError(f"filter_mode must be 'linear' or 'linear-mipmap-linear', got {filter_mode!r}")

    levels = [tex.permute(0, 3, 1, 2)]
    while levels[-1].shape[-1] > 1 or levels[-1].shape[-2] > 1:
        level = levels[-1]
        # an odd size repeats its last row / column; a size of 1 is not halved
        level = F.pad(level, (0, level.shape[-1] % 2, 0, level.shape[-2] % 2), mode="replicate")
        levels.append(F.avg_pool2d(level, (min(2, level.shape[-2]), min(2, level.shape[-1]))))
    sizes = torch.tensor([lv.shape[-2:] for lv in levels], device=uv.device)  # [L, 2] (h, w)
    counts = tex_b * sizes[:, 0] * sizes[:, 1]
    starts = torch.cumsum(counts, 0) - counts
    flat = torch.cat([lv.transpose(0, 1).reshape(channels, -1) for lv in levels], 1)

    with torch.no_grad():
        da = _uv_pixel_derivatives(uv.detach())
        footprint = torch.maximum(torch.hypot(da[..., 0] * tex_w, da[..., 2] * tex_h),
                                  torch.hypot(da[..., 1] * tex_w, da[..., 3] * tex_h))
        lod = torch.log2(footprint.clamp(min=1e-12)).clamp(0, len(levels) - 1)
        lod = torch.nan_to_num(lod, nan=0.0)
        lo = lod.floor().long()
        hi = (lo + 1).clamp(max=len(levels) - 1)
        frac = (lod - lo)[..., None].to(uv.dtype)

    def sample(level: torch.Tensor) -> torch.Tensor:
        h, w = sizes[level, 0], sizes[level, 1]
        return _bilinear(flat, starts[level] + per_batch * h * w, h, w, uv, boundary_mode)

    return sample(lo) * (1 - frac) + sample(hi) * frac


# --------------------------------------------------------------------------- antialias


@torch.no_grad()
def _edge_topology(tris: torch.Tensor):
    """Unique edges of a triangle mesh with their opposite vertices.

    Returns ``(p, q, r, s)``: edge endpoints ``p < q``, the vertex opposite the
    edge in its first face ``r`` and in its second face ``s`` (``-1`` on boundary
    edges).  Edges shared by more than two faces (non-manifold; rare in the
    meshes used here) are left out.
    """
    n = int(tris.max()) + 1 if tris.numel() else 1
    a = tris[:, [0, 1, 2]].reshape(-1)
    b = tris[:, [1, 2, 0]].reshape(-1)
    opposite = tris[:, [2, 0, 1]].reshape(-1)
    key = torch.minimum(a, b) * n + torch.maximum(a, b)
    key_sorted, order = key.sort()
    keys, counts = torch.unique_consecutive(key_sorted, return_counts=True)
    first = torch.cumsum(counts, 0) - counts
    manifold = counts <= 2
    keys_m, first_m, counts_m = keys[manifold], first[manifold], counts[manifold]
    r = opposite[order[first_m]]
    second = order[(first_m + 1).clamp(max=key.numel() - 1)]
    s = torch.where(counts_m == 2, opposite[second], torch.full_like(r, -1))
    return keys_m // n, keys_m % n, r, s


@torch.no_grad()
def _silhouette_crossings(rast: torch.Tensor, pos_clip: torch.Tensor, tris: torch.Tensor):
    """Find pixel pairs split by a visible silhouette edge.

    A silhouette edge is a boundary edge, or an edge whose two faces lie on the
    same side of it on screen (one faces the camera, the other away).  Each edge
    is walked like a line rasteriser: a mostly-vertical edge crosses, in every
    pixel row it spans, the segment between two horizontally adjacent pixel
    centres; a mostly-horizontal edge does the same with vertical pairs.  Using
    one axis per edge makes the crossings of one edge sum to its length, which
    is what makes the blend's gradient equal the area derivative.

    A crossing is kept when the inside pixel ``A`` (the side of the edge's
    faces) is covered and the outside pixel ``B`` is background or farther than
    the edge, whatever triangle covers ``A``: near a contour ``A`` is often
    covered by a triangle several rings away from the edge (the surface is
    foreshortened there), so requiring ``A``'s own triangle to own the edge
    loses most of the silhouette.  An edge hidden behind a surface fails the
    test at ``B`` (the occluder is nearer than the edge) and, when an occluder's
    own outline crosses the same pair, the outermost crossing of a pair is the
    one kept.

    Returns a dict of 1-D tensors per crossing: ``b`` (batch), ``p``, ``q``
    (edge endpoints), ``pix_a``, ``pix_b`` (flat pixel indices into
    ``[B*H*W]``), ``line`` (the row, or column, of the pair), ``base`` (the
    pixel coordinate of the pair's lower pixel along the crossing axis),
    ``a_is_low`` (A is the left / top pixel) and ``horizontal``.
    """
    batch, height, width, _ = rast.shape
    device = rast.device
    p, q, r, s = _edge_topology(tris)
    sx, sy, sz, w = _to_screen(pos_clip, height, width)
    if p.numel() == 0:
        return None

    def side(x0, y0, x1, y1, x, y):
        return torch.sign((x1 - x0) * (y - y0) - (y1 - y0) * (x - x0))

    px, py, qx, qy = sx[:, p], sy[:, p], sx[:, q], sy[:, q]  # [B, E]
    side_r = side(px, py, qx, qy, sx[:, r], sy[:, r])
    boundary = (s < 0).expand_as(side_r)
    s_safe = s.clamp(min=0)
    side_s = side(px, py, qx, qy, sx[:, s_safe], sy[:, s_safe])
    ok = (w[:, p] > _W_EPS) & (w[:, q] > _W_EPS) & (w[:, r] > _W_EPS) & (side_r != 0)
    ok &= boundary | ((w[:, s_safe] > _W_EPS) & (side_r * side_s > 0))
    b_idx, e_idx = ok.nonzero(as_tuple=True)
    if e_idx.numel() == 0:
        return None
    x0, y0, x1, y1 = px[b_idx, e_idx], py[b_idx, e_idx], qx[b_idx, e_idx], qy[b_idx, e_idx]
    z0, z1 = sz[b_idx, p[e_idx]], sz[b_idx, q[e_idx]]
    inside = side_r[b_idx, e_idx]
    horizontal = (y1 - y0).abs() >= (x1 - x0).abs()  # mostly vertical edge -> horizontal pixel pairs

    # Swap axes for the mostly-horizontal edges so both cases are "walk along a, cross along c".
    a0, a1 = torch.where(horizontal, y0, x0), torch.where(horizontal, y1, x1)
    c0, c1 = torch.where(horizontal, x0, y0), torch.where(horizontal, x1, y1)
    extent_a = torch.where(horizontal, torch.full_like(a0, height), torch.full_like(a0, width))
    extent_c = torch.where(horizontal, torch.full_like(a0, width), torch.full_like(a0, height))
    lo = torch.minimum(torch.minimum(a0, a1).clamp(min=-1), extent_a).ceil()
    hi = torch.minimum(torch.maximum(a0, a1).clamp(min=-1), extent_a).ceil() - 1  # half-open [min, max)
    lo, hi = lo.clamp(min=0).long(), torch.minimum(hi, extent_a - 1).long()
    counts = (hi - lo + 1).clamp(min=0)
    owner, local = _expand_ranges(counts)
    line = lo[owner] + local
    t = (line - a0[owner]) / (a1[owner] - a0[owner])
    cross = c0[owner] + t * (c1[owner] - c0[owner])
    base = cross.floor()
    valid = (base >= 0) & (base + 1 <= extent_c[owner] - 1)
    # Moving +c changes the side by sign(-(a1 - a0)) when c = x, and by sign(+(a1 - a0)) when c = y.
    hor = horizontal[owner]
    step_side = torch.sign(a1[owner] - a0[owner]) * torch.where(hor, -1.0, 1.0)
    a_is_low = step_side != inside[owner]  # A (inside) is the high pixel when stepping +c goes inside
    z_edge = z0[owner] + t * (z1[owner] - z0[owner])

    line, base_l = line[valid], base[valid].long()
    owner, hor, a_is_low, z_edge, cross = owner[valid], hor[valid], a_is_low[valid], z_edge[valid], cross[valid]
    bb = b_idx[owner]
    row_low = torch.where(hor, line, base_l)
    col_low = torch.where(hor, base_l, line)
    pix_low = (bb * height + row_low) * width + col_low
    pix_high = pix_low + torch.where(hor, torch.ones_like(line), torch.full_like(line, width))
    pix_a = torch.where(a_is_low, pix_low, pix_high)
    pix_b = torch.where(a_is_low, pix_high, pix_low)

    face = rast[..., 3].detach().reshape(-1).round().long() - 1
    depth = rast[..., 2].detach().reshape(-1)
    face_a, face_b = face[pix_a], face[pix_b]
    keep = (face_a >= 0) & (face_a != face_b) & ((face_b < 0) | (depth[pix_b] > z_edge))
    ep, eq = p[e_idx[owner]], q[e_idx[owner]]
    if not bool(keep.any()):
        return None
    sel = keep.nonzero().squeeze(1)

    # One crossing per pixel pair: the one nearest to B (the outermost silhouette).
    pair = torch.minimum(pix_a[sel], pix_b[sel]) * 2 + hor[sel].long()
    toward_b = torch.where(a_is_low[sel], cross[sel], -cross[sel])
    pair_ids, pair_of = torch.unique(pair, return_inverse=True)
    key = (_sortable_float(toward_b) << 32) | (torch.iinfo(torch.int32).max - torch.arange(sel.numel(), device=device))
    best = torch.full((pair_ids.numel(),), torch.iinfo(torch.int64).min, dtype=torch.long, device=device)
    best.scatter_reduce_(0, pair_of, key, reduce="amax")
    sel = sel[best[pair_of] == key]
    return {
        "b": bb[sel], "p": ep[sel], "q": eq[sel], "pix_a": pix_a[sel], "pix_b": pix_b[sel],
        "line": line[sel], "base": base_l[sel], "a_is_low": a_is_low[sel], "horizontal": hor[sel],
    }


def antialias(color: torch.Tensor, rast: torch.Tensor, pos_clip: torch.Tensor, tris: torch.Tensor) -> torch.Tensor:
    """Analytic antialiasing of silhouette edges (nvdiffrast-style), differentiable w.r.t. ``pos_clip``.

    For a pixel pair ``(A, B)`` split by a visible silhouette edge (``A`` on the
    edge's face side, ``B`` outside; see :func:`_silhouette_crossings`) let ``c``
    be the distance from ``A``'s centre to the crossing point, in pixels.  The
    pixel whose half of the segment contains the crossing is blended:
    ``B += (c - 0.5)(A - B)`` when ``c > 0.5``, ``A += (0.5 - c)(B - A)`` when
    ``c < 0.5``.  Either way ``d(A + B)/dc = A - B``: moving the edge into ``B``'s
    side by ``dc`` swaps ``dc`` pixels of ``B``'s colour for ``A``'s, the
    visibility derivative.  ``c`` is recomputed from ``pos_clip`` so gradients
    reach the edge's two vertices.  Pixels away from silhouettes are unchanged.

    Args:
        color: ``[B, H, W, C]`` shaded image.
        rast: output of :func:`rasterize` for the same ``pos_clip`` and ``tris``.
        pos_clip: ``[B, V, 4]`` clip-space positions.
        tris: ``[F, 3]`` int64.

    Returns:
        ``[B, H, W, C]`` antialiased image.
    """
    batch, height, width, channels = color.shape
    pos_clip = _batched(pos_clip)
    if pos_clip.shape[0] != batch:
        pos_clip = pos_clip.expand(batch, -1, -1)
    tris = tris.to(device=color.device, dtype=torch.long)
    found = _silhouette_crossings(rast, pos_clip.detach(), tris)
    if found is None:
        return color + 0.0  # a new tensor, like the blended case
    b = found["b"]
    sx, sy, _, _ = _to_screen(pos_clip[b[:, None], torch.stack([found["p"], found["q"]], 1)], height, width)
    hor = found["horizontal"]
    # walk coordinate a (row for horizontal pairs), crossing coordinate c (column)
    a0, a1 = torch.where(hor, sy[:, 0], sx[:, 0]), torch.where(hor, sy[:, 1], sx[:, 1])
    c0, c1 = torch.where(hor, sx[:, 0], sy[:, 0]), torch.where(hor, sx[:, 1], sy[:, 1])
    denom = a1 - a0
    denom = torch.where(denom.abs() > 1e-12, denom, torch.full_like(denom, 1e-12))
    cross = c0 + (found["line"].to(c0.dtype) - a0) * (c1 - c0) / denom
    offset = cross - found["base"].to(c0.dtype)  # in [0, 1] from the low pixel
    dist = torch.where(found["a_is_low"], offset, 1 - offset).clamp(0, 1)[:, None]

    flat = color.reshape(-1, channels)
    col_a, col_b = flat.index_select(0, found["pix_a"]), flat.index_select(0, found["pix_b"])
    delta_b = (dist - 0.5).clamp(min=0) * (col_a - col_b)
    delta_a = (0.5 - dist).clamp(min=0) * (col_b - col_a)
    out = flat.index_add(0, found["pix_b"], delta_b.to(flat.dtype)).index_add(0, found["pix_a"], delta_a.to(flat.dtype))
    return out.view(batch, height, width, channels)


# --------------------------------------------------------------------------- backend


class _NvdiffrastBackend:
    """nvdiffrast behind the same four signatures (untested here: nvdiffrast is not installed on this machine).

    nvdiffrast's image row 0 is at NDC ``y = -1``, the same as ours (our projection
    negates y), so its outputs are used as they are.
    """

    name = "nvdiffrast"

    def __init__(self, dr, device: torch.device):
        self._dr = dr
        self._ctx = dr.RasterizeCudaContext(device=device)

    def rasterize(self, pos_clip, tris, resolution):
        rast, _ = self._dr.rasterize(self._ctx, _batched(pos_clip).float().contiguous(), tris.int().contiguous(),
                                     resolution=[int(resolution[0]), int(resolution[1])])
        return rast

    def interpolate(self, attr, rast, tris):
        out, _ = self._dr.interpolate(_batched(attr).float().contiguous(), rast, tris.int().contiguous())
        return out

    def texture(self, tex, uv, filter_mode="linear", boundary_mode="wrap"):
        extra = {}
        if filter_mode == "linear-mipmap-linear":
            extra["uv_da"] = _uv_pixel_derivatives(uv.detach()).contiguous()
        return self._dr.texture(tex.float().contiguous(), uv.float().contiguous(), filter_mode=filter_mode,
                                boundary_mode=boundary_mode, **extra)

    def antialias(self, color, rast, pos_clip, tris):
        return self._dr.antialias(color.contiguous(), rast, _batched(pos_clip).float().contiguous(),
                                  tris.int().contiguous())


def backend(device: torch.device | str | None = None):
    """The rasteriser to use on ``device``: nvdiffrast on CUDA when importable, else this module.

    Returns:
        An object with ``rasterize``, ``interpolate``, ``texture`` and ``antialias``
        (same signatures as this module's functions) and ``name``
        (``"nvdiffrast"`` or ``"torch"``).
    """
    device = torch.device(device if device is not None else "cpu")
    if device.type == "cuda":
        try:
            import nvdiffrast.torch as dr
        except ImportError:
            pass
        else:
            return _NvdiffrastBackend(dr, device)
    return SimpleNamespace(name="torch", rasterize=rasterize, interpolate=interpolate, texture=texture,
                           antialias=antialias)
