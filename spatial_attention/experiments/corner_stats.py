"""Experiment 3, step 1: per-head scores on the fixed-position counterfactual
pairs (metrics.md, "Head specialisation").

For each pair (full image with a subject in the corner, control image without
it) and every (layer, head), the score (``--score attention``, the paper's) is
the attention mass from the answer position to the image tokens (or to the
``--patch-size`` block of the corner). With ``--max-new-tokens 1`` the answer
position is the prompt's last position and one forward pass per image suffices;
with more, the model generates greedily and the score is the mean over the
generated steps. ``--score patching`` scores instead what each head's output at
the answer position does to the yes/no log-odds when swapped between the pair's
two images (``spatial_attention.experiments.patching``): the causal score, one forward of
the pair per head.

The position-only control: a blank image of the data set's background colour is
scored on the corner block (the ``--patch-size`` block, else the corner quarter
of the token grid) and on all image tokens, so that the analysis can ask which
heads favour the corner when there is nothing to see.

Resume: each pair's scores go to ``OUT/pairs_scores.jsonl`` as its batch
finishes; a rerun with the same out-dir scores only the pairs not there yet and
refuses when the scoring settings (``OUT/identity.json``) differ, the data
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
import io
import json
import logging
from collections import Counter
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from spatial_attention.common.console import check_at_least, command_parser, user_errors_exit
from spatial_attention.common.errors import DataError, OptionError
from spatial_attention.common.runio import (RecordCheck, check_output_dir, finish_run, lacks_keys, package_versions,
                                            setup_logging, start_run, write_atomic, write_json)
from spatial_attention.data.counterfactual import (CORNER_PROMPT, CORNERS, PAIR_SPLITS, CornerDataset, Pair,
                                                   fill_corner_prompt, read_dataset, split_pairs)
from spatial_attention.engine.capture import CaptureRequest, capture, capture_generate, greedy_answers
from spatial_attention.experiments import patching
from spatial_attention.experiments.ablation_measure import yes_no_ids
from spatial_attention.experiments.heads import corner_patch_indices, topk_count_cube
from spatial_attention.run import controls
from spatial_attention.run.cli import add_model_args
from spatial_attention.run.cost import Forwards, batched
from spatial_attention.run.figures import plot_count_bars
from spatial_attention.run.options import ModelOptions, dtype_name
from spatial_attention.run.runloop import (Results, Run, check_identity, join_processes, load_run, open_results,
                                           resumable_map)

log = logging.getLogger("spatial_attention")
PAIRS_FILE = "pairs_scores.jsonl"
OUTPUT_FILES = ("scores_full_LHN.npy", "scores_control_LHN.npy", "scores_blank_LHM.npy",
                "scores_blank_image_LHM.npy", "count_LHN.npy", "count_LH.npy", "answers.csv", "count_bars.png",
                "meta.json")
PAIR_KEYS = ("id", "full", "control", "full_answer", "control_answer")
DEFAULT_LAYERS = "all"  # every layer's heads are scored
SCORES = ("attention", "patching")
HEADS_PER_FORWARD = 16  # --score patching: heads swapped per forward (2 images each)

Columns = Callable[[object], np.ndarray]  # a sample's token layout -> the key positions its score covers


@dataclass(frozen=True)
class Scoring:
    """How the pairs are scored (the experiment's own options)."""
    score: str  # one of SCORES
    prompt: str  # the template, '{corner}' not yet filled in
    patch_size: int | None  # score a K x K corner block of image tokens (None: every image token)
    patch_corner: str | None  # the block's corner (None: the data set's)
    max_new_tokens: int
    topk: int

    def corner_of_block(self, corner: str) -> str | None:
        """The corner whose block the score covers on data set ``corner``'s images (None: all image tokens)."""
        return (self.patch_corner or corner) if self.patch_size else None

    def identity(self, corner: str) -> dict:
        """What changes the scores of one corner's pairs (--topk only changes the count cubes built from them).
        --score only where it is not the attention score, so that folders made before it existed still resume."""
        score = {} if self.score == "attention" else {"--score": self.score}
        return {**score, "--prompt": fill_corner_prompt(self.prompt, corner), "--patch-size": self.patch_size,
                "--corner": self.corner_of_block(corner), "--max-new-tokens": self.max_new_tokens}


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser(
        "head_attention_stats.py",
        "Experiment 3: score every (layer, head) by the attention mass the answer position puts on the "
        "image (or on a corner block) for the full and control image of each counterfactual pair, or "
        "(--score patching) by what its answer-position output does to the yes/no log-odds when swapped "
        "between the two, and count which heads change most. Writes scores_full_LHN.npy, "
        "scores_control_LHN.npy, scores_blank_LHM.npy (blank image, corner block), scores_blank_image_LHM.npy (blank image, all "
        "image tokens), count_LHN.npy, count_LH.npy, answers.csv, count_bars.png, meta.json and "
        "run.json into the out-dir; pairs_scores.jsonl keeps every scored pair, so that rerunning "
        "the same command resumes.")
    add_model_args(parser, None, feed_size="the family's")
    controls.add_control_args(parser)
    parser.add_argument("--dataset", nargs="+", required=True,  # str, not Path: run.json records the list
                        help="corner data set folder(s) data/dataset_{corner}; with several, the model is loaded "
                             "once and each gets OUT/head_diff_stats_{corner}")
    parser.add_argument("--prompt", default=CORNER_PROMPT,
                        help="question asked with every image; '{corner}' becomes 'top left' etc.")
    parser.add_argument("--score", choices=SCORES, default="attention",
                        help="attention: the paper's score, the answer position's attention mass on the image (or "
                             "corner block); patching: the yes/no log-odds change when the head's answer-position "
                             "output is swapped between the pair's full and control image (full minus control = "
                             "the part of the answer gap the head carries; exact, one forward of the pair per "
                             "scored head: restrict with --layers on a 7B model). The attention score misses the "
                             "heads the toy models' answers depend on (docs/controls.md)")
    parser.add_argument("--max-pairs", type=int, default=None, help="use at most this many pairs per data set")
    parser.add_argument("--pairs", choices=PAIR_SPLITS, default="all",
                        help="which of the (first --max-pairs) pairs to score: all, or the discovery half (the 1st, "
                             "3rd, ... pair), so that head_ablation.py can test the heads found here on the other "
                             "half (--pairs test, its default), not on the pairs they were found on")
    parser.add_argument("--max-new-tokens", type=int, default=1,
                        help="1: score the prompt's last position (one forward pass per image); more: generate "
                             "greedily and average the score over the generated steps")
    parser.add_argument("--topk", type=int, default=3, help="per layer and pair, how many heads get counted")
    parser.add_argument("--corner", default=None, choices=CORNERS,
                        help="corner whose block --patch-size restricts the score to (default: the data set's)")
    parser.add_argument("--patch-size", type=int, default=None,
                        help="score only the K x K block of image tokens in the corner (default: all image tokens; "
                             "the blank control is then scored on the corner quarter of the token grid)")
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="output folder (default: head_diff_stats_{corner}; with several data sets, the "
                             "parent of one such folder per corner, default '.')")
    return parser


@user_errors_exit
def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    options = ModelOptions.from_args(args.model, args)
    scoring = check_scoring(args)
    datasets = read_datasets(args.dataset, args.max_pairs, args.pairs)
    root = output_root(args.out_dir, list(datasets))
    planned = [(run_options, output_folders(folder, list(datasets)))
               for run_options, folder in controls.runs(options, root, args)]  # every folder checked before a load
    share = None
    for run_options, outs in planned:
        run_options, share = join_processes(run_options)
        _score(args, run_options, share, scoring, datasets, outs)
    if share.is_main:
        for corner, out in output_folders(root, list(datasets)).items():
            folders = [output_folders(seed_root, list(datasets))[corner]
                       for seed_root in controls.control_seed_folders(root)]
            controls.write_comparison(out, ITEM_METRICS, seed=options.seed, seed_folders=folders)


def _score(args, options: ModelOptions, share, scoring: Scoring, datasets: dict[str, CornerDataset],
           outs: dict[str, Path]) -> None:
    """Experiment 3 with one model (the checkpoint, or one initialisation of the control) into ``outs``."""
    results = {corner: pair_results(out) for corner, out in outs.items()}

    def check_folders(model: dict, check) -> None:
        for corner, dataset in datasets.items():
            check(results[corner], identity(model, scoring, dataset))

    share.main_checks(lambda: check_folders(options.identity(DEFAULT_LAYERS), open_results))  # before the load
    run = load_run(options, share, vars(args), out=args.out_dir, default_layers=DEFAULT_LAYERS)
    if scoring.topk > run.adapter.num_heads:
        raise OptionError(f"--topk {scoring.topk}: must be between 1 and the model's {run.adapter.num_heads} heads "
                          "per layer")
    # every folder with the loaded model's values before the first corner is scored: a refusal costs no corner
    share.main_checks(lambda: check_folders(run.identity(), lambda results, identity:
                                            check_identity(results.path, identity, results.option)))
    for corner, dataset in datasets.items():
        score_dataset(run, scoring, dataset, results[corner], max_pairs=args.max_pairs)


def _pair_metrics(record: dict) -> dict[str, float]:
    """Per pair: whether each image was answered yes, and the heads' full-minus-control scores (mean, max)."""
    diff = np.asarray(record["full"], np.float64) - np.asarray(record["control"], np.float64)
    return {"full_answer_yes": float(_share_yes([record["full_answer"]])),
            "control_answer_yes": float(_share_yes([record["control_answer"]])),
            "head_score_diff_mean": float(diff.mean()), "head_score_diff_max": float(diff.max())}


ITEM_METRICS = controls.ItemMetrics(PAIRS_FILE, lambda record: record["id"], _pair_metrics)


def check_scoring(args) -> Scoring:
    """The scoring options, checked before anything is loaded."""
    check_at_least(1, max_new_tokens=args.max_new_tokens, max_pairs=args.max_pairs, patch_size=args.patch_size,
                   topk=args.topk)
    if args.score == "patching":
        given = [option for option, value in (("--patch-size", args.patch_size), ("--corner", args.corner),
                                               ("--max-new-tokens", args.max_new_tokens != 1)) if value]
        if given:
            raise OptionError(f"{given[0]} does not apply to --score patching, which swaps each head's output at "
                              "the answer position (the prompt's last) whatever it attends to; leave it out or "
                              "use --score attention")
    if args.corner and not args.patch_size:
        raise OptionError(f"--corner {args.corner} only applies with --patch-size (without it the score covers "
                          "every image token)")
    fill_corner_prompt(args.prompt, CORNERS[0])  # its form; every corner fills the same placeholder
    return Scoring(args.score, args.prompt, args.patch_size, args.corner, args.max_new_tokens, args.topk)


def identity(model: dict, scoring: Scoring, dataset: CornerDataset) -> dict:
    """A corner out-dir's identity: the model's part, the scoring's, the data set's."""
    return {**model, **scoring.identity(dataset.corner), **dataset.identity}


def read_datasets(folders: list[str], max_pairs: int | None, split: str = "all") -> dict[str, CornerDataset]:
    """corner -> each --dataset folder (its ``split`` pairs), read before the (slow) model load: a bad folder
    fails at once."""
    datasets = {}
    for folder in folders:
        dataset = read_dataset(Path(folder), max_pairs, split)
        if dataset.corner in datasets:
            raise OptionError(f"--dataset: two folders hold corner {dataset.corner!r}; their results would overwrite "
                              f"each other in head_diff_stats_{dataset.corner}")
        datasets[dataset.corner] = dataset
    return datasets


def output_root(out_dir: Path | None, corners: list[str]) -> Path:
    """The folder --out-dir names: one data set's out-dir, or the parent of one per corner."""
    if out_dir is not None:
        return out_dir
    return Path(f"head_diff_stats_{corners[0]}") if len(corners) == 1 else Path(".")


def output_folders(root: Path, corners: list[str]) -> dict[str, Path]:
    """corner -> its out-dir (``root`` itself for one data set), each checked writable before the model loads."""
    if len(corners) == 1:
        return {corners[0]: check_output_dir(root, "--out-dir")}
    parent = check_output_dir(root, "--out-dir")
    return {corner: check_output_dir(parent / f"head_diff_stats_{corner}", "--out-dir") for corner in corners}


# --- resume ---------------------------------------------------------------------------

def pair_results(out: Path) -> Results:
    """The results file of one corner out-dir: a line per scored pair, keyed by the pair's id."""
    return Results(out / PAIRS_FILE, item_key=lambda pair: pair.id, record_key=lambda record: record["id"],
                   check=pair_record_check(), option="--out-dir")


def pair_record_check() -> RecordCheck:
    """The check of one results file's lines (see read_jsonl): a hand-edited or foreign line is one
    DataError naming its line, not a TypeError while the cubes are stacked."""
    first: list = []  # (scores shape, pair id) of the first pair: every pair has the same [layers, heads]

    def problem(record) -> str | None:
        why = _pair_record_problem(record, first[0] if first else None)
        if not why and not first:
            first.append((np.shape(record["full"]), record["id"]))
        return why

    return problem


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

def score_dataset(run: Run, scoring: Scoring, dataset: CornerDataset, results: Results,
                  max_pairs: int | None = None) -> None:
    """Score the pairs not yet in the corner's results file, then rebuild the corner's outputs from it."""
    pairs, corner, out = dataset.pairs, dataset.corner, results.path.parent
    if max_pairs and len(pairs) < len(split_pairs(range(max_pairs), dataset.split)):
        log.warning("%s: the folder holds only %d %s pairs (--max-pairs %d)", corner, len(pairs), dataset.split,
                    max_pairs)
    ids = [pair.id for pair in pairs]
    the_identity = identity(run.identity(), scoring, dataset)
    run.share.main_checks(lambda: open_results(results, the_identity))
    if {record["id"] for record in results.read()} >= set(ids) and _outputs_current(out, ids, scoring.topk):
        log.info("%s: all %d pairs already scored in %s; nothing to redo", corner, len(pairs), out)
        return
    record, since = run.record(dataset=str(dataset.folder)), run.now()
    if run.share.is_main:
        start_run(out / "run.json", record)
    prompt = fill_corner_prompt(scoring.prompt, corner)
    columns = partial(_scored_positions, corner=scoring.corner_of_block(corner), patch_size=scoring.patch_size)
    skipped = []  # the pairs whose images cannot be used, with why
    answer_ids = yes_no_ids(run.adapter.tokenizer) if scoring.score == "patching" else None

    def score_pairs(chunk: list[Pair]) -> list[dict]:
        loaded = []
        for pair in chunk:
            try:
                loaded.append((pair, pair.load_images()))
            except DataError as err:  # one bad pair must not cost the others
                log.warning("%s: skipping %s", corner, err)  # the error names the pair and the file
                skipped.append({"id": pair.id, "reason": "unusable_images", "detail": str(err)})
        if not loaded:
            return []
        if scoring.score == "patching":
            return [patched_pair(run, pair, images, prompt, answer_ids) for pair, images in loaded]
        images = [image for _, full_control in loaded for image in full_control]  # full, control, full, ...
        scores, said = score_images(run.adapter, images, prompt, list(run.layers), [columns] * len(images),
                                    scoring.max_new_tokens)
        return [{"id": pair.id, "full": scores[2 * k], "control": scores[2 * k + 1], "full_answer": said[2 * k],
                 "control_answer": said[2 * k + 1]} for k, (pair, _) in enumerate(loaded)]

    records = resumable_map(run.share, results, pairs, score_pairs, the_identity, batch_size=run.batch_size,
                            desc=f"{corner} pairs", unit="pair")
    skipped = run.share.gather(skipped)  # every process's
    if not run.share.is_main:
        return
    if not records:
        raise DataError(f"{corner}: none of the {len(pairs)} pairs could be scored (see the warnings above)")
    meta = write_outputs(run, scoring, dataset, out, records, skipped)
    finish_run(out / "run.json", {**record, "pairs_scored": meta["N"], "pairs_skipped": meta["skipped"]["count"],
                                  "timing": run.timing(records.made, since)})


def write_outputs(run: Run, scoring: Scoring, dataset: CornerDataset, out: Path, records: list[dict],
                  skipped: list[dict]) -> dict:
    """The cubes, the blank control, answers.csv, the count plot and meta.json from the pair records."""
    adapter, corner = run.adapter, dataset.corner
    prompt = fill_corner_prompt(scoring.prompt, corner)
    full = np.stack([np.asarray(r["full"], np.float32) for r in records], axis=-1)  # [L, H, N]
    control = np.stack([np.asarray(r["control"], np.float32) for r in records], axis=-1)
    blank_on_block, blank_on_image, block = score_blank(run, scoring, dataset, prompt)
    count = topk_count_cube(full, control, scoring.topk)
    np.save(out / "scores_full_LHN.npy", full)
    np.save(out / "scores_control_LHN.npy", control)
    np.save(out / "scores_blank_LHM.npy", blank_on_block)
    np.save(out / "scores_blank_image_LHM.npy", blank_on_image)
    np.save(out / "count_LHN.npy", count)
    np.save(out / "count_LH.npy", count.sum(-1).astype(np.int32))
    answers = [{"id": r["id"], "full_answer": r["full_answer"], "control_answer": r["control_answer"]}
               for r in records]
    write_atomic(out / "answers.csv", _answers_csv(answers))
    plot_count_bars(out / "count_bars.png", count.sum(-1), run.layer_numbers, corner, scoring.topk)
    meta = {"model": adapter.family, "model_path": adapter.model_path, "feed_size": adapter.feed_size,
            "dtype": dtype_name(adapter.dtype), "layers": run.layer_numbers, "L": len(run.layers),
            "H": adapter.num_heads, "N": len(records), "topk": scoring.topk, "score": scoring.score, "prompt": prompt,
            "prompt_template": scoring.prompt, "corner": corner, "patch_corner": scoring.corner_of_block(corner),
            "patch_size": scoring.patch_size, "blank_block": block, "max_new_tokens": scoring.max_new_tokens,
            "pair_ids": [r["id"] for r in records],
            "skipped": {"count": len(skipped), "by_reason": dict(Counter(s["reason"] for s in skipped)),
                        "pairs": skipped},
            "answers_yes_full": _share_yes([a["full_answer"] for a in answers]),
            "answers_yes_control": _share_yes([a["control_answer"] for a in answers]),
            "versions": package_versions()}
    write_json(out / "meta.json", meta)
    log.info("%s: %d pairs scored into %s, %d skipped (full answered yes %.0f%%, control %.0f%%)", corner,
             len(records), out, len(skipped), 100 * meta["answers_yes_full"], 100 * meta["answers_yes_control"])
    return meta


def planned_forwards(pairs: int, datasets: int, batch: int, score: str, layers: list[int], num_layers: int,
                     num_heads: int) -> list[Forwards]:
    """The forwards of one model's scoring: on each of ``datasets`` data sets, ``pairs`` pairs ``batch`` at a time
    (their two images; under --score patching each pair's heads of ``layers`` swapped), then the blank image
    twice (``score_blank``). --max-new-tokens above 1 generates and is planned as 1."""
    if score == "patching":
        heads = [(layer, h) for layer in layers for h in range(num_heads)]
        scored = patching.planned_forwards(pairs, heads, num_layers, HEADS_PER_FORWARD)
    else:
        scored = [Forwards(2 * pairs, 2 * batched(pairs, batch), num_layers, captured=True)]
    return [replace(f, inputs=f.inputs * datasets) for f in scored + [Forwards(2, 2, num_layers, captured=True)]]


def score_blank(run: Run, scoring: Scoring, dataset: CornerDataset, prompt: str) -> tuple[np.ndarray, np.ndarray, dict]:
    """The position-only control: a blank image of the background colour scored on the corner block
    and on all image tokens (the same image twice in one batch; with --max-new-tokens > 1, two generations).
    Returns both [L, H, 1] scores and the block."""
    adapter = run.adapter
    image = make_blank_image(dataset.pairs)
    grid = adapter.token_grid(adapter.prepare_image(image))
    block_corner = scoring.patch_corner or dataset.corner
    rows, cols = blank_block_size(grid, scoring.patch_size)
    cells = corner_patch_indices(grid, block_corner, (rows, cols))
    columns = [lambda layout: layout.image_positions[cells], lambda layout: layout.image_positions]
    scores, _ = score_images(adapter, [image, image], prompt, list(run.layers), columns, scoring.max_new_tokens)
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
        said = greedy_answers(adapter, logits)
        return [r["last_mass"] for r in recordings], said
    scores, said = [], []
    for image, pick in zip(images, columns):
        batch = adapter.encode([prompt], [image])
        request = CaptureRequest(layers=layers, last_mass=[pick(batch.layouts[0])])
        recording, answer = capture_generate(adapter, batch, request, max_new_tokens)
        scores.append(recording["last_mass"])
        said.append(answer)
    return scores, said


def patched_pair(run: Run, pair: Pair, images: tuple[Image.Image, Image.Image], prompt: str,
                 answer_ids: tuple[list[int], list[int]]) -> dict:
    """One pair's record under --score patching: every scored head's swap effects (``patching.pair_scores``)."""
    heads = [(layer, h) for layer in run.layers for h in range(run.adapter.num_heads)]
    scores, _, said = patching.pair_scores(run.adapter, patching.encode_pair(run.adapter, prompt, *images), heads,
                                           answer_ids, HEADS_PER_FORWARD)
    full, control = patching.score_cubes(scores, list(run.layers), run.adapter.num_heads)
    return {"id": pair.id, "full": full, "control": control, "full_answer": said[0], "control_answer": said[1]}


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
