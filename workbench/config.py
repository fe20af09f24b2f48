"""Base configs, user options and the job config written into each run folder.

The CLI flags, the notebook parameters and the launcher widgets all produce a
:class:`KneeOptions`; :func:`knee_job_config` maps it onto the base config in
``configs/knee.yaml`` exactly as the original system's front end did:

=================  =====================================================================
option             job config
=================  =====================================================================
nnunet_fullres     ``default_seg_model: nnunet_knee``, ``nnunet.type: fullres``
nnunet_cascade     ``default_seg_model: nnunet_knee``, ``nnunet.type: cascade``
nsm none           ``perform_bone_only_nsm: false``, ``perform_bone_and_cart_nsm: false``
nsm bone_only      ``perform_bone_only_nsm: true``,  ``perform_bone_and_cart_nsm: false``
nsm bone_and_cart  ``perform_bone_only_nsm: false``, ``perform_bone_and_cart_nsm: true``
nsm both           ``perform_bone_only_nsm: true``,  ``perform_bone_and_cart_nsm: true``
=================  =====================================================================

Folders come from the environment first (as nnU-Net's ``nnUNet_results``
does): ``$WORKBENCH_CONFIGS``, ``$WORKBENCH_MODELS`` and ``$WORKBENCH_OUTPUTS``,
falling back to the repository's ``configs/``, ``models/`` and ``outputs/``.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from workbench.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[1]

SegmentationModel = Literal["nnunet_fullres", "nnunet_cascade"]
NsmType = Literal["none", "bone_only", "bone_and_cart", "both"]
T2Mode = Literal["auto", "on", "off"]

#: option value → (default_seg_model, nnunet.type)
SEGMENTATION_MODELS: dict[str, tuple[str, str]] = {
    "nnunet_fullres": ("nnunet_knee", "fullres"),
    "nnunet_cascade": ("nnunet_knee", "cascade"),
}
#: option value → (perform_bone_only_nsm, perform_bone_and_cart_nsm)
NSM_TYPES: dict[str, tuple[bool, bool]] = {
    "none": (False, False),
    "bone_only": (True, False),
    "bone_and_cart": (False, True),
    "both": (True, True),
}


def _folder(env: str, default: str, must_exist: bool = True) -> Path:
    value = os.environ.get(env)
    path = Path(value).expanduser() if value else REPO_ROOT / default
    if must_exist and not path.is_dir():
        raise ConfigError(
            f"{env} is not set and {path} does not exist" if not value else f"{env}={value} is not a folder",
            f"Set {env} to the workbench's {default}/ folder (it ships in the repository).",
        )
    return path


def configs_dir() -> Path:
    """Folder of base configs and presets (``$WORKBENCH_CONFIGS`` or the repository's ``configs/``)."""
    return _folder("WORKBENCH_CONFIGS", "configs")


def models_dir() -> Path:
    """Folder of model folders (``$WORKBENCH_MODELS`` or the repository's ``models/``)."""
    return _folder("WORKBENCH_MODELS", "models")


def outputs_dir() -> Path:
    """Default parent of run folders (``$WORKBENCH_OUTPUTS`` or the repository's ``outputs/``)."""
    return _folder("WORKBENCH_OUTPUTS", "outputs", must_exist=False)


def load_base_config(pipeline: str) -> dict[str, Any]:
    """The base config ``configs/<pipeline>.yaml`` as a dict."""
    path = configs_dir() / f"{pipeline}.yaml"
    if not path.is_file():
        raise ConfigError(f"No base config for pipeline {pipeline!r} at {path}",
                          "Check WORKBENCH_CONFIGS or the repository's configs/ folder.")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping at the top level")
    return data


class KneeOptions(BaseModel):
    """The user-facing options of a knee run (CLI flags, notebook parameters, widgets)."""

    model_config = ConfigDict(extra="forbid")

    input: str = Field(description="DICOM folder or file, or a 3-D NIfTI volume (.nii/.nii.gz).")
    segmentation_model: SegmentationModel = Field(
        "nnunet_fullres", description="nnU-Net configuration: nnunet_fullres (3d_fullres) or nnunet_cascade.")
    nsm_type: NsmType = Field("none", description="Neural shape model fits: none, bone_only, bone_and_cart, both.")
    device: str = Field("auto", description="auto (CUDA when present), cpu, cuda or cuda:N.")
    series: str | None = Field(None, description="DICOM series to use when the folder holds several.")
    model_dir: str | None = Field(None, description="An nnU-Net model folder to use instead of the shipped one.")
    ground_truth: str | None = Field(None, description="Label file to compare the segmentation with.")
    segmentation: str | None = Field(
        None, description="A label map in the input's space (workbench labels) to analyse instead of segmenting.")
    t2: T2Mode = Field("auto", description="T2 mapping: auto (when the input is multi-echo), on (required), off.")
    resample_mm: float | None = Field(None, gt=0, description="Isotropic voxel size (mm) to resample to.")
    timeout_s: float | None = Field(None, gt=0, description="Limit for the whole run (s); default from config.")
    step_timeouts: dict[str, float] = Field(default_factory=dict,
                                            description="Per-step limits (s) by step name, e.g. load_input.")
    overrides: dict[str, Any] = Field(default_factory=dict,
                                      description="Job-config keys to set, dotted: {'nnunet.use_mirroring': True}.")

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        value = value.lower().strip()
        if value in ("auto", "cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit()):
            return value
        raise ValueError("allowed values: auto, cpu, cuda, cuda:N")

    @field_validator("input")
    @classmethod
    def _input(cls, value: str) -> str:
        if not str(value).strip():
            raise ValueError("must name a DICOM folder or a NIfTI file")
        return str(value)

    @model_validator(mode="after")
    def _timeouts_consistent(self) -> "KneeOptions":
        for name, seconds in self.step_timeouts.items():
            if seconds <= 0:
                raise ValueError(f"step_timeouts.{name} must be positive")
            if self.timeout_s is not None and seconds > self.timeout_s:
                raise ValueError(f"step_timeouts.{name}={seconds:g} exceeds the run timeout timeout_s={self.timeout_s:g}")
        return self


def parse_options(cls: type[BaseModel], values: dict[str, Any]) -> BaseModel:
    """Validate options, turning pydantic's errors into one CONFIG_ERROR naming the option."""
    try:
        return cls(**values)
    except ValidationError as exc:
        first = exc.errors()[0]
        option = ".".join(str(p) for p in first["loc"]) or "options"
        if first["type"] == "literal_error":
            allowed = ", ".join(repr(a) for a in _literal_choices(cls, option))
            message = f"Option {option}={first.get('input')!r} is not allowed; allowed values: {allowed}"
        elif first["type"] == "missing":
            message = f"Option {option} is required"
        elif first["type"] == "extra_forbidden":
            known = ", ".join(cls.model_fields)
            message = f"Unknown option {option!r}; known options: {known}"
        else:
            message = f"Option {option}: {first['msg']}"
        raise ConfigError(message, f"See `workbench run {cls.__name__.removesuffix('Options').lower()} --help`.") \
            from None


def _literal_choices(cls: type[BaseModel], option: str) -> tuple[Any, ...]:
    field = cls.model_fields.get(option.split(".")[0])
    return get_args(field.annotation) if field is not None else ()


def knee_job_config(options: KneeOptions, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """Map validated knee options onto (a copy of) the base config; pure, no I/O when ``base`` is given."""
    config = copy.deepcopy(base if base is not None else load_base_config("knee"))
    for key in ("nnunet", "timeouts", "input"):
        if not isinstance(config.get(key), dict):
            raise ConfigError(f"The knee base config lacks the {key!r} section")
    seg_family, nnunet_type = SEGMENTATION_MODELS[options.segmentation_model]
    config["default_seg_model"] = seg_family
    config["nnunet"]["type"] = nnunet_type
    if options.model_dir:
        config["nnunet"]["model_name"] = options.model_dir
    bone_only, bone_and_cart = NSM_TYPES[options.nsm_type]
    config["perform_bone_only_nsm"] = bone_only
    config["perform_bone_and_cart_nsm"] = bone_and_cart
    config["input"]["path"] = options.input
    if options.series is not None:
        config["input"]["series"] = options.series
    if options.resample_mm is not None:
        config["input"]["resample_mm"] = options.resample_mm
    if options.ground_truth is not None:
        config["input"]["ground_truth"] = options.ground_truth
    if options.segmentation is not None:
        config["input"]["segmentation"] = options.segmentation
    if isinstance(config.get("t2"), dict):
        config["t2"]["mode"] = options.t2
    config["device"] = options.device
    set_timeouts(config, options.timeout_s, options.step_timeouts)
    apply_overrides(config, options.overrides)
    cap_step_timeouts(config)
    return config


def set_timeouts(config: dict[str, Any], timeout_s: float | None, step_timeouts: dict[str, float]) -> None:
    """The run's limit (``timeouts.run_s``) and per-step limits (``timeouts.<step>_s``) from the options."""
    if timeout_s is not None:
        config["timeouts"]["run_s"] = timeout_s
    for name, seconds in step_timeouts.items():
        config["timeouts"][f"{name.removesuffix('_s')}_s"] = seconds


def cap_step_timeouts(config: dict[str, Any]) -> None:
    """Lower every step's limit to the run's: a step can never outlive its run."""
    run_s = config["timeouts"].get("run_s")
    for key, seconds in config["timeouts"].items():
        if key != "run_s" and run_s is not None and seconds is not None and seconds > run_s:
            config["timeouts"][key] = run_s


def nsm_models(nsm_type: str) -> list[str]:
    """Shape models an ``nsm_type`` option value runs, in order (``bone_only`` first): from :data:`NSM_TYPES`."""
    if nsm_type not in NSM_TYPES:
        raise ConfigError(f"Unknown nsm_type {nsm_type!r}; allowed: {', '.join(NSM_TYPES)}")
    return [name for name, on in zip(("bone_only", "bone_and_cart"), NSM_TYPES[nsm_type]) if on]


def nsm_type_from_config(config: dict[str, Any]) -> str:
    """The inverse of the NSM mapping: the two flags back to an ``nsm_type`` value."""
    flags = (bool(config.get("perform_bone_only_nsm")), bool(config.get("perform_bone_and_cart_nsm")))
    return {v: k for k, v in NSM_TYPES.items()}[flags]


def apply_overrides(config: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Set dotted keys (``nnunet.folds``) in ``config`` in place; an unknown key is a CONFIG_ERROR.

    String values are parsed as YAML (``true``, ``0.25``, ``[0, 1]``), as they
    come from ``--set key=value`` on the command line.
    """
    for dotted, value in overrides.items():
        parts = dotted.split(".")
        node = config
        for depth, part in enumerate(parts[:-1]):
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"Unknown config key {'.'.join(parts[:depth + 1])!r} in --set {dotted}",
                                  f"Known top-level keys: {', '.join(sorted(config))}")
            node = node[part]
        if parts[-1] not in node:
            raise ConfigError(f"Unknown config key {dotted!r} in --set",
                              f"Keys under {'.'.join(parts[:-1]) or 'the top level'}: {', '.join(sorted(node))}")
        if isinstance(value, str):
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError as exc:
                raise ConfigError(f"--set {dotted}={value!r} is not a valid value ({exc})") from exc
        node[parts[-1]] = value
    return config


# --------------------------------------------------------------------------- reconstruction
ReconModel = Literal["nvdiffrec"]
ReconPreset = Literal["cpu", "default", "paper"]


class ReconOptions(BaseModel):
    """The user-facing options of a multi-view reconstruction run (CLI flags, notebook parameters, widgets)."""

    model_config = ConfigDict(extra="forbid")

    images: str = Field(description="NeRF-synthetic folder, or images/ + masks/ + cameras (docs/recon-inputs.md).")
    model: ReconModel = Field("nvdiffrec", description="Reconstruction model: nvdiffrec.")
    preset: ReconPreset = Field("cpu", description="Settings preset from configs/recon.yaml: cpu, default, paper.")
    device: str = Field("auto", description="auto (CUDA when present), cpu, cuda or cuda:N.")
    resolution: int | None = Field(None, gt=0, description="Resize the views' short side to this on load.")
    timeout_s: float | None = Field(None, gt=0, description="Limit for the whole run (s).")
    step_timeouts: dict[str, float] = Field(default_factory=dict, description="Per-step limits (s) by step name.")
    overrides: dict[str, Any] = Field(default_factory=dict,
                                      description="Job-config keys to set, dotted: {'nvdiffrec.iter': 800}.")

    _device = field_validator("device")(KneeOptions._device.__func__)

    @field_validator("images")
    @classmethod
    def _images(cls, value: str) -> str:
        if not str(value).strip():
            raise ValueError("must name a folder of posed images")
        return str(value)


def recon_job_config(options: ReconOptions, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """Map validated reconstruction options onto (a copy of) ``configs/recon.yaml``.

    The preset named by ``options.preset`` fills the ``nvdiffrec`` section
    (keys already set there win over the preset), then ``--set`` overrides
    apply.  ``nvdiffrec.*`` keys may be any field of
    :class:`workbench.recon.nvdiffrec_config.NvdiffrecConfig`, set or not in the file;
    a bare key that is not a top-level key (``iter``) means the model's (``nvdiffrec.iter``).
    The model section is validated here (CONFIG_ERROR names a bad key).
    """
    config = copy.deepcopy(base if base is not None else load_base_config("recon"))
    for key in ("input", "timeouts", "presets"):
        if not isinstance(config.get(key), dict):
            raise ConfigError(f"The recon base config lacks the {key!r} section")
    presets = config.pop("presets")
    if options.preset not in presets:
        raise ConfigError(f"Preset {options.preset!r} is not in configs/recon.yaml",
                          f"Presets there: {', '.join(presets)}")
    config["model"] = options.model
    config["preset"] = options.preset
    config["nvdiffrec"] = {**presets[options.preset], **(config.get("nvdiffrec") or {})}
    config["input"]["path"] = options.images
    if options.resolution is not None:
        config["input"]["resolution"] = options.resolution
    config["device"] = options.device
    set_timeouts(config, options.timeout_s, options.step_timeouts)
    # upstream's bare key names (`--set iter=800`) are short for the model section's (`nvdiffrec.iter`)
    overrides = {(k if "." in k or k in config else f"{config['model']}.{k}"): v for k, v in options.overrides.items()}
    section_overrides = {k: v for k, v in overrides.items() if k.startswith("nvdiffrec.")}
    for dotted, value in section_overrides.items():  # any NvdiffrecConfig field, present in the file or not
        config["nvdiffrec"][dotted.split(".", 1)[1]] = yaml.safe_load(value) if isinstance(value, str) else value
    apply_overrides(config, {k: v for k, v in overrides.items() if k not in section_overrides})
    cap_step_timeouts(config)
    from workbench.recon.nvdiffrec_config import NvdiffrecConfig

    NvdiffrecConfig.from_dict(config["nvdiffrec"])  # unknown or out-of-range model keys: CONFIG_ERROR here
    return config


# --------------------------------------------------------------------------- jobs
#: The options class of each pipeline (what CLI flags, notebook parameters and launcher widgets produce).
OPTIONS_CLASSES: dict[str, type[BaseModel]] = {"knee": KneeOptions, "recon": ReconOptions}


def validate_job(pipeline: str, options: dict[str, Any]) -> BaseModel:
    """Validate a job's options and its job config before anything is written (CONFIG_ERROR names the problem).

    What ``workbench run`` and the launcher both call before starting a run.
    """
    from workbench.gpu import resolve_device

    if pipeline not in OPTIONS_CLASSES:
        raise ConfigError(f"Unknown pipeline {pipeline!r}; allowed: {', '.join(OPTIONS_CLASSES)}")
    validated = parse_options(OPTIONS_CLASSES[pipeline], options)
    if pipeline == "recon":
        recon_job_config(validated)  # bad --set keys
    else:
        knee_job_config(validated)
    resolve_device(validated.device)
    return validated


def notebook_timeout_s(pipeline: str, validated: BaseModel) -> float:
    """A backstop for a hung notebook kernel: the run's own limit (or a generous default) plus two minutes."""
    return (getattr(validated, "timeout_s", None) or (1800 if pipeline == "knee" else 4 * 3600)) + 120

