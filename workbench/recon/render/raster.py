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

Speed (CPU): the search scans tall triangles in conservative row spans and
skips back-face pixels that provably lose the depth test (both exact: the
result equals testing every bounding-box pixel); the edge topology used by
:func:`antialias` is cached per ``tris`` tensor; the differentiable parts
touch only covered pixels (or silhouette pixel pairs) and use
``index_select`` / ``unbind`` so that backward stays sparse.
"""

from __future__ import annotations

import weakref
from types import SimpleNamespace

import torch
import torch.nn.functional as F

_W_EPS = 1e-8  # vertices with w below this are treated as behind the camera
_PAIR_BUDGET = 1 << 20  # candidate (triangle, pixel) pairs per chunk of the search
_INT64_MAX = torch.iinfo(torch.int64).max
_ONE_PASS_PAIRS = 1 << 17  # bounding-box pixels in all below which the search skips the back-face pass
_DENSE_PAIRS = 1 << 18  # antialias: pixel-pair slots below which the per-pair maximum uses a dense buffer
_SPAN_MIN_ROWS = 3  # triangles spanning at least this many pixel rows are scanned in row spans


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
    if counts.numel() == 0:
        return counts.new_zeros(0), counts.new_zeros(0)
    ends = torch.cumsum(counts, 0)
    total = int(ends[-1])
    # owner = number of ranges ending at or before each item (faster than repeat_interleave on CPU)
    marks = counts.new_zeros(total + 1).index_add_(0, ends, torch.ones_like(ends))
    owner = marks[:total].cumsum(0)
    local = torch.arange(total, device=counts.device) - (ends - counts).index_select(0, owner)
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

    Candidate (triangle, pixel) pairs come from each triangle's screen bounding
    box (see :func:`_candidates`).  Each pair is tested exactly with edge
    functions (a centre exactly on an edge counts as inside so shared edges leave
    no holes), and per pixel the smallest ``(depth, triangle index)`` key is
    kept.  Front faces go first and back-face pairs that provably lose the depth
    test are skipped; like the row spans this only saves work: the result is the
    same as testing every pixel of every bounding box.
    """
    batch, n_faces = pos_clip.shape[0], tris.shape[0]
    device = pos_clip.device
    sx, sy, sz, w = _to_screen(pos_clip, height, width)
    # per-triangle screen data, corner-major [3, B*F] per quantity; triangle t = b * F + f
    offsets = torch.arange(batch, device=device) * pos_clip.shape[1]
    corner = (tris.T[:, None, :] + offsets[None, :, None]).reshape(-1)  # the add makes it contiguous
    tx, ty, tz = (a.reshape(-1).index_select(0, corner).view(3, -1) for a in (sx, sy, sz))
    area = (tx[1] - tx[0]) * (ty[2] - ty[0]) - (tx[2] - tx[0]) * (ty[1] - ty[0])
    ok = area != 0
    if not bool((w > _W_EPS).all()):  # some vertex at or behind the camera plane
        ok &= (w.reshape(-1).index_select(0, corner).view(3, -1) > _W_EPS).all(0)
    x_min, x_max = torch.minimum(torch.minimum(tx[0], tx[1]), tx[2]), torch.maximum(torch.maximum(tx[0], tx[1]), tx[2])
    y_min, y_max = torch.minimum(torch.minimum(ty[0], ty[1]), ty[2]), torch.maximum(torch.maximum(ty[0], ty[1]), ty[2])
    # pixel-centre bounding box (clamping first keeps huge coordinates, w close to 0, out of the integer cast)
    x0 = x_min.clamp(0, width).ceil().long()
    x1 = x_max.clamp(-1, width - 1).floor().long()
    y0 = y_min.clamp(0, height).ceil().long()
    y1 = y_max.clamp(-1, height - 1).floor().long()
    box_w = (x1 - x0 + 1).clamp(min=0)
    rows = torch.where(ok & (box_w > 0), (y1 - y0 + 1).clamp(min=0), 0)

    keys = torch.full((batch * height * width,), _INT64_MAX, dtype=torch.int64, device=device)
    live = rows > 0  # triangles with at least one candidate pixel
    if bool(live.any()):
        extent = (x_max - x_min) * (y_max - y_min)
        # A pixel's depth is a convex combination of the corners' up to float32 rounding, bounded
        # relative to extent / |area| (slivers); a candidate whose pixel already holds a key nearer
        # than this lower bound cannot win and is skipped in the second pass.
        z_abs = torch.maximum(torch.maximum(tz[0].abs(), tz[1].abs()), tz[2].abs())
        z_low = torch.minimum(torch.minimum(tz[0], tz[1]), tz[2]) - (1e-7 + 1e-5 * z_abs * (1 + extent / area.abs()))
        index = torch.arange(batch * n_faces, device=device)
        tri = {  # indexed by t = b * F + f
            "x": tx.unbind(0), "y": ty.unbind(0), "z": tz.unbind(0), "area": area, "sign": torch.sign(area),
            "extent": extent, "z_low": _sortable_float(torch.nan_to_num(z_low, nan=-float("inf"))),
            # face and batch * H of t without integer division (slow on CPU)
            "face": index if batch == 1 else torch.arange(n_faces, device=device).repeat(batch),
            "row0": (torch.zeros_like(index) if batch == 1 else
                     (torch.arange(batch, device=device) * height).repeat_interleave(n_faces)),
            "x0": x0, "x1": x1, "y0": y0, "rows": rows, "box_w": box_w,
        }
        # Front faces (negative screen area for counter-clockwise outward triangles: y points down)
        # first, so that most back faces of a closed mesh are skipped by the depth bound.  Any winding
        # gives the same result; only the amount of skipped work changes.
        # With few candidate pairs in all, one pass over every live triangle costs less than the
        # fixed overhead of the two passes and the depth bound (same result either way).
        if int((rows * box_w).sum()) <= _ONE_PASS_PAIRS:
            for owner, px, py in _candidates(tri, live.nonzero().squeeze(1)):
                _test_pixels(keys, tri, owner, px, py, height, width, cull=False)
        else:
            front = area < 0
            for owner, px, py in _candidates(tri, (live & front).nonzero().squeeze(1)):
                _test_pixels(keys, tri, owner, px, py, height, width, cull=False)
            back = _drop_hidden_small(keys, tri, (live & ~front).nonzero().squeeze(1), width)
            for owner, px, py in _candidates(tri, back):
                _test_pixels(keys, tri, owner, px, py, height, width, cull=True)
    face = torch.where(keys == _INT64_MAX, -1, keys & 0xFFFFFFFF)
    return face.view(batch, height, width)


def _drop_hidden_small(keys: torch.Tensor, tri: dict, subset: torch.Tensor, width: int) -> torch.Tensor:
    """``subset`` less the triangles whose bounding box (at most 2×2 pixels) is all nearer than their depth bound.

    For such boxes the four corners are all the candidate pixels, so this drops a
    triangle exactly when :func:`_test_pixels` with ``cull`` would drop each of
    its pairs, without generating them.
    """
    if subset.numel() == 0:
        return subset
    x0, y0 = tri["x0"].index_select(0, subset), tri["y0"].index_select(0, subset)
    x1 = x0 + tri["box_w"].index_select(0, subset) - 1
    y1 = y0 + tri["rows"].index_select(0, subset) - 1
    row0 = tri["row0"].index_select(0, subset)
    nearest_last = None  # the farthest current key depth over the four corners
    for y in (y0, y1):
        base = (row0 + y) * width
        for x in (x0, x1):
            depth = keys.index_select(0, base + x) >> 32
            nearest_last = depth if nearest_last is None else torch.maximum(nearest_last, depth)
    small = (x1 - x0 <= 1) & (y1 - y0 <= 1)
    hidden = small & (nearest_last < tri["z_low"].index_select(0, subset))
    return subset.index_select(0, (~hidden).nonzero().squeeze(1))


def _candidates(tri: dict, subset: torch.Tensor):
    """Yield chunks ``(owner, px, py)`` of candidate (live triangle, pixel) pairs for the triangles ``subset``.

    Triangles spanning fewer than ``_SPAN_MIN_ROWS`` rows give every pixel of
    their bounding box; taller ones only a conservative span per row (see
    :func:`_row_spans`), which leaves out most of the box's empty corners.
    """
    if subset.numel() == 0:
        return
    rows = tri["rows"].index_select(0, subset)
    tall = rows >= _SPAN_MIN_ROWS
    small = subset.index_select(0, (~tall).nonzero().squeeze(1))
    if small.numel() > 0:  # every pixel of the (small) bounding box
        box_w = tri["box_w"].index_select(0, small)
        counts = tri["rows"].index_select(0, small) * box_w
        x0, y0 = tri["x0"].index_select(0, small), tri["y0"].index_select(0, small)
        for start, stop in _chunks(counts, _PAIR_BUDGET):
            owner, local = _expand_ranges(counts[start:stop])
            owner += start
            bw = box_w.index_select(0, owner)
            row = local // bw
            px = x0.index_select(0, owner) + (local - row * bw)
            py = y0.index_select(0, owner) + row
            yield small.index_select(0, owner), px, py
    big = subset.index_select(0, tall.nonzero().squeeze(1))
    if big.numel() > 0:  # a conservative span in every row
        rows_b = tri["rows"].index_select(0, big)
        edges = _span_edges(tri, big)
        for t_start, t_stop in _chunks(rows_b, _PAIR_BUDGET):
            r_owner, local = _expand_ranges(rows_b[t_start:t_stop])
            r_owner += t_start
            r_tri = big.index_select(0, r_owner)  # live triangle of each row
            row_y = tri["y0"].index_select(0, r_tri) + local
            lo, hi = _row_spans(edges, r_owner, row_y, tri["x0"].index_select(0, r_tri),
                                tri["x1"].index_select(0, r_tri))
            counts = (hi - lo + 1).clamp(min=0)
            for start, stop in _chunks(counts, _PAIR_BUDGET):
                owner, px = _expand_ranges(counts[start:stop])
                owner += start
                px += lo.index_select(0, owner)
                yield r_tri.index_select(0, owner), px, row_y.index_select(0, owner)


def _test_pixels(keys: torch.Tensor, tri: dict, owner: torch.Tensor, px: torch.Tensor, py: torch.Tensor,
                 height: int, width: int, cull: bool) -> None:
    """Exact coverage and depth test of (triangle ``owner``, pixel ``(px, py)``) pairs; updates ``keys`` in place.

    ``keys[pixel]`` keeps the minimum of ``(sortable depth << 32) | triangle index``
    over the pairs whose pixel centre is inside the triangle and whose depth is
    within ``[-1, 1]``.  With ``cull``, pairs whose pixel already holds a key
    nearer than the triangle's depth lower bound are dropped first (they cannot
    change the minimum).
    """
    pixel = (tri["row0"].index_select(0, owner) + py) * width + px
    if cull:
        keep = ((keys.index_select(0, pixel) >> 32) >= tri["z_low"].index_select(0, owner)).nonzero().squeeze(1)
        if keep.numel() == 0:
            return
        owner, px, py, pixel = (a.index_select(0, keep) for a in (owner, px, py, pixel))
    tx = [a.index_select(0, owner) for a in tri["x"]]
    ty = [a.index_select(0, owner) for a in tri["y"]]
    fx, fy = px.to(tx[0].dtype), py.to(tx[0].dtype)
    vx = [a - fx for a in tx]  # vertices relative to the pixel centre
    vy = [a - fy for a in ty]
    # e_k: twice the signed area of the sub-triangle opposite vertex k (its barycentric times area)
    e0 = vx[1] * vy[2] - vx[2] * vy[1]
    e1 = vx[2] * vy[0] - vx[0] * vy[2]
    e2 = vx[0] * vy[1] - vx[1] * vy[0]
    tz = [a.index_select(0, owner) for a in tri["z"]]
    z = (e0 * tz[0] + e1 * tz[1] + e2 * tz[2]) / tri["area"].index_select(0, owner)
    sign = tri["sign"].index_select(0, owner)
    inside = (e0 * sign >= 0) & (e1 * sign >= 0) & (e2 * sign >= 0) & (z >= -1) & (z <= 1)
    key = (_sortable_float(z) << 32) | tri["face"].index_select(0, owner)  # nearest first, then lowest index
    keys.scatter_reduce_(0, pixel, torch.where(inside, key, _INT64_MAX), reduce="amin")


def _span_edges(tri: dict, big: torch.Tensor):
    """Per-triangle data for :func:`_row_spans`, for the live triangles ``big`` (see there)."""
    xs = [a.index_select(0, big) for a in tri["x"]]
    ys = [a.index_select(0, big) for a in tri["y"]]
    extent = tri["extent"].index_select(0, big)
    # the long edge joins the top and bottom corners; the corner opposite it is the middle one
    dys = [(ys[(k + 2) % 3] - ys[(k + 1) % 3]).abs() for k in range(3)]
    mid = torch.where(dys[0] >= dys[1], torch.where(dys[0] >= dys[2], 0, 2), torch.where(dys[1] >= dys[2], 1, 2))
    x_all, y_all = torch.stack(xs), torch.stack(ys)
    order = torch.stack([mid, (mid + 1) % 3, (mid + 2) % 3])  # middle corner, then the two ends of the long edge
    xm, xe0, xe1 = x_all.gather(0, order).unbind(0)
    ym, ye0, ye1 = y_all.gather(0, order).unbind(0)
    low_first = ye0 <= ye1  # which end of the long edge is the top one

    def edge(xa, ya, xb, yb):  # reference point, slope dx/dy and the slack that does not depend on the row
        dy = yb - ya
        return xa, ya, (xb - xa) / dy, 1e-3 + 4e-6 * (extent / dy.abs() + xa.abs())

    x_top, y_top = torch.where(low_first, xe0, xe1), torch.where(low_first, ye0, ye1)
    x_bot, y_bot = torch.where(low_first, xe1, xe0), torch.where(low_first, ye1, ye0)
    long = edge(x_top, y_top, x_bot, y_bot)
    upper_part = edge(x_top, y_top, xm, ym)  # rows up to the middle corner
    lower_part = edge(xm, ym, x_bot, y_bot)  # rows below it
    return torch.stack([*long, *upper_part, *lower_part, ym])  # [13, T]


def _row_spans(edges: torch.Tensor, owner: torch.Tensor, row_y: torch.Tensor, x0: torch.Tensor, x1: torch.Tensor):
    """Conservative column range ``[lo, hi]`` (int64) of triangle ``owner``'s pixels in pixel row ``row_y``.

    A row crosses the triangle between the long edge (top to bottom corner) and
    one of the two short edges (the one above or below the middle corner).  The
    span between the two intercepts is widened by the worst-case float32
    rounding of both the intercepts and the exact edge-function test of
    :func:`_test_pixels` (whose error in ``x`` stays below
    ``~8 eps * extent_x * extent_y / |dy|`` for an edge rising ``dy``), so no
    pixel that the exact test accepts is ever left out; a near-horizontal edge
    simply gets a huge slack.  ``edges`` comes from :func:`_span_edges`;
    ``x0``, ``x1`` are the bounding box's columns.
    """
    e = [a.index_select(0, owner) for a in edges]
    fy = row_y.to(e[0].dtype)
    upper = fy <= e[12]
    xs, ys, ss, cs = (torch.where(upper, e[4 + i], e[8 + i]) for i in range(4))
    t_long = (fy - e[1]) * e[2]
    t_short = (fy - ys) * ss
    x_long, x_short = e[0] + t_long, xs + t_short
    slack = e[3] + cs + 1.2e-5 * (t_long.abs() + t_short.abs())
    lo, hi = torch.minimum(x_long, x_short) - slack, torch.maximum(x_long, x_short) + slack
    # NaN (0/0 slopes) means no usable bound; clamp before the integer cast, then the box limits apply
    lo = torch.nan_to_num(lo, nan=-1.0).clamp(-1.0, float(1 << 30)).ceil().long()
    hi = torch.nan_to_num(hi, nan=float(1 << 30)).clamp(-1.0, float(1 << 30)).floor().long()
    return torch.maximum(lo, x0), torch.minimum(hi, x1)


def _clip_barycentrics(verts: torch.Tensor, ndc_x: torch.Tensor, ndc_y: torch.Tensor):
    """Perspective-correct barycentrics of NDC points ``[N]`` in triangles with clip vertices ``[4, 3, N]``.

    (Component-major layout: ``verts[c, k]`` is component ``c`` of corner ``k``, so all
    arithmetic runs on contiguous ``[N]`` rows.)  Homogeneous 2D rasterisation: with
    ``r_k = (x_k, y_k, w_k)`` and ``p = (ndc_x, ndc_y, 1)`` the clip-space weights are
    ``b_0 ∝ p·(r_1×r_2)``, ``b_1 ∝ p·(r_2×r_0)``, ``b_2 ∝ p·(r_0×r_1)``.
    Returns ``(u, v, depth z/w)``, differentiable w.r.t. ``verts``.
    """
    # unbind, not indexing: backward is one stack instead of a zero-filled [4, 3, N] copy per use
    rows = verts.reshape(12, -1).unbind(0)
    x, y, z, w = rows[0:3], rows[3:6], rows[6:9], rows[9:12]

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
    f = flat.index_select(0, idx)
    if batch == 1:  # no integer division (slow on CPU) when there is one view
        b, pix = torch.zeros_like(idx), idx
    else:
        b = idx // (height * width)
        pix = idx % (height * width)
    ndc_x, ndc_y = (t.index_select(0, pix) for t in _pixel_ndc(height, width, pos_clip.dtype, pos_clip.device))
    n_verts = pos_clip.shape[1]
    corner_index = _corner_index(tris, f, b * n_verts)
    # 1-D index_select from contiguous component rows (not fancy indexing, not a strided gather):
    # forward and backward (a small index_add per component) are both fast
    columns = pos_clip.reshape(-1, 4).T.contiguous()
    verts = torch.stack([c.index_select(0, corner_index) for c in columns]).view(4, 3, -1)
    u, v, z = _clip_barycentrics(verts, ndc_x, ndc_y)
    values = torch.stack([u, v, z, (f + 1).to(pos_clip.dtype)], 1)  # [N, 4]
    out = pos_clip.new_zeros(batch * height * width, 4).index_copy(0, idx, values)
    return out.view(batch, height, width, 4)


_NDC_CACHE: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _pixel_ndc(height: int, width: int, dtype: torch.dtype, device: torch.device):
    """NDC x and y ``[H * W]`` of every pixel centre (row-major), cached per size, dtype and device."""
    key = (height, width, dtype, device)
    hit = _NDC_CACHE.get(key)
    if hit is None:
        pix = torch.arange(height * width, device=device)
        hit = ((2 * (pix % width) + 1).to(dtype) / width - 1, (2 * (pix // width) + 1).to(dtype) / height - 1)
        if len(_NDC_CACHE) >= 8:
            _NDC_CACHE.pop(next(iter(_NDC_CACHE)))
        _NDC_CACHE[key] = hit
    return hit


def _corner_index(tris: torch.Tensor, face: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Corner-major vertex rows ``[3 * N]`` of triangles ``face`` ``[N]``: ``tris[face, k] + offset``, k = 0, 1, 2."""
    return torch.cat([tris[:, k].index_select(0, face) + offset for k in range(3)])


def _covered(rast: torch.Tensor):
    """Flat indices ``[N]`` of the covered pixels of ``rast`` and their triangle indices ``[N]``."""
    flat = rast.detach().reshape(-1, 4)
    idx = (flat[:, 3] > 0.5).nonzero().squeeze(1)  # same as round(id + 1) - 1 >= 0
    return idx, flat[:, 3].index_select(0, idx).round().long() - 1


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
    idx, face = _covered(rast)
    b = idx // (height * width) if attr.shape[0] > 1 else torch.zeros_like(idx)
    channels = attr.shape[-1]
    # channel-first, corner-major gathers keep the arithmetic on contiguous [N] rows
    corner_index = _corner_index(tris, face, b * attr.shape[1])
    columns = attr.reshape(-1, channels).T.contiguous()
    c0, c1, c2 = torch.stack([c.index_select(0, corner_index) for c in columns]).view(channels, 3, -1).unbind(1)
    u, v, _, _ = rast.reshape(-1, 4).index_select(0, idx).unbind(1)
    values = u * c0 + v * c1 + (1 - u - v) * c2  # [C, N]
    dtype = torch.promote_types(attr.dtype, rast.dtype)
    out = attr.new_zeros(batch * height * width, channels, dtype=dtype).index_copy(0, idx, values.T.to(dtype))
    return out.view(batch, height, width, channels)


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


_TOPOLOGY_CACHE: dict[int, tuple] = {}  # id(tris) -> (weakref to tris, its _version, device, topology)
_TOPOLOGY_CACHE_SIZE = 8


@torch.no_grad()
def _compute_edge_topology(tris: torch.Tensor):
    """Unique edges of a triangle mesh with their opposite vertices.

    Returns ``(p, q, r, s, quad)``: edge endpoints ``p < q``, the vertex opposite
    the edge in its first face ``r`` and in its second face ``s`` (``-1`` on
    boundary edges), and ``quad = stack(p, q, r, max(s, 0))`` ``[4, E]``.  Edges
    shared by more than two faces (non-manifold; rare in the meshes used here)
    are left out.
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
    p, q = keys_m // n, keys_m % n
    return p, q, r, s, torch.stack([p, q, r, s.clamp(min=0)])


def _edge_topology(tris: torch.Tensor, device: torch.device):
    """:func:`_compute_edge_topology` of ``tris`` on ``device``, cached per tensor.

    The topology depends only on ``tris``, which an optimisation loop passes
    unchanged to every call; recomputing it (a sort of all half-edges) was a
    large share of :func:`antialias`.  A hit needs the very same tensor object
    (held by a weak reference, so a new tensor reusing freed memory never hits)
    with the same version counter (in-place edits through torch invalidate it).
    Returns the tuple of :func:`_compute_edge_topology`.
    """
    try:
        version = tris._version
    except RuntimeError:  # inference tensors have no version counter: do not cache
        return _compute_edge_topology(tris.to(device=device, dtype=torch.long))
    hit = _TOPOLOGY_CACHE.get(id(tris))
    if hit is not None and hit[0]() is tris and hit[1] == version and hit[2] == device:
        return hit[3]
    topology = _compute_edge_topology(tris.to(device=device, dtype=torch.long))
    _TOPOLOGY_CACHE.pop(id(tris), None)
    while len(_TOPOLOGY_CACHE) >= _TOPOLOGY_CACHE_SIZE:
        _TOPOLOGY_CACHE.pop(next(iter(_TOPOLOGY_CACHE)))
    _TOPOLOGY_CACHE[id(tris)] = (weakref.ref(tris), version, device, topology)
    return topology


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
    p, q, _, s, quad = _edge_topology(tris, device)
    if p.numel() == 0:
        return None
    n_edges, n_verts = p.numel(), pos_clip.shape[1]
    sx, sy, sz, w = _to_screen(pos_clip, height, width)
    # one gather for x, y, w of the four vertices of every edge and view: [3, 4 (p, q, r, s), B, E]
    corner = quad.reshape(-1) if batch == 1 else (
        quad[:, None, :] + (torch.arange(batch, device=device) * n_verts)[None, :, None]).reshape(-1)
    (px, qx, rx, s_x), (py, qy, ry, s_y) = (
        a.reshape(-1).index_select(0, corner).view(4, batch, n_edges) for a in (sx, sy))
    dx, dy = qx - px, qy - py
    side_r = torch.sign(dx * (ry - py) - dy * (rx - px))
    side_s = torch.sign(dx * (s_y - py) - dy * (s_x - px))
    ok = (side_r != 0) & ((s < 0) | (side_r * side_s > 0))
    if not bool((w > _W_EPS).all()):  # edges touching a vertex at or behind the camera plane are skipped
        pw, qw, rw, sw = (w.reshape(-1) > _W_EPS).index_select(0, corner).view(4, batch, n_edges)
        ok &= pw & qw & rw & ((s < 0) | sw)
    flat_sel = ok.view(-1).nonzero().squeeze(1)  # b * E + e, in (b, e) order
    if flat_sel.numel() == 0:
        return None
    if batch == 1:  # no integer division (slow on CPU) when there is one view
        b_idx, e_idx = torch.zeros_like(flat_sel), flat_sel
    else:
        b_idx, e_idx = flat_sel // n_edges, flat_sel % n_edges
    ep, eq = p.index_select(0, e_idx), q.index_select(0, e_idx)
    x0, y0, x1, y1 = (a.reshape(-1).index_select(0, flat_sel) for a in (px, py, qx, qy))
    inside = side_r.reshape(-1).index_select(0, flat_sel)
    sz_flat = sz.reshape(-1)
    z0, z1 = sz_flat.index_select(0, b_idx * n_verts + ep), sz_flat.index_select(0, b_idx * n_verts + eq)
    horizontal = (y1 - y0).abs() >= (x1 - x0).abs()  # mostly vertical edge -> horizontal pixel pairs

    # Swap axes for the mostly-horizontal edges so both cases are "walk along a, cross along c".
    a0, a1 = torch.where(horizontal, y0, x0), torch.where(horizontal, y1, x1)
    c0, c1 = torch.where(horizontal, x0, y0), torch.where(horizontal, x1, y1)
    extent_a = torch.where(horizontal, float(height), float(width)).to(a0.dtype)
    extent_c = torch.where(horizontal, float(width), float(height)).to(a0.dtype)
    lo = torch.minimum(torch.minimum(a0, a1).clamp(min=-1), extent_a).ceil()
    hi = torch.minimum(torch.maximum(a0, a1).clamp(min=-1), extent_a).ceil() - 1  # half-open [min, max)
    lo, hi = lo.clamp(min=0).long(), torch.minimum(hi, extent_a - 1).long()
    counts = (hi - lo + 1).clamp(min=0)
    owner, local = _expand_ranges(counts)
    # per-edge values gathered to the crossings with one index_select: [8, N]
    per_edge = torch.stack([a0, a1, c0, c1, z0, z1, extent_c, inside]).index_select(1, owner)
    pa0, pa1, pc0, pc1, pz0, pz1, pext_c, pinside = per_edge
    hor = horizontal.index_select(0, owner)
    line = lo.index_select(0, owner) + local
    t = (line - pa0) / (pa1 - pa0)
    cross = pc0 + t * (pc1 - pc0)
    base = cross.floor()
    valid = (base >= 0) & (base + 1 <= pext_c - 1)
    # Moving +c changes the side by sign(-(a1 - a0)) when c = x, and by sign(+(a1 - a0)) when c = y.
    step_side = torch.sign(pa1 - pa0) * torch.where(hor, -1.0, 1.0)
    a_is_low = step_side != pinside  # A (inside) is the high pixel when stepping +c goes inside
    z_edge = pz0 + t * (pz1 - pz0)

    vsel = valid.nonzero().squeeze(1)
    line, base_l = line.index_select(0, vsel), base.index_select(0, vsel).long()
    owner, hor, a_is_low = owner.index_select(0, vsel), hor.index_select(0, vsel), a_is_low.index_select(0, vsel)
    z_edge, cross = z_edge.index_select(0, vsel), cross.index_select(0, vsel)
    bb = b_idx.index_select(0, owner)
    row_low = torch.where(hor, line, base_l)
    col_low = torch.where(hor, base_l, line)
    pix_low = (bb * height + row_low) * width + col_low
    pix_high = pix_low + torch.where(hor, 1, width)
    pix_a = torch.where(a_is_low, pix_low, pix_high)
    pix_b = torch.where(a_is_low, pix_high, pix_low)

    flat_rast = rast.detach().reshape(-1, 4)
    at_a, at_b = flat_rast.index_select(0, pix_a), flat_rast.index_select(0, pix_b)
    face_a, face_b = at_a[:, 3].round().long() - 1, at_b[:, 3].round().long() - 1
    keep = (face_a >= 0) & (face_a != face_b) & ((face_b < 0) | (at_b[:, 2] > z_edge))
    sel = keep.nonzero().squeeze(1)
    if sel.numel() == 0:
        return None

    # One crossing per pixel pair: the one nearest to B (the outermost silhouette).
    pix_a, pix_b, hor, a_is_low = (x.index_select(0, sel) for x in (pix_a, pix_b, hor, a_is_low))
    pair = torch.minimum(pix_a, pix_b) * 2 + hor.long()
    cross_s = cross.index_select(0, sel)
    toward_b = torch.where(a_is_low, cross_s, -cross_s)
    key = (_sortable_float(toward_b) << 32) | (torch.iinfo(torch.int32).max - torch.arange(sel.numel(), device=device))
    if 2 * batch * height * width <= _DENSE_PAIRS:  # small image: a dense per-pair buffer beats unique's sort
        n_pairs, pair_of = 2 * batch * height * width, pair
    else:
        pair_ids, pair_of = torch.unique(pair, return_inverse=True)
        n_pairs = pair_ids.numel()
    best = torch.full((n_pairs,), torch.iinfo(torch.int64).min, dtype=torch.long, device=device)
    best.scatter_reduce_(0, pair_of, key, reduce="amax")
    win = (best.index_select(0, pair_of) == key).nonzero().squeeze(1)
    sel_owner = owner.index_select(0, sel.index_select(0, win))
    return {
        "b": b_idx.index_select(0, sel_owner), "p": ep.index_select(0, sel_owner),
        "q": eq.index_select(0, sel_owner), "pix_a": pix_a.index_select(0, win), "pix_b": pix_b.index_select(0, win),
        "line": line.index_select(0, sel).index_select(0, win),
        "base": base_l.index_select(0, sel).index_select(0, win),
        "a_is_low": a_is_low.index_select(0, win), "horizontal": hor.index_select(0, win),
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
    shared_pos = pos_clip.shape[0] != batch  # one set of positions for every view
    found = _silhouette_crossings(rast, pos_clip.detach().expand(batch, -1, -1), tris)
    if found is None:
        return color + 0.0  # a new tensor, like the blended case
    b, n_verts = found["b"], pos_clip.shape[1]
    row = (torch.zeros_like(b) if shared_pos else b) * n_verts
    ends = pos_clip.reshape(-1, 4).index_select(0, torch.cat([row + found["p"], row + found["q"]]))
    sx, sy, _, _ = _to_screen(ends.view(2, -1, 4), height, width)
    hor = found["horizontal"]
    # walk coordinate a (row for horizontal pairs), crossing coordinate c (column)
    a0, a1 = torch.where(hor, sy[0], sx[0]), torch.where(hor, sy[1], sx[1])
    c0, c1 = torch.where(hor, sx[0], sy[0]), torch.where(hor, sx[1], sy[1])
    denom = a1 - a0
    denom = torch.where(denom.abs() > 1e-12, denom, torch.full_like(denom, 1e-12))
    cross = c0 + (found["line"].to(c0.dtype) - a0) * (c1 - c0) / denom
    offset = cross - found["base"].to(c0.dtype)  # in [0, 1] from the low pixel
    dist = torch.where(found["a_is_low"], offset, 1 - offset).clamp(0, 1)[:, None]

    flat = color.reshape(-1, channels)
    # one gather and one index_add (B deltas before A deltas, as if applied one after the other):
    # each full-size copy or zero-filled gradient buffer is paid once
    pairs = torch.cat([found["pix_a"], found["pix_b"]])
    col_a, col_b = flat.index_select(0, pairs).view(2, -1, channels).unbind(0)
    delta_b = (dist - 0.5).clamp(min=0) * (col_a - col_b)
    delta_a = (0.5 - dist).clamp(min=0) * (col_b - col_a)
    out = flat.index_add(0, pairs.view(2, -1).flip(0).reshape(-1), torch.cat([delta_b, delta_a]).to(flat.dtype))
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
