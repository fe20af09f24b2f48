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
