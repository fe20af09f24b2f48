"""Signed distances for shape models: from voxel masks (training) and from meshes (fitting, scoring).

Sign convention: negative inside, positive outside, in millimetres unless
stated otherwise.

From a mask (:func:`signed_distance_grid`, :class:`GridSdf`)
    Training needs the signed distance at some 10^5 points per shape for
    hundreds of shapes, all derived from a few label maps.  A Euclidean
    distance transform (``scipy.ndimage.distance_transform_edt``, with the
    voxel spacing) of the mask and of its complement gives the distance at
    *every* voxel in one linear-time pass (about a second for a femur at
    0.36 x 0.36 x 0.7 mm); any point is then a trilinear interpolation away,
    microseconds per point, and the grid is reused for every augmented copy
    of the shape.  Exact point-to-mesh queries cost a nearest-triangle search
    per point (trimesh needs the optional rtree/embree for that; the
    workbench has neither) and would dominate training-data preparation.
    The EDT's error is the mask's staircase (up to half a voxel); near the
    surface it is replaced by a first-order sub-voxel estimate from the
    Gaussian-smoothed mask, ``-sigma * Phi^-1(f)`` (exact for a plane), so
    the zero level is the smoothed mask's 0.5 iso-surface, the surface a
    mesh of the same mask has.  Far from the surface accuracy hardly matters:
    training clamps distances at a few mm.

From a mesh (:class:`MeshSdf`)
    Fitting and scoring start from meshes.  Candidate triangles are found
    with a KD-tree over triangle centroids (``k`` nearest), the exact
    point-to-triangle distance is taken over the candidates, and the sign is
    that of ``(p - c) . n`` with ``n`` the vertex normals interpolated at the
    closest point ``c`` (robust at edges and vertices of a smooth surface).

Sampling (:func:`sample_near_surface`)
    Points on the surface plus Gaussian noise at two scales (most samples
    within a few mm, where the shape is decided) and points uniform in a
    bounding sphere (so that the network knows the far field's sign).

Meshing: :func:`mesh_from_sdf_grid` and :func:`mesh_from_mask` run
scikit-image's marching cubes and build trimesh meshes directly (a small
private helper; the pipeline's :mod:`workbench.knee.meshes` could replace
:func:`mesh_from_mask` once it is settled).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import trimesh
from scipy import ndimage
from scipy.spatial import cKDTree

# --------------------------------------------------------------------------------------------------
# meshes


def mesh_from_sdf_grid(values: np.ndarray, origin: np.ndarray, spacing: float | Sequence[float],
                       level: float = 0.0) -> trimesh.Trimesh:
    """Marching cubes of ``values`` (negative inside) at ``level``; an empty mesh when the level is absent."""
    from skimage import measure

    values = np.asarray(values, np.float32)
    if not (values.min() < level < values.max()):
        return trimesh.Trimesh(np.zeros((0, 3)), np.zeros((0, 3), np.int64), process=False)
    spacing = np.broadcast_to(np.asarray(spacing, float), (3,))
    verts, faces, _, _ = measure.marching_cubes(values, level=level, spacing=tuple(spacing),
                                                gradient_direction="ascent")
    mesh = trimesh.Trimesh(verts + np.asarray(origin, float), faces, process=True)
    _outward(mesh)
    return mesh


def mesh_from_mask(mask: np.ndarray, affine: np.ndarray, sigma_mm: float = 0.75) -> trimesh.Trimesh:
    """Surface of a binary mask in world mm: Gaussian-smoothed indicator, marching cubes at 0.5, affine.

    The mask is padded by a few zero voxels so structures cut by the volume's
    edge get a closed cap.
    """
    from skimage import measure

    mask = np.asarray(mask, bool)
    if not mask.any():
        return trimesh.Trimesh(np.zeros((0, 3)), np.zeros((0, 3), np.int64), process=False)
    idx = np.nonzero(mask)
    pad = 3
    lo = np.maximum([int(i.min()) - pad for i in idx], -pad)
    hi = np.asarray([int(i.max()) + pad + 1 for i in idx])
    crop = np.zeros(tuple(hi - lo), np.float32)
    src_lo = np.maximum(lo, 0)
    src_hi = np.minimum(hi, mask.shape)
    crop[tuple(slice(a - b, c - b) for a, b, c in zip(src_lo, lo, src_hi))] = \
        mask[tuple(slice(a, c) for a, c in zip(src_lo, src_hi))]
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    if sigma_mm > 0:
        crop = ndimage.gaussian_filter(crop, sigma=sigma_mm / spacing)
    verts, faces, _, _ = measure.marching_cubes(crop, level=0.5)
    verts = verts + lo
    world = verts @ affine[:3, :3].T + affine[:3, 3]
    mesh = trimesh.Trimesh(world, faces, process=True)
    _outward(mesh)
    return mesh


def _outward(mesh: trimesh.Trimesh) -> None:
    """Flip the winding when the mesh's signed volume is negative (normals must point out)."""
    if len(mesh.faces) and mesh.volume < 0:
        mesh.invert()


def keep_components(mesh: trimesh.Trimesh, min_fraction: float) -> trimesh.Trimesh:
    """The connected components with at least ``min_fraction`` of the largest one's area (1.0: the largest only)."""
    if len(mesh.faces) == 0:
        return mesh
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    faces = np.asarray(mesh.faces)
    n = len(mesh.vertices)
    rows = np.concatenate([faces[:, 0], faces[:, 1], faces[:, 2]])
    cols = np.concatenate([faces[:, 1], faces[:, 2], faces[:, 0]])
    graph = coo_matrix((np.ones(len(rows), np.int8), (rows, cols)), shape=(n, n))
    n_comp, vlabel = connected_components(graph, directed=False)
    if n_comp == 1:
        return mesh
    flabel = vlabel[faces[:, 0]]
    area = np.bincount(flabel, weights=np.asarray(mesh.area_faces), minlength=n_comp)
    keep = area >= (min_fraction * area.max() if min_fraction < 1.0 else area.max())
    out = trimesh.Trimesh(np.asarray(mesh.vertices), faces[keep[flabel]], process=False)
    out.remove_unreferenced_vertices()
    return out


def mirror_mesh(mesh: trimesh.Trimesh, axis: int = 0) -> trimesh.Trimesh:
    """The mesh mirrored through the plane ``x_axis = 0`` (winding reversed so normals stay outward)."""
    verts = np.array(mesh.vertices, float)
    verts[:, axis] *= -1.0
    return trimesh.Trimesh(verts, np.asarray(mesh.faces)[:, ::-1].copy(), process=False)


def sample_surface(mesh: trimesh.Trimesh, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``n`` points uniform by area on ``mesh`` and their (face) normals, from a seeded generator."""
    faces = np.asarray(mesh.faces)
    tri = np.asarray(mesh.vertices)[faces]
    areas = np.asarray(mesh.area_faces, float)
    cdf = np.cumsum(areas)
    face = np.searchsorted(cdf, rng.random(n) * cdf[-1])
    face = np.minimum(face, len(faces) - 1)
    uv = rng.random((n, 2))
    flip = uv.sum(axis=1) > 1.0
    uv[flip] = 1.0 - uv[flip]
    t = tri[face]
    points = t[:, 0] + uv[:, :1] * (t[:, 1] - t[:, 0]) + uv[:, 1:] * (t[:, 2] - t[:, 0])
    return points, np.asarray(mesh.face_normals)[face]


# --------------------------------------------------------------------------------------------------
# signed distance from a mesh


class MeshSdf:
    """Signed distance to a closed, outward-oriented triangle mesh (see the module notes)."""

    def __init__(self, mesh: trimesh.Trimesh, k: int = 12) -> None:
        if len(mesh.faces) == 0:
            raise ValueError("empty mesh")
        self.vertices = np.asarray(mesh.vertices, float)
        self.faces = np.asarray(mesh.faces)
        self.normals = np.asarray(mesh.vertex_normals, float)
        self.tree = cKDTree(self.vertices[self.faces].mean(axis=1))
        self.k = min(int(k), len(self.faces))

    def closest(self, points: np.ndarray, chunk: int = 20000) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Closest surface points, their distances and interpolated vertex normals."""
        points = np.asarray(points, float)
        out_c = np.empty_like(points)
        out_d = np.empty(len(points))
        out_n = np.empty_like(points)
        for s in range(0, len(points), chunk):
            p = points[s:s + chunk]
            _, cand = self.tree.query(p, k=self.k)
            cand = cand.reshape(len(p), -1)
            tri = self.vertices[self.faces[cand]]  # (n, k, 3, 3)
            c, bary = _closest_on_triangles(np.repeat(p[:, None], cand.shape[1], axis=1), tri)
            d2 = ((c - p[:, None]) ** 2).sum(axis=2)
            best = np.argmin(d2, axis=1)
            rows = np.arange(len(p))
            out_c[s:s + chunk] = c[rows, best]
            out_d[s:s + chunk] = np.sqrt(d2[rows, best])
            nv = self.normals[self.faces[cand[rows, best]]]  # (n, 3, 3)
            out_n[s:s + chunk] = (bary[rows, best][:, :, None] * nv).sum(axis=1)
        return out_c, out_d, out_n

    def distance(self, points: np.ndarray) -> np.ndarray:
        return self.closest(points)[1]

    def __call__(self, points: np.ndarray) -> np.ndarray:
        c, d, n = self.closest(points)
        sign = np.where(((np.asarray(points, float) - c) * n).sum(axis=1) < 0, -1.0, 1.0)
        return sign * d


def _closest_on_triangles(p: np.ndarray, tri: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Closest points on triangles ``tri[..., 3, 3]`` to ``p[..., 3]`` and their barycentric coordinates.

    Vectorised region test (Ericson, *Real-Time Collision Detection*, 5.1.5).
    """
    a, b, c = tri[..., 0, :], tri[..., 1, :], tri[..., 2, :]
    ab, ac, ap = b - a, c - a, p - a
    d1 = (ab * ap).sum(-1)
    d2 = (ac * ap).sum(-1)
    bp = p - b
    d3 = (ab * bp).sum(-1)
    d4 = (ac * bp).sum(-1)
    cp = p - c
    d5 = (ab * cp).sum(-1)
    d6 = (ac * cp).sum(-1)
    va = d3 * d6 - d5 * d4
    vb = d5 * d2 - d1 * d6
    vc = d1 * d4 - d3 * d2
    eps = 1e-30
    # default: interior
    denom = va + vb + vc
    denom = np.where(np.abs(denom) < eps, eps, denom)
    v = vb / denom
    w = vc / denom
    u = 1.0 - v - w
    bary = np.stack([u, v, w], axis=-1)

    def setb(mask, uu, vv, ww):
        bary[mask] = np.stack([uu[mask], vv[mask], ww[mask]], axis=-1)

    zero = np.zeros_like(d1)
    one = np.ones_like(d1)
    # edge BC
    m = (va <= 0) & ((d4 - d3) >= 0) & ((d5 - d6) >= 0)
    t = (d4 - d3) / np.where(np.abs((d4 - d3) + (d5 - d6)) < eps, eps, (d4 - d3) + (d5 - d6))
    setb(m, zero, 1 - t, t)
    # edge AC
    m = (vb <= 0) & (d2 >= 0) & (d6 <= 0)
    t = d2 / np.where(np.abs(d2 - d6) < eps, eps, d2 - d6)
    setb(m, 1 - t, zero, t)
    # vertex C, edge AB, vertices B and A (applied last: they take precedence, as in Ericson's order)
    setb((d6 >= 0) & (d5 <= d6), zero, zero, one)
    m = (vc <= 0) & (d1 >= 0) & (d3 <= 0)
    t = d1 / np.where(np.abs(d1 - d3) < eps, eps, d1 - d3)
    setb(m, 1 - t, t, zero)
    setb((d3 >= 0) & (d4 <= d3), zero, one, zero)
    setb((d1 <= 0) & (d2 <= 0), one, zero, zero)
    closest = bary[..., 0:1] * a + bary[..., 1:2] * b + bary[..., 2:3] * c
    return closest, bary


# --------------------------------------------------------------------------------------------------
# signed distance from a mask


def signed_distance_grid(mask: np.ndarray, spacing: Sequence[float], smooth_mm: float = 0.75) -> np.ndarray:
    """Signed distance (mm, negative inside) at every voxel of a binary mask (see the module notes).

    With ``smooth_mm > 0`` the surface is the 0.5 level of the mask smoothed by
    a Gaussian of that standard deviation (as :func:`mesh_from_mask`), refined
    to sub-voxel accuracy within about 1.5 voxels of it.
    """
    spacing = np.asarray(spacing, float)
    mask = np.asarray(mask, bool)
    if smooth_mm > 0:
        f = ndimage.gaussian_filter(mask.astype(np.float32), sigma=smooth_mm / spacing)
        inside = f >= 0.5
    else:
        f = None
        inside = mask
    if not inside.any() or inside.all():
        raise ValueError("the mask has no surface")
    outside_d = ndimage.distance_transform_edt(~inside, sampling=spacing)
    inside_d = ndimage.distance_transform_edt(inside, sampling=spacing)
    half = 0.5 * float(spacing.min())
    sdf = np.where(inside, -(inside_d - half), outside_d - half).astype(np.float32)
    if f is not None:
        # a half-space blurred by a Gaussian of std sigma is Phi(-d / sigma): invert it near the surface
        from scipy.special import ndtri

        near = (np.abs(sdf) < 1.5 * float(spacing.max())) & (f > 0.01) & (f < 0.99)
        sdf[near] = (-smooth_mm * ndtri(f[near])).astype(np.float32)
    return sdf


@dataclass
class GridSdf:
    """A signed-distance grid with its voxel-to-world affine; call it on (N, 3) world points.

    Points outside the grid get the value at the nearest grid point plus the
    distance to it (an upper bound with the right sign far outside).
    """

    values: np.ndarray
    affine: np.ndarray

    def __post_init__(self) -> None:
        self.inverse = np.linalg.inv(self.affine)

    def __call__(self, points: np.ndarray) -> np.ndarray:
        points = np.asarray(points, float)
        ijk = points @ self.inverse[:3, :3].T + self.inverse[:3, 3]
        upper = np.asarray(self.values.shape, float) - 1.0
        clipped = np.clip(ijk, 0.0, upper)
        inside = ndimage.map_coordinates(self.values, clipped.T, order=1, mode="nearest")
        outside = np.linalg.norm((ijk - clipped) @ self.affine[:3, :3].T, axis=1)
        return inside + outside

    @classmethod
    def from_mask(cls, mask: np.ndarray, affine: np.ndarray, *, margin_mm: float = 10.0,
                  smooth_mm: float = 0.75) -> GridSdf:
        """Crop ``mask`` to its bounding box plus ``margin_mm`` and compute its signed-distance grid."""
        spacing = np.linalg.norm(affine[:3, :3], axis=0)
        idx = np.nonzero(mask)
        if len(idx[0]) == 0:
            raise ValueError("empty mask")
        pad = np.ceil(margin_mm / spacing).astype(int)
        lo = np.asarray([int(i.min()) for i in idx]) - pad
        hi = np.asarray([int(i.max()) + 1 for i in idx]) + pad
        crop = np.zeros(tuple(hi - lo), bool)
        src_lo = np.maximum(lo, 0)
        src_hi = np.minimum(hi, mask.shape)
        crop[tuple(slice(a - b, c - b) for a, b, c in zip(src_lo, lo, src_hi))] = \
            np.asarray(mask, bool)[tuple(slice(a, c) for a, c in zip(src_lo, src_hi))]
        sub = np.array(affine, float)
        sub[:3, 3] = affine[:3, :3] @ lo + affine[:3, 3]
        return cls(signed_distance_grid(crop, spacing, smooth_mm), sub)


# --------------------------------------------------------------------------------------------------
# samples


def sample_near_surface(surface_points: np.ndarray, sdf_fns: Sequence[Callable[[np.ndarray], np.ndarray]],
                        rng: np.random.Generator, *, n_near: int, sigmas: Sequence[float] = (1.0, 4.0),
                        n_uniform: int = 0, center: np.ndarray | None = None, radius: float | None = None,
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Sample points near a surface and their signed distances to each of ``sdf_fns``.

    Args:
        surface_points: (M, 3) points on the surface(s) to sample near.
        sdf_fns: signed-distance functions; column ``k`` of the result is ``sdf_fns[k](points)``.
        n_near: points near the surface, split evenly over the noise scales ``sigmas``
            (isotropic Gaussian noise of that standard deviation added to surface points).
        n_uniform: points uniform in the ball ``center``/``radius``.

    Returns:
        points (N, 3) and signed distances (N, len(sdf_fns)), float32.
    """
    parts = []
    per = np.full(len(sigmas), n_near // max(len(sigmas), 1))
    per[: n_near - per.sum()] += 1
    for sigma, count in zip(sigmas, per):
        base = surface_points[rng.integers(0, len(surface_points), int(count))]
        parts.append(base + rng.normal(0.0, float(sigma), base.shape))
    if n_uniform:
        if center is None or radius is None:
            raise ValueError("uniform samples need center and radius")
        direction = rng.normal(size=(n_uniform, 3))
        direction /= np.linalg.norm(direction, axis=1, keepdims=True)
        r = radius * rng.random(n_uniform) ** (1.0 / 3.0)
        parts.append(np.asarray(center, float) + direction * r[:, None])
    points = np.concatenate(parts, axis=0)
    values = np.stack([np.asarray(fn(points), float) for fn in sdf_fns], axis=1)
    return points.astype(np.float32), values.astype(np.float32)


def assd(mesh_a: trimesh.Trimesh, mesh_b: trimesh.Trimesh, *, n_points: int = 20000, seed: int = 0,
         keep: Callable[[np.ndarray], np.ndarray] | None = None) -> float:
    """Average symmetric surface distance (mesh units) between two meshes.

    ``n_points`` points uniform by area on each mesh (only those where
    ``keep(points)`` is true) and their exact distances to the other mesh; the
    result is the mean over both sets.  NaN when a mesh is empty or nothing is kept.
    """
    if len(mesh_a.faces) == 0 or len(mesh_b.faces) == 0:
        return float("nan")
    rng = np.random.default_rng(seed)
    dists = []
    for src, dst in ((mesh_a, mesh_b), (mesh_b, mesh_a)):
        pts, _ = sample_surface(src, n_points, rng)
        if keep is not None:
            pts = pts[keep(pts)]
        if len(pts) == 0:
            return float("nan")
        dists.append(MeshSdf(dst).distance(pts))
    return float(np.concatenate(dists).mean())
