"""Experiment 3, step 1: per-head attention scores on the fixed-position
counterfactual pairs (metrics.md, "Head specialisation").

For each pair (full image with a subject in the corner, control image without
it) and every (layer, head), the score is the attention mass from the answer
position to the image tokens (or to the ``--patch-size`` block of the corner).
With ``--max-new-tokens 1`` the answer position is the prompt's last position
and one forward pass per image suffices; with more, the model generates greedily
and the score is the mean over the generated steps. A blank image of the data
set's background colour is scored too (the position-only control).

Several ``--dataset`` folders can be given: the model is loaded once and each
folder's results go to ``OUT/head_diff_stats_{corner}``.
"""
from __future__ import annotations

import argparse
import csv
import io
import logging
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from spatial_attention import metrics as M
from spatial_attention.capture import CaptureRequest, capture, capture_generate
from spatial_attention.cli import HelpFormatter, add_model_args, default_batch_size, user_errors_exit
from spatial_attention.counterfactual import CORNER_WORDS, CORNERS, Pair, read_pairs
from spatial_attention.errors import DataError, OptionError
from spatial_attention.heads import corner_patch_indices, topk_count_cube
from spatial_attention.runio import package_versions, run_record, setup_logging, write_atomic, write_json

log = logging.getLogger("spatial_attention")
DEFAULT_PROMPT = "Is there anything in the {corner} corner?"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="head_attention_stats.py", formatter_class=HelpFormatter,
        description="Experiment 3: score every (layer, head) by the attention mass the answer position puts on the "
                    "image (or on a corner block) for the full and control image of each counterfactual pair, and "
                    "count which heads change most. Writes scores_full_LHN.npy, scores_control_LHN.npy, "
                    "scores_blank_LHM.npy, count_LHN.npy, count_LH.npy, answers.csv, count_bars.png, meta.json "
                    "and run.json into the out-dir.")
    parser.add_argument("--model", required=True, choices=["llava", "qwen2"], help="model family")
    add_model_args(parser, None)
    parser.add_argument("--dataset", nargs="+", required=True,  # str, not Path: run.json records the list
                        help="corner data set folder(s) data/dataset_{corner}; with several, the model is loaded "
                             "once and each gets OUT/head_diff_stats_{corner}")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT,
                        help="question asked with every image; '{corner}' becomes 'top left' etc.")
    parser.add_argument("--max-pairs", type=int, default=None, help="use at most this many pairs per data set")
    parser.add_argument("--max-new-tokens", type=int, default=1,
                        help="1: score the prompt's last position (one forward pass per image); more: generate "
                             "greedily and average the score over the generated steps")
    parser.add_argument("--topk", type=int, default=3, help="per layer and pair, how many heads get counted")
    parser.add_argument("--corner", default=None, choices=CORNERS,
                        help="corner whose block --patch-size restricts the score to (default: the data set's)")
    parser.add_argument("--patch-size", type=int, default=None,
                        help="score only the K x K block of image tokens in the corner (default: all image tokens)")
    parser.add_argument("--feed-size", type=int, default=672, help="Qwen2-VL: square side the image is fed at")
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="output folder (default: head_diff_stats_{corner}; with several data sets, the "
                             "parent of one such folder per corner, default '.')")
    return parser


@user_errors_exit
def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    args.layers = args.layers or "all"
    check_options(args)
    datasets = {}  # corner -> pairs; read before the (slow) model load so that a bad folder fails at once
    for folder in args.dataset:
        pairs = read_pairs(folder, limit=args.max_pairs)
        corner = corner_of(pairs, folder)
        if corner in datasets:
            raise OptionError(f"--dataset: two folders hold corner {corner!r}; their results would overwrite "
                              f"each other in head_diff_stats_{corner}")
        datasets[corner] = pairs
    from models import load_adapter

    adapter = load_adapter(args.model, args.model_path, device=args.device, dtype=args.dtype,
                           device_map=args.device_map, revision=args.revision, seed=args.seed)
    adapter.set_feed_size(args.feed_size)
    if not 1 <= args.topk <= adapter.num_heads:
        raise OptionError(f"--topk {args.topk}: must be between 1 and the model's {adapter.num_heads} heads per layer")
    for corner, pairs in datasets.items():
        if len(args.dataset) == 1:
            out = args.out_dir or Path(f"head_diff_stats_{corner}")
        else:
            out = (args.out_dir or Path(".")) / f"head_diff_stats_{corner}"
        score_dataset(adapter, args, pairs, corner, out)


def check_options(args) -> None:
    """OptionError for settings that cannot work, found before anything is loaded."""
    for name in ("max_new_tokens", "max_pairs", "patch_size", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise OptionError(f"--{name.replace('_', '-')} {value}: must be at least 1")
    if args.corner and not args.patch_size:
        raise OptionError(f"--corner {args.corner} only applies with --patch-size (without it the score covers "
                          "every image token)")


def corner_of(pairs: list[Pair], folder) -> str:
    """The one corner all pairs of a folder share."""
    corners = sorted({pair.corner for pair in pairs})
    if len(corners) != 1:
        raise DataError(f"{folder}: pairs of several corners ({', '.join(corners)}); a corner folder holds one")
    return corners[0]


def score_dataset(adapter, args, pairs: list[Pair], corner: str, out: Path) -> None:
    layers = M.layer_indices(args.layers, adapter.num_layers)
    prompt = args.prompt.format(corner=CORNER_WORDS[corner])
    patch_corner = args.corner or corner
    batch_size = default_batch_size(args, adapter.device)
    out.mkdir(parents=True, exist_ok=True)
    n = len(pairs)
    if args.max_pairs and n < args.max_pairs:
        log.warning("%s: the folder holds only %d pairs (--max-pairs %d)", corner, n, args.max_pairs)
    full = np.zeros((len(layers), adapter.num_heads, n), np.float32)
    control = np.zeros_like(full)
    answers = []
    for start in tqdm(range(0, n, batch_size), desc=f"{corner} pairs", unit="batch"):
        chunk = pairs[start:start + batch_size]
        images = [im for pair in chunk for im in pair.load_images()]  # full, control, full, control, ...
        scores, said = score_images(adapter, images, prompt, layers, patch_corner, args)
        for k, pair in enumerate(chunk):
            full[:, :, start + k] = scores[2 * k]
            control[:, :, start + k] = scores[2 * k + 1]
            answers.append({"id": pair.id, "full_answer": said[2 * k], "control_answer": said[2 * k + 1]})
    first_control = pairs[0].load_images()[1]
    blank_image = Image.new("RGB", first_control.size, background_colour(first_control))
    blank, _ = score_images(adapter, [blank_image], prompt, layers, patch_corner, args)
    blank = np.stack(blank, axis=-1).astype(np.float32)  # [L, H, 1]

    count = topk_count_cube(full, control, args.topk)
    np.save(out / "scores_full_LHN.npy", full)
    np.save(out / "scores_control_LHN.npy", control)
    np.save(out / "scores_blank_LHM.npy", blank)
    np.save(out / "count_LHN.npy", count)
    np.save(out / "count_LH.npy", count.sum(-1).astype(np.int32))
    write_atomic(out / "answers.csv", _answers_csv(answers))
    _plot_counts(out / "count_bars.png", count.sum(-1), [l + 1 for l in layers], corner, args.topk)
    meta = {"model": args.model, "model_path": adapter.model_path, "feed_size": adapter.feed_size, "layers": [l + 1 for l in layers],
            "L": len(layers), "H": adapter.num_heads, "N": n, "topk": args.topk, "prompt": prompt, "corner": corner,
            "patch_corner": patch_corner if args.patch_size else None, "patch_size": args.patch_size,
            "max_new_tokens": args.max_new_tokens, "pair_ids": [p.id for p in pairs],
            "answers_yes_full": _share_yes([a["full_answer"] for a in answers]),
            "answers_yes_control": _share_yes([a["control_answer"] for a in answers]),
            "versions": package_versions()}
    write_json(out / "meta.json", meta)
    write_json(out / "run.json", run_record(args, adapter, dataset=str(pairs[0].full_image.parent.parent)))
    log.info("%s: %d pairs scored into %s (full answered yes %.0f%%, control %.0f%%)", corner, n, out,
             100 * meta["answers_yes_full"], 100 * meta["answers_yes_control"])


def score_images(adapter, images: list[Image.Image], prompt: str, layers: list[int], corner: str,
                 args) -> tuple[list[np.ndarray], list[str]]:
    """Per image: the [L, H] attention mass of the answer position on the scored image tokens, and the answer."""
    if args.max_new_tokens == 1:
        batch = adapter.encode([prompt] * len(images), images)
        request = CaptureRequest(layers=layers, last_mass=[_scored_positions(lay, corner, args.patch_size)
                                                           for lay in batch.layouts])
        recordings, logits = capture(adapter, batch, request)
        said = [adapter.tokenizer.decode([int(t)], skip_special_tokens=True).strip() for t in logits.argmax(-1)]
        return [r["last_mass"] for r in recordings], said
    scores, said = [], []
    for image in images:
        batch = adapter.encode([prompt], [image])
        request = CaptureRequest(layers=layers, last_mass=[_scored_positions(batch.layouts[0], corner,
                                                                             args.patch_size)])
        recording, answer = capture_generate(adapter, batch, request, args.max_new_tokens)
        scores.append(recording["last_mass"])
        said.append(answer)
    return scores, said


def _scored_positions(layout, corner: str, patch_size: int | None) -> np.ndarray:
    if not patch_size:
        return layout.image_positions
    return layout.image_positions[corner_patch_indices(layout.grid, corner, patch_size)]


def background_colour(control: Image.Image) -> tuple[int, int, int]:
    """The most common colour of a control image: the data set's background."""
    pixels = np.asarray(control.convert("RGB")).reshape(-1, 3)
    colours, counts = np.unique(pixels, axis=0, return_counts=True)
    return tuple(int(v) for v in colours[counts.argmax()])


def _share_yes(answers: list[str]) -> float:
    return float(np.mean([a.strip().lower().startswith("yes") for a in answers])) if answers else 0.0


def _answers_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["id", "full_answer", "control_answer"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _plot_counts(path: Path, count_lh: np.ndarray, layer_numbers: list[int], corner: str, topk: int) -> None:
    """Per layer, a bar per head: how many pairs put that head in the layer's top-k."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_layers, n_heads = count_lh.shape
    cols = min(8, n_layers)
    rows = -(-n_layers // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 1.7 * rows), sharey=True, squeeze=False)
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
    fig.savefig(path, dpi=110)
    plt.close(fig)
