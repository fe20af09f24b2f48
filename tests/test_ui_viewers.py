"""Slice viewer, static 3-D pictures, k3d snapshots, view_3d and the results panel (no browser)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from workbench.ui.viewers import (
    SliceViewer,
    mesh_png,
    slice_rgb,
    view_3d,
    write_k3d_snapshot,
)
from workbench.viewer3d import MeshLayer

# ----------------------------------------------------------------------------------------------------------------
# helpers


def _volume(shape=(6, 8, 10)):
    """An image whose value encodes the voxel index (i*100 + j*10 + k)."""
    i, j, k = np.indices(shape)
    return (i * 100 + j * 10 + k).astype(np.float32)


def _torus(sections=(60, 30)):
    import trimesh

    mesh = trimesh.creation.torus(major_radius=20, minor_radius=6, major_sections=sections[0],
                                  minor_sections=sections[1])
    return np.asarray(mesh.vertices), np.asarray(mesh.faces)


def _read_png(path):
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"))


def _png_array(data: bytes):
    import io

    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


# ----------------------------------------------------------------------------------------------------------------
# slice_rgb


def test_slice_rgb_orientation_matches_orthogonal_slices():
    image = _volume()
    lo, hi = float(image.min()), float(image.max())
    for axis, (rows_axis, cols_axis) in enumerate(((2, 1), (2, 0), (1, 0))):
        rgb = slice_rgb(image, None, axis, 2, window=(lo, hi))
        assert rgb.dtype == np.uint8 and rgb.shape == (image.shape[rows_axis], image.shape[cols_axis], 3)
        grey = rgb[..., 0].astype(int)
        assert np.all(rgb[..., 0] == rgb[..., 1])
        # transposed with the origin at the bottom: values grow to the right and upwards
        assert grey[-1, -1] > grey[-1, 0] and grey[0, 0] > grey[-1, 0]
        expected = np.flipud(np.take(image, 2, axis=axis).T)
        np.testing.assert_allclose(grey, np.round((expected - lo) / (hi - lo) * 255), atol=1)


def test_slice_rgb_default_window_is_percentiles():
    image = np.zeros((5, 5, 5), np.float32)
    image[..., 2:] = 100.0
    image[0, 0, 4] = 1e6  # an outlier does not wash the slice out
    rgb = slice_rgb(image, None, 0, 2)
    assert rgb[..., 0].min() == 0 and rgb[..., 0].max() == 255
    assert np.count_nonzero(rgb[..., 0] == 255) >= 10


def test_slice_rgb_label_colours_and_opacity():
    from workbench.figures import _label_cmap

    image = np.zeros((4, 5, 6), np.float32)
    labels = np.zeros(image.shape, np.uint8)
    labels[1, 2, 3] = 2  # femoral cartilage
    labels[1, 4, 0] = 9  # patella
    window = (0.0, 1.0)
    colours = np.round(np.asarray(_label_cmap().colors)[:, :3] * 255)
    full = slice_rgb(image, labels, 0, 1, opacity=1.0, window=window)
    # voxel (j=2, k=3) is at column 2, row (K-1-3) after the transpose and flip
    np.testing.assert_array_equal(full[6 - 1 - 3, 2], colours[2])
    np.testing.assert_array_equal(full[6 - 1 - 0, 4], colours[9])
    assert np.count_nonzero(full.any(axis=2)) == 2  # label 0 is transparent
    half = slice_rgb(image, labels, 0, 1, opacity=0.5, window=window)
    np.testing.assert_allclose(half[2, 2], np.round(colours[2] * 0.5), atol=1)
    none = slice_rgb(image, labels, 0, 1, opacity=0.0, window=window)
    assert not none.any()
    other = slice_rgb(image, labels, 0, 0, opacity=1.0, window=window)
    assert not other.any()


def test_slice_rgb_validates():
    image = _volume()
    with pytest.raises(ValueError, match="out of range"):
        slice_rgb(image, None, 0, 6)
    with pytest.raises(ValueError, match="out of range"):
        slice_rgb(image, None, 2, -1)
    with pytest.raises(ValueError, match="axis"):
        slice_rgb(image, None, 3, 0)
    with pytest.raises(ValueError, match="shape"):
        slice_rgb(image, np.zeros((2, 2, 2), np.uint8), 0, 0)
    with pytest.raises(ValueError, match="3-D"):
        slice_rgb(image[0], None, 0, 0)


# ----------------------------------------------------------------------------------------------------------------
# SliceViewer


def test_slice_viewer_slider_and_axis():
    image = _volume((6, 8, 10))
    labels = (image > 400).astype(np.uint8) * 7
    viewer = SliceViewer(image, labels, spacing=(1.0, 1.0, 2.0), title="case")
    assert "wb-slice-viewer" in viewer.widget._dom_classes
    assert viewer.axis.value == 0 and viewer.slider.value == 3 and viewer.slider.max == 5
    first = viewer.picture.value
    assert first[:8] == b"\x89PNG\r\n\x1a\n"
    shown = _png_array(first)
    assert max(shown.shape[:2]) >= 300  # small slices are upscaled
    # sagittal: 8 columns of 1 mm, 10 rows of 2 mm → taller than wide (20 mm vs 8 mm)
    assert shown.shape[0] / shown.shape[1] == pytest.approx(20 / 8, rel=0.05)

    viewer.slider.value = 1
    assert viewer.picture.value != first
    viewer.opacity.value = 0.0
    plain = viewer.picture.value
    viewer.opacity.value = 0.8
    viewer.slider.value = 5
    with_labels = viewer.picture.value
    viewer.show_labels.value = False
    assert viewer.picture.value != with_labels

    viewer.axis.value = 2
    assert viewer.slider.max == 9 and viewer.slider.value == 5
    assert _png_array(viewer.picture.value).shape[0] / _png_array(viewer.picture.value).shape[1] == \
        pytest.approx(8 / 6, rel=0.05)
    viewer.slider.value = 9
    viewer.axis.value = 0
    assert viewer.slider.max == 5 and viewer.slider.value == 3
    assert plain != first
    bundle = viewer._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle


def test_slice_viewer_without_labels_and_from_files(tmp_path):
    from workbench.io.nifti import write_nifti

    image = _volume((5, 6, 7))
    viewer = SliceViewer(image)
    assert viewer.show_labels.disabled and viewer.opacity.disabled
    affine = np.diag([0.5, 0.5, 1.5, 1.0])
    write_nifti(image, affine, tmp_path / "img.nii.gz")
    write_nifti((image > 300).astype(np.uint8), affine, tmp_path / "lab.nii.gz", dtype=np.uint8)
    viewer = SliceViewer.from_files(tmp_path / "img.nii.gz", tmp_path / "lab.nii.gz")
    assert viewer.spacing == pytest.approx((0.5, 0.5, 1.5))
    assert viewer.labels.shape == image.shape and viewer.labels.max() == 1
    with pytest.raises(ValueError, match="shape"):
        SliceViewer(image, np.zeros((1, 1, 1)))


# ----------------------------------------------------------------------------------------------------------------
# mesh_png, k3d snapshots, view_3d


def test_mesh_png_scalars_plain_and_translucent(tmp_path):
    vertices, faces = _torus()
    scalars = (vertices[:, 2] + 6) / 3  # 0-4 over the torus' height
    coloured = mesh_png([MeshLayer("t", vertices, faces, scalars=scalars)], tmp_path / "a.png", title="torus")
    picture = _read_png(coloured)
    assert picture.shape == (450, 900, 3)
    non_white = picture[(picture < 245).any(axis=2)]
    assert len(non_white) > 10_000
    colours = {tuple(c) for c in (non_white // 32)}
    assert len(colours) > 10  # a colour map, not one colour
    assert not list(tmp_path.glob(".*tmp"))

    plain = _read_png(mesh_png([MeshLayer("t", vertices, faces, colour=0xD62728)], tmp_path / "b.png",
                               size=(600, 300)))
    assert plain.shape == (300, 600, 3)
    body = plain[(plain < 245).any(axis=2)].astype(int)
    assert np.all(body[:, 0] >= body[:, 1])  # red shaded, no colour map
    # vertex colours and a translucent layer over an opaque one
    rgb = np.where(vertices[:, 0] > 0, 0x00FF00, 0x0000FF)
    layers = [MeshLayer("t", vertices, faces, vertex_colours=rgb),
              MeshLayer("shell", vertices * 1.3, faces, colour=0x888888, opacity=0.3)]
    both = _read_png(mesh_png(layers, tmp_path / "c.png"))
    body = both[(both < 245).any(axis=2)].astype(int)
    assert (body[:, 1] > body[:, 0] + 40).any() and (body[:, 2] > body[:, 0] + 40).any()
    empty = _read_png(mesh_png([], tmp_path / "d.png"))
    assert empty.shape == (450, 900, 3)


def test_mesh_png_no_holes_on_a_fine_mesh(tmp_path):
    import trimesh

    sphere = trimesh.creation.icosphere(subdivisions=5, radius=10.0)  # 20k faces, ~2-pixel triangles
    picture = _read_png(mesh_png([MeshLayer("s", sphere.vertices, sphere.faces)], tmp_path / "s.png",
                                 size=(400, 200)))
    view = picture[:, :200]
    inside = view[90:130, 80:120]
    assert (inside < 250).all()  # the middle of the sphere is grey everywhere: no pin holes


def test_write_k3d_snapshot_is_offline(tmp_path):
    from workbench.viewer3d import mesh_plot

    vertices, faces = _torus((20, 10))
    plot = mesh_plot([MeshLayer("t", vertices, faces, scalars=vertices[:, 2])])
    path = write_k3d_snapshot(plot, tmp_path / "t_3d.html")
    text = path.read_text(encoding="utf-8")
    assert "<html" in text.lower() and len(text) > 100_000
    assert not re.search(r"<script[^>]*src=[\"']?https?://", text, re.IGNORECASE)
    assert not list(tmp_path.glob(".*tmp"))


@pytest.mark.parametrize("interactive", [False, True])
def test_view_3d_writes_both_files(tmp_path, monkeypatch, interactive):
    import IPython.display

    shown = []
    monkeypatch.setattr(IPython.display, "display", lambda *objs, **kw: shown.extend(objs))
    monkeypatch.chdir(tmp_path)
    vertices, faces = _torus((24, 12))
    paths = view_3d([MeshLayer("t", vertices, faces, scalars=vertices[:, 2] + 6)], tmp_path / "run", "thickness",
                    interactive=interactive, title="thickness", colour_map="viridis")
    assert paths == {"png": tmp_path / "run" / "thickness.png", "html": tmp_path / "run" / "thickness_3d.html"}
    assert all(p.is_file() and p.stat().st_size > 1000 for p in paths.values())
    if interactive:
        from k3d.plot import Plot

        assert len(shown) == 1 and isinstance(shown[0], Plot)
    else:
        image, link = shown
        assert isinstance(image, IPython.display.Image)
        assert 'href="run/thickness_3d.html"' in link.data
        assert "open the 3-D view (thickness_3d.html, works offline)" in link.data


def test_view_3d_link_is_relative_to_the_run_folder(tmp_path, monkeypatch):
    import IPython.display

    shown = []
    monkeypatch.setattr(IPython.display, "display", lambda *objs, **kw: shown.extend(objs))
    monkeypatch.chdir(tmp_path)
    vertices, faces = _torus((16, 8))
    view_3d([MeshLayer("t", vertices, faces)], ".", "mesh", interactive=False, colour_map="Viridis")
    assert 'href="mesh_3d.html"' in shown[1].data
    with pytest.raises(ValueError, match="colour map"):
        view_3d([MeshLayer("t", vertices, faces)], ".", "bad", interactive=False, colour_map="no-such-map")


# ----------------------------------------------------------------------------------------------------------------
# results panel


def _result(pipeline: str, status: str = "ok", models=(), error=None, steps=()) -> dict:
    return {
        "schema_version": 1, "status": status, "pipeline": pipeline, "models": list(models), "parameters": {},
        "error": error, "steps": [dict({"model": None, "seconds": 1.0, "peak_rss_mb": 100.0, "peak_gpu_mb": None,
                                        "gpu_after_mb": None, "error": None}, **s) for s in steps],
        "outputs": [], "metrics": {}, "versions": {}, "device": "cpu", "started": "2024-01-01T00:00:00+00:00",
        "ended": "2024-01-01T00:00:05+00:00", "seconds": 5.0,
    }


@pytest.fixture
def knee_run(tmp_path):
    import trimesh

    from workbench.io.nifti import write_nifti
    from workbench.knee.meshes import write_vtk

    run = tmp_path / "knee-run"
    run.mkdir()
    case = "sub01"
    image = _volume((8, 9, 10))
    labels = np.zeros(image.shape, np.uint8)
    labels[2:5, 3:6, 4:7] = 7
    affine = np.diag([0.5, 0.5, 1.0, 1.0])
    write_nifti(image, affine, run / f"{case}_image.nii.gz")
    write_nifti(labels, affine, run / f"{case}_all-labels.nii.gz", dtype=np.uint8)
    (run / "input.json").write_text(json.dumps({"case": case, "shape": list(image.shape)}))
    (run / "result.json").write_text(json.dumps(_result("knee", steps=[{"name": "load_input", "status": "ok"}])))
    sphere = trimesh.creation.icosphere(subdivisions=2, radius=10.0)
    write_vtk(run / "femur_mesh.vtk", sphere, {"thickness_mm": np.linspace(0, 4, len(sphere.vertices))})
    (run / f"{case}_results.json").write_text(json.dumps({
        "case": case, "results": {"fem_cart_mm_mean": 2.1, "fem_cart_mm_std": 0.3, "fem_cart_mm_median": 2.0},
        "units": {}, "steps": {"thickness": "ok"}}))
    (run / "report.html").write_text("<html></html>")
    return run


def test_results_panel_knee_run(knee_run, monkeypatch):
    import ipywidgets as widgets

    from workbench.ui.results import panel_sections, results_panel

    monkeypatch.chdir(knee_run.parent)
    assert panel_sections(knee_run) == ["summary", "report", "slices", "meshes", "results"]
    panel = results_panel(knee_run)
    assert isinstance(panel, widgets.VBox) and "wb-results" in panel._dom_classes
    texts = " ".join(c.value for c in panel.children if isinstance(c, widgets.HTML))
    assert "<b>status:</b> ok" in texts
    assert 'href="knee-run/report.html"' in texts and "open the HTML report" in texts
    assert "fem_cart" in texts and "could not show" not in texts
    assert any("wb-slice-viewer" in getattr(c, "_dom_classes", ()) for c in panel.children)
    from k3d.plot import Plot

    assert any(isinstance(c, Plot) for c in panel.children)
    # an explicit link wins
    panel = results_panel(knee_run, report_href="reports/x.html")
    assert 'href="reports/x.html"' in " ".join(c.value for c in panel.children if isinstance(c, widgets.HTML))


def test_results_panel_tolerates_a_broken_file(knee_run):
    import ipywidgets as widgets

    from workbench.ui.results import results_panel

    (knee_run / "sub01_results.json").write_text("{not json")
    (knee_run / "sub01_image.nii.gz").write_bytes(b"broken")
    panel = results_panel(knee_run)
    notes = [c.value for c in panel.children if isinstance(c, widgets.HTML) and "could not show" in c.value]
    assert len(notes) == 2 and all("\n" not in n for n in notes)


def test_results_panel_failed_recon_run(tmp_path):
    import ipywidgets as widgets

    from workbench.ui.results import panel_sections, results_panel

    run = tmp_path / "recon-run"
    run.mkdir()
    error = {"code": "RECONSTRUCTION_FAILED", "message": "the loss became NaN", "hint": "lower the learning rate",
             "step": "nvdiffrec"}
    (run / "result.json").write_text(json.dumps(_result(
        "recon", status="failed", models=["nvdiffrec"], error=error,
        steps=[{"name": "load_input", "status": "ok"}, {"name": "nvdiffrec", "status": "failed", "error": error}])))
    assert panel_sections(run) == ["summary"]
    panel = results_panel(run)
    text = " ".join(c.value for c in panel.children if isinstance(c, widgets.HTML))
    assert "<b>status:</b> failed" in text and "RECONSTRUCTION_FAILED" in text and "lower the learning rate" in text

    # a partly finished model folder: metrics and a preview, no mesh
    (run / "nvdiffrec").mkdir()
    (run / "nvdiffrec" / "metrics.json").write_text(json.dumps({"model": "nvdiffrec", "test_views": {"psnr": 31.5}}))
    mesh_png([], run / "nvdiffrec" / "preview_pass1.png", size=(80, 40))
    assert panel_sections(run) == ["summary", "previews:nvdiffrec", "metrics:nvdiffrec"]
    panel = results_panel(run)
    assert any(isinstance(c, widgets.Image) for c in panel.children)
    assert "31.50" in " ".join(c.value for c in panel.children if isinstance(c, widgets.HTML))


def test_results_panel_recon_mesh_and_missing_result(tmp_path):
    import trimesh
    from k3d.plot import Plot

    from workbench.ui.results import panel_sections, results_panel

    run = tmp_path / "recon-ok"
    (run / "nvdiffrec").mkdir(parents=True)
    (run / "result.json").write_text(json.dumps(_result("recon", models=["nvdiffrec"])))
    mesh = trimesh.creation.box()
    mesh.visual.vertex_colors = np.tile([200, 30, 30, 255], (len(mesh.vertices), 1)).astype(np.uint8)
    mesh.export(run / "nvdiffrec" / "mesh.ply")
    assert panel_sections(run) == ["summary", "mesh:nvdiffrec"]
    panel = results_panel(run)
    assert any(isinstance(c, Plot) for c in panel.children)

    empty = tmp_path / "empty"
    empty.mkdir()
    assert panel_sections(empty) == ["summary"]
    assert "no readable result.json" in results_panel(empty).children[1].value
