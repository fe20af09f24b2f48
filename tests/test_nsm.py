"""Neural shape models (workbench.knee.nsm): signed distances, model folders, fitting, mirroring, B-score, errors.

Toy models are trained here in a few seconds on ellipsoids (one surface) and on
ellipsoids with a partial shell (two surfaces, from voxel label maps), so the
fit assertions can fail: an unseen shape must be reconstructed clearly better
than the model's mean shape.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import trimesh
from helpers import assert_error

from workbench.errors import ErrorCode, ModelUnavailable
from workbench.knee.nsm import (
    RECON_PARAMS_FILES,
    fit_nsm,
    load_bscore,
    load_nsm,
    run_nsm,
    setup_nsm,
)
from workbench.knee.nsm.model import NsmArchitecture, SdfDecoder, save_nsm
from workbench.knee.nsm.sdf import (
    GridSdf,
    MeshSdf,
    assd,
    mirror_mesh,
    sample_near_surface,
    sample_surface,
)
from workbench.knee.nsm.train import (
    Deformation,
    make_training_shape,
    model_from_training,
    nsm_config,
    random_thickness_factor,
    reference_frame,
    save_trained,
    source_from_labels,
    source_from_meshes,
    train_decoder,
)
from workbench.models import write_metadata
from workbench.registry import REGISTRY, NsmModelConfig

torch.set_num_threads(1)

FIT = {"grid_resolution": 48, "samples_per_surface": 5000, "points_per_iteration": 2000, "max_seconds": 6.0,
       "patience": 30}
REQUIRED_KEYS = {"latent", "Bscore", "icp_transform", "center", "scale", "assd_bone_mm", "assd_cartilage_mm"}


def ellipsoid(t: float, center=(0.0, 0.0, 0.0)) -> trimesh.Trimesh:
    mesh = trimesh.creation.icosphere(4, radius=1.0)
    mesh.vertices = mesh.vertices * np.array([30.0 * (1 + 0.3 * t), 22.0, 18.0 * (1 - 0.2 * t)]) + center
    return mesh


def knee_labels(t: float) -> tuple[np.ndarray, np.ndarray]:
    """A 'femur' ellipsoid (label 7) with a 'cartilage' shell (label 2) over part of it, 1 mm voxels."""
    n = 80
    affine = np.eye(4)
    affine[:3, 3] = -(n - 1) / 2.0
    g = np.stack(np.meshgrid(*[np.arange(n) - (n - 1) / 2.0] * 3, indexing="ij"), axis=-1)
    axes = np.array([26.0 * (1 + 0.25 * t), 20.0, 16.0 * (1 - 0.2 * t)])
    r_in = np.linalg.norm(g / axes, axis=-1)
    r_out = np.linalg.norm(g / (axes + 3.0), axis=-1)
    labels = np.zeros((n, n, n), np.uint8)
    labels[(r_out <= 1.0) & (r_in > 1.0) & (g[..., 2] < -4.0)] = 2
    labels[r_in <= 1.0] = 7
    return labels, affine


def _train(sources, frame, arch, name, surfaces, composition, seconds, seed=0):
    rng = np.random.default_rng(seed)
    shapes = [make_training_shape(s, Deformation(), frame, rng=rng, n_points=6000) for s in sources]
    result = train_decoder(shapes, arch, epochs=2000, max_seconds=seconds, shapes_per_batch=len(shapes),
                           points_per_shape=1024, lr=3e-3, latent_lr=1e-2, composition=composition, seed=seed)
    config = nsm_config(name, surfaces, composition, frame, clamp=0.1, fit=FIT)
    return model_from_training(result, config, frame)


@pytest.fixture(scope="module")
def femur_folder(tmp_path_factory):
    """A one-surface toy ('femur') trained on 7 ellipsoids, written as a model folder."""
    sources = [source_from_meshes([ellipsoid(t)], name=f"e{t:+.2f}") for t in np.linspace(-1, 1, 7)]
    frame = reference_frame(sources[3], None)
    arch = NsmArchitecture(latent_dim=8, hidden_dims=(64,) * 4, skip_layers=(2,), n_outputs=1, init_radius=0.6)
    model = _train(sources, frame, arch, "toy_femur", ["femur"], "independent", seconds=6)
    folder = tmp_path_factory.mktemp("models") / "toy_femur"
    save_trained(folder, model)
    (folder / "model_card.md").write_text("# toy\n")
    write_metadata(folder, name="toy_femur", version="0", licence="MIT", provenance="tests/test_nsm.py")
    return folder


@pytest.fixture(scope="module")
def femur_model(femur_folder):
    return load_nsm(femur_folder, "cpu")


@pytest.fixture(scope="module")
def fitted(femur_model):
    return fit_nsm(femur_model, [ellipsoid(0.5, center=(40.0, -10.0, 5.0))], "right", baseline=True)


@pytest.fixture(scope="module")
def knee_folder(tmp_path_factory):
    """A two-surface toy (femur + cartilage shell, offset composition) trained from voxel label maps."""
    sources = []
    for t in np.linspace(-1, 1, 5):
        labels, affine = knee_labels(t)
        sources.append(source_from_labels(labels, affine, ["femur", "femoral_cartilage"], composition="offset",
                                          name=f"k{t:+.1f}", margin_mm=8.0))
    frame = reference_frame(sources[2], None)
    arch = NsmArchitecture(latent_dim=8, hidden_dims=(64,) * 4, skip_layers=(2,), n_outputs=2, init_radius=0.6)
    model = _train(sources, frame, arch, "toy_knee", ["femur", "femoral_cartilage"], "offset", seconds=6)
    folder = tmp_path_factory.mktemp("models") / "toy_knee"
    save_trained(folder, model)
    return folder


# --------------------------------------------------------------------------------------------------
# signed distances


def test_mesh_sdf_on_a_sphere_has_right_signs_and_magnitudes():
    sphere = trimesh.creation.icosphere(4, radius=20.0)
    rng = np.random.default_rng(0)
    points = rng.normal(size=(3000, 3)) * 15.0
    truth = np.linalg.norm(points, axis=1) - 20.0
    values = MeshSdf(sphere)(points)
    assert np.abs(values - truth).max() < 0.05
    assert np.all(np.sign(values[np.abs(truth) > 0.1]) == np.sign(truth[np.abs(truth) > 0.1]))


def test_grid_sdf_of_a_voxel_ball_is_subvoxel_near_the_surface():
    h = np.array([0.5, 0.5, 0.8])
    n = np.array([100, 100, 64])
    affine = np.diag(list(h) + [1.0])
    affine[:3, 3] = -(n - 1) * h / 2
    ijk = np.stack(np.meshgrid(*[np.arange(k) for k in n], indexing="ij"), axis=-1)
    mask = np.linalg.norm(ijk * h + affine[:3, 3], axis=-1) <= 18.0
    grid = GridSdf.from_mask(mask, affine, margin_mm=5.0)
    rng = np.random.default_rng(1)
    direction = rng.normal(size=(4000, 3))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    radius = 18.0 + rng.uniform(-3.0, 3.0, 4000)
    values = grid(direction * radius[:, None])
    truth = radius - 18.0
    assert np.abs(values - truth).mean() < 0.1  # voxels of 0.5-0.8 mm
    far = np.abs(truth) > 0.6
    assert np.all(np.sign(values[far]) == np.sign(truth[far]))
    # outside the grid: right sign, at least the true distance
    outside = grid(np.array([[0.0, 0.0, 60.0]]))
    assert outside[0] >= 60.0 - 18.0 - 0.5


def test_near_surface_samples_follow_the_noise_scales():
    sphere = trimesh.creation.icosphere(4, radius=20.0)
    rng = np.random.default_rng(2)
    surf, _ = sample_surface(sphere, 4000, rng)
    assert np.allclose(np.linalg.norm(surf, axis=1), 20.0, atol=0.1)
    pts, sdf = sample_near_surface(surf, [MeshSdf(sphere)], rng, n_near=4000, sigmas=(1.0, 4.0), n_uniform=1000,
                                   center=np.zeros(3), radius=30.0)
    assert pts.shape == (5000, 3) and sdf.shape == (5000, 1)
    assert np.allclose(sdf[:, 0], np.linalg.norm(pts, axis=1) - 20.0, atol=0.05)
    assert 0.4 < np.abs(sdf[:2000, 0]).mean() < 1.6  # sigma 1 mm: E|N(0,1)| = 0.8
    assert np.linalg.norm(pts[4000:], axis=1).max() <= 30.0


def test_thickness_augmentation_moves_the_outer_surface_of_nested_channels():
    bone = trimesh.creation.icosphere(4, radius=20.0)
    shell = trimesh.creation.icosphere(4, radius=22.0)  # a 2 mm "cartilage" all round
    source = source_from_meshes([bone, shell], composition="offset", name="shell")
    frame = reference_frame(source, None)
    rng = np.random.default_rng(3)
    plain = make_training_shape(source, Deformation(), frame, rng=rng, n_points=4000)
    thicker = make_training_shape(source, Deformation(), frame, rng=np.random.default_rng(3), n_points=4000,
                                  thickness_factor=lambda q: np.full(len(q), 1.5))
    assert np.allclose(plain.points, thicker.points)
    assert np.allclose(plain.sdf[:, 0], thicker.sdf[:, 0])  # the bone is left alone
    radius = np.linalg.norm(plain.alignment.to_mm(plain.points), axis=1)
    # outside the shell: bone distance r - 20 and union r - 22 give union' = (r - 20) - 1.5 * 2 = r - 23
    outside = radius > 22.5
    mm = thicker.sdf[outside, 1] / plain.alignment.units_per_mm
    assert np.allclose(mm, radius[outside] - 23.0, atol=0.05)
    # a random factor stays in its range and is smooth
    factor = random_thickness_factor(rng, 0.3, np.asarray(bone.vertices))
    values = factor(np.asarray(shell.vertices))
    assert values.min() > 0.7 and values.max() < 1.3 and values.std() > 0.01


# --------------------------------------------------------------------------------------------------
# model folders, fitting


def test_model_folder_round_trip_and_fit_of_an_unseen_shape(femur_folder, femur_model, fitted):
    assert sorted(p.name for p in femur_folder.iterdir()) == [
        "config.json", "mean_shape.npz", "metadata.json", "model_card.md", "weights.pt"]
    config = json.loads((femur_folder / "config.json").read_text())
    assert config["architecture"]["hidden_dims"] == [64, 64, 64, 64] and config["surfaces"] == ["femur"]
    # the same network rebuilt from config.json alone
    rebuilt = SdfDecoder(NsmArchitecture.from_dict(config["architecture"]))
    rebuilt.load_state_dict(torch.load(femur_folder / "weights.pt", weights_only=True))
    pts = torch.randn(50, 3) * 0.5
    with torch.no_grad():
        assert torch.allclose(rebuilt(femur_model.mean_latent, pts), femur_model.raw(femur_model.mean_latent, pts))
    # an unseen ellipsoid, elsewhere in the scanner: far better than the mean shape
    assert fitted.assd_mm["femur"] < 0.5
    assert fitted.assd_mm["femur"] < 0.4 * fitted.assd_mean_shape_mm["femur"]
    assert fitted.iterations > 10 and fitted.seconds < 30
    assert fitted.meshes[0].is_watertight and fitted.meshes[0].volume > 0
    assert np.allclose(fitted.meshes[0].centroid, (40.0, -10.0, 5.0), atol=1.5)


def test_fit_is_deterministic_and_left_knee_is_the_mirrored_right(femur_model):
    right = ellipsoid(-0.4, center=(35.0, 0.0, 0.0))
    # a left knee: the right one mirrored through x = 0
    left = mirror_mesh(right)
    fit_r = fit_nsm(femur_model, [right], "right", max_iterations=60)
    fit_l = fit_nsm(femur_model, [left], "left", max_iterations=60)
    fit_r2 = fit_nsm(femur_model, [right], "right", max_iterations=60)
    assert np.array_equal(fit_r.latent, fit_r2.latent)
    assert np.allclose(fit_l.latent, fit_r.latent, atol=1e-6)
    assert np.allclose(fit_l.icp_transform, fit_r.icp_transform, atol=1e-9)
    assert fit_l.assd_mm["femur"] == pytest.approx(fit_r.assd_mm["femur"], abs=1e-6)
    # the left reconstruction lies on the left (x < 0) and is the mirror image of the right one
    assert fit_l.meshes[0].centroid[0] < -30.0
    assert assd(fit_l.meshes[0], mirror_mesh(fit_r.meshes[0]), n_points=3000) < 1e-4  # microns: float32 round-off of the mirrored fit, not a different shape
    assert fit_l.recon_params()["side"] == "left" and fit_l.recon_params()["mirrored"] is True


def test_bscore_with_a_folder_and_null_without(tmp_path, femur_model, fitted):
    assert fitted.bscore is None
    params = fitted.recon_params()
    assert REQUIRED_KEYS <= set(params)
    assert params["Bscore"] is None and params["assd_cartilage_mm"] is None
    assert params["assd_bone_mm"] == pytest.approx(fitted.assd_mm["femur"], abs=1e-4)
    direction = np.linspace(-1.0, 1.0, femur_model.arch.latent_dim)
    folder = tmp_path / "bscore"
    folder.mkdir()
    (folder / "bscore.json").write_text(json.dumps(
        {"direction": direction.tolist(), "healthy_mean": 0.1, "healthy_std": 0.5}))
    fit = fit_nsm(femur_model, [ellipsoid(0.5, center=(40.0, -10.0, 5.0))], "right", bscore=folder,
                  max_iterations=40)
    assert fit.bscore == pytest.approx((fit.latent @ direction - 0.1) / 0.5)
    written = fit.save(tmp_path / "out", RECON_PARAMS_FILES["bone_only"])
    saved = json.loads(written["params"].read_text())
    assert written["params"].name == "NSM_bone_only_recon_params.json"
    assert saved["Bscore"] == pytest.approx(fit.bscore) and len(saved["latent"]) == femur_model.arch.latent_dim
    assert np.asarray(saved["icp_transform"]).shape == (4, 4)
    assert trimesh.load(written["femur"]).is_watertight
    # a direction for another latent space is refused by name
    (folder / "bscore.json").write_text(json.dumps({"direction": [1.0, 2.0], "healthy_mean": 0, "healthy_std": 1}))
    with pytest.raises(ModelUnavailable) as excinfo:
        load_bscore(folder)(fit.latent)
    assert_error(excinfo, ErrorCode.MODEL_UNAVAILABLE, "2 values", "latent")
    with pytest.raises(ModelUnavailable) as excinfo:
        load_bscore(tmp_path / "nowhere")
    assert_error(excinfo, ErrorCode.MODEL_UNAVAILABLE, "nowhere")


def test_wrong_architecture_in_config_is_a_typed_error(tmp_path, femur_folder):
    bad = tmp_path / "bad"
    shutil.copytree(femur_folder, bad)
    config = json.loads((bad / "config.json").read_text())
    config["architecture"]["hidden_dims"] = [128, 128, 128, 128]
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelUnavailable) as excinfo:
        load_nsm(bad, "cpu")
    assert_error(excinfo, ErrorCode.MODEL_UNAVAILABLE, "weights.pt", "config.json", "shape mismatch")
    config["architecture"]["depth"] = 3
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelUnavailable) as excinfo:
        load_nsm(bad, "cpu")
    assert_error(excinfo, ErrorCode.MODEL_UNAVAILABLE, "unknown architecture key", "depth")
    (bad / "config.json").unlink()
    with pytest.raises(ModelUnavailable) as excinfo:
        load_nsm(bad, "cpu")
    assert_error(excinfo, ErrorCode.MODEL_UNAVAILABLE, "config.json")
    with pytest.raises(ModelUnavailable) as excinfo:
        setup_nsm(NsmModelConfig(model_folder=str(tmp_path / "missing")), device="cpu")
    assert_error(excinfo, ErrorCode.MODEL_UNAVAILABLE, "missing", "does not exist")


def test_users_weights_with_a_described_architecture_load_through_the_same_code(tmp_path):
    arch = NsmArchitecture(latent_dim=16, hidden_dims=(32, 48, 32), skip_layers=(1,), n_outputs=2,
                           activation="softplus", weight_norm=True, fourier_frequencies=2)
    decoder = SdfDecoder(arch)
    folder = save_nsm(tmp_path / "theirs", decoder, {"surfaces": ["femur", "femoral_cartilage"],
                                                     "composition": "independent"},
                      mean_latent=np.zeros(16), mean_points=np.random.default_rng(0).normal(size=(100, 3)))
    model = load_nsm(folder, "cpu")
    pts = torch.randn(20, 3)
    with torch.no_grad():
        assert torch.allclose(model.raw(torch.zeros(16), pts), decoder(torch.zeros(16), pts))
    assert model.surfaces == ("femur", "femoral_cartilage")


def test_registry_setup_and_both_models_in_turn(tmp_path, femur_folder, knee_folder):
    with pytest.raises(ModelUnavailable) as excinfo:
        REGISTRY.model("bone_and_cart").load(device="cpu", model_folder=str(femur_folder))
    assert_error(excinfo, ErrorCode.MODEL_UNAVAILABLE, "decodes femur", "femoral_cartilage")

    labels, affine = knee_labels(0.6)
    from workbench.knee.nsm.sdf import mesh_from_mask

    surfaces = {"femur": mesh_from_mask(labels == 7, affine), "femoral_cartilage": mesh_from_mask(labels == 2, affine)}
    overrides = {"bone_only": {"model_folder": str(femur_folder)},
                 "bone_and_cart": {"model_folder": str(knee_folder)}}
    seen = []
    fits = run_nsm("both", surfaces, "right", out_dir=tmp_path, device="cpu", overrides=overrides,
                   progress=lambda f, m: seen.append((f, m)), baseline=True)
    assert list(fits) == ["bone_only", "bone_and_cart"]
    assert (tmp_path / "NSM_bone_only_recon_params.json").is_file()
    params = json.loads((tmp_path / "NSM_recon_params.json").read_text())
    assert REQUIRED_KEYS <= set(params) and params["Bscore"] is None
    knee = fits["bone_and_cart"]
    # the two-surface toy reconstructs both surfaces of an unseen knee
    assert knee.assd_mm["femur"] < 0.5 and knee.assd_mm["femoral_cartilage"] < 0.6
    assert knee.assd_mm["femoral_cartilage"] < 0.5 * knee.assd_mean_shape_mm["femoral_cartilage"]
    assert params["assd_cartilage_mm"] == pytest.approx(knee.assd_mm["femoral_cartilage"], abs=1e-3)
    assert len(knee.meshes) == 2 and all(len(m.faces) for m in knee.meshes)
    assert seen and seen[-1][0] == pytest.approx(1.0) and "bone_and_cart" in seen[-1][1]
