"""Write a :class:`~workbench.io.volume.Volume` as a classic MR DICOM series (one file per slice).

The output is what a scanner exports: MR Image Storage files, explicit VR
little endian, with a proper file meta header and fresh UIDs.  The geometry
comes from the volume's RAS+ affine, converted to DICOM's LPS+:

* ``data[i, j, k]``: ``i`` is the column index, ``j`` the row index, ``k`` the slice;
* ``ImageOrientationPatient`` = LPS directions of ``+i`` (along a row) then ``+j`` (down a column);
* ``PixelSpacing`` = (spacing along ``j`` = between rows, spacing along ``i`` = between columns);
* ``ImagePositionPatient`` of slice ``k`` = LPS position of voxel ``(0, 0, k)``;
* ``SliceThickness`` and ``SpacingBetweenSlices`` = the length of the ``k`` column of the affine.

The slice axis must be perpendicular to the image plane (no shear); it may
point either way along the plane's normal.  Integer data in ``[0, 65535]`` is
stored as is; anything else (float data, negative values) is stored as
``uint16`` with one series-wide ``RescaleSlope``/``RescaleIntercept``, so a
reader recovers the values within ``slope / 2``.

A multi-echo volume (``volume.echoes`` set) becomes one file per slice per
echo, all in one series, with ``EchoTime``/``EchoNumbers`` per file and
``InstanceNumber`` running slice-major (slice 0 echo 1, slice 0 echo 2, ...).
"""

from __future__ import annotations

import datetime as _dt
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from workbench.errors import DicomError
from workbench.io.volume import Volume

_LPS = np.diag([-1.0, -1.0, 1.0])
_UINT16_MAX = 65535
#: Largest deviation from orthogonality (cosine) accepted between the voxel axes.
_ORTHO_TOL = 1e-4


def write_dicom_series(
    volume: Volume,
    folder: str | os.PathLike,
    *,
    series_description: str,
    series_number: int = 1,
    patient_id: str = "SYNTH",
    patient_name: str | None = None,
    echo_times_ms: Sequence[float] | None = None,
    repetition_time_ms: float | None = None,
    flip_angle_deg: float | None = None,
    field_strength_t: float = 3.0,
    scanning_sequence: str | Sequence[str] = "GR",
    sequence_variant: str | Sequence[str] = ("SS", "SP"),
    sequence_name: str = "",
    acquisition_type: str = "3D",
    laterality: str | None = None,
    body_part: str = "KNEE",
    patient_position: str = "FFS",
    manufacturer: str = "workbench",
    model_name: str = "synthetic",
    image_type: Sequence[str] = ("DERIVED", "PRIMARY", "OTHER"),
    study_description: str = "Knee MRI",
    study_uid: str | None = None,
    series_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    uid_entropy: str | None = None,
    study_datetime: _dt.datetime | None = None,
    file_prefix: str = "IM",
    overwrite: bool = False,
) -> list[Path]:
    """Write ``volume`` into ``folder`` as one MR DICOM series and return the files in instance order.

    Args:
        volume: the image; ``data`` is indexed ``[column, row, slice]`` and
            ``affine`` maps it to RAS+ mm.  With ``volume.echoes`` set, every
            echo is written (``data`` is then ignored).
        folder: output folder, created when missing.  It must hold no files
            unless ``overwrite`` is true (then its ``*.dcm`` files are removed first).
        series_description: ``SeriesDescription`` (0008,103E).
        series_number: ``SeriesNumber`` (0020,0011).
        patient_id: ``PatientID``; ``patient_name`` defaults to it.
        echo_times_ms: one echo time per echo; default ``volume.echo_times_ms``
            (for a single echo an empty ``EchoTime`` is written when neither is given).
        repetition_time_ms, flip_angle_deg, field_strength_t: acquisition
            parameters (``RepetitionTime``, ``FlipAngle``, ``MagneticFieldStrength``).
        scanning_sequence, sequence_variant, sequence_name, acquisition_type:
            ``ScanningSequence``, ``SequenceVariant``, ``SequenceName``, ``MRAcquisitionType``.
        laterality: ``"R"``/``"L"`` (or ``"right"``/``"left"``) for ``Laterality``; empty when None.
        body_part, patient_position, manufacturer, model_name, image_type,
            study_description: the corresponding attributes.
        study_uid, series_uid, frame_of_reference_uid: reuse given UIDs
            (e.g. to add a series to a study); generated otherwise.
        uid_entropy: when given, every generated UID is derived from it
            (deterministic output for the same entropy string).
        study_datetime: ``StudyDate``/``StudyTime`` etc.; default now.
        file_prefix: file names are ``<prefix><instance:05d>.dcm``.
        overwrite: allow writing into a folder that already holds files.

    Raises:
        DicomError: the geometry cannot be written as a classic series (shear,
            non-orthogonal axes, bad shape) or the echo times do not match the echoes.
    """
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, MRImageStorage, generate_uid

    data = volume.echoes if volume.echoes is not None else np.asarray(volume.data)[..., None]
    data = np.asarray(data)
    if data.ndim != 4 or min(data.shape) < 1:
        raise DicomError(f"Cannot write a volume of shape {list(np.shape(volume.data))} as a DICOM series",
                         "Give a 3-D volume (or 3-D echoes with a trailing echo axis).")
    n_i, n_j, n_k, n_e = data.shape
    if n_i > _UINT16_MAX or n_j > _UINT16_MAX:
        raise DicomError(f"Image of {n_i}x{n_j} pixels is too large for DICOM Rows/Columns")
    tes = list(echo_times_ms) if echo_times_ms is not None else list(volume.echo_times_ms)
    if tes and len(tes) != n_e:
        raise DicomError(f"{len(tes)} echo times given for {n_e} echoes",
                         "Pass one echo time per echo (echo_times_ms) or none.")
    geometry = _geometry(volume.affine)

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    existing = [p for p in folder.iterdir() if p.is_file()]
    if existing and not overwrite:
        raise DicomError(f"DICOM output folder {folder} is not empty ({len(existing)} files)",
                         "Choose an empty folder, or pass overwrite=True to replace its .dcm files.")
    if overwrite:
        for p in existing:
            if p.suffix.lower() == ".dcm":
                p.unlink()

    stored, slope, intercept = _to_uint16(data)

    entropy = None if uid_entropy is None else str(uid_entropy)

    def uid(tag: str) -> str:
        return generate_uid(entropy_srcs=[entropy, tag]) if entropy is not None else generate_uid()

    study_uid = study_uid or uid("study")
    series_uid = series_uid or uid("series")
    frame_of_reference_uid = frame_of_reference_uid or uid("frame_of_reference")
    when = study_datetime or _dt.datetime.now().replace(microsecond=0)
    date, time = when.strftime("%Y%m%d"), when.strftime("%H%M%S")
    side = {"right": "R", "left": "L", "r": "R", "l": "L"}.get(str(laterality).lower(), "") if laterality else ""

    finite = data[np.isfinite(data)] if data.dtype.kind == "f" else data
    vmin = float(finite.min()) if finite.size else 0.0
    vmax = float(finite.max()) if finite.size else 1.0

    paths: list[Path] = []
    for k in range(n_k):
        position = geometry["origin"] + k * geometry["step"]
        for e in range(n_e):
            instance = k * n_e + e + 1
            sop_uid = uid(f"sop-{instance}")
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = MRImageStorage
            meta.MediaStorageSOPInstanceUID = sop_uid
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
            meta.ImplementationVersionName = "WORKBENCH_0_1"

            path = folder / f"{file_prefix}{instance:05d}.dcm"
            ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
            ds.SpecificCharacterSet = "ISO_IR 100"
            ds.ImageType = list(image_type)
            ds.SOPClassUID = MRImageStorage
            ds.SOPInstanceUID = sop_uid
            ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = date
            ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = time
            ds.AccessionNumber = ""
            ds.Modality = "MR"
            ds.Manufacturer = manufacturer
            ds.ManufacturerModelName = model_name
            ds.ReferringPhysicianName = ""
            ds.StudyDescription = study_description
            ds.SeriesDescription = series_description
            # patient
            ds.PatientName = patient_name if patient_name is not None else patient_id
            ds.PatientID = patient_id
            ds.PatientBirthDate = ""
            ds.PatientSex = "O"
            # acquisition
            ds.BodyPartExamined = body_part
            ds.ScanningSequence = _multi(scanning_sequence)
            ds.SequenceVariant = _multi(sequence_variant)
            ds.ScanOptions = ""
            ds.MRAcquisitionType = acquisition_type
            ds.SequenceName = sequence_name
            ds.SliceThickness = _ds(geometry["thickness"])
            ds.SpacingBetweenSlices = _ds(geometry["thickness"])
            ds.RepetitionTime = _ds(repetition_time_ms) if repetition_time_ms is not None else ""
            ds.EchoTime = _ds(tes[e]) if tes else ""
            ds.EchoNumbers = str(e + 1)
            ds.EchoTrainLength = str(n_e)
            ds.NumberOfAverages = "1"
            ds.ImagedNucleus = "1H"
            ds.ImagingFrequency = _ds(42.577478518 * field_strength_t)
            ds.MagneticFieldStrength = _ds(field_strength_t)
            ds.FlipAngle = _ds(flip_angle_deg) if flip_angle_deg is not None else ""
            ds.PatientPosition = patient_position
            # study / series / instance
            ds.StudyInstanceUID = study_uid
            ds.SeriesInstanceUID = series_uid
            ds.StudyID = "1"
            ds.SeriesNumber = int(series_number)
            ds.AcquisitionNumber = 1
            ds.InstanceNumber = instance
            ds.Laterality = side
            # image plane
            ds.ImagePositionPatient = [_ds(v) for v in position]
            ds.ImageOrientationPatient = [_ds(v) for v in geometry["orientation"]]
            ds.FrameOfReferenceUID = frame_of_reference_uid
            ds.PositionReferenceIndicator = ""
            ds.SliceLocation = _ds(float(position @ geometry["normal"]))
            ds.PixelSpacing = [_ds(geometry["row_spacing"]), _ds(geometry["column_spacing"])]
            # image pixel
            ds.SamplesPerPixel = 1
            ds.PhotometricInterpretation = "MONOCHROME2"
            ds.Rows = n_j
            ds.Columns = n_i
            ds.BitsAllocated = 16
            ds.BitsStored = 16
            ds.HighBit = 15
            ds.PixelRepresentation = 0
            if slope is not None:
                ds.RescaleIntercept = _ds(intercept)
                ds.RescaleSlope = _ds(slope)
                ds.RescaleType = "US"
            ds.WindowCenter = _ds((vmin + vmax) / 2)
            ds.WindowWidth = _ds(max(vmax - vmin, 1e-3))
            ds.BurnedInAnnotation = "NO"
            # rows run along j, columns along i: the pixel matrix is data[:, :, k].T
            ds.PixelData = np.ascontiguousarray(stored[:, :, k, e].T).astype("<u2").tobytes()
            ds["PixelData"].VR = "OW"
            ds.save_as(path, enforce_file_format=True)
            paths.append(path)
    return paths


def lps_geometry(affine: np.ndarray) -> dict:
    """The DICOM geometry of a RAS+ affine (see the module docstring).

    Returns a dict with ``orientation`` (6 floats), ``origin`` (LPS position of
    voxel 0), ``step`` (LPS vector between consecutive slices), ``normal``
    (row x column), ``row_spacing``, ``column_spacing`` and ``thickness``.
    Raises :class:`~workbench.errors.DicomError` for geometry a classic series cannot hold.
    """
    return _geometry(affine)


def _geometry(affine: np.ndarray) -> dict:
    affine = np.asarray(affine, dtype=float)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise DicomError("The volume's affine is not a finite 4x4 matrix")
    lps = _LPS @ affine[:3, :3]
    spacings = np.linalg.norm(lps, axis=0)
    if np.any(spacings <= 0):
        raise DicomError(f"The affine has a zero voxel size ({spacings.tolist()})")
    u, v, w = (lps[:, a] / spacings[a] for a in range(3))
    normal = np.cross(u, v)
    if abs(u @ v) > _ORTHO_TOL:
        raise DicomError("The volume's column and row axes are not perpendicular; DICOM cannot store that",
                         "Resample the volume onto an orthogonal grid first.")
    if abs(abs(w @ normal) - 1.0) > _ORTHO_TOL:
        raise DicomError("The volume's slice axis is not perpendicular to its image plane (sheared grid)",
                         "Resample the volume onto an orthogonal grid first.")
    return {
        "orientation": np.concatenate([u, v]),
        "origin": _LPS @ affine[:3, 3],
        "step": lps[:, 2],
        "normal": normal,
        "column_spacing": float(spacings[0]),
        "row_spacing": float(spacings[1]),
        "thickness": float(spacings[2]),
    }


def _to_uint16(data: np.ndarray) -> tuple[np.ndarray, float | None, float | None]:
    """Stored values plus (slope, intercept), or (None, None) when the data is stored as is."""
    if data.dtype.kind == "b":
        return data.astype(np.uint16), None, None
    if data.dtype.kind in "iu":
        lo, hi = (int(data.min()), int(data.max())) if data.size else (0, 0)
        if lo >= 0 and hi <= _UINT16_MAX:
            return data.astype(np.uint16), None, None
    values = np.asarray(data, dtype=np.float64)
    if not np.all(np.isfinite(values)):
        raise DicomError("The volume holds NaN or infinite values; DICOM cannot store them",
                         "Replace non-finite values (e.g. numpy.nan_to_num) before writing.")
    lo, hi = float(values.min()), float(values.max())
    # the written (decimal-string) values are the ones readers use: quantise with them
    intercept = float(_ds(lo))
    if intercept > lo:  # rounding pushed it above the minimum: step down one ulp of its format
        intercept = float(_ds(lo - abs(lo) * 1e-9 - 1e-9))
    span = hi - intercept
    slope = float(_ds(span / _UINT16_MAX)) if span > 0 else 1.0
    while intercept + slope * _UINT16_MAX < hi:  # rounding made the slope too small for the top value
        slope = float(_ds(slope * (1 + 1e-6)))
    stored = np.clip(np.rint((values - intercept) / slope), 0, _UINT16_MAX).astype(np.uint16)
    return stored, slope, intercept


def _ds(value: float):
    """A DICOM decimal string (at most 16 characters) for ``value``."""
    from pydicom.valuerep import DSfloat

    value = float(value)
    if value == 0.0 or abs(value) < 1e-12:
        value = 0.0
    return DSfloat(value, auto_format=True)


def _multi(value: str | Sequence[str]):
    return value if isinstance(value, str) else list(value)
