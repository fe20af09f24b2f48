"""Self-describing model folders: listing and checksum verification.

A model folder (under ``models/`` or ``$WORKBENCH_MODELS``) holds its weights,
a ``model_card.md`` and a ``metadata.json`` like::

    {
      "name": "knee_nnunet",
      "version": "1.0",
      "task": "knee MRI segmentation",
      "licence": "MIT",
      "provenance": "trained by bench/train_knee_seg.py on synthetic knee MRI",
      "files": {"3d_fullres/fold_all/checkpoint_final.pth": {"sha256": "...", "bytes": 123}}
    }

``workbench models verify`` recomputes every listed file's sha256.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workbench.config import models_dir
from workbench.errors import ModelUnavailable
from workbench.outputs import sha256_of

REQUIRED_METADATA = ("name", "version", "licence", "provenance", "files")


@dataclass
class ModelFolder:
    """A model folder and its parsed metadata."""

    path: Path
    metadata: dict[str, Any]

    @property
    def name(self) -> str:
        return str(self.metadata.get("name", self.path.name))


@dataclass
class VerifyReport:
    """Outcome of checking one model folder."""

    name: str
    path: Path
    ok: bool
    problems: list[str] = field(default_factory=list)
    files_checked: int = 0


def read_model_folder(path: str | Path) -> ModelFolder:
    """Parse ``metadata.json`` of a model folder; MODEL_UNAVAILABLE naming what is missing otherwise."""
    path = Path(path)
    if not path.is_dir():
        raise ModelUnavailable(f"Model folder {path} does not exist")
    meta_path = path / "metadata.json"
    if not meta_path.is_file():
        raise ModelUnavailable(f"Model folder {path} has no metadata.json",
                               "A model folder needs metadata.json and model_card.md beside its weights.")
    try:
        metadata = json.loads(meta_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ModelUnavailable(f"{meta_path} is not valid JSON ({exc.msg}, line {exc.lineno})") from exc
    missing = [key for key in REQUIRED_METADATA if key not in metadata]
    if missing:
        raise ModelUnavailable(f"{meta_path} lacks {', '.join(missing)}")
    return ModelFolder(path, metadata)


def list_model_folders(root: str | Path | None = None) -> list[ModelFolder]:
    """Every folder under ``root`` (default: the models folder) that holds a ``metadata.json``."""
    root = Path(root) if root is not None else models_dir()
    found = []
    for meta in sorted(root.glob("*/metadata.json")):
        try:
            found.append(read_model_folder(meta.parent))
        except ModelUnavailable:
            found.append(ModelFolder(meta.parent, {"name": meta.parent.name, "error": "unreadable metadata.json"}))
    return found


def verify_model_folder(path: str | Path) -> VerifyReport:
    """Recompute the sha256 and size of every file listed in the folder's metadata."""
    path = Path(path)
    try:
        folder = read_model_folder(path)
    except ModelUnavailable as exc:
        return VerifyReport(path.name, path, False, [exc.message])
    report = VerifyReport(folder.name, path, True)
    if not (path / "model_card.md").is_file():
        report.problems.append("model_card.md is missing")
    for rel, expected in folder.metadata["files"].items():
        file = path / rel
        if not file.is_file():
            report.problems.append(f"{rel} is missing")
            continue
        report.files_checked += 1
        if "bytes" in expected and file.stat().st_size != int(expected["bytes"]):
            report.problems.append(f"{rel} has {file.stat().st_size} bytes, expected {expected['bytes']}")
        elif sha256_of(file) != expected.get("sha256"):
            report.problems.append(f"{rel} has a different sha256 than metadata.json records")
    report.ok = not report.problems
    return report


def write_metadata(path: str | Path, **fields_: Any) -> Path:
    """Write ``metadata.json`` for a model folder, listing every file (but the card and metadata) with sha256."""
    path = Path(path)
    files = {}
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = file.relative_to(path).as_posix()
        if rel in ("metadata.json", "model_card.md"):
            continue
        files[rel] = {"sha256": sha256_of(file), "bytes": file.stat().st_size}
    metadata = {**fields_, "files": files}
    (path / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
    return path / "metadata.json"
