"""Train, ship and evaluate small nnU-Net v2 knee segmentation models on synthetic knee MRI.

Everything runs through nnU-Net's own machinery (nnunetv2 2.8.x, imported only
when training or evaluating).  Status: a first 40-minute CPU run trained all three
configurations end to end but far below the segmentation targets (fullres held-out
Dice: femur 0.94, tibia 0.93, femoral cartilage 0.70, the rest near 0), so no
weights are shipped yet; longer training (thousands of iterations) is the next step.

1. :func:`build_raw_dataset` writes an nnU-Net raw dataset (``Dataset501_KneeSynth``)
   of synthetic DESS-like cases from :mod:`workbench.data.synthetic_knee`:
   ``imagesTr/knee_0000_0000.nii.gz`` (channel 0 ``MRI``), ``labelsTr/knee_0000.nii.gz``
   and ``dataset.json`` whose label names are the workbench keys (``background``,
   ``pat_cart``, ... ``patella``), so a model's outputs map onto the workbench
   table by name.  Held-out cases (seeds never used in training) go to
   ``imagesTs``/``labelsTs``.
2. :func:`plan_and_preprocess` fingerprints the dataset, plans with
   :class:`TinyPlanner` (a subclass of nnU-Net's default planner with few
   features: base 8, max 64, one conv per stage; plans name ``nnUNetPlans_tiny``),
   adds ``3d_lowres`` (about twice the spacing) and ``3d_cascade_fullres`` by hand
   (the default planner drops them for small images) and preprocesses.
3. :func:`train` runs ``nnUNetv2_train`` with the short trainer of
   :mod:`workbench.knee.nnunet_trainers` (found through ``nnUNet_extTrainer``),
   fold ``all``; ``3d_lowres`` must come before ``3d_cascade_fullres``.
4. :func:`export_model` copies ``dataset.json``, ``plans.json`` and a stripped
   ``fold_all/checkpoint_final.pth`` (network weights, ``trainer_name``
   ``nnUNetTrainer``, ``init_args``, mirroring axes) into the shipped folder, in
   the layout :meth:`nnUNetPredictor.initialize_from_trained_model_folder` reads.
5. :func:`evaluate` predicts held-out cases with nnU-Net's ``nnUNetPredictor``
   (``predict_single_npy_array``; the cascade feeds the low-resolution
   prediction to the full-resolution stage) and reports Dice per structure.

The training cases use only the ``sag_3d_dess`` source: the ``right_knee_example``
map has no menisci, so its cases have no meniscus in the image nor in the labels,
an anatomy no real knee has; a model must learn menisci.  Variety comes from the
config: left and right knees, stronger elastic deformation, rotation, scale and
translation, and per-case SNR, bias field, joint fluid, texture and soft-tissue
envelope (:func:`case_config`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from workbench.data import labels as L

DATASET_ID = 501
DATASET_NAME = f"Dataset{DATASET_ID:03d}_KneeSynth"
PLANS_NAME = "nnUNetPlans_tiny"
#: Trainer used for training (workbench/knee/nnunet_trainers/short_trainer.py).
TRAIN_TRAINER = "nnUNetTrainerShort"
#: Trainer named in the shipped checkpoints and folders: the short trainer does not change the architecture.
SHIPPED_TRAINER = "nnUNetTrainer"
CONFIGURATIONS = ("3d_fullres", "3d_lowres", "3d_cascade_fullres")
FILE_ENDING = ".nii.gz"
#: First seed of the held-out cases; training seeds start at 0 and must stay below it.
HELD_OUT_SEED_START = 100_000

#: Label names of dataset.json: the workbench keys of values 0-9.
LABEL_NAMES: dict[str, int] = {"background": 0, **{lab.key: lab.value for lab in L.KNEE_LABELS}}

TRAINERS_DIR = Path(__file__).resolve().parent / "nnunet_trainers"


# --------------------------------------------------------------------------------------------------
# environment


def nnunet_env(work_dir: str | Path, *, n_proc: int = 1, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for nnU-Net under ``work_dir`` (raw/preprocessed/results folders, CPU-friendly settings)."""
    work = Path(work_dir)
    env = dict(os.environ if base is None else base)
    env.update({
        "nnUNet_raw": str(work / "nnUNet_raw"),
        "nnUNet_preprocessed": str(work / "nnUNet_preprocessed"),
        "nnUNet_results": str(work / "nnUNet_results"),
        "nnUNet_extTrainer": str(TRAINERS_DIR),
        "nnUNet_n_proc_DA": str(n_proc),
        "nnUNet_def_n_proc": str(n_proc),
        "nnUNet_compile": "f",
    })
    return env


def set_nnunet_env(work_dir: str | Path, *, n_proc: int = 1) -> dict[str, str]:
    """Set :func:`nnunet_env` in ``os.environ``; call it before the first ``import nnunetv2``."""
    env = nnunet_env(work_dir, n_proc=n_proc)
    for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        Path(env[key]).mkdir(parents=True, exist_ok=True)
    os.environ.update(env)
    return env


# --------------------------------------------------------------------------------------------------
# data


def case_config(seed: int):
    """The synthetic knee config of case ``seed``: ``small`` preset, ``sag_3d_dess``, with per-case variety."""
    from workbench.data.synthetic_knee import SyntheticKneeConfig

    rng = np.random.default_rng([seed, DATASET_ID])
    smooth = float(rng.uniform(22.0, 40.0))
    return SyntheticKneeConfig.from_preset(
        "small", seed=seed, source="sag_3d_dess", flip=bool(rng.random() < 0.5),
        elastic_mm=float(rng.uniform(1.0, min(6.0, 0.45 * smooth))), elastic_smoothness_mm=smooth,
        rotation_deg=10.0, scale=0.10, translation_mm=8.0,
        snr=float(rng.uniform(12.0, 40.0)), bias_field=float(rng.uniform(0.05, 0.35)),
        joint_fluid=float(rng.uniform(0.15, 0.9)), texture=float(rng.uniform(0.6, 1.5)),
        envelope_anterior_mm=(4.0, 14.0), envelope_posterior_mm=(25.0, 50.0), fat_thickness_mm=(2.0, 11.0),
    )


def _write_nifti(data: np.ndarray, affine: np.ndarray, path: Path) -> None:
    import nibabel as nib

    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_data_dtype(data.dtype)
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, str(path))


def _make_case(args: tuple[int, str, str, str]) -> dict[str, Any]:
    seed, case_id, images_dir, labels_dir = args
    from workbench.data.synthetic_knee import generate_case

    t0 = time.perf_counter()
    case = generate_case(case_config(seed))
    _write_nifti(case.image.data.astype(np.float32), case.image.affine,
                 Path(images_dir) / f"{case_id}_0000{FILE_ENDING}")
    _write_nifti(case.labels.data.astype(np.uint8), case.labels.affine, Path(labels_dir) / f"{case_id}{FILE_ENDING}")
    return {"case": case_id, "seed": seed, "side": case.side, "seconds": round(time.perf_counter() - t0, 2),
            "labels_present": sorted(int(v) for v in np.unique(case.labels.data))}


def _generate(seeds: Sequence[int], prefix: str, images_dir: Path, labels_dir: Path, workers: int) -> list[dict]:
    images_dir.mkdir(parents=True, exist_ok=True)
    labels_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(s, f"{prefix}_{s:06d}", str(images_dir), str(labels_dir)) for s in seeds]
    if workers <= 1:
        return [_make_case(j) for j in jobs]
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(_make_case, jobs))


def build_raw_dataset(raw_root: str | Path, n_cases: int, *, seed_start: int = 0, n_held_out: int = 0,
                      held_out_seed_start: int = HELD_OUT_SEED_START, workers: int = 2,
                      dataset_name: str = DATASET_NAME) -> dict[str, Any]:
    """Write the nnU-Net raw dataset: ``n_cases`` training cases with seeds ``seed_start ...``.

    ``n_held_out`` further cases with seeds ``held_out_seed_start ...`` go to
    ``imagesTs``/``labelsTs`` (never trained on).  Returns a record with the
    folder, the seeds and the generation wall time.
    """
    if seed_start + n_cases > held_out_seed_start:
        raise ValueError("training seeds would overlap the held-out seeds")
    folder = Path(raw_root) / dataset_name
    t0 = time.perf_counter()
    train = _generate(range(seed_start, seed_start + n_cases), "knee", folder / "imagesTr", folder / "labelsTr",
                      workers)
    test = _generate(range(held_out_seed_start, held_out_seed_start + n_held_out), "knee", folder / "imagesTs",
                     folder / "labelsTs", workers) if n_held_out else []
    dataset_json = {
        "channel_names": {"0": "MRI"},
        "labels": LABEL_NAMES,
        "numTraining": n_cases,
        "file_ending": FILE_ENDING,
        "name": dataset_name,
        "description": ("Synthetic DESS-like knee MRI (workbench.data.synthetic_knee, 'small' preset, "
                        "sag_3d_dess source from the mskt 0.1.22 sdist, MIT); labels are the workbench table."),
        "licence": "MIT (label map source: mskt 0.1.22); images synthetic",
        "training_seeds": [seed_start, seed_start + n_cases - 1],
        "held_out_seeds": [held_out_seed_start, held_out_seed_start + n_held_out - 1] if n_held_out else [],
    }
    (folder / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
    record = {"folder": str(folder), "train": train, "held_out": test,
              "seconds": round(time.perf_counter() - t0, 1)}
    (folder / "cases.json").write_text(json.dumps(record, indent=2))
    return record


# --------------------------------------------------------------------------------------------------
# planning and preprocessing


def tiny_planner_class(fullres_patch_size: Sequence[int] | None = None, max_batch_size: int | None = 2):
    """nnU-Net's default ``ExperimentPlanner`` with a small network and a hand-made cascade.

    Base 8 features (max 64), one conv per stage in encoder and decoder.  After the
    default planning, ``3d_lowres`` (``lowres_factor`` times the fullres spacing,
    ``next_stage: 3d_cascade_fullres``) and ``3d_cascade_fullres`` (inherits
    ``3d_fullres``, ``previous_stage: 3d_lowres``) are added when the default planner
    dropped them.  ``fullres_patch_size`` (nnU-Net axis order) caps the ``3d_fullres``
    patch (the default planner takes the whole 64x128x128 image, about 80 s an epoch
    of 25 iterations on 2 CPU cores); each size must divide by the network's total
    stride on that axis.  ``max_batch_size`` caps the 3D batch size (nnU-Net grows it
    with the number of cases; on a CPU, more updates of batch 2 learn faster than
    fewer of batch 4).  Imports nnunetv2: set the environment first (:func:`set_nnunet_env`).
    """
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import (
        ExperimentPlanner,
    )

    class TinyPlanner(ExperimentPlanner):
        lowres_factor = 2.0
        max_patch_size = tuple(fullres_patch_size) if fullres_patch_size else None
        batch_cap = max_batch_size

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.UNet_base_num_features = 8
            self.UNet_max_features_3d = 64
            self.UNet_max_features_2d = 64
            self.UNet_blocks_per_stage_encoder = (1,) * 14
            self.UNet_blocks_per_stage_decoder = (1,) * 13

        def plan_experiment(self):
            plans = super().plan_experiment()
            configs = plans["configurations"]
            if self.max_patch_size and "3d_fullres" in configs:
                full = configs["3d_fullres"]
                strides = np.prod(np.array(full["architecture"]["arch_kwargs"]["strides"]), axis=0)
                patch = [int(min(p, m)) for p, m in zip(full["patch_size"], self.max_patch_size)]
                if any(p % s for p, s in zip(patch, strides)):
                    raise ValueError(f"patch {patch} does not divide by the total stride {strides.tolist()}")
                full["patch_size"] = patch
            if "3d_fullres" in configs and "3d_lowres" not in configs:
                full = configs["3d_fullres"]
                spacing = np.array(full["spacing"], dtype=float) * self.lowres_factor
                median = np.array(full["median_image_size_in_voxels"], dtype=float) / self.lowres_factor
                n_vox = float(np.prod(median) * self.dataset_json["numTraining"])
                low = self.get_plans_for_configuration(spacing, median, self.generate_data_identifier("3d_lowres"),
                                                       n_vox, {})
                low["batch_dice"] = False
                low["next_stage"] = "3d_cascade_fullres"
                plans["configurations"] = {"2d": configs["2d"], "3d_lowres": low, **{
                    k: v for k, v in configs.items() if k not in ("2d", "3d_lowres")}}
                plans["configurations"]["3d_cascade_fullres"] = {"inherits_from": "3d_fullres",
                                                                 "previous_stage": "3d_lowres"}
            if self.batch_cap:
                for name, config in plans["configurations"].items():
                    if name.startswith("3d") and "batch_size" in config:
                        config["batch_size"] = min(int(config["batch_size"]), int(self.batch_cap))
            self.plans = plans
            self.save_plans(plans)
            return plans

    return TinyPlanner


def plan_and_preprocess(dataset_id: int = DATASET_ID, *, plans_name: str = PLANS_NAME, n_proc: int = 2,
                        configurations: Iterable[str] = ("3d_fullres", "3d_lowres"),
                        fullres_patch_size: Sequence[int] | None = (48, 96, 96),
                        max_batch_size: int | None = 2) -> dict[str, Any]:
    """Fingerprint, plan (:func:`tiny_planner_class`) and preprocess; returns the plans (needs the env set)."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprint_dataset,
        plan_experiment_dataset,
        preprocess_dataset,
    )

    extract_fingerprint_dataset(dataset_id, num_processes=n_proc, check_dataset_integrity=False, clean=True,
                                verbose=False, show_progress_bar=False)
    plans, _ = plan_experiment_dataset(dataset_id, tiny_planner_class(fullres_patch_size, max_batch_size),
                                       overwrite_plans_name=plans_name)
    preprocess_dataset(dataset_id, plans_name, tuple(configurations), num_processes=[n_proc],
                       show_progress_bar=False)
    return plans


def count_parameters(plans: dict, configuration: str, dataset_json: dict) -> int:
    """Number of network parameters of ``configuration`` (builds the network on the CPU)."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    pm = PlansManager(plans)
    cm = pm.get_configuration(configuration)
    lm = pm.get_label_manager(dataset_json)
    net = get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                 cm.network_arch_init_kwargs_req_import, 1, lm.num_segmentation_heads,
                                 allow_init=True, deep_supervision=False)
    return int(sum(p.numel() for p in net.parameters()))


# --------------------------------------------------------------------------------------------------
# training


def train_command(configuration: str, dataset_id: int = DATASET_ID, *, plans_name: str = PLANS_NAME,
                  trainer: str = TRAIN_TRAINER, fold: str = "all", device: str = "cpu") -> list[str]:
    """The ``nnUNetv2_train`` command line (run through this interpreter)."""
    return [sys.executable, "-c", "from nnunetv2.run.run_training import run_training_entry; run_training_entry()",
            str(dataset_id), configuration, fold, "-tr", trainer, "-p", plans_name, "-device", device]


def train(configuration: str, work_dir: str | Path, *, epochs: int = 40, iterations: int = 25,
          val_iterations: int = 5, n_proc: int = 1, log_file: str | Path | None = None, device: str = "cpu",
          skip_final_validation: bool = True, dataset_id: int = DATASET_ID,
          time_budget_s: float | None = None, threads: int | None = None,
          continue_training: bool = False) -> dict[str, Any]:
    """Train ``configuration`` (fold ``all``) with the short trainer; returns wall time and output folder.

    ``3d_lowres`` always runs its final validation (it writes the ``predicted_next_stage``
    segmentations ``3d_cascade_fullres`` trains on); the others skip it when
    ``skip_final_validation`` (it would only predict the training cases).  With
    ``time_budget_s`` the trainer sets the number of epochs to what fits (at most
    ``epochs``).  ``continue_training`` resumes from the configuration's last
    checkpoint (nnU-Net's ``--c``) and trains on up to ``epochs`` in all.
    """
    env = nnunet_env(work_dir, n_proc=n_proc)
    env.update({"WORKBENCH_NNUNET_EPOCHS": str(epochs), "WORKBENCH_NNUNET_ITERS": str(iterations),
                "WORKBENCH_NNUNET_VAL_ITERS": str(val_iterations),
                "WORKBENCH_NNUNET_SKIP_VAL": "1" if skip_final_validation else "0"})
    if threads:
        env["WORKBENCH_NNUNET_THREADS"] = str(threads)
    if time_budget_s:
        env["WORKBENCH_NNUNET_BUDGET_S"] = str(float(time_budget_s))
    cmd = train_command(configuration, dataset_id, device=device) + (["--c"] if continue_training else [])
    t0 = time.perf_counter()
    if log_file is None:
        proc = subprocess.run(cmd, check=False, env=env)
    else:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        with open(log_file, "w") as log:
            proc = subprocess.run(cmd, check=False, env=env, stdout=log, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"nnUNetv2_train {configuration} failed (exit {proc.returncode}); see {log_file}")
    out = results_folder(work_dir, configuration, TRAIN_TRAINER, dataset_id=dataset_id)
    previous = Path(work_dir) / f"train_{configuration}.json"
    if continue_training and previous.is_file():  # the wall time of the whole training
        seconds += float(json.loads(previous.read_text())["seconds"])
    record = {"configuration": configuration, "seconds": round(seconds, 1), "max_epochs": epochs,
              "iterations_per_epoch": iterations, "time_budget_s": time_budget_s, "threads": threads,
              "continued": continue_training, "folder": str(out)}
    (Path(work_dir) / f"train_{configuration}.json").write_text(json.dumps(record, indent=2))
    return record


def validate(configuration: str, work_dir: str | Path, *, best: bool = True, threads: int | None = None,
             log_file: str | Path | None = None, device: str = "cpu", dataset_id: int = DATASET_ID) -> float:
    """Rerun the final validation of a trained configuration (``nnUNetv2_train ... --val [--val_best]``).

    For ``3d_lowres`` this writes the ``predicted_next_stage`` segmentations the cascade
    trains on (needed when a run ended without its own final validation).  Returns seconds.
    """
    fold = results_folder(work_dir, configuration, dataset_id=dataset_id) / "fold_all"
    if not (fold / "checkpoint_final.pth").is_file() and (fold / "checkpoint_best.pth").is_file():
        # a run stopped before its end (nnU-Net refuses --val then): its best checkpoint becomes the final one
        shutil.copy2(fold / "checkpoint_best.pth", fold / "checkpoint_final.pth")
    env = nnunet_env(work_dir, n_proc=1)
    if threads:
        env["WORKBENCH_NNUNET_THREADS"] = str(threads)
    cmd = train_command(configuration, dataset_id, device=device) + ["--val"] + (["--val_best"] if best else [])
    t0 = time.perf_counter()
    with open(log_file or os.devnull, "w") as log:
        proc = subprocess.run(cmd, check=False, env=env, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"validation of {configuration} failed (exit {proc.returncode}); see {log_file}")
    return round(time.perf_counter() - t0, 1)


def results_folder(work_dir: str | Path, configuration: str, trainer: str = TRAIN_TRAINER, *,
                   plans_name: str = PLANS_NAME, dataset_id: int = DATASET_ID) -> Path:
    """nnU-Net's training output folder of ``configuration`` under ``work_dir``."""
    name = DATASET_NAME if dataset_id == DATASET_ID else f"Dataset{dataset_id:03d}"
    return Path(work_dir) / "nnUNet_results" / name / f"{trainer}__{plans_name}__{configuration}"


# --------------------------------------------------------------------------------------------------
# shipping


def model_folder(root: str | Path, configuration: str, *, trainer: str = SHIPPED_TRAINER,
                 plans_name: str = PLANS_NAME, dataset_name: str = DATASET_NAME) -> Path:
    """The nnU-Net model folder of ``configuration`` inside a shipped root (``models/knee_nnunet``)."""
    return Path(root) / dataset_name / f"{trainer}__{plans_name}__{configuration}"


def strip_checkpoint(src: str | Path, dst: str | Path, *, trainer_name: str = SHIPPED_TRAINER) -> dict[str, Any]:
    """Write the parts of an nnU-Net checkpoint the predictor reads (no optimizer state) to ``dst``.

    Keeps ``network_weights``, ``init_args`` (device stored as text), ``trainer_name``
    (the stock ``nnUNetTrainer``: the short trainer does not change the architecture),
    ``inference_allowed_mirroring_axes`` and ``current_epoch``.  The result loads with
    ``torch.load(..., weights_only=True)``.
    """
    import torch

    ckpt = torch.load(str(src), map_location="cpu", weights_only=False)
    init_args = dict(ckpt["init_args"])
    if "device" in init_args:
        init_args["device"] = str(init_args["device"])
    axes = ckpt.get("inference_allowed_mirroring_axes")
    stripped = {
        "network_weights": {k: v.detach().cpu().contiguous() for k, v in ckpt["network_weights"].items()},
        "trainer_name": trainer_name,
        "init_args": init_args,
        "inference_allowed_mirroring_axes": tuple(int(a) for a in axes) if axes is not None else None,
        "current_epoch": int(ckpt.get("current_epoch", 0)),
    }
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    torch.save(stripped, str(dst))
    torch.load(str(dst), map_location="cpu", weights_only=True)  # must load without pickled objects
    # PlainConvUNet's state dict names many tensors twice (decoder.encoder.*, conv and all_modules.*): count each once
    unique = {v.data_ptr(): v.numel() for v in stripped["network_weights"].values()}
    n_params = int(sum(unique.values()))
    return {"epochs": stripped["current_epoch"], "parameters": n_params, "bytes": Path(dst).stat().st_size}


def export_model(work_dir: str | Path, out_root: str | Path, configurations: Iterable[str] = CONFIGURATIONS,
                 ) -> dict[str, dict[str, Any]]:
    """Copy trained configurations into the shipped root, one nnU-Net model folder each."""
    info = {}
    for configuration in configurations:
        src = results_folder(work_dir, configuration)
        dst = model_folder(out_root, configuration)
        if dst.exists():
            shutil.rmtree(dst)
        (dst / "fold_all").mkdir(parents=True)
        for name in ("dataset.json", "plans.json"):
            shutil.copy2(src / name, dst / name)
        info[configuration] = strip_checkpoint(src / "fold_all" / "checkpoint_final.pth",
                                               dst / "fold_all" / "checkpoint_final.pth")
        info[configuration]["folder"] = dst.relative_to(out_root).as_posix()
    return info


# --------------------------------------------------------------------------------------------------
# inference and evaluation


def load_predictor(folder: str | Path, *, use_mirroring: bool = False, device: str = "cpu",
                   tile_step_size: float = 0.5):
    """An ``nnUNetPredictor`` initialised from one nnU-Net model folder (fold ``all``)."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(tile_step_size=tile_step_size, use_gaussian=True, use_mirroring=use_mirroring,
                                perform_everything_on_device=device != "cpu", device=torch.device(device),
                                verbose=False, verbose_preprocessing=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(folder), use_folds=("all",))
    return predictor


def predict_image(predictors: Sequence[Any], image_path: str | Path) -> np.ndarray:
    """Segment one image file; one predictor (single stage) or two (``3d_lowres`` then ``3d_cascade_fullres``).

    Returns the labels in SimpleITK axis order ``(z, y, x)`` (values: workbench table).
    """
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    image, props = SimpleITKIO().read_images([str(image_path)])
    previous = None
    for predictor in predictors:
        seg = predictor.predict_single_npy_array(
            image, props, segmentation_previous_stage=None if previous is None else previous[None].astype(np.int16))
        previous = np.asarray(seg)
    return previous


def dice_per_label(pred: np.ndarray, truth: np.ndarray, values: Iterable[int]) -> dict[int, float]:
    """Dice per label value (NaN where a label is absent from both); the pipeline's own Dice."""
    from workbench.knee.segmentation import dice_scores

    return {int(v): float("nan") if d is None else d for v, d in dice_scores(pred, truth, list(values)).items()}


def evaluate(model_root: str | Path, images_dir: str | Path, labels_dir: str | Path, *, cascade: bool = False,
             use_mirroring: bool = False, max_cases: int | None = None) -> dict[str, Any]:
    """Dice per structure of the shipped ``3d_fullres`` (or the cascade) on held-out cases.

    ``images_dir`` holds ``<case>_0000.nii.gz`` and ``labels_dir`` ``<case>.nii.gz``
    (the ``imagesTs``/``labelsTs`` of :func:`build_raw_dataset`).  Returns per-case
    and mean Dice by workbench key, and the mean seconds per case.
    """
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    configs = ("3d_lowres", "3d_cascade_fullres") if cascade else ("3d_fullres",)
    predictors = [load_predictor(model_folder(model_root, c), use_mirroring=use_mirroring) for c in configs]
    images = sorted(Path(images_dir).glob(f"*_0000{FILE_ENDING}"))[:max_cases]
    keys = {lab.value: lab.key for lab in L.KNEE_LABELS}
    per_case, seconds = {}, []
    for image_path in images:
        case = image_path.name[: -len(f"_0000{FILE_ENDING}")]
        t0 = time.perf_counter()
        pred = predict_image(predictors, image_path)
        seconds.append(time.perf_counter() - t0)
        truth, _ = SimpleITKIO().read_seg(str(Path(labels_dir) / f"{case}{FILE_ENDING}"))
        d = dice_per_label(pred, truth[0], keys)
        per_case[case] = {keys[v]: round(x, 4) for v, x in d.items()}
    mean = {k: round(float(np.nanmean([c[k] for c in per_case.values()])), 4) for k in keys.values()}
    return {"model": "+".join(configs), "n_cases": len(per_case), "mirroring": use_mirroring, "mean": mean,
            "per_case": per_case, "seconds_per_case": round(float(np.mean(seconds)), 2) if seconds else None}


def dice_table(results: Sequence[dict[str, Any]]) -> str:
    """A Markdown table of mean Dice per structure, one column per evaluation."""
    head = "| structure | " + " | ".join(r["model"] for r in results) + " |"
    lines = [head, "|---|" + "---|" * len(results)]
    for lab in L.KNEE_LABELS:
        lines.append(f"| {lab.name} (`{lab.key}`) | " + " | ".join(f"{r['mean'][lab.key]:.3f}" for r in results) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# metadata


def write_shipped_metadata(out_root: str | Path, exported: dict[str, dict[str, Any]],
                           evaluations: Sequence[dict[str, Any]], *, cases: int, times: dict[str, float],
                           version: str = "0.1.0") -> Path:
    """Write ``metadata.json`` of the shipped folder (after the weights are final)."""
    from workbench.models import write_metadata

    metrics = {
        f"dice_{r['model']}": {"n_held_out_cases": r["n_cases"], "mirroring": r["mirroring"], "mean": r["mean"]}
        for r in evaluations
    }
    return write_metadata(
        out_root, name="knee_nnunet", version=version, licence="MIT",
        provenance=(f"Trained from scratch with nnU-Net v2 2.8.1 (planner: nnUNetPlans_tiny, trainer: short "
                    f"nnUNetTrainer subclass, fold all) on {cases} synthetic DESS-like knee cases made by "
                    f"workbench.data.synthetic_knee (source sag_3d_dess, from the mskt 0.1.22 sdist, MIT; seeds "
                    f"0-{cases - 1}); command: python bench/train_knee_seg.py. Synthetic training data only: "
                    f"not validated on real MRI, not for clinical use."),
        task="knee MRI segmentation (workbench labels 1-9: cartilage, menisci, bones), nnU-Net v2",
        framework="nnunetv2==2.8.1",
        configurations={c: {**v, "training_seconds": times.get(f"train_{c}")} for c, v in exported.items()},
        dataset=DATASET_NAME, plans=PLANS_NAME, labels=LABEL_NAMES, metrics=metrics,
    )


def write_model_card(out_root: str | Path, exported: dict[str, dict[str, Any]],
                     evaluations: Sequence[dict[str, Any]], *, cases: int, held_out: int,
                     times: dict[str, float], command: str, notes: str = "",
                     iterations: int | str = "n/a") -> Path:
    """Write ``model_card.md`` of the shipped folder from the training and evaluation records."""
    out_root = Path(out_root)
    rows = []
    for c, info in exported.items():
        t = times.get(f"train_{c}")
        rows.append(f"| `{c}` | `{info['folder']}/` | {info['epochs']} | {info['parameters']:,} | "
                    f"{info['bytes'] / 1e6:.2f} MB | {t / 60:.1f} min |" if t else
                    f"| `{c}` | `{info['folder']}/` | {info['epochs']} | {info['parameters']:,} | "
                    f"{info['bytes'] / 1e6:.2f} MB | n/a |")
    speed = ", ".join(f"{r['model']}: {r['seconds_per_case']} s" for r in evaluations)
    text = f"""# knee_nnunet: small nnU-Net v2 knee segmentation models (synthetic training data)

Three nnU-Net v2 (2.8.1) configurations of one dataset, trained from scratch on the CPU with nnU-Net's own
fingerprinting, planning, preprocessing and training: `3d_fullres`, and the cascade `3d_lowres` ->
`3d_cascade_fullres`.  Outputs use the workbench label table (`dataset.json` label names are the workbench
keys): 1 `pat_cart`, 2 `fem_cart`, 3 `med_tib_cart`, 4 `lat_tib_cart`, 5 `med_men`, 6 `lat_men`, 7 `femur`,
8 `tibia`, 9 `patella`.

**Synthetic training data only. Not validated on real MRI; not for clinical use.**

Licence: MIT (the weights, as the workbench).  The training images are synthetic; the label map they were
made from is from the `mskt` 0.1.22 sdist (MIT).  `metadata.json` lists every file with its sha256
(`workbench models verify` checks them).

## Layout

Each configuration is a folder as nnU-Net writes it (`dataset.json`, `plans.json`,
`fold_all/checkpoint_final.pth`); `nnUNetPredictor.initialize_from_trained_model_folder(folder, ("all",))`
loads it directly.  Checkpoints are stripped (network weights, `init_args`, mirroring axes; no optimizer
state; `trainer_name` is the stock `nnUNetTrainer`, as the short training trainer does not change the
architecture) and load with `torch.load(..., weights_only=True)`.  The cascade needs `3d_lowres` first; its
previous-stage segmentation is passed as `(1, z, y, x)` int16 (`workbench.knee.nnunet_training.predict_image`).

| configuration | folder | epochs | parameters | checkpoint | training wall time |
|---|---|---|---|---|---|
{chr(10).join(rows)}

Network: `PlainConvUNet` with 8 base features (max 64), one conv per stage (planner subclass
`TinyPlanner`, plans `{PLANS_NAME}`); `3d_fullres` at 1.5 x 1 x 1 mm (nnU-Net axis order z, y, x), patch
{exported and _patch(out_root, '3d_fullres')}, 6 stages; `3d_lowres` at 3 x 2 x 2 mm, patch
{exported and _patch(out_root, '3d_lowres')}, added by hand (the default planner drops it for images this small).

## Data

{cases} training cases (seeds 0-{cases - 1}) from `workbench.data.synthetic_knee` (`small` preset:
128 x 128 x 64 voxels at 1 x 1 x 1.5 mm, sagittal DESS-like contrast), all from the `sag_3d_dess` label map
of the `mskt` 0.1.22 sdist (MIT), the one with menisci.  `right_knee_example` was left out: it has no
menisci, so its cases show knees without menisci, which would teach the model that menisci may be absent.
Per-case variety (`workbench.knee.nnunet_training.case_config`): left or right knee (50 %), elastic
deformation up to 1-6 mm, rotation +-10 deg, scale +-10 %, translation +-8 mm, SNR 12-40, bias field
0.05-0.35, joint fluid 0.15-0.9, texture x0.6-1.5, soft-tissue envelope and fat thickness ranges widened.
Fold `all` (every training case used for training).

## Training

```
{command}
```

Trainer `nnUNetTrainerShort` (`workbench/knee/nnunet_trainers/short_trainer.py`, found through
`nnUNet_extTrainer`): stock nnU-Net loss, augmentation and poly learning-rate schedule, {iterations}
iterations per epoch, batch 2, with a wall-time budget that lowers the number of epochs to what fits (the
schedule is shortened with it).  Mirroring (augmentation and allowed test-time mirroring) only along the
slice axis, left-right in these sagittal scans: stock nnU-Net also flips head-foot and front-back, after
which femur and tibia differ only by shape.  2 CPU cores, no GPU; `3d_fullres` and the `3d_lowres` -> `3d_cascade_fullres` chain ran
side by side, one torch thread each.  Training is not seeded: a rerun gives a similar, not identical, model.

## Held-out evaluation

{held_out} synthetic cases with seeds 100000-{100000 + held_out - 1} (never used in training), same
generator settings, predicted with `nnUNetPredictor.predict_single_npy_array` (no test-time mirroring),
mean Dice per structure:

{dice_table(evaluations)}

CPU inference time per case (2 cores): {speed}.

{notes}
"""
    path = out_root / "model_card.md"
    path.write_text(text)
    return path


def _patch(out_root: Path, configuration: str) -> str:
    for folder in sorted(Path(out_root).glob(f"*/*__{configuration}")):
        plans = json.loads((folder / "plans.json").read_text())
        return "x".join(str(p) for p in plans["configurations"][configuration]["patch_size"])
    return "n/a"


def finalize(work_dir: str | Path, out_root: str | Path, *, cases: int, held_out: int, command: str,
             times: dict[str, float] | None = None, use_mirroring: bool = False, notes: str = "",
             version: str = "0.1.0", max_eval_cases: int | None = None) -> dict[str, Any]:
    """Export the trained configurations, evaluate on the held-out cases, write card, results and metadata.

    Training wall times come from ``times`` or from the ``train_<configuration>.json``
    records :func:`train` leaves in ``work_dir``.
    """
    work, out = Path(work_dir), Path(out_root)
    times = dict(times or {})
    iterations: set[int] = set()
    for c in CONFIGURATIONS:
        rec = work / f"train_{c}.json"
        if rec.is_file():
            record = json.loads(rec.read_text())
            times.setdefault(f"train_{c}", record["seconds"])
            iterations.add(int(record["iterations_per_epoch"]))
    exported = export_model(work, out)
    raw = work / "nnUNet_raw" / DATASET_NAME
    evaluations = []
    for cascade in (False, True):
        t0 = time.perf_counter()
        r = evaluate(out, raw / "imagesTs", raw / "labelsTs", cascade=cascade, use_mirroring=use_mirroring,
                     max_cases=max_eval_cases)
        times[f"eval_{r['model']}"] = round(time.perf_counter() - t0, 1)
        evaluations.append(r)
    (out / "results.json").write_text(json.dumps({"times_s": times, "exported": exported,
                                                  "evaluation": evaluations}, indent=2) + "\n")
    write_model_card(out, exported, evaluations, cases=cases, held_out=evaluations[0]["n_cases"], times=times,
                     command=command, notes=notes,
                     iterations="/".join(str(i) for i in sorted(iterations)) or "n/a")
    write_shipped_metadata(out, exported, evaluations, cases=cases, times=times, version=version)
    return {"times_s": times, "exported": exported, "evaluation": evaluations}
