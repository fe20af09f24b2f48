"""Multi-view loader: NeRF-synthetic, images + masks + cameras.json and COLMAP text, and their errors."""

from __future__ import annotations

import json
import math
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image

from workbench.data.synthetic_scenes import sample_recon
from workbench.errors import InputNotFound, InvalidFormat
from workbench.io.multiview import (
    MultiViewDataset,
    c2w_to_opencv,
    load_multiview,
    perspective,
    rot_to_quat,
    srgb_to_linear,
)

N_TRAIN, N_TEST, RES = 8, 4, 32


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> Path:
    """A tiny rendered ground-truth scene (NeRF-synthetic layout)."""
    return sample_recon("blob", None, views=N_TRAIN, res=RES, out=tmp_path_factory.mktemp("blob"), test_views=N_TEST)


@pytest.fixture
def nerf(scene, tmp_path) -> Path:
    """A private, editable copy of the scene."""
    return Path(shutil.copytree(scene, tmp_path / "nerf"))


def _project(ds: MultiViewDataset, points: torch.Tensor, near=0.1, far=10.0) -> torch.Tensor:
    """World points [P, 3] -> continuous pixel coordinates (x right, y down) [N, P, 2] via mvp."""
    clip = torch.cat([points, torch.ones(len(points), 1)], dim=1) @ ds.mvp(near, far).transpose(1, 2)
    ndc = clip[..., :2] / clip[..., 3:4]
    h, w = ds.resolution
    return torch.stack([(ndc[..., 0] + 1) * 0.5 * w, (ndc[..., 1] + 1) * 0.5 * h], dim=-1)


def _opencv_project(K, R, t, point) -> np.ndarray:
    cam = R @ point + t
    uvw = K @ cam
    return uvw[:2] / uvw[2]


def _as_images_folder(scene: Path, out: Path, split_labels: bool = True) -> list[dict]:
    """Re-export the scene's train views as images/ (RGB, no alpha) + masks/ + cameras.json."""
    (out / "images").mkdir(parents=True)
    (out / "masks").mkdir()
    meta = json.loads((scene / "transforms_train.json").read_text())
    entries = []
    for frame in meta["frames"]:
        name = Path(frame["file_path"]).name
        rgba = np.asarray(Image.open(scene / "train" / f"{name}.png"))
        Image.fromarray(rgba[..., :3]).save(out / "images" / f"{name}.png")
        Image.fromarray(rgba[..., 3]).save(out / "masks" / f"{name}.png")
        f = 0.5 * RES / math.tan(meta["camera_angle_x"] / 2)
        R, t = c2w_to_opencv(np.array(frame["transform_matrix"]))
        entry = {
            "file": f"images/{name}.png",
            "K": [[f, 0, RES / 2], [0, f, RES / 2], [0, 0, 1]],
            "R": R.tolist(),
            "t": t.tolist(),
            "width": RES,
            "height": RES,
        }
        if split_labels:
            entry["split"] = "train"
        entries.append(entry)
    (out / "cameras.json").write_text(json.dumps(entries, indent=1))
    return entries


# --------------------------------------------------------------------------- NeRF-synthetic


def test_nerf_round_trip(scene):
    ds = load_multiview(scene, "train")
    test = load_multiview(scene, "test")
    assert len(ds) == N_TRAIN and len(test) == N_TEST
    assert ds.images.shape == (N_TRAIN, RES, RES, 4) and ds.images.dtype == torch.float32
    assert ds.resolution == (RES, RES)
    assert ds.names[0] == "r_0" and ds.meta["format"] == "nerf-synthetic"
    for mat in (ds.c2w, ds.mvp(0.1, 10.0), test.c2w):
        assert torch.isfinite(mat).all()
    rot = ds.c2w[:, :3, :3]
    assert torch.allclose(rot @ rot.transpose(1, 2), torch.eye(3).expand(N_TRAIN, 3, 3), atol=1e-5)
    assert torch.allclose(ds.fovy, torch.full((N_TRAIN,), math.radians(45.0)), atol=1e-6)
    assert torch.allclose(ds.campos, ds.c2w[:, :3, 3])

    png = np.asarray(Image.open(scene / "train" / "r_3.png")).astype(np.float32) / 255.0
    assert np.allclose(ds.images[3, ..., 3].numpy(), png[..., 3], atol=1e-6)
    assert np.allclose(ds.images[3, ..., :3].numpy(), srgb_to_linear(png[..., :3]), atol=1e-5)
    assert 0.05 < ds.images[..., 3].mean() < 0.9

    sub = ds.subset([1, 3])
    assert sub.names == ["r_1", "r_3"] and torch.equal(sub.c2w[1], ds.c2w[3])


def test_projection_agrees_with_renderer(scene):
    """GT vertices projected with mvp land on the rendered silhouettes (camera conventions, y flip)."""
    ds = load_multiview(scene, "train")
    verts = torch.tensor(trimesh.load(scene / "gt_mesh.ply").vertices, dtype=torch.float32)
    pix = _project(ds, verts)
    h, w = ds.resolution

    def inside(pixels: torch.Tensor) -> float:
        col = pixels[..., 0].floor().long().clamp(0, w - 1)
        row = pixels[..., 1].floor().long().clamp(0, h - 1)
        return (ds.images[torch.arange(len(ds))[:, None], row, col, 3] > 0).float().mean().item()

    assert inside(pix) >= 0.98
    flipped = torch.stack([pix[..., 0], h - pix[..., 1]], dim=-1)
    assert inside(flipped) < 0.95  # the check can tell a y flip apart

    # Sub-pixel check: the object's centre projects to the middle and the silhouette's
    # size matches the focal length (alpha area vs the projected sphere-ish outline).
    centre = _project(ds, torch.zeros(1, 3))[:, 0]
    assert torch.allclose(centre, torch.tensor([w / 2, h / 2]).expand_as(centre), atol=1e-4)


def test_perspective_matches_spec():
    P = perspective(math.radians(60), 1.5, 0.1, 100.0)
    t = math.tan(math.radians(30))
    assert P[0, 0] == pytest.approx(1 / (t * 1.5)) and P[1, 1] == pytest.approx(-1 / t)
    assert P[3, 2] == -1 and P[2, 3] == pytest.approx(-2 * 100 * 0.1 / 99.9)
    # Centred square dataset: mvp uses exactly this projection.
    c2w = torch.eye(4)[None].clone()
    c2w[0, 2, 3] = 3.0
    ds = MultiViewDataset(torch.zeros(1, 8, 8, 4), c2w, torch.tensor([math.radians(50)]), (8, 8), ["a"], Path("."))
    expected = perspective(math.radians(50), 1.0, 0.1, 10.0) @ torch.linalg.inv(c2w[0])
    assert torch.allclose(ds.mvp(0.1, 10.0)[0], expected, atol=1e-5)


def test_resize_keeps_cameras(scene):
    full = load_multiview(scene, "train")
    half = load_multiview(scene, "train", resolution=RES // 2)
    assert half.resolution == (RES // 2, RES // 2)
    assert torch.allclose(half.fovy, full.fovy, atol=1e-6)
    assert torch.allclose(half.focal, full.focal / 2, atol=1e-4)
    assert half.images[..., 3].mean() == pytest.approx(full.images[..., 3].mean().item(), abs=1e-4)


# --------------------------------------------------------------------------- images + masks + cameras


def test_cameras_json_matches_nerf(scene, tmp_path):
    _as_images_folder(scene, tmp_path / "f2")
    a = load_multiview(scene, "train")
    b = load_multiview(tmp_path / "f2", "train")
    assert b.meta["format"] == "cameras-json" and b.names == a.names
    assert torch.allclose(a.c2w, b.c2w, atol=1e-5)
    assert torch.allclose(a.fovy, b.fovy, atol=1e-6)
    assert torch.allclose(a.mvp(0.1, 10.0), b.mvp(0.1, 10.0), atol=1e-5)
    assert torch.allclose(a.images, b.images, atol=1e-6)  # masks give the same alpha


def test_default_split_holds_out_every_8th(scene, tmp_path):
    _as_images_folder(scene, tmp_path / "f2", split_labels=False)
    train = load_multiview(tmp_path / "f2", "train")
    test = load_multiview(tmp_path / "f2", "test")
    assert test.names == ["r_0"] and len(train) == N_TRAIN - 1
    (tmp_path / "f2" / "test.txt").write_text("r_2.png\nr_5\n")
    assert load_multiview(tmp_path / "f2", "test").names == ["r_2", "r_5"]


def test_colmap_matches_nerf(scene, tmp_path):
    entries = _as_images_folder(scene, tmp_path / "col")
    (tmp_path / "col" / "cameras.json").unlink()
    sparse = tmp_path / "col" / "sparse" / "0"
    sparse.mkdir(parents=True)
    f = entries[0]["K"][0][0]
    (sparse / "cameras.txt").write_text(f"# Camera list\n1 PINHOLE {RES} {RES} {f!r} {f!r} {RES / 2} {RES / 2}\n")
    lines = ["# Image list", "# IMAGE_ID, QW, QX, QY, QZ, TX, TY, TZ, CAMERA_ID, NAME"]
    for i, e in enumerate(entries):
        q = rot_to_quat(np.array(e["R"]))
        lines += [" ".join(map(repr, [i + 1, *q.tolist(), *e["t"], 1])) + f" {Path(e['file']).name}", ""]
    (sparse / "images.txt").write_text("\n".join(lines) + "\n")
    a = load_multiview(scene, "train")
    b = load_multiview(tmp_path / "col", "train")
    assert b.meta["format"] == "colmap"
    train_idx = [i for i in range(N_TRAIN) if i % 8 != 0]
    assert torch.allclose(a.c2w[train_idx], b.c2w, atol=1e-5)
    assert torch.allclose(a.fovy[train_idx], b.fovy, atol=1e-6)

    # OPENCV with distortion: accepted, distortion ignored with a warning.
    (sparse / "cameras.txt").write_text(f"1 OPENCV {RES} {RES} {f} {f} {RES / 2} {RES / 2} 0.01 0 0 0\n")
    with pytest.warns(UserWarning, match="distortion"):
        c = load_multiview(tmp_path / "col", "train")
    assert torch.allclose(c.c2w, b.c2w)


def test_off_centre_principal_point_and_non_square(tmp_path):
    """mvp reproduces the OpenCV projection u = K (R x + t) for an off-centre, non-square camera."""
    w, h = 40, 30
    (tmp_path / "images").mkdir()
    rng = np.random.default_rng(0)
    R = trimesh.transformations.rotation_matrix(0.3, [0.2, 1.0, 0.1])[:3, :3]
    t = np.array([0.1, -0.05, 3.0])
    K = np.array([[50.0, 0, 23.0], [0, 47.0, 12.5], [0, 0, 1]])
    entries = []
    for i in range(4):
        rgba = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
        rgba[..., 3] = 255
        Image.fromarray(rgba).save(tmp_path / "images" / f"v{i}.png")
        entries.append(
            {
                "file": f"v{i}.png",
                "K": K.tolist(),
                "R": R.tolist(),
                "t": t.tolist(),
                "width": w,
                "height": h,
                "split": "train",
            }
        )
    (tmp_path / "cameras.json").write_text(json.dumps(entries))
    ds = load_multiview(tmp_path)
    assert ds.resolution == (h, w)
    assert ds.fovy[0].item() == pytest.approx(2 * math.atan(h / (2 * 47.0)), abs=1e-6)
    assert ds.principal[0].tolist() == [23.0, 12.5]
    points = np.array([[0.0, 0.0, 0.0], [0.3, -0.2, 0.1], [-0.25, 0.3, -0.2]])
    pix = _project(ds, torch.tensor(points, dtype=torch.float32))[0].numpy()
    for p, got in zip(points, pix):
        assert np.allclose(got, _opencv_project(K, R, t, p), atol=1e-3)
    # Resizing to a short side of 15 pixels scales the intrinsics with the image.
    small = load_multiview(tmp_path, resolution=15)
    assert small.resolution == (15, 20)
    pix_small = _project(small, torch.tensor(points, dtype=torch.float32))[0].numpy()
    assert np.allclose(pix_small, pix / 2, atol=1e-3)


def test_sixteen_bit_mask(scene, tmp_path):
    _as_images_folder(scene, tmp_path / "f2")
    for p in (tmp_path / "f2" / "masks").glob("*.png"):
        m = np.asarray(Image.open(p)).astype(np.uint16) * 257
        Image.fromarray(m).save(p)  # mode I;16
    b = load_multiview(tmp_path / "f2")
    a = load_multiview(scene)
    assert torch.allclose(a.images[..., 3], b.images[..., 3], atol=1e-6)


# --------------------------------------------------------------------------- errors


def _edit_transforms(folder: Path, edit) -> Path:
    path = folder / "transforms_train.json"
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))
    return path


def test_missing_folder(tmp_path):
    with pytest.raises(InputNotFound, match="nope"):
        load_multiview(tmp_path / "nope")


def test_no_cameras(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(InvalidFormat, match="transforms_train.json.*cameras.json.*cameras.txt"):
        load_multiview(tmp_path)


def test_missing_frame_image(nerf):
    (nerf / "train" / "r_2.png").unlink()
    with pytest.raises(InputNotFound, match="r_2"):
        load_multiview(nerf)


def test_rgb_without_alpha_or_masks(nerf):
    p = nerf / "train" / "r_1.png"
    Image.open(p).convert("RGB").save(p)
    with pytest.raises(InvalidFormat, match="r_1.png.*masks are required") as info:
        load_multiview(nerf)
    assert "alpha" in info.value.hint


def test_missing_mask(scene, tmp_path):
    _as_images_folder(scene, tmp_path / "f2")
    (tmp_path / "f2" / "masks" / "r_4.png").unlink()
    with pytest.raises(InputNotFound, match="r_4"):
        load_multiview(tmp_path / "f2")


def test_mask_size_mismatch(scene, tmp_path):
    _as_images_folder(scene, tmp_path / "f2")
    Image.new("L", (RES + 2, RES), 255).save(tmp_path / "f2" / "masks" / "r_5.png")
    with pytest.raises(InvalidFormat, match="r_5.png"):
        load_multiview(tmp_path / "f2")


def test_inconsistent_image_sizes(nerf):
    Image.new("RGBA", (RES, RES + 4), (255, 0, 0, 255)).save(nerf / "train" / "r_6.png")
    with pytest.raises(InvalidFormat, match="r_6.png"):
        load_multiview(nerf)


def test_too_few_views(nerf):
    _edit_transforms(nerf, lambda m: m.update(frames=m["frames"][:3]))
    with pytest.raises(InvalidFormat, match="Only 3 train view"):
        load_multiview(nerf)
    assert len(load_multiview(nerf, min_views=3)) == 3


def test_non_finite_camera(nerf):
    def edit(meta):
        meta["frames"][1]["transform_matrix"][0][3] = float("nan")

    path = _edit_transforms(nerf, edit)
    with pytest.raises(InvalidFormat, match="non-finite") as info:
        load_multiview(nerf)
    assert path.name in info.value.message


def test_non_rigid_camera(nerf):
    def edit(meta):
        m = np.array(meta["frames"][2]["transform_matrix"])
        m[:3, :3] *= 1.5
        meta["frames"][2]["transform_matrix"] = m.tolist()

    _edit_transforms(nerf, edit)
    with pytest.raises(InvalidFormat, match="transforms_train.json") as info:
        load_multiview(nerf)
    assert "orthonormal" in info.value.message and "r_2" in info.value.message


def test_singular_intrinsics(scene, tmp_path):
    entries = _as_images_folder(scene, tmp_path / "f2")
    entries[3]["K"] = [[0, 0, 16], [0, 0, 16], [0, 0, 1]]
    (tmp_path / "f2" / "cameras.json").write_text(json.dumps(entries))
    with pytest.raises(InvalidFormat, match="cameras.json") as info:
        load_multiview(tmp_path / "f2")
    assert "singular" in info.value.message and "r_3" in info.value.message


def test_empty_mask(scene, tmp_path):
    _as_images_folder(scene, tmp_path / "f2")
    Image.new("L", (RES, RES), 0).save(tmp_path / "f2" / "masks" / "r_7.png")
    with pytest.raises(InvalidFormat, match="r_7.png.*empty"):
        load_multiview(tmp_path / "f2")


def test_unsupported_colmap_model(scene, tmp_path):
    _as_images_folder(scene, tmp_path / "col")
    (tmp_path / "col" / "cameras.json").unlink()
    sparse = tmp_path / "col" / "sparse" / "0"
    sparse.mkdir(parents=True)
    (sparse / "cameras.txt").write_text("1 FISHEYE 32 32 1 2 3 4\n")
    (sparse / "images.txt").write_text("")
    with warnings.catch_warnings(), pytest.raises(InvalidFormat, match="cameras.txt"):
        load_multiview(tmp_path / "col")
