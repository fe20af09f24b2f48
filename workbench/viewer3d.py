"""Interactive 3-D mesh views for JupyterLab (k3d), with per-vertex colour maps.

Interactive widgets need a live kernel: notebooks show them when run
interactively and show the static PNG figures in headless reports (an
exported k3d widget would load its JavaScript from the network).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class MeshLayer:
    """One mesh of a view.

    Attributes:
        name: shown in the k3d object list.
        vertices: (N, 3) in mm.
        faces: (M, 3) vertex indices.
        scalars: optional (N,) values coloured by the plot's colour map (None: plain ``colour``).
        colour: 0xRRGGBB for meshes without scalars.
        opacity: 0-1.
        vertex_colours: optional (N,) 0xRRGGBB per vertex (e.g. a baked base colour), used when no scalars.
    """

    name: str
    vertices: np.ndarray
    faces: np.ndarray
    scalars: np.ndarray | None = None
    colour: int = 0xBBBBBB
    opacity: float = 1.0
    vertex_colours: np.ndarray | None = None


def mesh_plot(layers: Iterable[MeshLayer], *, colour_range: tuple[float, float] = (0.0, 4.0),
              colour_map: str = "Viridis", height: int = 480):
    """A k3d plot of ``layers``; scalars share ``colour_range`` and the matplotlib colour map ``colour_map``.

    Raises:
        ImportError: k3d is not installed (it is part of the workbench environment).
    """
    import k3d
    from k3d.colormaps import matplotlib_color_maps

    plot = k3d.plot(height=height, grid_visible=False, camera_auto_fit=True)
    cmap = getattr(matplotlib_color_maps, colour_map)
    for layer in layers:
        kwargs = dict(vertices=np.asarray(layer.vertices, np.float32), indices=np.asarray(layer.faces, np.uint32),
                      name=layer.name, opacity=float(layer.opacity), flat_shading=False)
        if layer.scalars is not None:
            kwargs.update(attribute=np.asarray(layer.scalars, np.float32), color_map=cmap,
                          color_range=[float(colour_range[0]), float(colour_range[1])])
        elif layer.vertex_colours is not None:
            kwargs.update(colors=np.asarray(layer.vertex_colours, np.uint32))
        else:
            kwargs.update(color=int(layer.colour))
        plot += k3d.mesh(**kwargs)
    return plot


def knee_thickness_layers(run_folder: str | Path, bones: Iterable[str] = ("femur", "tibia", "patella"),
                          ) -> list[MeshLayer]:
    """The bone meshes of a knee run (``<bone>_mesh.vtk``) coloured by their ``thickness_mm`` point array."""
    from workbench.knee.meshes import read_vtk

    layers = []
    for bone in bones:
        path = Path(run_folder) / f"{bone}_mesh.vtk"
        if path.is_file():
            vertices, faces, arrays = read_vtk(path)
            layers.append(MeshLayer(bone, vertices, faces, arrays.get("thickness_mm")))
    return layers


def nsm_layers(inputs: dict, reconstructions: dict) -> list[MeshLayer]:
    """Input surfaces (translucent grey) with their shape-model reconstructions (coloured), trimesh meshes."""
    colours = (0xD62728, 0x1F77B4, 0x2CA02C)
    layers = [MeshLayer(f"{n} (input)", m.vertices, m.faces, colour=0x888888, opacity=0.35) for n, m in inputs.items()]
    layers += [MeshLayer(f"{n} (shape model)", m.vertices, m.faces, colour=colours[i % 3])
               for i, (n, m) in enumerate(reconstructions.items())]
    return layers


def recon_layers(model_folder: str | Path) -> list[MeshLayer]:
    """The reconstructed mesh (``mesh.ply``) with its baked base colour, for :func:`mesh_plot`."""
    import trimesh

    mesh = trimesh.load(str(Path(model_folder) / "mesh.ply"), force="mesh", process=False)
    rgb = np.asarray(mesh.visual.vertex_colors)[:, :3].astype(np.uint32)
    return [MeshLayer(name=Path(model_folder).name, vertices=np.asarray(mesh.vertices),
                      faces=np.asarray(mesh.faces), vertex_colours=(rgb[:, 0] << 16) | (rgb[:, 1] << 8) | rgb[:, 2])]
