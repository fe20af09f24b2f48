"""Synthetic DESS-like knee MRI with exact ground truth, made from real knee label maps.

The two real label maps of the ``mskt`` 0.1.22 sdist (see
:mod:`workbench.data.samples`) hold bones, cartilage and (one of them) menisci
of a right knee, but no soft tissue.  :func:`generate_case` turns one of them
into an image that looks like a sagittal 3-D DESS (double echo steady state,
water excitation) acquisition, plus the ground-truth labels of the workbench
table (:mod:`workbench.data.labels`) on exactly the same grid:

1. **Anatomy.**  The source map is remapped to the workbench table (fibula
   kept as bone for rendering, labelled background) and cropped to the knee.
   A soft-tissue envelope is synthesised around the bones from a distance map
   (thin anteriorly, thick posteriorly and around the thigh and calf), with a
   subcutaneous fat layer, muscle posteriorly / above / below the joint and
   fat (Hoffa's pad, capsule) in front and at the sides, the two gastrocnemius
   heads, the popliteal vessels, patellar and quadriceps tendons, a
   suprapatellar recess and a patchy thin layer of joint fluid around
   cartilage and menisci.  Bones get a dark cortical rim, and continue as
   straight shafts past the ends of the label map.
2. **Geometry.**  One composed map takes every point of the output grid to the
   source: a smooth random elastic displacement (Gaussian bumps on a control
   grid), the inverse of a random affine about the knee centre (rotation,
   isotropic scale, translation) and an optional left/right mirror.  Tissue
   classes *and* labels are looked up through this one map, so the image and
   the ground truth can never disagree.  A mirrored case is a left knee: the
   anatomy is mirrored through the scanner's mid-sagittal plane (x -> -x), so
   it lies at negative x as a left knee does, and medial/lateral labels keep
   their (anatomical) meaning.
3. **Partial volume.**  Everything is rendered on a supersampled copy of the
   output grid (``supersample`` sub-voxels per voxel and axis), with
   per-tissue mean intensity and texture (fine isotropic texture in marrow,
   fibre-like texture along the limb in muscle); the image is the block mean
   (the voxel integrates its sub-voxels) and the labels the block majority.
4. **Acquisition.**  A smooth multiplicative bias field and Rician noise
   (magnitude of complex Gaussian noise, ``sigma = cartilage mean / snr``) are
   applied on the output grid.  With ``echo_times_ms`` the case is multi-echo:
   echo ``e`` is ``S0 * exp(-TE_e / T2)`` per sub-voxel with a T2 per tissue
   (and a mild spatial variation), and the case carries the T2 map.

:func:`write_case` writes the DICOM series (:func:`workbench.io.dicom_write.write_dicom_series`),
NIfTI image and labels and a JSON record of every parameter.
"""

from __future__ import annotations

import datetime as _dt
import functools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from workbench.data import labels as L
from workbench.errors import ConfigError, InvalidFormat
from workbench.io.volume import Volume

GENERATOR_VERSION = "1.0"

#: Tissue names used by :attr:`SyntheticKneeConfig.intensities` and :attr:`SyntheticKneeConfig.t2_ms`.
TISSUES: tuple[str, ...] = (
    "air", "fat", "muscle", "fluid", "vessel", "tendon", "cortical_bone", "bone_marrow", "meniscus",
    "femoral_cartilage", "tibial_cartilage", "patellar_cartilage",
)

#: Mean-intensity ranges (arbitrary units) of a DESS-like water-excitation image; one mean per tissue is
#: drawn uniformly from its range for each case.  Fluid and cartilage bright, marrow intermediate,
#: muscle darker, fat suppressed, menisci/tendons/cortex dark.
DEFAULT_INTENSITIES: dict[str, tuple[float, float]] = {
    "air": (0.0, 0.0),
    "fat": (70.0, 120.0),
    "muscle": (150.0, 210.0),
    "fluid": (850.0, 1000.0),
    "vessel": (350.0, 550.0),
    "tendon": (25.0, 50.0),
    "cortical_bone": (15.0, 35.0),
    "bone_marrow": (240.0, 310.0),
    "meniscus": (40.0, 80.0),
    "femoral_cartilage": (560.0, 660.0),
    "tibial_cartilage": (540.0, 640.0),
    "patellar_cartilage": (580.0, 680.0),
}

#: T2 (ms) per tissue at 3 T used for multi-echo cases (literature-typical values).
DEFAULT_T2_MS: dict[str, float] = {
    "air": 1.0,
    "fat": 80.0,
    "muscle": 35.0,
    "fluid": 400.0,
    "vessel": 150.0,
    "tendon": 5.0,
    "cortical_bone": 1.0,
    "bone_marrow": 50.0,
    "meniscus": 12.0,
    "femoral_cartilage": 40.0,
    "tibial_cartilage": 35.0,
    "patellar_cartilage": 42.0,
}

#: Relative texture amplitude (standard deviation of the multiplicative texture) per tissue.
TEXTURE_STD: dict[str, float] = {
    "air": 0.0, "fat": 0.08, "muscle": 0.10, "fluid": 0.02, "vessel": 0.05, "tendon": 0.10, "cortical_bone": 0.10,
    "bone_marrow": 0.12, "meniscus": 0.10, "femoral_cartilage": 0.05, "tibial_cartilage": 0.05,
    "patellar_cartilage": 0.05,
}

#: Resolution presets: output matrix (columns, rows, slices) and voxel size (mm).
PRESETS: dict[str, dict[str, Any]] = {
    "small": {"shape": (128, 128, 64), "spacing_mm": (1.0, 1.0, 1.5)},
    "standard": {"shape": (256, 256, 128), "spacing_mm": (0.6, 0.6, 1.0)},
}

#: Label maps the generator can start from (names of :func:`workbench.data.samples.label_map_paths`).
SOURCES: tuple[str, ...] = ("sag_3d_dess", "right_knee_example")
#: Source values rendered as bone although they have no workbench label (mapped to background).
_EXTRA_BONES: dict[str, tuple[int, ...]] = {"sag_3d_dess": (8,), "right_knee_example": ()}
#: Both real maps are right knees.
_SOURCE_SIDE = "right"
_LICENCE_NOTE = ("Derived from a label map in the mskt 0.1.22 source distribution on PyPI (MIT licence, "
                 "https://pypi.org/project/mskt/); the image is synthetic. Not for clinical use.")

# internal tissue classes of the render grid: 0 air, 1-9 workbench labels, then:
_FIBULA, _FAT, _MUSCLE, _FLUID, _TENDON, _CORTEX, _VESSEL = 10, 11, 12, 13, 14, 15, 16
_N_CLASSES = 17
_CLASS_TISSUE: tuple[str, ...] = (
    "air", "patellar_cartilage", "femoral_cartilage", "tibial_cartilage", "tibial_cartilage", "meniscus",
    "meniscus", "bone_marrow", "bone_marrow", "bone_marrow", "bone_marrow", "fat", "muscle", "fluid", "tendon",
    "cortical_bone", "vessel",
)
_BONE_CLASSES = (L.FEMUR, L.TIBIA, L.PATELLA, _FIBULA)
#: tie-break priority of the label majority vote (thin structures win ties).
_LABEL_PRIORITY = np.array([0, 9, 8, 7, 6, 5, 4, 1, 2, 3], np.float32)

#: Frames (columns = RAS unit vectors of voxel axes i, j, k); k follows the DICOM slice normal.
_FRAMES: dict[str, np.ndarray] = {
    # columns run anterior->posterior, rows superior->inferior, slices towards the right
    "sagittal": np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]]),
    # columns run right->left, rows superior->inferior, slices towards posterior
    "coronal": np.array([[-1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, -1.0, 0.0]]),
    # columns run right->left, rows anterior->posterior, slices towards superior
    "axial": np.array([[-1.0, 0.0, 0.0], [0.0, -1.0, 0.0], [0.0, 0.0, 1.0]]),
}
_MODEL_SPACING_MM = 1.5
_MODEL_MARGIN_MM = 60.0
#: Bones continue along the limb past the label map's ends as copies of the slice this far inside the edge.
_SI_EDGE_MM = 3.0


class SyntheticKneeConfig(BaseModel):
    """Everything that defines a synthetic knee case; the same config and seed give the same case.

    Build one directly or from a resolution preset with :meth:`from_preset`.
    Ranges are ``(low, high)`` pairs from which one value per case is drawn.
    Invalid values raise :class:`~workbench.errors.ConfigError`.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: Literal["sag_3d_dess", "right_knee_example"] = Field(
        "sag_3d_dess", description="Real label map to start from: sag_3d_dess (with menisci) or right_knee_example.")
    preset: str | None = Field(None, description="Name of the preset the config came from (informational).")
    shape: tuple[int, int, int] = Field(
        (128, 128, 64), description="Output matrix (columns, rows, slices) = voxel axes (i, j, k).")
    spacing_mm: tuple[float, float, float] = Field(
        (1.0, 1.0, 1.5), description="Output voxel size (mm) along i, j, k (in-plane, in-plane, slice).")
    orientation: Literal["sagittal", "coronal", "axial"] = Field(
        "sagittal", description="Slice orientation of the output grid (DESS knee scans are sagittal).")
    supersample: tuple[int, int, int] | None = Field(
        None, description="Sub-voxels per output voxel and axis for partial volume; None: from render_spacing_mm.")
    render_spacing_mm: float = Field(
        0.75, gt=0, description="With supersample=None: largest sub-voxel size (mm) used to pick the factors.")
    seed: int = Field(0, ge=0, description="Random seed; every random choice of the case derives from it.")
    snr: float | None = Field(
        25.0, gt=0, description="Mean femoral cartilage signal / noise sigma of the first echo; None: no noise.")
    bias_field: float = Field(
        0.2, ge=0, lt=1, description="Peak relative deviation of the smooth multiplicative bias field (0: none).")
    bias_smoothness_mm: float = Field(80.0, gt=0, description="Length scale (mm) of the bias field.")
    elastic_mm: float = Field(
        2.0, ge=0, description="Largest displacement (mm) of the smooth elastic deformation (0: none).")
    elastic_smoothness_mm: float = Field(
        30.0, gt=0, description="Length scale (mm) of the elastic deformation; at least 2 x elastic_mm.")
    rotation_deg: float = Field(5.0, ge=0, le=45, description="Random rotation: up to +-this many degrees per axis.")
    scale: float = Field(0.05, ge=0, lt=0.5, description="Random isotropic scale drawn from [1-scale, 1+scale].")
    translation_mm: float = Field(5.0, ge=0, description="Random translation: up to +-this many mm per axis.")
    flip_probability: float = Field(
        0.0, ge=0, le=1, description="Probability of mirroring the right knee into a left knee.")
    echo_times_ms: tuple[float, ...] = Field(
        (), description="Echo times (ms, ascending) of a multi-echo case (S0*exp(-TE/T2)); empty: single echo.")
    t2_ms: dict[str, float] = Field(
        default_factory=lambda: dict(DEFAULT_T2_MS), description="T2 (ms) per tissue for multi-echo cases.")
    t2_variation: float = Field(
        0.1, ge=0, lt=1, description="Relative spatial variation of T2 within a tissue (multi-echo cases).")
    intensities: dict[str, tuple[float, float]] = Field(
        default_factory=lambda: dict(DEFAULT_INTENSITIES),
        description="Mean-intensity range per tissue (S0 of multi-echo cases); missing tissues use the defaults.")
    texture: float = Field(1.0, ge=0, description="Scale of the per-tissue texture amplitudes (0: flat tissues).")
    joint_fluid: float = Field(
        0.5, ge=0, le=1, description="Amount of joint fluid: coverage of the fluid layer and recess size (0-1).")
    envelope_anterior_mm: tuple[float, float] = Field(
        (6.0, 12.0), description="Range of the soft-tissue thickness in front of the knee (mm).")
    envelope_posterior_mm: tuple[float, float] = Field(
        (30.0, 45.0), description="Range of the soft-tissue thickness behind the knee (mm).")
    fat_thickness_mm: tuple[float, float] = Field(
        (3.0, 9.0), description="Range of the subcutaneous fat thickness (mm).")
    cortex_mm: float = Field(1.0, ge=0, description="Thickness (mm) of the dark cortical rim of the bones.")
    repetition_time_ms: float = Field(16.3, gt=0, description="RepetitionTime written to DICOM.")
    echo_time_ms: float = Field(4.7, gt=0, description="EchoTime written to DICOM for single-echo cases.")
    flip_angle_deg: float = Field(25.0, gt=0, description="FlipAngle written to DICOM.")
    field_strength_t: float = Field(3.0, gt=0, description="MagneticFieldStrength written to DICOM.")

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as exc:
            first = exc.errors()[0]
            option = ".".join(str(p) for p in first["loc"]) or "config"
            if first["type"] == "extra_forbidden":
                message = f"Unknown synthetic knee option {option!r}"
            else:
                message = f"Synthetic knee option {option}: {first['msg']}"
            raise ConfigError(message, "See the fields of workbench.data.synthetic_knee.SyntheticKneeConfig.") \
                from None

    @field_validator("shape")
    @classmethod
    def _shape(cls, value: tuple[int, int, int]) -> tuple[int, int, int]:
        if min(value) < 2 or max(value) > 2048:
            raise ValueError("each size must be between 2 and 2048")
        return value

    @field_validator("spacing_mm")
    @classmethod
    def _spacing(cls, value: tuple[float, float, float]) -> tuple[float, float, float]:
        if min(value) <= 0 or max(value) > 10:
            raise ValueError("voxel sizes must be in (0, 10] mm")
        return value

    @field_validator("supersample")
    @classmethod
    def _supersample(cls, value):
        if value is not None and (min(value) < 1 or max(value) > 8):
            raise ValueError("supersample factors must be between 1 and 8")
        return value

    @field_validator("echo_times_ms")
    @classmethod
    def _echo_times(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if any(t <= 0 for t in value) or any(b <= a for a, b in zip(value, value[1:])):
            raise ValueError("echo times must be positive and ascending")
        return value

    @field_validator("t2_ms")
    @classmethod
    def _t2(cls, value: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(value) - set(TISSUES))
        if unknown:
            raise ValueError(f"unknown tissues {unknown}; known: {list(TISSUES)}")
        if any(v <= 0 for v in value.values()):
            raise ValueError("T2 values must be positive")
        return {**DEFAULT_T2_MS, **value}

    @field_validator("intensities")
    @classmethod
    def _intensities(cls, value: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
        unknown = sorted(set(value) - set(TISSUES))
        if unknown:
            raise ValueError(f"unknown tissues {unknown}; known: {list(TISSUES)}")
        for name, (lo, hi) in value.items():
            if lo < 0 or hi < lo:
                raise ValueError(f"{name}: need 0 <= low <= high, got ({lo}, {hi})")
        return {**DEFAULT_INTENSITIES, **value}

    @field_validator("envelope_anterior_mm", "envelope_posterior_mm", "fat_thickness_mm")
    @classmethod
    def _range(cls, value: tuple[float, float]) -> tuple[float, float]:
        if value[0] < 0 or value[1] < value[0]:
            raise ValueError("need 0 <= low <= high")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "SyntheticKneeConfig":
        if self.elastic_mm > 0.5 * self.elastic_smoothness_mm:
            raise ValueError(f"elastic_mm={self.elastic_mm:g} exceeds half of elastic_smoothness_mm="
                             f"{self.elastic_smoothness_mm:g}; the deformation could fold")
        return self

    @classmethod
    def from_preset(cls, preset: str = "small", *, seed: int = 0, source: str | None = None,
                    flip: bool | None = None, n_echoes: int = 0, **overrides: Any) -> "SyntheticKneeConfig":
        """A config for a resolution preset (``"small"`` or ``"standard"``).

        Args:
            preset: ``"small"`` (128x128x64 at 1.0x1.0x1.5 mm, seconds to make) or
                ``"standard"`` (256x256x128 at 0.6x0.6x1.0 mm).
            seed: random seed.
            source: label map name (default ``"sag_3d_dess"``).
            flip: True for a left knee, False for a right knee, None to keep ``flip_probability``.
            n_echoes: 0 for a single DESS-like image; N > 0 for a multi-echo spin-echo-like
                series with echo times 6.3, 12.6, ... ms (as the real MESE sample).
            overrides: any other field.
        """
        if preset not in PRESETS:
            raise ConfigError(f"Unknown synthetic knee preset {preset!r}", f"Use one of {sorted(PRESETS)}.")
        values: dict[str, Any] = dict(PRESETS[preset], preset=preset, seed=seed)
        if source is not None:
            values["source"] = source
        if flip is not None:
            values["flip_probability"] = 1.0 if flip else 0.0
        if n_echoes < 0:
            raise ConfigError(f"n_echoes must be >= 0, got {n_echoes}")
        if n_echoes:
            values.update(echo_times_ms=tuple(round(6.3 * (e + 1), 3) for e in range(n_echoes)),
                          repetition_time_ms=2000.0, flip_angle_deg=90.0)
        values.update(overrides)
        return cls(**values)

    def supersample_factors(self) -> tuple[int, int, int]:
        """The sub-voxel factors actually used (``supersample`` or derived from ``render_spacing_mm``)."""
        if self.supersample is not None:
            return tuple(int(s) for s in self.supersample)  # type: ignore[return-value]
        return tuple(max(1, math.ceil(s / self.render_spacing_mm - 1e-6)) for s in self.spacing_mm)  # type: ignore


@dataclass
class SyntheticCase:
    """One generated case.

    Attributes:
        image: the MR image (float32, arbitrary units); for multi-echo cases ``echoes``
            and ``echo_times_ms`` are set and ``data`` is the first echo.
        labels: ground truth (uint8, workbench label table) on the image's grid (same affine).
        side: ``"right"`` or ``"left"`` (the knee shown).
        source: name of the source label map.
        config: the config that made the case.
        params: every value drawn for the case and the transform (JSON-ready).
        t2_map: for multi-echo cases, the ground-truth T2 (ms, block mean of the sub-voxels; 0 in air).
    """

    image: Volume
    labels: Volume
    side: str
    source: str
    config: SyntheticKneeConfig
    params: dict[str, Any] = field(default_factory=dict)
    t2_map: Volume | None = None


# --------------------------------------------------------------------------------------------------
# source label maps


@dataclass
class _Source:
    name: str
    filename: str
    side: str                    # "right" or "left": the knee the label map shows
    classes: np.ndarray          # uint8 cropped map: 0 background, 1-9 workbench labels, 10 extra bone
    affine: np.ndarray           # voxel -> RAS of ``classes``
    inverse: np.ndarray          # RAS -> voxel
    si_axis: int                 # voxel axis along the limb (clamped: bones continue past the map's edge)
    si_range: tuple[int, int]    # clamp range on that axis (a few mm inside the edge: edge slices are ragged)
    distance: np.ndarray         # float32 mm outside the anatomy, on an axis-aligned model grid
    distance_inverse: np.ndarray  # RAS -> model voxel
    landmarks: dict[str, np.ndarray]
    source_values: list[int]


def read_nrrd_labels(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a NRRD label map; return ``(array, affine)`` with the affine in RAS+ (LPS headers converted).

    Raises :class:`~workbench.errors.InvalidFormat` for unreadable files, non-3-D
    data or a space other than LPS/RAS.
    """
    import nrrd

    path = Path(path)
    try:
        data, header = nrrd.read(str(path))
    except Exception as exc:  # pynrrd raises several types
        raise InvalidFormat(f"Cannot read NRRD file {path.name}: {type(exc).__name__}: {exc}") from None
    if data.ndim != 3:
        raise InvalidFormat(f"{path.name} has {data.ndim} dimensions; a 3-D label map is needed")
    directions = np.asarray(header.get("space directions"), dtype=float)
    if directions.shape != (3, 3) or not np.all(np.isfinite(directions)):
        raise InvalidFormat(f"{path.name} has no usable 'space directions'")
    origin = np.asarray(header.get("space origin", np.zeros(3)), dtype=float)
    space = str(header.get("space", "left-posterior-superior")).lower()
    affine = np.eye(4)
    affine[:3, :3] = directions.T  # pynrrd: one row per axis
    affine[:3, 3] = origin
    if space in ("left-posterior-superior", "lps"):
        affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    elif space not in ("right-anterior-superior", "ras"):
        raise InvalidFormat(f"{path.name} uses space {space!r}; only LPS and RAS are supported")
    return data, affine


def _source_path(name: str) -> Path:
    from workbench.data.samples import label_map_paths

    return label_map_paths(fetch=True)[name]


def _prepared_source(name: str) -> _Source:
    path = _source_path(name)
    return _prepare_source(name, str(path), path.stat().st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _prepare_source(name: str, path_str: str, _mtime: int) -> _Source:
    path = Path(path_str)
    data, affine = read_nrrd_labels(path)
    classes = L.remap_labels(data, L.SOURCE_MAPPINGS[name], source=path.name)
    for value in _EXTRA_BONES.get(name, ()):
        classes[data == value] = _FIBULA
    present = sorted(int(v) for v in np.unique(data) if v != 0)
    return _build_source(name, path.name, _SOURCE_SIDE, classes, affine, present)


def _custom_source(label_map: Volume, mapping, side: str) -> _Source:
    data = np.asarray(label_map.data)
    if mapping is None:
        L.check_label_values(data, source="label_map", allowed=L.ALL_LABEL_VALUES)
        classes = data.astype(np.uint8)
    else:
        classes = L.remap_labels(data, mapping, source="label_map")
    classes[classes > L.PATELLA] = L.FEM_CART  # femoral subregions count as femoral cartilage
    present = sorted(int(v) for v in np.unique(data) if v != 0)
    return _build_source("custom", "label_map", side, classes, np.asarray(label_map.affine, float), present)


def _build_source(name: str, filename: str, side: str, classes: np.ndarray, affine: np.ndarray,
                  present: list[int]) -> _Source:
    from scipy import ndimage

    # crop to the knee
    nz = np.nonzero(classes.any(axis=(1, 2)))[0], np.nonzero(classes.any(axis=(0, 2)))[0], \
        np.nonzero(classes.any(axis=(0, 1)))[0]
    if any(len(a) == 0 for a in nz):
        raise InvalidFormat(f"{filename} holds no labels")
    lo = [max(int(a[0]) - 2, 0) for a in nz]
    hi = [min(int(a[-1]) + 3, n) for a, n in zip(nz, classes.shape)]
    classes = np.ascontiguousarray(classes[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]])
    affine = affine.copy()
    affine[:3, 3] = affine[:3, :3] @ np.asarray(lo, float) + affine[:3, 3]
    inverse = np.linalg.inv(affine)
    directions = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    si_axis = int(np.argmax(np.abs(directions[2])))
    margin = int(math.ceil(_SI_EDGE_MM / float(np.linalg.norm(affine[:3, si_axis]))))
    n_si = classes.shape[si_axis]
    si_range = (min(margin, n_si // 2), max(n_si - 1 - margin, n_si // 2))

    landmarks = _landmarks(classes, affine, filename, side)

    # distance (mm) outside the anatomy on a coarse axis-aligned grid, for the soft-tissue envelope
    corners = np.array([[i, j, k, 1.0] for i in (0, classes.shape[0] - 1) for j in (0, classes.shape[1] - 1)
                        for k in (0, classes.shape[2] - 1)])
    world = (affine @ corners.T).T[:, :3]
    wmin, wmax = world.min(axis=0), world.max(axis=0)
    wmin[:2] -= _MODEL_MARGIN_MM
    wmax[:2] += _MODEL_MARGIN_MM
    shape = tuple(int(math.ceil((b - a) / _MODEL_SPACING_MM)) + 1 for a, b in zip(wmin, wmax))
    model_affine = np.diag([_MODEL_SPACING_MM] * 3 + [1.0])
    model_affine[:3, 3] = wmin
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij"), axis=0)
    pts = np.tensordot((inverse @ model_affine)[:3, :3].astype(np.float32), grid, axes=1)
    pts += (inverse @ model_affine)[:3, 3].astype(np.float32)[:, None, None, None]
    np.clip(pts[si_axis], si_range[0], si_range[1], out=pts[si_axis])
    anatomy = ndimage.map_coordinates((classes > 0).astype(np.uint8), pts, order=0, mode="constant", cval=0)
    distance = ndimage.distance_transform_edt(anatomy == 0, sampling=_MODEL_SPACING_MM).astype(np.float32)
    return _Source(name, filename, side, classes, affine, inverse, si_axis, si_range, distance,
                   np.linalg.inv(model_affine), landmarks, present)


def _landmarks(classes: np.ndarray, affine: np.ndarray, filename: str, side: str) -> dict[str, np.ndarray]:
    """Anatomical points (RAS mm) that place the synthetic soft tissue."""

    def points(values) -> np.ndarray:
        idx = np.argwhere(np.isin(classes, values))
        if len(idx) == 0:
            raise InvalidFormat(f"{filename} lacks labels {list(values)} the synthetic knee needs")
        return idx @ affine[:3, :3].T + affine[:3, 3]

    cart = points(L.CARTILAGE_VALUES)
    patella = points([L.PATELLA])
    tibial_cart = points([L.MED_TIB_CART, L.LAT_TIB_CART])
    tibia = points([L.TIBIA])
    femur = points([L.FEMUR])
    center = cart.mean(axis=0)
    z = patella[:, 2]
    superior = patella[z >= z.max() - 3.0]
    pat_sup = superior[superior[:, 1] >= superior[:, 1].max() - 3.0].mean(axis=0)  # anterior edge of the base
    pat_inf = patella[z <= z.min() + 3.0].mean(axis=0)
    pat_center = patella.mean(axis=0)
    plateau_z = float(tibial_cart[:, 2].mean())
    band = tibia[(tibia[:, 2] > plateau_z - 40.0) & (tibia[:, 2] < plateau_z - 20.0)]
    if len(band):
        tuberosity = band[band[:, 1] >= band[:, 1].max() - 2.0].mean(axis=0)
    else:  # map cut above the tuberosity: a typical patellar tendon
        tuberosity = pat_inf + np.array([0.0, -5.0, -40.0])
    recess_z = pat_sup[2] + 12.0
    near = femur[(np.abs(femur[:, 2] - recess_z) < 3.0) & (np.abs(femur[:, 0] - pat_center[0]) < 15.0)]
    femur_front = float(near[:, 1].max()) if len(near) else float(pat_center[1] - 10.0)
    # posterior femoral condyles (medial is towards -x in a right knee, +x in a left knee)
    rows = femur[(femur[:, 2] > center[2] - 5.0) & (femur[:, 2] < center[2] + 15.0)]
    if len(rows) == 0:
        rows = femur
    towards_minus_x = rows[:, 0] < center[0]
    medial = towards_minus_x if side == "right" else ~towards_minus_x
    condyles = {}
    for name, sel in (("medial", medial), ("lateral", ~medial)):
        part = rows[sel] if sel.any() else rows
        condyles[name] = np.array([part[:, 0].mean(), part[:, 1].min(), center[2]])
    back = min(condyles["medial"][1], condyles["lateral"][1])
    tendon_start = pat_sup - np.array([0.0, 3.5, 0.0])
    return {
        "center": center,
        "patella_superior": tendon_start,
        "patella_inferior": pat_inf,
        "patella_center": pat_center,
        "tibial_tuberosity": tuberosity,
        "plateau_z": np.array([plateau_z]),
        "recess_center": np.array([pat_center[0], femur_front + 2.5, recess_z]),
        "quadriceps_end": tendon_start + np.array([0.0, -4.0, 50.0]),
        "condyle_medial_posterior": condyles["medial"],
        "condyle_lateral_posterior": condyles["lateral"],
        "popliteal_vessels": np.array([center[0] + 3.0, back - 14.0, center[2]]),
    }


# --------------------------------------------------------------------------------------------------
# smooth random fields


class _SmoothField:
    """A smooth random field: Gaussian bumps with random weights on a regular control grid.

    Evaluated on a rectilinear grid given by one coordinate array (mm) per axis,
    by separable matrix products, so any slab of the grid costs only its size.
    """

    def __init__(self, rng: np.random.Generator, axes_mm: list[np.ndarray], sigma_mm: float, components: int = 1):
        self.sigma = float(sigma_mm)
        step = self.sigma
        self.ctrl = [np.arange(a.min() - 2 * step, a.max() + 2 * step + step, step) for a in axes_mm]
        self.coef = rng.standard_normal((components,) + tuple(len(c) for c in self.ctrl)).astype(np.float32)
        self.weights = [self._w(a, c) for a, c in zip(axes_mm, self.ctrl)]
        # contract the first two axes once: (C, I, J, n_ctrl_k)
        self.inplane = np.einsum("cabd,ia,jb->cijd", self.coef, self.weights[0], self.weights[1], optimize=True)
        self.norm = 1.0

    def _w(self, x: np.ndarray, c: np.ndarray) -> np.ndarray:
        return np.exp(-0.5 * ((x[:, None] - c[None, :]) / self.sigma) ** 2).astype(np.float32)

    def slab(self, k0: int, k1: int, mirror_axis: int | None = None) -> np.ndarray:
        """Field values on axis-2 indices ``k0:k1`` (all of axes 0 and 1): ``(C, I, J, k1-k0)``.

        With ``mirror_axis`` the field is read mirrored along that grid axis
        (the value at index ``n-1-i`` instead of ``i``), as a left knee sees
        the field of the right knee it was mirrored from.
        """
        if mirror_axis == 2:
            n = self.weights[2].shape[0]
            out = np.matmul(self.inplane, self.weights[2][n - k1:n - k0][::-1].T)
        else:
            out = np.matmul(self.inplane, self.weights[2][k0:k1].T)
            if mirror_axis == 0:
                out = out[:, ::-1]
            elif mirror_axis == 1:
                out = out[:, :, ::-1]
        return out * np.float32(self.norm)

    def coarse(self, stride: int = 4) -> np.ndarray:
        """Field values on every ``stride``-th grid point (for normalisation)."""
        ip = self.inplane[:, ::stride, ::stride]
        return np.matmul(ip, self.weights[2][::stride].T) * np.float32(self.norm)

    def normalise_std(self) -> "_SmoothField":
        """Scale to unit standard deviation (over the grid)."""
        std = float(self.coarse().std())
        self.norm = 1.0 / std if std > 0 else 1.0
        return self

    def normalise_max_norm(self, target: float) -> "_SmoothField":
        """Scale so that the largest vector length over the grid is ``target``."""
        values = self.coarse(2)
        peak = float(np.sqrt((values ** 2).sum(axis=0)).max())
        self.norm = target / peak if peak > 0 else 0.0
        return self


def _kernel_norm(sigmas: tuple[float, ...], truncate: float) -> float:
    """Standard deviation of unit white noise after scipy's separable Gaussian filter."""
    total = 1.0
    for sigma in sigmas:
        if sigma <= 0:
            continue
        radius = int(truncate * sigma + 0.5)
        x = np.arange(-radius, radius + 1, dtype=float)
        w = np.exp(-0.5 * (x / sigma) ** 2)
        w /= w.sum()
        total *= float(np.sqrt((w ** 2).sum()))
    return total


def _rotation(angles_deg: np.ndarray) -> np.ndarray:
    ax, ay, az = np.deg2rad(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _in_capsule(p: np.ndarray, a: np.ndarray, b: np.ndarray, half_width: float,
                half_thickness: float) -> np.ndarray:
    """Which points ``p`` (3, N) lie in a flat band around segment a-b.

    The cross-section is an ellipse ``half_width`` wide along x (medio-lateral)
    and ``half_thickness`` deep across; points outside the band's box are skipped cheaply.
    """
    reach = max(half_width, half_thickness)
    lo, hi = np.minimum(a, b) - reach, np.maximum(a, b) + reach
    sel = np.flatnonzero(_in_box(p, lo, hi))
    out = np.zeros(p.shape[1], bool)
    if len(sel) == 0:
        return out
    q = p[:, sel] - a[:, None].astype(np.float32)
    axis = (b - a).astype(np.float32)
    t = np.clip(axis @ q / float(axis @ axis), 0.0, 1.0)
    q -= axis[:, None] * t
    depth2 = np.maximum(q[1] ** 2 + q[2] ** 2, 0.0)
    out[sel] = (q[0] / half_width) ** 2 + depth2 / half_thickness ** 2 <= 1.0
    return out


def _in_ellipsoid(p: np.ndarray, center: np.ndarray, axes: np.ndarray, level: float | np.ndarray = 1.0) -> np.ndarray:
    """Which points ``p`` (3, N) lie in the axis-aligned ellipsoid (scaled by ``sqrt(level)``)."""
    center = np.asarray(center, np.float32)
    axes = np.asarray(axes, np.float32)
    reach = axes * np.float32(np.sqrt(np.max(level)) if np.size(level) else 1.0)
    sel = np.flatnonzero(_in_box(p, center - reach, center + reach))
    out = np.zeros(p.shape[1], bool)
    if len(sel) == 0:
        return out
    r2 = (((p[:, sel] - center[:, None]) / axes[:, None]) ** 2).sum(axis=0)
    out[sel] = r2 <= (level[sel] if isinstance(level, np.ndarray) else level)
    return out


def _in_box(p: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    inside = (p[0] >= lo[0]) & (p[0] <= hi[0])
    inside &= (p[1] >= lo[1]) & (p[1] <= hi[1])
    inside &= (p[2] >= lo[2]) & (p[2] <= hi[2])
    return inside


# --------------------------------------------------------------------------------------------------
# generation


def generate_case(config: SyntheticKneeConfig, *, label_map: Volume | None = None,
                  mapping: Mapping[int, int] | None = None, label_map_side: str = "right") -> SyntheticCase:
    """Generate one synthetic knee case (image + ground truth) from ``config``.

    The same config (seed included) always gives the same case.

    Args:
        config: what to generate.
        label_map: optional label map to start from instead of ``config.source``
            (the case's ``source`` is then ``"custom"``).  It must hold femur,
            tibia, patella and cartilage with tibial cartilage; values are
            workbench labels unless ``mapping`` is given.
        mapping: source value -> workbench value for ``label_map`` (as
            :func:`workbench.data.labels.remap_labels`).
        label_map_side: ``"right"`` or ``"left"``: the knee ``label_map`` shows.

    Raises:
        InputNotFound: the source label map is not cached and cannot be fetched.
        InvalidFormat: the label map lacks a structure the generator needs or
            holds values without a mapping.
    """
    from scipy import ndimage

    cfg = config
    if label_map is not None:
        if label_map_side not in ("right", "left"):
            raise ConfigError(f"label_map_side must be 'right' or 'left', got {label_map_side!r}")
        src = _custom_source(label_map, mapping, label_map_side)
    else:
        src = _prepared_source(cfg.source)
    lm = src.landmarks
    rng = np.random.default_rng(cfg.seed)

    # ---- every random draw, in a fixed order (flip does not change the others)
    flipped = bool(rng.random() < cfg.flip_probability)
    angles = rng.uniform(-cfg.rotation_deg, cfg.rotation_deg, 3)
    scale = float(rng.uniform(1.0 - cfg.scale, 1.0 + cfg.scale))
    shift = rng.uniform(-cfg.translation_mm, cfg.translation_mm, 3)
    tissue_means = {t: float(rng.uniform(*cfg.intensities[t])) for t in TISSUES}
    class_jitter = 1.0 + 0.03 * rng.standard_normal(_N_CLASSES)
    env_anterior = float(rng.uniform(*cfg.envelope_anterior_mm))
    env_posterior = float(rng.uniform(*cfg.envelope_posterior_mm))
    fat_thickness = float(rng.uniform(*cfg.fat_thickness_mm))
    effusion = float(cfg.joint_fluid * rng.uniform(0.6, 1.4))
    sub_seeds = [int(s) for s in rng.integers(0, 2 ** 62, size=8)]

    side = ("left" if src.side == "right" else "right") if flipped else src.side
    means = np.array([tissue_means[_CLASS_TISSUE[c]] * class_jitter[c] for c in range(_N_CLASSES)], np.float32)
    means[0] = tissue_means["air"]
    tex_amp = np.array([TEXTURE_STD[_CLASS_TISSUE[c]] * cfg.texture for c in range(_N_CLASSES)], np.float32)
    multi_echo = len(cfg.echo_times_ms) > 0
    t2 = np.array([cfg.t2_ms[_CLASS_TISSUE[c]] for c in range(_N_CLASSES)], np.float32)

    # ---- grids
    shape = np.asarray(cfg.shape)
    spacing = np.asarray(cfg.spacing_mm, float)
    ss = np.asarray(cfg.supersample_factors())
    rshape = shape * ss
    mirror = np.diag([-1.0 if flipped else 1.0, 1.0, 1.0, 1.0])
    center = lm["center"]
    out_center = (mirror @ np.append(center, 1.0))[:3]
    out_affine = np.eye(4)
    out_affine[:3, :3] = _FRAMES[cfg.orientation] * spacing
    out_affine[:3, 3] = out_center - out_affine[:3, :3] @ ((shape - 1) / 2.0)
    sub = np.eye(4)  # render index -> output index
    sub[:3, :3] = np.diag(1.0 / ss)
    sub[:3, 3] = 0.5 / ss - 0.5
    r_affine = out_affine @ sub

    # ---- the composed map: output world -> (+ elastic) -> mirror -> inverse affine -> source world
    rot = _rotation(angles)
    forward = np.eye(4)  # source world -> output world (before the elastic part)
    forward[:3, :3] = scale * rot
    forward[:3, 3] = center + shift - scale * rot @ center
    forward = mirror @ forward
    inverse = np.linalg.inv(forward)
    world_to_src = src.inverse @ inverse
    world_to_model = src.distance_inverse @ inverse

    # left knees read every anatomical random field mirrored, so that flipping only mirrors the anatomy
    mirror_axis = int(np.argmax(np.abs(_FRAMES[cfg.orientation][0]))) if flipped else None
    axes_mm = [(np.arange(n) + 0.5) / s * d - 0.5 * d for n, s, d in zip(rshape, ss, spacing)]
    elastic = None
    if cfg.elastic_mm > 0:
        elastic = _SmoothField(np.random.default_rng(sub_seeds[0]), axes_mm, cfg.elastic_smoothness_mm, 3)
        elastic.normalise_max_norm(cfg.elastic_mm)
    env_field = _SmoothField(np.random.default_rng(sub_seeds[1]), axes_mm, 25.0).normalise_std()
    region_field = _SmoothField(np.random.default_rng(sub_seeds[2]), axes_mm, 15.0).normalise_std()
    patch_field = _SmoothField(np.random.default_rng(sub_seeds[3]), axes_mm, 6.0).normalise_std()

    # texture: white noise per render plane (consistent across slabs), Gaussian-smoothed
    rspacing = spacing / ss
    iso_sigma = tuple(float(max(0.6 / s, 0.5)) for s in rspacing)
    limb_axis = int(np.argmax(np.abs(_FRAMES[cfg.orientation][2])))
    fibre_sigma = tuple(float((4.0 if a == limb_axis else 0.5) / s) for a, s in enumerate(rspacing))
    truncate = 3.0
    iso_norm = _kernel_norm(iso_sigma, truncate)
    fibre_norm = _kernel_norm(fibre_sigma, truncate)
    n_cortex = int(round(cfg.cortex_mm / float(rspacing.min()))) if cfg.cortex_mm > 0 else 0
    halo = max(n_cortex + 1, 3, int(truncate * max(iso_sigma[2], fibre_sigma[2]) + 0.5) + 1)

    # soft-tissue geometry (source world)
    rel_top = float(lm["patella_superior"][2] - center[2] + 10.0)
    rel_tub = float(lm["tibial_tuberosity"][2] - center[2])
    recess_axes = np.array([18.0, 2.5, 14.0]) * (0.4 + effusion)
    gastrocnemius = [(lm[f"condyle_{part}_posterior"] + np.array([0.0, -13.0, -35.0]), np.array([14.0, 12.0, 60.0]))
                     for part in ("medial", "lateral")]
    vessel_a = lm["popliteal_vessels"] + np.array([0.0, 0.0, 80.0])
    vessel_b = lm["popliteal_vessels"] + np.array([0.0, 3.0, -80.0])
    vessel_offset = np.array([-6.0, 2.0, 0.0])
    fluid_threshold = 1.0 - 2.0 * effusion

    n_e = len(cfg.echo_times_ms) if multi_echo else 1
    tes = np.asarray(cfg.echo_times_ms, np.float32)
    image = np.zeros(tuple(shape) + (n_e,), np.float32)
    labels = np.zeros(tuple(shape), np.uint8)
    t2_out = np.zeros(tuple(shape), np.float32) if multi_echo else None
    gt_lut = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0], np.uint8)

    slab_out = max(1, int(3_000_000 // (rshape[0] * rshape[1] * ss[2])))
    for k_out0 in range(0, shape[2], slab_out):
        k_out1 = min(shape[2], k_out0 + slab_out)
        core0, core1 = k_out0 * ss[2], k_out1 * ss[2]
        r0, r1 = max(0, core0 - halo), min(rshape[2], core1 + halo)
        n = r1 - r0
        # world points of the render voxels (+ elastic displacement)
        ii = np.arange(rshape[0], dtype=np.float32)[:, None, None]
        jj = np.arange(rshape[1], dtype=np.float32)[None, :, None]
        kk = np.arange(r0, r1, dtype=np.float32)[None, None, :]
        ra = r_affine.astype(np.float32)
        pts = np.empty((3, rshape[0], rshape[1], n), np.float32)
        for a in range(3):
            pts[a] = ra[a, 0] * ii + ra[a, 1] * jj + ra[a, 2] * kk + ra[a, 3]
        if elastic is not None:
            displacement = elastic.slab(r0, r1, mirror_axis)
            if flipped:  # the right knee's displacement, mirrored with the anatomy
                displacement[0] = -displacement[0]
            pts += displacement
            del displacement
        src_idx = _apply(world_to_src, pts)
        np.clip(src_idx[src.si_axis], src.si_range[0], src.si_range[1], out=src_idx[src.si_axis])
        classes = ndimage.map_coordinates(src.classes, src_idx, order=0, mode="constant", cval=0)
        del src_idx
        model_idx = _apply(world_to_model, pts)
        np.clip(model_idx[2], 0, src.distance.shape[2] - 1, out=model_idx[2])
        dist = ndimage.map_coordinates(src.distance, model_idx, order=1, mode="nearest")
        del model_idx
        p_src = _apply(inverse, pts)
        del pts
        gt = gt_lut[classes]

        # soft tissue: an envelope at a position-dependent distance from the anatomy
        rel_y = p_src[1] - np.float32(center[1])
        rel_z = p_src[2] - np.float32(center[2])
        radius = env_anterior + (env_posterior - env_anterior) * np.clip(0.5 - rel_y / 60.0, 0.0, 1.0)
        radius += 15.0 * np.clip((rel_z - rel_top) / 40.0, 0.0, 1.0)  # thigh
        radius += 10.0 * np.clip((rel_tub - 10.0 - rel_z) / 40.0, 0.0, 1.0)  # calf
        radius += 3.0 * env_field.slab(r0, r1, mirror_axis)[0]
        flat = classes.reshape(-1)
        idx = np.flatnonzero((flat == 0) & (dist.reshape(-1) <= radius.reshape(-1)))
        pts_in = p_src.reshape(3, -1)[:, idx]
        subcut = dist.reshape(-1)[idx] > radius.reshape(-1)[idx] - fat_thickness
        wobble = region_field.slab(r0, r1, mirror_axis)[0].reshape(-1)[idx]
        del rel_y, rel_z, radius, p_src, dist
        z_rel = pts_in[2] - np.float32(center[2])
        muscle = z_rel > rel_top + 8.0 * wobble  # thigh: quadriceps, hamstrings
        muscle |= z_rel < rel_tub - 5.0 + 8.0 * wobble  # calf and shin
        for head_center, head_axes in gastrocnemius:  # the two heads behind the condyles, down the calf
            muscle |= _in_ellipsoid(pts_in, head_center, head_axes, 1.0 + 0.15 * wobble)
        deep = ~subcut
        tissue = np.full(idx.shape, _FAT, np.uint8)
        tissue[deep & muscle] = _MUSCLE
        tissue[deep & _in_ellipsoid(pts_in, lm["recess_center"], recess_axes)] = _FLUID
        vessels = _in_capsule(pts_in, vessel_a, vessel_b, 3.5, 3.5)
        vessels |= _in_capsule(pts_in, vessel_a + vessel_offset, vessel_b + vessel_offset, 2.5, 2.5)
        tissue[deep & vessels] = _VESSEL
        tendon = _in_capsule(pts_in, lm["patella_inferior"], lm["tibial_tuberosity"], 13.0, 2.5)
        tendon |= _in_capsule(pts_in, lm["patella_superior"], lm["quadriceps_end"], 14.0, 3.5)
        tissue[tendon] = _TENDON
        flat[idx] = tissue
        del idx, pts_in, subcut, wobble, z_rel, muscle, deep, tissue, vessels, tendon
        # thin patchy fluid layer on cartilage and menisci
        if effusion > 0:
            cart = (classes >= 1) & (classes <= 6)
            soft = (classes == _FAT) | (classes == _MUSCLE)
            layer = ndimage.binary_dilation(cart) & soft & (patch_field.slab(r0, r1, mirror_axis)[0] > fluid_threshold)
            classes[layer] = _FLUID
            del cart, soft, layer
        # cortical rim
        if n_cortex:
            bone = np.isin(classes, _BONE_CLASSES)
            core = ndimage.binary_erosion(bone, iterations=n_cortex, border_value=1)
            classes[bone & ~core] = _CORTEX
            del bone, core

        # intensities with texture
        iso = _noise_planes(sub_seeds[4], r0, r1, rshape, mirror_axis)
        iso = ndimage.gaussian_filter(iso, iso_sigma, truncate=truncate) / np.float32(iso_norm)
        fibre = _noise_planes(sub_seeds[5], r0, r1, rshape, mirror_axis)
        fibre = ndimage.gaussian_filter(fibre, fibre_sigma, truncate=truncate) / np.float32(fibre_norm)
        texture = np.where(classes == _MUSCLE, fibre, iso)
        del fibre
        s0 = means[classes] * np.maximum(1.0 + tex_amp[classes] * texture, 0.0)
        del texture
        c0, c1 = core0 - r0, core1 - r0
        out_k = slice(k_out0, k_out1)
        if multi_echo:
            t2_map = t2[classes] * (1.0 + cfg.t2_variation * np.clip(iso, -2.5, 2.5))
            t2_map[classes == 0] = 0.0
            for e, te in enumerate(tes):
                with np.errstate(divide="ignore", over="ignore"):
                    signal = s0 * np.exp(-te / np.maximum(t2_map, 1e-3))
                image[:, :, out_k, e] = _block_mean(signal[:, :, c0:c1], ss)
            t2_out[:, :, out_k] = _block_mean(t2_map[:, :, c0:c1], ss)  # type: ignore[index]
        else:
            image[:, :, out_k, 0] = _block_mean(s0[:, :, c0:c1], ss)
        labels[:, :, out_k] = _block_majority(gt[:, :, c0:c1], ss)
        del iso, s0, classes, gt

    # ---- acquisition: bias field and Rician noise on the output grid
    out_axes = [np.arange(n) * d for n, d in zip(shape, spacing)]
    bias = np.ones(tuple(shape), np.float32)
    if cfg.bias_field > 0:
        bf = _SmoothField(np.random.default_rng(sub_seeds[6]), out_axes, cfg.bias_smoothness_mm)
        values = bf.slab(0, int(shape[2]))[0]
        peak = float(np.abs(values).max())
        bias = (1.0 + cfg.bias_field * values / (peak if peak > 0 else 1.0)).astype(np.float32)
    image *= bias[..., None]
    sigma = 0.0
    if cfg.snr is not None:
        sigma = float(tissue_means["femoral_cartilage"] / cfg.snr)
        noise_rng = np.random.default_rng(sub_seeds[7])
        for e in range(n_e):
            real = image[..., e] + noise_rng.standard_normal(tuple(shape), dtype=np.float32) * np.float32(sigma)
            imag = noise_rng.standard_normal(tuple(shape), dtype=np.float32) * np.float32(sigma)
            image[..., e] = np.sqrt(real * real + imag * imag)

    meta = {"synthetic": True, "generator": f"workbench.data.synthetic_knee {GENERATOR_VERSION}",
            "source": src.name, "side": side, "modality": "MR",
            "description": f"synthetic {'multi-echo' if multi_echo else 'DESS-like'} {side} knee"}
    if multi_echo:
        img = Volume(np.ascontiguousarray(image[..., 0]), out_affine.copy(), np.ascontiguousarray(image),
                     [float(t) for t in cfg.echo_times_ms], dict(meta))
    else:
        img = Volume(np.ascontiguousarray(image[..., 0]), out_affine.copy(), meta=dict(meta))
    label_volume = Volume(labels, out_affine.copy(), meta={**meta, "kind": "labels"})
    t2_volume = Volume(t2_out, out_affine.copy(), meta={**meta, "kind": "t2_ms"}) if t2_out is not None else None

    params = {
        "generator_version": GENERATOR_VERSION,
        "seed": cfg.seed,
        "side": side,
        "flipped": flipped,
        "source": src.name,
        "source_values": src.source_values,
        "supersample": [int(s) for s in ss],
        "transform": {
            "description": ("output world p -> source world: forward_inverse @ (p + elastic(p)); forward = "
                            "mirror @ [rotation/scale about knee_center + translation]; RAS mm"),
            "knee_center_source_ras": [float(v) for v in center],
            "rotation_deg_xyz": [float(v) for v in angles],
            "scale": scale,
            "translation_mm": [float(v) for v in shift],
            "mirror_x": flipped,
            "forward_source_to_output": forward.tolist(),
            "elastic": {"max_mm": cfg.elastic_mm, "smoothness_mm": cfg.elastic_smoothness_mm,
                        "defined_in": "output world (RAS mm), added before the inverse affine",
                        "seed": sub_seeds[0]},
        },
        "tissue_means": tissue_means,
        "soft_tissue": {"envelope_anterior_mm": env_anterior, "envelope_posterior_mm": env_posterior,
                        "fat_thickness_mm": fat_thickness, "joint_fluid": effusion},
        "noise_sigma": sigma,
        "bias_field": cfg.bias_field,
        "echo_times_ms": [float(t) for t in cfg.echo_times_ms],
        "t2_ms": {t: float(cfg.t2_ms[t]) for t in TISSUES} if multi_echo else {},
        "landmarks_source_ras": {k: [float(x) for x in v] for k, v in lm.items()},
    }
    return SyntheticCase(img, label_volume, side, src.name, cfg, params, t2_volume)


def _noise_planes(seed: int, k0: int, k1: int, rshape: np.ndarray, mirror_axis: int | None) -> np.ndarray:
    """Unit white noise on render planes ``k0:k1``; plane ``k`` always comes from the same stream."""
    n = int(rshape[2])
    planes = []
    for k in range(k0, k1):
        plane = np.random.default_rng([seed, n - 1 - k if mirror_axis == 2 else k]).standard_normal(
            (int(rshape[0]), int(rshape[1])), dtype=np.float32)
        if mirror_axis == 0:
            plane = plane[::-1]
        elif mirror_axis == 1:
            plane = plane[:, ::-1]
        planes.append(plane)
    return np.stack(planes, axis=-1)


def _apply(matrix: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """Apply a 4x4 affine to points stored as ``(3, ...)`` (float32 result)."""
    m = matrix.astype(np.float32)
    out = np.empty_like(pts)
    for a in range(3):
        out[a] = m[a, 0] * pts[0] + m[a, 1] * pts[1] + m[a, 2] * pts[2] + m[a, 3]
    return out


def _block_mean(array: np.ndarray, ss: np.ndarray) -> np.ndarray:
    i, j, k = (array.shape[a] // ss[a] for a in range(3))
    return array.reshape(i, ss[0], j, ss[1], k, ss[2]).mean(axis=(1, 3, 5), dtype=np.float32)


def _block_majority(labels: np.ndarray, ss: np.ndarray) -> np.ndarray:
    """Most frequent label per block; ties go to thin structures (cartilage, menisci) first."""
    i, j, k = (labels.shape[a] // ss[a] for a in range(3))
    if int(np.prod(ss)) == 1:
        return labels.copy()
    blocks = labels.reshape(i, ss[0], j, ss[1], k, ss[2])
    low = blocks.min(axis=(1, 3, 5))
    high = blocks.max(axis=(1, 3, 5))
    out = low.copy()
    mixed = np.flatnonzero(low != high)
    if len(mixed):
        sub = blocks.transpose(0, 2, 4, 1, 3, 5).reshape(i * j * k, -1)[mixed]
        values = np.unique(sub)
        counts = np.stack([(sub == v).sum(axis=1) for v in values], axis=1).astype(np.float32)
        counts += _LABEL_PRIORITY[values][None, :] / 16.0
        out.reshape(-1)[mixed] = values[np.argmax(counts, axis=1)]
    return out


# --------------------------------------------------------------------------------------------------
# writing


def write_case(case: SyntheticCase, out_dir: str | Path, name: str) -> dict[str, Path]:
    """Write ``case`` into ``out_dir`` and return the paths by kind.

    Files: ``<name>_dicom/`` (``dicom``, one MR series; multi-echo cases hold
    every echo), ``<name>.nii.gz`` (``image``, float32, first echo),
    ``<name>_labels.nii.gz`` (``labels``, uint8), ``<name>_case.json``
    (``case``: parameters, side, label table, source and licence) and, for
    multi-echo cases, ``<name>_echoes.nii.gz`` (``echoes``, 4-D) and
    ``<name>_t2.nii.gz`` (``t2``, ms).  Existing files of the same name are replaced.
    """
    from workbench.io.dicom_write import write_dicom_series

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = case.config
    multi_echo = case.image.echoes is not None
    paths: dict[str, Path] = {
        "dicom": out_dir / f"{name}_dicom",
        "image": out_dir / f"{name}.nii.gz",
        "labels": out_dir / f"{name}_labels.nii.gz",
        "case": out_dir / f"{name}_case.json",
    }
    write_dicom_series(
        case.image, paths["dicom"],
        series_description=(f"synthetic {'MESE' if multi_echo else 'DESS'} {case.side} knee "
                            f"({case.source}, seed {cfg.seed})"),
        series_number=1,
        patient_id="SYNTH",
        patient_name=f"SYNTH^{name}",
        echo_times_ms=list(case.image.echo_times_ms) if multi_echo else [cfg.echo_time_ms],
        repetition_time_ms=cfg.repetition_time_ms,
        flip_angle_deg=cfg.flip_angle_deg,
        field_strength_t=cfg.field_strength_t,
        scanning_sequence="SE" if multi_echo else "GR",
        sequence_variant="SK" if multi_echo else ("SS", "SP"),
        sequence_name="synthetic_mese" if multi_echo else "synthetic_dess",
        acquisition_type="2D" if multi_echo else "3D",
        laterality=case.side,
        study_description="Synthetic knee MRI (workbench)",
        overwrite=True,
    )
    _write_nifti(case.image.data.astype(np.float32), case.image.affine, paths["image"], "synthetic knee image")
    _write_nifti(case.labels.data.astype(np.uint8), case.labels.affine, paths["labels"],
                 "workbench knee labels")
    if multi_echo:
        paths["echoes"] = out_dir / f"{name}_echoes.nii.gz"
        _write_nifti(case.image.echoes.astype(np.float32), case.image.affine, paths["echoes"],
                     "synthetic echoes TE=" + ",".join(f"{t:g}" for t in case.image.echo_times_ms))
    if case.t2_map is not None:
        paths["t2"] = out_dir / f"{name}_t2.nii.gz"
        _write_nifti(case.t2_map.data.astype(np.float32), case.t2_map.affine, paths["t2"], "ground-truth T2 ms")

    record = {
        "name": name,
        "generator": f"workbench.data.synthetic_knee {GENERATOR_VERSION}",
        "created": _dt.datetime.now().replace(microsecond=0).isoformat(),
        "side": case.side,
        "source": _source_record(case.source),
        "licence_note": _LICENCE_NOTE if case.source in SOURCES else "Synthetic image from a user label map.",
        "labels": L.label_table(include_subregions=False),
        "labels_present": sorted(int(v) for v in np.unique(case.labels.data)),
        "geometry": {
            "shape": list(case.image.shape),
            "spacing_mm": list(case.image.spacing),
            "orientation": cfg.orientation,
            "affine_ras": case.image.affine.tolist(),
        },
        "echo_times_ms": list(case.image.echo_times_ms),
        "config": cfg.model_dump(mode="json"),
        "params": case.params,
        "files": {k: p.name for k, p in paths.items() if k != "case"},
    }
    paths["case"].write_text(json.dumps(record, indent=2))
    return paths


def _source_record(name: str) -> dict[str, Any]:
    if name not in SOURCES:
        return {"name": name, "file": None, "distribution": None, "licence": None}
    return {
        "name": name,
        "file": {"right_knee_example": "right_knee_example.nrrd",
                 "sag_3d_dess": "SAG_3D_DESS_RIGHT_bones_cart_men_fib-label.nrrd"}[name],
        "distribution": "mskt 0.1.22 source distribution (sdist) on PyPI",
        "licence": "MIT",
        "structures": {str(k): v for k, v in L.MSKT_SOURCE_STRUCTURES[name].items()},
        "mapping_to_workbench": {str(k): v for k, v in L.SOURCE_MAPPINGS[name].items()},
    }


def _write_nifti(data: np.ndarray, affine: np.ndarray, path: Path, description: str) -> None:
    import nibabel as nib

    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_data_dtype(data.dtype)
    img.header.set_xyzt_units("mm", "sec")
    img.header["descrip"] = description[:79].encode()
    if data.dtype == np.uint8:
        img.header["scl_slope"] = 1.0
        img.header["scl_inter"] = 0.0
    nib.save(img, str(path))
