"""The project's figures:

- per world, the image and its attention maps overlaid on it, with the
  ground-truth patch masks outlined on the grid (``plot_world_panel``);
- the relation-word asymmetry of the text analysis: scatter, one example pair,
  profile by layer (``plot_asymmetry``, ``plot_example_pair``);
- the corner head counts, one bar chart per layer (``plot_count_bars``).

Figures are built on ``matplotlib.figure.Figure`` (no pyplot state), so nothing
accumulates across thousands of calls, no backend has to be chosen, and the
callers' pyplot state (if any) is left alone.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image

from spatial_attention.common.runio import write_atomic
from spatial_attention.data.shapeworld import FLIPPED_RELATION
from spatial_attention.stats.metrics import MAPS, display_order

SUBJECT_COLOUR, OBJECT_COLOUR = "#00e5ff", "#ff00d4"


def save_figure(fig: Figure, path: Path, dpi: int = 120) -> None:
    """Save ``fig`` as PNG, atomically and with a plain file's mode (``runio.write_atomic``)."""
    png = io.BytesIO()
    fig.savefig(png, dpi=dpi, format="png")
    write_atomic(path, png.getvalue())


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
    keys = display_order(list(maps) + list(shuffled_maps or {}), MAPS)
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


# ---------------------------------------------------------------------------
# Text analysis: relation-word attention asymmetry (one record per caption pair)
# ---------------------------------------------------------------------------

def plot_asymmetry(fig_dir: Path, records: list[dict], profile: dict) -> None:
    """Write ``asym_scatter.png``, ``example_pair_bars.png`` (the first record) and
    ``layer_asym_profile.png`` into ``fig_dir`` (created; nothing is written when
    ``records`` is empty). ``profile`` holds ``layers`` (1-based), ``asym_s1`` and ``asym_s2``."""
    fig_dir = Path(fig_dir)
    fig_dir.mkdir(parents=True, exist_ok=True)
    if not records:
        return
    _plot_asym_scatter(fig_dir / "asym_scatter.png", records)
    plot_example_pair(fig_dir / "example_pair_bars.png", records[0])
    _plot_layer_profile(fig_dir / "layer_asym_profile.png", profile, len(records))


def _plot_asym_scatter(path: Path, records: list[dict]) -> None:
    """asym of the counterfactual against asym of the original sentence, one colour per relation."""
    a1 = np.array([r["asym_s1"] for r in records])
    a2 = np.array([r["asym_s2"] for r in records])
    fig = Figure(figsize=(5.5, 6.5))
    ax = fig.subplots()
    ax.axhline(0, color="grey", lw=0.5)
    ax.axvline(0, color="grey", lw=0.5)
    for rel in sorted({r["relation"] for r in records}):
        keep = np.array([r["relation"] == rel for r in records])
        ax.scatter(a1[keep], a2[keep], s=12, alpha=0.7, label=f"s1 says '{rel}'")
    lim = max(np.abs(np.concatenate([a1, a2])).max(), 1e-6) * 1.1
    ax.plot([-lim, lim], [lim, -lim], "k--", lw=1, label="y = -x: symmetry 0 (role-consistent)")
    ax.plot([-lim, lim], [-lim, lim], "k:", lw=1, label="y = x: asym unchanged (position only)")
    ax.set(xlim=(-lim, lim), ylim=(-lim, lim), aspect="equal", xlabel="asym, original sentence (s1)",
           ylabel="asym, counterfactual sentence (s2)")
    ax.set_title(f"Relation-word attention asymmetry ({len(records)} pairs)", pad=14)  # room for the 1e-N
    ax.ticklabel_format(style="sci", scilimits=(-2, 2))
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2)  # no data hidden
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


def plot_example_pair(path: Path, example: dict) -> None:
    """Bars of one pair: in each sentence, the relation word's attention to the first- then the
    second-mentioned shape (asym = left bar - right bar); one colour per shape across sentences."""
    first, second = example["e1"], example["e2"]  # the shapes as s1 mentions them
    heights = [example["r_to_e1_s1"], example["r_to_e2_s1"], example["r_to_e1_s2"], example["r_to_e2_s2"]]
    names = [first, second, second, first]
    fig = Figure(figsize=(6.5, 4))
    ax = fig.subplots()
    bars = ax.bar([0, 1, 3, 4], heights, color=["C0", "C1", "C1", "C0"])
    ax.bar_label(bars, fmt="%.4g", fontsize=8)
    ax.set_xticks([0, 1, 3, 4], [f"{name}\n({rank})" for name, rank in zip(names, ["1st", "2nd"] * 2)], fontsize=8)
    ax.set_ylim(0, max(heights) * 1.3 if max(heights) > 0 else 1)
    for x, tag, relation in ((0.5, "s1", example["relation"]), (3.5, "s2", FLIPPED_RELATION[example["relation"]])):
        ax.text(x, max(heights) * 1.17, f"{tag}: '... relation is {relation}'\nasym = {example['asym_' + tag]:+.3g}",
                ha="center", va="center", fontsize=8)
    ax.set(ylabel="mean attention, relation word -> shape word",
           title=f"Example pair (shard {example['shard']}, world {example['index']}): "
                 f"symmetry = {example['symmetry_score']:+.3g}")
    ax.title.set_fontsize(9)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


def _plot_layer_profile(path: Path, profile: dict, n_pairs: int) -> None:
    """Mean asym per layer of original and counterfactual sentences, and their sum."""
    order = np.argsort(profile["layers"])
    layer_axis = np.array(profile["layers"])[order]
    s1, s2 = np.array(profile["asym_s1"])[order], np.array(profile["asym_s2"])[order]
    fig = Figure(figsize=(6.5, 3.8))
    ax = fig.subplots()
    ax.axhline(0, color="grey", lw=0.5)
    ax.plot(layer_axis, s1, marker="o", ms=3, label="original (s1)")
    ax.plot(layer_axis, s2, marker="o", ms=3, label="counterfactual (s2)")
    ax.plot(layer_axis, s1 + s2, "k--", lw=1, label="symmetry = s1 + s2")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    ax.set(xlabel="layer (1-based)", ylabel="mean asym = r->e1 - r->e2")
    ax.set_title(f"Asymmetry by layer (mean over {n_pairs} pairs, heads averaged)", pad=14)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


# ---------------------------------------------------------------------------
# Corner statistics: how often each head is among its layer's top-k
# ---------------------------------------------------------------------------

def plot_count_bars(path: Path, count_lh: np.ndarray, layer_numbers: list[int], corner: str, topk: int) -> None:
    """Per layer, a bar per head: how many pairs put that head in the layer's top-k.
    ``count_lh`` has shape (layers, heads); ``layer_numbers`` labels its rows."""
    count_lh = np.asarray(count_lh)
    n_layers, n_heads = count_lh.shape
    cols = min(8, n_layers)
    rows = -(-n_layers // cols)
    fig = Figure(figsize=(2.2 * cols, 1.7 * rows))
    axes = fig.subplots(rows, cols, sharey=True, squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i >= n_layers:
            ax.axis("off")
            continue
        ax.bar(np.arange(n_heads), count_lh[i], width=0.9)
        ax.set_title(f"layer {layer_numbers[i]}", fontsize=8)
        ax.tick_params(labelsize=6)
    fig.suptitle(f"{corner}: pairs in which each head is among its layer's top-{topk} by |full - control| "
                 f"(x: head, 0-based)", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
