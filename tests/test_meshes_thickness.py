"""Meshes from label maps (world mm, outward normals, vertex counts, files) and cartilage thickness."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import trimesh

from workbench.data import labels as L
from workbench.errors import InvalidFormat
from workbench.knee.meshes import (
    mesh_from_labels,
    read_vtk,
    smoothed_indicator,
    write_ply,
    write_vtk,
)
from workbench.knee.thickness import (
    REGION_NAMES,
    bone_thickness,
    cartilage_thickness,
    knee_thickness,
    region_names,
    region_thickness_stats,
    shell_phantom,
)

SUBREGION_NAMES = ["ant_fem_cart", "med_wb_fem_cart", "lat_wb_fem_cart", "med_post_fem_cart", "lat_post_fem_cart"]
OTHER_NAMES = ["pat_cart", "med_tib_cart", "lat_tib_cart"]


def _measure(phantom, n_vertices=4000, **kwargs):
    mesh = mesh_from_labels(phantom.labels, phantom.affine, phantom.bone_value, n_vertices=n_vertices)
    result = cartilage_thickness(mesh, phantom.labels, phantom.affine, phantom.bone_value, phantom.cartilage_value,
                                 **kwargs)
    truth = phantom.truth(mesh.vertices)
    return mesh, result, truth


def _errors(result, truth):
    covered, bare = truth > 0, truth == 0
    assert covered.sum() > 200 and bare.sum() > 50, "the phantom's evaluation zones are too small"
    error = result.thickness_mm[covered] - truth[covered]
    return {"mae": float(np.abs(error).mean()), "bias": float(error.mean()),
            "miss": float(np.mean(result.thickness_mm[covered] == 0)),
            "false_pos": float(np.mean(result.thickness_mm[bare] > 0))}


# --- thickness accuracy on shells of known thickness ------------------------------------------------

@pytest.mark.parametrize("kind, thickness, spacing", [
    ("flat", 1.0, (0.5, 0.5, 1.0)),
    ("flat", 4.0, (0.4, 0.4, 1.2)),
    ("sphere", 1.0, (0.5, 0.5, 1.0)),
    ("sphere", 2.0, (0.7, 0.7, 1.5)),
    ("sphere", 4.0, (0.4, 0.4, 1.2)),
    ("cylinder", 1.0, (0.7, 0.7, 1.5)),
    ("cylinder", 2.0, (0.5, 0.5, 1.0)),
    ("cylinder", 4.0, (0.5, 0.5, 1.0)),
])
def test_thickness_of_shells_within_a_tenth_of_a_millimetre(kind, thickness, spacing):
    phantom = shell_phantom(kind, thickness, spacing)
    _, result, truth = _measure(phantom)
    err = _errors(result, truth)
    assert err["mae"] <= 0.1, err
    assert abs(err["bias"]) <= 0.05, err
    assert err["miss"] <= 0.01 and err["false_pos"] <= 0.01, err
    # bare bone: exactly 0 and no region; covered bone: the phantom's cartilage label
    assert np.all(result.region[result.thickness_mm == 0] == 0)
    assert np.all(result.region[result.thickness_mm > 0] == L.FEM_CART)


def test_thickness_with_field_normals_agrees():
    phantom = shell_phantom("cylinder", 2.0, (0.5, 0.5, 1.0))
    _, result, truth = _measure(phantom, normals="field")
    err = _errors(result, truth)
    assert err["mae"] <= 0.1 and abs(err["bias"]) <= 0.05, err


def test_mirrored_grid_gives_outward_normals_and_same_thickness():
    plain = shell_phantom("sphere", 2.0, (0.5, 0.5, 1.0))
    flipped = shell_phantom("sphere", 2.0, (0.5, 0.5, 1.0), flip=True)
    assert np.linalg.det(flipped.affine[:3, :3]) < 0 < np.linalg.det(plain.affine[:3, :3])
    means = []
    for phantom in (plain, flipped):
        mesh, result, truth = _measure(phantom)
        assert mesh.is_watertight and mesh.volume > 0
        # the sphere is centred on the world origin: outward means pointing away from it
        radial = mesh.vertices / np.linalg.norm(mesh.vertices, axis=1, keepdims=True)
        assert np.mean(np.sum(mesh.vertex_normals * radial, axis=1) > 0.9) > 0.99
        assert np.all(np.sum(mesh.face_normals * mesh.triangles_center, axis=1) > 0)
        err = _errors(result, truth)
        assert err["mae"] <= 0.1, err
        means.append(result.thickness_mm[truth > 0].mean())
    assert abs(means[0] - means[1]) < 0.05


def test_two_cartilage_labels_are_told_apart():
    phantom = shell_phantom("sphere", 2.0, (0.5, 0.5, 1.0))
    labels = phantom.labels.copy()
    index = np.argwhere(labels == L.FEM_CART)
    x = (index @ phantom.affine[:3, :3].T + phantom.affine[:3, 3])[:, 0]
    labels[tuple(index[x < 0].T)] = L.FEM_CART_MWB
    labels[tuple(index[x >= 0].T)] = L.FEM_CART_LWB
    labels[labels == L.FEM_CART] = 0
    mesh = mesh_from_labels(labels, phantom.affine, L.FEMUR, n_vertices=4000)
    result = cartilage_thickness(mesh, labels, phantom.affine, L.FEMUR, (L.FEM_CART_MWB, L.FEM_CART_LWB))
    truth = phantom.truth(mesh.vertices)
    vx = mesh.vertices[:, 0]
    left, right = (truth > 0) & (vx < -2), (truth > 0) & (vx > 2)
    assert left.sum() > 100 and right.sum() > 100
    assert np.mean(result.region[left] == L.FEM_CART_MWB) > 0.99
    assert np.mean(result.region[right] == L.FEM_CART_LWB) > 0.99
    assert np.abs(result.thickness_mm[truth > 0] - 2.0).mean() <= 0.1


@pytest.mark.parametrize("gap_mm, measured", [(1.5, True), (4.0, False)])
def test_cartilage_detached_by_a_small_gap_is_still_measured(gap_mm, measured):
    spacing = (0.5, 0.5, 1.0)
    phantom = shell_phantom("flat", 3.0, spacing, angles_deg=(20.0, 30.0, 0.0))
    index = np.indices(phantom.labels.shape).reshape(3, -1).T
    world = index @ phantom.affine[:3, :3].T + phantom.affine[:3, 3]
    labels = phantom.labels.reshape(-1).copy()
    # lift the 3 mm cartilage off the bone (top at z = 0) by gap_mm
    labels[labels == L.FEM_CART] = 0
    lifted = (world[:, 0] > -16) & (world[:, 0] < 8) & (np.abs(world[:, 1]) < 16) & (world[:, 2] >= gap_mm) & (
        world[:, 2] < gap_mm + 3.0)
    labels[lifted] = L.FEM_CART
    labels = labels.reshape(phantom.labels.shape)
    mesh = mesh_from_labels(labels, phantom.affine, L.FEMUR, n_vertices=4000)
    result = cartilage_thickness(mesh, labels, phantom.affine, L.FEMUR, L.FEM_CART)
    truth = phantom.truth(mesh.vertices)
    covered = truth > 0
    assert np.all(result.thickness_mm[truth == 0] == 0)
    if measured:
        assert np.mean(result.thickness_mm[covered] > 0) > 0.99
        assert abs(np.median(result.thickness_mm[covered]) - 3.0) < 0.25
        assert result.n_detached >= 0.99 * covered.sum()
    else:  # too far from the bone to be its cartilage (a ray across a notch)
        assert np.all(result.thickness_mm[covered] == 0) and result.n_detached == 0


def test_no_cartilage_gives_zero_thickness_and_empty_stats():
    phantom = shell_phantom("flat", 2.0, (0.7, 0.7, 1.5))
    labels = np.where(phantom.labels == L.FEM_CART, 0, phantom.labels).astype(np.uint8)
    mesh = mesh_from_labels(labels, phantom.affine, L.FEMUR, n_vertices=2000)
    result = cartilage_thickness(mesh, labels, phantom.affine, L.FEMUR, L.FEM_CART)
    assert np.all(result.thickness_mm == 0) and np.all(result.region == 0)
    stats = region_thickness_stats(result.thickness_mm, result.region, region_names(False))
    assert stats["fem_cart_mm_mean"] is None and stats["fem_cart_mm_median"] is None


# --- meshes -----------------------------------------------------------------------------------------

def _oblique_affine(spacing, flip=False):
    angle = np.radians(30.0)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    if flip:
        rotation = rotation @ np.diag([-1.0, 1.0, 1.0])
    affine = np.eye(4)
    affine[:3, :3] = rotation * np.asarray(spacing)
    affine[:3, 3] = [-40.0, 25.0, 110.0]
    return affine


@pytest.mark.parametrize("flip", [False, True])
def test_mesh_is_in_world_millimetres(flip):
    labels = np.zeros((40, 50, 30), np.uint8)
    labels[10:30, 12:40, 5:20] = L.TIBIA
    affine = _oblique_affine((0.4, 0.5, 1.1), flip)
    mesh = mesh_from_labels(labels, affine, L.TIBIA, sigma_mm=0.0)
    assert mesh.is_watertight and mesh.volume > 0
    # unsmoothed, the 0.5 level lies half a voxel outside the labelled voxel centres
    inverse = np.linalg.inv(affine)
    index = mesh.vertices @ inverse[:3, :3].T + inverse[:3, 3]
    np.testing.assert_allclose(index.min(axis=0), [9.5, 11.5, 4.5], atol=1e-6)
    np.testing.assert_allclose(index.max(axis=0), [29.5, 39.5, 19.5], atol=1e-6)
    corners = np.array([[9.5, 11.5, 4.5], [29.5, 39.5, 19.5]]) @ affine[:3, :3].T + affine[:3, 3]
    assert np.linalg.norm(mesh.vertices.mean(axis=0) - corners.mean(axis=0)) < 0.5
    # volume of the box in mm^3 (marching cubes bevels the edges a little)
    box_volume = 20 * 28 * 15 * abs(np.linalg.det(affine[:3, :3]))
    assert 0.9 * box_volume < mesh.volume < box_volume
    assert np.all(np.sum(mesh.face_normals * (mesh.triangles_center - corners.mean(axis=0)), axis=1) > -1e-9)


def _ball(radius_mm, spacing, center_mm=(20.0, 21.0, 19.0)):
    shape = tuple(int(np.ceil(2 * c / s)) for c, s in zip(center_mm, spacing))
    index = np.indices(shape).reshape(3, -1).T * np.asarray(spacing)
    inside = np.linalg.norm(index - np.asarray(center_mm), axis=1) < radius_mm
    return inside.reshape(shape).astype(np.uint8) * L.PATELLA, np.diag([*spacing, 1.0]), np.asarray(center_mm)


@pytest.mark.parametrize("target", [1500, 6000, 20000])
def test_vertex_count_lands_near_the_target(target):
    labels, affine, center = _ball(14.0, (0.5, 0.5, 1.0))
    mesh = mesh_from_labels(labels, affine, L.PATELLA, n_vertices=target)
    assert abs(len(mesh.vertices) - target) <= 0.1 * target
    assert mesh.is_watertight and mesh.volume > 0
    radius = np.linalg.norm(mesh.vertices - center, axis=1)
    assert abs(radius.mean() - 14.0) < 0.15 and radius.std() < 0.15
    edges = mesh.edges_unique_length
    assert edges.max() < 4 * np.median(edges)  # near-uniform triangles, no slivers from the 1 mm slices


def test_repair_keeps_the_largest_piece_unless_asked():
    labels, affine, _ = _ball(10.0, (0.5, 0.5, 0.5))
    labels[2:6, 2:6, 2:6] = L.PATELLA  # a speck in a corner
    one = mesh_from_labels(labels, affine, L.PATELLA, n_vertices=3000)
    both = mesh_from_labels(labels, affine, L.PATELLA, n_vertices=3000, keep_largest=False)
    assert len(one.split(only_watertight=False)) == 1
    assert len(both.split(only_watertight=False)) == 2
    assert one.volume > 4000 and both.volume > one.volume


def test_missing_structure_is_a_clear_error():
    with pytest.raises(InvalidFormat, match="no voxel with label"):
        mesh_from_labels(np.zeros((10, 10, 10), np.uint8), np.eye(4), L.FEMUR)
    with pytest.raises(InvalidFormat):
        smoothed_indicator(np.ones((10, 10, 10), np.uint8), np.zeros((4, 4)), 1)


# --- files --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_mesh():
    labels, affine, _ = _ball(6.0, (0.5, 0.5, 0.8))
    mesh = mesh_from_labels(labels, affine, L.PATELLA, n_vertices=800)
    rng = np.random.default_rng(0)
    data = {"thickness_mm": rng.uniform(0, 4, len(mesh.vertices)).astype(np.float32),
            "region": rng.integers(0, 16, len(mesh.vertices)).astype(np.int32)}
    return mesh, data


def test_vtk_binary_layout_is_legal_legacy_polydata(tmp_path, small_mesh):
    mesh, data = small_mesh
    path = write_vtk(tmp_path / "m.vtk", mesh, data)
    raw = path.read_bytes()
    n, m = len(mesh.vertices), len(mesh.faces)
    # walk the file by hand: every keyword line, then exactly the bytes the header announces, then "\n"
    pos = 0

    def line():
        nonlocal pos
        end = raw.index(b"\n", pos)
        text, pos = raw[pos:end].decode("ascii"), end + 1
        return text

    def block(nbytes):
        nonlocal pos
        chunk = raw[pos:pos + nbytes]
        assert raw[pos + nbytes:pos + nbytes + 1] == b"\n"
        pos += nbytes + 1
        return chunk

    assert line() == "# vtk DataFile Version 4.2"
    assert 0 < len(line()) < 256
    assert line() == "BINARY"
    assert line() == "DATASET POLYDATA"
    assert line() == f"POINTS {n} float"
    points = np.frombuffer(block(12 * n), ">f4").reshape(n, 3)
    assert line() == f"POLYGONS {m} {4 * m}"
    cells = np.frombuffer(block(16 * m), ">i4").reshape(m, 4)
    assert line() == f"POINT_DATA {n}"
    assert line() == "SCALARS thickness_mm float 1"
    assert line() == "LOOKUP_TABLE default"
    thickness = np.frombuffer(block(4 * n), ">f4")
    assert line() == "FIELD FieldData 1"
    assert line() == f"region 1 {n} int"
    region = np.frombuffer(block(4 * n), ">i4")
    assert pos == len(raw)
    np.testing.assert_allclose(points, mesh.vertices, atol=1e-4)
    assert np.all(cells[:, 0] == 3) and np.array_equal(cells[:, 1:], mesh.faces)
    assert np.array_equal(thickness, data["thickness_mm"]) and np.array_equal(region, data["region"])


@pytest.mark.parametrize("binary, dataset", [(True, "polydata"), (False, "polydata"), (True, "unstructured_grid"),
                                             (False, "unstructured_grid")])
def test_vtk_round_trip(tmp_path, small_mesh, binary, dataset):
    mesh, data = small_mesh
    path = write_vtk(tmp_path / "m.vtk", mesh, data, binary=binary, dataset=dataset)
    head = path.read_bytes()[:200].decode("ascii", "replace")
    assert f"\nDATASET {dataset.upper()}\n" in head
    vertices, faces, point_data = read_vtk(path)
    np.testing.assert_allclose(vertices, mesh.vertices, atol=1e-4)
    assert np.array_equal(faces, mesh.faces)
    assert set(point_data) == {"thickness_mm", "region"}
    np.testing.assert_allclose(point_data["thickness_mm"], data["thickness_mm"], rtol=1e-6)
    assert np.array_equal(point_data["region"], data["region"])
    assert point_data["region"].dtype.kind == "i"
    if not binary:
        text = path.read_text()
        assert text.startswith("# vtk DataFile Version 4.2\n") and "\nASCII\n" in text
        assert f"POINTS {len(mesh.vertices)} float" in text and "LOOKUP_TABLE default" in text


def test_vtk_refuses_bad_point_arrays(tmp_path, small_mesh):
    mesh, _ = small_mesh
    with pytest.raises(InvalidFormat):
        write_vtk(tmp_path / "m.vtk", mesh, {"thickness_mm": np.zeros(3)})
    with pytest.raises(InvalidFormat):
        write_vtk(tmp_path / "m.vtk", mesh, {"bad name": np.zeros(len(mesh.vertices))})


def test_ply_round_trip_through_trimesh(tmp_path, small_mesh):
    mesh, data = small_mesh
    path = write_ply(tmp_path / "m.ply", mesh, data)
    header = path.read_bytes().split(b"end_header\n")[0].decode("ascii")
    assert "format binary_little_endian 1.0" in header
    assert "property float thickness_mm" in header and "property int region" in header
    loaded = trimesh.load(path, process=False)
    np.testing.assert_allclose(loaded.vertices, mesh.vertices, atol=1e-4)
    assert np.array_equal(loaded.faces, mesh.faces)
    records = loaded.metadata["_ply_raw"]["vertex"]["data"]
    np.testing.assert_allclose(records["thickness_mm"].ravel(), data["thickness_mm"])
    assert np.array_equal(records["region"].ravel(), data["region"])
    # the same bytes by hand: first vertex record and first face
    body = path.read_bytes().split(b"end_header\n", 1)[1]
    x, y, z, t, r = struct.unpack("<ffffi", body[:20])
    np.testing.assert_allclose([x, y, z], mesh.vertices[0], atol=1e-4)
    assert (t, r) == (pytest.approx(float(data["thickness_mm"][0])), int(data["region"][0]))


# --- regional statistics and whole bones -----------------------------------------------------------

def test_region_stats_fields_and_values():
    names = region_names(subregions=True)
    assert sorted(names.values()) == sorted(SUBREGION_NAMES + OTHER_NAMES)
    assert sorted(region_names(subregions=False).values()) == sorted(["fem_cart"] + OTHER_NAMES)
    thickness = np.array([1.0, 2.0, 3.0, 0.0, 4.0, np.nan, 2.5])
    region = np.array([L.FEM_CART_ANT, L.FEM_CART_ANT, L.FEM_CART_ANT, L.FEM_CART_ANT, L.PAT_CART, L.PAT_CART, 0])
    stats = region_thickness_stats(thickness, region)  # subregions present: subregion names
    expected = {f"{n}_mm_{s}" for n in SUBREGION_NAMES + OTHER_NAMES for s in ("mean", "std", "median")}
    assert set(stats) == expected
    assert stats["ant_fem_cart_mm_mean"] == pytest.approx(2.0)
    assert stats["ant_fem_cart_mm_std"] == pytest.approx(np.std([1.0, 2.0, 3.0]))
    assert stats["ant_fem_cart_mm_median"] == pytest.approx(2.0)
    assert stats["pat_cart_mm_mean"] == pytest.approx(4.0) and stats["pat_cart_mm_std"] == 0.0
    assert stats["med_tib_cart_mm_mean"] is None
    plain = region_thickness_stats(np.array([1.5]), np.array([L.FEM_CART]))
    assert "fem_cart_mm_mean" in plain and "ant_fem_cart_mm_mean" not in plain
    assert plain["fem_cart_mm_median"] == pytest.approx(1.5)
    assert set(REGION_NAMES.values()) == set(SUBREGION_NAMES + OTHER_NAMES + ["fem_cart"])
    with pytest.raises(InvalidFormat):
        region_thickness_stats(np.zeros(3), np.zeros(2))


def test_knee_thickness_on_a_synthetic_knee():
    """A femur (sphere, two subregions) and a tibia (slab) in one label map; no patella."""
    spacing = (0.6, 0.6, 1.0)
    femur = shell_phantom("sphere", 2.0, spacing, radius_mm=12.0)
    labels = femur.labels.copy()
    index = np.argwhere(labels == L.FEM_CART)
    x = (index @ femur.affine[:3, :3].T + femur.affine[:3, 3])[:, 0]
    labels[tuple(index[x < 0].T)] = L.FEM_CART_ANT
    labels[tuple(index[x >= 0].T)] = L.FEM_CART_MWB
    world = np.indices(labels.shape).reshape(3, -1).T @ femur.affine[:3, :3].T + femur.affine[:3, 3]
    tibia = ((np.abs(world[:, 0]) < 14) & (np.abs(world[:, 1]) < 14) & (world[:, 2] > -17.5)
             & (world[:, 2] < -14.5)).reshape(labels.shape)
    cart = ((np.abs(world[:, 0]) < 10) & (np.abs(world[:, 1]) < 10) & (world[:, 2] >= -14.5)
            & (world[:, 2] < -13.0)).reshape(labels.shape)
    labels[tibia & (labels == 0)] = L.TIBIA
    labels[cart & (labels == 0)] = L.MED_TIB_CART
    bones, stats = knee_thickness(labels, femur.affine, n_vertices={"femur": 4000, "tibia": 3000})
    assert set(bones) == {"femur", "tibia"}
    for result in bones.values():
        data = result.point_data()
        assert set(data) == {"thickness_mm", "region"} and len(data["region"]) == len(result.mesh.vertices)
        assert result.mesh.is_watertight and result.mesh.volume > 0
    assert stats["ant_fem_cart_mm_mean"] == pytest.approx(2.0, abs=0.15)
    assert stats["med_wb_fem_cart_mm_mean"] == pytest.approx(2.0, abs=0.15)
    assert stats["med_tib_cart_mm_median"] == pytest.approx(1.5, abs=0.2)
    assert stats["lat_tib_cart_mm_mean"] is None and stats["pat_cart_mm_mean"] is None
    assert "fem_cart_mm_mean" not in stats
    with pytest.raises(InvalidFormat):
        bone_thickness(labels, femur.affine, "fibula")


def test_real_knee_patella(mskt_dir):
    from workbench.io.nifti import read_label_map

    volume = read_label_map(mskt_dir / "right_knee_example.nrrd")
    labels = L.remap_labels(volume.data, L.MSKT_RIGHT_KNEE_EXAMPLE)
    result = bone_thickness(labels, volume.affine, "patella", n_vertices=3000)
    mesh = result.mesh
    assert mesh.is_watertight and 10_000 < mesh.volume < 40_000  # mm^3: a patella is 10-40 ml
    # the mesh covers the patella's voxel centres in world mm (to within a voxel)
    voxels = np.argwhere(labels == L.PATELLA)
    world = voxels @ volume.affine[:3, :3].T + volume.affine[:3, 3]
    np.testing.assert_allclose(mesh.bounds[0], world.min(axis=0), atol=1.0)
    np.testing.assert_allclose(mesh.bounds[1], world.max(axis=0), atol=1.0)
    covered = result.thickness_mm > 0
    assert 0.15 < covered.mean() < 0.6
    assert set(np.unique(result.region[covered])) == {L.PAT_CART}
    assert 1.0 < np.median(result.thickness_mm[covered]) < 4.0
