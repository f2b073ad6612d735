"""Shared and unique heads across the four corner experiments (analyze_corner_heads.py):
from the four ``head_attention_stats.py`` out-dirs (read and checked by corner_results.py),
compute the shared and unique heads, the FDR ranking and the position-only flags, and
write the heatmaps, curves, text reports and ``summary.json`` (heads.py has the definitions).

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

import argparse
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib import patheffects
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from spatial_attention.common.console import check_at_least, command_parser, user_errors_exit
from spatial_attention.common.errors import OptionError
from spatial_attention.common.runio import check_output_dir, setup_logging, write_atomic, write_json
from spatial_attention.experiments.corner_results import CornerRun, load_corner_runs
from spatial_attention.experiments.heads import position_only_flags, rank_heads, shared_unique, top_cells
from spatial_attention.run.figures import save_figure
from spatial_attention.run.runloop import check_free, mark_results

log = logging.getLogger("spatial_attention")
SUMMARY_FILE = "summary.json"

BLANK_WITHHELD = ("no scores_blank_image_LHM.npy or no blank_block in meta.json: an out-dir from before the blank "
                  "image was scored on the corner block, whose blank score may cover every image token, so a flag "
                  "would mark the heads that look at the image most, not those that favour the corner; rerun "
                  "head_attention_stats.py into the folder to get the control")


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


@dataclass
class CornerAnalysis:
    """Everything the outputs of ``analyze`` are made of, computed before any is written: the options that
    shape them, shared_unique's matrices and heads (``result``), per corner the FDR ranking (``rankings``),
    the position-only flags (``blank_flags``, None where withheld), the boxed top cells, the significant
    heads (each marked position-only where flagged) and the summary.json content."""
    corners: list[str]  # in the order of the runs given, the order of every per-corner output
    layers: list[int]
    reduce_level: str
    use_scale: str
    diff_brightness: str
    topk_pixels: int
    topk_diff_pixels: int
    result: dict
    rankings: dict[str, dict]
    blank_flags: dict[str, dict | None]
    shared_cells: list[tuple[int, int, float]]
    diff_cells: dict[str, list[tuple[int, int, float]]]
    significant: dict[str, list[dict]]
    position_only: dict[str, dict]
    summary: dict

    @property
    def scale_label(self) -> str:
        return "fraction of pairs in top-k" if self.use_scale == "freq" else "pairs in top-k"


def analyze(runs: dict[str, CornerRun], out_dir: Path, reduce_level: str = "max", use_scale: str = "freq",
            topk_pixels: int = 3, topk_diff_pixels: int = 3, diff_brightness: str = "raw", alpha: float = 0.05,
            n_perm: int | None = None, seed: int = 0, blank_percentile: float = 95.0) -> dict:
    """Compute shared/unique heads, the FDR ranking and position-only flags; write every output; return the summary."""
    analysis = compute_analysis(runs, reduce_level=reduce_level, use_scale=use_scale, topk_pixels=topk_pixels,
                                topk_diff_pixels=topk_diff_pixels, diff_brightness=diff_brightness, alpha=alpha,
                                n_perm=n_perm, seed=seed, blank_percentile=blank_percentile)
    write_analysis(analysis, out_dir)
    log.info("shared head %d (peak layer %d); unique heads %s; significant heads per corner %s",
             analysis.result["shared_head"], analysis.result["shared_layer"], analysis.result["unique_heads"],
             {c: len(s) for c, s in analysis.significant.items()})
    return analysis.summary


def compute_analysis(runs: dict[str, CornerRun], reduce_level: str = "max", use_scale: str = "freq",
                     topk_pixels: int = 3, topk_diff_pixels: int = 3, diff_brightness: str = "raw",
                     alpha: float = 0.05, n_perm: int | None = None, seed: int = 0,
                     blank_percentile: float = 95.0) -> CornerAnalysis:
    """Shared/unique heads, the FDR ranking, position-only flags and the summary; writes nothing, so that a
    refused option (--topk-pixels, --diff-brightness, --n-perm, --alpha) leaves no partial output."""
    check_at_least(0, topk_pixels=topk_pixels, topk_diff_pixels=topk_diff_pixels)
    if diff_brightness not in ("raw", "abs"):
        raise OptionError(f"--diff-brightness {diff_brightness!r} is not one of raw, abs")
    n_pairs = {c: run.full.shape[2] for c, run in runs.items()}
    if use_scale == "count" and len(set(n_pairs.values())) > 1:
        log.warning("--use-scale count with different numbers of pairs per corner %s: corners with more pairs "
                    "weigh more in M_shared (--use-scale freq does not)", n_pairs)
    layers = next(iter(runs.values())).layers
    result = shared_unique({c: run.count for c, run in runs.items()}, reduce_level, use_scale, layers)
    rankings = {c: _rank_corner(c, run, alpha, n_perm, seed, layers) for c, run in runs.items()}
    blank_flags = _position_only(runs, layers, blank_percentile)

    shared_cells = top_cells(result["M_shared"], topk_pixels)
    diff_cells = {c: top_cells(result["residual"][c], topk_diff_pixels, by_abs=diff_brightness == "abs")
                  for c in runs}
    significant, position_only = {}, {}
    for corner in runs:
        significant[corner] = rankings[corner]["significant"]
        flags = blank_flags[corner]
        position_only[corner] = _position_only_summary(flags)
        if flags is not None:
            for entry in significant[corner]:
                entry["position_only"] = bool(flags["flags"][layers.index(entry["layer"]), entry["head"]])

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
    return CornerAnalysis(corners=list(runs), layers=layers, reduce_level=reduce_level, use_scale=use_scale,
                          diff_brightness=diff_brightness, topk_pixels=topk_pixels, topk_diff_pixels=topk_diff_pixels,
                          result=result, rankings=rankings, blank_flags=blank_flags, shared_cells=shared_cells,
                          diff_cells=diff_cells, significant=significant, position_only=position_only,
                          summary=summary)


def write_analysis(analysis: CornerAnalysis, out_dir: Path) -> None:
    """Write the heatmaps, top_pixels_*.txt, unique_head_curves.png, shared_head.txt, unique_heads.txt and
    summary.json of ``analysis`` into ``out_dir``."""
    result, layers, scale_label = analysis.result, analysis.layers, analysis.scale_label
    reduce_level, use_scale, diff_brightness = analysis.reduce_level, analysis.use_scale, analysis.diff_brightness
    topk_pixels, topk_diff_pixels = analysis.topk_pixels, analysis.topk_diff_pixels
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    _heatmap(out_dir / "heatmap_shared.png", result["M_shared"], layers,
             f"M_shared (mean of the 4 corners); shared head {result['shared_head']}, top {topk_pixels} cells boxed",
             scale_label, analysis.shared_cells, result["shared_head"], diverging=False)
    write_atomic(out_dir / "top_pixels_shared.txt",
                 _cells_report(f"top {topk_pixels} cells of M_shared (use_scale={use_scale})", analysis.shared_cells,
                               layers))
    for corner in analysis.corners:
        cells = analysis.diff_cells[corner]
        _heatmap(out_dir / f"heatmap_residual_{corner}.png", result["residual"][corner], layers,
                 f"residual {corner} = M_c - M_shared; unique head {result['unique_heads'][corner]}, "
                 f"top {topk_diff_pixels} cells ({diff_brightness}) boxed",
                 f"{scale_label}, minus shared", cells, result["unique_heads"][corner], diverging=True)
        write_atomic(out_dir / f"top_pixels_diff_{corner}.txt",
                     _cells_report(f"top {topk_diff_pixels} cells of residual_{corner} ranked by "
                                   f"{'|value|' if diff_brightness == 'abs' else 'value'} (use_scale={use_scale})",
                                   cells, layers))
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
    for corner in analysis.corners:
        h = result["unique_heads"][corner]
        lines.append(f"{corner}\t{h}\t{result['unique_layers'][corner]}\t{result['unique_profile'][corner][h]:.6g}")
    write_atomic(out_dir / "unique_heads.txt", "\n".join(lines) + "\n")
    write_json(out_dir / SUMMARY_FILE, analysis.summary)


# --- the command line ---------------------------------------------------------------

# analyze_corner_heads.py --help shows it with its line breaks
CLI_DESCRIPTION = """Shared and unique attention heads across the four corner experiments.

Give the four out-dirs of head_attention_stats.py (one per corner, in any order;
each folder's corner is read from its meta.json). From each count cube
C_c[L, H, N] (1 = head among its layer's top-k by |score(full) - score(control)|):

  M_c = mean over pairs of C_c (--use-scale freq) or sum (count)
  M_shared = mean over corners;  residual_c = M_c - M_shared
  shared head = argmax_h (max or mean over layers) of M_shared
  unique head of c = the same on residual_c

plus, per corner, a paired sign-flip test of full vs control per (layer, head)
with Benjamini-Hochberg FDR (enough sign vectors that the p floor never limits
it), and position-only flags: heads whose share of image attention on the
corner's block, on a blank image of the background colour, is unusually high
(scores_blank_LHM.npy over scores_blank_image_LHM.npy). Heads are 0-based,
layers 1-based.

Example:
  python analyze_corner_heads.py runs/topleft runs/topright runs/bottomleft runs/bottomright \\
      --out-dir count_shared_unique
"""


def build_parser() -> argparse.ArgumentParser:
    p = command_parser(
        "analyze_corner_heads.py",
        CLI_DESCRIPTION)
    p.add_argument("dirs", nargs="+", type=Path,
                   help="the out-dirs of head_attention_stats.py, one per corner (topleft, topright, bottomleft, "
                        "bottomright); they must share the layers list, H and the scoring settings (model, "
                        "patch size, top-k, feed size, new tokens, prompt template, dtype), N may differ")
    p.add_argument("--out-dir", type=Path, default=Path("count_shared_unique"), help="where the outputs go")
    p.add_argument("--reduce-level", choices=["max", "mean"], default="max",
                   help="how a head's layer profile becomes one number before the argmax over heads")
    p.add_argument("--use-scale", choices=["count", "freq"], default="freq",
                   help="freq: M_c = fraction of pairs (every corner weighs the same); count: number of pairs")
    p.add_argument("--topk-pixels", type=int, default=3, help="cells of M_shared to box and list")
    p.add_argument("--topk-diff-pixels", type=int, default=3, help="cells of each residual to box and list")
    p.add_argument("--diff-brightness", choices=["raw", "abs"], default="raw",
                   help="rank residual cells by value (raw: over-used heads) or |value| (abs: also under-used)")
    p.add_argument("--alpha", type=float, default=0.05, help="Benjamini-Hochberg FDR level")
    p.add_argument("--n-perm", type=int, default=None,
                   help="random sign vectors per sign-flip test; None (automatic): ceil(20 m / alpha) for the "
                        "m = L x H heads, so the p floor 1/(n_perm+1) stays 20x below Benjamini-Hochberg's smallest "
                        "threshold alpha/m (313600 for 28 x 28 heads); exact over all 2^N sign vectors when 2^N is "
                        "no more; a smaller value is refused")
    p.add_argument("--seed", type=int, default=0, help="seed of the sign-flip test")
    p.add_argument("--blank-percentile", type=float, default=95.0,
                   help="position-only flag: a head's blank-image corner share (corner-block mass / image "
                        "mass) above this percentile of all heads' shares (and above the block's area share)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


@user_errors_exit
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    check_at_least(0, seed=args.seed)
    runs = load_corner_runs(args.dirs)
    check_output_dir(args.out_dir, "--out-dir")  # after the inputs: a refused run leaves no empty folder
    check_free(args.out_dir, SUMMARY_FILE, "--out-dir")
    analyze(runs, args.out_dir, reduce_level=args.reduce_level, use_scale=args.use_scale,
            topk_pixels=args.topk_pixels, topk_diff_pixels=args.topk_diff_pixels,
            diff_brightness=args.diff_brightness, alpha=args.alpha, n_perm=args.n_perm, seed=args.seed,
            blank_percentile=args.blank_percentile)
    mark_results(args.out_dir, SUMMARY_FILE)

