"""Cube-map environment light, split-sum shading, BSDF LUT and Radiance HDR IO (workbench.recon.render.light)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from workbench.errors import InputNotFound, InvalidFormat
from workbench.recon.render import light as L


@pytest.fixture(autouse=True)
def _cache_and_seed(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    yield


def _unit(v) -> torch.Tensor:
    v = torch.as_tensor(v, dtype=torch.float32)
    return v / v.norm(dim=-1, keepdim=True)


def _random_dirs(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return _unit(torch.randn(n, 3, generator=g))


def _local_frame_quadrature(n: torch.Tensor, n_theta: int, n_phi: int, theta_max: float = math.pi / 2):
    """Midpoint quadrature over the cap of half-angle theta_max around unit n: (dirs [M, 3], cosθ [M], dω [M]), float64."""
    n = n.double()
    helper = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64) if abs(n[0]) < 0.9 else torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)
    t1 = torch.linalg.cross(n, helper)
    t1 = t1 / t1.norm()
    t2 = torch.linalg.cross(n, t1)
    dth, dph = theta_max / n_theta, 2 * math.pi / n_phi
    th = (torch.arange(n_theta, dtype=torch.float64) + 0.5) * dth
    ph = (torch.arange(n_phi, dtype=torch.float64) + 0.5) * dph
    th, ph = torch.meshgrid(th, ph, indexing="ij")
    th, ph = th.reshape(-1), ph.reshape(-1)
    dirs = (th.sin() * ph.cos())[:, None] * t1 + (th.sin() * ph.sin())[:, None] * t2 + th.cos()[:, None] * n
    return dirs, th.cos(), th.sin() * dth * dph


# --------------------------------------------------------------------------------------------------
# cube maps
# --------------------------------------------------------------------------------------------------


def test_cube_dirs_follow_the_opengl_table():
    d = L.cube_dirs(8)
    assert d.shape == (6, 8, 8, 3)
    assert torch.allclose(d.norm(dim=-1), torch.ones(6, 8, 8), atol=1e-6)
    axes = torch.tensor([[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]], dtype=torch.float32)
    for f in range(6):
        assert ((d[f] * axes[f]).sum(-1) > 0.5).all(), f
    # top-left texel (row 0, col 0) of each face, sign pattern of OpenGL's (sc, tc) table
    expected = [(1, 1, 1), (-1, 1, -1), (-1, 1, -1), (-1, -1, 1), (-1, 1, 1), (1, 1, -1)]
    for f, sign in enumerate(expected):
        assert torch.equal(torch.sign(d[f, 0, 0]), torch.tensor(sign, dtype=torch.float32)), f


def test_solid_angles_cover_the_sphere():
    omega = L._cube_solid_angles(16)
    assert omega.shape == (6, 16, 16)
    assert float(omega.sum()) == pytest.approx(4 * math.pi, rel=1e-5)


def test_cube_lookup_hits_the_right_face_and_texel():
    res = 8
    dirs = L.cube_dirs(res)
    # texel centres return the texel exactly, for an arbitrary field
    field = torch.rand(6, res, res, 4)
    assert torch.allclose(L.cube_lookup(field, dirs), field, atol=1e-6)
    # a face-id field: any direction reads the face of its major axis
    face_id = torch.arange(6, dtype=torch.float32)[:, None, None, None].expand(6, res, res, 1).contiguous()
    q = _random_dirs(2000)
    got = L.cube_lookup(face_id, q)[:, 0]
    major = q.abs().argmax(-1)
    want = 2 * major + (q.gather(1, major[:, None])[:, 0] < 0).long()
    assert torch.equal(got, want.float())
    # a direction field interpolates to (nearly) the query direction, also across seams
    res = 32
    out = L.cube_lookup(L.cube_dirs(res), q)
    assert (out - q).norm(dim=-1).max() < 0.05


def test_cube_lookup_edges_and_degenerate_inputs_are_finite():
    cube = torch.rand(6, 4, 4, 3, requires_grad=True)
    q = torch.tensor([[1, 1, 1], [1, -1, 0], [0, 0, 1], [0, 0, 0], [-1, 1, -1], [1e-9, 0, 0]], dtype=torch.float32)
    out = L.cube_lookup(cube, q)
    assert out.shape == (6, 3) and torch.isfinite(out).all()
    out.sum().backward()
    assert torch.isfinite(cube.grad).all()
    # batched leading dims
    assert L.cube_lookup(cube, torch.randn(2, 3, 5, 3)).shape == (2, 3, 5, 3)


def test_cube_lookup_mip_blends_levels():
    levels = [torch.full((6, 8, 8, 1), 1.0), torch.full((6, 4, 4, 1), 3.0), torch.full((6, 2, 2, 1), 7.0)]
    q = _random_dirs(5)
    lf = torch.tensor([0.0, 0.25, 1.0, 1.5, 9.0])
    out = L.cube_lookup_mip(levels, q, lf)[:, 0]
    assert torch.allclose(out, torch.tensor([1.0, 1.5, 3.0, 5.0, 7.0]))


def _smooth(d: torch.Tensor) -> torch.Tensor:
    x, y, z = d.unbind(-1)
    return torch.stack([1 + 0.5 * x, 1 + 0.3 * y + 0.2 * z * z, 0.5 + 0.4 * x * y + 0.3 * z], -1)


def test_latlong_convention_and_round_trip():
    d = L.latlong_dirs(64, 128)
    assert d.shape == (64, 128, 3)
    assert d[0, 64, 1] > 0.99  # top row looks up
    assert torch.allclose(d[32, 64], torch.tensor([0.0, 0.0, -1.0]), atol=0.06)  # centre looks down -z
    img = _smooth(L.latlong_dirs(128, 256))
    env = L.EnvironmentLight.from_latlong(img, resolution=32)
    assert env.base.shape == (6, 32, 32, 3)
    assert (env.base.detach() - _smooth(L.cube_dirs(32))).abs().max() < 1e-2
    back = env.to_latlong(128)
    assert back.shape == (64, 128, 3)
    assert (back - _smooth(L.latlong_dirs(64, 128))).abs().max() < 2e-2


# --------------------------------------------------------------------------------------------------
# split-sum BRDF table
# --------------------------------------------------------------------------------------------------


def _brute_env_brdf(ndotv: float, roughness: float) -> tuple[float, float]:
    """∫ (1−Fc, Fc) · D G / (4 n·v) dω_l over the hemisphere by midpoint quadrature (n = +z)."""
    n = torch.tensor([0.0, 0.0, 1.0])
    dirs, nl, domega = _local_frame_quadrature(n, 1200, 256)
    v = torch.tensor([math.sqrt(1 - ndotv * ndotv), 0.0, ndotv], dtype=torch.float64)
    h = dirs + v
    h = h / h.norm(dim=-1, keepdim=True)
    nh, vh = h[:, 2], (h * v).sum(-1)
    alpha = roughness**2
    d = alpha**2 / (math.pi * (nh * nh * (alpha**2 - 1) + 1) ** 2)
    k = alpha / 2
    g = (ndotv / (ndotv * (1 - k) + k)) * (nl / (nl * (1 - k) + k))
    fc = (1 - vh) ** 5
    base = d * g / (4 * ndotv) * domega
    return float(((1 - fc) * base).sum()), float((fc * base).sum())


def test_bsdf_lut_matches_numerical_integration(tmp_path):
    res = 32
    lut = L.bsdf_lut(res, 1024)
    assert lut.shape == (res, res, 2) and lut.dtype == torch.float32
    assert torch.isfinite(lut).all() and (lut >= 0).all() and (lut.sum(-1) <= 1.0 + 1e-3).all()
    for i, j in [(9, 6), (15, 28), (22, 12), (31, 31), (27, 3)]:
        rough, ndotv = (i + 0.5) / res, (j + 0.5) / res
        a, b = _brute_env_brdf(ndotv, rough)
        assert float(lut[i, j, 0]) == pytest.approx(a, abs=1e-2), (i, j)
        assert float(lut[i, j, 1]) == pytest.approx(b, abs=1e-2), (i, j)
    # smooth mirror seen head-on reflects everything: A + B -> 1, B -> 0
    assert float(lut[0, -1].sum()) == pytest.approx(1.0, abs=1e-2)
    assert float(lut[0, -1, 1]) < 1e-3
    # cached in memory and on disk (under $WORKBENCH_CACHE)
    assert L.bsdf_lut(res, 1024) is lut
    files = list((tmp_path / "cache" / "recon").glob("bsdf_lut_*.npy"))
    assert len(files) == 1
    assert np.allclose(np.load(files[0]), lut.numpy())


# --------------------------------------------------------------------------------------------------
# prefiltering
# --------------------------------------------------------------------------------------------------


def test_constant_environment_prefilters_to_itself():
    value = torch.tensor([0.3, 0.6, 1.2])
    env = L.EnvironmentLight(value.expand(6, 32, 32, 3).clone())
    env.build_mips()
    assert [s.shape[1] for s in env.specular] == [32, 16]
    assert env.level_roughness() == [pytest.approx(0.08), pytest.approx(0.5)]
    for level in env.specular:
        assert torch.allclose(level, value.expand_as(level), rtol=1e-4)
    assert torch.allclose(env.diffuse, value.expand_as(env.diffuse), rtol=1e-4)


def test_diffuse_irradiance_of_a_sky_matches_cosine_integration():
    d = L.cube_dirs(32)
    env = L.EnvironmentLight((d[..., 1:2] > 0).float().expand(6, 32, 32, 3).contiguous())
    env.build_mips()
    normals = _unit([[0, 1, 0], [0, -1, 0], [1, 0, 0], [1, 1, 0], [0.3, -0.5, 0.8], [-0.2, 0.9, -0.4]])
    got = L.cube_lookup(env.diffuse, normals)[:, 0].detach()
    for n, g in zip(normals, got):
        dirs, cos, domega = _local_frame_quadrature(n, 400, 400)
        brute = float(((dirs[:, 1] > 0).double() * cos * domega).sum() / math.pi)
        assert brute == pytest.approx((1 + float(n[1])) / 2, abs=2e-3)  # the closed form, as a check of the check
        assert float(g.detach()) == pytest.approx(brute, abs=0.03)


def _blob(d: torch.Tensor) -> torch.Tensor:
    axis = torch.tensor([0.6, 0.7, -0.4], dtype=d.dtype)
    axis = axis / axis.norm()
    return 0.1 + torch.exp(4.0 * ((d * axis).sum(-1) - 1.0))


def _brute_ggx_prefilter(n: torch.Tensor, alpha: float) -> float:
    dirs, cos, domega = _local_frame_quadrature(n, 900, 360)
    nh = torch.sqrt((1 + cos) / 2)
    w = alpha**2 / (math.pi * (nh * nh * (alpha**2 - 1) + 1) ** 2) * cos * domega
    return float((_blob(dirs) * w).sum() / w.sum())


@pytest.mark.parametrize("level", [1, 2])
def test_specular_prefilter_matches_brute_force_ggx(level):
    env = L.EnvironmentLight(_blob(L.cube_dirs(32))[..., None].expand(6, 32, 32, 3).contiguous(), min_res=8)
    env.build_mips()
    assert [s.shape[1] for s in env.specular] == [32, 16, 8]
    rough = env.level_roughness()[level]
    assert rough == pytest.approx([0.08, 0.29, 0.5][level])
    out, res = env.specular[level].detach(), env.specular[level].shape[1]
    centres = L.cube_dirs(res)
    peak = _unit([0.6, 0.7, -0.4])
    picks = [(2, res // 2, res // 2), (0, 1, res - 2), (5, res // 2, 1), (4, res - 1, res // 2)]
    # the texel nearest the blob's peak, where the lobe matters most
    flat = (centres.reshape(-1, 3) @ peak).argmax()
    picks.append(tuple(int(v) for v in np.unravel_index(int(flat), (6, res, res))))
    for f, i, j in picks:
        brute = _brute_ggx_prefilter(centres[f, i, j], rough**2)
        assert float(out[f, i, j, 0]) == pytest.approx(brute, rel=0.04), (f, i, j)


def test_mips_are_differentiable_and_follow_in_place_updates():
    env = L.create_trainable_env(32, device="cpu")
    assert env.base.shape == (6, 32, 32, 3) and env.base.requires_grad
    assert float(env.base.detach().min()) >= 0.25 and float(env.base.detach().max()) <= 0.75
    env.build_mips()
    loss = sum(s.square().sum() for s in env.specular) + env.diffuse.sum()
    loss.backward()
    assert torch.isfinite(env.base.grad).all() and env.base.grad.abs().sum() > 0
    old = env.specular[0].detach().clone()
    with torch.no_grad():
        env.base.mul_(2.0)
    n = _unit(torch.tensor([[[[0.0, 1.0, 0.0]]]]))
    env.shade(torch.zeros(1, 1, 1, 3), n, torch.ones(1, 1, 1, 3), torch.tensor([[[[0.0, 0.5, 0.0]]]]), torch.tensor([[[[0.0, 2.0, 0.0]]]]))
    assert torch.allclose(env.specular[0], 2 * old, rtol=1e-5)  # rebuilt after the in-place change


def test_get_mip_maps_roughness_to_levels():
    env = L.EnvironmentLight(torch.ones(6, 64, 64, 3))
    assert env.mip_sizes() == [64, 32, 16]
    lf = env.get_mip(torch.tensor([0.0, 0.08, 0.29, 0.5, 1.0]))
    assert torch.allclose(lf, torch.tensor([0.0, 0.0, 1.0, 2.0, 2.0]), atol=1e-5)


# --------------------------------------------------------------------------------------------------
# shading
# --------------------------------------------------------------------------------------------------


def _gbuffer(h: int = 4, w: int = 5):
    g = torch.Generator().manual_seed(1)
    pos = (torch.rand(1, h, w, 3, generator=g) - 0.5) * 0.5
    normal = torch.randn(1, h, w, 3, generator=g)
    normal[..., 2] = normal[..., 2].abs() + 0.3  # facing the camera on +z
    normal = normal / normal.norm(dim=-1, keepdim=True)
    kd = torch.rand(1, h, w, 3, generator=g)
    view = torch.tensor([0.0, 0.0, 3.0]).reshape(1, 1, 1, 3)
    return pos, normal, kd, view


def test_shade_constant_white_environment():
    value = 0.7
    env = L.EnvironmentLight(torch.full((6, 16, 16, 3), value))
    pos, normal, kd, view = _gbuffer()
    ks = torch.zeros_like(kd)
    ks[..., 1] = 1.0  # occlusion 0, roughness 1, metalness 0
    out = env.shade(pos, normal, kd, ks, view)
    assert out.shape == kd.shape
    wo = view - pos
    ndotv = ((wo / wo.norm(dim=-1, keepdim=True)) * normal).sum(-1).reshape(-1)
    ab = L._env_brdf(ndotv, torch.ones_like(ndotv), 4096).float().reshape(1, 4, 5, 2)
    want = kd * value + value * (0.04 * ab[..., 0:1] + ab[..., 1:2])
    assert torch.allclose(out, want, atol=1e-2)
    ks[..., 0] = 1.0
    assert torch.allclose(env.shade(pos, normal, kd, ks, view), torch.zeros_like(kd))


def test_shade_metal_mirror_reflects_the_environment():
    env = L.EnvironmentLight(torch.full((6, 16, 16, 3), 2.0))
    pos, normal, kd, view = _gbuffer()
    ks = torch.zeros_like(kd)
    ks[..., 2] = 1.0  # metal, roughness 0 -> F0 = kd, A ~ 1, B ~ Schlick's grazing term
    out = env.shade(pos, normal, kd, ks, view)
    wo = view - pos
    ndotv = ((wo / wo.norm(dim=-1, keepdim=True)) * normal).sum(-1).reshape(-1)
    ab = L._env_brdf(ndotv, torch.full_like(ndotv, 0.5 / 128), 4096).float().reshape(1, 4, 5, 2)
    assert torch.allclose(out, 2.0 * (kd * ab[..., 0:1] + ab[..., 1:2]), atol=2e-2)
    assert (ab.sum(-1) > 0.98).all()  # a smooth mirror loses no energy


def test_shade_gradients_reach_everything():
    env = L.create_trainable_env(16)
    pos, normal, kd, view = _gbuffer()
    normal = normal.clone().requires_grad_(True)
    kd = kd.clone().requires_grad_(True)
    g = torch.Generator().manual_seed(2)
    ks = (torch.rand(1, 4, 5, 3, generator=g) * torch.tensor([0.5, 0.8, 1.0]) + torch.tensor([0.0, 0.1, 0.0])).requires_grad_(True)
    out = env.shade(pos, normal, kd, ks, view)
    (out * torch.rand(out.shape, generator=g)).sum().backward()
    for name, t in [("base", env.base), ("kd", kd), ("ks", ks), ("normal", normal)]:
        assert t.grad is not None and torch.isfinite(t.grad).all(), name
        assert t.grad.abs().sum() > 0, name
    # background pixels with zero normals stay finite
    out = env.shade(pos, torch.zeros_like(normal), kd.detach(), ks.detach(), view)
    assert torch.isfinite(out).all()


def test_regularizer_and_clamp():
    grey = L.EnvironmentLight(torch.rand(6, 16, 16, 1).expand(6, 16, 16, 3).contiguous())
    assert float(grey.regularizer().detach()) == pytest.approx(0.0, abs=1e-7)
    coloured = L.EnvironmentLight(torch.rand(6, 16, 16, 3) - 0.3)
    assert float(coloured.regularizer().detach()) > 0.01
    coloured.clamp_(min=0.0)
    assert float(coloured.base.detach().min()) == 0.0


# --------------------------------------------------------------------------------------------------
# Radiance HDR
# --------------------------------------------------------------------------------------------------


def _hdr_image(h: int, w: int) -> np.ndarray:
    rng = np.random.default_rng(3)
    img = np.exp(rng.normal(0, 3, (h, w, 3))).astype(np.float32)
    img[0, :4] = 0.0
    img[1, :] = [0.5, 2.0, 300.0]  # a constant row exercises the run-length runs
    return img


@pytest.mark.parametrize("rle", [False, True])
def test_hdr_round_trip(tmp_path, rle):
    img = _hdr_image(7, 40)
    path = L.write_hdr(tmp_path / "x.hdr", img, rle=rle)
    raw = path.read_bytes()
    assert raw.startswith(b"#?RADIANCE\nFORMAT=32-bit_rle_rgbe\n\n-Y 7 +X 40\n")
    if not rle:
        assert len(raw) == len(b"#?RADIANCE\nFORMAT=32-bit_rle_rgbe\n\n-Y 7 +X 40\n") + 7 * 40 * 4
    back = L.read_hdr(path)
    assert back.shape == (7, 40, 3) and back.dtype == np.float32
    tol = img.max(-1, keepdims=True) / 128.0
    assert (np.abs(back - img) <= tol).all()
    assert (back[0, :4] == 0).all()


def test_read_hdr_decodes_hand_written_rle(tmp_path):
    # one 8-pixel scanline: R a run of 128s, G literal 0..7 (x16), B a run of 2 then 6 literals, E a run of 129
    body = bytes([2, 2, 0, 8, 136, 128, 8, *[16 * i for i in range(8)], 130, 64, 6, 1, 2, 3, 4, 5, 6, 136, 129])
    path = tmp_path / "rle.hdr"
    path.write_bytes(b"#?RGBE\nEXPOSURE=1.0\nFORMAT=32-bit_rle_rgbe\n\n-Y 1 +X 8\n" + body)
    img = L.read_hdr(path)
    scale = 2.0 ** (129 - 136)
    assert np.allclose(img[0, :, 0], (128 + 0.5) * scale)
    assert np.allclose(img[0, :, 1], (np.arange(8) * 16 + 0.5) * scale)
    assert np.allclose(img[0, :, 2], (np.array([64, 64, 1, 2, 3, 4, 5, 6]) + 0.5) * scale)


def test_read_hdr_errors(tmp_path):
    with pytest.raises(InputNotFound):
        L.read_hdr(tmp_path / "missing.hdr")
    bad = tmp_path / "bad.hdr"
    bad.write_bytes(b"P6\n1 1\n255\n\0\0\0")
    with pytest.raises(InvalidFormat):
        L.read_hdr(bad)
    short = tmp_path / "short.hdr"
    short.write_bytes(b"#?RADIANCE\nFORMAT=32-bit_rle_rgbe\n\n-Y 4 +X 4\n" + b"\0" * 10)
    with pytest.raises(InvalidFormat):
        L.read_hdr(short)


def test_probe_save_load_round_trip(tmp_path):
    env = L.EnvironmentLight(_smooth(L.cube_dirs(16)) * 3.0)
    path = L.save_probe_hdr(env, tmp_path / "probe.hdr", width=128)
    assert L.read_hdr(path).shape == (64, 128, 3)
    back = L.load_probe_hdr(path, 16)
    assert isinstance(back, L.EnvironmentLight) and back.base.shape == (6, 16, 16, 3)
    assert (back.base.detach() - env.base.detach()).abs().max() < 0.1
