"""Synthetic, valid MR DICOM files for the I/O tests (written with pydicom).

Everything here starts from a known RAS+ affine and a voxel array indexed
``[i=column, j=row, k=slice]`` (the workbench convention) and writes what a
scanner would: LPS ``ImagePositionPatient``/``ImageOrientationPatient``,
``PixelSpacing`` as (row spacing, column spacing), stored integers with
optional ``RescaleSlope``/``RescaleIntercept``, one file per slice (and per
echo), or a single enhanced multi-frame file with per-frame functional groups.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Sequence

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

ENHANCED_MR_STORAGE = "1.2.840.10008.5.1.4.1.1.4.1"
LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def rotation(angles_deg: Sequence[float]) -> np.ndarray:
    """A 3x3 rotation from three angles (degrees) about x, y and z."""
    ax, ay, az = np.deg2rad(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def oblique_affine(
    spacing: Sequence[float] = (0.7, 0.6, 3.0),
    angles_deg: Sequence[float] = (12.0, -20.0, 7.0),
    origin: Sequence[float] = (-40.5, 25.25, 60.0),
    base: np.ndarray | None = None,
) -> np.ndarray:
    """A RAS+ affine with rotated (oblique) axes; its third column follows the DICOM slice normal.

    ``base`` (3x3, orthonormal) is the unrotated axis frame; by default a
    sagittal-like frame (columns along A, rows along -S).
    """
    if base is None:
        base = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])  # i->A, j->-S, k->R (RAS)
    axes = rotation(angles_deg) @ base
    # make the third axis the DICOM normal (row x column in LPS) so slice order is preserved on reading
    lps_axes = LPS[:3, :3] @ axes
    normal = np.cross(lps_axes[:, 0], lps_axes[:, 1])
    if normal @ lps_axes[:, 2] < 0:
        axes[:, 2] = -axes[:, 2]
    affine = np.eye(4)
    affine[:3, :3] = axes * np.asarray(spacing, float)
    affine[:3, 3] = origin
    return affine


def _geometry(affine_ras: np.ndarray):
    lps = LPS @ np.asarray(affine_ras, float)
    col_step, row_step, slice_step = lps[:3, 0], lps[:3, 1], lps[:3, 2]
    col_spacing, row_spacing = float(np.linalg.norm(col_step)), float(np.linalg.norm(row_step))
    iop = [*(col_step / col_spacing), *(row_step / row_spacing)]
    return lps[:3, 3], slice_step, iop, [row_spacing, col_spacing]


def _ds(s: float) -> str:
    """A DS string (at most 16 characters) holding ``s`` as precisely as fits."""
    for digits in range(10, 3, -1):
        text = f"{s:.{digits}g}"
        if len(text) <= 16:
            return text
    raise ValueError(s)


def _file_dataset(path: Path, sop_class: str, sop_uid: str) -> FileDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.Modality = "MR"
    ds.Manufacturer = "GE MEDICAL SYSTEMS"
    ds.MagneticFieldStrength = "3"
    ds.RepetitionTime = "2450"
    ds.FlipAngle = "90"
    ds.PatientName = "Synthetic^Knee"
    ds.PatientID = "SYN001"
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.8.498.2"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    return ds


def _pixel_module(ds: Dataset, stored: np.ndarray) -> None:
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1 if stored.dtype == np.int16 else 0


def write_series(
    folder: str | Path,
    stored: np.ndarray,
    affine_ras: np.ndarray,
    *,
    echo_times_ms: Sequence[float] | None = None,
    slope: float | None = None,
    intercept: float | None = None,
    series_uid: str | None = None,
    series_number: int = 5,
    description: str = "synthetic sag",
    suffix: str = ".dcm",
    name_prefix: str = "IM",
    shuffle_names: bool = True,
    private_ge: dict[int, str] | None = None,
    seed: int = 0,
) -> list[Path]:
    """Write one file per slice (and per echo) of ``stored``, in random order under random names.

    ``stored`` is ``(I, J, K)`` or ``(I, J, K, E)`` of int16/uint16 stored values;
    the real values are ``stored * slope + intercept`` when those are given.
    ``private_ge`` maps GE private elements (e.g. ``0x10B6``) in group 0x0019
    to DS strings. Returns the paths written.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stored = np.asarray(stored)
    if stored.ndim == 3:
        stored = stored[..., None]
    n_i, n_j, n_k, n_e = stored.shape
    tes = list(echo_times_ms) if echo_times_ms is not None else [10.0 * (e + 1) for e in range(n_e)]
    series_uid = series_uid or generate_uid()
    origin, step, iop, pixel_spacing = _geometry(affine_ras)
    rng = random.Random(seed)
    jobs = [(k, e) for k in range(n_k) for e in range(n_e)]
    numbers = list(range(1, len(jobs) + 1))
    if shuffle_names:
        rng.shuffle(numbers)
    paths = []
    for (k, e), number in zip(jobs, numbers):
        sop_uid = generate_uid()
        path = folder / f"{name_prefix}{number:04d}{suffix}"
        ds = _file_dataset(path, MRImageStorage, sop_uid)
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = series_number
        ds.SeriesDescription = description
        ds.InstanceNumber = k * n_e + e + 1
        ds.EchoTime = _ds(tes[e])
        ds.EchoNumbers = e + 1
        ds.ImagePositionPatient = [_ds(v) for v in origin + k * step]
        ds.ImageOrientationPatient = [_ds(v) for v in iop]
        ds.PixelSpacing = [_ds(v) for v in pixel_spacing]
        ds.SliceThickness = _ds(float(np.linalg.norm(step)))
        ds.Rows, ds.Columns = n_j, n_i
        _pixel_module(ds, stored)
        if slope is not None:
            ds.RescaleSlope = _ds(slope)
        if intercept is not None:
            ds.RescaleIntercept = _ds(intercept)
        if private_ge:
            block = ds.private_block(0x0019, "GEMS_ACQU_01", create=True)
            for element, value in private_ge.items():
                block.add_new(element & 0xFF, "DS", value)
        ds.PixelData = np.ascontiguousarray(stored[:, :, k, e].T).tobytes()
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def write_multiframe(
    path: str | Path,
    stored: np.ndarray,
    affine_ras: np.ndarray,
    *,
    echo_times_ms: Sequence[float] | None = None,
    slope: float | None = None,
    intercept: float | None = None,
    series_number: int = 7,
    description: str = "enhanced MR",
    shuffle_frames: bool = True,
    seed: int = 0,
) -> Path:
    """Write ``stored`` (``(I, J, K)`` or ``(I, J, K, E)``) as one Enhanced MR multi-frame file.

    Geometry goes into the per-frame functional groups (plane position, echo
    time) and the shared ones (orientation, pixel measures, rescale); frames
    are stored in shuffled order unless ``shuffle_frames`` is false.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    stored = np.asarray(stored)
    if stored.ndim == 3:
        stored = stored[..., None]
    n_i, n_j, n_k, n_e = stored.shape
    tes = list(echo_times_ms) if echo_times_ms is not None else [10.0 * (e + 1) for e in range(n_e)]
    origin, step, iop, pixel_spacing = _geometry(affine_ras)
    ds = _file_dataset(path, ENHANCED_MR_STORAGE, generate_uid())
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = series_number
    ds.SeriesDescription = description
    ds.InstanceNumber = 1
    ds.Rows, ds.Columns = n_j, n_i
    _pixel_module(ds, stored)

    shared = Dataset()
    measures = Dataset()
    measures.PixelSpacing = [_ds(v) for v in pixel_spacing]
    measures.SliceThickness = _ds(float(np.linalg.norm(step)))
    shared.PixelMeasuresSequence = DicomSequence([measures])
    orientation = Dataset()
    orientation.ImageOrientationPatient = [_ds(v) for v in iop]
    shared.PlaneOrientationSequence = DicomSequence([orientation])
    if slope is not None or intercept is not None:
        transform = Dataset()
        transform.RescaleSlope = _ds(1.0 if slope is None else slope)
        transform.RescaleIntercept = _ds(0.0 if intercept is None else intercept)
        transform.RescaleType = "US"
        shared.PixelValueTransformationSequence = DicomSequence([transform])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])

    frames = [(k, e) for e in range(n_e) for k in range(n_k)]
    if shuffle_frames:
        random.Random(seed).shuffle(frames)
    per_frame = []
    for k, e in frames:
        item = Dataset()
        position = Dataset()
        position.ImagePositionPatient = [_ds(v) for v in origin + k * step]
        item.PlanePositionSequence = DicomSequence([position])
        echo = Dataset()
        echo.EffectiveEchoTime = tes[e]
        item.MREchoSequence = DicomSequence([echo])
        content = Dataset()
        content.InStackPositionNumber = k + 1
        item.FrameContentSequence = DicomSequence([content])
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(per_frame)
    ds.NumberOfFrames = len(frames)
    ds.PixelData = b"".join(np.ascontiguousarray(stored[:, :, k, e].T).tobytes() for k, e in frames)
    ds.save_as(path, enforce_file_format=True)
    return path


def random_stored(shape: Sequence[int], seed: int = 0, dtype=np.int16, low: int = 0, high: int = 3000) -> np.ndarray:
    """Random stored pixel values of ``shape`` (no two slices alike)."""
    rng = np.random.default_rng(seed)
    return rng.integers(low, high, size=tuple(shape)).astype(dtype)


def set_attribute(path: str | Path, **values) -> None:
    """Rewrite ``path`` with some top-level attributes replaced."""
    ds = pydicom.dcmread(path)
    for key, value in values.items():
        setattr(ds, key, value)
    ds.save_as(path)


BOGUS_JPEG_LS = b"\xff\xd8\xff\xf7\x00\x0bnot-really-jpeg-ls\xff\xd9"


def recompress_as(path: str | Path, transfer_syntax: str, fragment: bytes = BOGUS_JPEG_LS) -> None:
    """Rewrite ``path`` claiming a compressed ``transfer_syntax`` with an encapsulated (bogus) frame."""
    from pydicom.encaps import encapsulate

    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    ds.PixelData = encapsulate([fragment])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.save_as(path, enforce_file_format=True)


def strip_preamble(path: str | Path) -> None:
    """Rewrite ``path`` as a bare implicit-VR little-endian dataset (no preamble, no file meta)."""
    ds = pydicom.dcmread(path)
    del ds.file_meta
    ds.preamble = None
    ds.save_as(path, implicit_vr=True, little_endian=True)
