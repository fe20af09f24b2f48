"""Ground-truth multi-view scenes for testing the reconstruction pipeline.

A known mesh (a procedural shape or an OBJ such as Spot) is normalised to fit a
unit box centred at the origin and ray-cast from cameras on a sphere, giving a
NeRF-synthetic folder that :func:`workbench.io.multiview.load_multiview` reads::

    out/
      transforms_train.json, transforms_test.json   cameras (OpenGL c2w, camera_angle_x)
      train/r_0.png ...  test/r_0.png ...            RGBA 8-bit, sRGB colour, alpha = coverage
      gt_mesh.ply                                    the normalised mesh, in the cameras' frame
      scene.json                                     everything needed to reproduce the scene

The renderer is deliberately independent of the optimiser's rasteriser: embree
ray casting through pixel centres with 2x2 supersampling (antialiased alpha
edges) and Lambertian shading, ``albedo * (ambient + sum_k max(0, n . l_k) c_k)``
with fixed world-space lights and no shadows.  Albedo is the mesh's texture at
the hit point's UV or a smooth procedural colour field of the position.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import trimesh
from PIL import Image

from workbench.errors import ConfigError, InputNotFound, InvalidFormat
from workbench.io.multiview import linear_to_srgb, srgb_to_linear

SHAPES = ("sphere", "torus", "blob", "box")
FOVY_DEG = 45.0
SUPERSAMPLE = 2

#: Lights in world space: linear-RGB ambient term and (direction towards the light, colour) pairs.
AMBIENT = (0.22, 0.22, 0.24)
LIGHTS = (
    ((0.45, 0.75, 0.50), (0.75, 0.72, 0.66)),  # key, warm white, from above front-right
    ((-0.80, 0.15, 0.35), (0.28, 0.30, 0.36)),  # fill, cool white, from the left
    ((0.10, -0.45, -0.90), (0.20, 0.20, 0.20)),  # rim, from below behind
)

#: Procedural albedo: channel c = 0.5 + 0.35 sin(2 pi f_c (p . d_c) + phase_c), values in [0.15, 0.85].
ALBEDO_DIRECTIONS = ((0.80, 0.50, 0.30), (-0.30, 0.90, 0.40), (0.40, -0.30, 0.90))
ALBEDO_FREQUENCIES = (1.3, 1.7, 1.1)
ALBEDO_PHASES = (0.3, 2.1, 4.0)


# --------------------------------------------------------------------------- shapes
#: Largest extent of a scene's object (scene units), about that of NeRF-synthetic's objects, so that
#: upstream's DMTet box (``mesh_scale`` 2.1, centred at the origin) holds it with a margin.
OBJECT_EXTENT = 1.6


def make_shape(name: str) -> trimesh.Trimesh:
    """A procedural closed mesh, centred at the origin with max extent :data:`OBJECT_EXTENT`.

    Args:
        name: ``"sphere"``, ``"torus"`` (genus 1), ``"blob"`` (smooth bumpy sphere)
            or ``"box"`` (rounded cube, a superellipsoid of exponent 8).

    Returns:
        A watertight ``trimesh.Trimesh`` with outward (counter-clockwise) faces.
    """
    if name == "sphere":
        mesh = trimesh.creation.icosphere(subdivisions=4, radius=0.5)
    elif name == "torus":
        mesh = trimesh.creation.torus(major_radius=0.35, minor_radius=0.15, major_sections=96, minor_sections=48)
    elif name == "blob":
        mesh = trimesh.creation.icosphere(subdivisions=5, radius=1.0)
        d = mesh.vertices
        bumps = (
            np.sin(3.0 * d[:, 0] + 0.5) * np.cos(2.0 * d[:, 1])
            + 0.6 * np.sin(4.0 * d[:, 2] + 1.0) * np.cos(3.0 * d[:, 0])
            + 0.4 * np.cos(5.0 * d[:, 1] - 0.7)
        )
        mesh = trimesh.Trimesh(d * (1.0 + 0.12 * bumps)[:, None], mesh.faces, process=False)
    elif name == "box":
        mesh = trimesh.creation.icosphere(subdivisions=5, radius=1.0)
        d = mesh.vertices
        r = np.sum(np.abs(d) ** 8, axis=1) ** (-1.0 / 8)  # |x|^8 + |y|^8 + |z|^8 = 1 along each direction
        mesh = trimesh.Trimesh(d * r[:, None], mesh.faces, process=False)
    else:
        raise ConfigError(f"Unknown shape {name!r}", f"Choose one of {', '.join(SHAPES)} or give --mesh PATH.")
    return normalise_mesh(mesh)


def normalise_mesh(mesh: trimesh.Trimesh) -> trimesh.Trimesh:
    """A copy of ``mesh`` with its bounding box centred at the origin and max extent :data:`OBJECT_EXTENT`."""
    mesh = mesh.copy()
    lo, hi = mesh.bounds
    scale = OBJECT_EXTENT / float(np.max(hi - lo))
    transform = np.eye(4)
    transform[:3, :3] *= scale
    transform[:3, 3] = -0.5 * (lo + hi) * scale
    mesh.apply_transform(transform)
    return mesh


def load_textured_mesh(path: str | Path) -> trimesh.Trimesh:
    """Read a mesh file (OBJ with its MTL texture, PLY, ...) as one ``trimesh.Trimesh``."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise InputNotFound(f"Mesh file not found: {path}", "Check the --mesh path (an OBJ with its .mtl and texture).")
    try:
        mesh = trimesh.load(path, force="mesh")
    except Exception as exc:  # trimesh raises many types for unreadable files
        raise InvalidFormat(f"Cannot read mesh {path}: {exc}", "Give a triangle mesh (OBJ, PLY, STL, GLB).") from None
    if not isinstance(mesh, trimesh.Trimesh) or len(mesh.faces) == 0:
        raise InvalidFormat(f"{path} holds no triangles", "Give a triangle mesh (OBJ, PLY, STL, GLB).")
    return mesh


# --------------------------------------------------------------------------- cameras


def fibonacci_directions(n: int, offset: float = 0.0) -> np.ndarray:
    """``n`` unit vectors spread evenly on the sphere (Fibonacci spiral about +Y), [n, 3].

    ``y`` runs over ``1 - 2 (i + 0.5) / n``, so the exact poles (looking straight
    along the up vector) are never used.  ``offset`` rotates the spiral about +Y (radians).
    """
    i = np.arange(n, dtype=np.float64)
    y = 1.0 - 2.0 * (i + 0.5) / n
    r = np.sqrt(np.clip(1.0 - y * y, 0.0, 1.0))
    phi = i * math.pi * (3.0 - math.sqrt(5.0)) + offset
    return np.stack([r * np.cos(phi), y, r * np.sin(phi)], axis=1)


def look_at_c2w(position: np.ndarray, target=(0.0, 0.0, 0.0), up=(0.0, 1.0, 0.0)) -> np.ndarray:
    """OpenGL camera-to-world [4, 4] for a camera at ``position`` looking at ``target`` (camera -Z forward)."""
    position = np.asarray(position, dtype=np.float64)
    z = position - np.asarray(target, dtype=np.float64)
    z /= np.linalg.norm(z)
    x = np.cross(np.asarray(up, dtype=np.float64), z)
    x /= np.linalg.norm(x)
    y = np.cross(z, x)
    c2w = np.eye(4)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = x, y, z, position
    return c2w


def _test_directions(n: int, offset: float) -> np.ndarray:
    """Held-out view directions: a spiral at elevations within +-55 degrees, between the training views."""
    k = np.arange(n, dtype=np.float64)
    elev = np.radians(55.0) * (1.0 - 2.0 * (k + 0.5) / max(n, 1))
    azim = offset + 0.5 + k * 2.0 * math.pi * 3.0 / max(n, 1) + 0.37 * k
    return np.stack([np.cos(elev) * np.cos(azim), np.sin(elev), np.cos(elev) * np.sin(azim)], axis=1)


# --------------------------------------------------------------------------- shading


def procedural_albedo(points: np.ndarray) -> np.ndarray:
    """Smooth deterministic linear-RGB albedo in [0.15, 0.85] for world points [N, 3] -> [N, 3]."""
    d = np.asarray(ALBEDO_DIRECTIONS, dtype=np.float64)
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    arg = 2.0 * math.pi * np.asarray(ALBEDO_FREQUENCIES) * (points @ d.T) + np.asarray(ALBEDO_PHASES)
    return 0.5 + 0.35 * np.sin(arg)


def _sample_texture(image: np.ndarray, uv: np.ndarray) -> np.ndarray:
    """Bilinear, wrapping lookup of an [Ht, Wt, 3] texture at OBJ UVs [N, 2] (v = 0 is the bottom row)."""
    ht, wt = image.shape[:2]
    x = uv[:, 0] * wt - 0.5
    y = (1.0 - uv[:, 1]) * ht - 0.5
    x0, y0 = np.floor(x), np.floor(y)
    fx, fy = (x - x0)[:, None], (y - y0)[:, None]
    x0, y0 = x0.astype(np.int64), y0.astype(np.int64)
    x1, y1 = (x0 + 1) % wt, (y0 + 1) % ht
    x0, y0 = x0 % wt, y0 % ht
    top = image[y0, x0] * (1 - fx) + image[y0, x1] * fx
    bottom = image[y1, x0] * (1 - fx) + image[y1, x1] * fx
    return top * (1 - fy) + bottom * fy


def _texture_of(mesh: trimesh.Trimesh) -> tuple[np.ndarray, np.ndarray] | None:
    """(linear-RGB texture [Ht, Wt, 3], per-vertex UVs [V, 2]) of a textured mesh, else None."""
    visual = getattr(mesh, "visual", None)
    uv = getattr(visual, "uv", None)
    material = getattr(visual, "material", None)
    image = getattr(material, "image", None) if material is not None else None
    if image is None:
        image = getattr(material, "baseColorTexture", None) if material is not None else None
    if uv is None or image is None or len(uv) != len(mesh.vertices):
        return None
    tex = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return srgb_to_linear(tex).astype(np.float64), np.asarray(uv, dtype=np.float64)


def _shade(normals: np.ndarray, albedo: np.ndarray) -> np.ndarray:
    """Lambertian shading with the fixed lights: [N, 3] normals and albedo -> [N, 3] linear RGB."""
    irradiance = np.broadcast_to(np.asarray(AMBIENT, dtype=np.float64), normals.shape).copy()
    for direction, colour in LIGHTS:
        l_dir = np.asarray(direction, dtype=np.float64)
        l_dir /= np.linalg.norm(l_dir)
        irradiance += np.clip(normals @ l_dir, 0.0, None)[:, None] * np.asarray(colour)
    return albedo * irradiance


class _Renderer:
    """Ray casts one normalised mesh; shared by all views of a scene."""

    def __init__(self, mesh: trimesh.Trimesh):
        from trimesh.ray.ray_pyembree import RayMeshIntersector

        self.mesh = mesh
        self.intersector = RayMeshIntersector(mesh)
        self.vertex_normals = np.asarray(mesh.vertex_normals, dtype=np.float64)
        self.texture = _texture_of(mesh)

    def render(self, c2w: np.ndarray, fovy: float, res: int) -> np.ndarray:
        """RGBA float [res, res, 4]: linear RGB (straight, not premultiplied) and coverage alpha."""
        s = SUPERSAMPLE
        n_sub = res * s
        coords = (np.arange(n_sub, dtype=np.float64) + 0.5) / s  # sub-sample centres in pixel units
        ndc = 2.0 * coords / res - 1.0
        ndc_y, ndc_x = np.meshgrid(ndc, ndc, indexing="ij")  # row index = image row (top first)
        t = math.tan(fovy / 2.0)
        dirs_cam = np.stack([ndc_x * t, -ndc_y * t, -np.ones_like(ndc_x)], axis=-1).reshape(-1, 3)
        dirs = dirs_cam @ c2w[:3, :3].T
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
        origins = np.broadcast_to(c2w[:3, 3], dirs.shape)

        tri, ray, loc = self.intersector.intersects_id(origins, dirs, multiple_hits=False, return_locations=True)
        colour = np.zeros((dirs.shape[0], 3))
        hit = np.zeros(dirs.shape[0])
        if len(ray):
            faces = self.mesh.faces[tri]
            bary = trimesh.triangles.points_to_barycentric(self.mesh.triangles[tri], loc)
            normals = np.einsum("nk,nkc->nc", bary, self.vertex_normals[faces])
            normals /= np.linalg.norm(normals, axis=1, keepdims=True).clip(1e-12)
            flip = np.einsum("nc,nc->n", normals, dirs[ray]) > 0  # back faces of open meshes face the camera
            normals[flip] *= -1.0
            if self.texture is not None:
                tex, uv = self.texture
                albedo = _sample_texture(tex, np.einsum("nk,nkc->nc", bary, uv[faces]))
            else:
                albedo = procedural_albedo(loc)
            colour[ray] = _shade(normals, albedo)
            hit[ray] = 1.0
        # Average the s x s sub-samples of each pixel: premultiplied colour and coverage.
        colour = colour.reshape(res, s, res, s, 3).mean(axis=(1, 3))
        alpha = hit.reshape(res, s, res, s).mean(axis=(1, 3))
        rgb = np.where(alpha[..., None] > 0, colour / np.maximum(alpha[..., None], 1e-12), 0.0)
        return np.concatenate([rgb, alpha[..., None]], axis=-1)


def _write_rgba(path: Path, rgba: np.ndarray) -> None:
    srgb = linear_to_srgb(rgba[..., :3].astype(np.float32))
    out = np.concatenate([srgb, rgba[..., 3:4].astype(np.float32)], axis=-1)
    Image.fromarray(np.round(np.clip(out, 0.0, 1.0) * 255.0).astype(np.uint8), mode="RGBA").save(path)


# --------------------------------------------------------------------------- scenes


def render_scene(
    mesh: trimesh.Trimesh,
    views: int = 64,
    res: int = 128,
    out: str | Path = "scene",
    seed: int = 0,
    test_views: int = 16,
    shape: str = "custom",
) -> Path:
    """Render ``mesh`` into a NeRF-synthetic folder (see the module docstring).

    Args:
        mesh: the object; normalised here (bbox centred at the origin, max extent OBJECT_EXTENT).
            A mesh with per-vertex UVs and a texture image is shaded with its texture,
            any other with :func:`procedural_albedo`.
        views: number of training views (Fibonacci sphere).
        res: image width and height in pixels.
        out: output folder (created; existing files of the same names are replaced).
        seed: rotates the camera spirals about +Y; same seed, same scene.
        test_views: number of held-out views (a different spiral).
        shape: name recorded in ``scene.json``.

    Returns:
        The output folder.
    """
    if views < 1 or res < 1 or test_views < 0:
        raise ConfigError(
            f"views={views}, res={res}, test_views={test_views} must be positive", "Use e.g. --views 64 --res 128."
        )
    out = Path(out).expanduser()
    mesh = normalise_mesh(mesh)
    object_radius = float(np.linalg.norm(mesh.vertices, axis=1).max())
    fovy = math.radians(FOVY_DEG)
    # The bounding sphere fills ~87 % of the view: about 3x the object's radius.
    distance = 1.15 * object_radius / math.sin(fovy / 2.0)
    offset = float(np.random.default_rng(seed).uniform(0.0, 2.0 * math.pi))

    renderer = _Renderer(mesh)
    splits = {
        "train": fibonacci_directions(views, offset),
        "test": _test_directions(test_views, offset),
    }
    for split, directions in splits.items():
        (out / split).mkdir(parents=True, exist_ok=True)
        frames = []
        for i, direction in enumerate(directions):
            c2w = look_at_c2w(direction * distance)
            _write_rgba(out / split / f"r_{i}.png", renderer.render(c2w, fovy, res))
            frames.append({"file_path": f"./{split}/r_{i}", "transform_matrix": c2w.tolist()})
        transforms = {"camera_angle_x": fovy, "frames": frames}
        (out / f"transforms_{split}.json").write_text(json.dumps(transforms, indent=2))

    gt = trimesh.Trimesh(mesh.vertices.copy(), mesh.faces.copy(), process=False)
    gt.merge_vertices(merge_tex=True, merge_norm=True)  # textured OBJs split vertices at UV seams
    gt.export(out / "gt_mesh.ply")

    scene = {
        "generator": "workbench.data.synthetic_scenes",
        "shape": shape,
        "views": views,
        "test_views": test_views,
        "res": res,
        "seed": seed,
        "fovy": fovy,
        "camera_angle_x": fovy,
        "camera_radius": distance,
        "camera_offset": offset,
        "object_radius": object_radius,
        "near_far": [max(distance - 1.5 * object_radius, 0.01), distance + 1.5 * object_radius],
        "supersampling": SUPERSAMPLE,
        "lights": {
            "model": "lambert",
            "ambient": list(AMBIENT),
            "directional": [{"direction": list(d), "color": list(c)} for d, c in LIGHTS],
        },
        "albedo": (
            {"kind": "texture"}
            if renderer.texture is not None
            else {
                "kind": "procedural",
                "formula": "0.5 + 0.35 * sin(2 pi f_c (p . d_c / |d_c|) + phase_c)",
                "directions": [list(d) for d in ALBEDO_DIRECTIONS],
                "frequencies": list(ALBEDO_FREQUENCIES),
                "phases": list(ALBEDO_PHASES),
            }
        ),
        "gt_mesh": {"file": "gt_mesh.ply", "vertices": int(len(gt.vertices)), "faces": int(len(gt.faces))},
        "conventions": "OpenGL c2w (camera looks down -Z, +Y up); sRGB RGBA images; object extent 1.6 at the origin",
    }
    (out / "scene.json").write_text(json.dumps(scene, indent=2))
    return out


def sample_recon(
    shape: str | None,
    mesh: str | Path | None,
    views: int,
    res: int,
    out: str | Path,
    test_views: int = 16,
    seed: int = 0,
) -> Path:
    """Write a ground-truth multi-view scene (``workbench data sample recon``).

    Args:
        shape: one of :data:`SHAPES`, or None when ``mesh`` is given.
        mesh: a mesh file (OBJ with texture, e.g. Spot), or None.
        views, res, out, test_views, seed: see :func:`render_scene`.

    Returns:
        The output folder.
    """
    if (shape is None) == (mesh is None):
        raise ConfigError(
            "Give exactly one of a shape name and a mesh file",
            f"Use --shape {{{','.join(SHAPES)}}} or --mesh PATH.",
        )
    if mesh is not None:
        return render_scene(load_textured_mesh(mesh), views, res, out, seed, test_views, shape=Path(mesh).stem)
    return render_scene(make_shape(shape), views, res, out, seed, test_views, shape=shape)


def recon_sample_options(folder: str | Path) -> dict[str, str]:
    """Write the torus sample scene (64 views at 128², 16 test views) into ``folder``, once; return its options."""
    folder = Path(folder)
    if not (folder / "transforms_train.json").is_file():
        sample_recon(shape="torus", mesh=None, views=64, res=128, out=folder, test_views=16)
    return {"images": str(folder)}

