"""Experiment 3, step 3 (``head_ablation.py``): ablate the heads the corner analysis found and measure what happens
to the model's yes/no answer, against random head sets of the same layers.

Which heads and the null sets are ``ablation_heads.py``; the hooks, the log-odds, the effects, the CSV and the
figure are ``ablation_measure.py``; this module is the command: its options, one model load for every (data set,
head spec) job, a data set's whole forwards once for all its head specs (each into its own folder), the per-pair
results appended as they finish (``ablation_pairs.jsonl``), the summary.
"""
from __future__ import annotations

import argparse
import json
import logging
import re
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from spatial_attention.common.console import check_at_least, command_parser, user_errors_exit
from spatial_attention.common.errors import DataError, OptionError
from spatial_attention.common.runio import (check_output_dir, finish_run, lacks_keys, setup_logging, start_run,
                                            write_atomic, write_json)
from spatial_attention.data.counterfactual import (CORNER_PROMPT, DIGEST_KEY, PAIR_SPLITS, SPLIT_KEY, CornerDataset,
                                                   Pair, fill_corner_prompt, read_dataset, splits_overlap)
from spatial_attention.experiments import ablation_measure
from spatial_attention.experiments.ablation_heads import (HEADS_HELP, Head, check_heads, check_heads_in_stats_model,
                                                          head_name, heads_json, null_set_count, parse_heads,
                                                          planned_heads, random_head_sets)
from spatial_attention.experiments.ablation_measure import (PRIMARY, ablation_csv, encode_pairs, head_means,
                                                            measure_groups, plot_effects, summarize, yes_no_ids)
from spatial_attention.experiments.corner_results import CornerRun, load_corner_run
from spatial_attention.run import controls
from spatial_attention.run.cli import add_model_args
from spatial_attention.run.cost import Forwards
from spatial_attention.run.options import INIT_SEED_KEY, ModelOptions, checkpoint_name
from spatial_attention.run.runloop import (Results, Run, check_identity, join_processes, load_run, open_results,
                                           recorded_identity, resumable_map_many)

log = logging.getLogger("spatial_attention")

POSITIONS = ("all", "answer")  # --positions
FIGURE = "figures/effect_vs_random.png"
PAIRS_FILE = "ablation_pairs.jsonl"  # per pair, as it finishes: its log-odds unablated and with each head set ablated


# --- the command line ---------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = command_parser(
        "head_ablation.py",
        __doc__ +
        "\nWrites ablation_pairs.jsonl (per pair, as it finishes: the resume log), identity.json, ablation.csv, "
        "summary.json, figures/effect_vs_random.png and run.json into the out-dir.")
    add_model_args(parser, None, feed_size="the stats dir's, else the family's")
    controls.add_control_args(parser)
    parser.add_argument("--dataset", type=Path, nargs="+", required=True,
                        help="the corner data set folder(s) data/dataset_{corner}; several: each is ablated with its "
                             "--stats-dir, one model load for all")
    parser.add_argument("--stats-dir", type=Path, nargs="+", required=True,
                        help="the out-dir of head_attention_stats.py for each --dataset's corner "
                             "(head_diff_stats_{corner}), in the same order")
    parser.add_argument("--analysis-dir", type=Path, default=None,
                        help="the out-dir of analyze_corner_heads.py (for --heads shared / unique; default: "
                             "count_shared_unique beside the stats dir)")
    parser.add_argument("--prompt", default=None,
                        help="question asked with every image; '{corner}' becomes 'top left' etc. (default: the "
                             "stats dir's prompt)")
    parser.add_argument("--heads", nargs="+", default=["unique"],
                        help=HEADS_HELP + "; several values: each is ablated on every --dataset")
    parser.add_argument("--mode", choices=["zero", "mean"], default="zero",
                        help="replace an ablated head's output with zeros, or at each position with its mean "
                             "output at that position over the data set's images")
    parser.add_argument("--positions", choices=POSITIONS, default="all",
                        help="ablate the heads at every position (the paper's), or only at the answer position "
                             "(where head_attention_stats.py --score patching measures them)")
    parser.add_argument("--random-controls", type=int, default=100,
                        help="random head sets from the same layers, the null distribution of the effect: p_drop "
                             "cannot go below 1/(1 + sets), and the report corrects it with its other tests")
    parser.add_argument("--max-pairs", type=int, default=None, help="use at most this many pairs")
    parser.add_argument("--pairs", choices=PAIR_SPLITS, default="test",
                        help="which of the (first --max-pairs) pairs to ablate on: the test half (the 2nd, 4th, ... "
                             "pair), held out from head_attention_stats.py --pairs discovery, or all")
    parser.add_argument("--same-pairs", action="store_true",
                        help="allow testing the heads on pairs they were found on (their stats dir scored all pairs, "
                             "or the same half): the chosen heads are then the best of these very pairs, and beat "
                             "random heads on them by chance too; refused without this, and the report says so")
    parser.add_argument("--sets-per-forward", type=int, default=8,
                        help="copies of each batch in one forward pass of the layers from the lowest ablated one "
                             "up: an unablated copy and this minus one head sets (the chosen one and the random "
                             "controls); at least 2; lower it if memory runs out")
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="output folder of one ablation (one --dataset, one --heads; default: "
                             "ablation_{corner}_{heads} in --out-parent); one that holds an ablation made with other "
                             "settings is refused, an unfinished one with the same settings resumes, a finished one "
                             "is left as it is")
    parser.add_argument("--out-parent", type=Path, default=Path("."),
                        help="where each ablation's folder ablation_{corner}_{heads} goes, without --out-dir")
    return parser


@user_errors_exit
def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    # Everything that can be judged without the model is, before it loads: a mistake costs seconds.
    if args.layers:
        raise OptionError("--layers does not apply here: --heads names the layers")
    options = ModelOptions.from_args(args.model, args)
    check_at_least(1, random_controls=args.random_controls, max_pairs=args.max_pairs)
    check_at_least(2, sets_per_forward=args.sets_per_forward)
    if len(args.stats_dir) != len(args.dataset):
        raise OptionError(f"--stats-dir: {len(args.stats_dir)} given for {len(args.dataset)} --dataset; give each "
                          "data set's stats dir, in the same order")
    datasets = [read_dataset(path, args.max_pairs, args.pairs) for path in args.dataset]
    for dataset in datasets:
        check_images(dataset.pairs)
    seeds = controls.init_seeds(args)
    stats_dirs = match_stats_dirs(datasets, args.stats_dir, None if seeds is None else seeds[0], args.same_pairs)
    jobs = [Job(dataset, stats_dir, args.analysis_dir, heads, args.out_dir or args.out_parent / default_out(
                dataset.corner, heads)) for dataset, stats_dir in zip(datasets, stats_dirs) for heads in args.heads]
    if args.out_dir and len(jobs) > 1:
        raise OptionError(f"--out-dir {args.out_dir}: names one ablation's folder, but {len(datasets)} --dataset x "
                          f"{len(args.heads)} --heads make {len(jobs)}; give --out-parent instead")
    folders = Counter(job.out.resolve() for job in jobs)
    if max(folders.values()) > 1:
        twice = next(folder for folder, n in folders.items() if n > 1)
        raise OptionError(f"--dataset / --heads: two ablations would write {twice} (a corner's data set given twice, "
                          "or a --heads value repeated); give each once")
    models = [(options, jobs)] if seeds is None else [  # each initialisation ablates the heads its own analysis found
        (replace(options, random_init_seed=seed), [job.for_control(seed) for job in jobs]) for seed in seeds]
    is_main = [_ablate(args, model_options, model_jobs) for model_options, model_jobs in models][-1]
    if is_main:
        for job in jobs:
            controls.write_comparison(job.out, ITEM_METRICS, seed=options.seed)


def match_stats_dirs(datasets: list[CornerDataset], stats_dirs: list[Path], init_seed: int | None = None,
                     same_pairs: bool = False) -> list[Path]:
    """Each data set's stats dir, matched by the corner its meta.json records (and, where two share a corner, by
    the data set its identity.json records), whatever order they were given in; OptionError where a data set has
    none, or more than one, or where the heads would be tested on pairs they were found on (unless
    ``same_pairs``). ``init_seed``: under --control, what is read is the counterpart of that initialisation (a
    control-only run has no stats of the model)."""
    scored, splits = {}, {}
    for folder in map(Path, stats_dirs):
        read = folder if init_seed is None else controls.counterpart(folder, init_seed, "--stats-dir")
        recorded = recorded_identity(read) or {}
        scored[folder] = (load_corner_run(read).corner, recorded.get(DIGEST_KEY))
        splits[folder] = recorded.get(SPLIT_KEY, "all")
    matched = []
    for dataset in datasets:
        same_corner = [folder for folder, (corner, _) in scored.items() if corner == dataset.corner]
        same_data = [folder for folder in same_corner if scored[folder][1] == dataset.identity[DIGEST_KEY]]
        found = same_data if len(same_corner) > 1 and same_data else same_corner
        if len(found) != 1:
            held = ", ".join(f"{folder}: {corner}" for folder, (corner, _) in scored.items())
            raise OptionError(f"--stats-dir: {'none' if not found else len(found)} of them scored the "
                              f"{dataset.corner} pairs of --dataset {dataset.folder} ({held}); give each data set's "
                              f"stats dir once")
        if scored[found[0]][1] not in (None, dataset.identity[DIGEST_KEY]):
            log.warning("--stats-dir %s was scored on other %s pairs than --dataset %s: its heads are tested on "
                        "pairs they were not found on", found[0], dataset.corner, dataset.folder)
        elif splits_overlap(splits[found[0]], dataset.split) and not same_pairs:
            raise OptionError(
                f"--stats-dir {found[0]}: its heads were found on the {splits[found[0]]} pairs of {dataset.folder}, "
                f"and --pairs {dataset.split} would test them on pairs they were found on (the best heads of some "
                f"pairs beat random heads on those pairs by chance too); score them with head_attention_stats.py "
                f"--pairs discovery and ablate with --pairs test, or pass --same-pairs to test them there anyway")
        matched.append(found[0])
    if len(set(matched)) < len(matched):
        raise OptionError("--stats-dir: one stats dir matches two --dataset folders; give each corner's data set once")
    return matched


def default_out(corner: str, heads: str) -> str:
    """An ablation's folder name: ablation_{corner}_{heads}, every character of heads other than a letter or a
    digit a '-' (top:4 -> top-4), as run_corner_experiments.sh names it."""
    return f"ablation_{corner}_{re.sub(r'[^0-9A-Za-z]', '-', heads)}"


@dataclass(frozen=True)
class Job:
    """One ablation: the heads ``heads`` names, on one corner's data set, into ``out``."""

    dataset: CornerDataset
    stats_dir: Path
    analysis_dir: Path | None
    heads: str
    out: Path

    def for_control(self, seed: int) -> Job:
        """The same ablation on initialisation ``seed`` of the random-weights control: its own stats and
        analysis, into its seed folder."""
        analysis = (controls.counterpart(self.analysis_dir, seed, "--analysis-dir")
                    if self.analysis_dir and self.heads in ("shared", "unique") else None)
        return replace(self, stats_dir=controls.counterpart(self.stats_dir, seed, "--stats-dir"),
                       analysis_dir=analysis, out=controls.seed_folder(self.out, seed))


def _ablate(args, options: ModelOptions, jobs: list[Job]) -> bool:
    """The ablations ``jobs`` with one model (the checkpoint, or one initialisation of the control), loaded once
    for all of them; returns whether this is the main process."""
    options, share = join_processes(options)
    ready = [prepared for job in jobs if (prepared := _prepare(args, options, share, job)) is not None]
    if not ready:
        return share.is_main
    first = ready[0]
    run = load_run(replace(options, feed_size=first.feed_size), share, vars(args), out=first.out,
                   data=first.job.dataset.folder)
    loaded_feed = run.adapter.feed_size  # what a job whose stats dir records none gets, as when run alone
    for group in _same_inputs(ready):
        _ablate_group(args, run, group, loaded_feed)
    return share.is_main


def _same_inputs(ready: list[Prepared]) -> list[list[Prepared]]:
    """The ablations grouped by what their forwards read: one data set's pairs, with one prompt at one feed size
    (the --heads specs of a corner). A group's batches run once for all of its head sets (``measure_groups``)."""
    groups: dict[tuple, list[Prepared]] = {}
    for prepared in ready:
        groups.setdefault((id(prepared.job.dataset), prepared.prompt, prepared.feed_size), []).append(prepared)
    return list(groups.values())


@dataclass(frozen=True)
class Prepared:
    """An ablation checked and its results folder opened, before the model loads."""

    job: Job
    stats: CornerRun
    chosen: list[Head]
    prompt: str
    out: Path
    feed_size: int | None
    head_sets: list[list[Head]]
    settings: dict
    results: Results


def _prepare(args, options: ModelOptions, share, job: Job) -> Prepared | None:
    """``job`` checked against its stats dir and its out-dir opened; None where it is already finished."""
    stats = load_corner_run(job.stats_dir)
    check_stats_model(stats, options)
    chosen = parse_heads(job.heads, stats, job.analysis_dir or job.stats_dir.parent / "count_shared_unique")
    check_heads_in_stats_model(chosen, job.heads, stats)
    pairs, corner = job.dataset.pairs, job.dataset.corner
    prompt = ablation_prompt(args.prompt, stats, corner)
    out = check_output_dir(job.out, "--out-dir")
    feed_size = options.feed_size or stats_feed_size(stats)
    head_sets = [chosen] + random_head_sets(chosen, int(stats.meta["H"]), args.random_controls, options.seed)
    # the pairs used too: the summary covers them, and in mean mode the means are taken over them
    settings = {**job.dataset.identity, "--max-pairs (pairs used)": len(pairs), "--prompt": prompt,
                "--heads": list(map(head_name, chosen)), "--mode": args.mode,
                **({} if args.positions == "all" else {"--positions": args.positions}),  # older folders: all
                "--random-controls": args.random_controls,
                "--random-controls (head sets)": [list(map(head_name, heads)) for heads in head_sets[1:]],
                "--seed": options.seed}
    results = Results(out / PAIRS_FILE, item_key=lambda pair: pair.id, record_key=lambda record: record["id"],
                      check=lacks_keys("id", "log_odds", "ablated_log_odds"), option="--out-dir")
    job_options = replace(options, feed_size=feed_size)
    share.main_checks(lambda: open_results(results, {**job_options.identity(), **settings}))
    if finished(out, results, pairs):
        log.info("%s already holds this ablation, finished with the same settings; delete it to redo it", out)
        return None
    return Prepared(job, stats, chosen, prompt, out, feed_size, head_sets, settings, results)


def _ablate_group(args, run: Run, group: list[Prepared], loaded_feed: tuple[int, int] | None) -> None:
    """The prepared ablations of one corner's pairs (``_same_inputs``) with the loaded model of ``run``
    (``loaded_feed``: its feed size as loaded): each batch's whole forward once for all of them, each
    ablation's reruns from its own lowest layer, as alone; each into its own folder."""
    dataset, prompt, share, adapter = group[0].job.dataset, group[0].prompt, run.share, run.adapter
    if group[0].feed_size or loaded_feed:
        adapter.set_feed_size(group[0].feed_size or loaded_feed)
    started = [_start_ablation(args, run, prepared) for prepared in group]
    since = run.now()  # the group's time: each folder's timing holds it, and its own outputs' writing
    answer_ids = yes_no_ids(adapter.tokenizer)
    layers = sorted({layer for prepared in group for heads in prepared.head_sets for layer, _ in heads})
    means = head_means(adapter, dataset.pairs, prompt, layers, run.batch_size) if args.mode == "mean" else None

    def ablate(chunk: list[Pair], wanted: tuple[bool, ...]):
        measured = iter(measure_groups(adapter, encode_pairs(adapter, chunk, prompt),
                                       [prepared.head_sets for prepared, want in zip(group, wanted) if want],
                                       answer_ids, means, answer_only=args.positions == "answer",
                                       sets_per_forward=args.sets_per_forward))
        by_group = [next(measured) if want else None for want in wanted]  # a folder that has the batch: nothing
        for i, pair in enumerate(chunk):
            yield tuple(None if got is None else {"id": pair.id, "log_odds": got[0][i].tolist(),
                                                  "ablated_log_odds": got[1][:, i].tolist()} for got in by_group)

    stored = resumable_map_many(share, [(prepared.results, identity) for prepared, (_, identity, _) in
                                        zip(group, started)], dataset.pairs, ablate, batch_size=run.batch_size,
                                desc=f"ablation {dataset.corner} {' '.join(p.job.heads for p in group)} "
                                     f"({sum(len(p.head_sets) for p in group)} head sets)", unit="pair")
    if not share.is_main:
        return
    loop = run.timing(0, since)
    for prepared, (job_run, _, record), records in zip(group, started, stored):
        _finish_ablation(args, job_run, prepared, records, answer_ids, record, loop, len(group))


def _start_ablation(args, run: Run, prepared: Prepared) -> tuple[Run, dict, dict]:
    """One ablation's checks with the loaded model, and its run.json started: its own run (what run.json records:
    this ablation's inputs), its folder's identity and its run.json record."""
    job, stats, chosen = prepared.job, prepared.stats, prepared.chosen
    adapter, out = run.adapter, prepared.out
    settings = {**run.settings, "dataset": str(job.dataset.folder), "stats_dir": str(job.stats_dir),
                "analysis_dir": job.analysis_dir and str(job.analysis_dir), "heads": job.heads, "out_dir": str(out)}
    run = replace(run, options=replace(run.options, feed_size=prepared.feed_size), out=out, data=job.dataset.folder,
                  settings=settings)
    if stats.full.shape[1] != adapter.num_heads:
        raise DataError(f"{job.stats_dir}: scored {stats.full.shape[1]} heads per layer, the model has "
                        f"{adapter.num_heads}; the stats dir comes from another model")
    check_heads(chosen, job.heads, adapter.num_layers, adapter.num_heads)
    log.info("%s: ablating %s (%s, mode %s, %s positions) on %d pairs, %d random controls", job.dataset.corner,
             " ".join(map(head_name, chosen)), job.heads, args.mode, args.positions, len(job.dataset.pairs),
             args.random_controls)
    identity = {**run.identity(), **prepared.settings}
    run.share.main_checks(lambda: check_identity(prepared.results.path, identity, "--out-dir"))  # before run.json
    record = run.record(dataset=str(job.dataset.folder))
    if run.share.is_main:
        start_run(out / "run.json", record)
    return run, identity, record


def _finish_ablation(args, run: Run, prepared: Prepared, records, answer_ids, record: dict, loop: dict,
                     sharing: int) -> None:
    """One ablation's outputs from its ``records``, and its run.json finished (``record``), with the ``timing`` of
    its group's loop (``loop``: shared by ``sharing`` ablations, each of which records it whole) and of its own
    outputs."""
    job, out, written = prepared.job, prepared.out, run.now()
    base = np.array([r["log_odds"] for r in records])  # [N, 2]
    ablated = np.array([r["ablated_log_odds"] for r in records]).transpose(1, 0, 2)  # [S, N, 2]
    metrics = write_outputs(out, run.adapter, job.dataset.pairs, job.dataset.corner, prepared.prompt, job.heads,
                            args.mode, args.positions, run.options.seed, prepared.head_sets, base, ablated,
                            answer_ids, which_pairs(job))
    own = run.timing(records.made, written)
    timing = {"items": own["items"], **{key: round(loop[key] + own[key], 3)
                                        for key in ("forward_seconds", "other_seconds")}}
    if sharing > 1:
        timing["ablations_sharing_forwards"] = sharing
    finish_run(out / "run.json", {**record, "timing": timing})
    m = metrics[PRIMARY]
    ci = "n/a" if m["ci_lo"] is None else f"{m['ci_lo']:+.3f}..{m['ci_hi']:+.3f}"
    log.info("%s: change of the log-odds on full images %+.3f (95%% CI %s), random sets %+.3f on average; "
             "p_drop %.3g -> %s", job.dataset.corner, m["effect"], ci, m["random_mean"], m["p_drop"], out)


def planned_forwards(pairs: int, datasets: int, specs: list[str], batch: int, num_layers: int, num_heads: int,
                     random_controls: int, mode: str = "zero", sets_per_forward: int = 8, positions: str = "all"
                     ) -> list[Forwards]:
    """The forwards of one model's ablations: on each of ``datasets`` data sets of ``pairs`` pairs, one whole
    forward of each batch for every --heads spec together (``measure_groups``), then per spec the reruns of the
    chosen set and its null sets. The heads are found by the run, so their lowest layer is planned at the
    expected lowest of as many heads placed at random (``planned_heads``)."""
    planned = ablation_measure.whole_forwards(pairs, batch, num_layers, means=mode == "mean") if specs else []
    for spec in specs:
        per_layer, lowest = planned_heads(spec)
        sets = 1 + null_set_count(per_layer, num_heads, random_controls)
        first = lowest if lowest is not None else num_layers / (len(per_layer) + 1)
        planned += ablation_measure.planned_forwards(pairs, batch, sets, num_layers, first, sets_per_forward,
                                                     answer_only=positions == "answer")
    return [replace(f, inputs=f.inputs * datasets) for f in planned]


def _pair_effects(record: dict) -> dict[str, float]:
    """Per pair: the chosen heads' change of the log-odds (full, control images) and its excess over the
    random head sets' mean change."""
    base = np.asarray(record["log_odds"], np.float64)  # [2]: full, control
    ablated = np.asarray(record["ablated_log_odds"], np.float64)  # [sets, 2]; set 0: the chosen heads
    effect = ablated - base
    random_mean = effect[1:].mean(0) if len(effect) > 1 else np.full(2, np.nan)
    return {"log_odds_full": base[0], "log_odds_control": base[1],
            "effect_log_odds_full": effect[0, 0], "effect_log_odds_control": effect[0, 1],
            "effect_minus_random_log_odds_full": effect[0, 0] - random_mean[0]}


ITEM_METRICS = controls.ItemMetrics(PAIRS_FILE, lambda record: record["id"], _pair_effects)


def finished(out: Path, results: Results, pairs: list[Pair]) -> bool:
    """Whether ``out`` (its identity checked) holds this ablation finished: every pair measured, its outputs
    there and run.json saying so (a run that failed after its summary, or lost an output, is redone)."""
    try:
        status = json.loads((out / "run.json").read_text()).get("status")
    except (OSError, ValueError, AttributeError):
        return False
    outputs = all((out / name).is_file() for name in ("summary.json", "ablation.csv", FIGURE))
    return (status == "finished" and outputs
            and {record["id"] for record in results.read()} >= {pair.id for pair in pairs})


def stats_feed_size(stats: CornerRun) -> int | None:
    """The square side the stats dir's images were fed at (None where the family fixes it)."""
    feed = stats.meta.get("feed_size")
    return int(feed[0]) if feed else None


def check_stats_model(run: CornerRun, options: ModelOptions) -> None:
    """OptionError when the stats dir was scored by another model than --model / --model-path: its heads were
    found in that model, so ablating them in this one would test nothing.

    Checkpoints count as the same only when the paths are the same text or name the same local folder: a hub
    id and a local folder may or may not hold the same weights, and a silent mismatch costs a whole run.
    """
    meta_path = run.folder / "meta.json"
    family, path = run.meta.get("model"), run.meta.get("model_path")
    if family is None:
        log.warning("%s does not say which model scored it; cannot check that it was --model %s",
                    meta_path, options.family)
        return
    if family != options.family:
        raise OptionError(f"--stats-dir {run.folder}: scored with --model {family}, not {options.family}; ablate "
                          f"its heads in the model they were found in, or score {options.family} first")
    wanted = options.model_path
    if path is not None and checkpoint_name(path) != checkpoint_name(wanted):
        raise OptionError(f"--stats-dir {run.folder}: scored with --model-path {path!r}, not {wanted!r}; ablate "
                          f"in that checkpoint (--model-path {path}), or score this one first")
    from models.base import CONTROL_INITIALISATION

    scored = recorded_identity(run.folder) or {}
    scored_seed = scored.get(INIT_SEED_KEY)  # a control's heads are its seed's, drawn as this run draws it
    if scored_seed is not None and scored.get("initialisation") != CONTROL_INITIALISATION:
        raise OptionError(f"--stats-dir {run.folder}: its random initialisation {scored_seed} was drawn otherwise "
                          f"than by {CONTROL_INITIALISATION!r} (before 2026-12-07); score it again")
    if scored_seed != options.random_init_seed:
        said = lambda seed: "the model's own weights" if seed is None else f"random initialisation {seed}"  # noqa: E731
        raise OptionError(f"--stats-dir {run.folder}: scored with {said(scored_seed)}, not "
                          f"{said(options.random_init_seed)}; give the stats dir of the same weights")


def check_images(pairs: list[Pair]) -> None:
    """DataError naming the first image that cannot be read: found now, not hours into the run."""
    for pair in pairs:
        pair.load_images()


def ablation_prompt(prompt: str | None, run: CornerRun, corner: str) -> str:
    """--prompt (else the stats dir's, else the default) with '{corner}' filled in; an empty --prompt is
    refused, not replaced by the stats dir's."""
    if prompt is not None:
        return fill_corner_prompt(prompt, corner)
    return fill_corner_prompt(run.meta.get("prompt") or CORNER_PROMPT, corner, f"{run.folder / 'meta.json'}: prompt")


def which_pairs(job: Job) -> dict:
    """The pairs an ablation tested its heads on, beside those its heads were found on (the stats dir's)."""
    found = recorded_identity(job.stats_dir) or {}
    other_data = found.get(DIGEST_KEY) not in (None, job.dataset.identity[DIGEST_KEY])
    found_on = found.get(SPLIT_KEY, "all")
    return {"tested_on": job.dataset.split, "heads_found_on": "other data" if other_data else found_on,
            "held_out": other_data or not splits_overlap(found_on, job.dataset.split)}


def write_outputs(out: Path, adapter, pairs: list[Pair], corner: str, prompt: str, heads_spec: str, mode: str,
                  positions: str, seed: int, head_sets: list[list[Head]], base: np.ndarray, ablated: np.ndarray,
                  answer_ids: tuple[list[int], list[int]], pairs_used: dict | None = None) -> dict:
    """ablation.csv, summary.json and the figure; returns the per-metric summary. ``pairs_used``: ``which_pairs``."""
    chosen = head_sets[0]
    metrics = summarize(base, ablated, seed)
    write_atomic(out / "ablation.csv", ablation_csv(pairs, head_sets, base, ablated))
    write_json(out / "summary.json", {
        "corner": corner, "prompt": prompt, "heads_spec": heads_spec, "heads": heads_json(chosen), "mode": mode,
        "positions": positions,
        "n_pairs": len(pairs), "pairs": pairs_used, "metrics": metrics,
        "primary": {"metric": PRIMARY, "effect": metrics[PRIMARY]["effect"], "p_value": metrics[PRIMARY]["p_drop"],
                    "test": "one-sided: (1 + random sets whose mean change is <= the chosen heads') / (1 + R)"},
        "random_controls": {"count": len(head_sets) - 1, "seed": seed,
                            "head_sets": [heads_json(heads) for heads in head_sets[1:]]},
        "yes_tokens": adapter.tokenizer.convert_ids_to_tokens(answer_ids[0]),
        "no_tokens": adapter.tokenizer.convert_ids_to_tokens(answer_ids[1]),
        "definitions": {"heads": "layer 1-based, head 0-based", "log_odds": "logsumexp(yes logits) - logsumexp(no)",
                        "gap": "log_odds_full - log_odds_control", "accuracy": "yes on full, no on control",
                        "effect": "mean over pairs of (ablated - unablated)", "ci": "95% percentile bootstrap",
                        "mean_mode": "per (layer, head) and position: mean output at that position over every "
                                     "image (full and control), unablated model"}})
    plot_effects(out / FIGURE, metrics,
                 f"{corner}: ablating {' '.join(map(head_name, chosen))} ({mode}, {positions} positions) vs "
                 f"{len(head_sets) - 1} random sets from the same layers")
    return metrics
