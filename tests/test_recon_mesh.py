"""Mesh utilities: normals, Laplacian, topology, components, tangents, xatlas UVs and OBJ/PLY IO."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import trimesh

from workbench.recon import mesh as M


def _icosphere(subdivisions=2):
    s = trimesh.creation.icosphere(subdivisions=subdivisions)
    return torch.tensor(s.vertices, dtype=torch.float32), torch.tensor(s.faces, dtype=torch.long)


def _flat_grid(n=6):
    """n x n vertex grid in the z=0 plane, two CCW (seen from +z) triangles per quad, same diagonal."""
    ij = np.stack(np.meshgrid(np.arange(n), np.arange(n), indexing="ij"), -1).reshape(-1, 2)
    verts = np.concatenate([ij / (n - 1), np.zeros((n * n, 1))], axis=1)
    faces = []
    for i in range(n - 1):
        for j in range(n - 1):
            a, b, c, d = i * n + j, (i + 1) * n + j, (i + 1) * n + j + 1, i * n + j + 1
            faces += [[a, b, c], [a, c, d]]
    return torch.tensor(verts, dtype=torch.float32), torch.tensor(faces, dtype=torch.long)


# ----------------------------------------------------------------------------- normals


def test_normals_cube_and_sphere():
    box = trimesh.creation.box()
    v = torch.tensor(box.vertices, dtype=torch.float32)
    f = torch.tensor(box.faces, dtype=torch.long)
    fn = M.face_normals(v, f)
    centroids = v[f].mean(1)
    # each face normal is a unit axis vector pointing away from the centre
    assert torch.allclose(fn.norm(dim=-1), torch.ones(len(f)))
    assert torch.allclose(fn.abs().max(dim=-1).values, torch.ones(len(f)))
    assert ((fn * centroids).sum(-1) > 0).all()
    vn = M.vertex_normals(v, f)
    assert torch.allclose(vn.norm(dim=-1), torch.ones(len(v)), atol=1e-6)
    assert ((vn * v).sum(-1) > 0).all()

    v, f = _icosphere(3)
    vn = M.vertex_normals(v, f)
    assert (vn * torch.nn.functional.normalize(v, dim=-1)).sum(-1).min() > 0.999


def test_vertex_normals_differentiable_and_isolated():
    v, f = _icosphere(1)
    v = torch.cat([v, torch.zeros(1, 3)]).requires_grad_(True)  # an isolated vertex
    vn = M.vertex_normals(v, f)
    assert torch.allclose(vn[-1], torch.tensor([0.0, 0.0, 1.0]))
    (vn[:, 0] * torch.arange(len(vn))).sum().backward()
    assert torch.isfinite(v.grad).all() and v.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- Laplacian


def test_laplacian_flat_grid_interior_zero():
    n = 6
    v, f = _flat_grid(n)
    lap = M.laplacian_uniform(len(v), f)
    assert lap.is_sparse and lap.shape == (len(v), len(v))
    lv = torch.sparse.mm(lap, v)
    ij = torch.stack(torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij"), -1).reshape(-1, 2)
    interior = ((ij > 0) & (ij < n - 1)).all(dim=1)
    assert lv[interior].abs().max() < 1e-6
    assert lv[~interior].abs().max() > 1e-3
    # rows sum to zero (L = I - D^-1 A)
    assert torch.allclose(torch.sparse.sum(lap, dim=1).to_dense(), torch.zeros(len(v)), atol=1e-6)


def test_laplacian_loss():
    v, f = _icosphere(2)
    assert M.laplacian_loss(v, v, f).item() == 0.0
    gen = torch.Generator().manual_seed(0)
    moved = (v + 0.05 * torch.randn(v.shape, generator=gen)).requires_grad_(True)
    loss = M.laplacian_loss(moved, v, f)
    assert loss.item() > 0
    loss.backward()
    assert torch.isfinite(moved.grad).all()
    # a translation (or any affine map applied to both) leaves the relative loss at zero
    assert M.laplacian_loss(v + 0.3, v, f).item() == pytest.approx(0.0, abs=1e-10)
    lap = M.laplacian_uniform(len(v), f)
    assert M.laplacian_loss(moved, v, f, lap).item() == pytest.approx(loss.item())


# ----------------------------------------------------------------------------- topology


def test_keep_large_components():
    big = trimesh.creation.icosphere(subdivisions=3)  # 1280 faces
    small = trimesh.creation.icosphere(subdivisions=0)  # 20 faces
    small.vertices = small.vertices * 0.1 + 3.0
    both = trimesh.util.concatenate([big, small])
    v, f = np.asarray(both.vertices), np.asarray(both.faces)
    v2, f2 = M.keep_large_components(v, f, min_fraction=0.05)
    assert isinstance(v2, np.ndarray) and len(f2) == len(big.faces) and len(v2) == len(big.vertices)
    assert np.abs(v2).max() < 1.5 and f2.max() == len(v2) - 1
    # torch in, torch out; a low threshold keeps both
    vt, ft = M.keep_large_components(torch.tensor(v), torch.tensor(f), min_fraction=0.01)
    assert isinstance(vt, torch.Tensor) and len(ft) == len(f)
    vt, ft = M.keep_large_components(torch.tensor(v, requires_grad=True), torch.tensor(f), 0.05)
    assert len(ft) == len(big.faces) and vt.requires_grad


def test_genus_euler_watertight():
    s = trimesh.creation.icosphere(subdivisions=2)
    assert M.euler_characteristic(s.vertices, s.faces) == 2
    assert M.genus(s.vertices, s.faces) == 0
    assert M.is_watertight(s.faces) and M.is_consistently_oriented(s.faces)
    t = trimesh.creation.torus(major_radius=1.0, minor_radius=0.3)
    assert M.euler_characteristic(t.vertices, t.faces) == 0
    assert M.genus(t.vertices, t.faces) == 1 and M.is_watertight(t.faces)
    # two tori: genus adds up
    t2 = t.copy()
    t2.vertices = t2.vertices + 5.0
    tt = trimesh.util.concatenate([t, t2])
    assert M.genus(tt.vertices, tt.faces) == 2
    # open surfaces: a disk has genus 0 and is not watertight; one flipped face breaks orientation
    v, f = _flat_grid(4)
    assert not M.is_watertight(f) and M.genus(v, f) == 0
    flipped = np.array(s.faces)
    flipped[0] = flipped[0, ::-1]
    assert not M.is_consistently_oriented(flipped)


def test_weld_vertices():
    s = trimesh.creation.icosphere(subdivisions=1)
    # split every face apart (like an OBJ with seams everywhere)
    v = s.vertices[s.faces.reshape(-1)]
    f = np.arange(len(v)).reshape(-1, 3)
    assert not M.is_watertight(f)
    v2, f2 = M.weld_vertices(v, f, tol=1e-6)
    assert len(v2) == len(s.vertices) and len(f2) == len(s.faces)
    assert M.is_watertight(f2) and M.genus(v2, f2) == 0
    vt, ft = M.weld_vertices(torch.tensor(v), torch.tensor(f))
    assert isinstance(ft, torch.Tensor) and len(vt) == len(s.vertices)


# ----------------------------------------------------------------------------- tangents and UVs


def test_tangents_orthogonal_and_aligned():
    v, f = _flat_grid(5)
    uv = v[:, :2].clone()
    n = M.vertex_normals(v, f)
    t = M.compute_tangents(v, f, uv, f, n)
    assert torch.allclose(t.norm(dim=-1), torch.ones(len(v)), atol=1e-5)
    assert torch.allclose(t, torch.tensor([1.0, 0.0, 0.0]).expand_as(t), atol=1e-5)  # u grows along +x

    v, f = _icosphere(2)
    n = M.vertex_normals(v, f)
    gen = torch.Generator().manual_seed(0)
    uv = torch.rand(len(v), 2, generator=gen)
    uv[:10] = 0.5  # degenerate UVs around some vertices -> fallback
    t = M.compute_tangents(v, f, uv, f, n)
    assert torch.isfinite(t).all()
    assert (t * n).sum(-1).abs().max() < 1e-5
    assert torch.allclose(t.norm(dim=-1), torch.ones(len(v)), atol=1e-5)


def test_unwrap_uv():
    s = trimesh.creation.icosphere(subdivisions=2)
    vmapping, faces, uvs = M.unwrap_uv(s.vertices, s.faces)
    assert faces.shape == s.faces.shape and faces.dtype == np.int64
    assert uvs.shape == (len(vmapping), 2) and uvs.min() >= 0.0 and uvs.max() <= 1.0
    assert vmapping.max() < len(s.vertices) and faces.max() == len(vmapping) - 1
    # same triangles, same order, in terms of original vertices
    assert np.array_equal(vmapping[faces], s.faces)


# ----------------------------------------------------------------------------- IO


def test_write_obj_round_trip(tmp_path):
    s = trimesh.creation.icosphere(subdivisions=2)
    vmapping, faces, uvs = M.unwrap_uv(s.vertices, s.faces)
    verts = torch.tensor(s.vertices[vmapping], dtype=torch.float32)
    faces_t = torch.tensor(faces)
    normals = M.vertex_normals(verts, faces_t)
    rng = np.random.default_rng(0)
    kd = rng.random((16, 16, 3)).astype(np.float32)
    textures = {"kd": kd, "ks": np.zeros((8, 8, 3)), "n": np.full((8, 8, 3), 0.5)}
    obj = M.write_obj(tmp_path / "out", verts, faces_t, uvs, normals, textures=textures)
    assert obj.name == "mesh.obj"
    mtl = (tmp_path / "out" / "mesh.mtl").read_text()
    for token in ("newmtl material", "map_Kd texture_kd.png", "map_Ks texture_ks.png", "bump texture_n.png"):
        assert token in mtl
    text = obj.read_text()
    assert "mtllib mesh.mtl" in text and "usemtl material" in text
    for name in ("texture_kd.png", "texture_ks.png", "texture_n.png"):
        assert (tmp_path / "out" / name).exists()

    v2, f2, uv2, uvf2, tex = M.load_mesh(obj)
    assert len(f2) == len(faces) and len(v2) == len(verts)
    assert uv2 is not None and np.array_equal(uvf2, f2)
    # per-corner positions and UVs survive (workbench UV convention restored by load_mesh)
    np.testing.assert_allclose(v2[f2], verts.numpy()[faces], atol=1e-5)
    np.testing.assert_allclose(uv2[uvf2], uvs[faces], atol=1e-5)
    assert tex is not None and tex.shape == (16, 16, 3)
    np.testing.assert_allclose(tex, np.rint(kd * 255) / 255, atol=1e-6)
    # welding the UV seams gives back the closed sphere
    vw, fw = M.weld_vertices(v2, f2, 1e-5)
    assert M.is_watertight(fw) and M.genus(vw, fw) == 0


def test_write_ply_round_trip(tmp_path):
    v, f = _icosphere(1)
    colors = (np.arange(len(v) * 3).reshape(-1, 3) % 256).astype(np.uint8)
    path = M.write_ply(tmp_path / "m.ply", v, f, colors)
    assert path.read_bytes().startswith(b"ply\nformat binary_little_endian 1.0\n")
    m = trimesh.load(path, process=False)
    assert len(m.vertices) == len(v) and len(m.faces) == len(f)
    np.testing.assert_allclose(m.vertices, v.numpy(), atol=1e-6)
    np.testing.assert_array_equal(m.faces, f.numpy())
    np.testing.assert_array_equal(m.visual.vertex_colors[:, :3], colors)
    m2 = trimesh.load(M.write_ply(tmp_path / "plain.ply", v.numpy(), f.numpy()), process=False)
    assert len(m2.faces) == len(f)
