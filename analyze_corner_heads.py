"""Shared and unique attention heads across the four corner experiments.

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
from __future__ import annotations

import argparse
from pathlib import Path

from spatial_attention.cli import HelpFormatter, check_at_least, user_errors_exit
from spatial_attention.corner_analysis import analyze, load_corner_runs
from spatial_attention.runio import check_output_dir, setup_logging


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
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
    return p.parse_args(argv)


@user_errors_exit
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    setup_logging(args.verbose)
    check_at_least(0, seed=args.seed)
    runs = load_corner_runs(args.dirs)
    check_output_dir(args.out_dir, "--out-dir")  # after the inputs: a refused run leaves no empty folder
    analyze(runs, args.out_dir, reduce_level=args.reduce_level, use_scale=args.use_scale,
            topk_pixels=args.topk_pixels, topk_diff_pixels=args.topk_diff_pixels,
            diff_brightness=args.diff_brightness, alpha=args.alpha, n_perm=args.n_perm, seed=args.seed,
            blank_percentile=args.blank_percentile)


if __name__ == "__main__":
    main()
