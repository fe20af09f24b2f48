"""Cartilage thickness at every vertex of a bone surface, and its regional statistics.

Method
------
Upstream (pymskt) casts a ray from each bone-surface vertex along the bone's
outward normal (10 mm out, 2.5 mm in) and intersects it with a separately
smoothed cartilage mesh.  This module measures the same quantity -- the
length, along the bone normal, of the first run of cartilage met from the
bone surface -- but samples smoothed label fields along the ray instead of
intersecting meshes:

* ``B``: the bone's indicator, Gaussian-smoothed with ``sigma_mm``;
* ``C``: the indicator of the bone's cartilage labels, smoothed alike;
* ``U = B + C``: the smoothed indicator of bone-plus-cartilage (smoothing is
  linear and the two masks are disjoint).

Along each ray (samples every ``step_mm``, trilinear interpolation with
``scipy.ndimage.map_coordinates``, crossings refined by linear interpolation
between samples):

1. the bone surface ``s_B`` is the downward 0.5-crossing of ``B`` nearest to
   the vertex (within ``ray_in_mm``), so a vertex slightly off the surface
   (a coarse or decimated mesh) still measures from the true surface;
2. the articular surface ``s_U`` is the first downward 0.5-crossing of ``U``
   beyond ``s_B``;
3. the vertex has cartilage when the smoothed cartilage field reaches
   ``min_cartilage`` (0.2) somewhere between the two (a 1 mm layer smoothed
   with 1.25 mm still peaks near 0.3; bare bone stays near 0); its thickness
   is ``s_U - s_B``;
4. if it has none there but a separate run of cartilage starts within
   ``max_gap_mm`` (2 mm) further out (cartilage detached from the bone by a
   gap in the segmentation), the length of that run (where cartilage is the
   dominant smoothed label, ``C > B`` and ``C > 1 - U``) is the thickness, as
   a ray through a cartilage mesh would find; cartilage farther out (across
   a notch or groove) is not this vertex's;
5. otherwise the thickness is 0 and the region 0.

Why not the upstream mesh intersection.  Both surfaces used here belong to
*thick* objects (bone, and bone plus cartilage), so Gaussian smoothing moves
each only by about ``sigma**2 * curvature`` -- almost the same for the two
nearly parallel surfaces, so the difference cancels.  Smoothing the thin
cartilage layer on its own (what meshing the cartilage does) pulls both of its
0.5-crossings inward once the layer is no longer much thicker than the kernel,
and a 1 mm cartilage smoothed with 1 mm shrinks by a third or disappears.
Using the bone-plus-cartilage surface lets the kernel be wide enough to erase
the staircase of 0.7-1.5 mm slices without that bias, which is what brings the
error on synthetic shells to well under 0.1 mm (``bench/thickness_accuracy.py``).
It is also fast and needs nothing beyond scipy: two smoothed fields per bone
and ``n_vertices * samples`` trilinear look-ups (about a second per bone on
``right_knee_example.nrrd``), no ray-triangle tests (trimesh's ray casting
needs ``rtree`` or ``embreex``, neither of which the workbench installs).

Conventions.  Thickness is 0 (not NaN) where a ray meets no cartilage, as in
pymskt; :func:`region_thickness_stats` uses only vertices with thickness > 0,
so regional means describe cartilage where it exists.  ``region`` is the
cartilage label at the middle of the measured run (nearest cartilage voxel),
0 where there is none.  Statistics are per vertex (vertices are near-uniform
in area on meshes from :func:`workbench.knee.meshes.mesh_from_labels` with
``n_vertices``); ``std`` is the population standard deviation (ddof 0).

Limits.  A label map cannot say where a surface lies inside a voxel: a
surface exactly parallel to 1.5 mm slices is only known to within a slice,
and no method recovers its thickness to 0.1 mm; oblique and curved surfaces
(the usual case) average the staircase out.  Ridges and grooves with radii of
a few mm (trochlear ridges, cartilage edges) are rounded by ``sigma_mm``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import trimesh

from workbench.data import labels as L
from workbench.errors import InvalidFormat
from workbench.knee.meshes import (
    SmoothField,
    label_mask,
    mesh_from_field,
    present_values,
    smoothed_indicator,
)

__all__ = [
    "BONES",
    "DEFAULT_N_VERTICES",
    "REGION_NAMES",
    "STATS",
    "BoneThickness",
    "ShellPhantom",
    "ThicknessResult",
    "bone_thickness",
    "cartilage_thickness",
    "knee_thickness",
    "region_names",
    "region_thickness_stats",
    "shell_phantom",
    "thickness_sigma_mm",
]

FEMORAL_SUBREGION_VALUES = (L.FEM_CART_ANT, L.FEM_CART_MWB, L.FEM_CART_LWB, L.FEM_CART_MPOST, L.FEM_CART_LPOST)

#: Each bone's label and the cartilage labels measured on it.
BONES: dict[str, tuple[int, tuple[int, ...]]] = {
    "femur": (L.FEMUR, (L.FEM_CART, *FEMORAL_SUBREGION_VALUES)),
    "tibia": (L.TIBIA, (L.MED_TIB_CART, L.LAT_TIB_CART)),
    "patella": (L.PATELLA, (L.PAT_CART,)),
}

#: Default vertex counts of the bone meshes.
DEFAULT_N_VERTICES: dict[str, int] = {"femur": 20000, "tibia": 15000, "patella": 6000}

#: Region names of the results (``{name}_mm_{mean,std,median}``) by cartilage label value.
REGION_NAMES: dict[int, str] = {
    L.PAT_CART: "pat_cart",
    L.FEM_CART: "fem_cart",
    L.FEM_CART_ANT: "ant_fem_cart",
    L.FEM_CART_MWB: "med_wb_fem_cart",
    L.FEM_CART_LWB: "lat_wb_fem_cart",
    L.FEM_CART_MPOST: "med_post_fem_cart",
    L.FEM_CART_LPOST: "lat_post_fem_cart",
    L.MED_TIB_CART: "med_tib_cart",
    L.LAT_TIB_CART: "lat_tib_cart",
}

#: The statistics reported per region.
STATS = ("mean", "std", "median")


def thickness_sigma_mm(spacing: Iterable[float]) -> float:
    """Default smoothing of the thickness fields: 0.85 x the largest voxel size, within 0.5-1.5 mm.

    Wide enough to average out the staircase of thick slices (the surfaces
    used are not biased by it, see the module notes), narrow enough that a
    1 mm cartilage still shows in the smoothed cartilage field (``min_cartilage``).
    """
    return float(np.clip(0.85 * float(max(spacing)), 0.5, 1.5))


@dataclass
class ThicknessResult:
    """Per-vertex cartilage thickness of one bone mesh.

    Attributes:
        thickness_mm: ``(n,)`` float32, 0 where the ray meets no cartilage.
        region: ``(n,)`` int32 cartilage label of the measured run, 0 where none.
        n_no_surface: vertices where no bone surface lay within ``ray_in_mm`` along the normal.
        n_unbounded: vertices whose cartilage run did not end within ``ray_out_mm`` (set to 0).
        n_detached: vertices measured on cartilage separated from the bone by a gap.
        sigma_mm: the smoothing used.
    """

    thickness_mm: np.ndarray
    region: np.ndarray
    n_no_surface: int = 0
    n_unbounded: int = 0
    n_detached: int = 0
    sigma_mm: float = 0.0


def _crossings(values: np.ndarray, level: float, s: np.ndarray, downward: bool = True) -> np.ndarray:
    """Positions of the ``level`` crossings between consecutive samples (NaN where none), ``(n, S-1)``."""
    a, b = values[:, :-1], values[:, 1:]
    hit = (a >= level) & (b < level) if downward else (a < level) & (b >= level)
    with np.errstate(divide="ignore", invalid="ignore"):
        frac = (a - level) / (a - b)
    step = s[1] - s[0]
    return np.where(hit, s[:-1] + step * frac, np.nan)


def _first_after(mask: np.ndarray, start: np.ndarray) -> np.ndarray:
    """Index of the first True at or after ``start`` per row (-1 where none)."""
    cols = np.arange(mask.shape[1])
    m = mask & (cols[None, :] >= start[:, None])
    first = np.argmax(m, axis=1)
    return np.where(m[np.arange(len(m)), first], first, -1)


def _measure_rays(bone: SmoothField, cart: SmoothField, points: np.ndarray, normals: np.ndarray, s: np.ndarray,
                  ray_in_mm: float, min_cartilage: float, max_gap_mm: float) -> tuple[np.ndarray, ...]:
    """Thickness, run midpoint (offset along the ray) and flags (no surface, unbounded, detached) per ray."""
    n = len(points)
    B = bone.sample_rays(points, normals, s)
    C = cart.sample_rays(points, normals, s)
    U = B + C
    rows = np.arange(n)
    # 1. bone surface: downward 0.5-crossing of B nearest to the vertex
    cross_b = _crossings(B, 0.5, s)
    dist = np.where(np.isfinite(cross_b), np.abs(cross_b), np.inf)
    kb = np.argmin(dist, axis=1)
    has_surface = np.isfinite(dist[rows, kb]) & (dist[rows, kb] <= ray_in_mm)
    s_b = cross_b[rows, kb]
    # 2. articular surface: first downward crossing of U after the bone surface
    cross_u = _crossings(U, 0.5, s)
    ku = _first_after(np.isfinite(cross_u), kb)
    bounded = ku >= 0
    s_u = np.where(bounded, cross_u[rows, np.maximum(ku, 0)], np.nan)
    # 3. cartilage between them?
    cols = np.arange(len(s))[None, :]
    inside = (cols >= kb[:, None]) & (cols <= np.where(bounded, ku + 1, len(s) - 1)[:, None])
    attached = has_surface & (np.where(inside, C, 0.0).max(axis=1) >= min_cartilage)
    thickness = np.where(attached & bounded, s_u - s_b, 0.0)
    middle = np.where(attached & bounded, 0.5 * (s_u + s_b), np.nan)
    # 4. detached cartilage: the next run where cartilage dominates, starting within max_gap_mm
    todo = has_surface & bounded & ~attached
    detached = np.zeros(n, bool)
    if todo.any():
        margin = C[todo] - np.maximum(B[todo], 1.0 - U[todo])
        up = _crossings(margin, 0.0, s, downward=False)
        down = _crossings(margin, 0.0, s, downward=True)
        k_start = _first_after(np.isfinite(up), ku[todo] + 1)
        k_end = _first_after(np.isfinite(down), np.maximum(k_start, 0))
        sub = np.arange(int(todo.sum()))
        a = up[sub, np.maximum(k_start, 0)]
        e = down[sub, np.maximum(k_end, 0)]
        ok = (k_start >= 0) & (k_end >= 0) & (a - s_u[todo] <= max_gap_mm)
        idx = np.flatnonzero(todo)
        thickness[idx] = np.where(ok, e - a, 0.0)
        middle[idx] = np.where(ok, 0.5 * (a + e), np.nan)
        detached[idx] = ok
    unbounded = has_surface & attached & ~bounded
    return np.maximum(thickness, 0.0), middle, ~has_surface, unbounded, detached


def _field_normals(field: SmoothField, points: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    """Outward unit normals from the gradient of a smoothed indicator (``fallback`` where it is flat)."""
    h = 0.25 * float(field.spacing.min())
    grad = np.empty_like(points)
    for axis in range(3):
        offset = np.zeros(3)
        offset[axis] = h
        grad[:, axis] = (field.sample(points + offset) - field.sample(points - offset)) / (2 * h)
    norm = np.linalg.norm(grad, axis=1)
    ok = norm > 1e-3
    out = np.array(fallback, dtype=np.float64)
    out[ok] = -grad[ok] / norm[ok, None]
    return out


def cartilage_thickness(bone_mesh: trimesh.Trimesh, labels: np.ndarray, affine: np.ndarray,
                        bone_values: int | Iterable[int], cartilage_values: int | Iterable[int], *,
                        sigma_mm: float | None = None, ray_out_mm: float = 10.0, ray_in_mm: float = 2.5,
                        step_mm: float = 0.1, normals: str = "mesh", bone_field: SmoothField | None = None,
                        cartilage_field: SmoothField | None = None, min_cartilage: float = 0.2,
                        max_gap_mm: float = 2.0, chunk: int = 4096) -> ThicknessResult:
    """Cartilage thickness along the outward normal at every vertex of ``bone_mesh``.

    Args:
        bone_mesh: the bone surface in the world mm of ``affine`` (normals outward), e.g. from
            :func:`~workbench.knee.meshes.mesh_from_labels`.
        labels: 3-D label map.
        affine: its 4x4 voxel-to-world matrix.
        bone_values: label value(s) of the bone.
        cartilage_values: label values of the cartilage measured on this bone (e.g. ``(2, 11, ..., 15)``).
        sigma_mm: Gaussian smoothing of the label fields (default :func:`thickness_sigma_mm`).
        ray_out_mm, ray_in_mm: ray reach outward and inward of the vertex.
        step_mm: sampling step along the rays.
        normals: ``"mesh"`` (the mesh's area-weighted vertex normals) or ``"field"`` (the gradient of
            the smoothed bone field at the vertex, independent of the triangulation).
        bone_field, cartilage_field: precomputed :func:`~workbench.knee.meshes.smoothed_indicator`
            fields (their ``sigma_mm`` is then used).
        min_cartilage: least peak of the smoothed cartilage field between bone and articular surface
            for a vertex to count as covered.
        max_gap_mm: cartilage separated from the bone by a gap (a segmentation flaw) counts when the
            gap is at most this long; farther cartilage on the ray (across a notch) does not.
        chunk: rays processed at once (memory: about ``chunk * samples * 60`` bytes).

    Returns:
        A :class:`ThicknessResult` (thickness 0 and region 0 where no cartilage is met).
    """
    affine = np.asarray(affine, dtype=np.float64)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    if sigma_mm is None:
        sigma_mm = bone_field.sigma_mm if bone_field is not None else thickness_sigma_mm(spacing)
    if normals not in ("mesh", "field"):
        raise InvalidFormat(f"normals must be 'mesh' or 'field', got {normals!r}")
    if step_mm <= 0 or ray_out_mm <= 0 or ray_in_mm < 0:
        raise InvalidFormat("Ray lengths and step must be positive")
    cart_values = tuple(int(v) for v in np.atleast_1d(cartilage_values))
    n = len(bone_mesh.vertices)
    thickness = np.zeros(n, np.float32)
    region = np.zeros(n, np.int32)
    present = present_values(labels, cart_values) if cartilage_field is None else list(cartilage_field.values)
    if n == 0 or not present:
        return ThicknessResult(thickness, region, sigma_mm=float(sigma_mm))
    if bone_field is None:
        bone_field = smoothed_indicator(labels, affine, bone_values, sigma_mm=sigma_mm)
    if cartilage_field is None:
        cartilage_field = smoothed_indicator(labels, affine, present, sigma_mm=sigma_mm)
    points = np.asarray(bone_mesh.vertices, dtype=np.float64)
    vertex_normals = np.asarray(bone_mesh.vertex_normals, dtype=np.float64)
    if normals == "field":
        vertex_normals = _field_normals(bone_field, points, vertex_normals)
    n_steps = round((ray_out_mm + ray_in_mm) / step_mm)
    s = np.linspace(-ray_in_mm, ray_out_mm, n_steps + 1)
    middle = np.full(n, np.nan)
    n_no_surface = n_unbounded = n_detached = 0
    for start in range(0, n, chunk):
        sl = slice(start, min(start + chunk, n))
        t, mid, no_surface, unbounded, detached = _measure_rays(
            bone_field, cartilage_field, points[sl], vertex_normals[sl], s, ray_in_mm, min_cartilage, max_gap_mm)
        thickness[sl] = t
        middle[sl] = mid
        n_no_surface += int(no_surface.sum())
        n_unbounded += int(unbounded.sum())
        n_detached += int(detached.sum())
    has = (thickness > 0) & np.isfinite(middle)
    thickness[~has] = 0.0
    if has.any():
        if len(present) == 1:
            region[has] = present[0]
        else:
            from scipy.spatial import cKDTree

            voxels = np.argwhere(label_mask(labels, present))
            world = voxels @ affine[:3, :3].T + affine[:3, 3]
            values = np.asarray(labels)[tuple(voxels.T)]
            mids = points[has] + middle[has, None] * vertex_normals[has]
            _, nearest = cKDTree(world).query(mids)
            region[has] = values[nearest]
    return ThicknessResult(thickness, region, n_no_surface, n_unbounded, n_detached, float(sigma_mm))


# --- whole bones and the knee ------------------------------------------------------------------------

@dataclass
class BoneThickness:
    """A bone mesh with its per-vertex thickness and region (the ``point_data`` of its files)."""

    bone: str
    mesh: trimesh.Trimesh
    thickness_mm: np.ndarray
    region: np.ndarray
    seconds: dict[str, float] = field(default_factory=dict)
    n_no_surface: int = 0
    n_unbounded: int = 0

    def point_data(self) -> dict[str, np.ndarray]:
        """``{"thickness_mm": float32, "region": int32}`` for :func:`~workbench.knee.meshes.write_vtk`."""
        return {"thickness_mm": self.thickness_mm.astype(np.float32), "region": self.region.astype(np.int32)}


def bone_thickness(labels: np.ndarray, affine: np.ndarray, bone: str, *, n_vertices: int | None = None,
                   sigma_mm: float | None = None, mesh_sigma_mm: float | None = None, normals: str = "mesh",
                   ray_out_mm: float = 10.0, ray_in_mm: float = 2.5) -> BoneThickness:
    """Mesh ``bone`` (``"femur"``, ``"tibia"``, ``"patella"``; labels from :data:`BONES`) and measure its cartilage.

    ``sigma_mm`` defaults to :func:`thickness_sigma_mm`; ``mesh_sigma_mm``
    (smoothing of the mesh) defaults to the same, and then the smoothed bone
    field is computed once and shared by meshing and thickness.  ``n_vertices`` defaults to
    :data:`DEFAULT_N_VERTICES`.  Raises
    :class:`~workbench.errors.InvalidFormat` when the bone is absent.
    """
    if bone not in BONES:
        raise InvalidFormat(f"Unknown bone {bone!r}", f"Use one of {sorted(BONES)}.")
    bone_value, cart_values = BONES[bone]
    affine = np.asarray(affine, dtype=np.float64)
    if sigma_mm is None:
        sigma_mm = thickness_sigma_mm(np.linalg.norm(affine[:3, :3], axis=0))
    if mesh_sigma_mm is None:
        mesh_sigma_mm = sigma_mm
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    mesh_field = smoothed_indicator(labels, affine, bone_value, sigma_mm=mesh_sigma_mm)
    mesh = mesh_from_field(mesh_field, n_vertices=n_vertices if n_vertices is not None else DEFAULT_N_VERTICES[bone])
    seconds["mesh"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    bone_field = mesh_field if abs(mesh_sigma_mm - sigma_mm) < 1e-9 else None
    result = cartilage_thickness(mesh, labels, affine, bone_value, cart_values, sigma_mm=sigma_mm,
                                 normals=normals, bone_field=bone_field, ray_out_mm=ray_out_mm, ray_in_mm=ray_in_mm)
    seconds["thickness"] = time.perf_counter() - t0
    return BoneThickness(bone, mesh, result.thickness_mm, result.region, seconds, result.n_no_surface,
                         result.n_unbounded)


def knee_thickness(labels: np.ndarray, affine: np.ndarray, *, bones: Iterable[str] = ("femur", "tibia", "patella"),
                   n_vertices: Mapping[str, int] | None = None, sigma_mm: float | None = None,
                   subregions: bool | None = None) -> tuple[dict[str, BoneThickness], dict[str, float | None]]:
    """Thickness on every bone present in ``labels`` and the results' regional statistics.

    Bones absent from the label map are left out of the first dict.
    ``subregions`` (default: whether any femoral subregion label 11-15 is
    present) picks the femoral region names (see :func:`region_names`).
    """
    out: dict[str, BoneThickness] = {}
    counts = dict(DEFAULT_N_VERTICES, **(n_vertices or {}))
    bones = list(bones)
    present = set(present_values(labels, [BONES[b][0] for b in bones] + list(FEMORAL_SUBREGION_VALUES)))
    for bone in bones:
        if BONES[bone][0] not in present:
            continue
        out[bone] = bone_thickness(labels, affine, bone, n_vertices=counts[bone], sigma_mm=sigma_mm)
    if subregions is None:
        subregions = bool(present & set(FEMORAL_SUBREGION_VALUES))
    thickness = np.concatenate([b.thickness_mm for b in out.values()]) if out else np.zeros(0)
    region = np.concatenate([b.region for b in out.values()]) if out else np.zeros(0, np.int32)
    return out, region_thickness_stats(thickness, region, region_names(subregions))


# --- regional statistics -----------------------------------------------------------------------------

def region_names(subregions: bool) -> dict[int, str]:
    """Result region names by label: femoral subregions 11-15 (``subregions``) or whole femoral cartilage 2."""
    femoral = set(FEMORAL_SUBREGION_VALUES) if subregions else {L.FEM_CART}
    skip = {L.FEM_CART} if subregions else set(FEMORAL_SUBREGION_VALUES)
    return {v: k for v, k in REGION_NAMES.items() if v in femoral or v not in skip}


def region_thickness_stats(thickness: np.ndarray, region: np.ndarray,
                           names: Mapping[int, str] | None = None) -> dict[str, float | None]:
    """``{name}_mm_{mean,std,median}`` for every region in ``names`` (label value -> name).

    Only vertices with finite thickness > 0 count; a region without any gets
    ``None`` for its three fields (JSON ``null``, an empty CSV cell).  ``names``
    defaults to :func:`region_names` with subregions when any vertex has a
    label 11-15, else without.  ``std`` is the population standard deviation.
    """
    thickness = np.asarray(thickness, dtype=np.float64).ravel()
    region = np.asarray(region).ravel()
    if thickness.shape != region.shape:
        raise InvalidFormat(f"thickness ({thickness.size}) and region ({region.size}) differ in length")
    if names is None:
        names = region_names(bool(np.isin(region, FEMORAL_SUBREGION_VALUES).any()))
    out: dict[str, float | None] = {}
    valid = np.isfinite(thickness) & (thickness > 0)
    for value, name in names.items():
        values = thickness[valid & (region == int(value))]
        stats = (float(values.mean()), float(values.std()), float(np.median(values))) if values.size else (
            None, None, None)
        out.update({f"{name}_mm_{stat}": v for stat, v in zip(STATS, stats)})
    return out


# --- synthetic shells of known thickness (tests and benchmarks) --------------------------------------

@dataclass
class ShellPhantom:
    """A voxelised bone with a cartilage shell of known thickness.

    Attributes:
        labels: uint8 label map (``bone_value`` and ``cartilage_value``).
        affine: voxel-to-world matrix (rotated, possibly mirrored).
        truth: world points ``(n, 3)`` -> expected thickness (``thickness_mm`` on the covered part
            of the bone surface, 0 on the bare part, NaN near edges, caps and the shell's border).
        thickness_mm: the shell's thickness.
        kind: ``"flat"``, ``"sphere"`` or ``"cylinder"``.
    """

    labels: np.ndarray
    affine: np.ndarray
    truth: Callable[[np.ndarray], np.ndarray]
    thickness_mm: float
    kind: str
    bone_value: int = L.FEMUR
    cartilage_value: int = L.FEM_CART


def _rotation(angles_deg: Iterable[float]) -> np.ndarray:
    ax, ay, az = np.radians(list(angles_deg))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def shell_phantom(kind: str, thickness_mm: float, spacing: Iterable[float], *,
                  angles_deg: Iterable[float] = (25.0, 35.0, 10.0), flip: bool = False, radius_mm: float = 15.0,
                  offset_vox: Iterable[float] = (0.3, 0.1, 0.4)) -> ShellPhantom:
    """A synthetic bone with a cartilage shell of ``thickness_mm``, voxelised at ``spacing`` (mm).

    The object lives in world coordinates with its cartilage facing +z:

    * ``"flat"``: a 40 x 40 x 10 mm bone slab (top face z = 0) with cartilage on
      ``-16 < x < 8``, ``|y| < 16``;
    * ``"sphere"``: a ball of ``radius_mm`` with cartilage on the cap within 75 degrees of +z;
    * ``"cylinder"``: a 40 mm long rod of ``radius_mm`` along x with cartilage
      within 75 degrees of +z on ``|x| < 16``.

    The voxel grid is rotated by ``angles_deg`` (x, y, z Euler angles) relative
    to the object, shifted by ``offset_vox`` voxels, and mirrored along its
    first axis when ``flip`` (negative determinant, as LPS-like grids).  A
    voxel belongs to a structure when its centre does.
    """
    t = float(thickness_mm)
    spacing = np.asarray(list(spacing), dtype=np.float64)
    R = float(radius_mm)
    if kind == "flat":
        reach = float(np.sqrt(20.0 ** 2 * 2 + (10.0 + t) ** 2)) + 3.0
    elif kind == "sphere":
        reach = R + t + 3.0
    elif kind == "cylinder":
        reach = float(np.hypot(20.0, R + t)) + 3.0
    else:
        raise InvalidFormat(f"Unknown phantom kind {kind!r}", "Use 'flat', 'sphere' or 'cylinder'.")
    direction = _rotation(angles_deg)
    if flip:
        direction = direction @ np.diag([-1.0, 1.0, 1.0])
    shape = tuple(int(np.ceil(2 * reach / s)) + 1 for s in spacing)
    affine = np.eye(4)
    affine[:3, :3] = direction * spacing
    center_index = (np.asarray(shape) - 1) / 2.0 + np.asarray(list(offset_vox))
    affine[:3, 3] = -affine[:3, :3] @ center_index
    index = np.indices(shape, dtype=np.float32).reshape(3, -1).T
    p = index @ affine[:3, :3].T.astype(np.float32) + affine[:3, 3].astype(np.float32)
    x, y, z = p[:, 0], p[:, 1], p[:, 2]
    cos75 = np.cos(np.radians(75.0))
    if kind == "flat":
        lateral = (np.abs(x) < 20) & (np.abs(y) < 20)
        bone = lateral & (z > -10) & (z < 0)
        cart = (x > -16) & (x < 8) & (np.abs(y) < 16) & (z >= 0) & (z < t)
    elif kind == "sphere":
        r = np.sqrt(x * x + y * y + z * z)
        bone = r < R
        cart = (r >= R) & (r < R + t) & (z > cos75 * r)
    else:
        rho = np.sqrt(y * y + z * z)
        bone = (rho < R) & (np.abs(x) < 20)
        cart = (rho >= R) & (rho < R + t) & (np.abs(x) < 16) & (z > cos75 * rho)
    labels = np.zeros(len(p), np.uint8)
    labels[bone] = L.FEMUR
    labels[cart] = L.FEM_CART
    labels = labels.reshape(shape)

    def truth(points: np.ndarray) -> np.ndarray:
        q = np.asarray(points, dtype=np.float64)
        x, y, z = q[:, 0], q[:, 1], q[:, 2]
        out = np.full(len(q), np.nan)
        if kind == "flat":
            top = (np.abs(z) < 1.0) & (np.abs(y) < 12)
            out[top & (x > -12) & (x < 4)] = t
            out[top & (x > 12) & (x < 16)] = 0.0
        else:
            if kind == "sphere":
                r = np.linalg.norm(q, axis=1)
                side = np.abs(r - R) < 1.0
            else:
                r = np.hypot(y, z)
                side = (np.abs(r - R) < 1.0) & (np.abs(x) < 12)
            polar = np.degrees(np.arccos(np.clip(z / np.maximum(r, 1e-9), -1, 1)))
            out[side & (polar < 65)] = t
            out[side & (polar > 85)] = 0.0
        return out

    return ShellPhantom(labels, affine, truth, t, kind)
