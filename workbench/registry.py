"""The model registry: one table that the CLI, the notebooks and the widgets read.

Each model has a name, the pipeline it belongs to, the option that selects it
(``segmentation_model``, ``nsm_type``, ...), a typed config (a dataclass with
documented fields) and a ``setup`` function, named as ``"module:function"`` and
imported only when the model is used, that turns the config into something
runnable.  Pipelines register their models in :data:`REGISTRY` below; nothing
else in the workbench hard-codes a model name list.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field, fields
from typing import Any, Callable

from workbench.errors import ConfigError, ModelUnavailable


def import_ref(ref: str) -> Any:
    """The object a ``"module:attribute"`` reference names (imported on first use)."""
    module_name, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module_name), attr)


@dataclass(frozen=True)
class NnUNetModelConfig:
    """Settings of an nnU-Net v2 segmentation model.

    Attributes:
        model_folder: model folder under ``models/`` (or an absolute path) as nnU-Net writes it.
        configuration: nnU-Net configuration(s) run in order (``3d_fullres``; cascade: ``3d_lowres``
            then ``3d_cascade_fullres``).
        folds: folds to ensemble (``all`` for a model trained on all data).
        checkpoint: checkpoint file name inside each fold folder.
        use_mirroring: test-time mirroring (8 passes in 3-D: slower, slightly better).
        tile_step_size: sliding-window step as a fraction of the patch size (smaller: more overlap).
    """

    model_folder: str = "knee_nnunet"
    configuration: tuple[str, ...] = ("3d_fullres",)
    folds: tuple[str, ...] = ("all",)
    checkpoint: str = "checkpoint_final.pth"
    use_mirroring: bool = False
    tile_step_size: float = 0.5


@dataclass(frozen=True)
class NsmModelConfig:
    """Settings of a neural shape model (DeepSDF-style auto-decoder).

    Attributes:
        model_folder: model folder under ``models/`` (or absolute) holding ``config.json``, ``weights.pt``
            and ``mean_shape.npz`` (:func:`workbench.knee.nsm.load_nsm`).
        surfaces: surfaces the model decodes (``femur``; ``femur`` and ``femoral_cartilage``).
        max_iterations: latent optimisation steps at most (early stopping ends sooner).
    """

    model_folder: str = "nsm_femur"
    surfaces: tuple[str, ...] = ("femur",)
    max_iterations: int = 2000


def _nvdiffrec_default_config() -> Any:
    """nvdiffrec's typed config (:class:`workbench.recon.nvdiffrec_config.NvdiffrecConfig`, torch-free)."""
    from workbench.recon.nvdiffrec_config import NvdiffrecConfig

    return NvdiffrecConfig()


@dataclass(frozen=True)
class ModelSpec:
    """One registered model.

    Attributes:
        name: the value users type (``--segmentation-model nnunet_fullres``).
        pipeline: ``knee`` or ``recon``.
        option: the pipeline option that selects it.
        description: one line for ``--help``, ``models list`` and the widgets.
        config: the model's default typed config.
        setup: ``"module:function"`` taking the config (and a device) and returning the runnable model.
    """

    name: str
    pipeline: str
    option: str
    description: str
    config: Any
    setup: str

    def config_fields(self) -> dict[str, Any]:
        """The config's fields and defaults (for ``models list`` and widgets)."""
        return {f.name: getattr(self.config, f.name) for f in fields(self.config)}

    def load(self, device: str = "cpu", **overrides: Any) -> Any:
        """Import and call ``setup`` with the config (plus overrides); a missing implementation is MODEL_UNAVAILABLE."""
        from dataclasses import replace

        try:
            setup: Callable[..., Any] = import_ref(self.setup)
        except (ImportError, AttributeError) as exc:
            raise ModelUnavailable(
                f"Model {self.name!r} cannot be set up: {self.setup.replace(':', '.')} is not available ({exc})",
                "This workbench version does not include that model yet, or a dependency is missing.",
            ) from exc
        return setup(replace(self.config, **overrides), device=device)


@dataclass
class PipelineSpec:
    """A pipeline, its notebook and the options whose values come from registered models.

    Attributes:
        name: ``knee`` or ``recon``.
        notebook: the parameterized notebook under ``notebooks/``.
        description: one line for ``--help``.
        extra_choices: option values that are not single models (``nsm_type``: ``none``, ``both``).
        options: ``"module:Class"`` of the pipeline's options (a pydantic model; the launcher's fields).
        input_option: the option that names the input (``input``, ``images``).
        sample: ``"module:function"`` taking a folder, writing the bundled sample there and returning the
            options that run it (the launcher's "use the sample" button).
    """

    name: str
    notebook: str
    description: str
    extra_choices: dict[str, tuple[str, ...]] = field(default_factory=dict)
    options: str = ""
    input_option: str = "input"
    sample: str | None = None

    def options_class(self) -> Any:
        """The pipeline's options class (imported on first use)."""
        return import_ref(self.options)

    def write_sample(self, folder: Any) -> dict[str, Any]:
        """Write the pipeline's sample into ``folder``; return the options that run it."""
        if not self.sample:
            raise ConfigError(f"Pipeline {self.name!r} has no bundled sample")
        return import_ref(self.sample)(folder)


class Registry:
    """Pipelines and models by name."""

    def __init__(self) -> None:
        self.pipelines: dict[str, PipelineSpec] = {}
        self.models: dict[str, ModelSpec] = {}

    def add_pipeline(self, spec: PipelineSpec) -> None:
        self.pipelines[spec.name] = spec

    def add_model(self, spec: ModelSpec) -> None:
        if spec.pipeline not in self.pipelines:
            raise ValueError(f"unknown pipeline {spec.pipeline!r} for model {spec.name!r}")
        if spec.name in self.models:
            raise ValueError(f"model {spec.name!r} registered twice")
        self.models[spec.name] = spec

    def pipeline(self, name: str) -> PipelineSpec:
        try:
            return self.pipelines[name]
        except KeyError:
            raise ConfigError(f"Unknown pipeline {name!r}; allowed: {', '.join(self.pipelines)}") from None

    def model(self, name: str) -> ModelSpec:
        try:
            return self.models[name]
        except KeyError:
            raise ConfigError(f"Unknown model {name!r}; allowed: {', '.join(self.models)}") from None

    def models_for(self, pipeline: str, option: str | None = None) -> list[ModelSpec]:
        return [m for m in self.models.values() if m.pipeline == pipeline and (option is None or m.option == option)]

    def choices(self, pipeline: str, option: str) -> tuple[str, ...]:
        """Allowed values of a pipeline option: its registered models, in order, plus the extra choices."""
        spec = self.pipeline(pipeline)
        extra = spec.extra_choices.get(option, ())
        names = tuple(m.name for m in self.models_for(pipeline, option))
        leading = tuple(c for c in extra if c == "none")
        trailing = tuple(c for c in extra if c != "none")
        return leading + names + trailing


REGISTRY = Registry()
REGISTRY.add_pipeline(PipelineSpec(
    name="knee",
    notebook="knee_mri.ipynb",
    description="Knee MRI: segmentation, meshes, cartilage thickness, T2, shape models",
    extra_choices={"nsm_type": ("none", "both")},
    options="workbench.config:KneeOptions",
    input_option="input",
    sample="workbench.data.samples:knee_sample_options",
))
REGISTRY.add_model(ModelSpec(
    name="nnunet_fullres", pipeline="knee", option="segmentation_model",
    description="nnU-Net v2 3d_fullres knee segmentation (9 structures)",
    config=NnUNetModelConfig(configuration=("3d_fullres",)),
    setup="workbench.knee.segmentation:setup_nnunet",
))
REGISTRY.add_model(ModelSpec(
    name="nnunet_cascade", pipeline="knee", option="segmentation_model",
    description="nnU-Net v2 cascade: 3d_lowres, then 3d_cascade_fullres on its prediction",
    config=NnUNetModelConfig(configuration=("3d_lowres", "3d_cascade_fullres")),
    setup="workbench.knee.segmentation:setup_nnunet",
))
REGISTRY.add_model(ModelSpec(
    name="bone_only", pipeline="knee", option="nsm_type",
    description="Neural shape model of the femur",
    config=NsmModelConfig(model_folder="nsm_femur", surfaces=("femur",)),
    setup="workbench.knee.nsm:setup_nsm",
))
REGISTRY.add_model(ModelSpec(
    name="bone_and_cart", pipeline="knee", option="nsm_type",
    description="Neural shape model of the femur and its cartilage",
    config=NsmModelConfig(model_folder="nsm_femur_cartilage", surfaces=("femur", "femoral_cartilage")),
    setup="workbench.knee.nsm:setup_nsm",
))

REGISTRY.add_pipeline(PipelineSpec(
    name="recon",
    notebook="reconstruction.ipynb",
    description="Multi-view 3D reconstruction: posed images with masks → textured mesh, materials, light",
    options="workbench.config:ReconOptions",
    input_option="images",
    sample="workbench.data.synthetic_scenes:recon_sample_options",
))
REGISTRY.add_model(ModelSpec(
    name="nvdiffrec", pipeline="recon", option="model",
    description="nvdiffrec (Munkberg et al. 2022): DMTet mesh, PBR materials and environment light from images",
    config=_nvdiffrec_default_config(),
    setup="workbench.recon.nvdiffrec:setup_nvdiffrec",
))
