"""NIfTI reading and writing, and label maps from NIfTI or NRRD.

All volumes follow the workbench convention (:mod:`workbench.io.volume`): data
indexed ``[i, j, k]`` and a 4x4 affine to RAS+ millimetres, which is NIfTI's own
convention.  NRRD files state their world space (3D Slicer writes
``left-posterior-superior``); the reader converts it to RAS+.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from workbench.errors import InputNotFound, InvalidFormat
from workbench.io.volume import Volume

__all__ = ["read_nifti", "write_nifti", "read_label_map", "NIFTI_SUFFIXES", "NRRD_SUFFIXES"]

NIFTI_SUFFIXES = (".nii", ".nii.gz")
NRRD_SUFFIXES = (".nrrd", ".nhdr")

#: NRRD ``space`` values and the sign flips that take their world axes to RAS+.
_NRRD_SPACES = {
    "right-anterior-superior": (1.0, 1.0, 1.0),
    "left-anterior-superior": (-1.0, 1.0, 1.0),
    "left-posterior-superior": (-1.0, -1.0, 1.0),
    "right-anterior-superior-time": (1.0, 1.0, 1.0),
    "left-anterior-superior-time": (-1.0, 1.0, 1.0),
    "left-posterior-superior-time": (-1.0, -1.0, 1.0),
    "ras": (1.0, 1.0, 1.0),
    "las": (-1.0, 1.0, 1.0),
    "lps": (-1.0, -1.0, 1.0),
}

_NIFTI_HINT = "Give a 3-D NIfTI volume (.nii or .nii.gz) written by a NIfTI tool (nibabel, dcm2niix, 3D Slicer)."


def read_nifti(path: str | os.PathLike) -> Volume:
    """Read a 3-D NIfTI-1/-2 volume (``.nii`` or ``.nii.gz``) with nibabel.

    The affine is nibabel's (sform when its code is set, else qform).  Trailing
    singleton dimensions (``(X, Y, Z, 1)``) are dropped.  Voxel values keep
    their stored dtype; when the header scales them (``scl_slope``/``scl_inter``)
    they become float32 (float64 only when stored as float64).

    Raises:
        InputNotFound: the file does not exist.
        InvalidFormat: not a NIfTI image (e.g. a PNG renamed ``.nii``), unreadable
            or truncated data, not 3-D (a 4-D series says so with its shape), or a
            non-invertible affine.
    """
    import nibabel as nib

    path = Path(path)
    _require_file(path, "NIfTI")
    try:
        img = nib.load(str(path))
    except Exception as exc:
        raise InvalidFormat(f"{path} is not a readable NIfTI image ({_one_line(exc)})", _NIFTI_HINT) from exc
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise InvalidFormat(f"{path} is a {type(img).__name__}, not a NIfTI image", _NIFTI_HINT)
    shape = tuple(int(s) for s in img.shape)
    squeezed = list(shape)
    while len(squeezed) > 3 and squeezed[-1] == 1:
        squeezed.pop()
    if len(squeezed) != 3:
        what = f"a {len(shape)}-D image" if len(shape) != 4 else "a 4-D image (a series of volumes)"
        raise InvalidFormat(
            f"{path} holds {what} of shape {list(shape)}; a 3-D volume was expected",
            "Pass one 3-D volume (split a 4-D file with fslsplit or nibabel.funcs.four_to_three).",
        )
    stored = img.get_data_dtype()
    if stored.fields is not None or stored.kind not in "iufb":
        raise InvalidFormat(
            f"{path} stores {stored} voxels (RGB or complex); a scalar 3-D volume was expected", _NIFTI_HINT)
    try:
        data = np.asanyarray(img.dataobj)
    except Exception as exc:
        raise InvalidFormat(
            f"Cannot read the voxel data of {path} ({_one_line(exc)}); the file is truncated or damaged",
            "Write the file again or copy a complete version.",
        ) from exc
    data = data.reshape(squeezed)
    if data.dtype.kind == "f" and stored.kind in "iub" and data.dtype != np.float32:
        data = data.astype(np.float32)  # scaled integers: float32 keeps their precision
    affine = np.asarray(img.affine, dtype=float)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise InvalidFormat(
            f"{path} has an invalid (non-invertible or non-finite) affine", "Fix the header's sform/qform.")
    header = img.header
    qform_code = int(header["qform_code"]) if "qform_code" in header else 0
    sform_code = int(header["sform_code"]) if "sform_code" in header else 0
    meta: dict[str, Any] = {
        "source": str(path),
        "format": "nifti",
        "qform_code": qform_code,
        "sform_code": sform_code,
        "stored_dtype": str(stored),
        "zooms": [float(z) for z in header.get_zooms()[:3]],
        "description": _text(header["descrip"]) if "descrip" in header else "",
    }
    return Volume(data=data, affine=affine, meta=meta)


def write_nifti(
    volume_or_array: Volume | np.ndarray,
    affine: np.ndarray | str | os.PathLike | None = None,
    path: str | os.PathLike | None = None,
    dtype: Any = None,
) -> Path:
    """Write a 3-D (or 4-D, e.g. echoes) array or a :class:`Volume` as NIfTI-1 (``.nii`` / ``.nii.gz``).

    Args:
        volume_or_array: a volume (its ``data`` is written) or an array.
        affine: the 4x4 RAS+ affine; ``None`` takes the volume's.  For
            convenience ``write_nifti(volume, path)`` also works.
        path: the output file; its ending picks compression (``.nii.gz``).
            Parent folders are created; the file is written to a temporary name
            and moved into place, so readers never see half a file.
        dtype: on-disk dtype (e.g. ``np.uint8`` for labels); float data cast to
            an integer dtype is rounded first and must fit its range.  By default
            the array's dtype, with bool stored as uint8 and 64-bit integers as
            int32 when they fit.

    The header has both qform and sform set from ``affine`` with code 1
    (scanner), and units mm / s.  Returns the written path.
    """
    import nibabel as nib

    if path is None and isinstance(affine, (str, os.PathLike)):
        path, affine = affine, None
    if path is None:
        raise TypeError("write_nifti() needs an output path")
    path = Path(path)
    if not path.name.lower().endswith(NIFTI_SUFFIXES):
        raise InvalidFormat(f"Cannot write {path}: NIfTI file names end in .nii or .nii.gz",
                            "Name the output <name>.nii.gz.")
    if isinstance(volume_or_array, Volume):
        data = volume_or_array.data
        if affine is None:
            affine = volume_or_array.affine
    else:
        data = volume_or_array
    if affine is None:
        raise TypeError("write_nifti() needs an affine when given a bare array")
    affine = np.asarray(affine, dtype=float)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise ValueError(f"write_nifti(): affine must be a finite 4x4 matrix, got shape {affine.shape}")
    data = _on_disk(np.asarray(data), dtype)

    img = nib.Nifti1Image(data, affine, dtype=data.dtype)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    img.header["descrip"] = b"workbench"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        nib.save(img, str(tmp))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _on_disk(data: np.ndarray, dtype: Any) -> np.ndarray:
    if data.ndim not in (3, 4):
        raise ValueError(f"write_nifti(): expected a 3-D or 4-D array, got shape {list(data.shape)}")
    if dtype is None:
        if data.dtype == bool:
            return data.astype(np.uint8)
        if data.dtype.kind in "iu" and data.dtype.itemsize == 8:
            info = np.iinfo(np.int32)
            if data.size == 0 or (data.min() >= info.min and data.max() <= info.max):
                return data.astype(np.int32)
            raise ValueError("write_nifti(): 64-bit integers outside the int32 range; pass dtype explicitly")
        if data.dtype == np.float16:
            return data.astype(np.float32)
        return data
    target = np.dtype(dtype)
    if target.kind in "iu" and data.dtype.kind in "fb":
        data = np.rint(data) if data.dtype.kind == "f" else data
        info = np.iinfo(target)
        if data.size and (not np.all(np.isfinite(data)) or data.min() < info.min or data.max() > info.max):
            raise ValueError(f"write_nifti(): values do not fit {target} (range {info.min}..{info.max})")
    elif target.kind in "iu" and data.dtype.kind in "iu" and data.size:
        info = np.iinfo(target)
        if data.min() < info.min or data.max() > info.max:
            raise ValueError(f"write_nifti(): values do not fit {target} (range {info.min}..{info.max})")
    return data.astype(target, copy=False)


def read_label_map(path: str | os.PathLike) -> Volume:
    """Read an integer label map from NIfTI (``.nii``/``.nii.gz``) or NRRD (``.nrrd``/``.nhdr``).

    NRRD geometry comes from ``space directions`` (one row per axis),
    ``space origin`` and ``space`` (``left-posterior-superior``, ``RAS``, ``LAS``
    ...), converted to a RAS+ affine; a file without ``space directions`` gets a
    diagonal affine from ``spacings`` (1 mm when absent) and
    ``meta["geometry"] == "spacings only"``.  Integer voxels keep their dtype;
    float voxels must hold whole numbers and become the smallest fitting
    integer type.  3D Slicer segment names (``Segment<N>_Name`` /
    ``Segment<N>_LabelValue``) go into ``meta["segments"]``.

    Raises:
        InputNotFound: the file does not exist.
        InvalidFormat: another format, an unreadable file, not 3-D, an unknown
            NRRD space, or non-integer values.
    """
    path = Path(path)
    _require_file(path, "label map")
    name = path.name.lower()
    if name.endswith(NIFTI_SUFFIXES):
        volume = read_nifti(path)
    elif name.endswith(NRRD_SUFFIXES):
        volume = _read_nrrd(path)
    else:
        raise InvalidFormat(
            f"{path} is not a label map file: expected .nii, .nii.gz, .nrrd or .nhdr",
            "Save the label map as NIfTI or NRRD (e.g. from 3D Slicer).",
        )
    volume.data = _as_labels(volume.data, path)
    volume.meta["kind"] = "label_map"
    return volume


def _read_nrrd(path: Path) -> Volume:
    import nrrd

    try:
        data, header = nrrd.read(str(path))
    except Exception as exc:
        raise InvalidFormat(f"{path} is not a readable NRRD file ({_one_line(exc)})",
                            "Give a NRRD label map written by 3D Slicer, ITK or pynrrd.") from exc
    data = np.asarray(data)
    kinds = [str(k).lower() for k in header.get("kinds", ["domain"] * data.ndim)]
    directions = header.get("space directions")
    spatial = [a for a in range(data.ndim) if kinds[a] in ("domain", "space")] if "kinds" in header else list(
        range(data.ndim))
    if directions is not None:
        directions = np.asarray(directions, dtype=float)
        spatial = [a for a in range(data.ndim) if a < len(directions) and np.all(np.isfinite(directions[a]))]
    extra = [a for a in range(data.ndim) if a not in spatial]
    if len(spatial) != 3 or any(data.shape[a] != 1 for a in extra):
        raise InvalidFormat(
            f"{path} holds an image of shape {list(data.shape)} (kinds {kinds}); a 3-D label map was expected",
            "Export one 3-D labelmap (in 3D Slicer: Export to labelmap volume, then save as .nrrd).",
        )
    data = data.reshape([data.shape[a] for a in spatial]) if extra else data
    meta: dict[str, Any] = {"source": str(path), "format": "nrrd", "nrrd_type": str(header.get("type", ""))}
    if directions is not None:
        space = str(header.get("space", "")).strip().lower()
        if space not in _NRRD_SPACES:
            raise InvalidFormat(
                f"{path} has NRRD space {header.get('space')!r}; expected an anatomical space such as "
                "'left-posterior-superior' or 'right-anterior-superior'",
                "Save the file from 3D Slicer or ITK, which write an anatomical space.",
            )
        flips = np.asarray(_NRRD_SPACES[space])
        origin = np.asarray(header.get("space origin", np.zeros(3)), dtype=float)
        if origin.shape != (3,) or not np.all(np.isfinite(origin)):
            origin = np.zeros(3)
        affine = np.eye(4)
        for column, axis in enumerate(spatial):
            affine[:3, column] = flips * directions[axis][:3]
        affine[:3, 3] = flips * origin[:3]
        meta["space"] = space
    else:
        spacings = np.asarray(header.get("spacings", [1.0] * data.ndim), dtype=float)
        spacings = np.where(np.isfinite(spacings) & (spacings > 0), spacings, 1.0)
        affine = np.diag([*[float(spacings[a]) for a in spatial], 1.0])
        meta["geometry"] = "spacings only"
    if abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise InvalidFormat(f"{path} has degenerate space directions (zero volume per voxel)",
                            "Fix the NRRD header's 'space directions'.")
    segments = _slicer_segments(header)
    if segments:
        meta["segments"] = segments
    return Volume(data=data, affine=affine, meta=meta)


def _slicer_segments(header: dict) -> dict[str, str]:
    segments: dict[str, str] = {}
    for key, value in header.items():
        if key.startswith("Segment") and key.endswith("_Name"):
            prefix = key[: -len("_Name")]
            label = header.get(f"{prefix}_LabelValue")
            if label is not None:
                segments[str(label).strip()] = str(value).strip()
    return segments


def _as_labels(data: np.ndarray, path: Path) -> np.ndarray:
    if data.dtype.kind in "iu":
        return data
    if data.dtype.kind == "b":
        return data.astype(np.uint8)
    if data.dtype.kind != "f":
        raise InvalidFormat(f"{path} stores {data.dtype} voxels; a label map holds integers",
                            "Save the label map with an integer voxel type.")
    finite = np.isfinite(data)
    if not np.all(finite):
        raise InvalidFormat(f"{path} holds NaN or infinite values; a label map holds integers",
                            "Save the label map with an integer voxel type.")
    rounded = np.rint(data)
    off = np.abs(rounded - data)
    if data.size and float(off.max()) > 1e-3:
        example = float(data.flat[int(np.argmax(off))])
        raise InvalidFormat(
            f"{path} holds non-integer values (e.g. {example:g}); a label map holds integer labels",
            "Give a label map (integer labels per voxel), not an intensity image.",
        )
    lo, hi = (float(rounded.min()), float(rounded.max())) if data.size else (0.0, 0.0)
    for candidate in (np.uint8, np.int16, np.uint16, np.int32):
        info = np.iinfo(candidate)
        if lo >= info.min and hi <= info.max:
            return rounded.astype(candidate)
    return rounded.astype(np.int64)


def _require_file(path: Path, what: str) -> None:
    if not path.exists():
        raise InputNotFound(f"{what} file {path} does not exist")
    if path.is_dir():
        raise InvalidFormat(f"{path} is a folder, not a {what} file",
                            "Give the file itself (a DICOM folder is read with load_volume or read_dicom).")


def _text(value) -> str:
    raw = value.item() if hasattr(value, "item") else value
    if isinstance(raw, bytes):
        raw = raw.decode("latin-1", "replace")
    return str(raw).strip("\x00 ")


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
