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
