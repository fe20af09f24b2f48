"""Femoral cartilage subregions (labels 11-15), derived geometrically from a knee label map.

The femoral cartilage (label 2) is split into the five regions of the original knee pipeline
(:data:`workbench.data.labels.FEMORAL_SUBREGIONS`):

====  ==================  ==========================================================
11    anterior            in front of the trochlear notch (the trochlea)
12    medial WB           weight-bearing band, medial of the notch
13    lateral WB          weight-bearing band, lateral of the notch
14    medial posterior    behind the weight-bearing band (or high up in it), medial
15    lateral posterior   behind the weight-bearing band (or high up in it), lateral
====  ==================  ==========================================================

The rule is that of the original pipeline (pymskt's ``get_cartilage_subregions``, which its
``get_knee_segmentation_with_femur_subregions`` runs), re-derived in world millimetres instead of
image indices, so that voxel order, axis flips and LPS/RAS storage do not change the answer:

1. **Knee frame.**  Three orthogonal axes: *u* (towards the patient's right), *a* (anterior) and
   *s* (superior).  ``frame="image"`` (default) takes them from the voxel axes closest to x and z,
   as the original does with its image axes: sagittal knee scans are prescribed along the
   condyles, and an oblique acquisition stays oblique through the workbench's canonical
   reorientation (axis permutations and flips only).  ``frame="scanner"`` uses the RAS axes;
   ``frame="tibia"`` turns *u* about *s* to run through the centroids of the medial and lateral
   tibial cartilage (takes out a rotation of the leg in the scanner).  Newer pymskt releases
   first register the femur to a reference knee with a similarity transform; that is not done
   here (see :func:`femoral_subregions`).
2. **Bins.**  Femoral cartilage voxels are binned along *u*, *a* and *s*; the bin width is the
   voxel's projected extent on the axis (the voxel spacing on an axis-aligned grid).  Every
   comparison below is made on integer bins, so the result does not depend on rounding.
3. **Trochlear notch.**  For each *u* column of the axial footprint take the most posterior
   cartilage bin.  Between the condyles the footprint holds only the trochlea, so the column
   whose posterior end lies furthest anterior is the notch (the roof of the intercondylar
   fossa).  It is searched between the *u* centroids of the medial and lateral tibial cartilage
   (the original searches ±20 pixels around two guesses taken from the femoral cartilage); a run
   of equally good columns gives its centre.
4. **Anterior / weight-bearing / posterior.**  Cartilage at or anterior of the notch's posterior
   end is *anterior*.  The weight-bearing band is the next ``wb_fraction`` (0.6, as the original)
   of the distance from there to the most posterior femoral cartilage; everything behind it is
   *posterior*.  Cartilage inside the band but above a height cut is also *posterior* (the
   original's guard against the posterior condyles curling up): per *a* bin the cut lies
   ``superior_ratio`` (0.33, as the original) of the way from the bin's mean cartilage height to
   the top of all femoral cartilage.
5. **Medial / lateral.**  Weight-bearing and posterior cartilage is split by the plane through
   the notch with normal *u*.  Medial is towards the body's midline: in RAS+ (+x = the patient's
   right) that is −x for a right knee and +x for a left knee.  The anterior region is not split.

The side is detected from the tibial cartilage unless given: the medial tibial cartilage (3) of a
right knee lies at smaller x than its lateral tibial cartilage (4).  A given side that contradicts
the labels is refused.  Only femoral cartilage voxels change.  The femur (7) is not used by this
rule and is not required.

On the original's own reference knee (``right_knee_example.nrrd`` of the mskt sdist) the default
frame gives exactly the original's voxel assignment.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from workbench.data import labels as L
from workbench.errors import ConfigError, InvalidFormat

#: Output file name pattern of the pipeline (as the original pipeline named it).
SUBREGIONS_SUFFIX = "_subregions-labels.nii.gz"

#: Defaults of the original pipeline.
WB_FRACTION = 0.6
SUPERIOR_RATIO = 0.33

#: Knee frames :func:`femoral_subregions` can work in (the first is the default).
FRAMES: tuple[str, ...] = ("image", "scanner", "tibia")

#: The subregion values in table order and their keys.
SUBREGION_VALUES: tuple[int, ...] = tuple(label.value for label in L.FEMORAL_SUBREGIONS)

_MISSING_HINT = ("Subregions need femoral cartilage (2) and both medial (3) and lateral (4) tibial cartilage; "
                 "check the segmentation, or remap the label map with workbench.data.labels.remap_labels.")

Side = Literal["right", "left"]


def subregions_filename(case: str) -> str:
    """``<case>_subregions-labels.nii.gz``, the pipeline's name for the subregion label map."""
    return f"{case}{SUBREGIONS_SUFFIX}"


@dataclass
class SubregionGeometry:
    """The geometry a split used, in RAS+ millimetres.

    Coordinates along an axis are ``axis · p`` for a world point ``p``; a boundary "at ``x`` mm along
    ``ap_axis``" is the plane ``ap_axis · p = x``.

    Attributes:
        side: ``"right"`` or ``"left"``.
        side_given: True when the caller named the side, False when it was detected.
        frame: ``"image"``, ``"scanner"`` or ``"tibia"``.
        ml_axis, ap_axis, si_axis: unit vectors (RAS) of the knee frame: towards the patient's
            right, anterior, superior.
        medial_direction: unit vector (RAS) pointing medially (``±ml_axis``).
        bin_mm: bin widths along the three axes.
        notch_ml_mm: the medial/lateral split plane, ``ml_axis · p = notch_ml_mm``.
        notch_search_mm: the ``(low, high)`` range along ``ml_axis`` searched for the notch
            (between the tibial cartilage centroids).
        anterior_boundary_mm: plane between anterior and weight-bearing cartilage (along ``ap_axis``).
        posterior_boundary_mm: plane between weight-bearing and posterior cartilage.
        posterior_end_mm: posterior edge of the femoral cartilage.
        top_mm: top (along ``si_axis``) of the femoral cartilage, used by the height cut.
        wb_fraction, superior_ratio: the rule's parameters.
        med_tib_centroid_mm, lat_tib_centroid_mm: centroids (RAS) of tibial cartilage 3 and 4.
        volumes_ml: volume of each subregion by key (``fem_cart_ant``, ...).
        fractions: each subregion's share of the femoral cartilage.
    """

    side: str
    side_given: bool
    frame: str
    ml_axis: list[float]
    ap_axis: list[float]
    si_axis: list[float]
    medial_direction: list[float]
    bin_mm: list[float]
    notch_ml_mm: float
    notch_search_mm: tuple[float, float]
    anterior_boundary_mm: float
    posterior_boundary_mm: float
    posterior_end_mm: float
    top_mm: float
    wb_fraction: float
    superior_ratio: float
    med_tib_centroid_mm: list[float]
    lat_tib_centroid_mm: list[float]
    volumes_ml: dict[str, float] = field(default_factory=dict)
    fractions: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (plain floats and lists)."""
        return {
            "side": self.side, "side_given": self.side_given, "frame": self.frame,
            "ml_axis": _r(self.ml_axis), "ap_axis": _r(self.ap_axis), "si_axis": _r(self.si_axis),
            "medial_direction": _r(self.medial_direction), "bin_mm": _r(self.bin_mm),
            "notch_ml_mm": _r(self.notch_ml_mm), "notch_search_mm": _r(list(self.notch_search_mm)),
            "anterior_boundary_mm": _r(self.anterior_boundary_mm),
            "posterior_boundary_mm": _r(self.posterior_boundary_mm),
            "posterior_end_mm": _r(self.posterior_end_mm), "top_mm": _r(self.top_mm),
            "wb_fraction": self.wb_fraction, "superior_ratio": self.superior_ratio,
            "med_tib_centroid_mm": _r(self.med_tib_centroid_mm), "lat_tib_centroid_mm": _r(self.lat_tib_centroid_mm),
            "volumes_ml": {k: round(float(v), 4) for k, v in self.volumes_ml.items()},
            "fractions": {k: round(float(v), 4) for k, v in self.fractions.items()},
        }


@dataclass
class SubregionResult:
    """What :func:`femoral_subregions` returns.

    Attributes:
        labels: the new label map (same shape and dtype as the input): femoral cartilage replaced
            by 11-15, every other voxel unchanged.
        geometry: the planes, side and volumes used (:class:`SubregionGeometry`).
    """

    labels: np.ndarray
    geometry: SubregionGeometry

    @property
    def side(self) -> str:
        return self.geometry.side

    def to_dict(self) -> dict[str, Any]:
        """The geometry record, JSON-ready (the label map is not included)."""
        return self.geometry.to_dict()


def femoral_subregions(
    labels: np.ndarray,
    affine: np.ndarray,
    *,
    side: Side | None = None,
    frame: Literal["image", "scanner", "tibia"] = "image",
    wb_fraction: float = WB_FRACTION,
    superior_ratio: float = SUPERIOR_RATIO,
) -> SubregionResult:
    """Split the femoral cartilage of a knee label map into subregions 11-15 (see the module doc).

    Args:
        labels: 3-D integer label map in the workbench table (values 1-9; existing subregions
            11-15 count as femoral cartilage and are derived again).
        affine: 4x4 voxel-to-RAS+ matrix of ``labels`` (any voxel order or orientation).
        side: ``"right"``, ``"left"`` or None to detect it from the tibial cartilage.
        frame: ``"image"`` (the voxel axes closest to x and z, as the original), ``"scanner"``
            (the RAS axes) or ``"tibia"`` (the medial/lateral axis through the tibial cartilage
            centroids, turned about superior).
        wb_fraction: share of the notch-to-posterior-end distance that is weight-bearing (0-1).
        superior_ratio: height cut in the weight-bearing band, 0 = the bin's mean cartilage
            height, 1 = the top of the femoral cartilage.

    Returns:
        :class:`SubregionResult` with the new label map and the geometry used.

    Raises:
        InvalidFormat: ``labels``/``affine`` unusable, femoral cartilage or one of the tibial
            cartilages missing, or the notch not found.
        ConfigError: a bad option, or ``side`` contradicting the tibial cartilage labels.

    Differences from the original pipeline:

    - newer pymskt releases register the femur (similarity transform) to their reference right
      knee and split in that frame; here the frame comes from the image (or scanner, or tibia)
      axes, with no reference data and no registration (about 98 % of the voxels agree on the
      mskt DESS map, 100 % on the reference knee itself);
    - the original also re-labels the tibial cartilage medial/lateral at the tibia's centroid;
      here every voxel other than femoral cartilage is left as it was.
    """
    labels = np.asarray(labels)
    affine = _check_inputs(labels, affine)
    if side not in (None, "right", "left"):
        raise ConfigError(f"side must be 'right', 'left' or None, got {side!r}")
    if frame not in FRAMES:
        raise ConfigError(f"frame must be one of {list(FRAMES)}, got {frame!r}")
    if not _number_in(wb_fraction, 0.0, 1.0, closed=False):
        raise ConfigError(f"wb_fraction must lie between 0 and 1, got {wb_fraction!r}")
    if not _number_in(superior_ratio, 0.0, 1.0, closed=True):
        raise ConfigError(f"superior_ratio must lie in [0, 1], got {superior_ratio!r}")
    wb_fraction, superior_ratio = float(wb_fraction), float(superior_ratio)

    # ---- voxels of the structures used (flat indices; labels may be any integer dtype)
    flat = labels.reshape(-1)
    fem_mask = (flat == L.FEM_CART) | ((flat >= min(SUBREGION_VALUES)) & (flat <= max(SUBREGION_VALUES)))
    fem_idx = np.flatnonzero(fem_mask)
    if fem_idx.size == 0:
        raise InvalidFormat("The label map has no femoral cartilage (label 2); cannot derive its subregions",
                            _MISSING_HINT)
    med_idx = np.flatnonzero(flat == L.MED_TIB_CART)
    lat_idx = np.flatnonzero(flat == L.LAT_TIB_CART)
    missing = [name for name, idx in (("medial tibial cartilage (label 3)", med_idx),
                                      ("lateral tibial cartilage (label 4)", lat_idx)) if idx.size == 0]
    if missing:
        raise InvalidFormat(f"The label map has no {' and no '.join(missing)}; it is needed to tell medial from "
                            "lateral femoral cartilage", _MISSING_HINT)

    med_c = _world(_centroid_index(med_idx, labels.shape), affine)
    lat_c = _world(_centroid_index(lat_idx, labels.shape), affine)

    # ---- side (RAS+: x grows towards the patient's right; the lateral side of a right knee is +x)
    dx = float(lat_c[0] - med_c[0])
    if abs(dx) < 1.0:
        raise InvalidFormat(
            f"Medial and lateral tibial cartilage centroids are {abs(dx):.2f} mm apart along x; cannot tell the "
            "knee's side or its medial direction",
            "Check the medial (3) / lateral (4) tibial cartilage labels and the affine.")
    detected: Side = "right" if dx > 0 else "left"
    if side is not None and side != detected:
        raise ConfigError(
            f"side={side!r} was given, but the medial tibial cartilage lies at "
            f"{'smaller' if dx > 0 else 'larger'} x than the lateral, as in a {detected} knee",
            "Check the side option, or swap medial (3) and lateral (4) tibial cartilage in the label map.")
    knee_side: Side = side or detected

    # ---- knee frame (rows: u towards the patient's right, a anterior, s superior)
    if frame == "image":
        u_axis, s_axis = _image_axes(affine)
    else:
        s_axis = np.array([0.0, 0.0, 1.0])
        if frame == "tibia":
            v = np.array([lat_c[0] - med_c[0], lat_c[1] - med_c[1], 0.0])
            u_axis = v / np.linalg.norm(v) * np.sign(v[0])  # points to +x-ish for either side
        else:
            u_axis = np.array([1.0, 0.0, 0.0])
    a_axis = np.cross(s_axis, u_axis)
    rows = np.stack([u_axis, a_axis, s_axis])
    medial_sign = -1.0 if knee_side == "right" else 1.0  # along u

    # frame coordinates of voxel (i, j, k): M @ ijk + t
    m = rows @ affine[:3, :3]
    t = rows @ affine[:3, 3]
    bins = np.abs(m).sum(axis=1)  # each voxel's projected extent on u, a, s
    if np.any(bins <= 0):
        raise InvalidFormat("The affine is degenerate (a zero voxel extent)")

    ijk = np.stack(np.unravel_index(fem_idx, labels.shape)).astype(np.float64)  # (3, N)
    coords = m @ ijk + t[:, None]
    origin = coords.min(axis=1)
    b = np.floor((coords - origin[:, None]) / bins[:, None] + 0.5).astype(np.int64)  # integer bins
    bu, ba, bs = b
    nu, na = int(bu.max()) + 1, int(ba.max()) + 1

    # ---- trochlear notch: the column (along u) whose posterior end is furthest anterior
    post_end = np.full(nu, na, np.int64)
    np.minimum.at(post_end, bu, ba)
    post_end[post_end == na] = -1  # columns without cartilage never win
    tib_u = sorted(float((rows[0] @ c) - origin[0]) / bins[0] for c in (med_c, lat_c))
    lo, hi = max(0, int(np.ceil(tib_u[0]))), min(nu - 1, int(np.floor(tib_u[1])))
    window = post_end[lo:hi + 1] if hi >= lo else post_end[:0]
    if window.size == 0 or window.max() < 0:
        raise InvalidFormat(
            "No femoral cartilage lies between the medial and lateral tibial cartilage centroids; cannot find "
            "the trochlear notch", "Check the femoral cartilage segmentation and that the labels show one knee.")
    best = int(window.max())
    notch_u = lo + _centre_of_best_run(window == best, (hi - lo) / 2.0)  # bin units, may be half-integer
    n_wb = int(np.floor(wb_fraction * best + 0.5))
    post_bound = best - n_wb  # bins < post_bound are posterior; [post_bound, best) weight-bearing

    # ---- height cut inside the weight-bearing band (per a bin)
    count = np.bincount(ba, minlength=na)
    sum_s = np.bincount(ba, weights=bs.astype(np.float64), minlength=na)
    mean_s = sum_s / np.maximum(count, 1)
    top = int(bs.max())
    cut = (1.0 - superior_ratio) * mean_s + superior_ratio * top
    high = bs > cut[ba] + 1e-6  # tolerance: exact ties stay below, whatever the voxel order

    anterior = ba >= best
    posterior = (ba < post_bound) | (~anterior & high)
    du = bu - notch_u
    medial = du * medial_sign > 0

    region = np.where(anterior, L.FEM_CART_ANT,
                      np.where(posterior,
                               np.where(medial, L.FEM_CART_MPOST, L.FEM_CART_LPOST),
                               np.where(medial, L.FEM_CART_MWB, L.FEM_CART_LWB)))
    out = labels.copy()
    out.reshape(-1)[fem_idx] = region.astype(out.dtype)

    # ---- record
    voxel_ml = abs(float(np.linalg.det(affine[:3, :3]))) * 1e-3
    counts = {lab.key: int(np.count_nonzero(region == lab.value)) for lab in L.FEMORAL_SUBREGIONS}
    total = max(1, fem_idx.size)
    geometry = SubregionGeometry(
        side=knee_side,
        side_given=side is not None,
        frame=frame,
        ml_axis=u_axis.tolist(), ap_axis=a_axis.tolist(), si_axis=s_axis.tolist(),
        medial_direction=(medial_sign * u_axis + 0.0).tolist(),  # no -0.0
        bin_mm=bins.tolist(),
        notch_ml_mm=float(origin[0] + notch_u * bins[0]),
        notch_search_mm=(float(origin[0] + tib_u[0] * bins[0]), float(origin[0] + tib_u[1] * bins[0])),
        anterior_boundary_mm=float(origin[1] + (best - 0.5) * bins[1]),
        posterior_boundary_mm=float(origin[1] + (post_bound - 0.5) * bins[1]),
        posterior_end_mm=float(origin[1] - 0.5 * bins[1]),
        top_mm=float(origin[2] + top * bins[2]),
        wb_fraction=float(wb_fraction),
        superior_ratio=float(superior_ratio),
        med_tib_centroid_mm=med_c.tolist(),
        lat_tib_centroid_mm=lat_c.tolist(),
        volumes_ml={k: v * voxel_ml for k, v in counts.items()},
        fractions={k: v / total for k, v in counts.items()},
    )
    return SubregionResult(out, geometry)


# --------------------------------------------------------------------------------------------------
# helpers


def _check_inputs(labels: np.ndarray, affine: np.ndarray) -> np.ndarray:
    if labels.ndim != 3:
        raise InvalidFormat(f"The label map has {labels.ndim} dimensions; a 3-D label map is needed")
    if labels.dtype.kind not in "iu":
        raise InvalidFormat(f"The label map has dtype {labels.dtype}; an integer label map is needed",
                            "Round and cast it to an integer type (e.g. uint8) first.")
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise InvalidFormat(f"The affine must be a finite 4x4 matrix, got shape {affine.shape}")
    if abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise InvalidFormat("The affine is singular; the label map has no usable geometry")
    return affine


def _number_in(value: Any, low: float, high: float, *, closed: bool) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return False
    value = float(value)
    return (low <= value <= high) if closed else (low < value < high)


def _image_axes(affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors (RAS) of the voxel axes closest to +x and +z, made orthogonal (z kept)."""
    cols = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    k_s = int(np.argmax(np.abs(cols[2])))
    rest = [k for k in range(3) if k != k_s]
    k_u = rest[int(np.argmax(np.abs(cols[0, rest])))]
    s_axis = cols[:, k_s] * np.sign(cols[2, k_s])
    u_axis = cols[:, k_u] - (cols[:, k_u] @ s_axis) * s_axis
    u_axis = u_axis / np.linalg.norm(u_axis)
    return u_axis * np.sign(u_axis[0]), s_axis


def _centroid_index(flat_idx: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    return np.array([axis.mean() for axis in np.unravel_index(flat_idx, shape)], np.float64)


def _world(ijk: np.ndarray, affine: np.ndarray) -> np.ndarray:
    return affine[:3, :3] @ ijk + affine[:3, 3]


def _centre_of_best_run(mask: np.ndarray, centre: float) -> float:
    """Centre (in index units) of the run of True in ``mask`` nearest to ``centre`` (first on a tie)."""
    edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1) - 1
    mids = (starts + ends) / 2.0
    return float(mids[int(np.argmin(np.abs(mids - centre)))])


def _r(value, digits: int = 4):
    if isinstance(value, (list, tuple, np.ndarray)):
        return [round(float(v), digits) for v in value]
    return round(float(value), digits)
