"""Experiment 4 (``relation_heads.py``): the heads that carry a caption's relation, found by activation patching on
one half of the pairs and tested by ablation on the other half.

Pairs. Every true caption of a ShapeWorld folder gives one pair of inputs that differ only in whether the caption
holds (``--kind``):

- ``swap``: the world with its caption, and the same world with the caption's relation swapped (above/below,
  left/right; false, since the relation holds with the shapes apart along its axis);
- ``mirror``: the world with its caption, and the world mirrored along the relation's axis (left-right for
  left/right, top-bottom for above/below) with the same caption (false for the same reason).

Each input is asked ``--prompt`` (the caption by default, as the toys learned it); the answer is read as every
instrument reads it, the yes/no log-odds LO. A pair's gap = LO(true input) - LO(false input).

Discovery (the 1st, 3rd, ... pair: ``data.counterfactual.split_pairs``): each head's answer-position output is
swapped between the pair's two inputs, exactly as experiment 3's ``--score patching`` does
(``patching.pair_scores``), so score_true - score_false is the part of the pair's gap that passes through that
head. Every head is tested over the discovery pairs (two-sided sign flip, Benjamini-Hochberg over every scored
head: ``heads.rank_heads``); the chosen heads are the significant ones that carry the gap (mean > 0), the
``--max-heads`` largest.

Test (the 2nd, 4th, ... pair, never seen by discovery): the chosen heads are ablated (zeroed, at the answer
position or at every position: ``--positions``) together, and so is each of ``--random-sets`` random head sets of
the same layers (``ablation_heads.random_head_sets``); p_drop = (1 + random sets that lower the gap at least as
much) / (1 + sets) (``ablation_measure.summarize``).

The random-weights control (``--control random-weights``) ablates the heads the model's own run chose, in each
random initialisation, on the same test pairs: an effect that random weights show too is not the model's
mechanism. Run the model first; the control reads ``OUT/summary.json``.

Outputs in ``OUT``: ``discovery/pairs_scores.jsonl`` and ``test/ablation_pairs.jsonl`` (the resume logs, each
beside its identity.json), ``scores_true_LHN.npy`` and ``scores_false_LHN.npy`` (discovery, [layers, heads,
pairs]), ``heads.csv`` (every head: its mean share of the gap, p, q, chosen), ``summary.json``,
``figures/head_shares.png`` and ``figures/effect_vs_random.png``, ``run.json``.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from PIL import Image, ImageOps

from spatial_attention.common.console import check_at_least, command_parser, user_errors_exit
from spatial_attention.common.errors import DataError, OptionError
from spatial_attention.common.runio import (finish_run, lacks_keys, read_json, setup_logging, start_run, write_atomic,
                                            write_json)
from spatial_attention.data.counterfactual import split_pairs
from spatial_attention.data.shapeworld import (FLIPPED_RELATION, RELATION_AXIS, Skipped, World, format_caption,
                                               iter_worlds, load_rgb)
from spatial_attention.experiments import ablation_measure, patching
from spatial_attention.experiments.ablation_heads import head_name, heads_json, null_set_count, random_head_sets
from spatial_attention.experiments.ablation_measure import measure, plot_effects, summarize, yes_no_ids
from spatial_attention.experiments.heads import rank_heads
from spatial_attention.run import controls
from spatial_attention.run.cli import add_model_args, add_shapeworld_args
from spatial_attention.run.cost import Forwards
from spatial_attention.run.figures import save_figure
from spatial_attention.run.runloop import (IDENTITY_FILE, RESULTS_KEY, Results, Run, check_identity, compare_identity,
                                           load_run, open_results, prepare_run, recorded_identity, resumable_map)
from spatial_attention.stats.inference import json_safe

log = logging.getLogger("spatial_attention")

KINDS = ("swap", "mirror")
DEFAULT_PROMPT = "{caption}"  # the toys' question; instruction-tuned checkpoints may want a question around it
DISCOVERY_FILE = "discovery/pairs_scores.jsonl"
TEST_FILE = "test/ablation_pairs.jsonl"
HEADS_PER_FORWARD = 16  # heads swapped per forward in discovery (two inputs each)
NONE_CHOSEN = "no head chosen"  # in the test half's identity.json where a run had no head to test


@dataclass(frozen=True)
class RelationPair:
    """One true caption's pair: the true input and its false counterpart (``kind``)."""
    world: World
    kind: str

    @property
    def id(self) -> str:
        return f"{self.world.shard}-{self.world.index}"

    def inputs(self, prompt: str) -> tuple[list[str], list[Image.Image]]:
        """([true text, false text], [true image, false image])."""
        caption, image = self.world.caption, load_rgb(self.world.image_path)
        true_text = prompt.format(caption=caption.text)
        if self.kind == "swap":
            swapped = format_caption(caption.color1, caption.shape1, caption.color2, caption.shape2,
                                     FLIPPED_RELATION[caption.relation])
            return [true_text, prompt.format(caption=swapped)], [image, image]
        flip = ImageOps.mirror if RELATION_AXIS[caption.relation] == "x" else ImageOps.flip
        return [true_text, true_text], [image, flip(image)]


def encode(adapter, pairs: list[RelationPair], prompt: str):
    """The pairs as one batch: true, false, true, ... (as ``measure`` and ``pair_scores`` take them)."""
    texts, images = [], []
    for pair in pairs:
        pair_texts, pair_images = pair.inputs(prompt)
        texts += pair_texts
        images += pair_images
    return adapter.encode(texts, images)


# --- the command line ---------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = command_parser(
        "relation_heads.py",
        "Experiment 4: which attention heads carry a caption's spatial relation. Each true ShapeWorld caption "
        "makes a pair (--kind swap: the relation word swapped; mirror: the image mirrored along the relation's "
        "axis); on the discovery half of the pairs every head's answer-position output is swapped between the "
        "pair's two inputs (its share of the yes/no gap), the heads are ranked with a sign-flip test and "
        "Benjamini-Hochberg, and the chosen heads are ablated on the held-out test half against random head "
        "sets of the same layers. Writes heads.csv, summary.json, the score cubes, figures/ and run.json into "
        "--out; rerunning the same command resumes.")
    add_model_args(parser, None, feed_size="the family's")
    add_shapeworld_args(parser)
    controls.add_control_args(parser)
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: results/relation_heads/MODEL)")
    parser.add_argument("--kind", choices=KINDS, default="swap",
                        help="the false member of each pair: swap (the caption's relation word swapped) or mirror "
                             "(the image mirrored along the relation's axis, the same caption)")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT,
                        help="the question asked of each input; '{caption}' becomes the caption (default: the bare "
                             "caption, as the toy models learned it; for an instruction-tuned checkpoint e.g. "
                             "'{caption} Is this true? Answer yes or no.')")
    parser.add_argument("--alpha", type=float, default=0.05, help="Benjamini-Hochberg level over the scored heads")
    parser.add_argument("--max-heads", type=int, default=4,
                        help="at most this many heads are chosen: the significant ones with the largest mean share "
                             "of the gap")
    parser.add_argument("--positions", choices=("answer", "all"), default="answer",
                        help="zero the chosen heads at the answer position (where discovery measures them) or at "
                             "every position")
    parser.add_argument("--random-sets", type=int, default=100,
                        help="random head sets of the chosen heads' layers: the null distribution of the effect "
                             "(p_drop cannot go below 1/(1 + sets))")
    parser.add_argument("--sets-per-forward", type=int, default=8,
                        help="copies of each test batch per forward (an unablated one and this minus one head "
                             "sets); lower it if memory runs out")
    return parser


@user_errors_exit
def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    args.out = args.out or Path(f"results/relation_heads/{args.model}")
    setup_logging(args.verbose)
    check_settings(args)
    controls.init_seeds(args)  # checked before any data is generated
    options, share, data, shards = prepare_run(args.model, args)
    pairs = select_pairs(data, shards, args.limit, args.kind, tests_only=args.control is not None)
    for run_options, out in controls.runs(options, args.out, args):
        heads = None if run_options.random_init_seed is None else model_heads(args.out)
        _experiment(args, run_options, share, data, out, pairs, heads)
    if share.is_main:
        controls.write_comparison(args.out, ITEM_METRICS, seed=options.seed)


def planned_forwards(args, pairs: int, batch: int, num_layers: int, num_heads: int) -> list[Forwards]:
    """The forwards of one model's run over ``pairs`` pairs, with ``args`` as ``build_parser`` gives them: the
    discovery half's patching of every head (not in a control, which only tests), then the test half's ablation
    of the chosen heads and their null sets. The run chooses the heads: planned as ``--max-heads`` of them, one a
    layer, the lowest at the expected lowest of as many placed at random."""
    found = split_pairs(range(pairs), "discovery") if args.control is None else []
    heads = [(layer, h) for layer in range(num_layers) for h in range(num_heads)]
    chosen = [1] * min(args.max_heads, num_layers)
    sets = 1 + null_set_count(chosen, num_heads, args.random_sets)
    tested = len(split_pairs(range(pairs), "test"))
    return patching.planned_forwards(len(found), heads, num_layers, HEADS_PER_FORWARD) * bool(found) + \
        ablation_measure.whole_forwards(tested, batch, num_layers) + \
        ablation_measure.planned_forwards(tested, batch, sets, num_layers, num_layers / (len(chosen) + 1),
                                          args.sets_per_forward, answer_only=args.positions == "answer")


def check_settings(args) -> None:
    """The experiment's own options, before anything is read or loaded."""
    check_at_least(1, max_heads=args.max_heads, random_sets=args.random_sets)
    check_at_least(2, sets_per_forward=args.sets_per_forward)
    if not 0 < args.alpha < 1:
        raise OptionError(f"--alpha {args.alpha}: must lie strictly between 0 and 1")
    try:
        filled = args.prompt.format(caption="CAPTION")
    except (KeyError, IndexError, ValueError) as err:
        raise OptionError(f"--prompt {args.prompt!r}: only '{{caption}}' may stand in braces ({err})") from None
    if "CAPTION" not in filled:
        raise OptionError(f"--prompt {args.prompt!r}: must contain '{{caption}}', where each pair's caption goes")


def select_pairs(data: Path, shards, limit: int | None, kind: str, tests_only: bool = False) -> list[RelationPair]:
    """One pair per true caption of the folder (the first ``limit``), in (shard, index) order. A control
    (``tests_only``) needs two: it only tests, and the first N pairs' test half is a prefix of the model's."""
    pairs = []
    for item in iter_worlds(data, shards=shards, limit=limit):
        if isinstance(item, Skipped):
            log.warning("skipping: %s", item.reason)
            continue
        pairs.append(RelationPair(item, kind))
    if len(pairs) < (2 if tests_only else 4):
        need = ("2 (the second is the first test pair)" if tests_only else
                "4 (two to find heads on, two to test them on), better 100 or more")
        raise DataError(f"--data {data}: {len(pairs)} usable true captions; experiment 4 needs at least {need}")
    return pairs


def model_heads(out: Path) -> list[tuple[int, int]]:
    """The heads the model's own run chose (the control ablates them in random initialisations)."""
    path = Path(out) / "summary.json"
    first = "run the same command without --control first, so that the control ablates the model's heads in random " \
            "initialisations"
    summary = read_json(path)
    if summary is None:
        raise OptionError(f"--control: the model's own run is missing (no {path}); {first}")
    try:
        return [(int(h["layer"]) - 1, int(h["head"])) for h in summary["chosen_heads"]]
    except (KeyError, TypeError, ValueError):
        raise OptionError(f"--control: {path} has no chosen heads; {first}") from None


def identity(args, data: Path) -> dict:
    """What changes this experiment's numbers beyond the model's part."""
    return {"--data": str(Path(data).resolve()), "--kind": args.kind, "--prompt": args.prompt,
            "--limit": args.limit, "--shards": args.shards}


def _results(out: Path, name: str, keys: tuple[str, ...]) -> Results:
    return Results(out / name, item_key=lambda pair: pair.id, record_key=lambda record: record["id"],
                   check=lacks_keys(*keys), option="--out")


def _experiment(args, options, share, data: Path, out: Path, pairs: list[RelationPair],
                heads: list[tuple[int, int]] | None) -> None:
    """Discovery and test with one model (``heads`` given: a control initialisation, which only tests them)."""
    discovery, test = split_pairs(pairs, "discovery"), split_pairs(pairs, "test")
    found_in = _results(out, DISCOVERY_FILE, ("id", "true", "false", "log_odds"))
    tested_in = _results(out, TEST_FILE, ("id", "base", "ablated"))
    settings = identity(args, data)
    test_identity = {**settings, "--positions": args.positions, "--random-sets": args.random_sets,
                     "--alpha": args.alpha, "--max-heads": args.max_heads}
    known = {**options.identity("all"), **test_identity}  # the test's identity as known before the model loads
    share.main_checks(lambda: (open_results(found_in, {**options.identity("all"), **settings}),
                               open_results(tested_in, known), _check_none_chosen(tested_in, known)))
    run = load_run(options, share, vars(args), out, data, default_layers="all")
    share.main_checks(lambda: (check_identity(found_in.path, {**run.identity(), **settings}, "--out"),
                               check_identity(tested_in.path, {**run.identity(), **test_identity}, "--out")))
    if share.is_main:
        start_run(out / "run.json", run.record(data=str(data)))
    answer_ids = yes_no_ids(run.adapter.tokenizer)
    ranking, made = None, 0
    if heads is None:
        records = resumable_map(share, found_in, discovery, lambda chunk: _score(run, chunk, args.prompt, answer_ids),
                                {**run.identity(), **settings}, batch_size=1, desc="discovery pairs", unit="pair")
        made = records.made if share.is_main else 0
        ranking = _rank(run, list(records), args.alpha, args.max_heads, out) if share.is_main else None
        heads = _shared_heads(share, out, ranking)
    if not heads:
        if share.is_main:
            write_json(tested_in.path.parent / IDENTITY_FILE, {RESULTS_KEY: tested_in.path.name, **run.identity(),
                                                               **test_identity, NONE_CHOSEN: True})
            _finish(run, out, args, ranking, heads, None, len(discovery), len(test), made)
        return
    head_sets = [heads] + random_head_sets(heads, run.adapter.num_heads, args.random_sets, options.seed)
    records = resumable_map(share, tested_in, test,
                            lambda chunk: _ablate(run, chunk, args.prompt, head_sets, answer_ids, args),
                            {**run.identity(), **test_identity}, batch_size=run.batch_size, desc="test pairs",
                            unit="pair")
    if share.is_main:
        made += records.made
        records = list(records)
        base = np.array([r["base"] for r in records])
        ablated = np.stack([np.array(r["ablated"]) for r in records], axis=1)  # [S, N, 2]
        _finish(run, out, args, ranking, heads, (base, ablated, head_sets), len(discovery), len(test), made)


def _check_none_chosen(tested_in: Results, test_identity: dict) -> None:
    """A run that chose no head tested no pair, so ``check_identity`` finds no results in the test half to hold a
    rerun to; its summary.json and run.json were made with the test's settings all the same, which a rerun must
    repeat (``NONE_CHOSEN``)."""
    recorded = recorded_identity(tested_in.path.parent)
    if recorded and recorded.get(NONE_CHOSEN):
        compare_identity(tested_in.path, recorded, test_identity, tested_in.option)


def _score(run: Run, chunk: list[RelationPair], prompt: str, answer_ids) -> list[dict]:
    heads = [(layer, h) for layer in run.layers for h in range(run.adapter.num_heads)]
    out = []
    for pair in chunk:
        scores, base, said = patching.pair_scores(run.adapter, encode(run.adapter, [pair], prompt), heads,
                                                  answer_ids, HEADS_PER_FORWARD)
        true, false = patching.score_cubes(scores, list(run.layers), run.adapter.num_heads)
        out.append({"id": pair.id, "true": true, "false": false, "log_odds": list(base), "answers": list(said)})
    return out


def _ablate(run: Run, chunk: list[RelationPair], prompt: str, head_sets, answer_ids, args) -> list[dict]:
    base, ablated = measure(run.adapter, encode(run.adapter, chunk, prompt), head_sets, answer_ids,
                            answer_only=args.positions == "answer", sets_per_forward=args.sets_per_forward)
    return [{"id": pair.id, "base": base[i], "ablated": ablated[:, i]} for i, pair in enumerate(chunk)]


def _rank(run: Run, records: list[dict], alpha: float, max_heads: int, out: Path) -> dict:
    """The discovery ranking of the scored pairs (``choose_heads``), with its cubes, heads.csv and figure."""
    if len(records) < 2:
        raise DataError(f"--out {out}: {len(records)} discovery pairs scored; ranking heads needs at least 2")
    true = np.stack([np.asarray(r["true"], np.float64) for r in records], axis=-1)  # [L, H, N]
    false = np.stack([np.asarray(r["false"], np.float64) for r in records], axis=-1)
    np.save(out / "scores_true_LHN.npy", true.astype(np.float32))
    np.save(out / "scores_false_LHN.npy", false.astype(np.float32))
    gap = np.array([r["log_odds"][0] - r["log_odds"][1] for r in records])
    ranked, ranking = choose_heads(true, false, gap, alpha, max_heads, run.options.seed, run.layer_numbers)
    chosen = {(h["layer"], h["head"]) for h in ranking["chosen"]}
    write_atomic(out / "heads.csv", _heads_csv(ranked, ranked["share"], chosen, run.layer_numbers))
    _plot_shares(out / "figures" / "head_shares.png", ranked["share"], run.layer_numbers, chosen, run.adapter.family)
    return ranking


def choose_heads(true: np.ndarray, false: np.ndarray, gap: np.ndarray, alpha: float, max_heads: int, seed: int,
                 layer_numbers: list[int]) -> tuple[dict, dict]:
    """(``rank_heads``' result with each head's mean share of the gap, the ranking summary with the chosen
    heads). ``true``/``false`` [L, H, N]: each head's swap effect on the pair's true and false input; ``gap``
    [N]: the pairs' unpatched gaps. Chosen: the heads significant under Benjamini-Hochberg at ``alpha`` whose
    mean swap effect is positive (they carry the gap), the ``max_heads`` largest."""
    ranked = rank_heads(true, false, alpha=alpha, seed=seed, layers=layer_numbers)
    mean_gap = float(np.mean(gap))
    ranked["share"] = ranked["mean_diff"] / mean_gap if mean_gap != 0 else np.full_like(ranked["mean_diff"], np.nan)
    carriers = [h for h in ranked["significant"] if h["mean_diff"] > 0]
    chosen = sorted(carriers, key=lambda h: -h["mean_diff"])[:max_heads]
    return ranked, {"n_pairs": int(len(gap)), "gap_mean": mean_gap, "gap_positive": float((np.asarray(gap) > 0).mean()),
                    "n_significant": len(ranked["significant"]), "n_carriers": len(carriers), "alpha": alpha,
                    "p_method": ranked["p_method"], "n_perm": ranked["n_perm"],
                    "chosen": [{**h, "share_of_gap": h["mean_diff"] / mean_gap if mean_gap else None}
                               for h in chosen]}


def _shared_heads(share, out: Path, ranking: dict | None) -> list[tuple[int, int]]:
    """The chosen heads (0-based layers) in every process: the main process ranks, the others read its file."""
    path = out / "discovery" / "chosen_heads.json"
    if share.is_main:
        write_json(path, [{"layer": h["layer"], "head": h["head"]} for h in ranking["chosen"]])
    share.wait()
    return [(int(h["layer"]) - 1, int(h["head"])) for h in json.loads(path.read_text())]


def _heads_csv(ranked: dict, share: np.ndarray, chosen: set, layer_numbers: list[int]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["layer", "head", "mean_swap_effect", "share_of_gap", "effect_size", "p", "q", "significant",
                     "chosen"])
    for l, layer in enumerate(layer_numbers):
        for h in range(share.shape[1]):
            writer.writerow([layer, h, float(ranked["mean_diff"][l, h]), float(share[l, h]),
                             float(ranked["effect"][l, h]), float(ranked["p"][l, h]), float(ranked["q"][l, h]),
                             int(ranked["reject"][l, h]), int((layer, h) in chosen)])
    return buffer.getvalue()


def _plot_shares(path: Path, share: np.ndarray, layer_numbers: list[int], chosen: set, family: str) -> None:
    """Each head's mean share of the gap (discovery pairs), the chosen heads boxed."""
    fig = Figure(figsize=(max(4.0, 0.35 * share.shape[1] + 2), max(3.0, 0.3 * len(layer_numbers) + 1.5)))
    ax = fig.subplots()
    limit = float(np.nanmax(np.abs(share))) if np.isfinite(share).any() else 1.0
    image = ax.imshow(share, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
    for l, layer in enumerate(layer_numbers):
        for h in range(share.shape[1]):
            if (layer, h) in chosen:
                ax.add_patch(_box(h, l))
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_yticks(range(len(layer_numbers)), [str(n) for n in layer_numbers])
    ax.set_title(f"{family}: share of the true-minus-false gap carried at the answer position\n(boxed: chosen heads)",
                 fontsize=9)
    fig.colorbar(image, ax=ax, label="share of the gap")
    fig.tight_layout()
    save_figure(fig, path)


def _box(x: int, y: int):
    from matplotlib.patches import Rectangle

    return Rectangle((x - 0.5, y - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=2)


def _finish(run: Run, out: Path, args, ranking: dict | None, heads, tested, n_discovery: int, n_test: int,
            made: int) -> None:
    """summary.json, the test figure and run.json (``made``: the pairs this command ran, for its ``timing``)."""
    summary = {"model": run.adapter.family, "model_path": run.adapter.model_path, "kind": args.kind,
               "prompt": args.prompt, "positions": args.positions, "pairs": {"discovery": n_discovery, "test": n_test},
               "discovery": ranking, "chosen_heads": heads_json(heads),
               "chosen_by": "the model's own run" if ranking is None else "discovery"}
    if tested is not None:
        base, ablated, head_sets = tested
        metrics = summarize(base, ablated, run.options.seed)
        gap = metrics["gap"]
        summary["test"] = {
            "n_pairs": int(base.shape[0]), "random_sets": len(head_sets) - 1,
            "balanced_accuracy": float(((base[:, 0] > 0).mean() + (base[:, 1] <= 0).mean()) / 2),
            "gap_unablated": gap["unablated"], "gap_ablated": gap["ablated"], "gap_change": gap["effect"],
            "gap_change_lo": gap["ci_lo"], "gap_change_hi": gap["ci_hi"],
            "gap_moved_share": -gap["effect"] / gap["unablated"] if gap["unablated"] else None,
            "random_gap_change_mean": gap["random_mean"], "p_drop": gap["p_drop"], "p_rise": gap["p_rise"],
            "metrics": {name: {k: v for k, v in m.items() if k != "random_effects"} for name, m in metrics.items()}}
        plot_effects(out / "figures" / "effect_vs_random.png", metrics,
                     f"{run.adapter.family}: heads {' '.join(map(head_name, heads))} ablated on {base.shape[0]} "
                     f"held-out {args.kind} pairs")
        log.info("test: gap %.3f -> %.3f with %s ablated (moved %.0f%%, p_drop %.3g against %d random sets)",
                 gap["unablated"], gap["ablated"], " ".join(map(head_name, heads)),
                 100 * summary["test"]["gap_moved_share"] if summary["test"]["gap_moved_share"] is not None else 0,
                 gap["p_drop"], len(head_sets) - 1)
    else:
        log.warning("no head carries the gap significantly (alpha %g): nothing to test", args.alpha)
    write_json(out / "summary.json", json_safe(summary))
    finish_run(out / "run.json", run.record(data=str(run.data), chosen_heads=heads_json(heads),
                                            timing=run.timing(made)))


def _pair_metrics(record: dict) -> dict[str, float]:
    """Per test pair: its gap, and what ablating the chosen heads (set 0) does to it."""
    base, chosen = np.asarray(record["base"], np.float64), np.asarray(record["ablated"][0], np.float64)
    return {"gap": float(base[0] - base[1]), "gap_change": float((chosen[0] - chosen[1]) - (base[0] - base[1]))}


ITEM_METRICS = controls.ItemMetrics(TEST_FILE, lambda record: record["id"], _pair_metrics)
