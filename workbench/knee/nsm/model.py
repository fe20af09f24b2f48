"""The decoder network of a neural shape model and its self-describing model folder.

A neural shape model (NSM) is a DeepSDF-style auto-decoder: one network maps a
latent vector ``z`` (one per shape) and a point ``xyz`` of the model's
normalised space to the signed distance of that point to each of the model's
surfaces (negative inside).  Fitting a new shape optimises ``z`` with the
network frozen (:mod:`workbench.knee.nsm.fit`); training optimises both, one
``z`` per training shape (:mod:`workbench.knee.nsm.train`).

Network (:class:`SdfDecoder`)
-----------------------------
An MLP on ``[z, xyz, fourier(xyz)]``: ``hidden_dims`` fully connected layers
(ReLU, or softplus with ``softplus_beta``), the network input concatenated
again to the input of every layer listed in ``skip_layers``, optional weight
normalisation, and a linear head with one output per channel.  Initialised
geometrically (Atzmon & Lipman, SAL, 2020): the untrained network is roughly
the signed distance of a sphere of radius ``init_radius`` (exactly so as the
width grows) for every latent, a far better start than a random function for
short training on a CPU.

Surfaces and channels (``composition``)
---------------------------------------
``independent``: channel ``k`` is the signed distance to surface ``k``.
``nested``: channel ``k`` is the signed distance ``u_k`` to the *union* of
surfaces ``0..k`` (femur; femur plus cartilage), and surface ``k > 0`` is
recovered as ``max(u_k, -u_{k-1})`` (inside the union but outside the
previous one).  A thin shell such as cartilage (about 2 mm over a 150 mm
bone) is then the difference of two smooth surfaces, which a small network
represents far better than the shell's own signed distance.
``offset``: as ``nested``, but channel ``k > 0`` is a non-negative offset,
``u_k = u_{k-1} - relu(channel_k)``.  A superset's signed distance is never
larger than its subset's, so the offset is exactly ``u_{k-1} - u_k >= 0``,
and "no cartilage here" is an exact zero (a negative pre-activation) rather
than two channels that must agree to the last decimal: with ``nested`` every
small disagreement outside the bone decodes as a sliver of cartilage.

Model folder (:func:`load_nsm`, :func:`save_nsm`)
-------------------------------------------------
::

    config.json      format, surfaces, composition, architecture, normalisation, crop, fit settings
    weights.pt       the decoder's state_dict (torch.save; loaded with weights_only=True)
    mean_shape.npz   mean_latent (latent_dim,), points (M, 3): the mean shape's surface in model space
                     (the target of the similarity alignment), optional training_latents (n, latent_dim)
    model_card.md    what it is, data, training, metrics, limits
    metadata.json    name, version, licence, provenance, sha256 of every file (workbench.models.write_metadata)

:func:`load_nsm` rebuilds the network from ``config.json`` alone, so weights
trained elsewhere load through the same code when their architecture is
described there; a description that does not match the weights is a
MODEL_UNAVAILABLE error naming the differing parameters.  The older names
``model_config.json`` / ``model.pth`` are accepted too (``configs/knee.yaml``
uses them).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from workbench.errors import ModelUnavailable

FORMAT = "workbench-nsm"
FORMAT_VERSION = 1
CONFIG_NAMES = ("config.json", "model_config.json")
WEIGHT_NAMES = ("weights.pt", "model.pth")
MEAN_SHAPE_NAME = "mean_shape.npz"
COMPOSITIONS = ("independent", "nested", "offset")
ACTIVATIONS = ("relu", "softplus")


@dataclass(frozen=True)
class NsmArchitecture:
    """The decoder's shape: everything needed to rebuild it before loading weights.

    Attributes:
        latent_dim: length of the latent vector.
        hidden_dims: width of each hidden layer, in order.
        skip_layers: indices of hidden layers whose input gets the network input concatenated.
        n_outputs: output channels (one per surface).
        activation: ``relu`` or ``softplus``.
        softplus_beta: sharpness of softplus (ignored for relu).
        weight_norm: weight-normalised linear layers.
        fourier_frequencies: number of octaves of sin/cos features of xyz (0: none).
        init_radius: radius (model units) of the sphere the untrained network represents.
    """

    latent_dim: int = 64
    hidden_dims: tuple[int, ...] = (128,) * 8
    skip_layers: tuple[int, ...] = (4,)
    n_outputs: int = 1
    activation: str = "relu"
    softplus_beta: float = 100.0
    weight_norm: bool = False
    fourier_frequencies: int = 0
    init_radius: float = 0.5

    @property
    def input_dim(self) -> int:
        return self.latent_dim + 3 + 6 * self.fourier_frequencies

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config.json") -> NsmArchitecture:
        """Validate a config's ``architecture`` section; MODEL_UNAVAILABLE names the offending key."""
        if not isinstance(data, dict):
            raise ModelUnavailable(f"{source}: 'architecture' must be an object, got {type(data).__name__}")
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ModelUnavailable(f"{source}: unknown architecture key(s) {', '.join(unknown)}",
                                   f"Allowed keys: {', '.join(sorted(known))}.")
        values = dict(data)
        try:
            for key in ("latent_dim", "n_outputs", "fourier_frequencies"):
                if key in values:
                    values[key] = _positive_int(values[key], key, allow_zero=key == "fourier_frequencies")
            if "hidden_dims" in values:
                values["hidden_dims"] = tuple(_positive_int(v, "hidden_dims") for v in values["hidden_dims"])
                if not values["hidden_dims"]:
                    raise ValueError("hidden_dims is empty")
            if "skip_layers" in values:
                values["skip_layers"] = tuple(int(v) for v in values["skip_layers"])
            for key in ("softplus_beta", "init_radius"):
                if key in values:
                    values[key] = float(values[key])
            if "weight_norm" in values:
                values["weight_norm"] = bool(values["weight_norm"])
        except (TypeError, ValueError) as exc:
            raise ModelUnavailable(f"{source}: invalid architecture ({exc})") from None
        arch = cls(**values)
        if arch.activation not in ACTIVATIONS:
            raise ModelUnavailable(f"{source}: activation {arch.activation!r} is not one of {', '.join(ACTIVATIONS)}")
        bad = [i for i in arch.skip_layers if not 0 < i < len(arch.hidden_dims)]
        if bad:
            raise ModelUnavailable(f"{source}: skip_layers {bad} outside 1..{len(arch.hidden_dims) - 1}")
        return arch

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["hidden_dims"] = list(self.hidden_dims)
        data["skip_layers"] = list(self.skip_layers)
        return data


def _positive_int(value: Any, key: str, allow_zero: bool = False) -> int:
    if isinstance(value, bool) or int(value) != value:
        raise ValueError(f"{key} must be an integer, got {value!r}")
    value = int(value)
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{key} must be positive, got {value}")
    return value


class SdfDecoder(nn.Module):
    """MLP from (latent, xyz) to one signed distance per output channel."""

    def __init__(self, arch: NsmArchitecture) -> None:
        super().__init__()
        self.arch = arch
        d_in = arch.input_dim
        layers = []
        prev = d_in
        for i, width in enumerate(arch.hidden_dims):
            n_in = prev + (d_in if i in arch.skip_layers else 0)
            layers.append(nn.Linear(n_in, width))
            prev = width
        layers.append(nn.Linear(prev, arch.n_outputs))
        self._geometric_init(layers)
        if arch.weight_norm:
            layers = [nn.utils.parametrizations.weight_norm(layer) for layer in layers]
        self.layers = nn.ModuleList(layers)
        if arch.fourier_frequencies:
            freqs = (2.0 ** torch.arange(arch.fourier_frequencies, dtype=torch.float32)) * math.pi
        else:
            freqs = torch.zeros(0)
        self.register_buffer("frequencies", freqs, persistent=False)

    def _geometric_init(self, layers: list[nn.Linear]) -> None:
        arch = self.arch
        xyz = slice(arch.latent_dim, arch.latent_dim + 3)
        with torch.no_grad():
            for i, layer in enumerate(layers[:-1]):
                out_dim = layer.weight.shape[0]
                nn.init.normal_(layer.weight, 0.0, math.sqrt(2.0) / math.sqrt(out_dim))
                nn.init.zeros_(layer.bias)
                if i == 0 or i in arch.skip_layers:
                    # only xyz drives the initial function: a sphere whatever the latent
                    start = 0 if i == 0 else layer.weight.shape[1] - arch.input_dim
                    keep = torch.zeros(layer.weight.shape[1], dtype=torch.bool)
                    keep[start + xyz.start:start + xyz.stop] = True
                    if i != 0:
                        keep[:start] = True
                    layer.weight[:, ~keep] = 0.0
            last = layers[-1]
            nn.init.normal_(last.weight, math.sqrt(math.pi) / math.sqrt(last.weight.shape[1]), 1e-4)
            nn.init.constant_(last.bias, -arch.init_radius)

    def _activation(self, h: torch.Tensor) -> torch.Tensor:
        if self.arch.activation == "softplus":
            return nn.functional.softplus(h, beta=self.arch.softplus_beta)
        return torch.relu(h)

    def forward(self, latent: torch.Tensor, xyz: torch.Tensor) -> torch.Tensor:
        """``latent``: (N, L) or (L,) (one shape for all points); ``xyz``: (N, 3). Returns (N, n_outputs)."""
        if latent.dim() == 1:
            latent = latent.unsqueeze(0).expand(xyz.shape[0], -1)
        parts = [latent, xyz]
        if self.frequencies.numel():
            angles = xyz.unsqueeze(-1) * self.frequencies  # (N, 3, F)
            parts += [torch.sin(angles).flatten(1), torch.cos(angles).flatten(1)]
        x = torch.cat(parts, dim=1)
        h = x
        n_hidden = len(self.layers) - 1
        for i in range(n_hidden):
            if i in self.arch.skip_layers:
                h = torch.cat([h, x], dim=1)
            h = self._activation(self.layers[i](h))
        return self.layers[-1](h)


@dataclass
class NsmModel:
    """A loaded neural shape model: decoder, description and mean shape.

    Attributes:
        decoder: the network (eval mode, on ``device``).
        config: the parsed ``config.json``.
        mean_latent: the latent of the mean shape (fitting starts from it).
        mean_points: (M, 3) points on the mean shape's surface in model space (alignment target).
        folder: where it was loaded from (None when built in memory).
        device: torch device string.
    """

    decoder: SdfDecoder
    config: dict[str, Any]
    mean_latent: torch.Tensor
    mean_points: np.ndarray
    folder: Path | None = None
    device: str = "cpu"
    training_latents: np.ndarray | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return str(self.config.get("name") or (self.folder.name if self.folder else "nsm"))

    @property
    def surfaces(self) -> tuple[str, ...]:
        return tuple(self.config["surfaces"])

    @property
    def composition(self) -> str:
        return str(self.config.get("composition", "independent"))

    @property
    def clamp(self) -> float:
        return float(self.config.get("sdf", {}).get("clamp", 0.1))

    @property
    def arch(self) -> NsmArchitecture:
        return self.decoder.arch

    def fit_setting(self, key: str, default: Any) -> Any:
        return self.config.get("fit", {}).get(key, default)

    def raw(self, latent: torch.Tensor, xyz: torch.Tensor) -> torch.Tensor:
        """The network's output channels at ``xyz`` (model space)."""
        return self.decoder(latent, xyz)

    def sdf(self, latent: torch.Tensor, xyz: torch.Tensor) -> torch.Tensor:
        """Signed distance (model units) to each surface, (N, n_surfaces), composed from the channels."""
        return compose(self.raw(latent, xyz), self.composition)

    @torch.no_grad()
    def sdf_numpy(self, latent: torch.Tensor, xyz: np.ndarray, chunk: int = 32768) -> np.ndarray:
        out = []
        for start in range(0, len(xyz), chunk):
            pts = torch.as_tensor(xyz[start:start + chunk], dtype=torch.float32, device=self.device)
            out.append(self.sdf(latent, pts).cpu().numpy())
        if not out:
            return np.zeros((0, len(self.surfaces)), np.float32)
        return np.concatenate(out, axis=0)

    @torch.no_grad()
    def sdf_grid(self, latent: torch.Tensor, resolution: int = 128, bound: float = 1.0,
                 coarse_factor: int = 4) -> tuple[np.ndarray, float]:
        """Signed distances on a cubic grid over ``[-bound, bound]^3``: (n_surfaces, R+1, R+1, R+1) and spacing.

        Narrow band: the network is evaluated on a coarse grid first, and on the
        fine grid only near the surfaces (elsewhere the coarse values,
        trilinearly upsampled, give the sign), which cuts the cost several-fold.
        """
        from scipy import ndimage

        n = int(resolution)
        h = 2.0 * bound / n
        if coarse_factor > 1 and n % coarse_factor == 0 and n // coarse_factor >= 8:
            nc = n // coarse_factor
            hc = 2.0 * bound / nc
            axis_c = np.linspace(-bound, bound, nc + 1, dtype=np.float32)
            coarse = self.sdf_numpy(latent, _grid_points(axis_c)).T.reshape(-1, nc + 1, nc + 1, nc + 1)
            idx = np.arange(n + 1, dtype=np.float32) / coarse_factor
            coords = np.stack(np.meshgrid(idx, idx, idx, indexing="ij"))
            fine = np.stack([ndimage.map_coordinates(c, coords, order=1, mode="nearest") for c in coarse])
            band = 1.5 * hc * math.sqrt(3.0)
            near = (np.abs(fine) < band).any(axis=0)
            axis_f = np.linspace(-bound, bound, n + 1, dtype=np.float32)
            ii = np.nonzero(near)
            pts = np.stack([axis_f[ii[0]], axis_f[ii[1]], axis_f[ii[2]]], axis=1)
            values = self.sdf_numpy(latent, pts)
            for s in range(fine.shape[0]):
                fine[s][ii] = values[:, s]
            return fine.astype(np.float32), h
        axis = np.linspace(-bound, bound, n + 1, dtype=np.float32)
        values = self.sdf_numpy(latent, _grid_points(axis))
        return values.T.reshape(-1, n + 1, n + 1, n + 1).astype(np.float32), h

    def meshes(self, latent: torch.Tensor, resolution: int = 128, bound: float = 1.0,
               min_component: float = 0.02) -> list:
        """Marching cubes of each surface's zero level, in model space (trimesh meshes, maybe empty).

        Fragments are dropped: the first surface keeps its largest connected
        component, the others every component of at least ``min_component``
        times the area of their largest.
        """
        from workbench.knee.nsm.sdf import keep_components, mesh_from_sdf_grid

        grid, h = self.sdf_grid(latent, resolution, bound)
        origin = np.full(3, -bound)
        return [keep_components(mesh_from_sdf_grid(g, origin, h), 1.0 if k == 0 else min_component)
                for k, g in enumerate(grid)]


def _grid_points(axis: np.ndarray) -> np.ndarray:
    g = np.meshgrid(axis, axis, axis, indexing="ij")
    return np.stack([a.ravel() for a in g], axis=1)


def compose(raw: torch.Tensor, composition: str) -> torch.Tensor:
    """Surface signed distances from the network's channels (see the module notes)."""
    if composition == "independent" or raw.shape[1] == 1:
        return raw
    unions = union_channels(raw, composition)
    parts = [unions[:, :1]]
    for k in range(1, raw.shape[1]):
        parts.append(torch.maximum(unions[:, k:k + 1], -unions[:, k - 1:k]))
    return torch.cat(parts, dim=1)


def union_channels(raw: torch.Tensor, composition: str) -> torch.Tensor:
    """Signed distances to the nested unions ``0..k`` (``nested`` and ``offset`` compositions)."""
    if composition == "nested":
        return raw
    if composition == "offset":
        parts = [raw[:, :1]]
        for k in range(1, raw.shape[1]):
            parts.append(parts[-1] - torch.relu(raw[:, k:k + 1]))
        return torch.cat(parts, dim=1)
    raise ValueError(f"unknown composition {composition!r}")


# --------------------------------------------------------------------------------------------------
# model folders


def find_file(folder: Path, names: Sequence[str], what: str) -> Path:
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise ModelUnavailable(f"NSM model folder {folder} has no {what} ({' or '.join(names)})",
                           "An NSM model folder needs config.json, weights.pt and mean_shape.npz.")


def read_config(path: Path) -> dict[str, Any]:
    """Parse and validate an NSM ``config.json``; MODEL_UNAVAILABLE names what is wrong."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ModelUnavailable(f"{path} is not valid JSON ({exc.msg}, line {exc.lineno})") from None
    if not isinstance(config, dict):
        raise ModelUnavailable(f"{path} must hold a JSON object")
    if config.get("format", FORMAT) != FORMAT:
        raise ModelUnavailable(f"{path} has format {config.get('format')!r}, expected {FORMAT!r}")
    missing = [k for k in ("surfaces", "architecture") if k not in config]
    if missing:
        raise ModelUnavailable(f"{path} lacks {', '.join(missing)}",
                               "config.json must name the surfaces and describe the decoder's architecture.")
    surfaces = config["surfaces"]
    if not isinstance(surfaces, list) or not surfaces or not all(isinstance(s, str) for s in surfaces):
        raise ModelUnavailable(f"{path}: 'surfaces' must be a non-empty list of names")
    arch = NsmArchitecture.from_dict(config["architecture"], source=str(path))
    if arch.n_outputs != len(surfaces):
        raise ModelUnavailable(f"{path}: architecture.n_outputs={arch.n_outputs} but {len(surfaces)} surfaces "
                               f"({', '.join(surfaces)}) are named")
    if config.get("composition", "independent") not in COMPOSITIONS:
        raise ModelUnavailable(f"{path}: composition {config.get('composition')!r} is not one of "
                               f"{', '.join(COMPOSITIONS)}")
    return config


def _state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        for key in ("model_state_dict", "state_dict", "decoder"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelUnavailable(f"{path} holds no state_dict of tensors")
    return {(k.removeprefix("module.")): v for k, v in obj.items()}


def load_nsm(folder: str | Path, device: str = "auto", *, weights: str | Path | None = None) -> NsmModel:
    """Load an NSM model folder (or a ``config.json`` path) onto ``device`` (``auto``: CUDA when available).

    Raises:
        ModelUnavailable: the folder or a file is missing, the config is invalid, or the weights do not
            match the architecture the config describes (the message names the differing parameters).
    """
    from workbench.gpu import resolve_device

    folder = Path(folder).expanduser()
    if folder.is_file():
        config_path, folder = folder, folder.parent
    elif folder.is_dir():
        config_path = find_file(folder, CONFIG_NAMES, "config.json")
    else:
        raise ModelUnavailable(f"NSM model folder {folder} does not exist",
                               "Point the NSM model_folder at a folder with config.json and weights.pt.")
    config = read_config(config_path)
    arch = NsmArchitecture.from_dict(config["architecture"], source=str(config_path))
    files = config.get("files", {})
    weights_path = Path(weights) if weights else (
        folder / files["weights"] if "weights" in files else find_file(folder, WEIGHT_NAMES, "weights"))
    if not weights_path.is_file():
        raise ModelUnavailable(f"NSM weights {weights_path} do not exist")
    device = resolve_device(device)
    try:
        blob = torch.load(weights_path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises several types for corrupt files
        raise ModelUnavailable(f"Cannot read NSM weights {weights_path}: {type(exc).__name__}: {exc}") from None
    state = _state_dict(blob, weights_path)
    decoder = SdfDecoder(arch)
    _load_state(decoder, state, config_path, weights_path)
    decoder.to(device).eval()
    for p in decoder.parameters():
        p.requires_grad_(False)

    mean_path = folder / files.get("mean_shape", MEAN_SHAPE_NAME)
    mean_latent = torch.zeros(arch.latent_dim)
    mean_points = None
    training_latents = None
    if mean_path.is_file():
        with np.load(mean_path) as npz:
            if "mean_latent" in npz:
                mean_latent = torch.as_tensor(npz["mean_latent"], dtype=torch.float32)
            if "points" in npz:
                mean_points = np.asarray(npz["points"], np.float64)
            if "training_latents" in npz:
                training_latents = np.asarray(npz["training_latents"], np.float32)
        if mean_latent.shape != (arch.latent_dim,):
            raise ModelUnavailable(f"{mean_path}: mean_latent has shape {tuple(mean_latent.shape)}, "
                                   f"expected ({arch.latent_dim},) from config.json")
    model = NsmModel(decoder, config, mean_latent.to(device), np.zeros((0, 3)), folder, device, training_latents)
    if mean_points is None or len(mean_points) == 0:
        mean_points = mean_shape_points(model, model.mean_latent)
    model.mean_points = mean_points
    return model


def _load_state(decoder: SdfDecoder, state: dict[str, torch.Tensor], config_path: Path, weights_path: Path) -> None:
    expected = decoder.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
                  if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or mismatched:
        details = []
        if mismatched:
            details.append("shape mismatch (weights vs config): " + ", ".join(mismatched[:4]))
        if missing:
            details.append("missing: " + ", ".join(missing[:4]))
        if unexpected:
            details.append("unexpected: " + ", ".join(unexpected[:4]))
        raise ModelUnavailable(
            f"NSM weights {weights_path.name} do not match the architecture in {config_path.name} "
            f"({'; '.join(details)})",
            "Describe the network that produced the weights in config.json's 'architecture' "
            "(latent_dim, hidden_dims, skip_layers, n_outputs, fourier_frequencies, weight_norm).")
    decoder.load_state_dict(state, strict=True)


def mean_shape_points(model: NsmModel, latent: torch.Tensor, n_points: int = 6000, resolution: int = 96,
                      max_height: float | None = None, seed: int = 0) -> np.ndarray:
    """Points on the first surface decoded from ``latent`` (model space), below ``max_height`` along z."""
    mesh = model.meshes(latent, resolution=resolution)[0]
    if len(mesh.faces) == 0:
        raise ModelUnavailable(f"NSM model {model.name}: the mean latent decodes to an empty surface")
    from workbench.knee.nsm.sdf import sample_surface

    points, _ = sample_surface(mesh, n_points * 2, np.random.default_rng(seed))
    if max_height is not None:
        points = points[points[:, 2] < max_height]
    return points[:n_points]


def save_nsm(folder: str | Path, decoder: SdfDecoder, config: dict[str, Any], *, mean_latent: np.ndarray,
             mean_points: np.ndarray, training_latents: np.ndarray | None = None) -> Path:
    """Write ``config.json``, ``weights.pt`` and ``mean_shape.npz`` into ``folder`` (card and metadata: the caller)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {"format": FORMAT, "format_version": FORMAT_VERSION, **config,
              "architecture": decoder.arch.to_dict(),
              "files": {"weights": WEIGHT_NAMES[0], "mean_shape": MEAN_SHAPE_NAME}}
    read_config_dict = json.loads(json.dumps(config))  # JSON-clean
    (folder / CONFIG_NAMES[0]).write_text(json.dumps(read_config_dict, indent=2) + "\n", encoding="utf-8")
    state = {k: v.detach().cpu().contiguous() for k, v in decoder.state_dict().items()}
    torch.save(state, folder / WEIGHT_NAMES[0])
    arrays = {"mean_latent": np.asarray(mean_latent, np.float32), "points": np.asarray(mean_points, np.float32)}
    if training_latents is not None:
        arrays["training_latents"] = np.asarray(training_latents, np.float32)
    np.savez_compressed(folder / MEAN_SHAPE_NAME, **arrays)
    return folder
