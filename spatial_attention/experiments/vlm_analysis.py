"""Experiment 1: where each caption word looks in the image, and how the image
attends to itself, on the ShapeWorld two-shape scenes (metrics.md).

For every world: the caption's mentions are bound to entities by attributes;
the subject's shape word, the object's shape word and the relation word get
text-to-image maps; the image self-attention gets seed maps (subject centre,
object centre, a seeded background patch) from the language model's image
block and from the vision encoder; every metric is computed against the
entity masks, then the same on the patch-shuffled image (the baseline).

One implementation for both families: ``vlm_atten_analysis_{llava,qwen2}.py``
call ``main(family)``.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from spatial_attention.common.console import check_at_least, command_parser, user_errors_exit
from spatial_attention.common.errors import DataError, OptionError
from spatial_attention.common.runio import finish_run, lacks_keys, setup_logging
from spatial_attention.data.shapeworld import (RELATION_AXIS, RELATIONS, Skipped, World, counterfactual_caption,
                                               iter_worlds)
from spatial_attention.engine.capture import CaptureRequest, capture
from spatial_attention.experiments import world_metrics as WM
from spatial_attention.run import controls
from spatial_attention.run.cli import add_model_args, add_shapeworld_args
from spatial_attention.run.cost import Forwards, batched
from spatial_attention.run.options import parse_heads
from spatial_attention.run.runloop import Run, open_run, prepare_run, resumable_map, world_results
from spatial_attention.stats import metrics as M

log = logging.getLogger("spatial_attention")

RECORD_KEYS = ("shard", "index", "relation", "metrics")  # what the resume and the summary read of a record
# In the identity: records made before the word-swap and distance-matched specificities lack them, and a resumed
# folder would mix the two kinds (summarised over fewer worlds); such a folder is refused, naming this key.
RECORD_FORMAT = {"record format": "2: with specificity_word_swap and specificity_distance_matched"}


def build_parser(family: str | None) -> argparse.ArgumentParser:
    """The options; ``family`` None: the generic script's, which takes --model."""
    parser = command_parser(
        f"vlm_atten_analysis_{family}.py" if family else "vlm_atten_analysis.py",
        f"Experiment 1 for {family or 'the --model family'}: text-to-image cross-attention and image self-attention on "
        "ShapeWorld two-shape scenes, scored against the entity boxes and against a patch-shuffle "
        "baseline. Writes OUT/samples.jsonl (one line per world, as it finishes), OUT/summary.json, "
        "OUT/summary.csv, OUT/figures/ and OUT/run.json; rerunning with the same --out resumes.")
    add_model_args(parser, family, feed_size="the family's")
    add_shapeworld_args(parser)
    parser.add_argument("--out", type=Path, default=Path(f"results/vlm_atten_analysis/{family}") if family else None,
                        help="output folder (default: results/vlm_atten_analysis/MODEL)")
    controls.add_control_args(parser)
    parser.add_argument("--relations", default=",".join(RELATIONS),
                        help="comma-separated relations to analyse (left, right, above, below)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the patch-shuffled baseline")
    parser.add_argument("--heads", default=None,
                        help="0-based heads of each --layers layer whose mean makes the language model's maps, "
                             "comma-separated (e.g. --layers 2 --heads 0: head 2.0 alone, as the reports name it; "
                             "default: every head); the vision encoder's maps keep every head")
    parser.add_argument("--plot-samples", type=int, default=8, help="per-world figures for the first N worlds")
    parser.add_argument("--save-maps", action="store_true",
                        help="also write OUT/maps/shard{S}_world{I}.npz with every cross-attention map and "
                             "the masks, to recompute any metric without the model")
    parser.add_argument("--verify-attention", action="store_true",
                        help="before the run, check the capture against plain eager attention on the first "
                             "batch; stop if they disagree")
    return parser


@user_errors_exit
def main(family: str | None = None, argv=None) -> None:
    """``family`` None: the generic script (--model)."""
    args = build_parser(family).parse_args(argv)
    family = family or args.model
    args.out = args.out or Path(f"results/vlm_atten_analysis/{family}")
    setup_logging(args.verbose)
    started = time.time()
    relations = parse_relations(args.relations)
    heads = parse_heads(args.heads)
    check_at_least(0, plot_samples=args.plot_samples)
    controls.init_seeds(args)  # checked before prepare_run generates any data
    options, share, data, shards = prepare_run(family, args)
    planned = controls.runs(options, args.out, args)
    worlds, skipped = _select_worlds(data, shards, relations, args.limit)
    for run_options, out in planned:
        _analyse(family, args, run_options, share, data, out, worlds, skipped, started, heads)
    if share.is_main:
        controls.write_comparison(args.out, ITEM_METRICS, seed=options.seed)


def _analyse(family: str, args, options, share, data: Path, out: Path, worlds: list[World], skipped: Counter,
             started: float, heads: list[int] | None) -> None:
    """Experiment 1 with one model (the checkpoint, or one initialisation of the control) into ``out``."""
    results = world_results(out / "samples.jsonl", lacks_keys(*RECORD_KEYS), same_world)
    run, identity = open_run(options, share, results, {"--data": str(Path(data).resolve()), "--seed": options.seed,
                                                       "--no-baseline": args.no_baseline, **RECORD_FORMAT,
                                                       **({"--heads": heads} if heads is not None else {})},
                             vars(args), worlds, data)
    if heads is not None and max(heads) >= run.adapter.num_heads:
        raise OptionError(f"--heads {args.heads!r}: the model has {run.adapter.num_heads} heads a layer, "
                          f"numbered 0..{run.adapter.num_heads - 1}")
    plotted = {(w.shard, w.index) for w in worlds[: args.plot_samples]}
    if share.is_main:
        done = {results.record_key(record) for record in results.read()}
        _warn_missing_extras(out, worlds, done, plotted, args.save_maps)
    analysis = WorldAnalysis(run, seed=options.seed, baseline=not args.no_baseline, plotted=plotted,
                             save_maps=args.save_maps, verify=args.verify_attention, heads=heads)
    try:
        records = resumable_map(share, results, worlds, analysis, identity, batch_size=run.batch_size,
                                desc=f"{family} worlds", unit="world", prepare=analysis.prepare)
    except BaseException:  # stopped early: a rerun does not redo the worlds finished, so their figures now
        with contextlib.suppress(Exception):  # without hiding why the run stopped
            analysis.draw_figures()
        raise
    analysis.draw_figures()
    failed = sum(map(Counter, share.gather([dict(analysis.failed)])), Counter())  # every process's skipped images
    if share.is_main:
        _finish(run, records, len(worlds), skipped, failed, started)


def _world_metrics(record: dict) -> dict[str, float | None]:
    """A record's real values by "map/metric", and "map/metric real-shuffled" where there is a baseline."""
    real, shuffled = (record.get("metrics") or {}).get("real") or {}, (record.get("metrics") or {}).get("shuffled")
    values = {}
    for map_name, metrics in real.items():
        for metric, value in metrics.items():
            values[f"{map_name}/{metric}"] = value
            other = ((shuffled or {}).get(map_name) or {}).get(metric)
            if value is not None and other is not None:
                values[f"{map_name}/{metric} real-shuffled"] = value - other
    return values


ITEM_METRICS = controls.ItemMetrics("samples.jsonl", lambda record: (record["shard"], record["index"]), _world_metrics)


def same_world(world: World, record: dict) -> bool:
    """Whether ``record`` was made from ``world``: its caption and both entities' boxes."""
    return (record.get("caption") == world.caption.text
            and all((record.get(role) or {}).get("bbox") == [float(v) for v in entity.clipped_bbox()]
                    for role, entity in (("subject", world.subject), ("object", world.object))))


def parse_relations(text: str) -> list[str]:
    """The --relations list; OptionError for an unknown relation."""
    relations = [r.strip() for r in text.split(",") if r.strip()]
    if not relations or set(relations) - set(RELATIONS):
        raise OptionError(f"--relations {text!r}: choose from {', '.join(RELATIONS)}")
    if len(set(relations)) < len(relations):
        raise OptionError(f"--relations {text!r}: a relation is listed twice")
    return relations


def _select_worlds(data: Path, shards, relations, limit) -> tuple[list[World], Counter]:
    worlds, skipped = [], Counter()
    for item in iter_worlds(data, shards=shards):
        if isinstance(item, Skipped):
            skipped[item.kind] += 1
            log.warning("skipping: %s", item.reason)
            continue
        if item.caption.relation not in relations:
            continue
        worlds.append(item)
        if limit is not None and len(worlds) >= limit:
            break
    if skipped:
        log.warning("%d worlds skipped while reading %s (counts by kind in summary.json)", sum(skipped.values()), data)
    if not worlds:
        raise DataError(f"--data {data}: no usable worlds (check --shards, --relations and the folder)")
    return worlds, skipped


class WorldAnalysis:
    """What ``resumable_map`` runs on each batch of worlds. ``prepare``, one batch ahead in a background thread:
    load the images (an unreadable one is skipped and counted in ``failed``) and encode the inputs. The call: the
    forward and the metrics, the maps saved when asked, and the first worlds' maps kept for their figures, which
    ``draw_figures`` draws after the loop, so that nothing but the metrics waits between two forwards."""

    def __init__(self, run: Run, seed: int, baseline: bool, plotted: set, save_maps: bool, verify: bool,
                 heads: list[int] | None = None):
        self.run, self.out, self.seed, self.baseline, self.heads = run, run.out, seed, baseline, heads
        self.plotted, self.save_maps, self.verify = plotted, save_maps, verify
        self.failed = Counter()
        self.to_plot: list[tuple[dict, dict]] = []
        (run.out / "figures").mkdir(parents=True, exist_ok=True)

    def prepare(self, chunk: list[World]) -> PreparedWorlds | None:
        loaded = []
        for world in chunk:
            try:
                loaded.append((world, world.load_image()))
            except DataError as err:
                self.failed["unreadable_image"] += 1
                log.warning("skipping world: %s", err)
        return prepare_worlds(self.run.adapter, loaded, self.seed, self.baseline) if loaded else None

    def __call__(self, prepared: PreparedWorlds | None):
        if prepared is None:
            return
        if self.verify:  # the first batch only
            _verify(self.run.adapter, prepared.loaded, list(self.run.layers), self.heads)
            self.verify = False
        for record, maps in score_worlds(self.run.adapter, prepared, list(self.run.layers), self.heads):
            yield record
            if (record["shard"], record["index"]) in self.plotted:
                self.to_plot.append((record, maps))
            if self.save_maps:
                _save_maps(self.out, record, maps)

    def draw_figures(self) -> None:
        """The figures of the plotted worlds finished so far (a rerun skips finished worlds: it would not draw
        them)."""
        while self.to_plot:
            _plot_world(self.out, *self.to_plot.pop(0))


# Each random quantity of a world has its own stream, so that switching one off (--no-baseline)
# leaves the others as they were.
RANDOM_STREAMS = {"shuffle": 0, "background_seed": 1}


def world_rng(seed: int, world: World, stream: str) -> np.random.Generator:
    """The generator of one random quantity (``RANDOM_STREAMS``) of one world; it does not
    depend on batch size, process count or any other stream."""
    return np.random.default_rng([seed, RANDOM_STREAMS[stream], world.shard, world.index])


@dataclass
class PreparedWorlds:
    """A batch of worlds made ready for the forward (everything ``analyse_worlds`` needs but the model): built on
    the CPU while the forward of the batch before runs (``WorldAnalysis.prepare``)."""
    loaded: list[tuple[World, object]]  # the worlds and their images as read
    kinds: list[str]  # the inputs of each world: "real", ("shuffled"), "swapped"; kind k of world w is input k * n + w
    images: list  # the fed image of every input
    batch: object  # the encoded inputs (models.base.Batch)
    grids: list[tuple[int, int]]
    regions: list[dict]
    seeds: list[dict]
    seed_cells: list[np.ndarray]  # per input
    word_rows: list[dict]  # per input


def prepare_worlds(adapter, loaded: list[tuple[World, object]], seed: int, baseline: bool = True) -> PreparedWorlds:
    """The inputs of ``analyse_worlds``: the real (and shuffled) images and the real images with the caption's two
    shape mentions exchanged (the word-swap control of the word maps' specificity), encoded, with each world's
    masks and seed cells and each input's word rows."""
    worlds = [w for w, _ in loaded]
    fed = [adapter.prepare_image(image) for _, image in loaded]
    grids = [adapter.token_grid(image) for image in fed]
    kinds = ["real"] + (["shuffled"] if baseline else []) + ["swapped"]
    images = list(fed)
    if baseline:
        images += [M.shuffle_patches(image, grid, seed=int(world_rng(seed, world, "shuffle").integers(2**31)))
                   for image, grid, world in zip(fed, grids, worlds)]
    images += fed
    told = [w for w in worlds] * (len(kinds) - 1) + [replace(w, caption=counterfactual_caption(w.caption))
                                                      for w in worlds]
    batch = adapter.encode([w.caption.text for w in told], images)
    regions = [world_regions(world, grid) for world, grid in zip(worlds, grids)]
    seeds = [world_seeds(world, r, seed) for world, r in zip(worlds, regions)]
    seed_cells = [seed_cells_of(s, r) for s, r in zip(seeds, regions)] * len(kinds)
    word_rows = [word_rows_of(layout, w) for layout, w in zip(batch.layouts, told)]
    return PreparedWorlds(loaded, kinds, images, batch, grids, regions, seeds, seed_cells, word_rows)


def analyse_worlds(adapter, loaded: list[tuple[World, object]], layers: list[int], seed: int,
                   baseline: bool = True, heads: list[int] | None = None) -> list[tuple[dict, dict]]:
    """One forward pass over the worlds' inputs (``prepare_worlds``); a record and the maps per world. ``heads``:
    the language model's maps average these heads of each layer (None: every head)."""
    return score_worlds(adapter, prepare_worlds(adapter, loaded, seed, baseline), layers, heads)


def score_worlds(adapter, prepared: PreparedWorlds, layers: list[int], heads: list[int] | None = None
                 ) -> list[tuple[dict, dict]]:
    """The forward of ``prepared`` and every metric of its worlds, computed on the device for the whole batch
    (``world_metrics``), one group of worlds with the same token grid at a time."""
    p = prepared
    recordings, _ = capture(adapter, p.batch, world_request(layers, p.batch.layouts, p.word_rows, p.seed_cells, heads),
                            device=adapter.device)
    n = len(p.loaded)
    outputs = [None] * n
    for grid in dict.fromkeys(p.grids):
        group = [w for w in range(n) if p.grids[w] == grid]
        inputs = [k * n + w for k in range(len(p.kinds)) for w in group]
        metrics, maps = WM.score_worlds(
            [recordings[i] for i in inputs], [p.word_rows[i] for i in inputs], [p.seed_cells[i] for i in inputs],
            [p.seeds[w] for w in group], [p.regions[w] for w in group], [p.loaded[w][0].caption.relation for w in group],
            [p.batch.layouts[i].image_positions for i in inputs], p.kinds, grid)
        for j, w in enumerate(group):
            record = _record_head(p.loaded[w][0], grid, p.regions[w])
            record["metrics"] = metrics[j]
            maps[j].pop("swapped")
            maps[j]["masks"] = p.regions[w]
            maps[j]["images"] = {kind: p.images[k * n + w] for k, kind in enumerate(p.kinds[:-1])}
            outputs[w] = (record, maps[j])
    return outputs


def planned_forwards(worlds: int, batch: int, layers: int, baseline: bool = True) -> list[Forwards]:
    """The forwards of ``analyse_worlds`` over ``worlds`` worlds, ``batch`` at a time, in a model of ``layers``
    layers: per world its real image, its shuffled copy (with the baseline) and its word-swapped caption."""
    kinds = 3 if baseline else 2
    return [Forwards(kinds * worlds, kinds * batched(worlds, batch), layers, captured=True)]


def world_seeds(world: World, regions: dict, seed: int) -> dict[str, int | None]:
    """The seed cell of each seed map (metrics.md): the subject's and the object's centroid cells and a
    background cell drawn from the world's own stream (None where there is no background)."""
    return {"subject": M.entity_seed(regions["subject"]), "object": M.entity_seed(regions["object"]),
            "background": M.background_seed(regions["background"], world_rng(seed, world, "background_seed"))}


def seed_cells_of(seeds: dict[str, int | None], regions: dict) -> np.ndarray:
    """The rows of the image blocks that the seed maps read, sorted: the seed cells, and every cell of the two
    shapes (``metrics.distance_matched_specificity`` takes each as a seed)."""
    shapes = np.flatnonzero(regions["subject"] | regions["object"])
    return np.unique(np.concatenate([np.array([s for s in seeds.values() if s is not None], dtype=np.int64), shapes]))


def world_request(layers: list[int], layouts, word_rows: list[dict], seed_cells: list[np.ndarray],
                  heads: list[int] | None = None) -> CaptureRequest:
    """What experiment 1 records per input: the caption words' rows onto the image (``cross``), and the seed cells'
    rows of the language model's image block (``image_self``) and of the vision encoder (``vision``)."""
    return CaptureRequest(
        layers=layers, vision_cells=seed_cells, heads=heads,
        blocks={"cross": [(np.concatenate(list(rows.values())), lay.image_positions)
                          for rows, lay in zip(word_rows, layouts)],
                "image_self": [(lay.image_positions[cells], lay.image_positions)
                               for cells, lay in zip(seed_cells, layouts)]})


def word_rows_of(layout, world: World) -> dict[str, np.ndarray]:
    """Token positions of the subject's shape word, the object's shape word and the relation word."""
    spans = world.caption.spans()
    return {name: layout.span_positions(*spans[key])
            for name, key in (("subject", "shape1"), ("object", "shape2"), ("relation", "relation"))}


def world_regions(world: World, grid) -> dict[str, np.ndarray]:
    subject = M.entity_mask(world.subject.bbox, grid)
    obj = M.entity_mask(world.object.bbox, grid)
    subject_only, object_only, background = M.region_masks(subject, obj)
    return {"subject": subject, "object": obj, "subject_only": subject_only, "object_only": object_only,
            "background": background, "entities": subject | obj}


def _record_head(world: World, grid, regions) -> dict:
    def entity(e, mask):
        return {"shape": e.shape, "color": e.color, "bbox": [float(v) for v in e.clipped_bbox()],
                "mask_cells": int(mask.sum())}

    return {"shard": world.shard, "index": world.index, "image": str(world.image_path),
            "caption": world.caption.text, "relation": world.caption.relation,
            "axis": RELATION_AXIS[world.caption.relation],
            "subject": entity(world.subject, regions["subject"]), "object": entity(world.object, regions["object"]),
            "grid": [int(grid[0]), int(grid[1])], "metrics": {}}


def maps_path(out: Path, shard: int, index: int) -> Path:
    return out / "maps" / f"shard{shard}_world{index}.npz"


def figure_path(out: Path, shard: int, index: int) -> Path:
    return out / "figures" / f"world_shard{shard}_{index}.png"


def _warn_missing_extras(out: Path, worlds: list[World], done: set, plotted: set, save_maps: bool) -> None:
    """Worlds an earlier run analysed are not redone, so the maps and figures it did not make stay missing."""
    earlier = [(w.shard, w.index) for w in worlds if (w.shard, w.index) in done]
    no_maps = [key for key in earlier if save_maps and not maps_path(out, *key).exists()]
    no_figure = [key for key in earlier if key in plotted and not figure_path(out, *key).exists()]
    for missing, what in ((no_maps, "maps (--save-maps)"), (no_figure, "figures (--plot-samples)")):
        if missing:
            log.warning("%d worlds analysed by an earlier run into %s have no %s and are not redone; for those, "
                        "run into a new --out", len(missing), out, what)


def _save_maps(out: Path, record: dict, maps: dict) -> None:
    arrays = {f"{kind}_{name}": maps[kind][name].astype(np.float32)
              for kind in ("real", "shuffled") if kind in maps
              for name in ("subject_cross", "object_cross", "relation_cross")}
    arrays["subject_mask"] = maps["masks"]["subject"].astype(np.uint8)
    arrays["object_mask"] = maps["masks"]["object"].astype(np.uint8)
    path = maps_path(out, record["shard"], record["index"])
    path.parent.mkdir(exist_ok=True)
    np.savez_compressed(path, **arrays)


def _plot_world(out: Path, record: dict, maps: dict) -> None:
    from spatial_attention.run.figures import plot_world_panel

    title = f"shard {record['shard']} world {record['index']}: {record['caption'].split(' . ')[0]} -- " \
            f"relation '{record['relation']}'"
    plot_world_panel(figure_path(out, record["shard"], record["index"]),
                     maps["images"]["real"], maps["real"], maps["masks"]["subject"], maps["masks"]["object"], title,
                     shuffled_maps=maps.get("shuffled"), shuffled_image=maps["images"].get("shuffled"))


def _verify(adapter, loaded, layers, heads) -> None:
    from spatial_attention.engine.reference import check, log_report, verification_request

    batch = adapter.encode([w.caption.text for w, _ in loaded], [image for _, image in loaded])
    report, passed = check(adapter, batch, replace(verification_request(batch, layers), heads=heads))
    log_report(report)
    if not passed:
        raise SystemExit("--verify-attention: the capture disagrees with eager attention beyond the tolerance "
                         "(see the log above); no results were written")


def _finish(run: Run, records: list[dict], n_selected: int, skipped: Counter, failed: Counter,
            started: float) -> None:
    """The summary of exactly this command's worlds (``records``), its figures, and run.json."""
    from spatial_attention.experiments.summary import plot_summary, summarise_samples, write_summary

    out, data = run.out, run.data
    summary = summarise_samples(records, seed=run.options.seed)
    if summary["n_worlds"] == 0:  # not a finished run: say so instead of an empty summary
        raise DataError(f"--data {data}: none of the {n_selected} selected worlds could be analysed "
                        f"({dict(failed)}; see the warnings above)")
    counts = {"worlds_selected": n_selected, "worlds_in_samples": summary["n_worlds"],
              "skipped_reading": dict(skipped), "skipped_images": dict(failed)}
    write_summary(out, summary, {"counts": counts})
    plot_summary(summary, out / "figures")
    finish_run(out / "run.json", run.record(data=str(data), counts=counts, wall_seconds=round(time.time() - started, 1),
                                            timing=run.timing(records.made)))
    log.info("done: %d worlds in %s (summary.json, summary.csv, figures/)", summary["n_worlds"], out)
