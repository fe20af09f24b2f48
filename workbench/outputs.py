"""Verifying step outputs by content and moving them into place atomically.

A step writes its files into a private work folder and declares them as
:class:`Output` entries.  The runner calls :func:`verify_output` on each (a
NIfTI must load with the expected shape, affine and label set; a mesh must load
and be non-empty; JSON must parse and match its schema; a PNG must decode) and
only then :func:`commit_outputs` moves them into the run folder.  A failed,
killed or timed-out step leaves nothing that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from workbench.errors import PipelineError

#: Output kinds the runner knows how to verify.
KINDS = ("nifti", "mesh", "json", "png", "csv", "file", "notebook", "html")


@dataclass
class Output:
    """One file a step produced.

    Attributes:
        path: path relative to the step's work folder (and, once committed, to the run folder).
        kind: one of :data:`KINDS`; decides how the file is verified.
        expect: checks for the kind: for ``nifti`` ``shape`` (list), ``affine`` (4x4 list),
            ``labels`` (allowed label values, as a list) and ``dtype_kind`` (``"i"``/``"u"``/``"f"``);
            for ``mesh`` ``min_faces``; for ``json`` ``schema`` (a JSON schema dict).
        description: a short human description for reports.
    """

    path: str
    kind: str = "file"
    expect: dict[str, Any] = field(default_factory=dict)
    description: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_output(root: Path, output: Output) -> None:
    """Check ``root / output.path`` by content; raise :class:`PipelineError` naming the file if it fails."""
    path = Path(root) / output.path
    if output.kind not in KINDS:
        raise PipelineError(f"Output {output.path}: unknown kind {output.kind!r}")
    if not path.is_file():
        raise PipelineError(f"Step did not write its declared output {output.path}")
    if path.stat().st_size == 0:
        raise PipelineError(f"Output {output.path} is empty")
    checker = _CHECKERS.get(output.kind)
    if checker is not None:
        try:
            checker(path, output.expect)
        except PipelineError:
            raise
        except Exception as exc:
            raise PipelineError(f"Output {output.path} failed verification: {exc}") from exc


def _check_nifti(path: Path, expect: dict[str, Any]) -> None:
    import nibabel as nib
    import numpy as np

    img = nib.load(str(path))
    data = np.asanyarray(img.dataobj)
    name = path.name
    if "shape" in expect and list(data.shape) != list(expect["shape"]):
        raise PipelineError(f"Output {name} has shape {list(data.shape)}, expected {list(expect['shape'])}")
    if "affine" in expect and not np.allclose(img.affine, np.asarray(expect["affine"]), atol=1e-3):
        raise PipelineError(f"Output {name} has an affine that differs from the input's")
    if "dtype_kind" in expect and data.dtype.kind not in expect["dtype_kind"]:
        raise PipelineError(f"Output {name} has dtype {data.dtype}, expected kind {expect['dtype_kind']!r}")
    if "labels" in expect:
        found = set(int(v) for v in np.unique(data))
        extra = found - set(int(v) for v in expect["labels"])
        if extra:
            raise PipelineError(f"Output {name} holds unexpected labels {sorted(extra)}")
    if data.dtype.kind == "f" and not np.all(np.isfinite(data)):
        raise PipelineError(f"Output {name} holds NaN or infinite voxels")


def _check_mesh(path: Path, expect: dict[str, Any]) -> None:
    if path.suffix.lower() == ".vtk":  # legacy VTK, which trimesh does not read
        from workbench.knee.meshes import read_vtk

        _, faces, _ = read_vtk(path)
        n_faces = len(faces)
    else:
        import trimesh

        n_faces = len(trimesh.load(str(path), force="mesh").faces)
    if n_faces < int(expect.get("min_faces", 1)):
        raise PipelineError(f"Output {path.name} is a mesh with {n_faces} faces")


def _check_json(path: Path, expect: dict[str, Any]) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    if "schema" in expect:
        import jsonschema

        jsonschema.validate(data, expect["schema"])


def _check_png(path: Path, expect: dict[str, Any]) -> None:
    from PIL import Image

    with Image.open(path) as img:
        img.verify()


def _check_notebook(path: Path, expect: dict[str, Any]) -> None:
    import nbformat

    nbformat.validate(nbformat.read(str(path), as_version=4))


_CHECKERS = {"nifti": _check_nifti, "mesh": _check_mesh, "json": _check_json, "png": _check_png, "notebook": _check_notebook}


def commit_outputs(work_dir: Path, run_dir: Path, outputs: list[Output]) -> list[dict[str, Any]]:
    """Verify every output, then move them all into ``run_dir``; return their ``result.json`` records.

    Nothing is moved unless every output verifies.  Each file is moved with
    ``os.replace`` (atomic on one file system); the work folder is removed.
    """
    for output in outputs:
        verify_output(work_dir, output)
    records = []
    for output in outputs:
        src = Path(work_dir) / output.path
        dst = Path(run_dir) / output.path
        dst.parent.mkdir(parents=True, exist_ok=True)
        records.append(
            {"path": output.path, "kind": output.kind, "bytes": src.stat().st_size, "sha256": sha256_of(src),
             "description": output.description}
        )
        os.replace(src, dst)
    shutil.rmtree(work_dir, ignore_errors=True)
    return records
