"""The knee MRI pipeline: options → job config → steps in a :class:`~workbench.runner.Run`.

Called from ``notebooks/knee_mri.ipynb`` (and so from ``workbench run knee``
through papermill), from the quickstart notebook and from tests.

Steps:

1. ``load_input``: DICOM/NIfTI → canonical RAS NIfTI, echoes, preview, geometry
   (and the user's label map, ``--segmentation``, on the same grid).
2. ``segmentation``: nnU-Net v2 (``nnunet_fullres`` or ``nnunet_cascade``) →
   ``<case>_all-labels.nii.gz``, volumes, Dice against a given ground truth.
   It runs with the user's model (``--model-dir``) or the shipped one in
   ``models/knee_nnunet``; a missing or broken model folder fails the step with
   ``MODEL_UNAVAILABLE`` (the loaded input stays).  Skipped when the user gave
   a segmentation.
3. ``subregions`` (optional: a failure is recorded and the femoral cartilage
   stays whole): femoral cartilage subregions 11-15.
4. ``meshes``: bone and cartilage meshes with per-vertex thickness, regional
   thickness statistics.
5. ``t2`` (optional): T2 map and regional T2 on multi-echo input; skipped with
   the reason otherwise (``t2: on`` makes a single-echo input a recorded failure).
6. ``nsm_bone_only``, ``nsm_bone_and_cart`` (optional, by ``nsm_type``): shape
   model fits to the femur (and its cartilage) meshes, one process each, so GPU
   memory is released between them.
7. ``results``: ``<case>_results.json`` and ``.csv``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from workbench.config import KneeOptions, knee_job_config, nsm_models, nsm_type_from_config, parse_options
from workbench.errors import WorkbenchError
from workbench.gpu import resolve_device
from workbench.knee.steps import case_name
from workbench.progress import Progress, default_sinks
from workbench.runner import Run, new_run_dir

STEP_FUNCTIONS = {
    "load_input": "workbench.knee.steps:load_input",
    "segmentation": "workbench.knee.steps:segment",
    "subregions": "workbench.knee.analysis:subregions",
    "meshes": "workbench.knee.analysis:meshes_and_thickness",
    "t2": "workbench.knee.analysis:t2_mapping",
    "nsm": "workbench.knee.analysis:nsm_fit",
    "results": "workbench.knee.analysis:results_table",
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
    models = [options.segmentation_model] + nsm_models(options.nsm_type)
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
            segmentation=config["input"].get("segmentation"),
        )
        if "segmentation" in loaded.outputs:
            labels = loaded.outputs["segmentation"]
            run.skip("segmentation", f"labels given: {config['input']['segmentation']}",
                     model=options.segmentation_model)
        else:
            post = config.get("segmentation", {})
            segmented = run.step(
                "segmentation", STEP_FUNCTIONS["segmentation"], timeout_s=timeouts.get("segmentation_s"),
                model=options.segmentation_model, image=str(loaded.outputs["image"]), case=case,
                model_name=options.segmentation_model, model_overrides=nnunet_overrides(config),
                original_affine=loaded.values["original_affine"],
                largest_component=bool(post.get("largest_component", True)),
                fill_bone_holes=bool(post.get("fill_bone_holes", True)),
                ground_truth=str(loaded.outputs["ground_truth"]) if "ground_truth" in loaded.outputs else None,
            )
            labels = segmented.outputs["labels"]
        _analyse(run, config, case, loaded, labels)
    return run


def _analyse(run: Run, config: dict[str, Any], case: str, loaded: Any, labels: Path) -> None:
    """Subregions, meshes and thickness, T2 and the results table on a label map."""
    from workbench.knee.analysis import t2_plan_for_run

    timeouts = config["timeouts"]
    sub = run.step("subregions", STEP_FUNCTIONS["subregions"], timeout_s=timeouts.get("subregions_s"),
                   optional=True, labels=str(labels), case=case)
    analysed = sub.outputs["labels"] if sub is not None else labels
    bones = config.get("bones", {})
    meshes = run.step("meshes", STEP_FUNCTIONS["meshes"], timeout_s=timeouts.get("meshes_s"),
                      labels=str(analysed), case=case,
                      n_vertices={b: int(v["n_points"]) for b, v in bones.items() if v.get("n_points")},
                      sigma_mm=config.get("thickness", {}).get("sigma_mm"))
    t2_config = dict(config.get("t2") or {})
    mode = t2_config.get("mode", "auto")
    echoes = str(loaded.outputs["echoes"]) if "echoes" in loaded.outputs else None
    info = str(loaded.outputs["info"])
    t2 = None
    if mode == "off":
        run.skip("t2", "T2 mapping is off (t2: off)")
    else:
        try:
            possible, reason = t2_plan_for_run(echoes, info) if mode == "auto" else (True, "")
        except WorkbenchError as exc:  # unreadable echoes: the step is skipped, the analysis goes on
            possible, reason = False, exc.message
        if not possible:
            run.skip("t2", reason)
        else:
            t2 = run.step("t2", STEP_FUNCTIONS["t2"], timeout_s=timeouts.get("t2_s"), optional=True,
                          echoes=echoes, info=info, labels=str(analysed), case=case,
                          method=t2_config.get("method", "nonlinear"), min_r2=float(t2_config.get("min_r2", 0.8)),
                          skip_first_echo=bool(t2_config.get("skip_first_echo", False)))
    nsm_params = []
    for model_name in nsm_models(nsm_type_from_config(config)):
        section = config.get("nsm_bone_only" if model_name == "bone_only" else "nsm", {}) or {}
        bscore = config.get("bscore_bone_only" if model_name == "bone_only" else "bscore", {}) or {}
        state = section.get("path_model_config") or section.get("path_model_state")
        fit = run.step(
            f"nsm_{model_name}", STEP_FUNCTIONS["nsm"], timeout_s=timeouts.get("nsm_s"), optional=True,
            model=model_name, model_name=model_name, femur_mesh=str(meshes.outputs["femur_mesh.ply"]),
            cartilage_mesh=str(meshes.outputs["fem_cart_mesh.ply"]) if "fem_cart_mesh.ply" in meshes.outputs
            else None,
            side=sub.values.get("side") if sub is not None else None,
            model_folder=str(Path(state).parent) if state else None,
            bscore_folder=bscore.get("path_model_folder"), max_iterations=section.get("max_iterations"))
        if fit is not None:
            nsm_params.append(str(fit.outputs["params"]))
    run.step("results", STEP_FUNCTIONS["results"], timeout_s=timeouts.get("results_s"),
             labels=str(analysed), case=case, thickness=str(meshes.outputs["summary"]),
             t2=str(t2.outputs["summary"]) if t2 is not None else None,
             subregions=str(sub.outputs["geometry"]) if sub is not None else None, nsm=nsm_params,
             steps={s.name: s.status for s in run.steps})


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
