"""Per-world figures: the image and its attention maps overlaid on it, with the
ground-truth patch masks outlined on the grid.

Figures are built on ``matplotlib.figure.Figure`` (no pyplot state), so nothing
accumulates across thousands of calls.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from PIL import Image

# fixed column order; keys not listed here follow, alphabetically
MAP_ORDER = ("subject_cross", "relation_cross", "object_cross", "subject_self_lm", "object_self_lm",
             "background_self_lm", "subject_self_vit", "object_self_vit", "background_self_vit")
SUBJECT_COLOUR, OBJECT_COLOUR = "#00e5ff", "#ff00d4"


def save_figure(fig: Figure, path: Path, dpi: int = 120) -> None:
    """Save ``fig`` as PNG through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=dpi, format="png")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def mask_outline(mask: np.ndarray) -> list[tuple[tuple[float, float], tuple[float, float]]]:
    """Segments (in grid coordinates, x right, y down) of the boundary of a boolean cell mask."""
    m = np.pad(np.asarray(mask, dtype=bool), 1)
    segments = []
    for y, x in zip(*np.nonzero(m[1:-1, 1:-1])):
        if not m[y, x + 1]:
            segments.append(((x, y), (x + 1, y)))          # top edge
        if not m[y + 2, x + 1]:
            segments.append(((x, y + 1), (x + 1, y + 1)))  # bottom edge
        if not m[y + 1, x]:
            segments.append(((x, y), (x, y + 1)))          # left edge
        if not m[y + 1, x + 2]:
            segments.append(((x + 1, y), (x + 1, y + 1)))  # right edge
    return segments


def _outline(ax, mask: np.ndarray, colour: str, label: str | None = None) -> None:
    segments = mask_outline(mask)
    if not segments:
        return
    ax.add_collection(LineCollection(segments, colors=colour, linewidths=1.6))
    if label:
        ys, xs = np.nonzero(mask)
        ax.text(xs.min(), ys.min() - 0.3, label, color=colour, fontsize=8, fontweight="bold", va="bottom",
                bbox=dict(facecolor="black", alpha=0.5, pad=1, linewidth=0))


def _ordered(keys) -> list[str]:
    rank = {name: i for i, name in enumerate(MAP_ORDER)}
    return sorted(set(keys), key=lambda k: (rank.get(k, len(MAP_ORDER)), k))


def plot_world_panel(path: Path, image: Image.Image, maps: dict[str, np.ndarray | None],
                     subject_mask: np.ndarray, object_mask: np.ndarray, title: str,
                     shuffled_maps: dict[str, np.ndarray | None] | None = None,
                     shuffled_image: Image.Image | None = None) -> None:
    """One PNG per world: the image with the subject/object masks outlined, then each map as a
    heatmap over the image (each panel scaled to its own maximum) with the mask outlines on the
    grid; a second row for the patch-shuffled run (its image, the ORIGINAL masks) when given.
    A None or missing map is drawn as an empty "undefined" panel."""
    gh, gw = np.shape(subject_mask)
    extent = (0, gw, gh, 0)
    keys = _ordered(list(maps) + list(shuffled_maps or {}))
    rows = [("real", image, maps)]
    if shuffled_maps is not None:
        rows.append(("shuffled", shuffled_image if shuffled_image is not None else image, shuffled_maps))
    ncols = 1 + len(keys)
    fig = Figure(figsize=(2.2 * ncols, 2.45 * len(rows) + 0.4))
    axes = fig.subplots(len(rows), ncols, squeeze=False)
    for (name, img, row_maps), row_axes in zip(rows, axes):
        pixels = np.asarray(img.convert("RGB"))
        ax = row_axes[0]
        ax.imshow(pixels, extent=extent)
        _outline(ax, subject_mask, SUBJECT_COLOUR, "subject")
        _outline(ax, object_mask, OBJECT_COLOUR, "object")
        ax.set_title(f"{name} image", fontsize=9)
        for ax, key in zip(row_axes[1:], keys):
            a = row_maps.get(key)
            ax.set_title(key.replace("_", " "), fontsize=9)
            if a is None:
                ax.text(0.5, 0.5, "undefined", ha="center", va="center", fontsize=10, color="0.4",
                        transform=ax.transAxes)
                ax.set_facecolor("0.93")
                continue
            ax.imshow(pixels, extent=extent)
            ax.imshow(np.asarray(a, dtype=float), extent=extent, cmap="inferno", alpha=0.65,
                      interpolation="nearest", vmin=0.0)
            _outline(ax, subject_mask, SUBJECT_COLOUR)
            _outline(ax, object_mask, OBJECT_COLOUR)
        for ax in row_axes:
            ax.set_xlim(0, gw)
            ax.set_ylim(gh, 0)
            ax.set_aspect("equal")
            ax.set_xticks([])
            ax.set_yticks([])
        row_axes[0].set_ylabel(name, fontsize=10)
    fig.suptitle(f"{title}    [subject mask: cyan, object mask: magenta; each map on its own colour scale]",
                 fontsize=12)
    fig.tight_layout()
    save_figure(fig, path)
