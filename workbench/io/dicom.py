"""DICOM series reader: a folder (or one file) of MR images to a :class:`~workbench.io.volume.Volume`.

What it reads
    A folder, walked recursively (hidden files and folders and ``DICOMDIR``
    are skipped; file names need no ``.dcm``), or a single file.  Classic
    single-frame files and enhanced multi-frame files (geometry in the
    per-frame / shared functional groups) are both supported, also mixed in
    one folder.  Files that are not DICOM, and DICOM objects without an image
    (structured reports, presentation states), are skipped and counted in
    ``meta["skipped_files"]``.  Files that look like cut-short DICOM (empty or
    all-NUL files, a ``DICM`` marker without a dataset, an image object
    without ``Rows``/pixels) are errors, so a lost slice never passes silently.

Grouping
    Images are grouped by ``SeriesInstanceUID``; within a series by echo
    (``EchoTime``, or ``EchoNumbers`` when the echo time is missing).  When a
    folder holds several series, ``series=`` picks one by UID, series number or
    description; otherwise :class:`~workbench.errors.DicomError` lists them.

Geometry
    Slices are sorted along the slice normal (row cosine x column cosine of
    ``ImageOrientationPatient``) by projecting ``ImagePositionPatient`` onto it.
    The voxel array is indexed ``[i=column, j=row, k=slice]`` and the affine is
    built from the orientation, ``PixelSpacing`` (row spacing, column spacing),
    the first slice position and the slice step measured from the positions,
    then converted from DICOM's LPS+ to the workbench's RAS+ (world x and y
    negated).  When the positions step off the normal (gantry tilt) the affine
    keeps the measured, sheared step and ``meta["sheared"]`` is true.  Missing
    or duplicate slices, uneven spacing, mixed orientations or image sizes are
    errors, never silently "fixed".

Intensities and dtype
    ``RescaleSlope``/``RescaleIntercept`` (top-level or per-frame) are applied.
    When any frame has a non-trivial slope or intercept the output is float32;
    otherwise the stored integer dtype (``uint16``/``int16``/``uint8`` ...) is
    kept, in native byte order.  Vendor-private scalings (e.g. Philips'
    ``(2005,100E)``) are not applied.

Multi-echo
    ``Volume.data`` is the first echo, ``Volume.echoes`` is ``(I, J, K, E)``
    sorted by echo time and ``Volume.echo_times_ms`` the matching times; every
    echo must have the same slice positions.  Single-echo series give
    ``echoes=None`` and ``echo_times_ms=[TE]`` (empty when TE is unknown).
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from workbench.errors import DicomError, InputNotFound, InvalidFormat
from workbench.io.volume import Volume

__all__ = ["SeriesInfo", "list_series", "read_dicom", "is_dicom_file"]

#: File name endings that are never DICOM; skipped without opening them.
NON_DICOM_SUFFIXES = (
    ".txt", ".md", ".json", ".xml", ".csv", ".tsv", ".html", ".htm", ".pdf", ".log", ".yaml", ".yml", ".ini",
    ".nii", ".nii.gz", ".gz", ".zip", ".tar", ".tgz", ".bz2", ".xz", ".7z", ".nrrd", ".nhdr", ".mha", ".mhd",
    ".png", ".jpg", ".jpeg", ".gif", ".bmp", ".tif", ".tiff", ".py", ".ipynb", ".sh", ".bat", ".exe",
    ".stl", ".ply", ".obj", ".vtk", ".npy", ".npz", ".h5", ".pkl", ".pt",
)
_MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"
#: GE private elements (creator ``GEMS_ACQU_01``) a later qDESS T2 fit reads: stored raw in ``meta``.
GE_PRIVATE_TAGS = {(0x0019, 0x10B6): "ge_0019_10b6", (0x0019, 0x10B7): "ge_0019_10b7"}
#: Pixel bytes kept from the first reading pass; beyond this files are read again for their pixels.
PIXEL_CACHE_BYTES = 512 * 1024**2

# tolerances
_ORIENTATION_TOL = 1e-3  # direction-cosine components
_SPACING_REL_TOL = 0.01  # 1% of the median slice step
_GAP_FACTOR = 1.5  # a step this many times the median means missing slices
_PIXEL_SPACING_REL_TOL = 1e-3

_DECODER_HINT = (
    "Install a decoder for it into the workbench's environment (pip install pylibjpeg pylibjpeg-libjpeg "
    "pylibjpeg-openjpeg, or pip install python-gdcm), or decompress the files first "
    "(dcmdjpeg in.dcm out.dcm, or gdcmconv --raw in.dcm out.dcm)."
)


@dataclass(frozen=True)
class SeriesInfo:
    """Summary of one DICOM series found under a path (see :func:`list_series`).

    Attributes:
        uid: ``SeriesInstanceUID`` (empty when the files have none).
        number: ``SeriesNumber`` or ``None``.
        description: ``SeriesDescription`` (empty when absent).
        n_files: number of files (a multi-frame file counts once).
        n_echoes: number of echoes (distinct echo times / echo numbers).
        echo_times_ms: the echo times, ascending (empty when unknown).
        shape: ``(columns, rows, slices per echo)``, i.e. the volume's ``(I, J, K)``.
        modality: ``Modality`` (e.g. ``"MR"``).
    """

    uid: str
    number: int | None
    description: str
    n_files: int
    n_echoes: int
    echo_times_ms: list[float]
    shape: tuple[int, int, int]
    modality: str = ""

    def label(self) -> str:
        """One-line human description: ``#8 'sag T2 MESE' (192 files, 8 echoes)``."""
        number = "#?" if self.number is None else f"#{self.number}"
        echoes = f", {self.n_echoes} echoes" if self.n_echoes > 1 else ""
        return f"{number} '{self.description}' ({self.n_files} files{echoes})"


# --------------------------------------------------------------------------- public API


def is_dicom_file(path: str | os.PathLike) -> bool:
    """True when ``path`` is a DICOM file: ``DICM`` at byte 128, or a preamble-less dataset pydicom can parse."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    if len(head) >= 132 and head[128:132] == b"DICM":
        return True
    if not _looks_like_raw_dataset(head):
        return False
    return _read_raw_header(path) is not None


def list_series(path: str | os.PathLike) -> list[SeriesInfo]:
    """List the DICOM image series under ``path`` (a folder, walked recursively, or one file).

    Raises :class:`~workbench.errors.InputNotFound` when ``path`` does not exist and
    :class:`~workbench.errors.InvalidFormat` when it holds no DICOM image.
    """
    path = Path(path)
    with _gc_paused():
        scan = _scan(path, keep_pixels=False)
        return [_series_info(files) for files in _sorted_series(scan.series)]


def read_dicom(path: str | os.PathLike, series: str | int | None = None) -> Volume:
    """Read one DICOM series into a :class:`~workbench.io.volume.Volume` (RAS+ affine, ``[column, row, slice]``).

    Args:
        path: a folder (searched recursively) or a single DICOM file (e.g. one
            enhanced multi-frame file).
        series: which series to read when there are several: its
            ``SeriesInstanceUID``, its ``SeriesNumber`` (as a string or int) or its
            ``SeriesDescription`` (case-insensitive).  ``None`` reads the only series.

    Returns:
        A volume whose ``data`` is the first echo; for multi-echo series
        ``echoes`` is ``(I, J, K, E)`` by ascending echo time.  ``meta`` holds the
        source path, series UID/number/description, modality, manufacturer, field
        strength, TR, flip angle, echo times and, when present, the GE private
        values ``ge_0019_10b6``/``ge_0019_10b7``.

    Raises:
        InputNotFound: ``path`` does not exist.
        InvalidFormat: no DICOM image under ``path`` / ``path`` is a non-DICOM file.
        DicomError: unreadable or truncated files, pixel data without a decoder,
            several series and no (or no matching) ``series``, missing or
            duplicate slices, uneven spacing, mixed orientation or image size.
    """
    path = Path(path)
    with _gc_paused():
        scan = _scan(path, keep_pixels=True)
        files = _select_series(scan, series)
        return _build_volume(path, files, scan)


# --------------------------------------------------------------------------- scanning


@contextlib.contextmanager
def _gc_paused():
    """Pause the cyclic garbage collector while thousands of pydicom objects are created.

    Parsing allocates many small container objects, which keeps triggering
    full collections that find nothing to free (about a third of the reading
    time on the MESE series, and most of its jitter).  Reference counting still
    frees memory as usual; the previous state is restored on exit.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


@dataclass
class _Frame:
    file: "_File"
    index: int | None  # frame number in a multi-frame file, None for a single-frame file
    position: np.ndarray | None  # LPS mm
    orientation: np.ndarray | None  # 6 direction cosines
    pixel_spacing: tuple[float, float] | None  # (row spacing, column spacing)
    echo_time: float | None
    echo_number: int | None
    slope: float
    intercept: float


@dataclass
class _File:
    path: Path
    ds: Any  # pydicom Dataset (pixels possibly dropped)
    has_pixels: bool
    frames: list[_Frame] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.path.name


@dataclass
class _Scan:
    root: Path
    series: dict[str, list[_File]]
    skipped: int


def _scan(path: Path, keep_pixels: bool) -> _Scan:
    if not path.exists():
        raise InputNotFound(f"DICOM input {path} does not exist")
    n_seen = 0
    if path.is_dir():
        candidates, n_seen = _walk(path)
        if n_seen == 0:
            raise InvalidFormat(
                f"No DICOM files in {path}: the folder is empty",
                "Point --input at the folder holding the series' DICOM files (or at a NIfTI file).",
            )
    else:
        candidates = [path]
    budget = PIXEL_CACHE_BYTES if keep_pixels else 0
    series: dict[str, list[_File]] = defaultdict(list)
    skipped = 0
    for candidate in candidates:
        entry = _read_file(candidate, keep_pixels=budget > 0)
        if entry is None:
            if not path.is_dir():
                what = "a DICOMDIR index, not an image file" if path.name.upper() == "DICOMDIR" else "not a DICOM file"
                raise InvalidFormat(
                    f"{path} is {what}",
                    "Give a DICOM folder or file, a NIfTI (.nii/.nii.gz) volume or an NRRD label map.",
                )
            skipped += 1
            continue
        if entry.has_pixels:
            budget -= len(entry.ds.PixelData)
            if budget <= 0:  # stop caching pixels; re-read them later for the chosen series only
                del entry.ds.PixelData
                entry.has_pixels = False
        if not _is_image(entry.ds):
            storage = _image_storage_name(entry.ds)
            if storage:  # an image object without its image attributes: cut short
                raise DicomError(
                    f"{candidate} is a {storage} file without Rows/Columns: it is truncated or damaged",
                    f"Copy the series again or remove {candidate.name} from the folder.",
                )
            if not path.is_dir():
                raise InvalidFormat(
                    f"{path} is a DICOM object without an image ({_sop_name(entry.ds) or 'no SOP class'})",
                    "Give the DICOM image series (a folder of images or an image file).",
                )
            skipped += 1
            continue
        entry.frames = _frames_of(entry)
        series[str(entry.ds.get("SeriesInstanceUID", "") or "")].append(entry)
    if not series:
        raise InvalidFormat(
            f"No DICOM files in {path}: none of its {n_seen} file(s) is a DICOM image",
            "Point --input at the folder holding the series' DICOM files (or at a NIfTI file).",
        )
    return _Scan(path, dict(series), skipped)


def _walk(root: Path) -> tuple[list[Path], int]:
    """Candidate files under ``root`` (sorted) and the number of visible files seen."""
    candidates: list[Path] = []
    seen = 0
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            if name.startswith("."):
                continue
            seen += 1
            if name.upper() == "DICOMDIR" or name.lower().endswith(NON_DICOM_SUFFIXES):
                continue
            candidates.append(Path(folder) / name)
    return candidates, seen


def _looks_like_raw_dataset(head: bytes) -> bool:
    """A preamble-less dataset starts with a group 0x0002/0x0008 tag (either byte order)."""
    if len(head) < 8:
        return False
    group_le = int.from_bytes(head[0:2], "little")
    group_be = int.from_bytes(head[0:2], "big")
    return group_le in (0x0002, 0x0008) or group_be in (0x0002, 0x0008)


def _read_raw_header(path: Path):
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    except Exception:
        return None
    if not any(k in ds for k in ("SOPClassUID", "SeriesInstanceUID", "Rows")):
        return None
    return ds


def _read_file(path: Path, keep_pixels: bool) -> _File | None:
    """Read one file's dataset; ``None`` when it is not DICOM (or is a DICOMDIR)."""
    import pydicom

    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError as exc:
        raise DicomError(f"Cannot read {path}: {exc.strerror or exc}", "Check the file's permissions.") from exc
    preamble = len(head) >= 132 and head[128:132] == b"DICM"
    if len(head) < 132 and not head[:128].strip(b"\0"):  # empty, or cut off inside the 128-byte preamble
        raise DicomError(
            f"{path} is {'empty' if not head else 'only NUL bytes'} ({len(head)} bytes): a DICOM file cut short "
            "before its DICM marker",
            f"Copy the series again or remove {path.name} from the folder.",
        )
    if not preamble and not _looks_like_raw_dataset(head):
        return None
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=not keep_pixels, force=not preamble)
    except Exception as exc:
        if not preamble:
            return None
        raise DicomError(
            f"Cannot read the DICOM file {path}: {_one_line(exc)}",
            f"The file is damaged or truncated; copy it again or remove {path.name} from the folder.",
        ) from exc
    identified = any(k in ds for k in ("SOPClassUID", "SeriesInstanceUID", "Rows"))
    sop_class = str(ds.get("SOPClassUID", "") or getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", ""))
    if not identified:
        if not preamble:
            return None
        if not sop_class:  # a DICM marker but no dataset to speak of
            raise DicomError(
                f"{path} has a DICOM marker but no readable dataset (no SOP Class UID): it is truncated or damaged",
                f"Copy the series again or remove {path.name} from the folder.",
            )
    if sop_class == _MEDIA_STORAGE_DIRECTORY:
        return None
    _ensure_transfer_syntax(ds)
    return _File(path, ds, has_pixels=keep_pixels and "PixelData" in ds)


def _ensure_transfer_syntax(ds) -> None:
    """Preamble-less files have no file meta; record the encoding they were read with."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" in meta:
        return
    if meta is None:
        ds.file_meta = meta = FileMetaDataset()
    implicit, little = getattr(ds, "original_encoding", (True, True))
    if implicit is None:
        implicit, little = True, True
    meta.TransferSyntaxUID = (
        ImplicitVRLittleEndian if implicit else (ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    )


def _is_image(ds) -> bool:
    return "Rows" in ds and "Columns" in ds


def _sop_name(ds) -> str:
    """The name of the file's SOP class (its UID when unknown), ``""`` when it has none."""
    from pydicom.uid import UID

    uid = ds.get("SOPClassUID") or getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", None)
    return UID(str(uid)).name if uid else ""


def _image_storage_name(ds) -> str:
    """The SOP class name when the file claims to be an image storage object, else ``""``."""
    name = _sop_name(ds)
    return name if "Image Storage" in name else ""


def _frames_of(entry: _File) -> list[_Frame]:
    ds = entry.ds
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    top_position = _floats(ds.get("ImagePositionPatient"), 3)
    top_orientation = _floats(ds.get("ImageOrientationPatient"), 6)
    top_spacing = _floats(ds.get("PixelSpacing"), 2)
    top_te = _float(ds.get("EchoTime"))
    top_echo_number = _int(ds.get("EchoNumbers"))
    top_slope = _float(ds.get("RescaleSlope"))
    top_intercept = _float(ds.get("RescaleIntercept"))
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if not per_frame:
        if n_frames > 1 and top_position is not None:
            raise DicomError(
                f"{entry.path} holds {n_frames} frames but no per-frame positions "
                "(PerFrameFunctionalGroupsSequence); its slice geometry is unknown",
                "Convert the file to an enhanced or single-frame series (e.g. with dcm2niix or emf2sf).",
            )
        return [
            _Frame(entry, None if n_frames == 1 else 0, top_position, top_orientation,
                   _pair(top_spacing), top_te, top_echo_number,
                   1.0 if top_slope is None else top_slope, 0.0 if top_intercept is None else top_intercept)
        ]
    if len(per_frame) != n_frames:
        raise DicomError(
            f"{entry.path} declares {n_frames} frames but has {len(per_frame)} per-frame functional groups",
            "The file is damaged; export it again from the scanner or PACS.",
        )
    shared_seq = ds.get("SharedFunctionalGroupsSequence")
    shared = shared_seq[0] if shared_seq else None
    frames = []
    for index, item in enumerate(per_frame):
        position = _floats(_group_value(item, shared, "PlanePositionSequence", "ImagePositionPatient"), 3)
        orientation = _floats(_group_value(item, shared, "PlaneOrientationSequence", "ImageOrientationPatient"), 6)
        spacing = _floats(_group_value(item, shared, "PixelMeasuresSequence", "PixelSpacing"), 2)
        te = _float(_group_value(item, shared, "MREchoSequence", "EffectiveEchoTime"))
        slope = _float(_group_value(item, shared, "PixelValueTransformationSequence", "RescaleSlope"))
        intercept = _float(_group_value(item, shared, "PixelValueTransformationSequence", "RescaleIntercept"))
        frames.append(_Frame(
            entry, index,
            position if position is not None else top_position,
            orientation if orientation is not None else top_orientation,
            _pair(spacing if spacing is not None else top_spacing),
            te if te is not None else top_te,
            top_echo_number,
            slope if slope is not None else (1.0 if top_slope is None else top_slope),
            intercept if intercept is not None else (0.0 if top_intercept is None else top_intercept),
        ))
    return frames


def _group_value(item, shared, sequence: str, keyword: str):
    for source in (item, shared):
        if source is None:
            continue
        seq = source.get(sequence)
        if seq and keyword in seq[0]:
            return seq[0].get(keyword)
    return None


# --------------------------------------------------------------------------- series selection


def _series_info(files: list[_File]) -> SeriesInfo:
    ds = files[0].ds
    frames = [f for entry in files for f in entry.frames]
    echoes = _echo_groups(frames)
    times = [t for t in (_group_te(g) for g in echoes.values()) if t is not None]
    first = next(iter(echoes.values()))
    return SeriesInfo(
        uid=str(ds.get("SeriesInstanceUID", "") or ""),
        number=_int(ds.get("SeriesNumber")),
        description=str(ds.get("SeriesDescription", "") or ""),
        n_files=len(files),
        n_echoes=len(echoes),
        echo_times_ms=sorted(times) if len(times) == len(echoes) else [],
        shape=(int(ds.Columns), int(ds.Rows), len(first)),
        modality=str(ds.get("Modality", "") or ""),
    )


def _sorted_series(series: dict[str, list[_File]]) -> list[list[_File]]:
    def key(files: list[_File]):
        number = _int(files[0].ds.get("SeriesNumber"))
        return (number is None, number or 0, str(files[0].ds.get("SeriesDescription", "")), files[0].name)

    return sorted(series.values(), key=key)


def _select_series(scan: _Scan, series: str | int | None) -> list[_File]:
    groups = _sorted_series(scan.series)
    infos = [_series_info(files) for files in groups]
    listing = "; ".join(info.label() for info in infos)
    if series is None:
        if len(groups) == 1:
            return groups[0]
        raise DicomError(
            f"{scan.root} holds {len(groups)} DICOM series: {listing}",
            "Pass --series with the series number, description or UID of the one to read "
            f"(e.g. --series {infos[-1].number if infos[-1].number is not None else infos[-1].uid}).",
        )
    wanted = str(series).strip()
    for matcher in (
        lambda info: info.uid == wanted,
        lambda info: info.number is not None and str(info.number) == wanted,
        lambda info: info.description.strip().lower() == wanted.lower(),
    ):
        hits = [i for i, info in enumerate(infos) if matcher(info)]
        if len(hits) == 1:
            return groups[hits[0]]
        if len(hits) > 1:
            raise DicomError(
                f"--series {wanted!r} matches {len(hits)} series in {scan.root}: "
                + "; ".join(f"{infos[i].label()} uid {infos[i].uid}" for i in hits),
                "Pass the SeriesInstanceUID to pick one of them.",
            )
    raise DicomError(
        f"No series matches --series {wanted!r} in {scan.root}; it holds: {listing}",
        "Pass --series with one of the listed series numbers or descriptions, or a SeriesInstanceUID.",
    )


# --------------------------------------------------------------------------- volume assembly


def _echo_groups(frames: list[_Frame]) -> dict[tuple, list[_Frame]]:
    """Frames by echo, ordered by echo time, then echo number.

    An echo is a distinct (``EchoTime``, ``EchoNumbers``) pair; either part is
    left out when some frames lack it.  Pairing both keeps apart echoes that
    report the same echo time with different echo numbers (as some GE DESS
    exports do).
    """
    use_te = all(f.echo_time is not None for f in frames)
    use_number = all(f.echo_number is not None for f in frames)
    groups: dict[tuple, list[_Frame]] = defaultdict(list)
    for frame in frames:
        key = (round(frame.echo_time, 3) if use_te else None, frame.echo_number if use_number else None)
        groups[key].append(frame)
    return {k: groups[k] for k in sorted(groups, key=lambda k: (k[0] or 0.0, k[1] or 0))}


def _echo_name(key: tuple) -> str:
    te, number = key
    parts = ([f"echo {number}"] if number is not None else ["echo"]) + ([f"TE {te:g} ms"] if te is not None else [])
    return " ".join(parts)


def _group_te(frames: list[_Frame]) -> float | None:
    times = [f.echo_time for f in frames if f.echo_time is not None]
    return float(np.median(times)) if len(times) == len(frames) else None


def _frame_name(frame: _Frame) -> str:
    return frame.file.name if frame.index is None else f"{frame.file.name} (frame {frame.index + 1})"


def _build_volume(path: Path, files: list[_File], scan: _Scan) -> Volume:
    ds0 = files[0].ds
    label = _series_label(ds0, path)
    frames = [f for entry in files for f in entry.frames]
    _check_uniform(frames, label)
    reference = frames[0]
    row_cos = reference.orientation[:3] / np.linalg.norm(reference.orientation[:3])
    col_cos = reference.orientation[3:] / np.linalg.norm(reference.orientation[3:])
    normal = np.cross(row_cos, col_cos)
    normal /= np.linalg.norm(normal)
    row_spacing, col_spacing = reference.pixel_spacing

    echoes = _echo_groups(frames)
    def along_normal(frame: _Frame) -> tuple[float, int]:
        return float(frame.position @ normal), _int(frame.file.ds.get("InstanceNumber")) or 0

    ordered = [sorted(frames_e, key=along_normal) for frames_e in echoes.values()]
    first = ordered[0]
    step_vector, sheared = _slice_step(first, normal, label, ds0, min(row_spacing, col_spacing))
    _check_echoes_match(ordered, list(echoes), step_vector, label)

    lps = np.eye(4)
    lps[:3, 0] = row_cos * col_spacing
    lps[:3, 1] = col_cos * row_spacing
    lps[:3, 2] = step_vector
    lps[:3, 3] = first[0].position
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps

    stack = _assemble(ordered, files)
    times = [_group_te(g) for g in ordered]
    echo_times = [float(t) for t in times] if all(t is not None for t in times) else []
    data = np.array(stack[..., 0]) if stack.shape[-1] > 1 else stack[..., 0]
    meta = _meta(path, files, ordered, echo_times, scan, sheared, stack.dtype)
    return Volume(
        data=data,
        affine=affine,
        echoes=stack if stack.shape[-1] > 1 else None,
        echo_times_ms=echo_times,
        meta=meta,
    )


def _series_label(ds, path: Path) -> str:
    number = _int(ds.get("SeriesNumber"))
    description = str(ds.get("SeriesDescription", "") or "")
    parts = ["DICOM series"]
    if number is not None:
        parts.append(f"#{number}")
    if description:
        parts.append(f"'{description}'")
    parts.append(f"in {path}")
    return " ".join(parts)


def _check_uniform(frames: list[_Frame], label: str) -> None:
    for frame in frames:
        missing = [name for name, value in (("ImagePositionPatient", frame.position),
                                            ("ImageOrientationPatient", frame.orientation),
                                            ("PixelSpacing", frame.pixel_spacing)) if value is None]
        if missing:
            raise DicomError(
                f"{_frame_name(frame)} of {label} has no {' or '.join(missing)}; its position in space is unknown",
                "Only images with patient geometry can be read; pick another series with --series.",
            )
        ds = frame.file.ds
        if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
            raise DicomError(
                f"{_frame_name(frame)} of {label} is a colour image (SamplesPerPixel {ds.SamplesPerPixel})",
                "Only greyscale MR/CT images can be read; pick another series with --series.",
            )
    ref = frames[0]
    ref_ds = ref.file.ds
    for frame in frames[1:]:
        ds = frame.file.ds
        if (int(ds.Rows), int(ds.Columns)) != (int(ref_ds.Rows), int(ref_ds.Columns)):
            raise DicomError(
                f"Mixed image sizes in {label}: {_frame_name(ref)} is {int(ref_ds.Rows)} rows x "
                f"{int(ref_ds.Columns)} columns, {_frame_name(frame)} is {int(ds.Rows)} x {int(ds.Columns)}",
                "The folder mixes series or reconstructions; keep one series per folder or pick one with --series.",
            )
        if np.max(np.abs(frame.orientation - ref.orientation)) > _ORIENTATION_TOL:
            raise DicomError(
                f"Mixed slice orientations in {label}: {_frame_name(ref)} has ImageOrientationPatient "
                f"{_fmt(ref.orientation)}, {_frame_name(frame)} has {_fmt(frame.orientation)}",
                "A series with several orientations (e.g. a 3-plane localizer) is not a volume; pick another "
                "series with --series.",
            )
        if not np.allclose(frame.pixel_spacing, ref.pixel_spacing, rtol=_PIXEL_SPACING_REL_TOL, atol=0):
            raise DicomError(
                f"Mixed pixel spacings in {label}: {_frame_name(ref)} has {_fmt(ref.pixel_spacing)} mm, "
                f"{_frame_name(frame)} has {_fmt(frame.pixel_spacing)} mm",
                "The folder mixes reconstructions; keep one series per folder or pick one with --series.",
            )


def _slice_step(frames: list[_Frame], normal: np.ndarray, label: str, ds0, pixel: float) -> tuple[np.ndarray, bool]:
    """The slice step vector (LPS mm) measured from the sorted positions; checks gaps and spacing."""
    positions = np.array([f.position for f in frames], dtype=float)
    if len(frames) == 1:
        thickness = _float(ds0.get("SpacingBetweenSlices")) or _float(ds0.get("SliceThickness")) or 1.0
        return normal * abs(thickness), False
    along = positions @ normal
    steps = np.diff(along)
    duplicate_tol = 0.01  # mm
    dup = np.flatnonzero(steps <= max(duplicate_tol, 0.05 * float(np.median(np.abs(steps)))))
    if dup.size:
        a, b = frames[dup[0]], frames[dup[0] + 1]
        raise DicomError(
            f"Duplicate slice positions in {label}: {_frame_name(a)} and {_frame_name(b)} are both at "
            f"{along[dup[0]]:.3f} mm along the slice normal ({dup.size} duplicate(s) in all)",
            "The folder holds a file twice or several volumes in one series (time points, b-values); keep one "
            "copy of each slice.",
        )
    median = float(np.median(steps))
    gaps = np.flatnonzero(steps > _GAP_FACTOR * median)
    if gaps.size:
        g = gaps[0]
        missing = int(round(steps[g] / median)) - 1
        raise DicomError(
            f"Missing slice in {label}: {steps[g]:.3f} mm between {_frame_name(frames[g])} and "
            f"{_frame_name(frames[g + 1])}, {steps[g] / median:.1f}x the usual {median:.3f} mm "
            f"(about {max(missing, 1)} slice(s) missing, {gaps.size} gap(s) in all)",
            "Copy the complete series again: a file is missing or was not exported.",
        )
    tolerance = max(_SPACING_REL_TOL * median, 1e-3)
    uneven = np.flatnonzero(np.abs(steps - median) > tolerance)
    if uneven.size:
        u = uneven[0]
        raise DicomError(
            f"Uneven slice spacing in {label}: steps from {steps.min():.3f} to {steps.max():.3f} mm (median "
            f"{median:.3f} mm), first off between {_frame_name(frames[u])} and {_frame_name(frames[u + 1])}",
            "The series is not a regular grid; re-export it from the scanner or resample it with a tool that "
            "handles variable slice spacing.",
        )
    count = len(frames) - 1
    measured = (positions[-1] - positions[0]) / count
    off_line = positions - (positions[0] + np.outer(np.arange(len(frames)), measured))
    worst = int(np.argmax(np.linalg.norm(off_line, axis=1)))
    if np.linalg.norm(off_line[worst]) > max(0.1 * pixel, tolerance):
        raise DicomError(
            f"Slice positions of {label} do not lie on a straight line: {_frame_name(frames[worst])} is "
            f"{np.linalg.norm(off_line[worst]):.3f} mm off",
            "The series is not a regular grid; re-export it from the scanner.",
        )
    along_step = float(measured @ normal)
    in_plane = measured - along_step * normal
    if np.linalg.norm(in_plane) * count <= max(0.1 * pixel, tolerance):
        return normal * along_step, False
    return measured, True  # gantry tilt: keep the sheared step


def _check_echoes_match(ordered: list[list[_Frame]], keys: list[tuple], step_vector: np.ndarray, label: str) -> None:
    """Every echo must have as many slices as the first, at the same positions."""
    if len(ordered) < 2:
        return
    reference = np.array([f.position for f in ordered[0]])
    tolerance = max(_SPACING_REL_TOL * float(np.linalg.norm(step_vector)), 1e-3)
    for key, frames in zip(keys[1:], ordered[1:]):
        name = _echo_name(key)
        if len(frames) != len(reference):
            raise DicomError(
                f"Echoes of {label} differ in slice count: {name} has {len(frames)} slices, the first echo "
                f"{len(reference)}",
                "Copy the complete series again: files of one echo are missing.",
            )
        positions = np.array([f.position for f in frames])
        diff = np.linalg.norm(positions - reference, axis=1)
        if float(diff.max()) > tolerance:
            worst = int(np.argmax(diff))
            raise DicomError(
                f"Echoes of {label} are at different slice positions: {_frame_name(frames[worst])} ({name}) is "
                f"{diff[worst]:.3f} mm from {_frame_name(ordered[0][worst])} of the first echo",
                "Each echo must cover the same slices; pick a single-echo series with --series.",
            )


def _assemble(ordered: list[list[_Frame]], files: list[_File]) -> np.ndarray:
    """Stack decoded pixels as ``(I=columns, J=rows, K, E)``, rescaled where needed."""
    rescale = any(f.slope != 1.0 or f.intercept != 0.0 for frames in ordered for f in frames)
    pixels: dict[Path, np.ndarray] = {}
    for entry in files:
        pixels[entry.path] = _decode(entry)
    if rescale:
        dtype = np.dtype(np.float32)
    else:
        dtype = np.result_type(*{a.dtype.newbyteorder("=") for a in pixels.values()})
    n_rows, n_cols = int(files[0].ds.Rows), int(files[0].ds.Columns)
    out = np.empty((n_cols, n_rows, len(ordered[0]), len(ordered)), dtype=dtype, order="F")
    for e, frames in enumerate(ordered):
        for k, frame in enumerate(frames):
            array = pixels[frame.file.path]
            if frame.index is not None and array.ndim == 3:
                array = array[frame.index]
            if array.shape != (n_rows, n_cols):
                raise DicomError(
                    f"Pixel data of {_frame_name(frame)} has shape {list(array.shape)}, expected "
                    f"[{n_rows}, {n_cols}] (Rows, Columns)",
                    "The file is damaged; copy the series again.",
                )
            if rescale:
                out[:, :, k, e] = (array.T.astype(np.float32) * np.float32(frame.slope)) + np.float32(frame.intercept)
            else:
                out[:, :, k, e] = array.T
    return out


def _decode(entry: _File) -> np.ndarray:
    """The file's pixel array (frames first for multi-frame), with typed errors."""
    import pydicom
    from pydicom.pixels import get_decoder

    ds = entry.ds
    if not entry.has_pixels:
        try:
            ds = pydicom.dcmread(entry.path, force=True)
        except Exception as exc:
            raise DicomError(
                f"Cannot read the pixel data of {entry.path}: {_one_line(exc)}",
                f"The file is damaged or truncated; copy it again or remove {entry.name}.",
            ) from exc
        _ensure_transfer_syntax(ds)
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise DicomError(
            f"{entry.path} has no pixel data (the file is truncated or damaged)",
            f"Copy the series again or remove {entry.name} from the folder.",
        )
    syntax = ds.file_meta.TransferSyntaxUID
    if syntax.is_compressed:
        try:
            decoder = get_decoder(syntax)
            available, missing = decoder.is_available, list(decoder.missing_dependencies)
        except NotImplementedError:
            available, missing = False, []
        if not available:
            raise DicomError(
                f"Cannot decode {entry.path}: its transfer syntax {syntax.name} ({syntax}) needs a decoder "
                "that is not installed" + (f" (one of: {'; '.join(missing)})" if missing else ""),
                _DECODER_HINT,
            )
    try:
        array = _native_pixels(ds)
        if array is None:
            array = ds.pixel_array
    except Exception as exc:
        compressed = f" (transfer syntax {syntax.name})" if syntax.is_compressed else ""
        raise DicomError(
            f"Cannot decode the pixel data of {entry.path}{compressed}: {_one_line(exc)}",
            f"The file is truncated or damaged; copy it again or remove {entry.name}."
            + (" " + _DECODER_HINT if syntax.is_compressed else ""),
        ) from exc
    if entry.has_pixels:  # free the cached raw bytes once decoded
        del entry.ds.PixelData
        entry.has_pixels = False
    return array


def _native_pixels(ds) -> np.ndarray | None:
    """Fast path for uncompressed greyscale integer pixels: a view on the raw bytes, else ``None``.

    Gives exactly what ``ds.pixel_array`` gives with pydicom's defaults (no
    masking of unused high bits) for 8/16/32-bit single-sample native data; every
    other case (compressed, colour, 1-bit, float pixel data, short buffers)
    returns ``None`` and goes through pydicom's decoders.
    """
    syntax = ds.file_meta.TransferSyntaxUID
    if syntax.is_compressed or syntax.is_deflated or "PixelData" not in ds:
        return None
    bits = int(ds.get("BitsAllocated", 0) or 0)
    if bits not in (8, 16, 32) or int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        return None
    rows, cols = int(ds.Rows), int(ds.Columns)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    kind = "i" if int(ds.get("PixelRepresentation", 0) or 0) == 1 else "u"
    dtype = np.dtype(f"{'<' if syntax.is_little_endian else '>'}{kind}{bits // 8}")
    raw = ds.PixelData
    count = rows * cols * frames
    if not isinstance(raw, (bytes, bytearray)) or len(raw) < count * dtype.itemsize:
        return None
    array = np.frombuffer(raw, dtype=dtype, count=count)
    return array.reshape((frames, rows, cols) if frames > 1 else (rows, cols))


# --------------------------------------------------------------------------- metadata


def _meta(path, files, ordered, echo_times, scan, sheared, dtype) -> dict[str, Any]:
    ds = files[0].ds
    slopes = {(f.slope, f.intercept) for frames in ordered for f in frames}
    meta: dict[str, Any] = {
        "source": str(path),
        "format": "dicom",
        "series_uid": str(ds.get("SeriesInstanceUID", "") or ""),
        "series_number": _int(ds.get("SeriesNumber")),
        "series_description": str(ds.get("SeriesDescription", "") or ""),
        "study_uid": str(ds.get("StudyInstanceUID", "") or ""),
        "modality": str(ds.get("Modality", "") or ""),
        "manufacturer": str(ds.get("Manufacturer", "") or ""),
        "manufacturer_model": str(ds.get("ManufacturerModelName", "") or ""),
        "magnetic_field_strength_t": _float(ds.get("MagneticFieldStrength")),
        "repetition_time_ms": _float(ds.get("RepetitionTime")),
        "flip_angle_deg": _float(ds.get("FlipAngle")),
        "echo_times_ms": list(echo_times),
        "n_echoes": len(ordered),
        "n_files": len(files),
        "n_slices": len(ordered[0]),
        "slice_thickness_mm": _float(ds.get("SliceThickness")),
        "spacing_between_slices_mm": _float(ds.get("SpacingBetweenSlices")),
        "pixel_spacing_mm": [float(v) for v in ordered[0][0].pixel_spacing],
        "mr_acquisition_type": str(ds.get("MRAcquisitionType", "") or ""),
        "patient_position": str(ds.get("PatientPosition", "") or ""),
        "transfer_syntax": str(ds.file_meta.TransferSyntaxUID),
        "multiframe": any(f.index is not None for f in ordered[0]),
        "dtype": str(dtype),
        "rescaled": any(s != (1.0, 0.0) for s in slopes),
        "sheared": bool(sheared),
        "skipped_files": scan.skipped,
        "first_file": str(ordered[0][0].file.path),
    }
    if len(slopes) == 1:
        slope, intercept = next(iter(slopes))
        meta["rescale_slope"], meta["rescale_intercept"] = float(slope), float(intercept)
    numbers = [f[0].echo_number for f in ordered]
    if all(n is not None for n in numbers):
        meta["echo_numbers"] = [int(n) for n in numbers]
    if ordered[0][0].file.ds.get((0x0019, 0x0010)) is not None:
        meta["private_creator_0019"] = str(ordered[0][0].file.ds[(0x0019, 0x0010)].value).strip()
    source = ordered[0][0].file.ds
    for tag, key in GE_PRIVATE_TAGS.items():
        if tag in source:
            meta[key] = _raw_value(source[tag].value)
    return meta


def _raw_value(value):
    """A private element's value as plain JSON-friendly data (bytes decoded, multi-values as lists)."""
    if isinstance(value, (bytes, bytearray)):
        text = bytes(value).decode("latin-1").strip("\x00 ")
        return text
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return [_raw_value(v) for v in value]
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    return str(value)


# --------------------------------------------------------------------------- small helpers


def _float(value) -> float | None:
    if value is None or value == "":
        return None
    try:
        if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
            value = value[0]
        return float(value)
    except (TypeError, ValueError, IndexError):
        return None


def _int(value) -> int | None:
    f = _float(value)
    return None if f is None else int(f)


def _floats(value, n: int) -> np.ndarray | None:
    if value is None:
        return None
    try:
        values = [float(v) for v in value]
    except (TypeError, ValueError):
        return None
    if len(values) != n or not np.all(np.isfinite(values)):
        return None
    return np.asarray(values, dtype=float)


def _pair(values: np.ndarray | None) -> tuple[float, float] | None:
    if values is None or np.any(np.asarray(values) <= 0):
        return None
    return float(values[0]), float(values[1])


def _fmt(values: Sequence[float]) -> str:
    return "[" + ", ".join(f"{v:.4g}" for v in values) + "]"


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
