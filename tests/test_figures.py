"""Figures and views of the notebooks: regional bars, shape-model sections and table, k3d meshes, reconstruction."""

from __future__ import annotations

import json

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import trimesh  # noqa: E402

from workbench.display import nsm_html  # noqa: E402
from workbench.figures import mesh_sections, region_bars  # noqa: E402
from workbench.knee.meshes import write_vtk  # noqa: E402
from workbench.knee.nsm import read_saved_fits  # noqa: E402
from workbench.viewer3d import MeshLayer, knee_thickness_layers, mesh_plot, nsm_layers  # noqa: E402


def test_region_bars_draw_each_region_mean_and_a_t2_panel_when_present():
    results = {"med_tib_cart_mm_mean": 1.8, "med_tib_cart_mm_std": 0.5, "pat_cart_mm_mean": 2.3,
               "pat_cart_mm_std": 0.6, "lat_tib_cart_mm_mean": None, "pat_cart_t2_ms_mean": 38.0,
               "pat_cart_t2_ms_std": 4.0}
    fig = region_bars(results)
    thickness_ax, t2_ax = fig.axes[:2]
    heights = sorted(p.get_height() for p in thickness_ax.patches)
    assert heights == pytest.approx([1.8, 2.3])  # the region without a value is left out
    assert [t.get_text() for t in thickness_ax.get_xticklabels()] == ["med_tib", "pat"]
    assert [p.get_height() for p in t2_ax.patches] == pytest.approx([38.0])
    assert len(region_bars({"pat_cart_mm_mean": 2.0}).axes) == 1


def test_mesh_sections_cut_input_and_reconstruction_through_the_centre():
    inner = trimesh.creation.icosphere(subdivisions=3, radius=10.0)
    outer = trimesh.creation.icosphere(subdivisions=3, radius=12.0)
    fig = mesh_sections({"femur": inner}, {"femur": outer})
    for ax in fig.axes:
        inputs, recon = ax.collections
        # sections through the centre of a sphere are circles of its radius
        for collection, radius in ((inputs, 10.0), (recon, 12.0)):
            points = np.concatenate(collection.get_segments())
            assert np.linalg.norm(points, axis=1) == pytest.approx(radius, rel=0.02)
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["femur (input)", "femur (shape model)"]


def test_k3d_views_carry_the_meshes_and_their_thickness(tmp_path):
    sphere = trimesh.creation.icosphere(subdivisions=2, radius=20.0)
    thickness = np.linspace(0.0, 3.0, len(sphere.vertices))
    write_vtk(tmp_path / "femur_mesh.vtk", sphere, {"thickness_mm": thickness, "region": np.zeros(len(thickness))})
    layers = knee_thickness_layers(tmp_path)
    assert [layer.name for layer in layers] == ["femur"]  # tibia and patella absent
    plot = mesh_plot(layers + [MeshLayer("plain", sphere.vertices, sphere.faces)], colour_range=(0, 4))
    thick, plain = plot.objects
    assert np.allclose(thick.attribute, thickness, atol=1e-4) and list(thick.color_range) == [0, 4]
    assert len(plain.attribute) == 0 and plain.indices.shape == (len(sphere.faces), 3)
    views = nsm_layers({"femur": sphere}, {"femur": sphere})
    assert [v.name for v in views] == ["femur (input)", "femur (shape model)"] and views[0].opacity < 1


def test_saved_fits_are_read_back_with_their_meshes_and_tabled(tmp_path):
    sphere = trimesh.creation.icosphere(subdivisions=2, radius=20.0)
    sphere.export(tmp_path / "femur_mesh.ply")
    sphere.export(tmp_path / "NSM_bone_only_recon_femur.ply")
    (tmp_path / "NSM_bone_only_recon_params.json").write_text(json.dumps({
        "latent": [0.1, 0.2], "Bscore": None, "assd_bone_mm": 0.61, "assd_cartilage_mm": None,
        "assd_mm": {"femur": 0.61}, "assd_mean_shape_mm": {"femur": 1.37}, "iterations": 120, "seconds": 14.2,
        "stop_reason": "converged"}))
    (fit,) = read_saved_fits(tmp_path)  # no bone_and_cart fit in this folder
    assert fit.model == "bone_only" and set(fit.inputs) == set(fit.reconstructions) == {"femur"}
    assert len(fit.reconstructions["femur"].vertices) == len(sphere.vertices)
    table = nsm_html([fit])
    assert "<td>0.610</td>" in table and "<td>1.370</td>" in table and "<td>–</td>" in table  # no B-score


def test_reconstruction_views_table_and_loss_curves(tmp_path):
    from workbench.display import recon_metrics_html
    from workbench.figures import loss_curves
    from workbench.recon.mesh import write_ply
    from workbench.viewer3d import recon_layers

    sphere = trimesh.creation.icosphere(subdivisions=2)
    colours = np.zeros((len(sphere.vertices), 3), np.uint8)
    colours[:, 0] = 255  # red base colour
    (tmp_path / "nvdiffrec").mkdir()
    write_ply(tmp_path / "nvdiffrec" / "mesh.ply", sphere.vertices, sphere.faces, colours)
    (layer,) = recon_layers(tmp_path / "nvdiffrec")
    assert layer.name == "nvdiffrec" and (layer.vertex_colours == 0xFF0000).all()
    (mesh,) = mesh_plot([layer]).objects
    assert len(mesh.colors) == len(sphere.vertices) and mesh.indices.shape == (len(sphere.faces), 3)
    training = {"passes": {"pass1": {"iterations": 100, "seconds": 12.0, "loss_curve": [[0, 0.3], [99, 0.02]]},
                           "pass2": {"iterations": 20, "seconds": 2.0, "loss_curve": [[0, 0.02], [19, 0.01]]}},
                "vertices": 642, "triangles": 1280, "watertight": True}
    metrics = {"model": "nvdiffrec", "training": training, "test_views": {"psnr": 31.25, "ssim": 0.95, "n_views": 4},
               "geometry": {"fscore_1": 0.93, "fscore_0.5": 0.81, "chamfer_l1_rel": 0.0031, "genus": 1,
                            "gt_genus": 1}}
    html = recon_metrics_html(metrics)
    assert "31.25" in html and "0.930" in html and "1 (1)" in html and "pass2: iterations, seconds" in html
    fig = loss_curves(training)
    (ax,) = fig.axes
    first, second = ax.get_lines()
    assert list(second.get_xdata()) == [100, 119]  # pass 2 continues after pass 1's iterations
