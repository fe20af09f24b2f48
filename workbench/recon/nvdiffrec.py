"""nvdiffrec, reimplemented: triangle mesh, materials and lighting from posed images with masks.

The method of Munkberg et al., "Extracting Triangular 3D Models, Materials, and
Lighting From Images" (CVPR 2022), written for the workbench from the paper
(the upstream code is under a non-commercial licence and is not used):

* **Pass 1 (DMTet).** A signed distance and a bounded vertex offset per vertex
  of a tetrahedral grid (:mod:`workbench.recon.dmtet`); marching tetrahedra
  turns them into a triangle mesh, differentiably.  The material is a
  volumetric field (:class:`~workbench.recon.material.MaterialMLP`).
* **Rendering.** Rasterise → interpolate → shade (PBR with a learnable
  environment map and the split-sum approximation,
  :mod:`workbench.recon.render.light`) → antialias, which gives the
  silhouette gradients (:mod:`workbench.recon.render.raster`).
* **Loss.** log-L1 on colour masked by the reference alpha, composited over a
  random background, plus alpha MSE; regularisers: SDF sign (0.2 → 0.01 over
  the first quarter), kd smoothness, occlusion and light white balance.
  Adam with upstream's exponential learning-rate decay.
* **Pass 2.** The pass-1 mesh (small floating pieces removed) is unwrapped with
  xatlas, the material field is baked into kd / ks / normal textures, and
  vertices, textures and light are refined with a Laplacian regulariser
  relative to the pass-1 mesh.
* **Export.** Upstream's layout (``mesh.obj``, ``mesh.mtl``, ``texture_kd.png``,
  ``texture_ks.png``, ``texture_n.png``, ``probe.hdr``) plus ``mesh.ply`` with
  the base colour baked into vertex colours.

Config keys follow upstream's names (:class:`NvdiffrecConfig`); the presets
``cpu``, ``default`` and ``paper`` live in ``configs/recon.yaml``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from workbench.errors import ReconstructionFailed
from workbench.io.multiview import linear_to_srgb
from workbench.recon import dmtet
from workbench.recon import mesh as meshes
from workbench.recon.material import MaterialMLP, TextureMaterial, bake_textures
from workbench.recon.nvdiffrec_config import NvdiffrecConfig
from workbench.recon.render import light as lights
from workbench.recon.render.raster import backend

ProgressFn = Callable[[float, str], None]


@dataclass
class SurfaceMesh:
    """A triangle mesh ready to render.

    Attributes:
        verts: [V, 3] positions (of the UV-split vertices when ``uvs`` is set).
        faces: [F, 3] triangles over ``verts``.
        uvs: [V, 2] texture coordinates, or None (pass 1).
        tangents: [V, 3] tangents for the normal map, or None.
    """

    verts: torch.Tensor
    faces: torch.Tensor
    uvs: torch.Tensor | None = None
    tangents: torch.Tensor | None = None
    normals: torch.Tensor | None = None

    def with_normals(self) -> "SurfaceMesh":
        if self.normals is None:
            self.normals = meshes.vertex_normals(self.verts, self.faces)
        return self


# --------------------------------------------------------------------------- rendering
def srgb_from_linear(x: torch.Tensor) -> torch.Tensor:
    """The sRGB transfer function, clamped at 0 but not at 1 (the HDR tonemap needs values above 1).

    For 8-bit images use :func:`workbench.io.multiview.linear_to_srgb`, which clamps to [0, 1].
    """
    x = x.clamp(min=0.0)
    return torch.where(x <= 0.0031308, 12.92 * x, 1.055 * x.clamp(min=0.0031308) ** (1 / 2.4) - 0.055)


def tonemap_log_srgb(x: torch.Tensor) -> torch.Tensor:
    """nvdiffrec's ``logl1`` tonemap: sRGB of log(1 + x)."""
    return srgb_from_linear(torch.log(x.clamp(0.0, 65535.0) + 1.0))


def image_loss(rendered: torch.Tensor, reference: torch.Tensor, kind: str) -> torch.Tensor:
    """Colour loss between linear images (``logl1``, ``l1`` or ``mse``)."""
    if kind == "logl1":
        return (tonemap_log_srgb(rendered) - tonemap_log_srgb(reference)).abs().mean()
    if kind == "l1":
        return (rendered - reference).abs().mean()
    return ((rendered - reference) ** 2).mean()


def make_background(kind: str, batch: int, height: int, width: int, device, generator=None) -> torch.Tensor:
    """Background images [B, H, W, 3] in linear colour."""
    if kind == "random":
        return torch.rand(batch, height, width, 3, device=device, generator=generator)
    if kind == "white":
        return torch.ones(batch, height, width, 3, device=device)
    if kind == "black":
        return torch.zeros(batch, height, width, 3, device=device)
    yy, xx = torch.meshgrid(torch.arange(height, device=device), torch.arange(width, device=device), indexing="ij")
    checks = (((yy // 8) + (xx // 8)) % 2).float() * 0.5 + 0.25
    return checks[None, ..., None].expand(batch, height, width, 3).contiguous()


def render(surface: SurfaceMesh, material: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor],
           light: lights.EnvironmentLight, mvp: torch.Tensor, campos: torch.Tensor,
           resolution: tuple[int, int], background: torch.Tensor, raster=None,
           with_buffers: bool = False) -> dict[str, torch.Tensor]:
    """Render ``surface`` from B cameras.

    Args:
        surface: the mesh (normals filled in if missing).
        material: ``material(points [N, 3], uv [N, 2] | None) → [N, 9]`` (kd, ks, tangent-space normal),
            called on covered pixels only.
        light: the environment (``build_mips`` already called).
        mvp: [B, 4, 4] clip-from-world matrices; campos: [B, 3] camera centres.
        resolution: (height, width).
        background: [B, H, W, 3] linear colour behind the object.
        raster: rasteriser backend (default: :func:`~workbench.recon.render.raster.backend` of the device).

    Returns:
        ``rgb`` [B, H, W, 3] linear, antialiased; ``alpha`` [B, H, W, 1]; with ``with_buffers`` also ``kd``,
        ``ks``, ``mask``, ``points`` (covered-pixel world positions) for the regularisers.
    """
    raster = raster or backend(surface.verts.device)
    surface.with_normals()
    verts_h = torch.cat([surface.verts, torch.ones_like(surface.verts[:, :1])], dim=-1)
    pos_clip = torch.einsum("bij,vj->bvi", mvp, verts_h).contiguous()
    rast = raster.rasterize(pos_clip, surface.faces, resolution)
    mask = rast[..., 3] > 0
    gb_pos = raster.interpolate(surface.verts[None], rast, surface.faces)
    gb_nrm = meshes.safe_normalize(raster.interpolate(surface.normals[None], rast, surface.faces))
    points = gb_pos[mask]
    uv = raster.interpolate(surface.uvs[None], rast, surface.faces)[mask] if surface.uvs is not None else None
    values = material(points, uv)
    kd, ks, tangent_normal = values[:, 0:3], values[:, 3:6], values[:, 6:9]
    normal = gb_nrm[mask]
    view = meshes.safe_normalize(campos[:, None, None, :].expand_as(gb_pos)[mask] - points)
    normal = torch.where(((normal * view).sum(-1, keepdim=True) < 0), -normal, normal)  # two-sided
    if surface.tangents is not None:
        tangent = meshes.safe_normalize(raster.interpolate(surface.tangents[None], rast, surface.faces)[mask])
        tangent = meshes.safe_normalize(tangent - normal * (tangent * normal).sum(-1, keepdim=True))
        bitangent = torch.cross(normal, tangent, dim=-1)
        t_n = meshes.safe_normalize(tangent_normal)
        normal = meshes.safe_normalize(tangent * t_n[:, 0:1] + bitangent * t_n[:, 1:2] + normal * t_n[:, 2:3])
    shaded = light.shade(points[None, None], normal[None, None], kd[None, None], ks[None, None],
                         _campos_per_point(campos, mask)[None, None])[0, 0]
    rgb = background.clone()
    rgb[mask] = shaded
    alpha = mask[..., None].float()
    out = raster.antialias(torch.cat([rgb, alpha], dim=-1).contiguous(), rast, pos_clip, surface.faces)
    result = {"rgb": out[..., :3], "alpha": out[..., 3:4]}
    if with_buffers:
        result.update(kd=kd, ks=ks, mask=mask, points=points)
    return result


def _campos_per_point(campos: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    batch_index = torch.nonzero(mask)[:, 0]
    return campos[batch_index]


# --------------------------------------------------------------------------- optimisation
@dataclass
class PassLog:
    """What one pass did (for ``metrics.json``)."""

    name: str
    iterations: int = 0
    seconds: float = 0.0
    final_loss: float = float("nan")
    loss_curve: list[tuple[int, float]] = field(default_factory=list)


class Nvdiffrec:
    """An nvdiffrec reconstruction bound to a config and a device (what ``setup_nvdiffrec`` returns)."""

    def __init__(self, config: NvdiffrecConfig, device: str = "cpu") -> None:
        self.config = config
        self.device = torch.device(device)
        self.raster = backend(self.device)

    # ----------------------------------------------------------------- data
    def _views(self, dataset) -> dict[str, torch.Tensor]:
        cfg = self.config
        images = dataset.images.to(self.device)
        height, width = images.shape[1:3]
        if (height, width) != tuple(cfg.train_res):
            images = torch.nn.functional.interpolate(images.permute(0, 3, 1, 2), size=tuple(cfg.train_res),
                                                     mode="area").permute(0, 2, 3, 1).contiguous()
        return {"images": images, "mvp": dataset.mvp(cfg.near, cfg.far).to(self.device).float(),
                "campos": dataset.campos.to(self.device).float()}

    def _lr_lambda(self, total: int) -> Callable[[int], float]:
        decay = math.log10(self.config.lr_decay)
        return lambda it: 10.0 ** (decay * min(it, total) / max(total, 1))

    def _render_batch(self, views: dict[str, torch.Tensor], surface: SurfaceMesh, material, light,
                      gen: torch.Generator) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Render ``batch`` random views over random backgrounds; return the buffers and the image loss.

        The loss is upstream's: colour loss where the reference is covered (both over the same
        background) plus alpha MSE.
        """
        cfg = self.config
        height, width = cfg.train_res
        idx = torch.randint(0, len(views["images"]), (cfg.batch,), generator=gen).to(self.device)
        background = make_background(cfg.background, cfg.batch, height, width, self.device,
                                     gen if self.device.type == "cpu" else None)
        ref = views["images"][idx]
        ref_alpha = ref[..., 3:4]
        target = ref[..., :3] * ref_alpha + background * (1 - ref_alpha)
        out = render(surface, material, light, views["mvp"][idx], views["campos"][idx], (height, width),
                     background, self.raster, with_buffers=True)
        loss = image_loss(out["rgb"] * ref_alpha, target * ref_alpha, cfg.loss)
        return out, loss + torch.nn.functional.mse_loss(out["alpha"], ref_alpha)

    def _check_loss(self, loss: torch.Tensor, pass_name: str, iteration: int) -> None:
        if not torch.isfinite(loss):
            raise ReconstructionFailed(
                f"The loss became {loss.item()} in {pass_name} at iteration {iteration}",
                "Lower learning_rate (e.g. --set nvdiffrec.learning_rate=[0.003,0.005]) or check the images and "
                "cameras for NaN/inf values.")

    # ----------------------------------------------------------------- pass 1
    def pass1(self, views: dict[str, torch.Tensor], progress: ProgressFn, log: PassLog,
              preview: Callable[[SurfaceMesh, Callable, str], None] | None = None):
        """DMTet: optimise SDF, offsets, material field and light; return (mesh, material field, light)."""
        cfg = self.config
        gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
        grid_verts, tets = dmtet.tet_grid(cfg.dmtet_grid, cfg.mesh_scale, device=self.device)
        boundary = dmtet.boundary_vertices(grid_verts, cfg.mesh_scale)
        edges = dmtet.tet_edges(tets)
        if cfg.sdf_init == "sphere":
            initial = 0.3 * cfg.mesh_scale - grid_verts.norm(dim=-1)
        elif cfg.sdf_init == "visual_hull":
            initial = visual_hull_sdf(grid_verts, cfg.dmtet_grid, cfg.mesh_scale, views["images"][..., 3],
                                      views["mvp"])
        else:
            initial = (torch.rand(len(grid_verts), generator=gen) - 0.1).to(self.device)
        sdf = torch.nn.Parameter(initial.clone())
        deform = torch.nn.Parameter(torch.zeros_like(grid_verts))
        half = cfg.mesh_scale / 2
        field_ = MaterialMLP(([-half] * 3, [half] * 3), cfg.ranges, hidden=cfg.mlp_hidden, levels=cfg.mlp_levels,
                             log2_table=cfg.mlp_log2_table, max_resolution=cfg.mlp_max_resolution).to(self.device)
        light = self._new_light()
        params_mat = list(field_.parameters()) + (list(light.parameters()) if cfg.learn_light else [])
        optimizer = torch.optim.Adam([{"params": [sdf, deform], "lr": cfg.lr_geometry},
                                      {"params": params_mat, "lr": cfg.lr_material}])
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self._lr_lambda(cfg.iter))
        max_offset = 1.0 / cfg.dmtet_grid

        def surface() -> SurfaceMesh:
            sdf_fixed = torch.where(boundary, -sdf.abs().clamp(min=1e-3), sdf)  # closed at the grid's edge
            verts, faces = dmtet.marching_tets(grid_verts + max_offset * torch.tanh(deform), sdf_fixed, tets)
            return SurfaceMesh(verts, faces)

        def material(points, uv):
            return field_(points)

        start = time.perf_counter()
        for it in range(cfg.iter):
            mesh = surface()
            if len(mesh.faces) == 0:
                raise ReconstructionFailed(
                    f"The surface vanished in pass 1 (DMTet) at iteration {it}: no triangles left",
                    "Check that the masks show the object and the cameras look at it; a larger mesh_scale or a "
                    "lower learning_rate may help.")
            if cfg.learn_light or it == 0:
                light.build_mips()
            out, loss = self._render_batch(views, mesh, material, light, gen)
            t = it / cfg.iter
            sdf_weight = cfg.sdf_regularizer - (cfg.sdf_regularizer - 0.01) * min(1.0, 4.0 * t)
            reg = sdf_weight * dmtet.sdf_sign_regularizer(sdf, edges)
            ramp = min(1.0, it / 500)
            if cfg.kd_smooth > 0 and len(out["points"]):
                jitter = out["points"] + torch.randn(out["points"].shape, generator=gen).to(self.device) * 0.01
                kd_jitter = field_(jitter)[:, 0:3]
                reg = reg + cfg.kd_smooth * ramp * (kd_jitter - out["kd"]).abs().mean()
            if len(out["ks"]):
                reg = reg + cfg.occlusion_reg * ramp * out["ks"][:, 0].mean()
            if cfg.learn_light:
                reg = reg + cfg.light_reg * light.regularizer()
            total = loss + reg
            self._check_loss(total, "pass 1 (DMTet)", it)
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            if cfg.sdf_sparse_update:
                frozen = (sdf.grad == 0) & (deform.grad == 0).all(-1)
                before = (sdf.detach().clone(), deform.detach().clone())
            optimizer.step()
            if cfg.sdf_sparse_update:
                _restore(optimizer, (sdf, deform), before, frozen)
            scheduler.step()
            light.clamp_(min=0.0)
            if cfg.fill_cavities and (it % cfg.fill_every == 0 or it == cfg.iter - 1):
                fill_cavities_(sdf, edges, boundary)
            log.iterations = it + 1
            if it % max(1, cfg.iter // 50) == 0 or it == cfg.iter - 1:
                log.loss_curve.append((it, float(loss.detach())))
                progress((it + 1) / cfg.iter,
                         f"pass 1 (DMTet): iteration {it + 1}/{cfg.iter}, loss {log.loss_curve[-1][1]:.4f}")
        log.seconds = time.perf_counter() - start
        log.final_loss = log.loss_curve[-1][1] if log.loss_curve else float("nan")
        with torch.no_grad():
            mesh = surface()
        if len(mesh.faces) == 0:
            raise ReconstructionFailed(
                f"Pass 1 (DMTet) ended after {cfg.iter} iterations with an empty surface",
                "Check the masks and cameras (the object must be inside the grid: mesh_scale), or lower the "
                "learning rate.")
        verts, faces = meshes.keep_large_components(mesh.verts.detach(), mesh.faces, cfg.min_component_fraction)
        clean = SurfaceMesh(verts.contiguous(), faces.contiguous())
        if preview is not None:
            preview(clean, material, light, "pass1")
        return clean, field_, light

    def _new_light(self) -> lights.EnvironmentLight:
        cfg = self.config
        if cfg.learn_light:
            return lights.create_trainable_env(cfg.env_res, scale=0.5 * cfg.env_scale, bias=0.25 * cfg.env_scale,
                                               device=self.device)
        light = lights.create_trainable_env(cfg.env_res, scale=0.0, bias=cfg.env_scale, device=self.device)
        light.base.requires_grad_(False)
        return light

    # ----------------------------------------------------------------- pass 2
    def pass2(self, views: dict[str, torch.Tensor], base: SurfaceMesh, field_: MaterialMLP,
              light: lights.EnvironmentLight, progress: ProgressFn, log: PassLog,
              preview: Callable | None = None):
        """Fixed topology: UV unwrap, bake, then optimise vertices, textures and light."""
        cfg = self.config
        gen = torch.Generator(device="cpu").manual_seed(cfg.seed + 1)
        verts_np = base.verts.detach().cpu().numpy()
        faces_np = base.faces.cpu().numpy()
        vmapping, uv_faces_np, uvs_np = meshes.unwrap_uv(verts_np, faces_np)
        vmapping = torch.as_tensor(np.asarray(vmapping, dtype=np.int64), device=self.device)
        uv_faces = torch.as_tensor(np.asarray(uv_faces_np, dtype=np.int64), device=self.device)
        uvs = torch.as_tensor(np.asarray(uvs_np, dtype=np.float32), device=self.device)
        textures, _ = bake_textures(field_, base.verts[vmapping], uvs, uv_faces, tuple(cfg.texture_res), self.raster)
        tex = TextureMaterial(textures[..., 0:3], textures[..., 3:6], textures[..., 6:9], cfg.ranges)
        ref_verts = base.verts.detach().clone()
        verts = torch.nn.Parameter(ref_verts.clone(), requires_grad=not cfg.lock_pos)
        geometry_faces = vmapping[uv_faces]  # the same triangles over the unique vertices
        lap = meshes.laplacian_uniform(len(ref_verts), geometry_faces)
        groups = [{"params": list(tex.parameters()), "lr": cfg.lr_material}]
        if cfg.learn_light:
            groups.append({"params": list(light.parameters()), "lr": cfg.lr_material})
        if not cfg.lock_pos:
            groups.append({"params": [verts], "lr": cfg.lr_geometry})
        optimizer = torch.optim.Adam(groups)
        n_iter = cfg.iter if cfg.iter_pass2 is None else cfg.iter_pass2
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self._lr_lambda(max(n_iter, 1)))

        def surface() -> SurfaceMesh:
            normals = meshes.vertex_normals(verts, geometry_faces)[vmapping]
            split = verts[vmapping]
            tangents = meshes.compute_tangents(split, uv_faces, uvs, uv_faces, normals)
            return SurfaceMesh(split, uv_faces, uvs=uvs, tangents=tangents, normals=normals)

        def material(points, uv):
            return tex.sample(uv[None, None], self.raster.texture)[0, 0]

        start = time.perf_counter()
        for it in range(n_iter):
            if cfg.learn_light or it == 0:
                light.build_mips()
            out, loss = self._render_batch(views, surface(), material, light, gen)
            reg = cfg.occlusion_reg * out["ks"][:, 0].mean() if len(out["ks"]) else loss.new_zeros(())
            if cfg.learn_light:
                reg = reg + cfg.light_reg * light.regularizer()
            if not cfg.lock_pos:
                reference = ref_verts if cfg.laplace == "relative" else torch.zeros_like(ref_verts)
                reg = reg + cfg.laplace_scale * (1 - it / max(n_iter, 1)) * \
                    meshes.laplacian_loss(verts, reference, geometry_faces, lap)
            total = loss + reg
            self._check_loss(total, "pass 2 (textures)", it)
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            scheduler.step()
            tex.clamp_()
            light.clamp_(min=0.0)
            log.iterations = it + 1
            if it % max(1, n_iter // 50) == 0 or it == n_iter - 1:
                log.loss_curve.append((it, float(loss.detach())))
                progress((it + 1) / n_iter,
                         f"pass 2 (textures): iteration {it + 1}/{n_iter}, loss {log.loss_curve[-1][1]:.4f}")
        log.seconds = time.perf_counter() - start
        log.final_loss = log.loss_curve[-1][1] if log.loss_curve else float("nan")
        with torch.no_grad():
            final = surface()
            light.build_mips()
        if preview is not None:
            preview(final, material, light, "pass2")
        return final, tex, light, geometry_faces, verts.detach(), vmapping

    # ----------------------------------------------------------------- the whole job
    def reconstruct(self, dataset, out_dir: str | Path, progress: ProgressFn | None = None) -> dict[str, Any]:
        """Run both passes on ``dataset`` (:class:`~workbench.io.multiview.MultiViewDataset`) and export.

        Writes into ``out_dir``: ``mesh.obj``, ``mesh.mtl``, ``texture_kd.png``, ``texture_ks.png``,
        ``texture_n.png``, ``probe.hdr``, ``mesh.ply``, ``preview_pass1.png``, ``preview_pass2.png``,
        ``config.json``; returns the training figures (for ``metrics.json``).
        """
        cfg = self.config
        progress = progress or (lambda fraction, message="": None)
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg.seed)
        views = self._views(dataset)
        n_pass2 = cfg.iter if cfg.iter_pass2 is None else cfg.iter_pass2
        share1 = cfg.iter / max(cfg.iter + n_pass2, 1)
        preview_idx = torch.linspace(0, len(views["images"]) - 1, min(cfg.preview_views, len(views["images"])))
        preview_idx = preview_idx.round().long().to(self.device)

        def preview(surface, material, light, name):
            write_preview(out_dir / f"preview_{name}.png", surface, material, light, views, preview_idx,
                          tuple(cfg.train_res), self.raster)

        log1, log2 = PassLog("pass1"), PassLog("pass2")
        base, field_, light = self.pass1(views, lambda f, m: progress(share1 * f, m), log1, preview)
        progress(share1, f"pass 1 done: {len(base.verts)} vertices, {len(base.faces)} triangles")
        final, tex, light, geometry_faces, unique_verts, vmapping = self.pass2(
            views, base, field_, light, lambda f, m: progress(share1 + (1 - share1) * f, m), log2, preview)
        export(out_dir, final, tex, light, unique_verts, geometry_faces, vmapping, self.raster)
        (out_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        verts_np, faces_np = unique_verts.cpu().numpy(), geometry_faces.cpu().numpy()
        return {
            "passes": {log.name: {"iterations": log.iterations, "seconds": round(log.seconds, 2),
                                  "final_loss": log.final_loss, "loss_curve": log.loss_curve}
                       for log in (log1, log2)},
            "vertices": int(len(verts_np)), "triangles": int(len(faces_np)),
            "watertight": bool(meshes.is_watertight(faces_np)),
            "euler_characteristic": int(meshes.euler_characteristic(verts_np, faces_np)),
            "device": str(self.device),
        }


def visual_hull_sdf(grid_verts: torch.Tensor, resolution: int, scale: float, alpha: torch.Tensor,
                    mvp: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """A signed distance (inside > 0) to the visual hull of the masks, on the tet grid's vertices.

    A grid point is inside the hull when every view that sees it shows it inside the mask.  The distance
    to the hull's boundary comes from a Euclidean distance transform of the vertex lattice.

    Args:
        grid_verts: [(R+1)³, 3] lattice vertices in :func:`~workbench.recon.dmtet.tet_grid`'s order.
        resolution: R; scale: the grid's edge length.
        alpha: [N, H, W] masks; mvp: [N, 4, 4] clip-from-world matrices.
    """
    from scipy import ndimage

    height, width = alpha.shape[1:]
    inside = torch.ones(len(grid_verts), dtype=torch.bool, device=grid_verts.device)
    verts_h = torch.cat([grid_verts, torch.ones_like(grid_verts[:, :1])], dim=-1)
    for view in range(len(mvp)):
        clip = verts_h @ mvp[view].T
        w = clip[:, 3]
        col = ((clip[:, 0] / w + 1) * 0.5 * width).floor().long()
        row = ((clip[:, 1] / w + 1) * 0.5 * height).floor().long()
        seen = (w > 0) & (col >= 0) & (col < width) & (row >= 0) & (row < height)
        in_mask = torch.zeros_like(inside)
        in_mask[seen] = alpha[view, row[seen], col[seen]] > threshold
        inside &= in_mask | ~seen
    n = resolution + 1
    occupied = inside.reshape(n, n, n).cpu().numpy()
    cell = scale / resolution
    distance = np.where(occupied, ndimage.distance_transform_edt(occupied),
                        -ndimage.distance_transform_edt(~occupied)) * cell
    # the hull's boundary lies between lattice points: shift so that it sits halfway
    distance = distance - np.sign(distance) * 0.5 * cell
    return torch.from_numpy(distance.reshape(-1).astype(np.float32)).to(grid_verts.device)


def fill_cavities_(sdf: torch.Tensor, edges: torch.Tensor, boundary: torch.Tensor) -> int:
    """Set inside (positive) the outside grid values that no path of outside values links to the boundary.

    The object is seen from outside only, so such pockets are never in a view; left alone they become
    interior shells and handles.  Returns how many values were flipped.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    with torch.no_grad():
        outside = (sdf <= 0).cpu().numpy()
        e = edges.cpu().numpy()
        keep = outside[e[:, 0]] & outside[e[:, 1]]
        n = len(outside)
        graph = coo_matrix((np.ones(int(keep.sum()), dtype=np.int8), (e[keep, 0], e[keep, 1])), shape=(n, n))
        _, label = connected_components(graph, directed=False)
        reached = np.unique(label[boundary.cpu().numpy() & outside])
        pocket = outside & ~np.isin(label, reached)
        if pocket.any():
            idx = torch.from_numpy(np.nonzero(pocket)[0]).to(sdf.device)
            sdf[idx] = sdf[idx].abs().clamp(min=1e-3)
        return int(pocket.sum())


def _restore(optimizer: torch.optim.Optimizer, params, before, frozen: torch.Tensor) -> None:
    """Undo the step of grid values that had no gradient and clear their Adam momentum (sparse updates)."""
    with torch.no_grad():
        for param, old in zip(params, before):
            param[frozen] = old[frozen]
            state = optimizer.state.get(param, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key][frozen] = 0


# --------------------------------------------------------------------------- output
def write_preview(path: Path, surface: SurfaceMesh, material, light, views, idx, resolution, raster) -> None:
    """Rendered views over white beside their references (sRGB PNG): the per-pass preview image."""
    from PIL import Image

    with torch.no_grad():
        background = torch.ones(len(idx), *resolution, 3, device=surface.verts.device)
        out = render(surface, material, light, views["mvp"][idx], views["campos"][idx], resolution,
                     background, raster)
        ref = views["images"][idx]
        ref_rgb = ref[..., :3] * ref[..., 3:4] + (1 - ref[..., 3:4])
        rows = torch.cat([torch.cat(list(out["rgb"]), dim=1), torch.cat(list(ref_rgb), dim=1)], dim=0)
        img = (linear_to_srgb(rows) * 255 + 0.5).byte().cpu().numpy()
    Image.fromarray(img).save(path)


def export(out_dir: Path, surface: SurfaceMesh, tex: TextureMaterial, light: lights.EnvironmentLight,
           unique_verts: torch.Tensor, geometry_faces: torch.Tensor, vmapping: torch.Tensor, raster) -> None:
    """Write upstream's layout plus ``mesh.ply`` with the base colour as vertex colours."""
    with torch.no_grad():
        kd = tex.kd[0].clamp(0, 1)
        textures = {
            "kd": linear_to_srgb(kd).cpu().numpy(),
            "ks": tex.ks[0].clamp(0, 1).cpu().numpy(),
            "n": (meshes.safe_normalize(tex.normal[0]) * 0.5 + 0.5).clamp(0, 1).cpu().numpy(),
        }
        normals = surface.normals if surface.normals is not None else meshes.vertex_normals(surface.verts,
                                                                                         surface.faces)
        meshes.write_obj(out_dir, surface.verts.cpu().numpy(), surface.faces.cpu().numpy(),
                         surface.uvs.cpu().numpy(), normals.cpu().numpy(), textures=textures)
        lights.save_probe_hdr(light, out_dir / "probe.hdr")
        # Base colour per UV-split vertex, averaged onto the unique vertices for the PLY
        kd_split = raster.texture(tex.kd, surface.uvs[None, None], filter_mode="linear",
                                  boundary_mode="clamp")[0, 0]
        kd_unique = torch.zeros(len(unique_verts), 3, device=kd_split.device)
        counts = torch.zeros(len(unique_verts), 1, device=kd_split.device)
        kd_unique.index_add_(0, vmapping, kd_split)
        counts.index_add_(0, vmapping, torch.ones_like(kd_split[:, :1]))
        colours = linear_to_srgb(kd_unique / counts.clamp(min=1))
        meshes.write_ply(out_dir / "mesh.ply", unique_verts.cpu().numpy(), geometry_faces.cpu().numpy(),
                         (colours.cpu().numpy() * 255 + 0.5).astype(np.uint8))


def setup_nvdiffrec(config: NvdiffrecConfig, device: str = "cpu") -> Nvdiffrec:
    """Registry ``setup``: an :class:`Nvdiffrec` for the config on ``device``."""
    config.validate()
    return Nvdiffrec(config, device)
