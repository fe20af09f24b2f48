"""One entry point for every image input: :func:`load_volume`."""

from __future__ import annotations

import os
from pathlib import Path

from workbench.errors import ConfigError, InputNotFound, InvalidFormat
from workbench.io.volume import Volume, to_canonical

__all__ = ["load_volume", "ACCEPTED_FORMATS"]

ACCEPTED_FORMATS = "a DICOM folder or file, a NIfTI volume (.nii, .nii.gz) or an NRRD label map (.nrrd, .nhdr)"


def load_volume(path: str | os.PathLike, series: str | int | None = None, canonical: bool = True) -> Volume:
    """Read an image from whatever ``path`` is and (by default) bring it to canonical RAS+ orientation.

    Dispatch:
        * a folder: a DICOM series (:func:`workbench.io.dicom.read_dicom`; ``series``
          picks one when the folder holds several);
        * ``.nii`` / ``.nii.gz``: :func:`workbench.io.nifti.read_nifti`;
        * ``.nrrd`` / ``.nhdr``: :func:`workbench.io.nifti.read_label_map`;
        * any other file: DICOM when it has ``DICM`` at byte 128 or pydicom can
          parse it as a dataset, else :class:`~workbench.errors.InvalidFormat`.

    Args:
        path: the input.
        series: DICOM series to read (UID, number or description); only valid for DICOM input.
        canonical: return :func:`~workbench.io.volume.to_canonical` of the volume
            (voxel axes along +R, +A, +S, no resampling).

    Raises:
        InputNotFound: ``path`` does not exist.
        InvalidFormat: not one of the accepted formats.
        ConfigError: ``series`` given for an input that is not DICOM.
        DicomError: see :func:`workbench.io.dicom.read_dicom`.
    """
    from workbench.io.dicom import is_dicom_file, read_dicom
    from workbench.io.nifti import NIFTI_SUFFIXES, NRRD_SUFFIXES, read_label_map, read_nifti

    path = Path(path)
    if not path.exists():
        raise InputNotFound(f"Input {path} does not exist")
    name = path.name.lower()
    if path.is_dir():
        volume = read_dicom(path, series=series)
    elif name.endswith(NIFTI_SUFFIXES) or name.endswith(NRRD_SUFFIXES):
        if series is not None:
            raise ConfigError(
                f"--series {series!r} applies to DICOM input only, but {path} is not DICOM",
                "Drop --series for NIfTI or NRRD input.",
            )
        volume = read_nifti(path) if name.endswith(NIFTI_SUFFIXES) else read_label_map(path)
    elif is_dicom_file(path):
        volume = read_dicom(path, series=series)
    else:
        raise InvalidFormat(
            f"{path} is not a recognised image: accepted are {ACCEPTED_FORMATS}",
            "Convert the image to NIfTI (e.g. with dcm2niix or 3D Slicer) or give the DICOM folder.",
        )
    volume.meta.setdefault("source", str(path))
    if not canonical:
        return volume
    volume = to_canonical(volume)
    volume.meta["canonical"] = True
    return volume
