"""Ground-truth scene generator and reconstruction metrics."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image
from skimage.metrics import structural_similarity

from workbench.data.synthetic_scenes import (
    OBJECT_EXTENT,
    SHAPES,
    make_shape,
    procedural_albedo,
    render_scene,
    sample_recon,
)
from workbench.errors import ConfigError, InputNotFound
from workbench.io.multiview import load_multiview
from workbench.recon.metrics import (
    chamfer_fscore,
    composite,
    image_metrics,
    normal_consistency,
    psnr,
    sample_surface,
    ssim,
)

SPOT = Path("/work/shared/data/meshes/spot/spot.obj")


# --------------------------------------------------------------------------- scenes


@pytest.mark.parametrize("name", SHAPES)
def test_shapes_are_normalised_closed_and_outward(name):
    mesh = make_shape(name)
    assert mesh.is_watertight
    assert np.max(mesh.extents) == pytest.approx(OBJECT_EXTENT)
    assert np.allclose(mesh.bounds.mean(axis=0), 0.0, atol=1e-9)
    assert mesh.volume > 0  # counter-clockwise seen from outside
    assert mesh.euler_number == (0 if name == "torus" else 2)


def test_procedural_albedo_range_and_determinism():
    pts = np.random.default_rng(0).uniform(-0.5, 0.5, (5000, 3))
    a = procedural_albedo(pts)
    assert a.min() >= 0.15 - 1e-9 and a.max() <= 0.85 + 1e-9
    assert a.std(axis=0).min() > 0.1  # not flat: every channel varies over the object
    assert np.array_equal(a, procedural_albedo(pts))


def test_render_scene_outputs_and_determinism(tmp_path):
    out = sample_recon("torus", None, views=6, res=24, out=tmp_path / "a", test_views=3, seed=5)
    again = sample_recon("torus", None, views=6, res=24, out=tmp_path / "b", test_views=3, seed=5)
    other = sample_recon("torus", None, views=6, res=24, out=tmp_path / "c", test_views=3, seed=6)
    for rel in ("train/r_0.png", "test/r_2.png", "transforms_train.json", "gt_mesh.ply"):
        assert (out / rel).read_bytes() == (again / rel).read_bytes()
    assert (out / "train/r_0.png").read_bytes() != (other / "train/r_0.png").read_bytes()

    scene = json.loads((out / "scene.json").read_text())
    assert scene["shape"] == "torus" and scene["views"] == 6 and scene["seed"] == 5
    assert scene["albedo"]["kind"] == "procedural" and len(scene["lights"]["directional"]) == 3

    rgba = np.asarray(Image.open(out / "train" / "r_0.png"))
    assert rgba.shape == (24, 24, 4) and rgba.dtype == np.uint8
    alpha = rgba[..., 3]
    assert ((alpha > 0) & (alpha < 255)).any()  # antialiased edges
    assert alpha[0, 0] == 0 and alpha.max() == 255

    train = json.loads((out / "transforms_train.json").read_text())
    test = json.loads((out / "transforms_test.json").read_text())
    pos_train = np.array([f["transform_matrix"] for f in train["frames"]])[:, :3, 3]
    pos_test = np.array([f["transform_matrix"] for f in test["frames"]])[:, :3, 3]
    radius = np.linalg.norm(pos_train, axis=1)
    assert np.allclose(radius, scene["camera_radius"])
    assert np.abs(pos_train[:, 1] / radius).max() < 0.999  # never exactly at the poles
    assert np.linalg.norm(pos_train[:, None] - pos_test[None], axis=-1).min() > 1e-3  # a different set

    gt = trimesh.load(out / "gt_mesh.ply")
    assert np.allclose(gt.vertices, make_shape("torus").vertices, atol=1e-6)


def test_sample_recon_argument_errors(tmp_path):
    with pytest.raises(ConfigError, match="Unknown shape"):
        sample_recon("teapot", None, 4, 16, tmp_path)
    with pytest.raises(ConfigError):
        sample_recon(None, None, 4, 16, tmp_path)
    with pytest.raises(ConfigError):
        sample_recon("sphere", tmp_path / "m.obj", 4, 16, tmp_path)
    with pytest.raises(InputNotFound, match="missing.obj"):
        sample_recon(None, tmp_path / "missing.obj", 4, 16, tmp_path)


def test_mesh_without_texture_uses_procedural_albedo(tmp_path):
    path = tmp_path / "box.ply"
    trimesh.creation.box(extents=(2.0, 1.0, 1.0)).export(path)
    out = sample_recon(None, path, views=4, res=16, out=tmp_path / "scene", test_views=1)
    gt = trimesh.load(out / "gt_mesh.ply")
    assert np.max(gt.extents) == pytest.approx(OBJECT_EXTENT)
    assert json.loads((out / "scene.json").read_text())["albedo"]["kind"] == "procedural"


@pytest.mark.skipif(not SPOT.exists(), reason="Spot mesh not present")
def test_textured_mesh_spot(tmp_path):
    out = sample_recon(None, SPOT, views=4, res=32, out=tmp_path / "spot", test_views=1)
    scene = json.loads((out / "scene.json").read_text())
    assert scene["albedo"]["kind"] == "texture" and scene["shape"] == "spot"
    gt = trimesh.load(out / "gt_mesh.ply")
    assert gt.is_watertight  # UV-seam duplicates merged
    ds = load_multiview(out, min_views=4)
    rgb = ds.images[..., :3][ds.images[..., 3] > 0.99]
    assert rgb.std(dim=0).min() > 0.05  # the black/white texture shows


def test_render_scene_accepts_trimesh(tmp_path):
    out = render_scene(trimesh.creation.icosphere(2, radius=3.0), views=4, res=16, out=tmp_path / "s", test_views=0)
    assert len(json.loads((out / "transforms_test.json").read_text())["frames"]) == 0
    assert np.max(trimesh.load(out / "gt_mesh.ply").extents) == pytest.approx(OBJECT_EXTENT)


# --------------------------------------------------------------------------- geometry metrics


def test_sample_surface_uniform_and_seeded():
    mesh = trimesh.creation.box(extents=(1.0, 2.0, 4.0))
    pts, nrm = sample_surface(mesh.vertices, mesh.faces, 20_000, seed=3)
    pts2, _ = sample_surface(mesh.vertices, mesh.faces, 20_000, seed=3)
    assert np.array_equal(pts, pts2)
    assert np.allclose(np.abs(pts).max(axis=0), [0.5, 1.0, 2.0])
    # Area weighting: the two 2x4 faces (x = +-0.5) hold 16 / 28 of the area.
    assert np.mean(np.isclose(np.abs(pts[:, 0]), 0.5)) == pytest.approx(16 / 28, abs=0.02)
    assert np.allclose(np.linalg.norm(nrm, axis=1), 1.0)
    on_x = np.isclose(pts[:, 0], 0.5)
    assert np.allclose(nrm[on_x], [1.0, 0.0, 0.0])  # outward face normals
    tp, tn = sample_surface(torch.tensor(mesh.vertices, dtype=torch.float32), torch.tensor(mesh.faces), 10, seed=3)
    assert isinstance(tp, torch.Tensor) and tp.shape == (10, 3) and tn.dtype == torch.float32


def test_identical_meshes():
    s = trimesh.creation.icosphere(subdivisions=4, radius=0.5)
    m = chamfer_fscore(s.vertices, s.faces, s.vertices, s.faces, n_points=100_000)
    # Independent samplings of both surfaces: the floor is the mean nearest-neighbour
    # spacing, about 0.5 / sqrt(n / area) = 0.003 here.
    assert m["chamfer_l1"] < 0.0035 and m["chamfer_l1_rel"] < 0.002
    assert m["fscore_1"] == pytest.approx(1.0, abs=1e-3) and m["fscore_0.5"] > 0.98
    assert m["normal_consistency"] > 0.99
    assert m["diagonal"] == pytest.approx(math.sqrt(3.0), rel=0.01)
    assert {"precision_0.5", "recall_1", "accuracy", "completeness"} <= set(m)


def test_concentric_spheres_give_the_radius_gap():
    gt = trimesh.creation.icosphere(subdivisions=5, radius=0.5)
    far = trimesh.creation.icosphere(subdivisions=5, radius=0.55)
    m = chamfer_fscore(far.vertices, far.faces, gt.vertices, gt.faces, n_points=30_000)
    assert m["chamfer_l1"] == pytest.approx(0.05, rel=0.05)
    assert m["fscore_0.5"] == 0.0 and m["fscore_1"] == 0.0  # 0.05 > 1 % of the diagonal (0.017)
    assert m["normal_consistency"] > 0.99
    near = trimesh.creation.icosphere(subdivisions=5, radius=0.504)  # gap 0.004 < 0.5 % diagonal (0.0087)
    m = chamfer_fscore(near.vertices, near.faces, gt.vertices, gt.faces, n_points=100_000)
    assert 0.004 < m["chamfer_l1"] < 0.006  # the gap plus the sampling floor
    assert m["fscore_1"] > 0.99 and m["fscore_0.5"] > 0.9


def test_torch_inputs_and_normal_consistency():
    gt = trimesh.creation.icosphere(subdivisions=3, radius=0.5)
    box = trimesh.creation.box(extents=(0.9, 0.9, 0.9))
    a = chamfer_fscore(box.vertices, box.faces, gt.vertices, gt.faces, n_points=5000)
    b = chamfer_fscore(
        torch.tensor(box.vertices), torch.tensor(box.faces), torch.tensor(gt.vertices), torch.tensor(gt.faces), 5000
    )
    assert a == pytest.approx(b)
    assert 0.7 < a["normal_consistency"] < 0.97
    assert normal_consistency(box.vertices, box.faces, gt.vertices, gt.faces, 5000) == pytest.approx(
        a["normal_consistency"]
    )


def test_empty_prediction():
    gt = trimesh.creation.icosphere(subdivisions=2)
    m = chamfer_fscore(np.zeros((0, 3)), np.zeros((0, 3), dtype=np.int64), gt.vertices, gt.faces, n_points=100)
    assert math.isinf(m["chamfer_l1"]) and m["fscore_1"] == 0.0 and m["normal_consistency"] == 0.0


# --------------------------------------------------------------------------- image metrics


def test_psnr_known_mse():
    gt = np.zeros((8, 8, 3))
    assert psnr(gt + 0.1, gt) == pytest.approx(20.0)
    assert psnr(torch.full((4, 4, 3), 0.01), torch.zeros(4, 4, 3)) == pytest.approx(40.0, abs=1e-4)
    assert math.isinf(psnr(gt, gt))


@pytest.mark.parametrize("shape", [(40, 37, 3), (16, 16, 1), (64, 48, 3)])
def test_ssim_matches_skimage(shape):
    rng = np.random.default_rng(sum(shape))
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    base = 0.5 + 0.4 * np.sin(xx / 5.0)[..., None] * np.cos(yy / 7.0)[..., None] * np.ones(shape)
    noisy = np.clip(base + 0.08 * rng.standard_normal(shape), 0, 1)
    ref = structural_similarity(
        base, noisy, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, channel_axis=-1, data_range=1
    )
    assert ssim(base, noisy) == pytest.approx(ref, abs=1e-3)
    assert ssim(torch.tensor(base, dtype=torch.float32), torch.tensor(noisy, dtype=torch.float32)) == pytest.approx(
        ref, abs=1e-3
    )
    assert ssim(base, base) == pytest.approx(1.0)


def test_composite_and_image_metrics():
    rgba = np.zeros((2, 16, 16, 4), dtype=np.float32)
    rgba[..., 0] = 1.0
    rgba[:, 4:12, 4:12, 3] = 1.0
    comp = composite(rgba[0])
    assert np.allclose(comp[0, 0], [1, 1, 1]) and np.allclose(comp[8, 8], [1, 0, 0])
    assert torch.allclose(composite(torch.tensor(rgba[0]), (0, 0, 0))[8, 8], torch.tensor([1.0, 0, 0]))

    same = image_metrics(list(rgba), list(rgba))
    assert math.isinf(same["psnr"]) and same["ssim"] == pytest.approx(1.0) and same["n_views"] == 2

    pred = torch.tensor(rgba).clone()
    pred[1, ..., 3] = 0.0  # second view: nothing predicted -> white instead of the red square
    m = image_metrics(pred, torch.tensor(rgba))
    assert math.isinf(m["psnr_per_view"][0]) and m["psnr_per_view"][1] < 10
    # 64 of 256 pixels differ by (0, 1, 1) in sRGB: MSE = 0.25 * 2 / 3.
    assert m["psnr_per_view"][1] == pytest.approx(10 * math.log10(1 / (0.25 * 2 / 3)), abs=1e-4)
    assert m["ssim_per_view"][1] < 0.9
