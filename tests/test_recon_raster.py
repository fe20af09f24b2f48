"""The pure-PyTorch rasteriser: coverage, depth, barycentrics and gradients against references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from workbench.recon.render import raster

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def perspective(fovy: float, near: float = 0.1, far: float = 10.0) -> torch.Tensor:
    t = math.tan(fovy / 2)
    return torch.tensor([[1 / t, 0, 0, 0], [0, -1 / t, 0, 0],
                         [0, 0, -(far + near) / (far - near), -2 * far * near / (far - near)], [0, 0, -1, 0]],
                        dtype=torch.float64)


def to_clip(verts: torch.Tensor, distance: float = 3.5, fovy_deg: float = 45.0) -> torch.Tensor:
    """World vertices [V, 3] seen by a camera on +z looking at the origin -> clip positions [1, V, 4]."""
    view = torch.eye(4, dtype=torch.float64)
    view[2, 3] = -distance
    mvp = (perspective(math.radians(fovy_deg)) @ view).to(verts)
    return (torch.cat([verts, torch.ones_like(verts[:, :1])], 1) @ mvp.T)[None]


def icosphere(subdivisions: int) -> tuple[torch.Tensor, torch.Tensor]:
    import trimesh

    mesh = trimesh.creation.icosphere(subdivisions)
    return torch.tensor(mesh.vertices, dtype=torch.float64), torch.tensor(mesh.faces, dtype=torch.long)


def random_triangle_clip(rng: np.random.Generator) -> torch.Tensor:
    """One triangle with clearly different w per vertex (perspective), mostly on screen."""
    w = rng.uniform(1.0, 3.0, size=3)
    ndc = rng.uniform(-0.9, 0.9, size=(3, 2))
    z = rng.uniform(-0.5, 0.5, size=3)
    return torch.tensor(np.c_[ndc * w[:, None], z * w, w], dtype=torch.float64)[None]


def reference_coverage(pos: np.ndarray, height: int, width: int):
    """Point-in-triangle test at pixel centres in numpy; also the distance-to-edge margin (pixels)."""
    ndc = pos[:, :2] / pos[:, 3:4]
    sx = (ndc[:, 0] + 1) * width / 2 - 0.5
    sy = (ndc[:, 1] + 1) * height / 2 - 0.5
    jj, ii = np.mgrid[0:height, 0:width]
    inside = np.ones((height, width), bool)
    margin = np.full((height, width), np.inf)
    area = (sx[1] - sx[0]) * (sy[2] - sy[0]) - (sx[2] - sx[0]) * (sy[1] - sy[0])
    for k in range(3):
        a, b = k, (k + 1) % 3
        e = (sx[b] - sx[a]) * (jj - sy[a]) - (sy[b] - sy[a]) * (ii - sx[a])
        inside &= e * np.sign(area) >= 0
        margin = np.minimum(margin, np.abs(e) / np.hypot(sx[b] - sx[a], sy[b] - sy[a]))
    return inside, margin


@pytest.mark.parametrize("device", DEVICES)
def test_single_triangle_coverage_and_background(device):
    rng = np.random.default_rng(0)
    tris = torch.tensor([[0, 1, 2]], device=device)
    for _ in range(5):
        pos = random_triangle_clip(rng).float().to(device)
        rast = raster.rasterize(pos, tris, (32, 40))
        assert rast.shape == (1, 32, 40, 4)
        inside, margin = reference_coverage(pos[0].double().cpu().numpy(), 32, 40)
        covered = (rast[0, ..., 3] > 0).cpu().numpy()
        clear = margin > 1e-3
        assert inside.sum() > 0
        np.testing.assert_array_equal(covered[clear], inside[clear])
        assert torch.all(rast[0][~torch.as_tensor(covered, device=device)] == 0)  # background is all zero


def test_both_windings_and_culling_behind_camera():
    pos = torch.tensor([[[-0.5, -0.5, 0, 1], [0.5, -0.5, 0, 1], [0, 0.5, 0, 1]]])
    for tris in (torch.tensor([[0, 1, 2]]), torch.tensor([[0, 2, 1]])):
        assert (raster.rasterize(pos, tris, (16, 16))[..., 3] > 0).sum() > 20
    behind = pos.clone()
    behind[0, 0, 3] = -1.0
    assert (raster.rasterize(behind, torch.tensor([[0, 1, 2]]), (16, 16))[..., 3] == 0).all()


def test_depth_test_picks_the_nearer_triangle_in_either_order():
    near = [[-0.8, -0.8, -0.2, 1], [0.6, -0.8, -0.2, 1], [-0.8, 0.6, -0.2, 1]]
    far = [[-0.6, -0.6, 0.5, 1], [0.8, -0.6, 0.5, 1], [0.8, 0.8, 0.5, 1]]
    for order in ((near, far), (far, near)):
        pos = torch.tensor([order[0] + order[1]], dtype=torch.float32)
        tris = torch.tensor([[0, 1, 2], [3, 4, 5]])
        rast = raster.rasterize(pos, tris, (24, 24))
        near_id = 1 if order[0] is near else 2
        ins_near, m_near = reference_coverage(np.array(near), 24, 24)
        ins_far, m_far = reference_coverage(np.array(far), 24, 24)
        overlap = ins_near & ins_far & (m_near > 1e-3) & (m_far > 1e-3)
        assert overlap.sum() > 10
        ids = rast[0, ..., 3].numpy()
        assert np.all(ids[overlap] == near_id)
        np.testing.assert_allclose(rast[0, ..., 2].numpy()[overlap], -0.2, atol=1e-5)


def test_barycentrics_reproduce_pixel_positions():
    rng = np.random.default_rng(1)
    pos = random_triangle_clip(rng)
    tris = torch.tensor([[0, 1, 2]])
    height, width = 24, 32
    rast = raster.rasterize(pos, tris, (height, width))
    xyw = raster.interpolate(pos[..., [0, 1, 3]], rast, tris)[0]
    mask = rast[0, ..., 3] > 0
    ndc = xyw[..., :2] / xyw[..., 2:3]
    jj, ii = torch.meshgrid(torch.arange(height, dtype=torch.float64), torch.arange(width, dtype=torch.float64),
                            indexing="ij")
    expected = torch.stack([(2 * ii + 1) / width - 1, (2 * jj + 1) / height - 1], -1)
    torch.testing.assert_close(ndc[mask], expected[mask], atol=1e-9, rtol=0)
    u, v = rast[0, ..., 0][mask], rast[0, ..., 1][mask]
    assert (u >= -1e-9).all() and (v >= -1e-9).all() and (u + v <= 1 + 1e-9).all()


def test_interpolate_gradients_match_finite_differences():
    rng = np.random.default_rng(2)
    pos = random_triangle_clip(rng).requires_grad_(True)
    tris = torch.tensor([[0, 1, 2]])
    attr = torch.tensor(rng.normal(size=(1, 3, 2)), requires_grad=True)
    torch.autograd.gradcheck(lambda a: raster.interpolate(a, raster.rasterize(pos, tris, (16, 16)), tris), (attr,))
    # through the barycentrics to the vertex positions (pixel centres stay inside: coverage is fixed)
    _, margin = reference_coverage(pos[0].detach().numpy(), 16, 16)
    assert (margin > 1e-4).all()
    torch.autograd.gradcheck(lambda p: raster.interpolate(attr, raster.rasterize(p, tris, (16, 16)), tris), (pos,),
                             eps=1e-7, atol=1e-5)


@pytest.mark.parametrize("boundary_mode", ["wrap", "clamp"])
def test_texture_bilinear_values_and_gradients(boundary_mode):
    gen = torch.Generator().manual_seed(3)
    tex = torch.rand(1, 5, 7, 3, generator=gen, dtype=torch.float64)
    centres = torch.tensor([[[[(2 + 0.5) / 7, (1 + 0.5) / 5]]]], dtype=torch.float64)
    torch.testing.assert_close(raster.texture(tex, centres, boundary_mode=boundary_mode)[0, 0, 0], tex[0, 1, 2])
    edge = torch.tensor([[[[0.0, 0.5 / 5]]]], dtype=torch.float64)  # halfway between the first and last column
    expected = 0.5 * (tex[0, 0, 0] + tex[0, 0, 6]) if boundary_mode == "wrap" else tex[0, 0, 0]
    torch.testing.assert_close(raster.texture(tex, edge, boundary_mode=boundary_mode)[0, 0, 0], expected)

    uv = torch.rand(2, 4, 4, 2, generator=gen, dtype=torch.float64) * 1.4 - 0.2
    tex.requires_grad_(True)
    uv.requires_grad_(True)
    torch.autograd.gradcheck(lambda t, c: raster.texture(t, c, boundary_mode=boundary_mode), (tex, uv))


def test_texture_mipmap_blends_levels_and_has_texture_gradients():
    gen = torch.Generator().manual_seed(4)
    tex = torch.rand(1, 16, 16, 2, generator=gen, dtype=torch.float64)
    # a uv grid that covers the texture with 4x4 pixels: footprint 4 texels -> level 2 (4x4 averages)
    ii = (torch.arange(4, dtype=torch.float64) + 0.5) / 4
    uv = torch.stack(torch.meshgrid(ii, ii, indexing="xy"), -1)[None]
    out = raster.texture(tex, uv, filter_mode="linear-mipmap-linear")
    level2 = tex[0].reshape(4, 4, 4, 4, 2).mean((1, 3))
    torch.testing.assert_close(out[0], level2)
    # fine sampling reads level 0
    fine = (torch.arange(16, dtype=torch.float64) + 0.5) / 16
    uv_fine = torch.stack(torch.meshgrid(fine, fine, indexing="xy"), -1)[None]
    torch.testing.assert_close(raster.texture(tex, uv_fine, filter_mode="linear-mipmap-linear")[0], tex[0])
    small = tex[:, :8, :8, :1].clone().requires_grad_(True)
    uv_mid = (uv * 0.9 + 0.03).detach()
    torch.autograd.gradcheck(lambda t: raster.texture(t, uv_mid, filter_mode="linear-mipmap-linear"), (small,),
                             fast_mode=True)


def shoelace_area(pos: torch.Tensor, height: int, width: int) -> torch.Tensor:
    sx = (pos[..., 0] / pos[..., 3] + 1) * width / 2
    sy = (pos[..., 1] / pos[..., 3] + 1) * height / 2
    return 0.5 * ((sx[1] - sx[0]) * (sy[2] - sy[0]) - (sx[2] - sx[0]) * (sy[1] - sy[0])).abs()


def test_antialias_triangle_area_gradient_matches_the_analytic_derivative():
    height, width = 48, 48
    pos = torch.tensor([[[-0.7, -0.6, 0.1, 1.0], [0.9, -0.3, 0.2, 1.4], [-0.2, 0.8, 0.0, 1.1]]],
                       dtype=torch.float64, requires_grad=True)
    tris = torch.tensor([[0, 1, 2]])
    rast = raster.rasterize(pos, tris, (height, width))
    color = torch.where(rast[..., 3:4] > 0, 1.0, 0.25).to(pos.dtype)
    out = raster.antialias(color, rast, pos, tris)
    # forward: only pixels next to the outline change, and stay between the two colours
    changed = (out - color).abs().squeeze(-1)[0] > 0
    _, margin = reference_coverage(pos[0].detach().numpy(), height, width)
    assert changed.any() and (margin[changed.numpy()] < 1.0).all()
    assert out.min() >= 0.25 - 1e-12 and out.max() <= 1.0 + 1e-12
    # backward: d(sum)/d(pos) = (1 - 0.25) * d(area in pixels)/d(pos)
    grad = torch.autograd.grad(out.sum(), pos)[0]
    expected = torch.autograd.grad(0.75 * shoelace_area(pos[0], height, width), pos)[0]
    assert torch.linalg.norm(grad - expected) < 0.1 * torch.linalg.norm(expected)
    assert abs((out.sum() - 0.25 * height * width).item() - 0.75 * shoelace_area(pos[0], height, width).item()) < 3


@pytest.mark.parametrize("subdivisions", [2, 4])  # 4: triangles near the contour are sub-pixel slivers
def test_antialias_sphere_silhouette_gradient_matches_finite_differences(subdivisions):
    verts, faces = icosphere(subdivisions)
    height = width = 40
    scale = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    pos = to_clip(verts * scale)
    rast = raster.rasterize(pos, faces, (height, width))
    mask = (rast[..., 3:4] > 0).to(pos.dtype)
    out = raster.antialias(mask, rast, pos, faces)
    (grad,) = torch.autograd.grad(out.sum(), scale)

    def supersampled_area(s: float, factor: int = 8) -> float:
        r = raster.rasterize(to_clip(verts * s), faces, (height * factor, width * factor))
        return (r[..., 3] > 0).sum().item() / factor**2

    step = 0.02
    fd = (supersampled_area(1 + step) - supersampled_area(1 - step)) / (2 * step)
    assert abs(grad.item() - fd) < 0.1 * abs(fd)
    assert abs(out.sum().item() - supersampled_area(1.0)) < 0.02 * supersampled_area(1.0)


def test_antialias_ignores_hidden_edges_and_keeps_interior_pixels():
    # a small triangle entirely behind a big one: its outline is hidden, nothing is blended
    pos = torch.tensor([[[-0.95, -0.95, -0.5, 1], [0.95, -0.95, -0.5, 1], [0, 0.95, -0.5, 1],
                         [-0.3, -0.3, 0.5, 1], [0.3, -0.3, 0.5, 1], [0, 0.3, 0.5, 1]]], dtype=torch.float32)
    tris = torch.tensor([[0, 1, 2], [3, 4, 5]])
    rast = raster.rasterize(pos, tris, (32, 32))
    color = torch.stack([rast[..., 3] == 1, rast[..., 3] == 2, rast[..., 3] == 0], -1).float()
    out = raster.antialias(color, rast, pos, tris)
    big_inside, big_margin = reference_coverage(pos[0, :3].numpy(), 32, 32)
    hidden_inside, _ = reference_coverage(pos[0, 3:].numpy(), 32, 32)
    inner = torch.as_tensor(big_inside & (big_margin > 1.5))  # away from the big triangle's outline
    assert (hidden_inside & ~inner.numpy()).sum() == 0 and hidden_inside.sum() > 10
    assert torch.equal(out[0][inner], color[0][inner])
    assert not torch.equal(out, color)  # the big triangle's own outline is blended


def test_batched_views_match_single_views():
    verts, faces = icosphere(2)
    pos = torch.cat([to_clip(verts), to_clip(verts + torch.tensor([0.3, -0.2, 0.0], dtype=torch.float64))]).float()
    rast = raster.rasterize(pos, faces, (24, 24))
    out = raster.antialias(raster.interpolate(pos[..., :3], rast, faces), rast, pos, faces)
    for b in range(2):
        single = raster.rasterize(pos[b:b + 1], faces, (24, 24))
        torch.testing.assert_close(rast[b:b + 1], single)
        color = raster.interpolate(pos[b:b + 1, :, :3], single, faces)
        torch.testing.assert_close(out[b:b + 1], raster.antialias(color, single, pos[b:b + 1], faces))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    verts, faces = icosphere(2)
    pos = to_clip(verts).float()
    results = []
    for device in ("cpu", "cuda"):
        p = pos.to(device).requires_grad_(True)
        f = faces.to(device)
        rast = raster.rasterize(p, f, (32, 32))
        out = raster.antialias(raster.interpolate(p[..., :3], rast, f), rast, p, f)
        (grad,) = torch.autograd.grad(out.sum(), p)
        results.append((rast.cpu(), out.detach().cpu(), grad.cpu()))
    torch.testing.assert_close(results[0][0][..., 3], results[1][0][..., 3])
    torch.testing.assert_close(results[0][1], results[1][1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(results[0][2], results[1][2], atol=1e-3, rtol=1e-3)


def test_backend_falls_back_to_torch_on_cpu():
    impl = raster.backend("cpu")
    assert impl.name == "torch"
    assert impl.rasterize is raster.rasterize and impl.antialias is raster.antialias


def brute_force_faces(pos: torch.Tensor, tris: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Every triangle against every pixel centre with the rasteriser's own float32 edge-function test -> [H, W]."""
    sx, sy, sz, w = raster._to_screen(pos[0], height, width)
    tx, ty, tz = sx[tris], sy[tris], sz[tris]  # [F, 3]
    ok = (w[tris] > raster._W_EPS).all(1)
    area = (tx[:, 1] - tx[:, 0]) * (ty[:, 2] - ty[:, 0]) - (tx[:, 2] - tx[:, 0]) * (ty[:, 1] - ty[:, 0])
    ok &= area != 0
    jj, ii = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    px, py = ii.reshape(1, -1).float(), jj.reshape(1, -1).float()
    vx = [tx[:, k:k + 1] - px for k in range(3)]
    vy = [ty[:, k:k + 1] - py for k in range(3)]
    e0 = vx[1] * vy[2] - vx[2] * vy[1]
    e1 = vx[2] * vy[0] - vx[0] * vy[2]
    e2 = vx[0] * vy[1] - vx[1] * vy[0]
    z = (e0 * tz[:, :1] + e1 * tz[:, 1:2] + e2 * tz[:, 2:]) / area[:, None]
    sign = torch.sign(area)[:, None]
    inside = (e0 * sign >= 0) & (e1 * sign >= 0) & (e2 * sign >= 0) & (z >= -1) & (z <= 1) & ok[:, None]
    key = (raster._sortable_float(z) << 32) | torch.arange(len(tris))[:, None]
    key = torch.where(inside, key, torch.iinfo(torch.int64).max).amin(0)
    return torch.where(key == torch.iinfo(torch.int64).max, -1, key & 0xFFFFFFFF).view(height, width)


@pytest.mark.parametrize("one_pass_pairs", [0, 1 << 30])  # the two-pass search with the depth skip, one pass
def test_search_matches_testing_every_pixel_of_every_triangle(monkeypatch, one_pass_pairs):
    """Row spans and the back-face depth skip must not change a single pixel (slivers, near-horizontal
    edges, both windings, overlapping depths, vertices close to the camera plane)."""
    monkeypatch.setattr(raster, "_ONE_PASS_PAIRS", one_pass_pairs)
    gen = torch.Generator().manual_seed(7)
    height, width = 37, 45
    n = 240
    w = torch.rand(n, 3, generator=gen) * 2 + 0.5
    w[:20, 0] = 2e-3  # nearly at the camera plane: huge screen coordinates
    centre = torch.rand(n, 1, 2, generator=gen) * 2.4 - 1.2
    scale = torch.rand(n, 1, 1, generator=gen) ** 3 * 0.4
    ndc = centre + scale * torch.randn(n, 3, 2, generator=gen)
    ndc[20:60, :, 1] = ndc[20:60, :1, 1] + 1e-4 * torch.randn(40, 3, generator=gen)  # near-horizontal slivers
    ndc[60:80, 1] = ndc[60:80, 0] + 1e-3 * torch.randn(20, 2, generator=gen)  # near-degenerate
    z = torch.rand(n, 3, generator=gen) * 2.2 - 1.1
    pos = torch.cat([ndc * w[..., None], (z * w)[..., None], w[..., None]], -1).reshape(1, -1, 4)
    tris = torch.arange(3 * n).view(n, 3)
    tris[::2] = tris[::2].flip(1)  # both windings
    expected = brute_force_faces(pos, tris, height, width)
    assert (expected >= 0).sum() > 500 and len(expected.unique()) > 40
    assert torch.equal(raster._visible_triangles(pos, tris, height, width)[0], expected)
    sphere_verts, sphere_faces = icosphere(3)
    sphere = to_clip(sphere_verts).float()
    assert torch.equal(raster._visible_triangles(sphere, sphere_faces, height, width)[0],
                       brute_force_faces(sphere, sphere_faces, height, width))


def test_edge_topology_cache_follows_in_place_edits():
    verts, faces = icosphere(2)
    pos = to_clip(verts).float()
    rast = raster.rasterize(pos, faces, (32, 32))
    color = (rast[..., 3:4] > 0).float()
    first = raster.antialias(color, rast, pos, faces)
    torch.testing.assert_close(raster.antialias(color, rast, pos, faces), first, rtol=0, atol=0)
    faces[:, [1, 2]] = faces[:, [2, 1]].clone()  # same tensor, other winding: the cached topology must not be reused
    flipped = raster.antialias(color, raster.rasterize(pos, faces, (32, 32)), pos, faces)
    fresh = faces.clone()
    torch.testing.assert_close(flipped, raster.antialias(color, raster.rasterize(pos, fresh, (32, 32)), pos, fresh),
                               rtol=0, atol=0)


@pytest.mark.parametrize("one_pass_pairs", [0, 1 << 30])
def test_search_keeps_a_far_triangle_seen_between_nearer_ones(monkeypatch, one_pass_pairs):
    """A back-facing triangle whose bounding-box corners are hidden by nearer triangles is still drawn inside."""
    monkeypatch.setattr(raster, "_ONE_PASS_PAIRS", one_pass_pairs)
    big = [[-0.9, -0.9, 0.5, 1], [0.9, -0.9, 0.5, 1], [0.0, 0.9, 0.5, 1]]
    corners = []
    for cx, cy in ((-0.9, -0.9), (0.9, -0.9), (-0.9, 0.9), (0.9, 0.9)):
        corners += [[cx - 0.3, cy - 0.3, -0.5, 1], [cx + 0.3, cy - 0.3, -0.5, 1], [cx, cy + 0.3, -0.5, 1]]
    pos = torch.tensor([big + corners], dtype=torch.float32)
    tris = torch.arange(15).view(5, 3)
    for order in ([0, 1, 2], [0, 2, 1]):  # the big one in either winding; the small ones in both
        t = torch.cat([tris[:1, order], tris[1:], tris[1:].flip(1)])
        expected = brute_force_faces(pos, t, 24, 24)
        assert (expected == 0).sum() > 50
        assert torch.equal(raster._visible_triangles(pos, t, 24, 24)[0], expected)


def test_antialias_pair_maximum_is_the_same_dense_or_sorted(monkeypatch):
    """The per-pixel-pair outermost crossing found with a dense buffer (small images) or with unique (large)."""
    verts, faces = icosphere(3)
    pos = torch.cat([to_clip(v).float().reshape(1, -1, 4) for v in (verts, verts * 1.3)])
    pos.requires_grad_(True)
    color = torch.rand(2, 40, 48, 3, generator=torch.Generator().manual_seed(3))
    outs = []
    for dense in (1 << 30, 0):
        monkeypatch.setattr(raster, "_DENSE_PAIRS", dense)
        pos.grad = None
        rast = raster.rasterize(pos, faces, (40, 48))
        out = raster.antialias(color * (rast[..., 3:4] > 0), rast, pos, faces)
        out.sum().backward()
        outs.append((out.detach(), pos.grad.clone()))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    assert not torch.equal(outs[0][0], color * (rast[..., 3:4] > 0))  # some silhouette pixels were blended
