"""nvdiffrec's typed config: upstream's key names, documented (no torch import, so the registry stays light)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from workbench.errors import ConfigError


@dataclass
class NvdiffrecConfig:
    """Settings of an nvdiffrec reconstruction (upstream's key names where they exist).

    Attributes:
        iter: pass-1 (DMTet) iterations.
        iter_pass2: pass-2 (fixed topology, textures) iterations; ``None``: same as ``iter``, as upstream.
        batch: views per iteration.
        train_res: rendering resolution [height, width] during training (the images are resized to it).
        texture_res: texture resolution [height, width] of pass 2 and the export.
        dmtet_grid: tetrahedral grid resolution (cubes per side, 6 tets each).
        mesh_scale: edge length of the grid's cube, centred at the origin (scene units); the object must fit inside.
        sdf_sparse_update: move only the grid values that received a gradient this iteration (and reset the
            others' Adam momentum). Upstream moves every value by its momentum; off the surface that drift flips
            signs and breeds interior handles and floaters.
        fill_cavities: every ``fill_every`` iterations of pass 1, grid values outside the surface but cut off from
            the grid's boundary (cavities no camera outside the object can see) are set inside.
        fill_every: iterations between cavity fills.
        sdf_init: ``random`` (upstream: uniform − 0.1, a surface everywhere), ``sphere`` (a ball of radius
            0.3 · mesh_scale) or ``visual_hull`` (the grid points inside every view's mask, as a signed distance):
            the last two start with far fewer triangles, which matters on a CPU, and the hull is already close.
        learning_rate: one rate for everything, or [geometry, material and light].
        lr_decay: learning-rate factor reached at the last iteration (upstream: 10^(-0.0002·iter) = 0.1 at 5000).
        sdf_regularizer: weight of the SDF sign regulariser at the start (decays to 0.01 over the first 25 %).
        kd_smooth: weight of the kd smoothness regulariser (pass 1).
        occlusion_reg: weight of the occlusion regulariser.
        light_reg: weight of the light's white-balance regulariser.
        laplace: ``relative`` (to the pass-1 mesh) or ``absolute`` Laplacian in pass 2.
        laplace_scale: weight of the Laplacian regulariser in pass 2.
        kd_min, kd_max, ks_min, ks_max, nrm_min, nrm_max: material channel ranges (ks = occlusion, roughness,
            metalness).
        env_res: resolution of each face of the learnable environment cube map.
        env_scale: scale of the initial random environment.
        learn_light: optimise the light (else a constant environment of ``env_scale``).
        lock_pos: keep vertex positions fixed in pass 2.
        loss: ``logl1``, ``l1`` or ``mse`` on colour.
        background: ``random`` (training, as upstream), ``white``, ``black`` or ``checker``.
        mlp_levels, mlp_log2_table, mlp_max_resolution, mlp_hidden: the material field's hash encoding and MLP.
        min_component_fraction: pass-1 mesh components with fewer faces than this fraction are removed.
        near, far: clip planes.
        seed: random seed (views, backgrounds, initialisation).
        preview_views: views drawn in each pass's preview image.
    """

    iter: int = 5000
    iter_pass2: int | None = None
    batch: int = 1
    train_res: tuple[int, int] = (512, 512)
    texture_res: tuple[int, int] = (1024, 1024)
    dmtet_grid: int = 64
    mesh_scale: float = 2.1
    sdf_init: str = "random"
    sdf_sparse_update: bool = False
    fill_cavities: bool = False
    fill_every: int = 20
    learning_rate: float | tuple[float, float] = 0.01
    lr_decay: float = 0.1
    sdf_regularizer: float = 0.2
    kd_smooth: float = 0.03
    occlusion_reg: float = 0.001
    light_reg: float = 0.005
    laplace: str = "relative"
    laplace_scale: float = 10000.0
    kd_min: tuple[float, float, float] = (0.0, 0.0, 0.0)
    kd_max: tuple[float, float, float] = (1.0, 1.0, 1.0)
    ks_min: tuple[float, float, float] = (0.0, 0.08, 0.0)
    ks_max: tuple[float, float, float] = (1.0, 1.0, 1.0)
    nrm_min: tuple[float, float, float] = (-1.0, -1.0, 0.0)
    nrm_max: tuple[float, float, float] = (1.0, 1.0, 1.0)
    env_res: int = 64
    env_scale: float = 1.0
    learn_light: bool = True
    lock_pos: bool = False
    loss: str = "logl1"
    background: str = "random"
    mlp_levels: int = 16
    mlp_log2_table: int = 19
    mlp_max_resolution: int = 2048
    mlp_hidden: int = 32
    min_component_fraction: float = 0.01
    near: float = 0.1
    far: float = 1000.0
    seed: int = 0
    preview_views: int = 4

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "NvdiffrecConfig":
        """A config from a job-config section; unknown keys are a CONFIG_ERROR naming them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"Unknown nvdiffrec config key(s): {', '.join(unknown)}",
                              f"Known keys: {', '.join(sorted(known))}")
        clean = {}
        for key, value in values.items():
            if isinstance(value, list):
                value = tuple(value)
            clean[key] = value
        config = cls(**clean)
        config.validate()
        return config

    def validate(self) -> None:
        """Range checks with messages naming the key."""
        checks = [
            (self.iter >= 1, "iter must be ≥ 1"),
            (self.iter_pass2 is None or self.iter_pass2 >= 0, "iter_pass2 must be ≥ 0"),
            (self.batch >= 1, "batch must be ≥ 1"),
            (len(self.train_res) == 2 and min(self.train_res) >= 8, "train_res must be [height, width] ≥ 8"),
            (len(self.texture_res) == 2 and min(self.texture_res) >= 16, "texture_res must be [h, w] ≥ 16"),
            (4 <= self.dmtet_grid <= 256, "dmtet_grid must be in 4..256"),
            (self.mesh_scale > 0, "mesh_scale must be positive"),
            (self.loss in ("logl1", "l1", "mse"), "loss must be logl1, l1 or mse"),
            (self.sdf_init in ("random", "sphere", "visual_hull"), "sdf_init must be random, sphere or visual_hull"),
            (self.background in ("random", "white", "black", "checker"),
             "background must be random, white, black or checker"),
            (self.laplace in ("relative", "absolute"), "laplace must be relative or absolute"),
            (0 < self.lr_decay <= 1, "lr_decay must be in (0, 1]"),
            (self.env_res >= 8, "env_res must be ≥ 8"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"nvdiffrec config: {message}", "See configs/recon.yaml for the presets.")

    @property
    def lr_geometry(self) -> float:
        lr = self.learning_rate
        return float(lr[0] if isinstance(lr, (tuple, list)) else lr)

    @property
    def lr_material(self) -> float:
        lr = self.learning_rate
        return float(lr[1] if isinstance(lr, (tuple, list)) else lr)

    @property
    def ranges(self):
        """The channel ranges as a :class:`~workbench.recon.material.MaterialRange`."""
        from workbench.recon.material import MaterialRange

        return MaterialRange(self.kd_min, self.kd_max, self.ks_min, self.ks_max, self.nrm_min, self.nrm_max)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
