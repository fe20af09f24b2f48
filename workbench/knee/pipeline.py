"""The knee MRI pipeline: options → job config → steps in a :class:`~workbench.runner.Run`.

Called from ``notebooks/knee_mri.ipynb`` (and so from ``workbench run knee``
through papermill), from the quickstart notebook and from tests.

Steps in this version:

1. ``load_input``: DICOM/NIfTI → canonical RAS NIfTI, echoes, preview, geometry.
2. ``segmentation``: nnU-Net v2 (``nnunet_fullres`` or ``nnunet_cascade``) →
   ``<case>_all-labels.nii.gz`` on the canonical grid, volumes, Dice against
   a given ground truth.  It runs with the user's model (``--model-dir``) or
   the shipped one; while no model is shipped in ``models/knee_nnunet`` and
   none is given, the step is recorded as ``skipped`` with that reason.

Meshes, thickness, T2 and shape models are later steps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from workbench.config import KneeOptions, knee_job_config, parse_options
from workbench.gpu import resolve_device
from workbench.knee.segmentation import resolve_model_root
from workbench.knee.steps import case_name
from workbench.progress import Progress, default_sinks
from workbench.runner import Run, new_run_dir

STEP_FUNCTIONS = {
    "load_input": "workbench.knee.steps:load_input",
    "segmentation": "workbench.knee.steps:segment",
}


def run_knee(
    options: KneeOptions | dict[str, Any],
    run_dir: str | Path | None = None,
    *,
    interactive: bool = False,
    progress: Progress | None = None,
) -> Run:
    """Run the knee pipeline and return the finished :class:`Run` (its ``result()`` is ``result.json``).

    ``options`` are validated (CONFIG_ERROR names a bad option); ``run_dir``
    defaults to a new folder under ``outputs/``.  A failing step raises its
    :class:`~workbench.errors.WorkbenchError` after ``result.json`` and
    ``error.log`` are written.
    """
    if not isinstance(options, KneeOptions):
        options = parse_options(KneeOptions, dict(options))
    config = knee_job_config(options)
    device = resolve_device(options.device)
    run_dir = Path(run_dir) if run_dir else new_run_dir("knee")
    models = [options.segmentation_model] + _nsm_models(options.nsm_type)
    progress = progress or Progress(default_sinks(run_dir, interactive))
    timeouts = config["timeouts"]
    case = case_name(options.input)
    with Run(run_dir, pipeline="knee", config=config, models=models, timeout_s=timeouts.get("run_s"),
             device=device, progress=progress, parameters=options.model_dump(),
             n_steps=len(STEP_FUNCTIONS)) as run:
        loaded = run.step(
            "load_input", STEP_FUNCTIONS["load_input"], timeout_s=timeouts.get("load_input_s"),
            input_path=str(options.input), case=case, series=config["input"].get("series"),
            resample_mm=config["input"].get("resample_mm"), ground_truth=config["input"].get("ground_truth"),
        )
        post = config.get("segmentation", {})
        model_root = resolve_model_root(config["nnunet"]["model_name"])
        if options.model_dir is None and not model_root.exists():
            run.skip("segmentation", f"no segmentation model is installed at {model_root} yet; pass --model-dir "
                                     "to use your own nnU-Net v2 model", model=options.segmentation_model)
            return run
        run.step(
            "segmentation", STEP_FUNCTIONS["segmentation"], timeout_s=timeouts.get("segmentation_s"),
            model=options.segmentation_model, image=str(loaded.outputs["image"]), case=case,
            model_name=options.segmentation_model, model_overrides=nnunet_overrides(config),
            original_affine=loaded.values["original_affine"],
            largest_component=bool(post.get("largest_component", True)),
            fill_bone_holes=bool(post.get("fill_bone_holes", True)),
            ground_truth=str(loaded.outputs["ground_truth"]) if "ground_truth" in loaded.outputs else None,
        )
    return run


def nnunet_overrides(config: dict[str, Any]) -> dict[str, Any]:
    """The job config's ``nnunet`` section as overrides of the registered model's config."""
    nnunet = config["nnunet"]
    return {
        "model_folder": str(nnunet["model_name"]),
        "folds": tuple(str(f) for f in nnunet.get("folds", ["all"])),
        "checkpoint": str(nnunet.get("checkpoint", "checkpoint_final.pth")),
        "use_mirroring": bool(nnunet.get("use_mirroring", False)),
        "tile_step_size": float(nnunet.get("tile_step_size", 0.5)),
    }


def _nsm_models(nsm_type: str) -> list[str]:
    return {"none": [], "bone_only": ["bone_only"], "bone_and_cart": ["bone_and_cart"],
            "both": ["bone_only", "bone_and_cart"]}[nsm_type]
