"""Experiment 2: text-only relation-to-entity attention with entity-swap
counterfactuals (metrics.md, "Text-only asymmetry").

For each caption s1 ("... a cyan ellipse and a blue circle ... relation is
left .") the counterfactual s2 swaps the two entity phrases and flips the
relation ("... a blue circle and a cyan ellipse ... relation is right ."). In
each sentence, r_to_e = the mean attention from the relation word's tokens to
an entity's shape-word tokens (mean over those token pairs, the heads and the
selected layers), with e1/e2 the first/second-mentioned shape of that sentence;
asym = r_to_e1 - r_to_e2 and symmetry_score = asym(s1) + asym(s2). A model that
reads roles (who is left of whom) gives symmetry near 0 with asym flipping
sign; one that only reads position gives asym(s1) = asym(s2).

One implementation for both families: ``text_only_llm_analysis_{llava,qwen2}.py``.
"""
from __future__ import annotations

import argparse
import csv
import io
import logging
import time
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import numpy as np

from spatial_attention.common.console import command_parser, user_errors_exit
from spatial_attention.common.errors import DataError
from spatial_attention.common.runio import finish_run, lacks_keys, setup_logging, write_atomic, write_json
from spatial_attention.data.shapeworld import Caption, ReadStats, Skipped, counterfactual_caption, iter_worlds
from spatial_attention.engine.capture import CaptureRequest, capture
from spatial_attention.run import controls
from spatial_attention.run.cli import add_model_args, add_shapeworld_args
from spatial_attention.run.cost import Forwards, batched
from spatial_attention.run.figures import plot_asymmetry
from spatial_attention.run.runloop import Run, open_run, prepare_run, resumable_map, world_results
from spatial_attention.stats.inference import bootstrap_ci, json_safe, paired_permutation_p

log = logging.getLogger("spatial_attention")

DEFAULT_LAYERS = "all"  # every layer's attention, averaged
CSV_COLUMNS = ["shard", "index", "sent1", "sent2", "e1", "e2", "relation", "r_to_e1_s1", "r_to_e2_s1", "asym_s1",
               "r_to_e1_s2", "r_to_e2_s2", "asym_s2", "symmetry_score"]


def build_parser(family: str | None) -> argparse.ArgumentParser:
    """The options; ``family`` None: the generic script's, which takes --model."""
    parser = command_parser(
        f"text_only_llm_analysis_{family}.py" if family else "text_only_llm_analysis.py",
        f"Experiment 2 for {family or 'the --model family'}: without any image, does the relation word attend to the two "
        "shapes by role or by position? Each ShapeWorld caption is paired with its entity-swapped, "
        "relation-flipped counterfactual. Writes OUT/pairs.jsonl (as pairs finish), OUT/pairs.csv, "
        "OUT/summary.json, OUT/figures/ and OUT/run.json; rerunning with the same --out resumes.")
    add_model_args(parser, family)
    add_shapeworld_args(parser)
    parser.add_argument("--out", type=Path, default=Path(f"results/text_only/{family}") if family else None,
                        help="output folder (default: results/text_only/MODEL)")
    controls.add_control_args(parser)
    return parser


@user_errors_exit
def main(family: str | None = None, argv=None) -> None:
    """``family`` None: the generic script (--model)."""
    args = build_parser(family).parse_args(argv)
    family = family or args.model
    args.out = args.out or Path(f"results/text_only/{family}")
    setup_logging(args.verbose)
    started = time.time()
    controls.init_seeds(args)  # checked before prepare_run generates any data
    options, share, data, shards = prepare_run(family, args)
    planned = controls.runs(options, args.out, args)
    captions, skipped, stats = _select_captions(data, shards, args.limit)
    for run_options, out in planned:
        _analyse(family, args, run_options, share, data, out, captions, skipped, stats, started)
    if share.is_main:
        controls.write_comparison(args.out, ITEM_METRICS, seed=options.seed)


def _analyse(family: str, args, options, share, data: Path, out: Path, captions: list, skipped: Counter,
             stats: ReadStats, started: float) -> None:
    """Experiment 2 with one model (the checkpoint, or one initialisation of the control) into ``out``."""
    results = world_results(out / "pairs.jsonl", lacks_keys(*CSV_COLUMNS, "layers"),
                            lambda item, record: record.get("sent1") == item.caption.text)  # all a pair depends on
    run, identity = open_run(options, share, results, {"--data": str(Path(data).resolve())}, vars(args), captions,
                             data, DEFAULT_LAYERS)
    failed = Counter()
    records = resumable_map(share, results, captions,
                            lambda chunk: analyse_pairs(run.adapter, chunk, list(run.layers), failed), identity,
                            batch_size=run.batch_size, desc=f"{family} caption pairs", unit="pair")
    failed = sum(map(Counter, share.gather([dict(failed)])), Counter())  # every process's skipped pairs
    if share.is_main:
        _finish(run, sorted(records, key=results.record_key), stats, skipped, failed, started, records.made)


ITEM_METRICS = controls.ItemMetrics(
    "pairs.jsonl", lambda record: (record["shard"], record["index"]),
    lambda record: {"asym_s1": record["asym_s1"], "asym_s2": record["asym_s2"],
                    "symmetry_score": record["symmetry_score"], "abs_symmetry_score": abs(record["symmetry_score"])})


class CaptionItem(NamedTuple):
    """One world's caption, keyed like the world (``runloop.world_results``)."""
    shard: int
    index: int
    caption: Caption


def _select_captions(data: Path, shards, limit) -> tuple[list[CaptionItem], Counter, ReadStats]:
    """(shard, index, caption) of every usable world with a true caption; skipped worlds
    counted by reason; the reader's counts (captions read, left out as not true)."""
    captions, skipped, stats = [], Counter(), ReadStats()
    for item in iter_worlds(data, shards=shards, stats=stats):
        if isinstance(item, Skipped):
            skipped[item.kind] += 1
            log.warning("skipping: %s", item.reason)
            continue
        captions.append(CaptionItem(item.shard, item.index, item.caption))
        if limit is not None and len(captions) >= limit:
            break
    if skipped:
        log.warning("%d worlds skipped while reading %s (counts by kind in summary.json)", sum(skipped.values()), data)
    if not captions:
        raise DataError(f"--data {data}: no usable captions (check --shards and the folder)")
    return captions, skipped, stats


def sentence_positions(layout, caption: Caption) -> dict[str, np.ndarray]:
    """Token positions of the relation word and of the first/second-mentioned shape words."""
    spans = caption.spans()
    return {name: layout.span_positions(*spans[key])
            for name, key in (("relation", "relation"), ("e1", "shape1"), ("e2", "shape2"))}


def analyse_pairs(adapter, items: list[tuple[int, int, Caption]], layers: list[int], failed: Counter) -> list[dict]:
    """One forward pass over the originals and counterfactuals of ``items``; one record per pair."""
    pairs = [(s, i, c, counterfactual_caption(c)) for s, i, c in items]
    sentences = [c for *_, c, _ in pairs] + [cf for *_, cf in pairs]
    batch = adapter.encode([c.text for c in sentences])
    n = len(pairs)
    positions, broken = [], {}  # broken: pair -> why (counted once per pair)
    empty = np.zeros(0, dtype=np.int64)
    for k, (layout, sentence) in enumerate(zip(batch.layouts, sentences)):
        try:
            positions.append(sentence_positions(layout, sentence))
        except ValueError as err:  # a word no token covers: count it, keep the batch going
            if k % n not in broken:
                shard, index = pairs[k % n][:2]
                log.warning("skipping shard %d world %d: %s", shard, index, err)
            broken.setdefault(k % n, "tokens_not_found")
            positions.append({"relation": empty, "e1": empty, "e2": empty})
    failed.update(broken.values())
    request = CaptureRequest(layers=layers, keep="layer",
                             blocks={e: [(p["relation"], p[e]) for p in positions] for e in ("e1", "e2")})
    recordings, _ = capture(adapter, batch, request)
    return [pair_record(shard, index, caption, cf, recordings[k], recordings[n + k], layers)
            for k, (shard, index, caption, cf) in enumerate(pairs) if k not in broken]


def planned_forwards(captions: int, batch: int, layers: int) -> list[Forwards]:
    """The forwards of ``analyse_pairs`` over ``captions`` captions, ``batch`` at a time: each caption and its
    counterfactual, text alone."""
    return [Forwards(2 * captions, 2 * batched(captions, batch), layers, image=False, captured=True)]


def pair_record(shard: int, index: int, s1: Caption, s2: Caption, rec1: dict, rec2: dict, layers: list[int]) -> dict:
    """The pair's scores from the two sentences' recordings (blocks e1/e2 of shape (L, R, C))."""
    per_layer = {}
    for tag, rec in (("s1", rec1), ("s2", rec2)):
        for e in ("e1", "e2"):
            per_layer[f"r_to_{e}_{tag}"] = rec[e].astype(np.float64).mean(axis=(1, 2))  # (L,)
    row = {key: float(v.mean()) for key, v in per_layer.items()}
    row["asym_s1"] = row["r_to_e1_s1"] - row["r_to_e2_s1"]
    row["asym_s2"] = row["r_to_e1_s2"] - row["r_to_e2_s2"]
    row["symmetry_score"] = row["asym_s1"] + row["asym_s2"]
    layer_asym = {tag: (per_layer[f"r_to_e1_{tag}"] - per_layer[f"r_to_e2_{tag}"]).tolist() for tag in ("s1", "s2")}
    return {"shard": shard, "index": index, "sent1": s1.text, "sent2": s2.text,
            "e1": f"{s1.color1} {s1.shape1}", "e2": f"{s1.color2} {s1.shape2}", "relation": s1.relation, **row,
            "layers": [layer + 1 for layer in layers], "layer_asym_s1": layer_asym["s1"],
            "layer_asym_s2": layer_asym["s2"]}


def summarise_pairs(records: list[dict], seed: int = 0) -> dict:
    """Means, mean |symmetry|, 95% bootstrap intervals and the sign-flip p of mean = 0 (not for |symmetry|, which is
    never below 0); overall and by relation."""
    def block(rows):
        out = {"n": len(rows)}
        for name, values in (("asym_s1", [r["asym_s1"] for r in rows]), ("asym_s2", [r["asym_s2"] for r in rows]),
                             ("symmetry_score", [r["symmetry_score"] for r in rows]),
                             ("abs_symmetry_score", [abs(r["symmetry_score"]) for r in rows])):
            lo, hi = bootstrap_ci(values, seed=seed)
            p = None if name.startswith("abs_") else paired_permutation_p(values, seed=seed)
            out[name] = {"mean": float(np.mean(values)) if values else None, "ci_lo": lo, "ci_hi": hi, "p_value": p}
        return out

    relations = sorted({r["relation"] for r in records})
    return {"all": block(records), "by_relation": {rel: block([r for r in records if r["relation"] == rel])
                                                   for rel in relations}}


def layer_profile(records: list[dict]) -> dict:
    """Per layer (1-based), the mean asym of original and counterfactual sentences."""
    if not records:
        return {}
    return {"layers": records[0]["layers"],
            "asym_s1": np.mean([r["layer_asym_s1"] for r in records], axis=0).tolist(),
            "asym_s2": np.mean([r["layer_asym_s2"] for r in records], axis=0).tolist()}


def _csv_text(records: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for record in records:
        writer.writerow(json_safe(record))
    return buffer.getvalue()


def _finish(run: Run, records: list[dict], stats: ReadStats, skipped: Counter, failed: Counter,
            started: float, made: int) -> None:
    """pairs.csv, the summary and figures of exactly this command's pairs (``records``, in world order), and
    run.json (``made``: the pairs this command ran, for its ``timing``)."""
    out, data = run.out, run.data
    if not records:  # not a finished run: say so instead of an empty summary
        raise DataError(f"--data {data}: no caption pair could be analysed ({dict(failed)}; see the warnings above)")
    write_atomic(out / "pairs.csv", _csv_text(records))
    counts = {"captions_read": stats.worlds, "captions_not_true": stats.filtered, "pairs_built": len(records),
              "pairs_skipped": sum(skipped.values()) + sum(failed.values()),
              "skipped_reasons": {**skipped, **failed}}
    summary = {"counts": counts, **summarise_pairs(records, seed=run.options.seed),
               "layer_profile": layer_profile(records)}
    write_json(out / "summary.json", summary)
    plot_asymmetry(out / "figures", records, summary["layer_profile"])
    finish_run(out / "run.json", run.record(data=str(data), counts=counts, wall_seconds=round(time.time() - started, 1),
                                            timing=run.timing(made)))
    log.info("done: %d pairs in %s (pairs.csv, summary.json, figures/)", len(records), out)
