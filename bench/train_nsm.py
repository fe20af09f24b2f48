"""Train the workbench's neural shape models and evaluate them on held-out femurs.

Trains ``bone_only`` (femur) and ``bone_and_cart`` (femur + femoral cartilage)
DeepSDF-style auto-decoders (:mod:`workbench.knee.nsm`) from the two real knee
label maps of the mskt 0.1.22 sdist (MIT) with shape augmentation (smooth
random warps, per-axis scaling, small rotations; left maps mirrored to right),
optionally plus label maps from the synthetic knee generator, and writes one
self-describing model folder per model into ``--out`` (config.json,
weights.pt, mean_shape.npz, model_card.md, metadata.json with sha256).

Evaluation, through the model folder just written (``load_nsm``) and the
pipeline's own ``fit_nsm``, on shapes not used in training:

- ``augmented``: new random warps of the sources (unseen seeds), half of them
  mirrored into left knees;
- ``generator``: synthetic knee cases (``standard`` preset, unseen seeds, left
  and right knees), meshed from their label maps at 0.6 x 0.6 x 1.0 mm;
- ``holdout``: with ``--holdout SOURCE``, the real label map of a subject left
  out of training entirely (the honest test of a new femur).

Each fit reports ASSD (mm) per surface beside the aligned mean shape's ASSD
(the baseline) and its seconds.

Examples::

    nice -n 19 python bench/train_nsm.py --out /tmp/nsm_models                   # both models, 15 min each
    nice -n 19 python bench/train_nsm.py --out /tmp/nsm_quick --models bone_only --shapes 16 --minutes 0.5 \\
        --eval-augmented 1 --eval-generator 1
    nice -n 19 python bench/train_nsm.py --out /tmp/nsm_loso --holdout sag_3d_dess    # leave one subject out
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import trimesh

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from workbench.data import labels as L
from workbench.data.samples import label_map_paths
from workbench.data.synthetic_knee import (
    SyntheticKneeConfig,
    generate_case,
    read_nrrd_labels,
)
from workbench.knee.nsm.fit import fit_nsm
from workbench.knee.nsm.model import NsmArchitecture, load_nsm
from workbench.knee.nsm.sdf import GridSdf, mesh_from_mask, mirror_mesh, sample_surface
from workbench.knee.nsm.train import (
    FEMUR_CROP,
    SURFACE_LABELS,
    Augmentation,
    SourceShape,
    build_training_set,
    model_from_training,
    nsm_config,
    random_deformation,
    reference_frame,
    save_trained,
    source_from_labels,
    train_decoder,
)
from workbench.models import write_metadata

MODELS = {
    "bone_only": {"folder": "nsm_femur", "surfaces": ("femur",), "composition": "independent",
                  "weights": None},
    "bone_and_cart": {"folder": "nsm_femur_cartilage", "surfaces": ("femur", "femoral_cartilage"),
                      "composition": "offset", "weights": (0.55, 0.45)},
}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# --------------------------------------------------------------------------------------------------
# sources (cached: the EDT of a 0.36 mm label map takes 10-40 s)


def _cache_path(cache: Path, name: str, surfaces, composition: str) -> Path:
    channels = "unions" if composition in ("nested", "offset") else "surfaces"
    return cache / f"source_{name}_{'+'.join(surfaces)}_{channels}.npz"


def save_source(path: Path, src: SourceShape) -> None:
    arrays = {}
    for i, g in enumerate(src.grids):
        arrays[f"grid{i}"] = g.values
        arrays[f"affine{i}"] = g.affine
    for i, m in enumerate(src.meshes):
        arrays[f"verts{i}"] = np.asarray(m.vertices, np.float32)
        arrays[f"faces{i}"] = np.asarray(m.faces, np.int32)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)


def load_source(path: Path, name: str, n_channels: int, n_surfaces: int) -> SourceShape:
    with np.load(path) as z:
        grids = [GridSdf(z[f"grid{i}"], z[f"affine{i}"]) for i in range(n_channels)]
        meshes = [trimesh.Trimesh(z[f"verts{i}"].astype(float), z[f"faces{i}"], process=False)
                  for i in range(n_surfaces)]
    return SourceShape(name, grids, meshes)


def real_sources(spec: dict, cache: Path, holdout: str | None) -> tuple[list[SourceShape], SourceShape | None]:
    sources, held = [], None
    for name, path in label_map_paths(fetch=True).items():
        cpath = _cache_path(cache, name, spec["surfaces"], spec["composition"])
        if cpath.is_file():
            src = load_source(cpath, name, len(spec["surfaces"]), len(spec["surfaces"]))
        else:
            t0 = time.perf_counter()
            data, affine = read_nrrd_labels(path)
            labels = L.remap_labels(data, L.SOURCE_MAPPINGS[name], source=path.name)
            src = source_from_labels(labels, affine, spec["surfaces"], composition=spec["composition"], name=name)
            save_source(cpath, src)
            log(f"source {name}: signed-distance grids and meshes in {time.perf_counter() - t0:.0f} s")
        if name == holdout:
            held = src
        else:
            sources.append(src)
    if holdout and held is None:
        raise SystemExit(f"--holdout {holdout}: not one of {', '.join(label_map_paths(fetch=False))}")
    return sources, held


def generator_case(seed: int, flip: bool, source: str, cache: Path) -> tuple[np.ndarray, np.ndarray, str]:
    path = cache / f"generator_{source}_{seed}_{int(flip)}.npz"
    if path.is_file():
        with np.load(path) as z:
            return z["labels"], z["affine"], str(z["side"])
    config = SyntheticKneeConfig.from_preset("standard", seed=seed, flip=flip, source=source, snr=None)
    case = generate_case(config)
    labels = np.asarray(case.labels.data, np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, labels=labels, affine=case.labels.affine, side=case.side)
    return labels, case.labels.affine, case.side


# --------------------------------------------------------------------------------------------------
# one model


def train_one(model_name: str, args: argparse.Namespace) -> dict:
    spec = MODELS[model_name]
    cache = Path(args.cache or Path(args.out) / "cache")
    folder = Path(args.out) / spec["folder"]
    t_all = time.perf_counter()
    sources, held = real_sources(spec, cache, args.holdout)
    for i in range(args.generator_shapes):
        gsource = ("sag_3d_dess", "right_knee_example")[i % 2]
        if gsource == args.holdout:
            continue
        labels, affine, side = generator_case(500 + i, bool(i % 2), gsource, cache)
        sources.append(source_from_labels(labels, affine, spec["surfaces"], composition=spec["composition"],
                                          name=f"generator{500 + i}", side=side))
    frame = reference_frame(sources[0], FEMUR_CROP)
    aug = Augmentation(rotation_deg=args.rotation_deg, axis_scale=args.axis_scale, warp_mm=args.warp_mm,
                       thickness_scale=args.thickness_scale)
    t0 = time.perf_counter()
    shapes = build_training_set(sources, args.shapes, frame, aug, seed=args.seed, n_points=args.points,
                                surface_weights=spec["weights"], nested=spec["composition"] != "independent", log=log)
    data_s = time.perf_counter() - t0
    log(f"{model_name}: {len(shapes)} training shapes x {args.points} samples in {data_s:.0f} s")

    arch = NsmArchitecture(latent_dim=args.latent, hidden_dims=(args.width,) * args.depth,
                           skip_layers=(args.depth // 2,), n_outputs=len(spec["surfaces"]), init_radius=0.6)
    result = train_decoder(shapes, arch, epochs=args.epochs, max_seconds=args.minutes * 60, lr=args.lr,
                           latent_lr=args.latent_lr, shapes_per_batch=args.batch_shapes,
                           points_per_shape=args.batch_points, clamp=args.clamp,
                           composition=spec["composition"], seed=args.seed, log=log)
    log(f"{model_name}: trained {result.epochs} epochs ({result.steps} steps) in {result.seconds:.0f} s, "
        f"final clamped L1 {result.history[-1]['loss']:.5f}")
    fit_settings = {"max_seconds": args.fit_seconds, "grid_resolution": args.grid}
    config = nsm_config(spec["folder"], spec["surfaces"], spec["composition"], frame, clamp=args.clamp,
                        fit=fit_settings, extra={"training": {
                            "sources": [s.name for s in sources], "shapes": len(shapes), "samples_per_shape":
                            args.points, "epochs": result.epochs, "steps": result.steps,
                            "seconds": round(result.seconds, 1), "final_loss": result.history[-1]["loss"],
                            "augmentation": aug.__dict__, "holdout": args.holdout}})
    model = model_from_training(result, config, frame)
    save_trained(folder, model)

    # evaluation through the folder just written
    loaded = load_nsm(folder, "cpu")
    cases = evaluation_cases(spec, sources, held, args, cache)
    evaluations = []
    for case_name, meshes, side in cases:
        row = fit_row(loaded, case_name, meshes, side, seed=args.seed)
        log(f"  {case_name} ({side}): ASSD {row['assd_mm']} (mean shape {row['assd_mean_shape_mm']}), "
            f"{row['seconds']} s, {row['iterations']} iterations ({row['stop']})")
        evaluations.append(row)
    summary = summarise(evaluations, spec["surfaces"])
    info = {"model": model_name, "folder": str(folder), "parameters": sum(p.numel() for p in model.decoder.parameters()),
            "training": config["training"], "data_seconds": round(data_s, 1), "evaluation": evaluations,
            "summary": summary, "total_seconds": round(time.perf_counter() - t_all, 1)}
    write_card(folder, model_name, spec, arch, info, args)
    write_metadata(folder, name=spec["folder"], version="0.1", task=f"neural shape model ({model_name})",
                   licence="MIT", provenance=(
                       "trained by bench/train_nsm.py on femur" + (" and femoral cartilage" if len(spec["surfaces"]) > 1
                                                                   else "")
                       + " shapes derived from the real knee label maps of the mskt 0.1.22 sdist (MIT) with shape "
                       "augmentation"), architecture=arch.to_dict(), metrics=summary,
                   training=config["training"], created=_dt.datetime.now().isoformat(timespec="seconds"))
    return info


def evaluation_cases(spec, sources, held, args, cache):
    rng = np.random.default_rng(10_000 + args.seed)
    cases = []
    for i in range(args.eval_augmented):
        src = sources[i % len(sources)]
        pts, _ = sample_surface(src.meshes[0], 4000, rng)
        deformation = random_deformation(rng, Augmentation(), pts)
        meshes = [deformation.apply_mesh(m) for m in src.meshes]
        side = "left" if i % 2 else "right"
        if side == "left":
            meshes = [mirror_mesh(m) for m in meshes]
        cases.append((f"augmented-{src.name}-{i}", meshes, side))
    for i in range(args.eval_generator):
        gsource = ("right_knee_example", "sag_3d_dess")[i % 2]
        if gsource == args.holdout:
            gsource = ("right_knee_example", "sag_3d_dess")[(i + 1) % 2]
        labels, affine, side = generator_case(2000 + i, bool((i + 1) % 2), gsource, cache)
        meshes = [mesh_from_mask(np.isin(labels, SURFACE_LABELS[s]), affine) for s in spec["surfaces"]]
        cases.append((f"generator-{gsource}-{2000 + i}", meshes, side))
    if held is not None:
        cases.append((f"holdout-{held.name}", list(held.meshes), "right"))
    return cases


def fit_row(model, case_name: str, meshes, side: str, *, seed: int = 0) -> dict:
    """Fit ``model`` to one case with the mean-shape baseline: ASSD per surface, seconds, iterations."""
    fit = fit_nsm(model, meshes, side, baseline=True, seed=seed)
    return {"case": case_name, "side": side, "seconds": round(fit.seconds, 1), "iterations": fit.iterations,
            "stop": fit.stop_reason, "assd_mm": {k: round(v, 3) for k, v in fit.assd_mm.items()},
            "assd_mean_shape_mm": {k: round(v, 3) for k, v in (fit.assd_mean_shape_mm or {}).items()},
            "timings_s": {k: round(v, 2) for k, v in fit.timings.items()}}


def holdout_rows(folder: Path, model: str | None = None) -> list[dict]:
    """Held-out-subject fits of ``--holdout`` runs (any ``summary.json`` below ``folder``), optionally of one model."""
    rows = []
    for path in sorted(Path(folder).rglob("summary.json")):
        for name, info in json.loads(path.read_text()).items():
            if model is not None and name != model:
                continue
            for row in info["evaluation"]:
                if row["case"].startswith("holdout-"):
                    t = info["training"]
                    rows.append({"run": path.parent.name, "model": name, "trained_on": t["sources"],
                                 "training_shapes": t["shapes"], "training_s": t["seconds"],
                                 "augmentation": t["augmentation"], **row})
    return rows


def summarise(rows: list[dict], surfaces) -> dict:
    out = {}
    for s in surfaces:
        vals = [r["assd_mm"][s] for r in rows if np.isfinite(r["assd_mm"].get(s, np.nan))]
        base = [r["assd_mean_shape_mm"][s] for r in rows if s in r["assd_mean_shape_mm"]]
        if vals:
            out[f"assd_{s}_mm_mean"] = round(float(np.mean(vals)), 3)
            out[f"assd_{s}_mm_max"] = round(float(np.max(vals)), 3)
        if base:
            out[f"assd_{s}_mean_shape_mm_mean"] = round(float(np.mean(base)), 3)
    secs = [r["seconds"] for r in rows]
    if secs:
        out["fit_seconds_mean"] = round(float(np.mean(secs)), 1)
        out["fit_seconds_max"] = round(float(np.max(secs)), 1)
    out["n_cases"] = len(rows)
    return out


def write_card(folder: Path, model_name: str, spec: dict, arch: NsmArchitecture, info: dict, args) -> None:
    t = info["training"]
    rows = "\n".join(
        f"| {r['case']} | {r['side']} | " + ", ".join(f"{k} {v}" for k, v in r["assd_mm"].items()) + " | "
        + ", ".join(f"{k} {v}" for k, v in r["assd_mean_shape_mm"].items()) + f" | {r['seconds']} |"
        for r in info["evaluation"])
    aug = Augmentation(rotation_deg=args.rotation_deg, axis_scale=args.axis_scale, warp_mm=args.warp_mm,
                       thickness_scale=args.thickness_scale)
    cart = " and femoral cartilage" if len(spec["surfaces"]) > 1 else ""
    held_out = ""
    loso = holdout_rows(Path(args.card_holdouts), model_name) if args.card_holdouts else []
    if loso:
        lines = "\n".join(
            f"| {r['case'][len('holdout-'):]} | {', '.join(r['trained_on'])} ({r['training_shapes']} shapes, "
            f"{r['training_s'] / 60:.0f} min; warps {r['augmentation']['warp_mm']} mm, scale "
            f"+-{r['augmentation']['axis_scale']:.0%}, thickness +-{r['augmentation'].get('thickness_scale', 0):.0%}) | "
            + ", ".join(f"{k} {v}" for k, v in r["assd_mm"].items()) + " | "
            + ", ".join(f"{k} {v}" for k, v in r["assd_mean_shape_mm"].items()) + f" | {r['seconds']} |"
            for r in loso)
        held_out = f"""
### Held-out subjects (leave one subject out)

The honest test of a new femur: a model of the same architecture and augmentation, trained by this script with
`--holdout` on one subject alone (the other never seen), then fitted to the other
subject's real label map. This folder's model saw both subjects, so no held-out real femur is left to test it
on; these figures are the measured error on a femur from a subject outside the training data.

| held-out subject | trained on | ASSD (mm) | aligned mean shape ASSD (mm) | fit s |
|---|---|---|---|---|
{lines}
"""
    thick_flag = f" --thickness-scale {aug.thickness_scale}" if aug.thickness_scale > 0 else ""
    thick = (f", cartilage thickness scaled by a smooth random factor in +-{aug.thickness_scale:.0%}"
             if cart and aug.thickness_scale > 0 else "")
    card = f"""# {spec['folder']}: neural shape model ({model_name})

A DeepSDF-style auto-decoder of the workbench (`workbench.knee.nsm`): a decoder network from (latent, xyz) to the
signed distance of {' and '.join(spec['surfaces'])} (composition `{spec['composition']}`), fitted to a new knee
by similarity alignment to the mean shape and latent optimisation (`fit_nsm`).

## Architecture

Latent {arch.latent_dim}; {len(arch.hidden_dims)} layers x {arch.hidden_dims[0]} ({arch.activation}, input
re-injected at layer(s) {list(arch.skip_layers)}); {arch.n_outputs} output(s); {info['parameters']} parameters.
Described in `config.json`, from which `load_nsm` rebuilds the network.

## Data

Trained by the project on femur{cart} shapes derived from the real knee label maps of the mskt 0.1.22 source
distribution on PyPI (MIT licence). Sources: {', '.join(t['sources'])}. {t['shapes']} shapes: each source as it
is, the rest augmented (smooth random warps up to {aug.warp_mm} mm, per-axis scaling +-{aug.axis_scale:.0%},
rotations up to {aug.rotation_deg} degrees{thick}; left knees mirrored to right). {t['samples_per_shape']} signed-distance
samples per shape (voxel EDT of the label maps with sub-voxel refinement). The femoral shaft is cut at
{FEMUR_CROP['ratio']} x the condylar width above the most distal point, and the cut's rim ({FEMUR_CROP['rim_mm']} mm)
is left out of fitting and scoring. With two subjects only, the latent space spans variations of two real femurs.

## Training

`python bench/train_nsm.py --out <folder> --models {model_name} --shapes {args.shapes} --points {args.points}
--epochs {args.epochs} --minutes {args.minutes} --warp-mm {aug.warp_mm} --axis-scale {aug.axis_scale}
--rotation-deg {aug.rotation_deg}{thick_flag}`, after the `--holdout` runs in the table below (same augmentation;
`--card-holdouts` names their folder): {t['epochs']} epochs ({t['steps']} steps) in {t['seconds']} s
on {platform.machine()} with {torch.get_num_threads()} thread(s); final clamped L1 {t['final_loss']:.5f} (model
units; clamp {args.clamp}).

## Evaluation (shapes not used in training, through this folder and `fit_nsm`)

| case | side | ASSD (mm) | aligned mean shape ASSD (mm) | fit s |
|---|---|---|---|---|
{rows}

Summary: `{json.dumps(info['summary'])}`
{held_out}
## Limits

Research use only, not for clinical decisions. No B-score direction is shipped: a B-score needs a direction and a
healthy population fitted in this model's latent space (a B-score folder with `bscore.json`); without one the
B-score is null.
"""
    (folder / "model_card.md").write_text(card, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="/tmp/nsm_models", help="folder for the model folders (default /tmp)")
    parser.add_argument("--models", default="bone_only,bone_and_cart")
    parser.add_argument("--shapes", type=int, default=160, help="training shapes per model")
    parser.add_argument("--points", type=int, default=24000, help="signed-distance samples per shape")
    parser.add_argument("--epochs", type=int, default=1000)
    parser.add_argument("--minutes", type=float, default=15.0, help="training time budget per model")
    parser.add_argument("--latent", type=int, default=64)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--latent-lr", type=float, default=2e-3)
    parser.add_argument("--clamp", type=float, default=0.1)
    parser.add_argument("--batch-shapes", type=int, default=8)
    parser.add_argument("--batch-points", type=int, default=2048)
    parser.add_argument("--generator-shapes", type=int, default=0,
                        help="extra training sources from the synthetic knee generator (about 20 s each)")
    parser.add_argument("--warp-mm", type=float, default=Augmentation.warp_mm,
                        help="largest smooth-warp displacement of the training augmentation (mm)")
    parser.add_argument("--axis-scale", type=float, default=Augmentation.axis_scale,
                        help="per-axis scale range of the training augmentation (+- fraction)")
    parser.add_argument("--rotation-deg", type=float, default=Augmentation.rotation_deg,
                        help="rotation range of the training augmentation (degrees per axis)")
    parser.add_argument("--thickness-scale", type=float, default=Augmentation.thickness_scale,
                        help="cartilage thickness augmentation: factor range +- this (bone_and_cart only)")
    parser.add_argument("--card-holdouts", default=None,
                        help="folder of --holdout runs whose held-out fits go into the model card")
    parser.add_argument("--card-only", action="store_true",
                        help="rewrite the model cards of OUT's folders from OUT/summary.json (same options), no training")
    parser.add_argument("--holdout", default=None, help="real label map left out of training and fitted after it")
    parser.add_argument("--eval-augmented", type=int, default=4)
    parser.add_argument("--eval-generator", type=int, default=2)
    parser.add_argument("--fit-seconds", type=float, default=30.0, help="latent optimisation time limit per fit")
    parser.add_argument("--grid", type=int, default=128, help="marching-cubes grid of reconstructions")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", default=None, help="cache of source grids and generator cases (default OUT/cache)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    for name in names:
        if name not in MODELS:
            parser.error(f"unknown model {name!r}; allowed: {', '.join(MODELS)}")
    if args.card_only:
        summary = json.loads((out / "summary.json").read_text())
        for name in names:
            folder = out / MODELS[name]["folder"]
            arch = NsmArchitecture.from_dict(json.loads((folder / "config.json").read_text())["architecture"])
            write_card(folder, name, MODELS[name], arch, summary[name], args)
            log(f"rewrote {folder / 'model_card.md'}")
        return 0
    for name in names:
        log(f"training {name}")
        results[name] = train_one(name, args)
    (out / "summary.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({k: v["summary"] | {"train_s": v["training"]["seconds"], "total_s": v["total_seconds"]}
                      for k, v in results.items()}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
