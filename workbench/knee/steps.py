"""Step functions of the knee pipeline.

Each takes a :class:`~workbench.runner.StepContext` and plain inputs (paths,
numbers), writes its files into ``ctx.work_dir`` and returns a
:class:`~workbench.runner.StepResult`; the runner runs it in a child process.
They can be called directly in tests with ``StepContext.for_testing(tmp)``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from workbench.errors import InputNotFound, InvalidFormat
from workbench.io.volume import Volume, resample_isotropic, same_grid
from workbench.outputs import Output
from workbench.runner import StepContext, StepResult

LABEL_VALUES = list(range(0, 16))


def case_name(input_path: str | Path) -> str:
    """A file-name-safe case name from an input path (``knee.nii.gz`` → ``knee``)."""
    name = Path(str(input_path).rstrip("/")).name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".dcm"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "case"


def load_input(
    ctx: StepContext,
    input_path: str,
    case: str,
    series: str | None = None,
    resample_mm: float | None = None,
    ground_truth: str | None = None,
    segmentation: str | None = None,
) -> StepResult:
    """Read a DICOM series or NIfTI volume, bring it to canonical RAS orientation and write it out.

    Writes ``<case>_image.nii.gz`` (canonical, resampled when ``resample_mm``
    is set), ``<case>_echoes.nii.gz`` for multi-echo input, ``<case>_preview.png``
    (three orthogonal slices), ``input.json`` (geometry and provenance) and,
    when ``ground_truth`` is given, ``<case>_ground-truth.nii.gz`` after
    checking that it lies on the image's grid; a given ``segmentation`` (the
    user's label map, checked the same way) becomes ``<case>_all-labels.nii.gz``.
    """
    from workbench.figures import orthogonal_slices, save_figure
    from workbench.io.load import load_volume
    from workbench.io.nifti import write_nifti

    ctx.progress(0.0, f"reading {input_path}")
    from workbench.io.volume import to_canonical

    volume = load_volume(input_path, series=series, canonical=False)
    original = {"shape": list(volume.shape), "spacing_mm": [round(s, 4) for s in volume.spacing],
                "affine": volume.affine.tolist()}  # the voxel order models see (as nnU-Net reads the file)
    volume = to_canonical(volume)
    _check_image(volume, input_path)
    ctx.progress(0.4, "read")

    labels = _labels_on_grid(ground_truth, volume, input_path, "Ground truth") if ground_truth else None
    given = _labels_on_grid(segmentation, volume, input_path, "Segmentation") if segmentation else None

    if resample_mm:
        ctx.progress(0.5, f"resampling to {resample_mm} mm")
        volume = resample_isotropic(volume, float(resample_mm), order=1)
        if labels is not None:
            labels = resample_isotropic(labels, float(resample_mm), order=0)
        if given is not None:
            given = resample_isotropic(given, float(resample_mm), order=0)

    outputs: dict[str, Output] = {}
    image_name = f"{case}_image.nii.gz"
    write_nifti(volume.data.astype(np.float32), volume.affine, ctx.work_dir / image_name)
    outputs["image"] = Output(image_name, "nifti", expect={
        "shape": list(volume.shape), "affine": volume.affine.tolist(), "dtype_kind": "f"},
        description="input image, canonical RAS orientation")
    if volume.echoes is not None:
        echo_name = f"{case}_echoes.nii.gz"
        write_nifti(volume.echoes.astype(np.float32), volume.affine, ctx.work_dir / echo_name)
        outputs["echoes"] = Output(echo_name, "nifti", expect={"shape": list(volume.echoes.shape)},
                                   description="all echoes (last axis), for T2 mapping")
    for key, label_map, name, description in (
            ("ground_truth", labels, f"{case}_ground-truth.nii.gz", "ground-truth labels on the image grid"),
            ("segmentation", given, f"{case}_all-labels.nii.gz", "the given segmentation on the image grid")):
        if label_map is not None:
            write_nifti(label_map.data, label_map.affine, ctx.work_dir / name, dtype=np.uint8)
            outputs[key] = Output(name, "nifti", expect={
                "shape": list(volume.shape), "affine": volume.affine.tolist(), "labels": LABEL_VALUES},
                description=description)
    ctx.progress(0.7, "writing preview")
    preview_name = f"{case}_preview.png"
    save_figure(orthogonal_slices(volume, given if given is not None else labels, title=case),
                ctx.work_dir / preview_name)
    outputs["preview"] = Output(preview_name, "png", description="orthogonal slices")

    info = {
        "case": case,
        "input": str(input_path),
        "orientation": "RAS",
        "shape": list(volume.shape),
        "spacing_mm": [round(s, 4) for s in volume.spacing],
        "affine": np.round(volume.affine, 6).tolist(),
        "original": original,
        "n_echoes": volume.n_echoes,
        "echo_times_ms": [float(t) for t in volume.echo_times_ms],
        "intensity": {"min": float(np.min(volume.data)), "max": float(np.max(volume.data)),
                      "mean": float(np.mean(volume.data))},
        "meta": {k: v for k, v in volume.meta.items() if isinstance(v, (str, int, float, bool, list, type(None)))},
    }
    (ctx.work_dir / "input.json").write_text(json.dumps(info, indent=2, default=str))
    outputs["info"] = Output("input.json", "json", expect={"schema": INPUT_INFO_SCHEMA}, description="input geometry")
    ctx.progress(1.0, "done")
    metrics = {"shape": info["shape"], "spacing_mm": info["spacing_mm"], "n_echoes": volume.n_echoes}
    if labels is not None:
        voxel_ml = float(np.prod(volume.spacing)) / 1000.0
        present = [int(v) for v in np.unique(labels.data) if v > 0]
        metrics["ground_truth_volumes_ml"] = {
            str(v): round(float(np.count_nonzero(labels.data == v)) * voxel_ml, 3) for v in present}
    return StepResult(outputs=outputs, metrics=metrics,
                      values={"case": case, "original_affine": original["affine"]})


def _labels_on_grid(path: str, volume: Volume, input_path: str, what: str) -> Volume:
    """A label map on ``volume``'s canonical grid with workbench label values, or INVALID_FORMAT saying why."""
    from workbench.data.labels import ALL_LABEL_VALUES
    from workbench.io.load import load_volume

    if not Path(path).exists():
        raise InputNotFound(f"{what} label file {path} does not exist")
    labels = load_volume(path, canonical=True)
    if not same_grid(volume, labels, atol_mm=0.05):
        raise InvalidFormat(
            f"{what} {Path(path).name} (shape {list(labels.shape)}) is not on the grid of "
            f"{Path(input_path).name} (shape {list(volume.shape)})",
            "Give a label map in the input image's space (same shape and affine).",
        )
    values = np.rint(labels.data)
    unknown = sorted(int(v) for v in np.unique(values) if int(v) not in ALL_LABEL_VALUES)
    if unknown:
        raise InvalidFormat(f"{what} {Path(path).name} holds labels outside the workbench table: {unknown[:10]}",
                            "Use the workbench labels (docs/labels.md); workbench.data.labels.remap_labels "
                            "maps other tables.")
    return Volume(values.astype(np.uint8), volume.affine.copy(), meta=labels.meta)


def _check_image(volume: Volume, input_path: str) -> None:
    if volume.data.ndim != 3 or min(volume.shape) < 2:
        raise InvalidFormat(f"{Path(input_path).name} has shape {list(volume.data.shape)}; expected a 3-D volume "
                            "with at least 2 voxels along each axis")
    if not np.all(np.isfinite(volume.data)):
        raise InvalidFormat(f"{Path(input_path).name} holds NaN or infinite voxel values")
    if float(np.ptp(volume.data)) == 0.0:
        raise InvalidFormat(f"{Path(input_path).name} is constant ({float(volume.data.flat[0])}); no image content")


INPUT_INFO_SCHEMA = {
    "type": "object",
    "required": ["case", "shape", "spacing_mm", "affine", "orientation", "n_echoes"],
    "properties": {
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 2}, "minItems": 3, "maxItems": 3},
        "spacing_mm": {"type": "array", "items": {"type": "number", "exclusiveMinimum": 0}, "minItems": 3},
        "orientation": {"const": "RAS"},
        "n_echoes": {"type": "integer", "minimum": 1},
    },
}


def segment(
    ctx: StepContext,
    image: str,
    case: str,
    model_name: str,
    model_overrides: dict | None = None,
    original_affine: list | None = None,
    largest_component: bool = True,
    fill_bone_holes: bool = True,
    ground_truth: str | None = None,
) -> StepResult:
    """Segment the canonical image with a registered nnU-Net model; write ``<case>_all-labels.nii.gz``.

    The image is handed to nnU-Net in the input's original voxel order
    (``original_affine``), as nnU-Net sees the file, and the labels are brought
    back onto the canonical grid.  Writes ``<case>_segmentation.json`` with the
    volume of every structure (mm³) and, when ``ground_truth`` is given, Dice.
    """
    import nibabel as nib

    from workbench.data.labels import KNEE_LABELS
    from workbench.io.nifti import write_nifti
    from workbench.knee.segmentation import dice_scores, postprocess
    from workbench.registry import REGISTRY

    spec = REGISTRY.model(model_name)
    segmenter = spec.load(device=ctx.device, **(model_overrides or {}))
    ctx.progress(0.02, "reading image")
    img = nib.load(image)
    data = np.asarray(img.dataobj, dtype=np.float32)
    to_original, to_canonical_ornt = _orientation_transforms(img.affine, original_affine, data.shape)
    original = nib.orientations.apply_orientation(data, to_original)
    # spacing along the re-ordered axes (also right when the image was resampled: only directions are reused)
    reordered_affine = img.affine @ nib.orientations.inv_ornt_aff(to_original, data.shape)
    spacing = np.linalg.norm(reordered_affine[:3, :3], axis=0)
    seg_zyx = segmenter.predict(original.transpose(2, 1, 0), tuple(spacing[::-1]),
                                progress=lambda f, m: ctx.progress(0.05 + 0.85 * f, m))
    labels = nib.orientations.apply_orientation(seg_zyx.transpose(2, 1, 0), to_canonical_ornt).astype(np.uint8)
    ctx.progress(0.92, "post-processing")
    if largest_component or fill_bone_holes:
        labels = postprocess(labels, largest_component, fill_bone_holes)
    name = f"{case}_all-labels.nii.gz"
    write_nifti(labels, img.affine, ctx.work_dir / name, dtype=np.uint8)

    voxel_mm3 = float(np.prod(img.header.get_zooms()[:3]))
    counts = np.bincount(labels.ravel(), minlength=16)
    summary = {
        "model": model_name,
        "configurations": [stage.name for stage in segmenter.stages],
        "model_folder": str(segmenter.stages[-1].folder),
        "volumes_mm3": {label.key: round(float(counts[label.value]) * voxel_mm3, 1) for label in KNEE_LABELS},
        "dice": None,
    }
    if ground_truth:
        truth = np.asarray(nib.load(ground_truth).dataobj).astype(np.int16)
        if truth.shape != labels.shape:
            raise InvalidFormat(f"Ground truth {Path(ground_truth).name} does not match the segmentation's grid")
        scores = dice_scores(labels, truth)
        summary["dice"] = {label.key: (None if scores[label.value] is None else round(scores[label.value], 4))
                           for label in KNEE_LABELS}
    (ctx.work_dir / f"{case}_segmentation.json").write_text(json.dumps(summary, indent=2))
    ctx.progress(1.0, "done")
    outputs = {
        "labels": Output(name, "nifti", expect={"shape": list(labels.shape), "affine": img.affine.tolist(),
                                                "labels": list(range(10))},
                         description="segmentation, workbench label table"),
        "summary": Output(f"{case}_segmentation.json", "json", description="volumes and Dice"),
    }
    metrics = {"volumes_mm3": summary["volumes_mm3"]}
    if summary["dice"] is not None:
        metrics["dice"] = summary["dice"]
    return StepResult(outputs=outputs, metrics=metrics)


def _orientation_transforms(canonical_affine, original_affine, shape):
    """nibabel orientation transforms canonical → original voxel order and back."""
    import nibabel as nib

    identity = np.array([[0, 1], [1, 1], [2, 1]])
    if original_affine is None:
        return identity, identity
    canonical = nib.orientations.io_orientation(np.asarray(canonical_affine))
    original = nib.orientations.io_orientation(np.asarray(original_affine))
    return nib.orientations.ornt_transform(canonical, original), nib.orientations.ornt_transform(original, canonical)
