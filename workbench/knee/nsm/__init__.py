"""Neural shape models (NSM) of the knee: the workbench's own DeepSDF-style auto-decoder.

Two registered models (:mod:`workbench.registry`, option ``nsm_type``):
``bone_only`` decodes the femur, ``bone_and_cart`` the femur and its
cartilage; ``both`` runs the two one after the other and releases GPU memory
in between (:func:`run_nsm`).

Modules: :mod:`.model` (decoder, model folders), :mod:`.sdf` (signed
distances and samples from masks and meshes, marching cubes, ASSD),
:mod:`.fit` (alignment, latent optimisation, B-score), :mod:`.train`
(training data, augmentation, training).  ``bench/train_nsm.py`` trains and
evaluates model folders.

Use::

    from workbench.registry import REGISTRY
    runner = REGISTRY.model("bone_and_cart").load(device="auto")      # -> setup_nsm(config, device)
    fit = runner.fit({"femur": femur_mesh, "femoral_cartilage": cart_mesh}, side="left",
                     bscore_folder=None)
    fit.save(run_dir, RECON_PARAMS_FILES["bone_and_cart"])            # NSM_recon_params.json + meshes
    runner.close()
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trimesh

from workbench.config import nsm_models
from workbench.errors import ModelUnavailable
from workbench.knee.nsm.fit import BScoreModel, NsmFit, Progress, fit_nsm, load_bscore
from workbench.knee.nsm.model import (
    NsmArchitecture,
    NsmModel,
    SdfDecoder,
    load_nsm,
    save_nsm,
)

__all__ = [
    "RECON_PARAMS_FILES",
    "BScoreModel",
    "NsmArchitecture",
    "NsmFit",
    "NsmModel",
    "NsmRunner",
    "SdfDecoder",
    "fit_nsm",
    "load_bscore",
    "load_nsm",
    "model_folder_path",
    "nsm_models",
    "read_saved_fits",
    "SavedFit",
    "run_nsm",
    "save_nsm",
    "setup_nsm",
]

#: Output file of each model (the original pipeline's names).
RECON_PARAMS_FILES: dict[str, str] = {
    "bone_and_cart": "NSM_recon_params.json",
    "bone_only": "NSM_bone_only_recon_params.json",
}
#: Mesh file prefix of each model (``<prefix>_<surface>.ply``).
RECON_MESH_PREFIXES: dict[str, str] = {"bone_and_cart": "NSM_recon", "bone_only": "NSM_bone_only_recon"}


#: Input mesh the pipeline fits each surface to (written by the meshes step).
INPUT_MESH_FILES: dict[str, str] = {"femur": "femur_mesh.ply", "femoral_cartilage": "fem_cart_mesh.ply"}


@dataclass
class SavedFit:
    """One model's fit as a run folder holds it: parameters and, per surface, input and reconstructed meshes."""

    model: str
    params: dict[str, Any]
    inputs: dict[str, trimesh.Trimesh]
    reconstructions: dict[str, trimesh.Trimesh]


def read_saved_fits(run_folder: str | Path) -> list[SavedFit]:
    """The shape-model fits in a knee run folder (bone_only, then bone_and_cart), for figures and tables."""
    import json

    folder = Path(run_folder)
    fits = []
    for name in ("bone_only", "bone_and_cart"):
        params_path = folder / RECON_PARAMS_FILES[name]
        if not params_path.is_file():
            continue
        params = json.loads(params_path.read_text())
        recon, inputs = {}, {}
        for surface, input_name in INPUT_MESH_FILES.items():
            path = folder / f"{RECON_MESH_PREFIXES[name]}_{surface}.ply"
            if path.is_file():
                recon[surface] = trimesh.load(path, force="mesh")
                if (folder / input_name).is_file():
                    inputs[surface] = trimesh.load(folder / input_name, force="mesh")
        fits.append(SavedFit(name, params, inputs, recon))
    return fits


def model_folder_path(model_folder: str | Path) -> Path:
    """An absolute folder as it is; a relative one under the models folder (``$WORKBENCH_MODELS``)."""
    path = Path(model_folder).expanduser()
    if path.is_absolute():
        return path
    from workbench.config import models_dir

    return models_dir() / path


@dataclass
class NsmRunner:
    """A loaded model with its registry config; :meth:`fit` fits one knee."""

    model: NsmModel
    config: Any

    def fit(self, surfaces: Sequence[trimesh.Trimesh] | Mapping[str, trimesh.Trimesh], side: str = "right", *,
            bscore_folder: str | Path | None = None, progress: Progress | None = None, **options: Any) -> NsmFit:
        """:func:`~workbench.knee.nsm.fit.fit_nsm` with the config's ``max_iterations``; B-score only with a folder."""
        options.setdefault("max_iterations", getattr(self.config, "max_iterations", None))
        bscore = load_bscore(bscore_folder) if bscore_folder else None
        return fit_nsm(self.model, surfaces, side, bscore=bscore, progress=progress, **options)

    def close(self) -> None:
        """Drop the network and release cached GPU memory."""
        from workbench.gpu import cleanup_gpu_memory

        self.model = None  # type: ignore[assignment]
        cleanup_gpu_memory()


def setup_nsm(config: Any, device: str = "auto") -> NsmRunner:
    """Registry setup: load ``config.model_folder`` and check it decodes ``config.surfaces``.

    Raises:
        ModelUnavailable: the folder is missing or invalid, or decodes other surfaces.
    """
    folder = model_folder_path(config.model_folder)
    if not folder.exists():
        raise ModelUnavailable(
            f"NSM model folder {folder} does not exist",
            "Train one with bench/train_nsm.py, or point the NSM model_folder at your own "
            "(config.json describing the architecture, weights.pt, mean_shape.npz).")
    model = load_nsm(folder, device)
    wanted = tuple(getattr(config, "surfaces", model.surfaces))
    if tuple(model.surfaces) != wanted:
        raise ModelUnavailable(f"NSM model folder {folder} decodes {', '.join(model.surfaces)} but "
                               f"{', '.join(wanted)} are needed",
                               "Use a folder trained for these surfaces, in this order.")
    return NsmRunner(model, config)


def run_nsm(nsm_type: str, surfaces: Mapping[str, trimesh.Trimesh], side: str, *, out_dir: str | Path | None = None,
            device: str = "auto", bscore_folders: Mapping[str, str | Path | None] | None = None,
            overrides: Mapping[str, Mapping[str, Any]] | None = None, progress: Progress | None = None,
            **options: Any) -> dict[str, NsmFit]:
    """Fit every model of ``nsm_type`` in turn (releasing GPU memory after each); write its files to ``out_dir``.

    Args:
        nsm_type: ``none``, ``bone_only``, ``bone_and_cart`` or ``both``.
        surfaces: meshes by surface name (``femur``, ``femoral_cartilage``) in scanner mm.
        side: ``right`` or ``left`` (left knees are mirrored for the fit).
        bscore_folders: B-score folder per model name (None or absent: no B-score).
        overrides: registry-config overrides per model name (``model_folder``, ``max_iterations``).
    """
    from workbench.registry import REGISTRY

    fits: dict[str, NsmFit] = {}
    names = nsm_models(nsm_type)
    for i, name in enumerate(names):
        def sub(fraction: float, message: str, i=i, name=name) -> None:
            if progress:
                progress((i + fraction) / len(names), f"{name}: {message}")

        runner = REGISTRY.model(name).load(device=device, **dict((overrides or {}).get(name, {})))
        try:
            fit = runner.fit(surfaces, side, bscore_folder=(bscore_folders or {}).get(name), progress=sub, **options)
        finally:
            runner.close()
            del runner
        if out_dir is not None:
            fit.save(out_dir, RECON_PARAMS_FILES[name], RECON_MESH_PREFIXES[name])
        fits[name] = fit
    return fits
