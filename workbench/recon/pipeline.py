"""The multi-view reconstruction pipeline: options → job config → steps in a :class:`~workbench.runner.Run`.

Called from ``notebooks/reconstruction.ipynb`` (and so from ``workbench run
recon`` through papermill) and from tests.

Steps:

1. ``load_input``: check the posed views (NeRF-synthetic, or images + masks +
   cameras) → ``input.json``, ``input_views.png``.  Bad input is
   INVALID_FORMAT naming the file.
2. one step per model of the run's model sequence (``nvdiffrec``) →
   ``<model>/`` with the mesh, textures, light and previews.  The models run
   one after the other, each in its own process, so GPU memory is released
   between them.
3. ``evaluate_<model>`` (optional: a failure is recorded, the mesh stays):
   ``<model>/metrics.json`` with held-out view PSNR/SSIM (rendered from the
   exported files) and geometry metrics against ``gt_mesh.ply`` when the input
   folder has one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from workbench.config import ReconOptions, parse_options, recon_job_config
from workbench.gpu import resolve_device
from workbench.progress import Progress, default_sinks
from workbench.runner import Run, new_run_dir

STEP_FUNCTIONS = {
    "load_input": "workbench.recon.steps:load_views",
    "nvdiffrec": "workbench.recon.steps:nvdiffrec",
    "evaluate": "workbench.recon.steps:evaluate",
}

#: model option value → the models it runs, in order
MODEL_SEQUENCES: dict[str, tuple[str, ...]] = {"nvdiffrec": ("nvdiffrec",)}


def run_recon(
    options: ReconOptions | dict[str, Any],
    run_dir: str | Path | None = None,
    *,
    interactive: bool = False,
    progress: Progress | None = None,
) -> Run:
    """Run the reconstruction pipeline and return the finished :class:`Run`.

    ``options`` are validated (CONFIG_ERROR names a bad option); ``run_dir``
    defaults to a new folder under ``outputs/``.  A failing step raises its
    :class:`~workbench.errors.WorkbenchError` after ``result.json`` and
    ``error.log`` are written.
    """
    if not isinstance(options, ReconOptions):
        options = parse_options(ReconOptions, dict(options))
    config = recon_job_config(options)  # CONFIG_ERROR before any step runs
    device = resolve_device(options.device)
    run_dir = Path(run_dir) if run_dir else new_run_dir("recon")
    models = list(MODEL_SEQUENCES[options.model])
    progress = progress or Progress(default_sinks(run_dir, interactive))
    timeouts = config["timeouts"]
    images = str(options.images)
    resolution = config["input"].get("resolution")
    evaluation = config.get("evaluate") or {}
    with Run(run_dir, pipeline="recon", config=config, models=models, timeout_s=timeouts.get("run_s"),
             device=device, progress=progress, parameters=options.model_dump(),
             n_steps=1 + 2 * len(models)) as run:
        loaded = run.step("load_input", STEP_FUNCTIONS["load_input"], timeout_s=timeouts.get("load_input_s"),
                          images=images, resolution=resolution, min_views=int(config["input"].get("min_views", 4)))
        for model in models:
            run.step(model, STEP_FUNCTIONS[model], timeout_s=timeouts.get(f"{model}_s"), model=model,
                     images=images, config=config[model], resolution=resolution)
            run.step(f"evaluate_{model}", STEP_FUNCTIONS["evaluate"], timeout_s=timeouts.get("evaluate_s"),
                     optional=True, model=model, model_name=model, images=images, model_dir=str(run.run_dir / model),
                     resolution=resolution, gt_mesh=evaluation.get("gt_mesh"),
                     thresholds=list(evaluation.get("fscore_thresholds", [0.005, 0.01])),
                     n_points=int(evaluation.get("sample_points", 100_000)),
                     test_split=bool(evaluation.get("test_split", True)) and loaded.values.get("n_test", 0) > 0)
    return run
