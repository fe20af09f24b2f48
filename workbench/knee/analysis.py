"""Step functions of the knee analysis after segmentation: subregions, meshes and thickness, T2, results.

Like :mod:`workbench.knee.steps`, each takes a
:class:`~workbench.runner.StepContext` and plain inputs (paths, numbers),
writes into ``ctx.work_dir`` and returns a :class:`~workbench.runner.StepResult`;
the runner runs them in child processes.  The computations live in
:mod:`~workbench.knee.subregions`, :mod:`~workbench.knee.meshes`,
:mod:`~workbench.knee.thickness` and :mod:`~workbench.knee.t2`; these functions
only read the run's files, call them and write the results.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np

from workbench.errors import InvalidFormat
from workbench.outputs import Output
from workbench.runner import StepContext, StepResult

#: Mesh files per bone (the original pipeline's names) and the cartilage meshes beside them.
CARTILAGE_MESHES = {"femur": "fem_cart", "tibia": "tib_cart", "patella": "pat_cart"}

#: Units of the results' fields by suffix (``<case>_results.json`` ``units``).
RESULT_UNITS = {"_mm_mean": "mm", "_mm_std": "mm", "_mm_median": "mm", "_t2_ms_mean": "ms",
                "_t2_ms_std": "ms", "_t2_ms_median": "ms", "_volume_mm3": "mm^3"}


def _read_labels(path: str) -> tuple[np.ndarray, np.ndarray]:
    import nibabel as nib

    img = nib.load(path)
    return np.asarray(img.dataobj).astype(np.uint8), np.asarray(img.affine, dtype=np.float64)


def subregions(ctx: StepContext, labels: str, case: str, side: str | None = None) -> StepResult:
    """Split the femoral cartilage (2) into the subregions 11-15; write ``<case>_subregions-labels.nii.gz``.

    Also writes ``<case>_subregions.json`` with the geometry used (side, split
    plane, bounds, region volumes).
    """
    from workbench.io.nifti import write_nifti
    from workbench.knee.subregions import femoral_subregions, subregions_filename

    ctx.progress(0.0, "reading labels")
    data, affine = _read_labels(labels)
    result = femoral_subregions(data, affine, side=side)
    ctx.progress(0.8, "writing")
    name = subregions_filename(case)
    write_nifti(result.labels, affine, ctx.work_dir / name, dtype=np.uint8)
    geometry = result.to_dict()
    (ctx.work_dir / f"{case}_subregions.json").write_text(json.dumps(geometry, indent=2, default=float))
    ctx.progress(1.0, "done")
    outputs = {
        "labels": Output(name, "nifti", expect={"shape": list(data.shape), "affine": affine.tolist(),
                                                "labels": [0, 1, *range(3, 10), *range(11, 16)]},
                         description="labels with femoral cartilage subregions 11-15"),
        "geometry": Output(f"{case}_subregions.json", "json", description="subregion geometry"),
    }
    return StepResult(outputs=outputs, metrics={"side": geometry.get("side")}, values={"side": geometry.get("side")})


def meshes_and_thickness(ctx: StepContext, labels: str, case: str, n_vertices: dict[str, int] | None = None,
                         sigma_mm: float | None = None) -> StepResult:
    """Bone and cartilage meshes (scanner mm) with per-vertex cartilage thickness, and regional statistics.

    Writes ``{bone}_mesh.vtk`` and ``.ply`` (point arrays ``thickness_mm`` and
    ``region``) for each bone present, ``{cartilage}_mesh.vtk``/``.ply`` for
    its cartilage, ``<case>_thickness.json`` (``{region}_mm_{mean,std,median}``
    and per-bone figures) and ``<case>_thickness.png``.  The femur must be
    present (``INVALID_FORMAT`` otherwise); tibia and patella are optional.
    """
    from workbench.figures import save_figure, thickness_maps
    from workbench.knee.meshes import (
        mesh_from_labels,
        present_values,
        write_ply,
        write_vtk,
    )
    from workbench.knee.thickness import BONES, knee_thickness

    ctx.progress(0.0, "reading labels")
    data, affine = _read_labels(labels)
    present = set(present_values(data, [v for v, _ in BONES.values()]))
    if BONES["femur"][0] not in present:
        found = sorted(int(v) for v in np.unique(data) if v)
        raise InvalidFormat(f"The label map {Path(labels).name} has no femur (label 7); labels found: {found or 'none'}",
                            "Meshes and thickness need the femur; check the segmentation or the label file.")
    ctx.progress(0.05, "meshing bones and measuring cartilage")
    bones, stats = knee_thickness(data, affine, n_vertices=n_vertices, sigma_mm=sigma_mm)
    too_small = [bone for bone, result in bones.items() if len(result.mesh.faces) == 0]
    if "femur" in too_small:
        raise InvalidFormat(f"The femur in {Path(labels).name} is too small to mesh "
                            f"({int(np.count_nonzero(data == BONES['femur'][0]))} voxels)",
                            "Check the segmentation: the femur should be one large connected structure.")
    bones = {bone: result for bone, result in bones.items() if bone not in too_small}
    outputs: dict[str, Output] = {}
    per_bone: dict[str, Any] = {}
    for i, (bone, result) in enumerate(bones.items()):
        ctx.progress(0.6 + 0.3 * i / max(len(bones), 1), f"writing {bone} meshes")
        point_data = result.point_data()
        for ext, writer in ((".vtk", write_vtk), (".ply", write_ply)):
            writer(ctx.work_dir / f"{bone}_mesh{ext}", result.mesh, point_data)
            outputs[f"{bone}_mesh{ext}"] = Output(f"{bone}_mesh{ext}", "mesh", expect={"min_faces": 100},
                                                  description=f"{bone} surface, thickness_mm and region")
        cart_values = [v for v in BONES[bone][1] if v in set(np.unique(data).tolist())]
        cart_name = CARTILAGE_MESHES[bone]
        cart = mesh_from_labels(data, affine, cart_values, keep_largest=False) if cart_values else None
        if cart is not None and len(cart.faces):  # fragments may vanish in the smoothing
            for ext, writer in ((".vtk", write_vtk), (".ply", write_ply)):
                writer(ctx.work_dir / f"{cart_name}_mesh{ext}", cart, None)
                outputs[f"{cart_name}_mesh{ext}"] = Output(f"{cart_name}_mesh{ext}", "mesh",
                                                           description=f"{cart_name} surface")
        covered = result.thickness_mm > 0
        per_bone[bone] = {"n_vertices": len(result.mesh.vertices), "n_faces": len(result.mesh.faces),
                          "covered_fraction": round(float(covered.mean()), 4),
                          "mean_thickness_mm": round(float(result.thickness_mm[covered].mean()), 4)
                          if covered.any() else None,
                          "seconds": {k: round(v, 3) for k, v in result.seconds.items()}}
    summary = {"stats": stats, "bones": per_bone, "missing_bones": sorted(set(BONES) - set(bones)),
               "too_small_to_mesh": too_small,
               "method": "smoothed label fields sampled along bone normals (workbench.knee.thickness)"}
    (ctx.work_dir / f"{case}_thickness.json").write_text(json.dumps(summary, indent=2))
    outputs["summary"] = Output(f"{case}_thickness.json", "json", description="regional cartilage thickness")
    ctx.progress(0.92, "drawing thickness maps")
    save_figure(thickness_maps({b: (r.mesh.vertices, r.thickness_mm) for b, r in bones.items()}, title=case),
                ctx.work_dir / f"{case}_thickness.png")
    outputs["figure"] = Output(f"{case}_thickness.png", "png", description="thickness maps")
    ctx.progress(1.0, "done")
    return StepResult(outputs=outputs, metrics={k: (None if v is None else round(v, 4)) for k, v in stats.items()})


def t2_plan_for_run(echoes: str | None, info: str) -> tuple[bool, str]:
    """Whether the run's input allows T2 mapping, and why (read from ``load_input``'s files)."""
    from workbench.knee.t2 import load_echoes, t2_plan

    if echoes is None or not Path(echoes).exists():
        n = json.loads(Path(info).read_text()).get("n_echoes", 1)
        return False, f"single-echo input ({n} echo): T2 mapping needs a multi-echo (MESE) series or a qDESS"
    plan = t2_plan(load_echoes(echoes, info))
    return plan.kind is not None, plan.reason


def t2_mapping(ctx: StepContext, echoes: str | None, info: str, labels: str, case: str,
               method: str = "nonlinear", min_r2: float = 0.8, skip_first_echo: bool = False) -> StepResult:
    """T2 map of the cartilage (and its surroundings) and regional T2, whole, deep and superficial.

    Writes ``<case>_t2.nii.gz`` (ms, 0 where masked) and ``<case>_t2.json``.
    Single-echo input fails with ``INVALID_FORMAT`` (the pipeline skips the step
    beforehand unless T2 was asked for).
    """
    from scipy import ndimage

    from workbench.data.labels import CARTILAGE_VALUES
    from workbench.knee.t2 import (
        load_echoes,
        region_t2_stats,
        t2_from_volume,
        t2_plan,
        write_t2_map,
    )

    if echoes is None or not Path(echoes).exists():
        raise InvalidFormat("The input has a single echo: no T2 map can be computed",
                            "Give a multi-echo (MESE) series, or set t2 to auto/off.")
    ctx.progress(0.0, "reading echoes")
    volume = load_echoes(echoes, info)
    plan = t2_plan(volume)
    if plan.kind is None:
        raise InvalidFormat(plan.reason, "T2 needs a multi-echo series or a qDESS with its sequence tags.")
    data, affine = _read_labels(labels)
    if data.shape != volume.shape:
        raise InvalidFormat(f"Labels {list(data.shape)} and echoes {list(volume.shape)} are on different grids")
    cartilage = np.isin(data, [*CARTILAGE_VALUES, *range(11, 16)])
    mask = ndimage.binary_dilation(cartilage, iterations=2) if cartilage.any() else None
    ctx.progress(0.1, f"fitting T2 ({plan.kind}, {method})")
    options = {} if plan.kind == "qdess" else {"min_r2": min_r2, "skip_first_echo": skip_first_echo}
    fit = t2_from_volume(volume, method=method, mask=mask, **options)
    ctx.progress(0.8, "regional statistics")
    stats = region_t2_stats(fit.t2_ms, data, volume.spacing, method=fit.method)
    name = f"{case}_t2.nii.gz"
    write_t2_map(fit, affine, ctx.work_dir / name)
    summary = {"plan": plan.kind, "reason": plan.reason, "fit": fit.summary(), "stats": stats}
    (ctx.work_dir / f"{case}_t2.json").write_text(json.dumps(summary, indent=2, default=float))
    ctx.progress(1.0, "done")
    outputs = {"t2_map": Output(name, "nifti", expect={"shape": list(data.shape), "dtype_kind": "f"},
                                description="T2 (ms), 0 where masked"),
               "summary": Output(f"{case}_t2.json", "json", description="regional T2")}
    metrics = {k: v for k, v in stats.items() if k.endswith("_t2_ms_median") or k == "t2_method"}
    return StepResult(outputs=outputs, metrics=metrics)


def results_table(ctx: StepContext, labels: str, case: str, thickness: str | None = None,
                  t2: str | None = None, subregions: str | None = None, nsm: list[str] | None = None,
                  steps: dict[str, str] | None = None) -> StepResult:
    """Gather the run's figures into ``<case>_results.json`` and ``<case>_results.csv`` (one row).

    Field names follow the original pipeline: ``{region}_mm_{mean,std,median}``,
    ``t2_method``, ``{region}_t2_ms_*``; plus ``{structure}_volume_mm3``,
    ``knee_side``, the shape-model fit errors and B-scores (``nsm_*``, ``nsm_bone_only_*``;
    the full fits are in the ``NSM_*recon_params.json`` files) and, in the JSON, ``units`` and the status of every step
    (``steps``: name → status), so a skipped or failed optional step shows.
    """
    from workbench.data.labels import KNEE_LABELS

    data, affine = _read_labels(labels)
    voxel_mm3 = float(abs(np.linalg.det(affine[:3, :3])))
    counts = np.bincount(data.ravel(), minlength=16)
    row: dict[str, Any] = {"case": case}
    side = None
    if subregions and Path(subregions).exists():
        side = json.loads(Path(subregions).read_text()).get("side")
    row["knee_side"] = side
    for label in KNEE_LABELS:
        row[f"{label.key}_volume_mm3"] = round(float(counts[label.value]) * voxel_mm3, 1)
    if thickness and Path(thickness).exists():
        row.update(json.loads(Path(thickness).read_text())["stats"])
    if t2 and Path(t2).exists():
        row.update(json.loads(Path(t2).read_text())["stats"])
    for params_path in nsm or []:
        params = json.loads(Path(params_path).read_text())
        prefix = "nsm_bone_only" if "bone_only" in Path(params_path).name else "nsm"
        for key in ("assd_bone_mm", "assd_cartilage_mm", "Bscore"):
            if key in params:
                row[f"{prefix}_{key}"] = params[key]
    row = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}
    units = {key: unit for key in row for suffix, unit in RESULT_UNITS.items() if key.endswith(suffix)}
    document = {"case": case, "results": row, "units": units, "steps": dict(steps or {})}
    (ctx.work_dir / f"{case}_results.json").write_text(json.dumps(document, indent=2))
    with open(ctx.work_dir / f"{case}_results.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(row))
        writer.writeheader()
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    outputs = {"json": Output(f"{case}_results.json", "json", description="results table"),
               "csv": Output(f"{case}_results.csv", "csv", description="results table, one row")}
    return StepResult(outputs=outputs, metrics={"n_fields": len(row)})


def nsm_fit(ctx: StepContext, model_name: str, femur_mesh: str, cartilage_mesh: str | None, side: str | None,
            model_folder: str | None = None, bscore_folder: str | None = None,
            max_iterations: int | None = None) -> StepResult:
    """Fit one neural shape model (``bone_only`` or ``bone_and_cart``) to the knee's femur (and cartilage) meshes.

    Writes ``NSM_bone_only_recon_params.json`` or ``NSM_recon_params.json``
    (latent, B-score, alignment, ASSD per surface) and the reconstructed
    surfaces as PLY.  Left knees are mirrored to the right for the fit.
    """
    import trimesh

    from workbench.knee.nsm import RECON_MESH_PREFIXES, RECON_PARAMS_FILES
    from workbench.registry import REGISTRY

    if side not in ("right", "left"):
        raise InvalidFormat("The knee side is unknown (the subregions step found no medial/lateral tibial "
                            "cartilage), so the femur cannot be mirrored for the shape model",
                            "Check the segmentation of the tibial cartilage (labels 3 and 4).")
    surfaces = {"femur": trimesh.load(femur_mesh, force="mesh")}
    if cartilage_mesh:
        surfaces["femoral_cartilage"] = trimesh.load(cartilage_mesh, force="mesh")
    overrides = {k: v for k, v in {"model_folder": model_folder, "max_iterations": max_iterations}.items()
                 if v is not None}
    ctx.progress(0.0, f"loading {model_name}")
    runner = REGISTRY.model(model_name).load(device=ctx.device, **overrides)
    try:
        fit = runner.fit(surfaces, side, bscore_folder=bscore_folder,
                         progress=lambda f, m: ctx.progress(0.05 + 0.9 * f, m))
    finally:
        runner.close()
    paths = fit.save(ctx.work_dir, RECON_PARAMS_FILES[model_name], RECON_MESH_PREFIXES[model_name])
    params = json.loads(paths["params"].read_text())
    outputs = {"params": Output(paths["params"].name, "json", description=f"{model_name} fit parameters")}
    for key, path in paths.items():
        if key != "params":
            outputs[key] = Output(path.name, "mesh", description=f"{model_name} reconstruction of {key}")
    metrics = {k: params.get(k) for k in ("assd_bone_mm", "assd_cartilage_mm", "Bscore")}
    return StepResult(outputs=outputs, metrics=metrics)
