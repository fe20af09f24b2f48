"""Knee segmentation with nnU-Net v2, through nnU-Net's own ``nnUNetPredictor``.

A model is a folder as nnU-Net writes it (``dataset.json``, ``plans.json``,
``fold_*/checkpoint_*.pth``), one per configuration; the shipped model in
``models/knee_nnunet`` and a user's own model (``--model-dir``) go through the
same code.  ``nnunet_fullres`` runs ``3d_fullres``; ``nnunet_cascade`` runs
``3d_lowres`` and then ``3d_cascade_fullres`` on its prediction, as nnU-Net
defines the cascade.

Images are given to nnU-Net in the voxel order of the original input, the
order nnU-Net itself sees when it reads the file (SimpleITK's ``(z, y, x)``),
so a model behaves exactly as under ``nnUNetv2_predict``; the result is then
brought back onto the canonical RAS grid of the pipeline.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from workbench.config import models_dir
from workbench.data.labels import BONE_VALUES, KNEE_LABELS
from workbench.errors import ConfigError, GpuOutOfMemory, ModelUnavailable, SegmentationFailed, WorkbenchError
from workbench.registry import NnUNetModelConfig

#: Names (normalised: lower case, letters and digits only) that a model's dataset.json may use per label.
LABEL_ALIASES: dict[int, tuple[str, ...]] = {
    1: ("patellarcartilage", "patcart", "patellacartilage", "cartilagepatella", "pc"),
    2: ("femoralcartilage", "femcart", "femurcartilage", "cartilagefemur", "fc"),
    3: ("medialtibialcartilage", "medtibcart", "tibialcartilagemedial", "mtc", "medialtibiacartilage"),
    4: ("lateraltibialcartilage", "lattibcart", "tibialcartilagelateral", "ltc", "lateraltibiacartilage"),
    5: ("medialmeniscus", "medmen", "meniscusmedial", "mm"),
    6: ("lateralmeniscus", "latmen", "meniscuslateral", "lm"),
    7: ("femur", "femoralbone", "femurbone"),
    8: ("tibia", "tibialbone", "tibiabone"),
    9: ("patella", "patellabone", "patellarbone"),
}
BACKGROUND_NAMES = ("background", "bg", "clearlabel")


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def _name_table() -> dict[str, int]:
    table: dict[str, int] = {}
    for label in KNEE_LABELS:
        for name in (label.key, label.name, *LABEL_ALIASES.get(label.value, ())):
            table[_norm(name)] = label.value
    return table


def map_model_labels(labels: dict[str, Any], source: str = "dataset.json") -> dict[int, int]:
    """Model label value → workbench label value, matched by name; CONFIG_ERROR lists what cannot be mapped."""
    table = _name_table()
    mapping: dict[int, int] = {}
    unknown = []
    for name, value in labels.items():
        if isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: label {name!r} is region-based ({value}); the workbench needs plain labels",
                              "Use a model trained with one integer value per structure.")
        if _norm(name) in BACKGROUND_NAMES:
            mapping[int(value)] = 0
            continue
        target = table.get(_norm(name))
        if target is None:
            unknown.append(f"{name}={value}")
        else:
            mapping[int(value)] = target
    if unknown:
        known = ", ".join(label.key for label in KNEE_LABELS)
        raise ConfigError(f"{source}: labels {', '.join(unknown)} do not match the workbench label table",
                          f"Name the model's labels like the table ({known}) or 'background'.")
    return mapping


@dataclass
class ModelConfiguration:
    """One nnU-Net configuration folder of a model, validated."""

    name: str
    folder: Path
    folds: tuple[str, ...]
    checkpoint: str
    label_map: dict[int, int]
    dataset: dict[str, Any] = field(repr=False, default_factory=dict)


def resolve_model_root(model_folder: str | os.PathLike) -> Path:
    """An absolute model folder, or one under ``models/`` (``$WORKBENCH_MODELS``)."""
    path = Path(model_folder).expanduser()
    if path.is_absolute() or path.exists():
        return path
    return models_dir() / path


def find_configuration(root: Path, configuration: str, folds: tuple[str, ...], checkpoint: str) -> ModelConfiguration:
    """Find and check the folder of ``configuration`` in a model folder; MODEL_UNAVAILABLE names what is missing.

    ``root`` may be the configuration folder itself (``..._3d_fullres`` with
    ``plans.json``) or any folder above it (a dataset folder of nnU-Net's
    results, or the shipped ``models/knee_nnunet``).
    """
    if not root.is_dir():
        raise ModelUnavailable(f"nnU-Net model folder {root} does not exist",
                               "Point --model-dir (or nnunet.model_name in the config) at a trained model folder.")
    if (root / "plans.json").is_file() and not root.name.endswith(f"__{configuration}"):
        root = root.parent  # a sibling configuration folder was given (e.g. 3d_fullres when the cascade needs 3d_lowres)
    candidates = [root] if (root / "plans.json").is_file() else sorted(
        p.parent for p in root.rglob("plans.json") if p.parent.name.endswith(f"__{configuration}"))
    if not candidates:
        found = sorted({p.parent.name for p in root.rglob("plans.json")})
        raise ModelUnavailable(
            f"No {configuration} configuration in {root}" + (f" (found: {', '.join(found)})" if found else ""),
            "A model folder holds <Trainer>__<Plans>__<configuration>/ with dataset.json, plans.json and fold_*/.")
    folder = candidates[0]
    for name in ("dataset.json", "plans.json"):
        if not (folder / name).is_file():
            raise ModelUnavailable(f"{folder} has no {name}")
    try:
        dataset = json.loads((folder / "dataset.json").read_text())
        plans = json.loads((folder / "plans.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelUnavailable(f"{folder}: dataset.json or plans.json is not valid JSON ({exc})") from exc
    if configuration not in plans.get("configurations", {}):
        raise ModelUnavailable(f"{folder / 'plans.json'} has no configuration {configuration!r}")
    if folds == ("auto",):
        folds = tuple(sorted(p.name[len("fold_"):] for p in folder.glob("fold_*") if (p / checkpoint).is_file()))
        if not folds:
            raise ModelUnavailable(f"{folder} has no fold_*/{checkpoint}")
    for fold in folds:
        ckpt = folder / f"fold_{fold}" / checkpoint
        if not ckpt.is_file():
            raise ModelUnavailable(f"Checkpoint {ckpt} is missing",
                                   "Check the folds and checkpoint name (options nnunet.folds, nnunet.checkpoint).")
    if int(dataset.get("numTraining", 1)) < 0 or "labels" not in dataset:
        raise ModelUnavailable(f"{folder / 'dataset.json'} has no labels")
    label_map = map_model_labels(dataset["labels"], str(folder / "dataset.json"))
    return ModelConfiguration(configuration, folder, tuple(folds), checkpoint, label_map, dataset)


class NnUNetSegmenter:
    """A loaded nnU-Net model (one configuration, or the two stages of the cascade)."""

    def __init__(self, config: NnUNetModelConfig, device: str = "cpu") -> None:
        self.config = config
        self.device = device
        root = resolve_model_root(config.model_folder)
        self.stages = [find_configuration(root, name, tuple(config.folds), config.checkpoint)
                       for name in config.configuration]
        self._predictors: list[Any] = []

    def _load(self) -> None:
        if self._predictors:
            return
        import torch

        with _quiet():
            from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
        if self.device == "cpu":
            torch.set_num_threads(max(1, os.cpu_count() or 1))
        for stage in self.stages:
            try:
                with _quiet():
                    predictor = nnUNetPredictor(
                        tile_step_size=self.config.tile_step_size, use_gaussian=True,
                        use_mirroring=self.config.use_mirroring, perform_everything_on_device=self.device != "cpu",
                        device=torch.device(self.device), verbose=False, verbose_preprocessing=False,
                        allow_tqdm=False)
                    predictor.initialize_from_trained_model_folder(str(stage.folder), stage.folds, stage.checkpoint)
            except WorkbenchError:
                raise
            except Exception as exc:
                raise ModelUnavailable(f"Could not load the nnU-Net model in {stage.folder}: "
                                       f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                                       "The checkpoint may be corrupt or from another nnU-Net version "
                                       "(workbench models verify).") from exc
            self._predictors.append(predictor)

    def predict(self, image_zyx: np.ndarray, spacing_zyx: tuple[float, float, float], progress=None) -> np.ndarray:
        """Segment a ``(z, y, x)`` image; returns workbench labels ``(z, y, x)`` uint8.

        ``progress(fraction, message)`` is called per stage.
        """
        self._load()
        properties = {"spacing": [float(s) for s in spacing_zyx]}
        image = np.ascontiguousarray(image_zyx[None].astype(np.float32))
        previous = None
        n = len(self._predictors)
        try:
            for index, (stage, predictor) in enumerate(zip(self.stages, self._predictors)):
                if progress:
                    progress(index / n, f"nnU-Net {stage.name}")
                with _quiet():
                    seg = predictor.predict_single_npy_array(
                        image, dict(properties),
                        None if previous is None else previous[None].astype(np.int16), None, False)
                previous = np.asarray(seg)
        except WorkbenchError:
            raise
        except Exception as exc:
            import torch

            if isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower():
                raise GpuOutOfMemory(f"GPU out of memory in nnU-Net {stage.name}",
                                     "Lower nnunet.tile_step_size overlap, close other GPU jobs, or use --device cpu.") \
                    from exc
            raise SegmentationFailed(f"nnU-Net {stage.name} failed: {type(exc).__name__}: "
                                     f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc
        return remap(previous, self.stages[-1].label_map)


def remap(seg: np.ndarray, label_map: dict[int, int]) -> np.ndarray:
    """Apply a model → workbench label map (every value of ``seg`` must be in it)."""
    lut = np.zeros(max(max(label_map), int(seg.max()) if seg.size else 0) + 1, np.uint8)
    for source, target in label_map.items():
        lut[source] = target
    return lut[seg.astype(np.int64)]


def setup_nnunet(config: NnUNetModelConfig, device: str = "cpu") -> NnUNetSegmenter:
    """Registry ``setup``: a validated (lazily loaded) nnU-Net segmenter."""
    return NnUNetSegmenter(config, device=device)


def postprocess(labels: np.ndarray, largest_component: bool = True, fill_bone_holes: bool = True) -> np.ndarray:
    """Keep the largest connected component of each structure; fill holes inside bones.

    Removed fragments become background; filled holes take the bone's label
    only where they were background (cartilage inside a bone is left alone).
    """
    from scipy import ndimage

    out = labels.copy()
    if largest_component:
        for value in np.unique(out):
            if value == 0:
                continue
            mask = out == value
            components, n = ndimage.label(mask)
            if n > 1:
                sizes = np.bincount(components.ravel())
                sizes[0] = 0
                out[mask & (components != int(np.argmax(sizes)))] = 0
    if fill_bone_holes:
        for value in BONE_VALUES:
            mask = out == value
            if mask.any():
                filled = ndimage.binary_fill_holes(mask)
                out[filled & (out == 0)] = value
    return out


def dice_scores(prediction: np.ndarray, truth: np.ndarray, values=None) -> dict[int, float | None]:
    """Dice per label value; ``None`` where the structure is in neither map."""
    values = values if values is not None else [label.value for label in KNEE_LABELS]
    scores: dict[int, float | None] = {}
    for value in values:
        a, b = prediction == value, truth == value
        total = int(a.sum()) + int(b.sum())
        scores[value] = None if total == 0 else 2.0 * int((a & b).sum()) / total
    return scores


@contextlib.contextmanager
def _quiet():
    """nnU-Net prints set-up notices (e.g. about nnUNet_raw); keep them out of logs and notebooks."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield
