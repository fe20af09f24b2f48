"""DMTet: tet grid structure, marching tets on analytic SDFs, winding, gradients, regulariser."""

from __future__ import annotations

import math

import pytest
import torch

from workbench.recon import dmtet
from workbench.recon.mesh import (
    euler_characteristic,
    genus,
    is_consistently_oriented,
    is_watertight,
)


def _tet_volumes(verts, tets):
    v = verts[tets]
    return torch.det(v[:, 1:] - v[:, :1]) / 6.0


def _enclosed_volume(verts, faces):
    return (torch.det(verts[faces].double()) / 6.0).sum().item()


def _components(faces, n_verts):
    from scipy import sparse
    from scipy.sparse import csgraph

    f = faces.numpy()
    e = f[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2)
    adj = sparse.coo_matrix(([1] * len(e), (e[:, 0], e[:, 1])), shape=(n_verts, n_verts))
    _, lab = csgraph.connected_components(adj, directed=False)
    return len(set(lab[f.reshape(-1)].tolist()))


def _sphere_sdf(p, center=(0.0, 0.0, 0.0), radius=0.3):
    return radius - (p - torch.tensor(center, dtype=p.dtype)).norm(dim=-1)


def _torus_sdf(p, big=0.3, small=0.12):
    q = torch.stack([torch.sqrt(p[:, 0] ** 2 + p[:, 2] ** 2) - big, p[:, 1]], dim=-1)
    return small - q.norm(dim=-1)


# ----------------------------------------------------------------------------- grid


@pytest.mark.parametrize("res,scale", [(1, 1.0), (3, 2.0), (5, 0.7)])
def test_tet_grid_counts_orientation_volume(res, scale):
    verts, tets = dmtet.tet_grid(res, scale=scale)
    assert verts.shape == ((res + 1) ** 3, 3) and verts.dtype == torch.float32
    assert tets.shape == (6 * res**3, 4) and tets.dtype == torch.long
    assert torch.allclose(verts.min(0).values, torch.full((3,), -0.5 * scale))
    assert torch.allclose(verts.max(0).values, torch.full((3,), 0.5 * scale))
    vol = _tet_volumes(verts.double(), tets)
    assert (vol > 0).all()
    assert vol.sum().item() == pytest.approx(scale**3, rel=1e-6)


def test_tet_grid_conforming():
    res = 3
    verts, tets = dmtet.tet_grid(res)
    tri = tets[:, [[1, 2, 3], [0, 2, 3], [0, 1, 3], [0, 1, 2]]].reshape(-1, 3).sort(dim=1).values
    uniq, counts = torch.unique(tri, dim=0, return_counts=True)
    assert counts.max() == 2
    # a triangle lies on the outer surface iff its three vertices share one boundary plane
    c = verts[uniq]  # [n, 3 vertices, 3 coords]
    on_boundary = ((c == 0.5).all(dim=1) | (c == -0.5).all(dim=1)).any(dim=1)
    assert (counts[on_boundary] == 1).all()
    assert (counts[~on_boundary] == 2).all()
    assert int(on_boundary.sum()) == 6 * 2 * res**2


def test_boundary_vertices():
    verts, _ = dmtet.tet_grid(4, scale=2.0)
    mask = dmtet.boundary_vertices(verts, 2.0)
    assert int(mask.sum()) == 5**3 - 3**3


def test_tet_edges_unique():
    _, tets = dmtet.tet_grid(2)
    edges = dmtet.tet_edges(tets)
    assert (edges[:, 0] < edges[:, 1]).all()
    # Kuhn grid edges: axis edges 3*n^2*R, face diagonals 3*n*R^2, cube diagonals R^3 (n = R + 1)
    r, n = 2, 3
    assert edges.shape[0] == 3 * n * n * r + 3 * n * r * r + r**3


# ----------------------------------------------------------------------------- winding


def test_winding_all_cases_random_tets():
    """For every sign case on random positively oriented tets, normals point inside -> outside."""
    gen = torch.Generator().manual_seed(0)
    for case in range(1, 15):
        inside = torch.tensor([(case >> i) & 1 for i in range(4)], dtype=torch.bool)
        for _ in range(20):
            pos = torch.randn(4, 3, generator=gen, dtype=torch.float64)
            if torch.det(pos[1:] - pos[0]) < 0:
                pos = pos[[0, 1, 3, 2]]
            mag = torch.rand(4, generator=gen, dtype=torch.float64) + 0.05
            sdf = torch.where(inside, mag, -mag)
            tets = torch.tensor([[0, 1, 2, 3]])
            v, f = dmtet.marching_tets(pos, sdf, tets)
            expected = 2 if int(inside.sum()) == 2 else 1
            assert f.shape == (expected, 3)
            n = torch.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]], dim=-1)
            # the surface separates inside from outside vertices: any outside vertex minus any
            # point of the triangle has positive dot with the outward normal
            for k in range(f.shape[0]):
                centroid = v[f[k]].mean(0)
                assert ((pos[~inside] - centroid) @ n[k] > 0).all()
                assert ((pos[inside] - centroid) @ n[k] < 0).all()


# ----------------------------------------------------------------------------- analytic surfaces


def test_sphere():
    res, radius = 20, 0.3
    grid, tets = dmtet.tet_grid(res)
    grid = grid + 0.013  # avoid grid vertices exactly on the sphere (degenerate triangles)
    verts, faces = dmtet.marching_tets(grid, _sphere_sdf(grid, radius=radius), tets)
    assert verts.dtype == torch.float32 and faces.dtype == torch.long
    assert is_watertight(faces) and is_consistently_oriented(faces)
    assert euler_characteristic(verts, faces) == 2
    assert genus(verts, faces) == 0
    assert _components(faces, verts.shape[0]) == 1
    assert (faces.unique() == torch.arange(verts.shape[0])).all()  # no unused vertices
    r = verts.norm(dim=-1)
    cell = 1.0 / res
    assert ((r - radius).abs() < 0.5 * cell).all()
    fn = torch.cross(verts[faces[:, 1]] - verts[faces[:, 0]], verts[faces[:, 2]] - verts[faces[:, 0]], dim=-1)
    dots = (torch.nn.functional.normalize(fn, dim=-1) * verts[faces].mean(1)).sum(-1)
    assert dots.mean() > 0.25 and (dots > 0).float().mean() > 0.99
    vol = _enclosed_volume(verts, faces)
    assert vol == pytest.approx(4.0 / 3.0 * math.pi * radius**3, rel=0.03)


def test_torus_genus_one():
    grid, tets = dmtet.tet_grid(24)
    verts, faces = dmtet.marching_tets(grid, _torus_sdf(grid + 0.007), tets)
    assert is_watertight(faces) and is_consistently_oriented(faces)
    assert euler_characteristic(verts, faces) == 0
    assert genus(verts, faces) == 1
    assert _components(faces, verts.shape[0]) == 1
    vol = _enclosed_volume(verts, faces)
    assert vol == pytest.approx(2 * math.pi**2 * 0.3 * 0.12**2, rel=0.06)


def test_two_spheres_two_components():
    grid, tets = dmtet.tet_grid(16)
    sdf = torch.maximum(_sphere_sdf(grid, (-0.25, 0, 0), 0.15), _sphere_sdf(grid, (0.25, 0, 0), 0.15))
    verts, faces = dmtet.marching_tets(grid, sdf, tets)
    assert is_watertight(faces)
    assert _components(faces, verts.shape[0]) == 2
    assert genus(verts, faces) == 0 and euler_characteristic(verts, faces) == 4


def test_empty_surface():
    grid, tets = dmtet.tet_grid(4)
    for sdf in (-torch.ones(grid.shape[0]), torch.ones(grid.shape[0])):
        verts, faces = dmtet.marching_tets(grid, sdf, tets)
        assert verts.shape == (0, 3) and faces.shape == (0, 3) and faces.dtype == torch.long


# ----------------------------------------------------------------------------- gradients


def test_gradients_finite_difference():
    grid, tets = dmtet.tet_grid(4)
    grid = grid.double()
    sdf0 = _sphere_sdf(grid + 0.031, radius=0.33).detach()

    def mean_radius(sdf, pos=grid):
        v, _ = dmtet.marching_tets(pos, sdf, tets)
        return v.norm(dim=-1).mean()

    sdf = sdf0.clone().requires_grad_(True)
    mean_radius(sdf).backward()
    grad = sdf.grad
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    gen = torch.Generator().manual_seed(1)
    idx = torch.nonzero(grad.abs() > 1e-8).flatten()
    idx = idx[torch.randperm(len(idx), generator=gen)[:8]]
    eps = 1e-6
    for i in idx.tolist():
        plus, minus = sdf0.clone(), sdf0.clone()
        plus[i] += eps
        minus[i] -= eps
        fd = (mean_radius(plus) - mean_radius(minus)) / (2 * eps)
        assert fd.item() == pytest.approx(grad[i].item(), rel=1e-4, abs=1e-8)

    pos = grid.clone().requires_grad_(True)
    mean_radius(sdf0, pos).backward()
    assert torch.isfinite(pos.grad).all() and pos.grad.abs().sum() > 0


def test_sdf_sign_regularizer():
    grid, tets = dmtet.tet_grid(6)
    sdf = _sphere_sdf(grid).requires_grad_(True)
    edges = dmtet.tet_edges(tets)
    loss = dmtet.sdf_sign_regularizer(sdf, tets)
    assert loss.item() == pytest.approx(dmtet.sdf_sign_regularizer(sdf, edges).item())
    loss.backward()
    assert loss.item() > 0 and torch.isfinite(sdf.grad).all()
    # each end is pulled towards the other end's sign: descent lowers inside ends, raises outside ones
    crossing = (sdf[edges[:, 0]] > 0) != (sdf[edges[:, 1]] > 0)
    ends = edges[crossing].unique()
    inside = sdf[ends] > 0
    assert (sdf.grad[ends][inside] > 0).all() and (sdf.grad[ends][~inside] < 0).all()
    with torch.no_grad():
        stepped = sdf - 1e-2 * sdf.grad
    assert dmtet.sdf_sign_regularizer(stepped, edges) < loss
    none = dmtet.sdf_sign_regularizer(torch.ones(grid.shape[0], requires_grad=True), edges)
    assert none.item() == 0.0 and none.requires_grad
