"""The in-memory image type shared by every reader, writer and pipeline step.

Convention (the workbench's canonical orientation): voxel arrays are indexed
``[i, j, k]`` and ``affine`` maps ``(i, j, k, 1)`` to scanner coordinates in
millimetres in **RAS+**, as NIfTI and nibabel do: +x towards the subject's
Right, +y Anterior, +z Superior.  DICOM stores LPS+; the DICOM reader negates the
first two world axes when it builds the affine.

"Canonical" volumes (:func:`to_canonical`) also have their voxel axes reordered
and flipped (no resampling) so that voxel axis 0 runs along +x (R), axis 1
along +y (A) and axis 2 along +z (S), as nibabel's ``as_closest_canonical``
does.  Everything downstream of the input step works on canonical volumes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Volume:
    """A 3-D image with its geometry.

    Attributes:
        data: voxel array of shape ``(I, J, K)``; for multi-echo input the first echo.
        affine: 4x4 float64 matrix from voxel indices to RAS+ millimetres.
        echoes: optional ``(I, J, K, E)`` array holding every echo of a multi-echo series.
        echo_times_ms: echo times matching the last axis of ``echoes`` (ascending).
        meta: free-form provenance (source path, series UID, modality, description, ...).
    """

    data: np.ndarray
    affine: np.ndarray
    echoes: np.ndarray | None = None
    echo_times_ms: list[float] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.data.shape)  # type: ignore[return-value]

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along each voxel axis (column norms of the affine)."""
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]

    @property
    def n_echoes(self) -> int:
        return 1 if self.echoes is None else int(self.echoes.shape[-1])


def to_canonical(volume: Volume) -> Volume:
    """Return ``volume`` with voxel axes reordered/flipped to RAS+ (no resampling)."""
    import nibabel as nib

    ornt = nib.orientations.io_orientation(volume.affine)
    target = nib.orientations.axcodes2ornt(("R", "A", "S"))
    transform = nib.orientations.ornt_transform(ornt, target)
    if np.array_equal(transform, [[0, 1], [1, 1], [2, 1]]):
        return volume
    data = nib.orientations.apply_orientation(volume.data, transform)
    affine = volume.affine @ nib.orientations.inv_ornt_aff(transform, volume.data.shape)
    echoes = None
    if volume.echoes is not None:
        echoes = np.stack(
            [nib.orientations.apply_orientation(volume.echoes[..., e], transform) for e in range(volume.n_echoes)],
            axis=-1,
        )
    return Volume(np.ascontiguousarray(data), affine, echoes, list(volume.echo_times_ms), dict(volume.meta))


def resample_isotropic(volume: Volume, spacing_mm: float, order: int = 1) -> Volume:
    """Resample ``volume`` onto an isotropic grid of ``spacing_mm`` covering the same field of view.

    The new grid keeps the direction cosines and the world position of voxel
    (0, 0, 0); ``order`` is the spline order (1: trilinear for images,
    0: nearest for label maps).  Echoes, when present, are resampled alike.
    """
    from scipy import ndimage

    spacing = np.asarray(volume.spacing)
    directions = volume.affine[:3, :3] / spacing
    extent = (np.asarray(volume.shape) - 1) * spacing
    new_shape = tuple(int(np.floor(e / spacing_mm + 1e-6)) + 1 for e in extent)
    new_affine = np.eye(4)
    new_affine[:3, :3] = directions * spacing_mm
    new_affine[:3, 3] = volume.affine[:3, 3]
    # new voxel index -> old voxel index
    matrix = np.linalg.inv(volume.affine) @ new_affine

    def _resample(array: np.ndarray) -> np.ndarray:
        out = ndimage.affine_transform(
            array.astype(np.float32) if order > 0 else array, matrix[:3, :3], offset=matrix[:3, 3],
            output_shape=new_shape, order=order, mode="nearest",
        )
        return out.astype(array.dtype) if order == 0 else out

    echoes = None
    if volume.echoes is not None:
        echoes = np.stack([_resample(volume.echoes[..., e]) for e in range(volume.n_echoes)], axis=-1)
    meta = dict(volume.meta, resampled_from_spacing=[float(s) for s in spacing])
    return Volume(_resample(volume.data), new_affine, echoes, list(volume.echo_times_ms), meta)


def same_grid(a: Volume, b: Volume, atol_mm: float = 1e-3) -> bool:
    """True when two volumes share shape and affine (within ``atol_mm``)."""
    return a.shape == b.shape and bool(np.allclose(a.affine, b.affine, atol=atol_mm))
