"""The table of every instrument against a toy's known circuit, from the outputs of bench/toy_circuit.sh
(markdown on stdout).

    python bench/circuit_table.py results/toy_circuit/llava

Each row: what the instrument should find on the toy and why, what it found on the toy and on its random-weights
control (each initialisation), and a verdict by the rule the row states. The trained heads are toy_circuit.JOBS,
named as the reports name them (layers from 1).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import numpy as np  # noqa: E402

from spatial_attention.experiments.ablation_heads import random_head_sets  # noqa: E402
from spatial_attention.experiments.toy_circuit import (BINDING_HEAD, MENTION_HEADS, RELATION_HEAD,  # noqa: E402
                                                       head_name)
from spatial_attention.run.controls import control_seed_folders  # noqa: E402  (after the path)

BINDING = head_name(*BINDING_HEAD)
ANSWER = [head_name(*head) for head in MENTION_HEADS]
RELATION = head_name(*RELATION_HEAD)
TRAINED = set(ANSWER) | {RELATION}  # the heads trained to feed the answer


def _json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _row(instrument: str, expected: str, toy: str, control: str, verdict: str) -> str:
    return f"| {instrument} | {expected} | {toy} | {control} | {verdict} |"


def evaluate(out: Path) -> list[str]:
    rows = []
    for line in _lines(out / "evaluate.jsonl"):
        if "balanced_accuracy" not in line or "n_swapped" not in line:
            continue
        real = "shapeworld_real" in line["data"]
        target = 0.85 if real else 0.92
        rows.append(_row(f"`--evaluate`: true captions vs relation-swapped, balanced ({line['n_swapped']} "
                         f"{'real' if real else 'generated'} worlds)", f">= {target} (the recipe's target)",
                         f"true {line['accuracy_true']:.3f}, swapped {line['accuracy_swapped']:.3f}: "
                         f"**{line['balanced_accuracy']:.3f}**", "",
                         "met" if line["balanced_accuracy"] >= target else f"**short of {target}**"))
    return rows


def circuit(out: Path) -> list[str]:
    lines = _lines(out / "circuit.jsonl")
    if not lines:
        return []
    model = [line for line in lines if "initialisation seed" not in line]
    seeds = [line for line in lines if "initialisation seed" in line]
    rows = []
    for name, probe in model[0]["circuit"].items():
        does = probe["mass"] > 3 * max(probe["other_heads_max"], probe["uniform"])
        control = "; ".join(f"{s['circuit'][name]['mass']:.3f} (others <= {s['circuit'][name]['other_heads_max']:.3f})"
                            for s in seeds)
        rows.append(_row(f"attention of head {name} ({probe['job']}; {probe['n']} rows)",
                         "its mass on the target far above the other heads' and uniform (trained so)",
                         f"**{probe['mass']:.3f}**; other heads of the layer <= {probe['other_heads_max']:.3f} "
                         f"(mean {probe['other_heads_mean']:.3f}); uniform {probe['uniform']:.3f}", control,
                         "does its job (> 3x the best other head and uniform)" if does else "**not 3x**"))
        if "specificity" in probe:  # the binding head: the named shape against the other one
            binds = probe["specificity"] > probe["other_heads_max_specificity"] + 0.4
            control = "; ".join(f"{s['circuit'][name]['specificity']:+.3f}" for s in seeds)
            rows.append(_row(f"head {name}'s specificity: mass on the named shape minus on the other shape",
                             "far above every other head's (the CI test's rule: by more than 0.4): the other "
                             "heads of the layer may look at the shapes, but not at the one a word names",
                             f"**{probe['specificity']:+.3f}** (other shape {probe['other_shape_mass']:.3f}); "
                             f"other heads <= {probe['other_heads_max_specificity']:+.3f}"
                             + (f" ({probe['most_specific_other_head']})" if "most_specific_other_head" in probe
                                else ""), control,
                             "binds" if binds else "**does not bind**"))
    return rows


def _chosen(summary: dict | None) -> list[str]:
    return [] if summary is None else [f"{h['layer']}.{h['head']}" for h in summary.get("chosen_heads", [])]


def _control_choice(seeds: list[dict | None]) -> str:
    """What each initialisation chose; a control that ablates the model's heads chooses none of its own."""
    each = ["the model's heads (no choice of its own)" if s and s["chosen_by"] == "the model's own run"
            else " ".join(_chosen(s)) or "none" for s in seeds]
    return f"each of {len(each)}: {each[0]}" if len(set(each)) == 1 else "; ".join(each)


def _test(summary: dict | None) -> str:
    if summary is None:
        return "not run"
    test = summary.get("test")
    if test is None:
        found = summary.get("discovery")
        return "no head chosen" + ("" if found is None else f" (mean gap {found['gap_mean']:+.3f})")
    moved = "n/a" if test["gap_moved_share"] is None else f"{100 * test['gap_moved_share']:.0f}%"
    return (f"gap {test['gap_unablated']:+.2f} -> {test['gap_ablated']:+.2f} ({moved} moved) vs random sets "
            f"{test['random_gap_change_mean']:+.2f}, p_drop {test['p_drop']:.2g} ({test['n_pairs']} test pairs)")


def experiment_4(out: Path) -> list[str]:
    rows = []
    mirror, swap = _json(out / "exp4_mirror" / "summary.json"), _json(out / "exp4_swap" / "summary.json")
    mirror_seeds = [_json(s / "summary.json") for s in control_seed_folders(out / "exp4_mirror")]
    swap_seeds = [_json(s / "summary.json") for s in control_seed_folders(out / "exp4_swap")]
    if mirror is not None:
        chosen = _chosen(mirror)
        missing = [h for h in ANSWER if h not in chosen]
        also = [h for h in chosen if h not in ANSWER]
        rows.append(_row(
            "exp 4, mirror pairs (the caption on the world and on its mirror): heads chosen on the discovery half",
            f"{' and '.join(ANSWER)}: mirroring moves the shapes, so the shape words' states (the places "
            f"{BINDING} copied) differ, and these heads carry them to the answer",
            f"{' '.join(chosen) or 'none'} ({mirror['discovery']['n_significant']} significant of "
            f"{mirror['discovery']['n_pairs']} pairs' BH)", _control_choice(mirror_seeds),
            ("finds both" if not missing else f"**misses {' '.join(missing)}**")
            + (f"; also {' '.join(also)}" if also else "")))
        rows.append(_row("exp 4 mirror: the chosen heads ablated on the held-out half vs random sets of their layers",
                         "most of the gap moved, p_drop <= 0.05; on random weights no gap to move",
                         _test(mirror), "; ".join(_test(s) for s in mirror_seeds),
                         _verdict_moved(mirror)))
        rows.append(_row("exp 4 mirror: the random sets as harmful as the chosen heads",
                         "none without a trained head", *_null_sets(out / "exp4_mirror", mirror)))
    if swap is not None:
        chosen = _chosen(swap)
        trained = [h for h in ANSWER if h in chosen]
        verdict = ("finds it" if RELATION in chosen else f"**misses {RELATION}**") + (
            f"; **also chose the shape heads {' '.join(trained)}**" if trained else "; not the shape heads")
        rows.append(_row(
            "exp 4, swap pairs (the same world, the relation word swapped): heads chosen on the discovery half",
            f"{RELATION}, which reads the relation word at the answer; not {' or '.join(ANSWER)}: the relation word "
            "comes after both shape words, so what they read is the same in both captions",
            f"{' '.join(chosen) or 'none'} ({swap['discovery']['n_significant']} significant)",
            _control_choice(swap_seeds), verdict))
        rows.append(_row("exp 4 swap: the chosen heads ablated on the held-out half vs random sets",
                         "most of the gap moved, p_drop <= 0.05", _test(swap),
                         "; ".join(_test(s) for s in swap_seeds), _verdict_moved(swap)))
        rows.append(_row("exp 4 swap: the random sets as harmful as the chosen heads",
                         "none without a trained head", *_null_sets(out / "exp4_swap", swap)))
    return rows


def _null_sets(folder: Path, summary: dict | None) -> tuple[str, str, str]:
    """Which random sets moved the gap as much as the chosen heads: with 8 heads a layer, half the random sets of
    the chosen heads' layers hold a trained head (``TRAINED``), which the answer needs as much as the chosen."""
    records, run = _lines(folder / "test" / "ablation_pairs.jsonl"), _json(folder / "run.json")
    if summary is None or summary.get("test") is None or not records or run is None:
        return "not tested", "", ""
    chosen = [(h["layer"], h["head"]) for h in summary["chosen_heads"]]
    sets = random_head_sets(chosen, 8, summary["test"]["random_sets"], run["settings"]["seed"])
    base = np.array([r["base"] for r in records])
    change = (np.array([r["ablated"] for r in records]) @ [1, -1]).mean(0) - (base @ [1, -1]).mean()
    as_much = change[1:] <= change[0]
    if not np.isclose((1 + as_much.sum()) / (1 + len(sets)), summary["test"]["p_drop"]):
        raise SystemExit(f"{folder}: the random sets redrawn here do not give the summary's p_drop")
    trained = np.array([any(f"{layer}.{head}" in TRAINED for layer, head in heads) for heads in sets])
    found = (f"{as_much.sum()} random sets moved the gap as much, all {as_much.sum()} holding a trained head"
            if (as_much <= trained).all() else f"{as_much.sum()} random sets moved it as much, "
            f"{(as_much & ~trained).sum()} without a trained head") + (
        f" ({trained.sum()} of {len(sets)} hold one); the sets without one moved it by "
        f"{change[1:][~trained].mean():+.2f} on average, at most {change[1:][~trained].min():+.2f}")
    return found, "", "p_drop's misses are trained heads" if (as_much <= trained).all() else "**not met**"


def _verdict_moved(summary: dict) -> str:
    test = summary.get("test")
    if test is None or test["gap_moved_share"] is None:
        return "**nothing tested**"
    ok = test["gap_moved_share"] >= 0.5 and test["p_drop"] <= 0.05
    return "moves most of the gap, beyond random sets" if ok else "**short**"


def _metric(summary: dict | None, map_name: str, metric: str) -> dict | None:
    if summary is None:
        return None
    return next((r for r in summary["by_metric"] if r["map"] == map_name and r["metric"] == metric), None)


def _value(row: dict | None) -> str:
    if row is None or row.get("real_mean") is None:
        return "n/a"
    return f"{row['real_mean']:+.3f} [{row['real_ci_lo']:+.3f}, {row['real_ci_hi']:+.3f}]"


def experiment_1(out: Path) -> list[str]:
    head, others = out / f"exp1_head_{BINDING}", out / f"exp1_heads_{BINDING.split('.')[0]}.other"
    rows = []
    for map_name in ("subject_cross", "object_cross"):
        for metric in ("iou", "specificity_word_swap"):
            own, rest = _metric(_json(head / "summary.json"), map_name, metric), _metric(
                _json(others / "summary.json"), map_name, metric)
            if own is None:
                continue
            seeds = [_metric(_json(s / "summary.json"), map_name, metric) for s in control_seed_folders(head)]
            above = (rest is not None and own["real_ci_lo"] is not None and rest["real_ci_hi"] is not None
                     and own["real_ci_lo"] > rest["real_ci_hi"])
            rows.append(_row(
                f"exp 1 `{map_name}` {metric}, head {BINDING} alone vs the other heads of its layer",
                f"{BINDING} above the others: it was trained to attend, at the shape word, to the named shape",
                f"{BINDING}: **{_value(own)}**; others: {_value(rest)}", f"{BINDING}: "
                + "; ".join(_value(s) for s in seeds), "finds it" if above else "**does not separate them**"))
    return rows


def main() -> None:
    if len(sys.argv) != 2 or not Path(sys.argv[1]).is_dir():
        sys.exit("usage: python bench/circuit_table.py OUT  (the folder bench/toy_circuit.sh wrote)")
    out = Path(sys.argv[1])
    print("| instrument | should find on this toy, and why | found on the toy | found on random weights "
          "(each initialisation) | verdict |")
    print("| --- | --- | --- | --- | --- |")
    for line in evaluate(out) + circuit(out) + experiment_4(out) + experiment_1(out):
        print(line)


if __name__ == "__main__":
    main()
