"""The workbench's knee label table: the single source of truth for label values.

Every label map the workbench writes or compares (ground truth, segmentations,
synthetic cases) uses these values:

=====  ====================  ==========================================
value  key                   name
=====  ====================  ==========================================
0      ``background``        background (everything unlabelled)
1      ``pat_cart``          patellar cartilage
2      ``fem_cart``          femoral cartilage
3      ``med_tib_cart``      medial tibial cartilage
4      ``lat_tib_cart``      lateral tibial cartilage
5      ``med_men``           medial meniscus
6      ``lat_men``           lateral meniscus
7      ``femur``             femur
8      ``tibia``             tibia
9      ``patella``           patella
11     ``fem_cart_ant``      femoral cartilage, anterior (trochlea)
12     ``fem_cart_mwb``      femoral cartilage, medial weight-bearing
13     ``fem_cart_lwb``      femoral cartilage, lateral weight-bearing
14     ``fem_cart_mpost``    femoral cartilage, medial posterior
15     ``fem_cart_lpost``    femoral cartilage, lateral posterior
=====  ====================  ==========================================

Values 11-15 subdivide femoral cartilage (2): a map uses either 2 or its
subregions for a given voxel, never both.  Medial and lateral are anatomical
(towards the body's midline and away from it), so mirroring a right knee into a
left knee does not change any label.

The ``MSKT_*`` dictionaries map the label values of the two real label maps in
the ``mskt`` 0.1.22 sdist onto this table (see ``docs/labels.md`` for the
anatomical evidence); :func:`remap_labels` applies such a mapping and refuses
to drop a label silently.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

from workbench.errors import ConfigError, InvalidFormat

BACKGROUND = 0
PAT_CART = 1
FEM_CART = 2
MED_TIB_CART = 3
LAT_TIB_CART = 4
MED_MEN = 5
LAT_MEN = 6
FEMUR = 7
TIBIA = 8
PATELLA = 9
FEM_CART_ANT = 11
FEM_CART_MWB = 12
FEM_CART_LWB = 13
FEM_CART_MPOST = 14
FEM_CART_LPOST = 15


@dataclass(frozen=True)
class Label:
    """One entry of the label table.

    Attributes:
        value: the integer stored in label maps.
        key: short machine name (``fem_cart``), unique.
        name: human-readable name.
        kind: ``"cartilage"``, ``"meniscus"``, ``"bone"`` or ``"subregion"``.
        color: RGB (0-255) used by figures and viewers.
        parent: for subregions, the value of the structure they subdivide.
    """

    value: int
    key: str
    name: str
    kind: str
    color: tuple[int, int, int]
    parent: int | None = None

    def to_dict(self) -> dict:
        """JSON-ready form (``value``, ``key``, ``name``, ``kind``, ``color``, ``parent``)."""
        return {"value": self.value, "key": self.key, "name": self.name, "kind": self.kind,
                "color": list(self.color), "parent": self.parent}


#: The knee structures (values 1-9), in value order.
KNEE_LABELS: tuple[Label, ...] = (
    Label(PAT_CART, "pat_cart", "patellar cartilage", "cartilage", (255, 170, 60)),
    Label(FEM_CART, "fem_cart", "femoral cartilage", "cartilage", (250, 240, 80)),
    Label(MED_TIB_CART, "med_tib_cart", "medial tibial cartilage", "cartilage", (60, 200, 255)),
    Label(LAT_TIB_CART, "lat_tib_cart", "lateral tibial cartilage", "cartilage", (40, 120, 255)),
    Label(MED_MEN, "med_men", "medial meniscus", "meniscus", (200, 80, 220)),
    Label(LAT_MEN, "lat_men", "lateral meniscus", "meniscus", (150, 50, 180)),
    Label(FEMUR, "femur", "femur", "bone", (230, 90, 80)),
    Label(TIBIA, "tibia", "tibia", "bone", (90, 200, 100)),
    Label(PATELLA, "patella", "patella", "bone", (240, 140, 180)),
)

#: Femoral cartilage subregions (values 11-15), each with ``parent == FEM_CART``.
FEMORAL_SUBREGIONS: tuple[Label, ...] = (
    Label(FEM_CART_ANT, "fem_cart_ant", "femoral cartilage, anterior (trochlea)", "subregion", (255, 230, 0), FEM_CART),
    Label(FEM_CART_MWB, "fem_cart_mwb", "femoral cartilage, medial weight-bearing", "subregion", (255, 200, 120),
          FEM_CART),
    Label(FEM_CART_LWB, "fem_cart_lwb", "femoral cartilage, lateral weight-bearing", "subregion", (200, 255, 120),
          FEM_CART),
    Label(FEM_CART_MPOST, "fem_cart_mpost", "femoral cartilage, medial posterior", "subregion", (255, 140, 40),
          FEM_CART),
    Label(FEM_CART_LPOST, "fem_cart_lpost", "femoral cartilage, lateral posterior", "subregion", (140, 220, 40),
          FEM_CART),
)

#: Every entry of the table (background excluded), in value order.
LABELS: tuple[Label, ...] = KNEE_LABELS + FEMORAL_SUBREGIONS
#: Entries by value.
BY_VALUE: dict[int, Label] = {label.value: label for label in LABELS}
#: Entries by key.
BY_KEY: dict[str, Label] = {label.key: label for label in LABELS}
#: The values 1-9 of the knee structures.
KNEE_LABEL_VALUES: tuple[int, ...] = tuple(label.value for label in KNEE_LABELS)
#: Every value a workbench label map may hold, background included.
ALL_LABEL_VALUES: tuple[int, ...] = (BACKGROUND,) + tuple(label.value for label in LABELS)
#: Groups used by metrics and figures.
CARTILAGE_VALUES: tuple[int, ...] = (PAT_CART, FEM_CART, MED_TIB_CART, LAT_TIB_CART)
MENISCUS_VALUES: tuple[int, ...] = (MED_MEN, LAT_MEN)
BONE_VALUES: tuple[int, ...] = (FEMUR, TIBIA, PATELLA)

# --- the real label maps of the mskt 0.1.22 sdist -------------------------------------------------

#: ``right_knee_example.nrrd`` (384x384x160, right knee, no menisci) -> workbench values.
MSKT_RIGHT_KNEE_EXAMPLE: dict[int, int] = {
    1: FEM_CART,
    2: MED_TIB_CART,
    3: LAT_TIB_CART,
    4: PAT_CART,
    5: FEMUR,
    6: TIBIA,
    7: PATELLA,
}

#: ``SAG_3D_DESS_RIGHT_bones_cart_men_fib-label.nrrd`` (384x384x160, right knee) -> workbench values.
#: Label 8 (fibula) has no workbench value and is mapped to background explicitly.
MSKT_SAG_3D_DESS: dict[int, int] = {
    1: FEM_CART,
    2: MED_TIB_CART,
    3: LAT_TIB_CART,
    4: PAT_CART,
    5: FEMUR,
    6: TIBIA,
    7: PATELLA,
    8: BACKGROUND,  # fibula
    9: LAT_MEN,
    10: MED_MEN,
}

#: What each source value of the mskt label maps depicts (names of the source structures).
MSKT_SOURCE_STRUCTURES: dict[str, dict[int, str]] = {
    "right_knee_example": {1: "femoral cartilage", 2: "medial tibial cartilage", 3: "lateral tibial cartilage",
                           4: "patellar cartilage", 5: "femur", 6: "tibia", 7: "patella"},
    "sag_3d_dess": {1: "femoral cartilage", 2: "medial tibial cartilage", 3: "lateral tibial cartilage",
                    4: "patellar cartilage", 5: "femur", 6: "tibia", 7: "patella", 8: "fibula",
                    9: "lateral meniscus", 10: "medial meniscus"},
}

#: Mappings by the short source names of :func:`workbench.data.samples.label_map_paths`.
SOURCE_MAPPINGS: dict[str, dict[int, int]] = {
    "right_knee_example": MSKT_RIGHT_KNEE_EXAMPLE,
    "sag_3d_dess": MSKT_SAG_3D_DESS,
}


def label_name(value: int) -> str:
    """Human-readable name of a label value (``"background"`` for 0)."""
    if value == BACKGROUND:
        return "background"
    try:
        return BY_VALUE[int(value)].name
    except KeyError:
        raise ConfigError(f"Label value {value} is not in the workbench label table",
                          f"Use one of {list(ALL_LABEL_VALUES)} (see workbench.data.labels).") from None


def label_table(include_subregions: bool = True) -> list[dict]:
    """The table as a JSON-ready list of dicts (background first)."""
    rows = [{"value": BACKGROUND, "key": "background", "name": "background", "kind": "background",
             "color": [0, 0, 0], "parent": None}]
    rows += [label.to_dict() for label in (LABELS if include_subregions else KNEE_LABELS)]
    return rows


def color_lut() -> np.ndarray:
    """A ``(16, 3)`` uint8 RGB lookup table indexed by label value (unused values black)."""
    lut = np.zeros((max(ALL_LABEL_VALUES) + 1, 3), np.uint8)
    for label in LABELS:
        lut[label.value] = label.color
    return lut


def remap_labels(array: np.ndarray, mapping: Mapping[int, int], *, source: str = "label map") -> np.ndarray:
    """Return ``array``'s labels translated by ``mapping`` as a ``uint8`` array of the same shape.

    ``mapping`` sends source values to workbench values (0 for structures to
    drop, e.g. the fibula).  Background (0) maps to 0 unless the mapping says
    otherwise.  Every non-zero value present in ``array`` must have an entry:
    a value without one raises :class:`~workbench.errors.InvalidFormat`
    instead of disappearing silently.  Targets must be values of the table
    (:data:`ALL_LABEL_VALUES`), else :class:`~workbench.errors.ConfigError`.
    ``source`` names the map in error messages.
    """
    array = np.asarray(array)
    if array.dtype.kind == "f":
        rounded = np.rint(array)
        if not np.array_equal(rounded, array):
            raise InvalidFormat(f"{source} holds non-integer values; it is not a label map",
                                "Give an integer label map (NRRD/NIfTI with whole-number labels).")
        array = rounded.astype(np.int64)
    elif array.dtype.kind == "b":
        array = array.astype(np.uint8)
    elif array.dtype.kind not in "iu":
        raise InvalidFormat(f"{source} has dtype {array.dtype}; it is not a label map")
    table = {int(k): int(v) for k, v in mapping.items()}
    bad_targets = sorted({v for v in table.values() if v not in ALL_LABEL_VALUES})
    if bad_targets:
        raise ConfigError(f"Label mapping for {source} targets values {bad_targets} outside the workbench table",
                          f"Map onto {list(ALL_LABEL_VALUES)} (0 drops a structure explicitly).")
    table.setdefault(0, BACKGROUND)
    if array.size == 0:
        return np.zeros(array.shape, np.uint8)
    present = [int(v) for v in np.unique(array)]
    missing = [v for v in present if v not in table]
    if missing:
        raise InvalidFormat(
            f"{source} holds label values {missing} that the mapping does not cover",
            "Add an entry for every source label (map unwanted structures to 0 explicitly).",
        )
    if array.dtype.itemsize <= 2:  # a lookup table over every bit pattern: no wide temporaries
        unsigned = np.uint8 if array.dtype.itemsize == 1 else np.uint16
        lut = np.zeros(1 << (8 * array.dtype.itemsize), np.uint8)
        info = np.iinfo(array.dtype)
        for src, dst in table.items():
            if info.min <= src <= info.max:
                lut[int(np.array(src, dtype=array.dtype).view(unsigned))] = dst
        return lut[array.view(unsigned)]
    keys = np.array(sorted(present), dtype=np.int64)
    values = np.array([table[int(k)] for k in keys], np.uint8)
    return values[np.searchsorted(keys, array)]


def check_label_values(array: np.ndarray, *, source: str = "label map", allowed=ALL_LABEL_VALUES) -> list[int]:
    """Return the sorted label values present in ``array``; raise if any is not ``allowed``.

    Raises :class:`~workbench.errors.InvalidFormat` naming the unexpected values.
    """
    present = [int(v) for v in np.unique(np.asarray(array))]
    extra = [v for v in present if v not in set(int(a) for a in allowed)]
    if extra:
        raise InvalidFormat(f"{source} holds label values {extra} outside the workbench table",
                            "Remap it with workbench.data.labels.remap_labels first.")
    return present
