"""Static figures for notebooks and reports (matplotlib; no pipeline logic)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from workbench.io.volume import Volume


def _label_cmap():
    """Colour map over label values 0-15 from the label table's colours (0 transparent)."""
    from matplotlib.colors import ListedColormap

    from workbench.data.labels import color_lut

    lut = color_lut()[:16].astype(float) / 255.0
    colours = np.concatenate([lut, np.ones((len(lut), 1))], axis=1)
    colours[0, 3] = 0.0
    return ListedColormap(colours)


def orthogonal_slices(volume: Volume, labels: Volume | None = None, index: tuple[int, int, int] | None = None,
                      title: str | None = None, alpha: float = 0.45):
    """Sagittal, coronal and axial slices of a canonical (RAS) volume, with an optional label overlay.

    Slices are drawn with their true aspect ratio; ``index`` defaults to the
    centre of the labels when given, else the centre of the volume.
    """
    import matplotlib.pyplot as plt  # pyplot, so notebooks show the figure; step processes run with MPLBACKEND=Agg

    data = volume.data.astype(np.float32)
    if index is None:
        if labels is not None and np.any(labels.data > 0):
            index = tuple(int(round(c)) for c in np.argwhere(labels.data > 0).mean(axis=0))
        else:
            index = tuple(s // 2 for s in data.shape)
    lo, hi = np.percentile(data, [1, 99.5]) if data.size else (0, 1)
    sx, sy, sz = volume.spacing
    views = [
        ("sagittal", lambda a: a[index[0], :, :], sz / sy),
        ("coronal", lambda a: a[:, index[1], :], sz / sx),
        ("axial", lambda a: a[:, :, index[2]], sy / sx),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.2))
    cmap = _label_cmap()
    for ax, (name, take, aspect) in zip(axes, views):
        ax.imshow(take(data).T, cmap="gray", origin="lower", vmin=lo, vmax=hi, aspect=aspect,
                  interpolation="nearest")
        if labels is not None:
            lab = take(labels.data).T.astype(np.int16)
            ax.imshow(np.ma.masked_equal(lab, 0), cmap=cmap, vmin=0, vmax=15, alpha=alpha, origin="lower",
                      aspect=aspect, interpolation="nearest")
        ax.set_title(name)
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def save_figure(fig, path: str | Path, dpi: int = 100) -> Path:
    """Save and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    path = Path(path)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return path


def thickness_maps(bones: dict[str, tuple[np.ndarray, np.ndarray]], title: str | None = None,
                   vmax_mm: float = 4.0):
    """Cartilage thickness on each bone's vertices, seen along the axis where the cartilage faces.

    ``bones`` maps a bone name to ``(vertices (N, 3) in RAS mm, thickness_mm (N,))``.
    Femur and tibia are seen from the joint (inferior and superior), the patella
    from behind (posterior); bare bone is grey.  A static figure for reports; the
    notebook shows the interactive meshes.
    """
    import matplotlib.pyplot as plt

    # (horizontal axis, vertical axis, depth axis, keep vertices facing the viewer: +1 larger depth)
    views = {"femur": (0, 1, 2, -1, "from below"), "tibia": (0, 1, 2, +1, "from above"),
             "patella": (0, 2, 1, -1, "from behind")}
    names = [b for b in ("femur", "tibia", "patella") if b in bones]
    fig, axes = plt.subplots(1, max(len(names), 1), figsize=(4.2 * max(len(names), 1), 4.2), squeeze=False)
    scatter = None
    for ax, name in zip(axes[0], names):
        vertices, thickness = (np.asarray(a) for a in bones[name])
        h, v, d, facing, label = views[name]
        # draw far vertices first so the near side covers them
        order = np.argsort(facing * vertices[:, d])
        t = thickness[order]
        colours = np.where(t > 0, t, np.nan)
        ax.scatter(vertices[order, h], vertices[order, v], c="0.8", s=1.5, linewidths=0)
        scatter = ax.scatter(vertices[order, h], vertices[order, v], c=colours, s=1.5, linewidths=0,
                             cmap="viridis", vmin=0.0, vmax=vmax_mm)
        ax.set_aspect("equal")
        ax.set_title(f"{name} ({label})")
        ax.set_xlabel("R-L (mm)" if h == 0 else "")
        ax.set_xticks([])
        ax.set_yticks([])
    if not names:
        axes[0][0].axis("off")
    if scatter is not None:
        fig.colorbar(scatter, ax=list(axes[0]), shrink=0.8, label="cartilage thickness (mm)")
    if title:
        fig.suptitle(title)
    return fig


def t2_overlay(volume: Volume, t2_ms: Volume, title: str | None = None, vmax_ms: float = 80.0):
    """Sagittal slices through the T2 map's valid voxels, over the image; T2 in ms (0 = masked)."""
    import matplotlib.pyplot as plt

    data = volume.data.astype(np.float32)
    t2 = t2_ms.data.astype(np.float32)
    valid_per_slice = (t2 > 0).sum(axis=(1, 2))
    picks = np.argsort(valid_per_slice)[::-1][:3] if valid_per_slice.any() else [data.shape[0] // 2]
    lo, hi = np.percentile(data, [1, 99.5])
    _, sy, sz = volume.spacing
    fig, axes = plt.subplots(1, len(picks), figsize=(4.2 * len(picks), 4.2), squeeze=False)
    shown = None
    for ax, i in zip(axes[0], sorted(int(p) for p in picks)):
        ax.imshow(data[i].T, cmap="gray", origin="lower", vmin=lo, vmax=hi, aspect=sz / sy)
        shown = ax.imshow(np.ma.masked_less_equal(t2[i].T, 0), cmap="magma", origin="lower", vmin=0,
                          vmax=vmax_ms, aspect=sz / sy, interpolation="nearest")
        ax.set_title(f"sagittal slice {i}")
        ax.axis("off")
    if shown is not None:
        fig.colorbar(shown, ax=list(axes[0]), shrink=0.8, label="T2 (ms)")
    if title:
        fig.suptitle(title)
    return fig


REGION_ORDER = ("ant_fem_cart", "med_wb_fem_cart", "lat_wb_fem_cart", "med_post_fem_cart", "lat_post_fem_cart",
                "fem_cart", "med_tib_cart", "lat_tib_cart", "pat_cart")


def region_bars(results: dict, title: str | None = None):
    """Bar charts of regional cartilage thickness (mean +- std, mm) and, when present, T2 (ms).

    ``results`` is the ``results`` row of ``<case>_results.json``; regions
    without a value are left out.
    """
    import matplotlib.pyplot as plt

    panels = [("mm", "thickness (mm)")]
    if any(k.endswith("_t2_ms_mean") and v is not None for k, v in results.items()):
        panels.append(("t2_ms", "T2 (ms)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 3.6), squeeze=False)
    for ax, (unit, label) in zip(axes[0], panels):
        regions = [r for r in REGION_ORDER if results.get(f"{r}_{unit}_mean") is not None]
        means = [results[f"{r}_{unit}_mean"] for r in regions]
        stds = [results.get(f"{r}_{unit}_std") or 0.0 for r in regions]
        ax.bar(range(len(regions)), means, yerr=stds, capsize=3, color="#4c72b0")
        ax.set_xticks(range(len(regions)))
        ax.set_xticklabels([r.replace("_cart", "") for r in regions], rotation=40, ha="right")
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
        if not regions:
            ax.text(0.5, 0.5, "no regional values", ha="center", va="center", transform=ax.transAxes)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def mesh_sections(inputs: dict, reconstructions: dict, title: str | None = None):
    """Cross-sections of input surfaces (black, greys) with their reconstructions (colour) through three mid-planes.

    ``inputs`` and ``reconstructions`` map a surface name to a trimesh mesh in
    the same frame (scanner mm); sections go through the centre of the first
    input, along the sagittal, coronal and axial planes.
    """
    import matplotlib.pyplot as plt
    from matplotlib.collections import LineCollection
    from trimesh.intersections import mesh_plane

    names = list(inputs)
    centre = np.asarray(inputs[names[0]].bounds).mean(axis=0) if names else np.zeros(3)
    planes = (("sagittal", 0, (1, 2)), ("coronal", 1, (0, 2)), ("axial", 2, (0, 1)))
    colours = ("tab:red", "tab:blue", "tab:green")
    fig, axes = plt.subplots(1, 3, figsize=(12.6, 4.4))
    for ax, (plane, axis, (h, v)) in zip(axes, planes):
        normal = np.eye(3)[axis]
        for i, name in enumerate(names):
            for mesh, colour, width, label in ((inputs[name], ("k", "0.5", "0.7")[i % 3], 1.6, f"{name} (input)"),
                                               (reconstructions.get(name), colours[i % 3], 1.0,
                                                f"{name} (shape model)")):
                if mesh is None:
                    continue
                segments = mesh_plane(mesh, normal, centre)
                if len(segments):
                    ax.add_collection(LineCollection(segments[:, :, [h, v]], colors=colour, linewidths=width,
                                                     label=label))
        ax.autoscale()
        ax.set_aspect("equal")
        ax.set_title(f"{plane} section")
        ax.set_xticks([])
        ax.set_yticks([])
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(4, len(handles)), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title)
    return fig


def loss_curves(training: dict, title: str | None = None):
    """Training loss per pass (``training.json`` / ``metrics.json``'s ``training``) on a log scale."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3))
    offset = 0
    for name, log in (training.get("passes") or {}).items():
        curve = np.asarray(log.get("loss_curve") or [], dtype=float).reshape(-1, 2)
        if len(curve):
            ax.plot(curve[:, 0] + offset, curve[:, 1], label=name)
        offset += int(log.get("iterations") or 0)
    ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel("image loss")
    ax.legend()
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig
