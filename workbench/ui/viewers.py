"""Viewers for notebooks and reports: a slice viewer, static 3-D pictures and standalone k3d snapshots.

* :func:`slice_rgb` and :class:`SliceViewer`: a volume with its label map, one slice at a time (ipywidgets);
* :func:`mesh_png`: a static picture of the layers :func:`workbench.viewer3d.mesh_plot` shows, from two
  sides, drawn by a small numpy z-buffer rasteriser (no GPU, no display);
* :func:`write_k3d_snapshot`: a k3d plot as one HTML file that opens offline;
* :func:`view_3d`: what notebooks call for every 3-D view: writes the picture and the snapshot, then shows
  the live plot (interactive) or the picture and a link to the snapshot (headless reports).

No pipeline logic here: everything takes arrays, layers or file paths.
"""

from __future__ import annotations

import html
import io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from workbench.viewer3d import MeshLayer

__all__ = ["SliceViewer", "mesh_png", "slice_rgb", "view_3d", "write_k3d_snapshot"]

AXIS_NAMES = ("sagittal", "coronal", "axial")

# --------------------------------------------------------------------------------------------------------------
# slices


def _label_colours() -> np.ndarray:
    """(16, 3) float RGB in 0-1 of label values 0-15, the colours of :func:`workbench.figures._label_cmap`."""
    from workbench.figures import _label_cmap

    return np.asarray(_label_cmap().colors, dtype=np.float64)[:, :3]


def _window(image: np.ndarray) -> tuple[float, float]:
    """The 1st-99th percentile of ``image`` (finite values), widened when flat."""
    finite = np.asarray(image, dtype=np.float32)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = (float(v) for v in np.percentile(finite, [1, 99]))
    if hi <= lo:
        hi = lo + 1.0
    return lo, hi


def _take(array: np.ndarray, axis: int, index: int) -> np.ndarray:
    """One slice as :func:`workbench.figures.orthogonal_slices` shows it: transposed, origin at the bottom."""
    return np.flipud(np.take(array, index, axis=axis).T)


def slice_rgb(image: np.ndarray, labels: np.ndarray | None, axis: int, index: int, opacity: float = 0.5,
              window: tuple[float, float] | None = None) -> np.ndarray:
    """One slice of ``image`` in grey with ``labels`` blended over it, as an ``(H, W, 3)`` uint8 picture.

    The slice is oriented as :func:`workbench.figures.orthogonal_slices` draws it (the
    two remaining voxel axes as horizontal and vertical, the vertical one pointing
    up); for a canonical (RAS) volume: sagittal (axis 0) shows anterior to the right
    and superior up.  Labels use the label table's colours (0 is transparent).

    Args:
        image: a 3-D array.
        labels: an integer array of the same shape, or None.
        axis: 0, 1 or 2.
        index: the slice along ``axis``.
        opacity: of the label colours, 0-1.
        window: grey levels shown black and white; default the volume's 1st-99th percentile.

    Raises:
        ValueError: not a 3-D image, labels of another shape, or an axis or index out of range.
    """
    image = np.asarray(image)
    if image.ndim != 3:
        raise ValueError(f"slice_rgb needs a 3-D image, got shape {image.shape}")
    if axis not in (0, 1, 2):
        raise ValueError(f"axis must be 0, 1 or 2, got {axis!r}")
    size = image.shape[axis]
    if not 0 <= int(index) < size:
        raise ValueError(f"slice index {index} is out of range for axis {axis} ({AXIS_NAMES[axis]}): 0-{size - 1}")
    if labels is not None and np.shape(labels) != image.shape:
        raise ValueError(f"labels have shape {np.shape(labels)} but the image has shape {image.shape}")
    lo, hi = _window(image) if window is None else (float(window[0]), float(window[1]))
    grey = _take(image, axis, int(index)).astype(np.float64)
    grey = np.clip((np.nan_to_num(grey, nan=lo) - lo) / max(hi - lo, 1e-12), 0.0, 1.0)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    if labels is not None and opacity > 0:
        lab = _take(np.asarray(labels), axis, int(index)).astype(np.int64)
        shown = lab > 0
        colours = _label_colours()[np.clip(lab, 0, 15)]
        alpha = float(np.clip(opacity, 0.0, 1.0))
        rgb[shown] = rgb[shown] * (1.0 - alpha) + colours[shown] * alpha
    return np.round(rgb * 255.0).astype(np.uint8)


def _png_bytes(rgb: np.ndarray) -> bytes:
    """An RGB(A) uint8 array as PNG bytes."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _upscale(rgb: np.ndarray, pixel_mm: tuple[float, float], target: int = 420) -> np.ndarray:
    """Nearest-neighbour resize so the longer side is about ``target`` pixels and pixels have their mm aspect."""
    h, w = rgb.shape[:2]
    height_mm, width_mm = h * pixel_mm[0], w * pixel_mm[1]
    scale = target / max(height_mm, width_mm, 1e-9)
    out_h, out_w = max(1, round(height_mm * scale)), max(1, round(width_mm * scale))
    rows = np.minimum((np.arange(out_h) + 0.5) * h / out_h, h - 1).astype(np.int64)
    cols = np.minimum((np.arange(out_w) + 0.5) * w / out_w, w - 1).astype(np.int64)
    return rgb[rows[:, None], cols[None, :]]


class SliceViewer:
    """An ipywidgets viewer of a volume and an optional label map, one slice at a time.

    Controls: the slice direction (sagittal, coronal, axial), the slice, the label
    opacity and whether to show labels.  ``display(viewer)`` or ``viewer.widget``
    shows it; it starts at the middle slice of axis 0.

    Args:
        image: a 3-D array (canonical RAS for the direction names to be right).
        labels: an integer array of the same shape, or None.
        spacing: voxel size in mm along each axis (sets the pixel aspect).
        title: shown above the slice.
    """

    def __init__(self, image: np.ndarray, labels: np.ndarray | None = None,
                 spacing: Sequence[float] = (1.0, 1.0, 1.0), title: str = ""):
        import ipywidgets as widgets

        self.image = np.asarray(image)
        if self.image.ndim != 3:
            raise ValueError(f"SliceViewer needs a 3-D image, got shape {self.image.shape}")
        self.labels = None if labels is None else np.asarray(labels)
        if self.labels is not None and self.labels.shape != self.image.shape:
            raise ValueError(f"labels have shape {self.labels.shape} but the image has shape {self.image.shape}")
        self.spacing = tuple(float(s) for s in spacing)
        self.window = _window(self.image)

        self.axis = widgets.ToggleButtons(options=[(name, i) for i, name in enumerate(AXIS_NAMES)], value=0,
                                          description="view")
        self.slider = widgets.IntSlider(value=self.image.shape[0] // 2, min=0, max=self.image.shape[0] - 1,
                                        description="slice", continuous_update=True)
        self.opacity = widgets.FloatSlider(value=0.5, min=0.0, max=1.0, step=0.05, description="opacity",
                                           continuous_update=True, disabled=self.labels is None)
        self.show_labels = widgets.Checkbox(value=self.labels is not None, description="show labels",
                                            disabled=self.labels is None)
        self.picture = widgets.Image(format="png")
        self.caption = widgets.HTML()
        self.axis.observe(self._on_axis, names="value")
        for control in (self.slider, self.opacity, self.show_labels):
            control.observe(self._render, names="value")
        children = [widgets.HTML(f"<b>{html.escape(title)}</b>")] if title else []
        children += [self.axis, widgets.HBox([self.slider, self.opacity, self.show_labels]), self.picture,
                     self.caption]
        self.widget = widgets.VBox(children)
        self.widget.add_class("wb-slice-viewer")
        self._render()

    @classmethod
    def from_files(cls, image_path: str | os.PathLike, labels_path: str | os.PathLike | None = None,
                   title: str | None = None) -> SliceViewer:
        """A viewer of an image file and an optional label file (anything :func:`load_volume` reads)."""
        from workbench.io.load import load_volume

        volume = load_volume(image_path)
        labels = None
        if labels_path is not None:
            labels = load_volume(labels_path).data.astype(np.int16)
        return cls(volume.data, labels, spacing=volume.spacing,
                   title=Path(image_path).name if title is None else title)

    def rgb(self) -> np.ndarray:
        """The current slice as :func:`slice_rgb` draws it (before upscaling)."""
        labels = self.labels if self.show_labels.value else None
        return slice_rgb(self.image, labels, self.axis.value, self.slider.value, self.opacity.value, self.window)

    def _on_axis(self, change=None) -> None:
        size = self.image.shape[self.axis.value]
        with self.slider.hold_trait_notifications():
            self.slider.value = min(self.slider.value, size - 1)
            self.slider.max = size - 1
            self.slider.value = size // 2
        self._render()

    def _render(self, change=None) -> None:
        axis = self.axis.value
        horizontal, vertical = [a for a in range(3) if a != axis]
        rgb = _upscale(self.rgb(), (self.spacing[vertical], self.spacing[horizontal]))
        self.picture.value = _png_bytes(rgb)
        self.picture.width, self.picture.height = str(rgb.shape[1]), str(rgb.shape[0])
        self.caption.value = (f"<small>{AXIS_NAMES[axis]} slice {self.slider.value} of "
                              f"{self.image.shape[axis]}</small>")

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)


# --------------------------------------------------------------------------------------------------------------
# static 3-D pictures


def _atomic_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _mpl_colour_map(name: str):
    """A matplotlib colour map by name, any case."""
    import matplotlib

    names = {n.lower(): n for n in matplotlib.colormaps}
    if name.lower() not in names:
        raise ValueError(f"unknown colour map {name!r}; use a matplotlib colour map name such as 'viridis'")
    return matplotlib.colormaps[names[name.lower()]]


def _k3d_colour_map_name(name: str) -> str:
    """The attribute of ``k3d.colormaps.matplotlib_color_maps`` named ``name`` in any case."""
    from k3d.colormaps import matplotlib_color_maps

    names = {n.lower(): n for n in dir(matplotlib_color_maps) if not n.startswith("_")}
    if name.lower() not in names:
        raise ValueError(f"k3d has no colour map {name!r}; use a matplotlib colour map name such as 'viridis'")
    return names[name.lower()]


def _vertex_rgb(layer: MeshLayer, cmap, colour_range: tuple[float, float]) -> np.ndarray:
    """(N, 3) float RGB 0-1 per vertex, as mesh_plot colours the layer."""
    n = len(layer.vertices)
    if layer.scalars is not None:
        lo, hi = float(colour_range[0]), float(colour_range[1])
        values = np.asarray(layer.scalars, dtype=np.float64)
        t = np.clip((np.nan_to_num(values, nan=lo) - lo) / max(hi - lo, 1e-12), 0.0, 1.0)
        return np.asarray(cmap(t))[:, :3]
    if layer.vertex_colours is not None:
        c = np.asarray(layer.vertex_colours, dtype=np.int64)
    else:
        c = np.full(n, int(layer.colour), dtype=np.int64)
    return np.stack([(c >> 16) & 255, (c >> 8) & 255, c & 255], axis=1) / 255.0


def _vertex_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Area-weighted unit vertex normals."""
    tri = vertices[faces]
    face_n = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    normals = np.stack([np.bincount(faces.ravel(), np.repeat(face_n[:, k], 3), minlength=len(vertices))
                        for k in range(3)], axis=1)
    length = np.linalg.norm(normals, axis=1, keepdims=True)
    return normals / np.where(length > 0, length, 1.0)


def _view_rotation(azimuth_deg: float, elevation_deg: float) -> np.ndarray:
    """Rows: the screen's right, up and into-the-screen directions, +z (superior) up.

    Azimuth 0 looks from +y (anterior in RAS) towards the centre, positive azimuth turns the camera towards +x.
    """
    az, el = np.radians(azimuth_deg), np.radians(elevation_deg)
    forward = -np.array([np.cos(el) * np.sin(az), np.cos(el) * np.cos(az), np.sin(el)])  # camera -> centre
    right = np.cross(forward, [0.0, 0.0, 1.0])
    right /= np.linalg.norm(right)
    up = np.cross(right, forward)
    return np.stack([right, up, forward])


def _rasterise(xy: np.ndarray, z: np.ndarray, rgb: np.ndarray, height: int, width: int,
               budget: int = 2_000_000) -> tuple[np.ndarray, np.ndarray]:
    """Z-buffer triangles: ``xy`` (M, 3, 2) pixel coordinates, ``z`` (M, 3) depth, ``rgb`` (M, 3, 3) colours.

    Returns ``(depth (H, W), rgb (H, W, 3))`` with depth ``inf`` where nothing was drawn.
    Vectorised by triangle size: each triangle tests the pixel centres of its
    bounding box; colours and depth are interpolated (Gouraud).
    """
    depth = np.full(height * width, np.inf)
    image = np.zeros((height * width, 3))
    x0 = np.clip(np.ceil(xy[..., 0].min(1) - 0.5), 0, width).astype(np.int64)
    x1 = np.clip(np.floor(xy[..., 0].max(1) - 0.5), -1, width - 1).astype(np.int64)
    y0 = np.clip(np.ceil(xy[..., 1].min(1) - 0.5), 0, height).astype(np.int64)
    y1 = np.clip(np.floor(xy[..., 1].max(1) - 0.5), -1, height - 1).astype(np.int64)
    bw, bh = x1 - x0 + 1, y1 - y0 + 1
    area = ((xy[:, 1, 0] - xy[:, 0, 0]) * (xy[:, 2, 1] - xy[:, 0, 1])
            - (xy[:, 2, 0] - xy[:, 0, 0]) * (xy[:, 1, 1] - xy[:, 0, 1]))
    keep = (bw > 0) & (bh > 0) & (np.abs(area) > 1e-12)
    side = np.maximum(bw, bh)
    bucket = np.ceil(np.log2(np.maximum(side, 1))).astype(np.int64)
    pixels, depths, colours = [], [], []
    for b in np.unique(bucket[keep]):
        s = 1 << int(b)
        grid_y, grid_x = np.divmod(np.arange(s * s), s)
        ids = np.flatnonzero(keep & (bucket == b))
        step = max(1, budget // (s * s))
        for start in range(0, len(ids), step):
            t = ids[start:start + step]
            px = x0[t, None] + grid_x[None, :]
            py = y0[t, None] + grid_y[None, :]
            valid = (grid_x[None, :] < bw[t, None]) & (grid_y[None, :] < bh[t, None])
            cx, cy = px + 0.5, py + 0.5
            a, bb, c = xy[t, 0], xy[t, 1], xy[t, 2]
            inv = 1.0 / area[t, None]
            w0 = ((bb[:, 0, None] - cx) * (c[:, 1, None] - cy) - (c[:, 0, None] - cx) * (bb[:, 1, None] - cy)) * inv
            w1 = ((c[:, 0, None] - cx) * (a[:, 1, None] - cy) - (a[:, 0, None] - cx) * (c[:, 1, None] - cy)) * inv
            w2 = 1.0 - w0 - w1
            inside = valid & (w0 >= -1e-7) & (w1 >= -1e-7) & (w2 >= -1e-7)
            rows, cols = np.nonzero(inside)
            if rows.size == 0:
                continue
            tri = t[rows]
            w = np.stack([w0[rows, cols], w1[rows, cols], w2[rows, cols]], axis=1)
            pixels.append(py[rows, cols] * width + px[rows, cols])
            depths.append(np.einsum("ij,ij->i", w, z[tri]))
            colours.append(np.einsum("ij,ijk->ik", w, rgb[tri]))
    if pixels:
        pix, dep, col = np.concatenate(pixels), np.concatenate(depths), np.concatenate(colours)
        order = np.lexsort((dep, pix))
        pix, dep, col = pix[order], dep[order], col[order]
        first = np.ones(len(pix), bool)
        first[1:] = pix[1:] != pix[:-1]
        depth[pix[first]] = dep[first]
        image[pix[first]] = col[first]
    return depth.reshape(height, width), image.reshape(height, width, 3)


def _render_view(layers: list[MeshLayer], colours: list[np.ndarray], normals: list[np.ndarray],
                 rotation: np.ndarray, centre: np.ndarray, radius: float, height: int, width: int,
                 supersample: int = 2) -> np.ndarray:
    """One view of the layers as (H, W, 3) float RGB on white, with a headlight (Lambert, two-sided)."""
    hs, ws = height * supersample, width * supersample
    scale = 0.46 * min(hs, ws) / max(radius, 1e-9)

    def draw(indices: list[int]) -> tuple[np.ndarray, np.ndarray]:
        xy_all, z_all, rgb_all = [], [], []
        for i in indices:
            layer = layers[i]
            cam = (np.asarray(layer.vertices, np.float64) - centre) @ rotation.T
            shade = 0.25 + 0.75 * np.abs(normals[i] @ rotation[2])
            vertex_rgb = colours[i] * shade[:, None]
            screen = np.stack([ws / 2 + cam[:, 0] * scale, hs / 2 - cam[:, 1] * scale], axis=1)
            faces = np.asarray(layer.faces, np.int64)
            xy_all.append(screen[faces])
            z_all.append(cam[faces, 2])
            rgb_all.append(vertex_rgb[faces])
        if not xy_all:
            return np.full((hs, ws), np.inf), np.ones((hs, ws, 3))
        return _rasterise(np.concatenate(xy_all), np.concatenate(z_all), np.concatenate(rgb_all), hs, ws)

    opaque = [i for i, layer in enumerate(layers) if layer.opacity >= 1.0]
    depth, image = draw(opaque)
    image[~np.isfinite(depth)] = 1.0
    for i, layer in enumerate(layers):
        if layer.opacity >= 1.0 or layer.opacity <= 0.0:
            continue
        d, rgb = draw([i])
        front = np.isfinite(d) & (d < depth)
        alpha = float(layer.opacity)
        image[front] = image[front] * (1.0 - alpha) + rgb[front] * alpha
    if supersample > 1:
        image = image.reshape(height, supersample, width, supersample, 3).mean(axis=(1, 3))
    return image


def mesh_png(layers: Sequence[MeshLayer], path: str | os.PathLike, *,
             colour_range: tuple[float, float] = (0.0, 4.0), colour_map: str = "viridis",
             size: tuple[int, int] = (900, 450), title: str | None = None) -> Path:
    """A static picture of ``layers`` as :func:`workbench.viewer3d.mesh_plot` colours them, from two sides.

    Scalars are coloured by ``colour_map`` (a matplotlib name, any case) over
    ``colour_range``; other layers by their ``vertex_colours`` or ``colour``;
    translucent layers are blended over the opaque ones.  The two views look at
    the meshes from the front (+y, anterior in RAS) and from the back, a little
    from the side and from above, superior (+z) up,
    with a light at the camera.  A colour bar is added when a layer has scalars.
    Runs on the CPU with numpy and matplotlib's Agg canvas; the PNG is written
    atomically.

    Args:
        layers: the meshes.
        path: the PNG to write.
        colour_range: scalar values at the ends of the colour map.
        colour_map: matplotlib colour map name.
        size: (width, height) of the picture in pixels.
        title: drawn at the top.

    Returns:
        ``path``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    path = Path(path)
    layers = [layer for layer in layers if len(layer.faces) and len(layer.vertices)]
    cmap = _mpl_colour_map(colour_map)
    has_scalars = any(layer.scalars is not None for layer in layers)
    width, height = int(size[0]), int(size[1])
    fig = Figure(figsize=(width / 100, height / 100), dpi=100)
    FigureCanvasAgg(fig)
    top = 0.9 if title else 0.95
    bar = 0.09 if has_scalars else 0.0
    panel_w = (1.0 - bar - 0.02) / 2
    panel_h = top - 0.06
    view_w, view_h = max(8, int(panel_w * width)), max(8, int(panel_h * height))

    if layers:
        everything = np.concatenate([np.asarray(layer.vertices, np.float64) for layer in layers])
        centre = (everything.min(0) + everything.max(0)) / 2
        radius = float(np.linalg.norm(everything - centre, axis=1).max())
        colours = [_vertex_rgb(layer, cmap, colour_range) for layer in layers]
        normals = [_vertex_normals(np.asarray(layer.vertices, np.float64), np.asarray(layer.faces, np.int64))
                   for layer in layers]
    for k, (name, azimuth, elevation) in enumerate((("front", -30.0, 20.0), ("back", 150.0, 20.0))):
        ax = fig.add_axes((0.01 + k * panel_w, 0.02, panel_w, panel_h))
        ax.set_axis_off()
        ax.set_title(name, fontsize=9)
        if layers:
            picture = _render_view(layers, colours, normals, _view_rotation(azimuth, elevation), centre, radius,
                                   view_h, view_w)
        else:
            picture = np.ones((view_h, view_w, 3))
            ax.text(0.5, 0.5, "no meshes", ha="center", va="center", transform=ax.transAxes)
        ax.imshow(np.clip(picture, 0, 1), interpolation="nearest")
    if has_scalars:
        cax = fig.add_axes((1.0 - bar + 0.01, 0.12, 0.018, panel_h - 0.15))
        mappable = ScalarMappable(norm=Normalize(*colour_range), cmap=cmap)
        fig.colorbar(mappable, cax=cax)
    if title:
        fig.suptitle(title, fontsize=11)
    tmp = _atomic_path(path)
    try:
        fig.savefig(tmp, format="png", dpi=100, facecolor="white")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


# --------------------------------------------------------------------------------------------------------------
# k3d snapshots and the 3-D view of notebooks


def write_k3d_snapshot(plot, path: str | os.PathLike) -> Path:
    """Write ``plot`` (a k3d plot) as one standalone HTML file with its JavaScript inlined; return the path.

    The file opens offline in any browser (k3d's ``"full"`` snapshot); written atomically.
    """
    path = Path(path)
    plot.snapshot_type = "full"
    text = plot.get_snapshot()
    tmp = _atomic_path(path)
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def view_3d(layers: Sequence[MeshLayer], folder: str | os.PathLike, name: str, *, interactive: bool,
            title: str | None = None, colour_range: tuple[float, float] = (0.0, 4.0),
            colour_map: str = "Viridis") -> dict[str, Path]:
    """Show a 3-D view in a notebook and keep it: the function notebooks call for every 3-D view.

    Always writes ``<folder>/<name>.png`` (:func:`mesh_png`) and ``<folder>/<name>_3d.html``
    (a standalone k3d snapshot of :func:`workbench.viewer3d.mesh_plot`).  Then shows
    the live k3d plot when ``interactive``; otherwise (a headless run that becomes
    the HTML report) the picture and a link to the snapshot, relative to the
    current folder (notebooks run in their run folder, next to ``report.html``).

    Args:
        layers: the meshes.
        folder: where the files go.
        name: file name stem.
        interactive: a live kernel with a front end (show the k3d widget).
        title: above the picture.
        colour_range: scalar values at the ends of the colour map.
        colour_map: a colour map name (matplotlib's, any case: "viridis" or "Viridis").

    Returns:
        ``{"png": path, "html": path}``.
    """
    from IPython.display import HTML, Image, display

    from workbench.viewer3d import mesh_plot

    layers = list(layers)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    png = mesh_png(layers, folder / f"{name}.png", colour_range=colour_range, colour_map=colour_map, title=title)
    plot = mesh_plot(layers, colour_range=colour_range, colour_map=_k3d_colour_map_name(colour_map))
    page = write_k3d_snapshot(plot, folder / f"{name}_3d.html")
    if interactive:
        display(plot)
    else:
        href = Path(os.path.relpath(page.resolve(), Path.cwd().resolve())).as_posix()
        display(Image(filename=str(png)))
        display(HTML(f'<a href="{html.escape(href)}" target="_blank">open the 3-D view '
                     f'({html.escape(page.name)}, works offline)</a>'))
    return {"png": png, "html": page}
