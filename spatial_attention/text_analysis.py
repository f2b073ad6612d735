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

import numpy as np
from tqdm import tqdm

from spatial_attention.capture import CaptureRequest, capture
from spatial_attention.cli import (HelpFormatter, add_model_args, add_shapeworld_args, load_model, parse_shards,
                                   prepare_run, user_errors_exit)
from spatial_attention.errors import DataError, OptionError
from spatial_attention.runio import (append_jsonl, finish_run, lacks_keys, read_jsonl, run_record, setup_logging, start_run,
                                     write_atomic, write_json)
from spatial_attention.shapeworld import (FLIPPED_RELATION, Caption, ReadStats, Skipped, counterfactual_caption,
                                         iter_worlds)
from spatial_attention.stats import bootstrap_ci, json_safe

log = logging.getLogger("spatial_attention")

CSV_COLUMNS = ["shard", "index", "sent1", "sent2", "e1", "e2", "relation", "r_to_e1_s1", "r_to_e2_s1", "asym_s1",
               "r_to_e1_s2", "r_to_e2_s2", "asym_s2", "symmetry_score"]


def build_parser(family: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"text_only_llm_analysis_{family}.py", formatter_class=HelpFormatter,
        description=f"Experiment 2 for {family}: without any image, does the relation word attend to the two "
                    "shapes by role or by position? Each ShapeWorld caption is paired with its entity-swapped, "
                    "relation-flipped counterfactual. Writes OUT/pairs.jsonl (as pairs finish), OUT/pairs.csv, "
                    "OUT/summary.json, OUT/figures/ and OUT/run.json; rerunning with the same --out resumes.")
    add_model_args(parser, family)
    add_shapeworld_args(parser)
    parser.add_argument("--out", type=Path, default=Path(f"results/text_only/{family}"), help="output folder")
    return parser


@user_errors_exit
def main(family: str, argv=None) -> None:
    args = build_parser(family).parse_args(argv)
    setup_logging(args.verbose)
    run(family, args)


def run(family: str, args) -> None:
    started = time.time()
    share, data = prepare_run(family, args)
    out = args.out
    pairs_path = out / "pairs.jsonl"
    existing = list(share.existing_records(pairs_path, lacks_keys(*CSV_COLUMNS, "layers")))  # fails before loading
    captions, skipped, stats = _select_captions(data, parse_shards(args.shards), args.limit)
    adapter, layers, batch_size = load_model(family, args, share, default_layers="all")
    _check_same_layers(existing, layers, out)
    done = {_key(r) for r in existing}
    todo = [c for c in captions if (c[0], c[1]) not in done]
    if done:
        log.info("resuming: %d of %d pairs already in %s", len(captions) - len(todo), len(captions), pairs_path)
    if share.is_main:
        start_run(out / "run.json", run_record(args, adapter, data=str(data), layers_0based=layers))
    share.wait()  # every process has read what is done before any of them appends
    mine = share.take(todo)
    if share.size > 1:
        log.info("process %d of %d: %d of %d pairs to do", share.rank + 1, share.size, len(mine), len(todo))
    part_path = share.part_path(pairs_path)
    failed = Counter()
    for start in tqdm(range(0, len(mine), batch_size), desc=f"{family} caption pairs", unit="batch",
                      disable=not share.is_main):
        for record in analyse_pairs(adapter, mine[start:start + batch_size], layers, failed):
            append_jsonl(part_path, record)
    share.wait()
    share.merge_jsonl(pairs_path, _key)
    if share.is_main:
        _finish(out, args, adapter, data, layers, stats, skipped, failed, started)


def _check_same_layers(existing: list[dict], layers: list[int], out: Path) -> None:
    """Refuse to resume into pairs averaged over other layers: the summary would mix them."""
    wanted = [layer + 1 for layer in layers]
    other = next((r["layers"] for r in existing if r["layers"] != wanted), None)
    if other is not None:
        raise OptionError(f"--out {out} holds pairs averaged over layers {other} (1-based), not the selected "
                          f"{wanted}; rerun with the same --layers, or choose another --out")


def _key(record: dict) -> tuple[int, int]:
    return (int(record["shard"]), int(record["index"]))


def _select_captions(data: Path, shards, limit) -> tuple[list[tuple[int, int, Caption]], Counter, ReadStats]:
    """(shard, index, caption) of every usable world with a true caption; skipped worlds
    counted by reason; the reader's counts (captions read, left out as not true)."""
    captions, skipped, stats = [], Counter(), ReadStats()
    for item in iter_worlds(data, shards=shards, stats=stats):
        if isinstance(item, Skipped):
            skipped[item.kind] += 1
            log.warning("skipping: %s", item.reason)
            continue
        captions.append((item.shard, item.index, item.caption))
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
    """Means, mean |symmetry|, 95% bootstrap intervals; overall and by relation."""
    def block(rows):
        out = {"n": len(rows)}
        for name, values in (("asym_s1", [r["asym_s1"] for r in rows]), ("asym_s2", [r["asym_s2"] for r in rows]),
                             ("symmetry_score", [r["symmetry_score"] for r in rows]),
                             ("abs_symmetry_score", [abs(r["symmetry_score"]) for r in rows])):
            lo, hi = bootstrap_ci(values, seed=seed)
            out[name] = {"mean": float(np.mean(values)) if values else None, "ci_lo": lo, "ci_hi": hi}
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


def _finish(out, args, adapter, data, layers, stats, skipped, failed, started) -> None:
    records = sorted(read_jsonl(out / "pairs.jsonl"), key=_key)
    if not records:  # not a finished run: say so instead of an empty summary
        raise DataError(f"--data {data}: no caption pair could be analysed ({dict(failed)}; see the warnings above)")
    write_atomic(out / "pairs.csv", _csv_text(records))
    counts = {"captions_read": stats.worlds, "captions_not_true": stats.filtered, "pairs_built": len(records),
              "pairs_skipped": sum(skipped.values()) + sum(failed.values()),
              "skipped_reasons": {**skipped, **failed}}
    summary = {"counts": counts, **summarise_pairs(records, seed=args.seed), "layer_profile": layer_profile(records)}
    write_json(out / "summary.json", summary)
    _plot(out / "figures", records, summary["layer_profile"])
    finish_run(out / "run.json", run_record(args, adapter, data=str(data), layers_0based=layers,
                                            counts=counts, wall_seconds=round(time.time() - started, 1)))
    log.info("done: %d pairs in %s (pairs.csv, summary.json, figures/)", len(records), out)


def _plot(fig_dir: Path, records: list[dict], profile: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig_dir.mkdir(parents=True, exist_ok=True)
    if not records:
        return
    a1 = np.array([r["asym_s1"] for r in records])
    a2 = np.array([r["asym_s2"] for r in records])
    fig, ax = plt.subplots(figsize=(5.5, 6.5))
    ax.axhline(0, color="grey", lw=0.5)
    ax.axvline(0, color="grey", lw=0.5)
    for rel in sorted({r["relation"] for r in records}):
        keep = np.array([r["relation"] == rel for r in records])
        ax.scatter(a1[keep], a2[keep], s=12, alpha=0.7, label=f"s1 says '{rel}'")
    lim = max(np.abs(np.concatenate([a1, a2])).max(), 1e-6) * 1.1
    ax.plot([-lim, lim], [lim, -lim], "k--", lw=1, label="y = -x: symmetry 0 (role-consistent)")
    ax.plot([-lim, lim], [-lim, lim], "k:", lw=1, label="y = x: asym unchanged (position only)")
    ax.set(xlim=(-lim, lim), ylim=(-lim, lim), aspect="equal", xlabel="asym, original sentence (s1)",
           ylabel="asym, counterfactual sentence (s2)")
    ax.set_title(f"Relation-word attention asymmetry ({len(records)} pairs)", pad=14)  # room for the 1e-N
    ax.ticklabel_format(style="sci", scilimits=(-2, 2))
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2)  # no data hidden
    fig.tight_layout()
    fig.savefig(fig_dir / "asym_scatter.png", dpi=120)
    plt.close(fig)

    _plot_example(fig_dir / "example_pair_bars.png", records[0], plt)

    order = np.argsort(profile["layers"])
    layer_axis = np.array(profile["layers"])[order]
    s1, s2 = np.array(profile["asym_s1"])[order], np.array(profile["asym_s2"])[order]
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    ax.axhline(0, color="grey", lw=0.5)
    ax.plot(layer_axis, s1, marker="o", ms=3, label="original (s1)")
    ax.plot(layer_axis, s2, marker="o", ms=3, label="counterfactual (s2)")
    ax.plot(layer_axis, s1 + s2, "k--", lw=1, label="symmetry = s1 + s2")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    ax.set(xlabel="layer (1-based)", ylabel="mean asym = r->e1 - r->e2")
    ax.set_title(f"Asymmetry by layer (mean over {len(records)} pairs, heads averaged)", pad=14)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(fig_dir / "layer_asym_profile.png", dpi=120)
    plt.close(fig)


def _plot_example(path: Path, example: dict, plt) -> None:
    """Bars of one pair: in each sentence, the relation word's attention to the first- then the
    second-mentioned shape (asym = left bar - right bar); one colour per shape across sentences."""
    first, second = example["e1"], example["e2"]  # the shapes as s1 mentions them
    heights = [example["r_to_e1_s1"], example["r_to_e2_s1"], example["r_to_e1_s2"], example["r_to_e2_s2"]]
    names = [first, second, second, first]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    bars = ax.bar([0, 1, 3, 4], heights, color=["C0", "C1", "C1", "C0"])
    ax.bar_label(bars, fmt="%.4g", fontsize=8)
    ax.set_xticks([0, 1, 3, 4], [f"{name}\n({rank})" for name, rank in zip(names, ["1st", "2nd"] * 2)], fontsize=8)
    ax.set_ylim(0, max(heights) * 1.3 if max(heights) > 0 else 1)
    for x, tag, relation in ((0.5, "s1", example["relation"]), (3.5, "s2", FLIPPED_RELATION[example["relation"]])):
        ax.text(x, max(heights) * 1.17, f"{tag}: '... relation is {relation}'\nasym = {example['asym_' + tag]:+.3g}",
                ha="center", va="center", fontsize=8)
    ax.set(ylabel="mean attention, relation word -> shape word",
           title=f"Example pair (shard {example['shard']}, world {example['index']}): "
                 f"symmetry = {example['symmetry_score']:+.3g}")
    ax.title.set_fontsize(9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
