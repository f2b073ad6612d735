"""The README's Controls table rows from the outputs of bench/toy_controls.sh (markdown on stdout).

    python bench/control_table.py results/toy_controls/llava

Each row: what the instrument gives on the toy (the model in OUT) and on its random-weights control (the
seed folders under control_random_weights/, pooled: hierarchical intervals over seeds, then items).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from spatial_attention.data.counterfactual import CORNERS  # noqa: E402
from spatial_attention.run.controls import COMPARISON_FILE, control_seed_folders  # noqa: E402  (after the path)


def _json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def _ci(mean, lo, hi) -> str:
    if mean is None:
        return "n/a"
    return f"{mean:+.3f} [{lo:+.3f}, {hi:+.3f}]" if lo is not None else f"{mean:+.3f}"


def _comparison(folder: Path) -> dict[str, dict]:
    table = _json(folder / f"{COMPARISON_FILE}.json") or {}
    return {row["metric"]: row for row in table.get("rows", [])}


def experiment_1(out: Path) -> list[str]:
    summary, control = _json(out / "summary.json"), _comparison(out)
    if summary is None:
        return []
    rows = {(r["map"], r["metric"]): r for r in summary["by_metric"]}
    lines = []
    for map_name in ("subject_cross", "object_cross", "relation_cross"):
        for metric in ("iou", "specificity_iou", "specificity_soft_iou", "specificity_com"):
            row = rows.get((map_name, metric))
            if row is None:
                continue
            if metric == "iou":  # the paper's test: real vs patch-shuffled
                name = f"exp 1 `{map_name}` top-k IoU, real minus shuffled (paper's test)"
                toy = _ci(row["mean_diff"], row["ci_lo"], row["ci_hi"])
                toy += "" if row["p_value"] is None else f", p={row['p_value']:.2g}"
                key = f"{map_name}/{metric} real-shuffled"
            else:
                name = f"exp 1 `{map_name}` {metric}"
                toy = _ci(row["real_mean"], row["real_ci_lo"], row["real_ci_hi"])
                key = f"{map_name}/{metric}"
            c = control.get(key, {})
            lines.append(f"| {name} | {toy} | {_ci(c.get('control_mean'), c.get('control_ci_lo'), c.get('control_ci_hi'))} |")
    return lines


def experiment_2(out: Path) -> list[str]:
    summary, control = _json(out / "summary.json"), _comparison(out)
    if summary is None:
        return []
    lines = []
    for metric in ("asym_s1", "asym_s2", "symmetry_score", "abs_symmetry_score"):
        toy = summary["all"][metric]
        c = control.get(metric, {})
        lines.append(f"| exp 2 {metric} (n={summary['all']['n']}) | {_ci(toy['mean'], toy['ci_lo'], toy['ci_hi'])} | "
                     f"{_ci(c.get('control_mean'), c.get('control_ci_lo'), c.get('control_ci_hi'))} |")
    return lines


def _significant(root: Path) -> list[int] | None:
    summary = _json(root / "count_shared_unique" / "summary.json")
    return None if summary is None else [len(summary["significant_heads"].get(c, [])) for c in CORNERS]


def _ablation(folder: Path) -> str:
    summary = _json(folder / "summary.json")
    if summary is None:
        return "n/a"
    full, gap = summary["metrics"]["log_odds_full"], summary["metrics"]["gap"]
    named = " ".join(f"{h['layer']}.{h['head']}" for h in summary["heads"])
    return (f"full {full['effect']:+.2f} vs {full['random_mean']:+.2f}, p_drop={full['p_drop']:.2g}; gap "
            f"{gap['unablated']:.1f} {gap['effect']:+.2f} vs {gap['random_mean']:+.2f}, p_drop={gap['p_drop']:.2g} "
            f"({named})")


def experiment_3(out: Path, score: str, ablations: tuple) -> list[str]:
    seeds = control_seed_folders(out)
    toy = _significant(out)
    if toy is None:
        return []
    lines = [f"| exp 3 ({score} score) significant heads per corner ({', '.join(CORNERS)}) | {toy} | "
             + "; ".join(str(_significant(s)) for s in seeds) + " |"]
    for heads, corners in ablations:
        for corner in corners:
            folder = out / f"ablation_{corner}_{heads}"
            lines.append(f"| ablation ({score} score) `{heads}` {corner}: change of the log-odds on full images and "
                         f"of the gap, vs random sets of the same layers | {_ablation(folder)} | "
                         + "; ".join(_ablation(s) for s in control_seed_folders(folder)) + " |")
    return lines


def _relation_test(folder: Path) -> str:
    summary = _json(folder / "summary.json")
    if summary is None:
        return "n/a"
    test, found = summary.get("test"), summary.get("discovery")
    if test is None:
        if found is None:  # a control initialisation: it tests the model's heads, and there were none
            return "no head chosen"
        return (f"no head chosen ({found['n_significant']} significant; mean gap {found['gap_mean']:+.4f} on "
                f"{found['n_pairs']} discovery pairs)")
    named = " ".join(f"{h['layer']}.{h['head']}" for h in summary["chosen_heads"])
    moved = "n/a" if test["gap_moved_share"] is None else f"{100 * test['gap_moved_share']:.0f}%"
    change = _ci(test["gap_change"], test["gap_change_lo"], test["gap_change_hi"])
    return (f"gap {test['gap_unablated']:+.2f}, change {change} ({moved} moved) vs "
            f"{test['random_gap_change_mean']:+.2f}, p_drop={test['p_drop']:.2g}; balanced accuracy "
            f"{test['balanced_accuracy']:.2f}, {test['n_pairs']} test pairs ({named})")


def experiment_4(out: Path) -> list[str]:
    summary = _json(out / "summary.json")
    if summary is None:
        return []
    c = _comparison(out).get("gap_change", {})
    pooled = f"pooled gap change {_ci(c.get('control_mean'), c.get('control_ci_lo'), c.get('control_ci_hi'))}; "
    return [f"| exp 4 ({summary['kind']} pairs): the relation's heads, found on the discovery half, ablated on the "
            f"test half vs random sets of the same layers | {_relation_test(out)} | "
            + pooled + "; ".join(_relation_test(s) for s in control_seed_folders(out)) + " |"]


def main() -> None:
    if len(sys.argv) != 2 or not Path(sys.argv[1]).is_dir():
        sys.exit("usage: python bench/control_table.py OUT  (the folder bench/toy_controls.sh wrote)")
    out = Path(sys.argv[1])
    print("| instrument | toy | random-weights control |")
    print("| --- | --- | --- |")
    attention = experiment_3(out / "corners", "attention",
                             (("unique", CORNERS), ("shared", CORNERS), ("top4_mean", ("topleft",))))
    patching = experiment_3(out / "corners_patching", "patching", (("unique", CORNERS), ("top-4", CORNERS)))
    for line in (experiment_1(out / "exp1") + experiment_2(out / "exp2") + attention + patching
                 + experiment_4(out / "exp4")):
        print(line)


if __name__ == "__main__":
    main()
