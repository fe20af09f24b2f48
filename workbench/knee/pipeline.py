"""The knee MRI pipeline: options → job config → steps in a :class:`~workbench.runner.Run`.

Called from ``notebooks/knee_mri.ipynb`` (and so from ``workbench run knee``
through papermill), from the quickstart notebook and from tests.

Steps in this version:

1. ``load_input``: DICOM/NIfTI → canonical RAS NIfTI, echoes, preview, geometry.

Segmentation (nnU-Net), meshes, thickness, T2 and shape models are later
steps; until they exist the run records them as ``skipped`` with the reason,
so ``result.json`` always says exactly what was and was not computed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from workbench.config import KneeOptions, knee_job_config, parse_options
from workbench.gpu import resolve_device
from workbench.knee.steps import case_name
from workbench.progress import Progress, default_sinks
from workbench.runner import Run, new_run_dir

STEP_FUNCTIONS = {
    "load_input": "workbench.knee.steps:load_input",
}
#: Steps of the full pipeline that this version does not compute yet, with the reason recorded.
NOT_YET_AVAILABLE = {
    "segmentation": "nnU-Net segmentation is not part of this workbench version yet",
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
        run.step(
            "load_input", STEP_FUNCTIONS["load_input"], timeout_s=timeouts.get("load_input_s"),
            input_path=str(options.input), case=case, series=config["input"].get("series"),
            resample_mm=config["input"].get("resample_mm"), ground_truth=config["input"].get("ground_truth"),
        )
        for name, reason in NOT_YET_AVAILABLE.items():
            run.skip(name, reason, model=options.segmentation_model if name == "segmentation" else None)
    return run


def _nsm_models(nsm_type: str) -> list[str]:
    return {"none": [], "bone_only": ["bone_only"], "bone_and_cart": ["bone_and_cart"],
            "both": ["bone_only", "bone_and_cart"]}[nsm_type]
