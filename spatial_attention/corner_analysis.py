"""Shared and unique heads across the four corner experiments: read the four
``head_attention_stats.py`` out-dirs, check they belong together, and write the
heatmaps, curves, text reports and ``summary.json`` (heads.py has the definitions).

Inputs that must agree across the four folders: the layers list (hence L) and H.
N may differ between corners: M_c is a mean over each corner's own pairs
(use_scale "freq"), so every corner weighs the same in M_shared; with "count" a
corner with more pairs weighs more (a warning says so). The folders must also
agree in model and model_path (other heads), patch_size (another region scored)
and topk (another scale of the count cubes), and, where both folders record them,
in feed_size, max_new_tokens, prompt_template and dtype (another scoring): a
difference is refused.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib import patheffects
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from spatial_attention.cli import check_at_least
from spatial_attention.errors import DataError, OptionError
from spatial_attention.figures import save_figure
from spatial_attention.heads import (CORNERS, position_only_flags, rank_heads, shared_unique, top_cells,
                                     topk_count_cube)
from spatial_attention.runio import write_atomic, write_json

log = logging.getLogger("spatial_attention")

REQUIRED_FILES = ("meta.json", "scores_full_LHN.npy", "scores_control_LHN.npy", "count_LHN.npy")
# meta.json keys that must agree across the corners: the heads of another model, the score of another
# patch_size and the count cube of another topk cannot be averaged into one M_shared
SAME_SETTING_KEYS = ("model", "model_path", "patch_size", "topk")
# likewise scores of another image size, answer length, question or precision; older out-dirs lack some
# of these keys, so they are compared only where both folders record them
SAME_IF_RECORDED_KEYS = ("feed_size", "max_new_tokens", "prompt_template", "dtype")
BLANK_FILE = "scores_blank_LHM.npy"  # blank image, mass on the corner block
BLANK_IMAGE_FILE = "scores_blank_image_LHM.npy"  # blank image, mass on all image tokens
BLANK_WITHHELD = ("no scores_blank_image_LHM.npy or no blank_block in meta.json: an out-dir from before the blank "
                  "image was scored on the corner block, whose blank score may cover every image token, so a flag "
                  "would mark the heads that look at the image most, not those that favour the corner; rerun "
                  "head_attention_stats.py into the folder to get the control")


@dataclass
class BlankControl:
    """The position-only control of one out-dir: the blank image's attention mass [L, H, M] on the
    corner block and on all image tokens, and the block's share of the image tokens."""
    block: np.ndarray
    image: np.ndarray
    area_share: float


@dataclass
class CornerRun:
    """One ``head_attention_stats.py`` out-dir: scores [L, H, N], count cube, the blank control if it has one."""
    folder: Path
    meta: dict
    full: np.ndarray
    control: np.ndarray
    count: np.ndarray
    blank: BlankControl | None

    @property
    def corner(self) -> str:
        return self.meta["corner"]

    @property
    def layers(self) -> list[int]:
        return [int(x) for x in self.meta["layers"]]


def _load_array(path: Path, shape: tuple[int, ...] | None, what: str) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"{path}: missing ({what}; written by head_attention_stats.py)")
    try:
        a = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: not a readable .npy file ({err})") from None
    if shape is not None and a.shape != shape:
        raise DataError(f"{path}: shape {a.shape}, but meta.json says [L, H, N] = {list(shape)}")
    if not np.all(np.isfinite(a)):
        raise DataError(f"{path}: contains NaN or infinite values")
    return a


def load_corner_run(folder: Path) -> CornerRun:
    """Read and check one out-dir; any problem is a one-line DataError naming the folder or file."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder (expected an out-dir of head_attention_stats.py)")
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        raise DataError(f"{meta_path}: missing (every out-dir of head_attention_stats.py has one)")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"{meta_path}: not readable JSON ({err})") from None
    missing = [k for k in ("corner", "layers", "H", "N") if k not in meta]
    if missing:
        raise DataError(f"{meta_path}: lacks {', '.join(missing)}")
    if not isinstance(meta["layers"], list) or not all(isinstance(x, int) for x in meta["layers"]):
        raise DataError(f"{meta_path}: layers must be a list of 1-based layer numbers, got {meta['layers']!r}")
    if meta["corner"] not in CORNERS:
        raise DataError(f"{meta_path}: corner {meta['corner']!r} is not one of {', '.join(CORNERS)}")
    shape = (len(meta["layers"]), int(meta["H"]), int(meta["N"]))
    full = _load_array(folder / "scores_full_LHN.npy", shape, "full-image scores")
    control = _load_array(folder / "scores_control_LHN.npy", shape, "control-image scores")
    count = _load_array(folder / "count_LHN.npy", shape, "count cube")
    if not np.isin(count, (0, 1)).all():
        raise DataError(f"{folder / 'count_LHN.npy'}: a count cube holds only 0 and 1")
    blank = _load_blank(folder, meta, shape[:2])
    if "topk" in meta:
        recomputed = topk_count_cube(full, control, int(meta["topk"]))
        n_off = int((recomputed != count).any(axis=1).sum())
        if n_off:
            log.warning("%s: count_LHN.npy differs from the top-%s of |full - control| in %d (layer, pair) cells; "
                        "using the file as written", folder, meta["topk"], n_off)
    return CornerRun(folder, meta, full, control, count.astype(np.uint8), blank)


def _load_blank(folder: Path, meta: dict, lh: tuple[int, int]) -> BlankControl | None:
    """The blank control; None for an out-dir without both blank scores and meta.json's blank_block."""
    block_meta = meta.get("blank_block")
    if block_meta is None or not (folder / BLANK_FILE).is_file() or not (folder / BLANK_IMAGE_FILE).is_file():
        return None
    block = _load_array(folder / BLANK_FILE, None, "blank-image scores on the corner block")
    image = _load_array(folder / BLANK_IMAGE_FILE, None, "blank-image scores on all image tokens")
    if block.ndim != 3 or block.shape[:2] != lh or block.shape[2] < 1:
        raise DataError(f"{folder / BLANK_FILE}: shape {block.shape}, expected [L, H, M] = [{lh[0]}, {lh[1]}, M >= 1]")
    if image.shape != block.shape:
        raise DataError(f"{folder / BLANK_IMAGE_FILE}: shape {image.shape}, but {BLANK_FILE} has {block.shape}")
    try:
        (gh, gw), rows, cols = block_meta["grid"], block_meta["rows"], block_meta["cols"]
        area_share = rows * cols / (gh * gw)
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        area_share = None
    if area_share is None or not 0 < area_share <= 1:
        raise DataError(f"{folder / 'meta.json'}: blank_block {block_meta!r} needs rows and cols of a block that "
                        "fits the token grid [gh, gw]")
    return BlankControl(block, image, area_share)


def load_corner_runs(folders: list[Path]) -> dict[str, CornerRun]:
    """{corner: run} for exactly one folder per corner, all with the same layers and H."""
    runs: dict[str, CornerRun] = {}
    for folder in folders:
        run = load_corner_run(folder)
        if run.corner in runs:
            raise DataError(f"{runs[run.corner].folder} and {run.folder} are both corner {run.corner!r} "
                            "(meta.json); give one folder per corner")
        runs[run.corner] = run
    first = next(iter(runs.values()))
    _check_same_setting(first, runs.values())
    for run in runs.values():
        if run.layers != first.layers or run.full.shape[1] != first.full.shape[1]:
            raise DataError(f"{run.folder}: layers {run.layers} and H = {run.full.shape[1]} do not match "
                            f"{first.folder} (layers {first.layers}, H = {first.full.shape[1]}); "
                            "all corners must come from the same model and layer selection")
    missing = [c for c in CORNERS if c not in runs]
    if missing:
        raise DataError(f"no folder for corner {', '.join(missing)}; give one out-dir each for "
                        f"{', '.join(CORNERS)}")
    return {c: runs[c] for c in CORNERS}


def _setting(meta: dict, keys: list[str]) -> str:
    """A run's values of ``keys``, for an error message."""
    return ", ".join(f"{key} {meta.get(key)!r}" for key in keys)


def _differing_keys(a: dict, b: dict) -> list[str]:
    """The setting keys in which two meta.json differ."""
    differing = [key for key in SAME_SETTING_KEYS if a.get(key) != b.get(key)]
    return differing + [key for key in SAME_IF_RECORDED_KEYS if key in a and key in b and a[key] != b[key]]


def _check_same_setting(first: CornerRun, runs) -> None:
    """DataError naming both folders when a run's scoring settings differ from ``first``'s."""
    for run in runs:
        differing = _differing_keys(first.meta, run.meta)
        if differing:
            shown = list(dict.fromkeys([*SAME_SETTING_KEYS, *differing]))
            raise DataError(f"{first.folder} ({_setting(first.meta, shown)}) and {run.folder} "
                            f"({_setting(run.meta, shown)}) differ in {', '.join(differing)}: the shared/unique "
                            "analysis needs all four corners scored by one model with the same settings")


def _heatmap(path: Path, matrix: np.ndarray, layers: list[int], title: str, cbar_label: str,
             marks: list[tuple[int, int, float]], head: int, diverging: bool) -> None:
    """Layer x head heatmap; ``marks`` (top cells) boxed and numbered by rank, ``head``'s column outlined."""
    n_layers, n_heads = matrix.shape
    fig = Figure(figsize=(max(6.5, 0.28 * n_heads + 2.2), max(3.5, 0.22 * n_layers + 1.6)))
    ax = fig.subplots()
    if diverging:
        vmax = float(np.abs(matrix).max()) or 1.0
        im = ax.imshow(matrix, cmap="RdBu_r", vmin=-vmax, vmax=vmax, aspect="auto", interpolation="nearest")
    else:
        im = ax.imshow(matrix, cmap="viridis", vmin=0.0, aspect="auto", interpolation="nearest")
    fig.colorbar(im, ax=ax).set_label(cbar_label, fontsize=8)
    ax.add_patch(Rectangle((head - 0.5, -0.5), 1, n_layers, fill=False, edgecolor="black", linewidth=1.5,
                           linestyle="--"))
    mark_colour = "lime" if diverging else "red"  # visible on either colour map
    outline = [patheffects.withStroke(linewidth=2, foreground="black")]
    for rank, (li, h, _) in enumerate(marks, start=1):
        ax.add_patch(Rectangle((h - 0.5, li - 0.5), 1, 1, fill=False, edgecolor=mark_colour, linewidth=1.8))
        ax.text(h, li, str(rank), ha="center", va="center", fontsize=7, color="white", fontweight="bold",
                path_effects=outline)
    step_x, step_y = max(1, n_heads // 16), max(1, n_layers // 16)
    ax.set_xticks(range(0, n_heads, step_x))
    ax.set_yticks(range(0, n_layers, step_y), [str(layers[i]) for i in range(0, n_layers, step_y)])
    ax.set_xlabel(f"head (0-based; dashed: head {head})")
    ax.set_ylabel("layer (1-based)")
    ax.set_title(title, fontsize=9, wrap=True)
    fig.tight_layout()
    save_figure(fig, path)


def _unique_curves(path: Path, result: dict, scale_label: str) -> None:
    """Per corner, its unique head over layers: residual_c, M_c and M_shared of that head."""
    layers = result["layers"]
    fig = Figure(figsize=(10, 7))
    axes = fig.subplots(2, 2, sharex=True, squeeze=False).ravel()
    for ax, corner in zip(axes, result["corners"]):
        h = result["unique_heads"][corner]
        ax.plot(layers, result["residual"][corner][:, h], "o-", color="tab:red", label="residual_c")
        ax.plot(layers, result["M"][corner][:, h], "s--", color="tab:blue", label="M_c")
        ax.plot(layers, result["M_shared"][:, h], ":", color="0.4", label="M_shared")
        ax.axhline(0.0, color="0.7", linewidth=0.8)
        ax.set_title(f"{corner}: unique head {h} (peak layer {result['unique_layers'][corner]})", fontsize=10)
        ax.set_ylabel(scale_label)
        ax.grid(alpha=0.3)
    for ax in axes[2:]:
        ax.set_xlabel("layer (1-based)")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Unique head of each corner over layers (reduce_level={result['reduce_level']})", fontsize=11)
    fig.tight_layout()
    save_figure(fig, path)


def _cells_report(header: str, cells: list[tuple[int, int, float]], layers: list[int]) -> str:
    lines = [f"# {header}", "# layer 1-based, head 0-based", "rank\tlayer\thead\tvalue"]
    lines += [f"{rank}\t{layers[li]}\t{h}\t{v:.6g}" for rank, (li, h, v) in enumerate(cells, start=1)]
    return "\n".join(lines) + "\n"


def _cells_json(cells: list[tuple[int, int, float]], layers: list[int]) -> list[dict]:
    return [{"layer": layers[li], "head": h, "value": v} for li, h, v in cells]


def _rank_corner(corner: str, run: CornerRun, alpha: float, n_perm: int | None, seed: int,
                 layers: list[int]) -> dict:
    """rank_heads for one corner, with a warning when the exact test's floor (few pairs) limits BH."""
    ranking = rank_heads(run.full, run.control, alpha=alpha, n_perm=n_perm, seed=seed, layers=layers)
    m, floor, n_pairs = ranking["n_tested"], ranking["p_floor"], run.full.shape[2]
    if floor > alpha / m:
        heads_needed = math.ceil(floor * m / alpha)  # BH rejects k heads at the floor only when floor <= k alpha / m
        if heads_needed <= m:
            log.warning("%s: with N = %d pairs the smallest sign-flip p is %.3g; Benjamini-Hochberg over %d heads "
                        "rejects only if at least %d heads reach it", corner, n_pairs, floor, m, heads_needed)
        else:  # the floor is above alpha itself
            log.warning("%s: no head can be rejected with N = %d pairs at alpha %g: the smallest sign-flip p, %.3g, "
                        "is above alpha; Benjamini-Hochberg over %d heads can reject a head on its own from %d "
                        "pairs on", corner, n_pairs, alpha, floor, m, _pairs_for_one_rejection(m, alpha))
    return ranking


def _pairs_for_one_rejection(m: int, alpha: float) -> int:
    """The fewest pairs whose exact sign-flip floor 2 / 2^N lets BH reject one of m heads: 2 / 2^N <= alpha / m.
    The test is exact there, as 2^N < 4 m / alpha lies below the n_perm minimum 20 m / alpha."""
    n_pairs = 1
    while 2 * m > alpha * 2 ** n_pairs:
        n_pairs += 1
    return n_pairs


def _position_only(runs: dict[str, CornerRun], layers: list[int], percentile: float) -> dict[str, dict | None]:
    """position_only_flags per corner; None, with one warning for them all, where a folder lacks the control."""
    withheld = [c for c, run in runs.items() if run.blank is None]
    if withheld:
        log.warning("position-only flag withheld for %s: %s", ", ".join(withheld), BLANK_WITHHELD)
    return {c: None if run.blank is None else
            position_only_flags(run.blank.block, run.blank.image, run.blank.area_share, percentile=percentile,
                                layers=layers)
            for c, run in runs.items()}


def _position_only_summary(flags: dict | None) -> dict:
    if flags is None:
        return {"withheld": BLANK_WITHHELD}
    return {key: flags[key] for key in ("rule", "percentile", "threshold", "area_share", "share", "flagged")}


def analyze(runs: dict[str, CornerRun], out_dir: Path, reduce_level: str = "max", use_scale: str = "freq",
            topk_pixels: int = 3, topk_diff_pixels: int = 3, diff_brightness: str = "raw", alpha: float = 0.05,
            n_perm: int | None = None, seed: int = 0, blank_percentile: float = 95.0) -> dict:
    """Compute shared/unique heads, the FDR ranking and position-only flags; write every output; return the summary."""
    check_at_least(0, topk_pixels=topk_pixels, topk_diff_pixels=topk_diff_pixels)
    if diff_brightness not in ("raw", "abs"):
        raise OptionError(f"--diff-brightness {diff_brightness!r} is not one of raw, abs")
    n_pairs = {c: run.full.shape[2] for c, run in runs.items()}
    if use_scale == "count" and len(set(n_pairs.values())) > 1:
        log.warning("--use-scale count with different numbers of pairs per corner %s: corners with more pairs "
                    "weigh more in M_shared (--use-scale freq does not)", n_pairs)
    layers = next(iter(runs.values())).layers
    result = shared_unique({c: run.count for c, run in runs.items()}, reduce_level, use_scale, layers)
    # ranked before anything is written, so that a refused --n-perm or --alpha leaves no partial output
    rankings = {c: _rank_corner(c, run, alpha, n_perm, seed, layers) for c, run in runs.items()}
    blank_flags = _position_only(runs, layers, blank_percentile)  # likewise
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    scale_label = "fraction of pairs in top-k" if use_scale == "freq" else "pairs in top-k"
    by_abs = diff_brightness == "abs"

    shared_cells = top_cells(result["M_shared"], topk_pixels)
    _heatmap(out_dir / "heatmap_shared.png", result["M_shared"], layers,
             f"M_shared (mean of the 4 corners); shared head {result['shared_head']}, top {topk_pixels} cells boxed",
             scale_label, shared_cells, result["shared_head"], diverging=False)
    write_atomic(out_dir / "top_pixels_shared.txt",
                 _cells_report(f"top {topk_pixels} cells of M_shared (use_scale={use_scale})", shared_cells, layers))

    diff_cells, significant, position_only = {}, {}, {}
    for corner, run in runs.items():
        residual = result["residual"][corner]
        cells = top_cells(residual, topk_diff_pixels, by_abs=by_abs)
        diff_cells[corner] = cells
        _heatmap(out_dir / f"heatmap_residual_{corner}.png", residual, layers,
                 f"residual {corner} = M_c - M_shared; unique head {result['unique_heads'][corner]}, "
                 f"top {topk_diff_pixels} cells ({diff_brightness}) boxed",
                 f"{scale_label}, minus shared", cells, result["unique_heads"][corner], diverging=True)
        write_atomic(out_dir / f"top_pixels_diff_{corner}.txt",
                     _cells_report(f"top {topk_diff_pixels} cells of residual_{corner} ranked by "
                                   f"{'|value|' if by_abs else 'value'} (use_scale={use_scale})", cells, layers))
        significant[corner] = rankings[corner]["significant"]
        flags = blank_flags[corner]
        position_only[corner] = _position_only_summary(flags)
        if flags is not None:
            for entry in significant[corner]:
                entry["position_only"] = bool(flags["flags"][layers.index(entry["layer"]), entry["head"]])
    _unique_curves(out_dir / "unique_head_curves.png", result, scale_label)

    rule = (f"argmax over heads of the {reduce_level} over layers of M_shared "
            f"(use_scale={use_scale}: {scale_label}, M_c per corner, M_shared = mean of the corners)")
    profile = " ".join(f"{v:.4g}" for v in result["shared_profile"])
    write_atomic(out_dir / "shared_head.txt",
                 f"shared head: {result['shared_head']} (0-based)\n"
                 f"peak layer: {result['shared_layer']} (1-based)\n"
                 f"rule: {rule}\nper-head {reduce_level} over layers (head 0 first): {profile}\n")
    lines = [f"# unique head of corner c: argmax over heads of the {reduce_level} over layers of "
             f"residual_c = M_c - M_shared (use_scale={use_scale}); head 0-based, layer 1-based",
             "corner\thead\tpeak_layer\tscore"]
    for corner in runs:
        h = result["unique_heads"][corner]
        lines.append(f"{corner}\t{h}\t{result['unique_layers'][corner]}\t{result['unique_profile'][corner][h]:.6g}")
    write_atomic(out_dir / "unique_heads.txt", "\n".join(lines) + "\n")

    summary = {
        "shared_head": result["shared_head"], "shared_head_layer": result["shared_layer"],
        "unique_heads": result["unique_heads"], "unique_head_layers": result["unique_layers"],
        "reduce_level": reduce_level, "use_scale": use_scale, "diff_brightness": diff_brightness,
        "layers": layers, "H": int(result["M_shared"].shape[1]), "N": n_pairs,
        "inputs": {c: str(run.folder) for c, run in runs.items()},
        "model": {c: run.meta.get("model") for c, run in runs.items()},
        "topk": {c: run.meta.get("topk") for c, run in runs.items()},
        "top_pixels_shared": _cells_json(shared_cells, layers),
        "top_pixels_diff": {c: _cells_json(cells, layers) for c, cells in diff_cells.items()},
        "fdr": {"test": "two-sided paired sign-flip test of full vs control per (layer, head), "
                        "Benjamini-Hochberg over all L x H heads per corner",
                "alpha": alpha, "seed": seed,
                "n_perm_rule": "unless --n-perm is given, n_perm = ceil(20 m / alpha) for the m heads tested, so "
                               "the Monte Carlo p floor 1/(n_perm+1) lies 20x below BH's smallest threshold "
                               "alpha/m; exact over all 2^N sign vectors when 2^N <= n_perm",
                "p_method": {c: r["p_method"] for c, r in rankings.items()},
                "n_perm": {c: r["n_perm"] for c, r in rankings.items()},
                "p_floor": {c: r["p_floor"] for c, r in rankings.items()}},
        "significant_heads": significant,
        "position_only": position_only,
        "matrices": {"M_shared": result["M_shared"].tolist(),
                     "residual": {c: m.tolist() for c, m in result["residual"].items()}},
    }
    write_json(out_dir / "summary.json", summary)
    log.info("shared head %d (peak layer %d); unique heads %s; significant heads per corner %s",
             result["shared_head"], result["shared_layer"], result["unique_heads"],
             {c: len(s) for c, s in significant.items()})
    return summary
