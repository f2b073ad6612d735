"""Experiment 3, step 1: per-head attention scores on the fixed-position
counterfactual pairs (metrics.md, "Head specialisation").

For each pair (full image with a subject in the corner, control image without
it) and every (layer, head), the score is the attention mass from the answer
position to the image tokens (or to the ``--patch-size`` block of the corner).
With ``--max-new-tokens 1`` the answer position is the prompt's last position
and one forward pass per image suffices; with more, the model generates greedily
and the score is the mean over the generated steps.

The position-only control: a blank image of the data set's background colour is
scored on the corner block (the ``--patch-size`` block, else the corner quarter
of the token grid) and on all image tokens, so that the analysis can ask which
heads favour the corner when there is nothing to see.

Resume: each pair's scores go to ``OUT/pairs_scores.jsonl`` as its batch
finishes; a rerun with the same out-dir scores only the pairs not there yet and
refuses when the scoring settings (``OUT/pairs_settings.json``) differ, the data
set included (its folder and the sha256 of its metadata.jsonl, which changes with
every regeneration). Everything that needs no model, and every line of
pairs_scores.jsonl, is checked before the model loads. The .npy cubes,
answers.csv and meta.json are rebuilt from that file at the end of each corner,
in the data set's pair order. A pair whose images cannot be used is skipped with
a warning and counted in meta.json.

Several ``--dataset`` folders can be given: the model is loaded once and each
folder's results go to ``OUT/head_diff_stats_{corner}``.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import logging
from collections import Counter
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image
from tqdm import tqdm

from spatial_attention import metrics as M
from spatial_attention.capture import CaptureRequest, capture, capture_generate
from spatial_attention.cli import (HelpFormatter, add_model_args, check_at_least, check_model_options,
                                   default_batch_size, user_errors_exit)
from spatial_attention.counterfactual import CORNERS, Pair, fill_corner_prompt, read_pairs
from spatial_attention.errors import DataError, OptionError
from spatial_attention.heads import corner_patch_indices, topk_count_cube
from spatial_attention.runio import (append_jsonl, check_output_dir, finish_run, lacks_keys, package_versions,
                                     read_jsonl, run_record, setup_logging, start_run, write_atomic, write_json)

log = logging.getLogger("spatial_attention")
DEFAULT_PROMPT = "Is there anything in the {corner} corner?"
PAIRS_FILE = "pairs_scores.jsonl"
SETTINGS_FILE = "pairs_settings.json"
OUTPUT_FILES = ("scores_full_LHN.npy", "scores_control_LHN.npy", "scores_blank_LHM.npy",
                "scores_blank_image_LHM.npy", "count_LHN.npy", "count_LH.npy", "answers.csv", "count_bars.png",
                "meta.json")
OPTION_OF_SETTING = {"model": "--model", "model_path": "--model-path", "revision": "--revision",
                     "layers": "--layers", "prompt": "--prompt", "patch_size": "--patch-size",
                     "patch_corner": "--corner", "max_new_tokens": "--max-new-tokens", "feed_size": "--feed-size",
                     "dtype": "--dtype", "dataset": "--dataset",
                     "dataset_sha256": "--dataset (sha256 of its metadata.jsonl)"}
PAIR_KEYS = ("id", "full", "control", "full_answer", "control_answer")

Columns = Callable[[object], np.ndarray]  # a sample's token layout -> the key positions its score covers


@dataclass(frozen=True)
class CornerDataset:
    """One --dataset folder: its corner, its pairs and the digest of its metadata.jsonl."""
    folder: Path
    corner: str
    pairs: list[Pair]
    metadata_sha256: str

    @property
    def identity(self) -> dict:
        """What tells this data set from another of the same corner (a regenerated one changes the digest)."""
        return {"dataset": str(self.folder.resolve()), "dataset_sha256": self.metadata_sha256}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="head_attention_stats.py", formatter_class=HelpFormatter,
        description="Experiment 3: score every (layer, head) by the attention mass the answer position puts on the "
                    "image (or on a corner block) for the full and control image of each counterfactual pair, and "
                    "count which heads change most. Writes scores_full_LHN.npy, scores_control_LHN.npy, "
                    "scores_blank_LHM.npy (blank image, corner block), scores_blank_image_LHM.npy (blank image, all "
                    "image tokens), count_LHN.npy, count_LH.npy, answers.csv, count_bars.png, meta.json and "
                    "run.json into the out-dir; pairs_scores.jsonl keeps every scored pair, so that rerunning "
                    "the same command resumes.")
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
                        help="score only the K x K block of image tokens in the corner (default: all image tokens; "
                             "the blank control is then scored on the corner quarter of the token grid)")
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
    datasets = read_datasets(args)
    outs = output_folders(args, list(datasets))
    for corner, out in outs.items():  # before the (slow) model load: a refusal costs seconds
        check_resume(out, settings_before_load(args, datasets[corner]))
        read_pair_records(out / PAIRS_FILE)  # a damaged line fails now, not after the load
    from models import load_adapter

    adapter = load_adapter(args.model, args.model_path, device=args.device, dtype=args.dtype,
                           device_map=args.device_map, revision=args.revision, seed=args.seed)
    adapter.set_feed_size(args.feed_size)
    if args.topk > adapter.num_heads:
        raise OptionError(f"--topk {args.topk}: must be between 1 and the model's {adapter.num_heads} heads per layer")
    for corner, out in outs.items():  # every folder before the first is scored: a refusal costs no finished corner
        check_resume(out, scoring_settings(adapter, args, datasets[corner]))
    for corner, dataset in datasets.items():
        score_dataset(adapter, args, dataset, outs[corner])


def check_options(args) -> None:
    """OptionError for settings that cannot work, found before anything is loaded."""
    check_model_options(args)
    check_at_least(1, max_new_tokens=args.max_new_tokens, max_pairs=args.max_pairs, patch_size=args.patch_size,
                   topk=args.topk, feed_size=args.feed_size)
    if args.corner and not args.patch_size:
        raise OptionError(f"--corner {args.corner} only applies with --patch-size (without it the score covers "
                          "every image token)")
    fill_corner_prompt(args.prompt, CORNERS[0])  # its form; every corner fills the same placeholder
    from models import ADAPTERS

    ADAPTERS[args.model].check_feed_size(args.feed_size)


def read_datasets(args) -> dict[str, CornerDataset]:
    """corner -> each --dataset folder, read before the (slow) model load: a bad folder fails at once."""
    datasets = {}
    for folder in args.dataset:
        dataset = read_dataset(Path(folder), args.max_pairs)
        if dataset.corner in datasets:
            raise OptionError(f"--dataset: two folders hold corner {dataset.corner!r}; their results would overwrite "
                              f"each other in head_diff_stats_{dataset.corner}")
        datasets[dataset.corner] = dataset
    return datasets


def read_dataset(folder: Path, limit: int | None) -> CornerDataset:
    """One corner folder's pairs (at most ``limit``) and the digest of its whole metadata.jsonl."""
    pairs = read_pairs(folder, limit=limit)
    ids = [pair.id for pair in pairs]
    if len(set(ids)) < len(ids):
        raise DataError(f"{folder}: pair ids repeat; each pair needs its own id (a rerun resumes by id)")
    digest = hashlib.sha256((folder / "metadata.jsonl").read_bytes()).hexdigest()
    return CornerDataset(folder, corner_of(pairs, folder), pairs, digest)


def output_folders(args, corners: list[str]) -> dict[str, Path]:
    """corner -> its out-dir, each checked writable before the model loads."""
    if len(args.dataset) == 1:
        return {corners[0]: check_output_dir(args.out_dir or Path(f"head_diff_stats_{corners[0]}"), "--out-dir")}
    parent = check_output_dir(args.out_dir or Path("."), "--out-dir")
    return {corner: check_output_dir(parent / f"head_diff_stats_{corner}", "--out-dir") for corner in corners}


def corner_of(pairs: list[Pair], folder) -> str:
    """The one corner all pairs of a folder share."""
    corners = sorted({pair.corner for pair in pairs})
    if len(corners) != 1:
        raise DataError(f"{folder}: pairs of several corners ({', '.join(corners)}); a corner folder holds one")
    return corners[0]


# --- resume ---------------------------------------------------------------------------

def settings_before_load(args, dataset: CornerDataset) -> dict:
    """The scoring settings known without the model, as ``scoring_settings`` will give them: the
    layers only when --layers lists numbers (a mode such as 'all' needs the model's depth)."""
    from models import ADAPTERS
    from models.base import VLMAdapter, pick_device_and_dtype

    family = ADAPTERS[args.model]
    # a family whose input size is fixed (LLaVA-1.5) keeps the base class's set_feed_size and reports None
    takes_feed_size = family.set_feed_size is not VLMAdapter.set_feed_size
    settings = {"model": args.model, "model_path": args.model_path or family.default_model_path,
                "revision": args.revision, "dtype": _dtype_name(pick_device_and_dtype(args.device, args.dtype)[1]),
                "prompt": fill_corner_prompt(args.prompt, dataset.corner), "patch_size": args.patch_size,
                "patch_corner": (args.corner or dataset.corner) if args.patch_size else None,
                "max_new_tokens": args.max_new_tokens,
                "feed_size": [args.feed_size, args.feed_size] if takes_feed_size else None, **dataset.identity}
    listed = M.layer_indices(args.layers, None)  # [] for a mode
    if listed:
        settings["layers"] = [layer + 1 for layer in listed]
    return settings


def scoring_settings(adapter, args, dataset: CornerDataset) -> dict:
    """What every pair of one out-dir must be scored with (as JSON holds it), the loaded model's own
    values included."""
    return {**settings_before_load(args, dataset), "model": adapter.family, "model_path": adapter.model_path,
            "dtype": _dtype_name(adapter.dtype),
            "layers": [layer + 1 for layer in M.layer_indices(args.layers, adapter.num_layers)],
            "feed_size": list(adapter.feed_size) if adapter.feed_size else None}


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")  # bf16 and fp32 scores are not pooled


def check_resume(out: Path, settings: dict) -> None:
    """Refuse to add pairs to an out-dir scored with other settings: its cubes would mix two scorings."""
    pairs_path = out / PAIRS_FILE
    if not pairs_path.is_file() or pairs_path.stat().st_size == 0:
        return
    try:
        recorded = json.loads((out / SETTINGS_FILE).read_text())
    except (OSError, ValueError):
        raise DataError(f"{pairs_path}: scored pairs without a readable {SETTINGS_FILE} beside them, so there is no "
                        f"telling how they were scored; delete {PAIRS_FILE} to start over, or choose another "
                        "--out-dir") from None
    for key, value in settings.items():
        if key not in recorded:  # an out-dir from before the setting was recorded
            raise OptionError(f"--out-dir {out}: its {SETTINGS_FILE} does not record {OPTION_OF_SETTING[key]}, so "
                              f"there is no telling whether its pairs match this run; delete {PAIRS_FILE} there to "
                              "rescore them, or choose another --out-dir")
        if recorded[key] != value:
            raise OptionError(f"--out-dir {out}: its pairs were scored with {OPTION_OF_SETTING[key]} "
                              f"{recorded[key]!r}, not {value!r}; rerun with the same setting to resume, or "
                              "choose another --out-dir")


def read_pair_records(path: Path) -> list[dict]:
    """The scored pairs in ``path``, each checked: a hand-edited or foreign line is one DataError
    naming its line, not a TypeError while the cubes are stacked."""
    first: list = []  # (scores shape, pair id) of the first pair: every pair has the same [layers, heads]

    def problem(record) -> str | None:
        why = _pair_record_problem(record, first[0] if first else None)
        if not why and not first:
            first.append((np.shape(record["full"]), record["id"]))
        return why

    return list(read_jsonl(path, problem))


def _pair_record_problem(record, first: tuple[tuple, object] | None) -> str | None:
    """Why ``record`` is not a pair record with scores of the first's (shape, pair id); None if it is."""
    lacking = lacks_keys(*PAIR_KEYS)(record)
    if lacking:
        return lacking
    if not isinstance(record["id"], (str, int, float)) or isinstance(record["id"], bool):
        return f"id {record['id']!r} is not a pair id"
    for key in ("full_answer", "control_answer"):
        if not isinstance(record[key], str):
            return f"{key} is not text"
    for key in ("full", "control"):
        try:
            scores = np.asarray(record[key], dtype=np.float64)
        except (TypeError, ValueError):
            return f"{key} is not a table of numbers"
        if scores.ndim != 2:
            return f"{key} has shape {list(scores.shape)}, not [layers, heads]"
        if first and scores.shape != first[0]:
            return f"{key} has shape {list(scores.shape)}, but pair {first[1]!r}'s has {list(first[0])}"
    return None


def _outputs_current(out: Path, pair_ids: list, topk: int) -> bool:
    """Whether the corner's outputs were built from exactly these pairs, with this --topk."""
    if not all((out / name).is_file() for name in OUTPUT_FILES):
        return False
    try:
        meta = json.loads((out / "meta.json").read_text())
    except (OSError, ValueError):
        return False
    return meta.get("pair_ids") == pair_ids and meta.get("topk") == topk


# --- scoring --------------------------------------------------------------------------

def score_dataset(adapter, args, dataset: CornerDataset, out: Path) -> None:
    """Score the pairs not yet in OUT/pairs_scores.jsonl, then rebuild the corner's outputs from that file."""
    pairs, corner = dataset.pairs, dataset.corner
    out.mkdir(parents=True, exist_ok=True)
    settings = scoring_settings(adapter, args, dataset)
    check_resume(out, settings)
    pairs_path = out / PAIRS_FILE
    done = {record["id"] for record in read_pair_records(pairs_path)}
    todo = [pair for pair in pairs if pair.id not in done]
    if not todo and _outputs_current(out, [pair.id for pair in pairs], args.topk):
        log.info("%s: all %d pairs already scored in %s; nothing to redo", corner, len(pairs), out)
        return
    if args.max_pairs and len(pairs) < args.max_pairs:
        log.warning("%s: the folder holds only %d pairs (--max-pairs %d)", corner, len(pairs), args.max_pairs)
    if len(todo) < len(pairs):
        log.info("%s: resuming; %d of %d pairs already in %s", corner, len(pairs) - len(todo), len(pairs), pairs_path)
    else:
        write_json(out / SETTINGS_FILE, settings)
    record = run_record(args, adapter, dataset=str(dataset.folder))
    start_run(out / "run.json", record)
    skipped = score_pairs(adapter, args, todo, corner, pairs_path)
    by_id = {r["id"]: r for r in read_pair_records(pairs_path)}
    records = [by_id[pair.id] for pair in pairs if pair.id in by_id]  # the data set's order, as an unbroken run has
    if not records:
        raise DataError(f"{corner}: none of the {len(pairs)} pairs could be scored (see the warnings above)")
    meta = write_outputs(adapter, args, pairs, corner, out, records, skipped)
    finish_run(out / "run.json", {**record, "pairs_scored": meta["N"], "pairs_skipped": meta["skipped"]["count"]})


def score_pairs(adapter, args, pairs: list[Pair], corner: str, pairs_path: Path) -> list[dict]:
    """Score ``pairs`` batch by batch, appending one record per pair to ``pairs_path`` as each batch
    finishes; returns the pairs skipped because their images cannot be used, with why."""
    layers = M.layer_indices(args.layers, adapter.num_layers)
    prompt = fill_corner_prompt(args.prompt, corner)
    columns = partial(_scored_positions, corner=args.corner or corner, patch_size=args.patch_size)
    batch_size = default_batch_size(args, adapter.device)
    skipped = []
    for start in tqdm(range(0, len(pairs), batch_size), desc=f"{corner} pairs", unit="batch"):
        loaded = []
        for pair in pairs[start:start + batch_size]:
            try:
                loaded.append((pair, pair.load_images()))
            except DataError as err:  # one bad pair must not cost the others
                log.warning("%s: skipping %s", corner, err)  # the error names the pair and the file
                skipped.append({"id": pair.id, "reason": "unusable_images", "detail": str(err)})
        if not loaded:
            continue
        images = [image for _, full_control in loaded for image in full_control]  # full, control, full, ...
        scores, said = score_images(adapter, images, prompt, layers, [columns] * len(images), args.max_new_tokens)
        for k, (pair, _) in enumerate(loaded):
            append_jsonl(pairs_path, {"id": pair.id, "full": scores[2 * k], "control": scores[2 * k + 1],
                                      "full_answer": said[2 * k], "control_answer": said[2 * k + 1]})
    return skipped


def write_outputs(adapter, args, pairs: list[Pair], corner: str, out: Path, records: list[dict],
                  skipped: list[dict]) -> dict:
    """The cubes, the blank control, answers.csv, the count plot and meta.json from the pair records."""
    layers = M.layer_indices(args.layers, adapter.num_layers)
    prompt = fill_corner_prompt(args.prompt, corner)
    full = np.stack([np.asarray(r["full"], np.float32) for r in records], axis=-1)  # [L, H, N]
    control = np.stack([np.asarray(r["control"], np.float32) for r in records], axis=-1)
    blank_on_block, blank_on_image, block = score_blank(adapter, args, pairs, corner, prompt, layers)
    count = topk_count_cube(full, control, args.topk)
    np.save(out / "scores_full_LHN.npy", full)
    np.save(out / "scores_control_LHN.npy", control)
    np.save(out / "scores_blank_LHM.npy", blank_on_block)
    np.save(out / "scores_blank_image_LHM.npy", blank_on_image)
    np.save(out / "count_LHN.npy", count)
    np.save(out / "count_LH.npy", count.sum(-1).astype(np.int32))
    answers = [{"id": r["id"], "full_answer": r["full_answer"], "control_answer": r["control_answer"]}
               for r in records]
    write_atomic(out / "answers.csv", _answers_csv(answers))
    _plot_counts(out / "count_bars.png", count.sum(-1), [l + 1 for l in layers], corner, args.topk)
    meta = {"model": args.model, "model_path": adapter.model_path, "feed_size": adapter.feed_size,
            "dtype": _dtype_name(adapter.dtype), "layers": [l + 1 for l in layers], "L": len(layers),
            "H": adapter.num_heads, "N": len(records), "topk": args.topk, "prompt": prompt,
            "prompt_template": args.prompt, "corner": corner,
            "patch_corner": (args.corner or corner) if args.patch_size else None, "patch_size": args.patch_size,
            "blank_block": block, "max_new_tokens": args.max_new_tokens, "pair_ids": [r["id"] for r in records],
            "skipped": {"count": len(skipped), "by_reason": dict(Counter(s["reason"] for s in skipped)),
                        "pairs": skipped},
            "answers_yes_full": _share_yes([a["full_answer"] for a in answers]),
            "answers_yes_control": _share_yes([a["control_answer"] for a in answers]),
            "versions": package_versions()}
    write_json(out / "meta.json", meta)
    log.info("%s: %d pairs scored into %s, %d skipped (full answered yes %.0f%%, control %.0f%%)", corner,
             len(records), out, len(skipped), 100 * meta["answers_yes_full"], 100 * meta["answers_yes_control"])
    return meta


def score_blank(adapter, args, pairs: list[Pair], corner: str, prompt: str,
                layers: list[int]) -> tuple[np.ndarray, np.ndarray, dict]:
    """The position-only control: a blank image of the background colour scored on the corner block
    and on all image tokens (the same image twice in one batch; with --max-new-tokens > 1, two generations).
    Returns both [L, H, 1] scores and the block."""
    image = make_blank_image(pairs)
    grid = adapter.token_grid(adapter.prepare_image(image))
    block_corner = args.corner or corner
    rows, cols = blank_block_size(grid, args.patch_size)
    cells = corner_patch_indices(grid, block_corner, (rows, cols))
    columns = [lambda layout: layout.image_positions[cells], lambda layout: layout.image_positions]
    scores, _ = score_images(adapter, [image, image], prompt, layers, columns, args.max_new_tokens)
    block = {"corner": block_corner, "rows": rows, "cols": cols, "grid": list(grid)}
    return scores[0][..., None].astype(np.float32), scores[1][..., None].astype(np.float32), block


def blank_block_size(grid: tuple[int, int], patch_size: int | None) -> tuple[int, int]:
    """(rows, cols) of the blank control's corner block: the --patch-size block, else the corner quarter
    of the token grid (without a patch the pairs are scored on the whole image, but the control must
    still be about the corner)."""
    if patch_size:
        return patch_size, patch_size
    return grid[0] // 2, grid[1] // 2


def make_blank_image(pairs: list[Pair]) -> Image.Image:
    """An image of the data set's background colour, the size of its first usable control image."""
    for pair in pairs:
        try:
            control = pair.load_images()[1]
        except DataError:
            continue
        return Image.new("RGB", control.size, background_colour(control))
    raise DataError(f"{pairs[0].full_image.parent.parent}: no pair's images can be read for the blank control")


def score_images(adapter, images: list[Image.Image], prompt: str, layers: list[int], columns: list[Columns],
                 max_new_tokens: int) -> tuple[list[np.ndarray], list[str]]:
    """Per image: the [L, H] attention mass of the answer position on the key positions its
    ``columns`` picks from its token layout, and the answer."""
    if max_new_tokens == 1:
        batch = adapter.encode([prompt] * len(images), images)
        request = CaptureRequest(layers=layers,
                                 last_mass=[pick(layout) for pick, layout in zip(columns, batch.layouts)])
        recordings, logits = capture(adapter, batch, request)
        said = [adapter.tokenizer.decode([int(t)], skip_special_tokens=True).strip() for t in logits.argmax(-1)]
        return [r["last_mass"] for r in recordings], said
    scores, said = [], []
    for image, pick in zip(images, columns):
        batch = adapter.encode([prompt], [image])
        request = CaptureRequest(layers=layers, last_mass=[pick(batch.layouts[0])])
        recording, answer = capture_generate(adapter, batch, request, max_new_tokens)
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
