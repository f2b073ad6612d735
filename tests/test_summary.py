"""Experiment 1's summary (means, nulls, pairing, CSV/JSON) and its figures."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from spatial_attention.experiments.summary import (add_q_values, plot_summary, significance_star, summarise_samples,
                                                   write_summary)
from spatial_attention.run.figures import mask_outline, plot_world_panel


def _world(index, relation, com, iou, rel_w, shuffled=None):
    rec = {"shard": 0, "index": index, "relation": relation, "axis": "x" if relation in ("left", "right") else "y",
           "metrics": {"real": {"subject_cross": {"com": com, "iou": iou},
                                "relation_cross": {"relation_wasserstein": rel_w}}}}
    if shuffled is not None:
        s_com, s_iou, s_rel_w = shuffled
        rec["metrics"]["shuffled"] = {"subject_cross": {"com": s_com, "iou": s_iou},
                                      "relation_cross": {"relation_wasserstein": s_rel_w}}
    return rec


RECORDS = [
    _world(0, "left", 1.0, 0.5, 2.0, shuffled=(3.0, 0.1, 4.0)),
    _world(1, "left", 2.0, None, None, shuffled=(2.5, 0.2, float("nan"))),
    _world(2, "above", 4.0, 0.3, 1.0),  # run without a baseline for this world
    _world(3, "above", 0.5, 0.7, 3.0, shuffled=(1.5, 0.7, 2.0)),
]


@pytest.fixture(scope="module")
def summary():
    return summarise_samples(iter(RECORDS), seed=0, n_boot=200, n_perm=200)


def _row(rows, map_name, metric):
    (row,) = [r for r in rows if r["map"] == map_name and r["metric"] == metric]
    return row


def test_means_counts_and_nulls(summary):
    assert summary["n_worlds"] == 4 and summary["n_worlds_shuffled"] == 3
    assert summary["n_worlds_by_relation"] == {"left": 2, "above": 2}
    com = _row(summary["by_metric"], "subject_cross", "com")
    assert com["better"] == "lower" and com["n"] == 4 and com["n_null"] == 0 and com["n_paired"] == 3
    assert com["real_mean"] == pytest.approx(1.875)
    assert com["shuffled_mean"] == pytest.approx(7 / 3)
    iou = _row(summary["by_metric"], "subject_cross", "iou")
    assert iou["better"] == "higher" and iou["n"] == 3 and iou["n_null"] == 1 and iou["n_paired"] == 2
    assert iou["real_mean"] == pytest.approx(0.5)
    rel = _row(summary["by_metric"], "relation_cross", "relation_wasserstein")
    assert rel["n_null"] == 1 and rel["n_null_shuffled"] == 1 and rel["n_paired"] == 2


def test_paired_difference_over_paired_worlds(summary):
    com = _row(summary["by_metric"], "subject_cross", "com")
    assert com["mean_diff"] == pytest.approx(np.mean([1.0 - 3.0, 2.0 - 2.5, 0.5 - 1.5]))
    assert com["ci_lo"] <= com["mean_diff"] <= com["ci_hi"]
    assert 0.0 < com["p_value"] <= 1.0
    iou = _row(summary["by_metric"], "subject_cross", "iou")
    assert iou["mean_diff"] == pytest.approx(np.mean([0.5 - 0.1, 0.7 - 0.7]))
    rel = _row(summary["by_metric"], "relation_cross", "relation_wasserstein")
    assert rel["mean_diff"] == pytest.approx(np.mean([2.0 - 4.0, 3.0 - 2.0]))


def test_by_relation_grouping(summary):
    assert list(summary["by_relation"]) == ["left", "above"]  # fixed relation order
    left = _row(summary["by_relation"]["left"], "subject_cross", "com")
    above = _row(summary["by_relation"]["above"], "subject_cross", "com")
    assert left["n"] == 2 and left["real_mean"] == pytest.approx(1.5)
    assert above["n"] == 2 and above["real_mean"] == pytest.approx(2.25) and above["n_paired"] == 1
    assert above["mean_diff"] == pytest.approx(-1.0)


def test_q_values_within_each_scope(summary):
    # exact sign-flip p-values (at most 3 pairs, n_perm 200 >= 2^3). All worlds: com's diffs
    # [-2, -0.5, -1] reach |sum| 3.5 only with all signs equal -> 2/8; iou [0.4, 0] and
    # relation_wasserstein [-2, 1]: every sign vector reaches the observed |sum| -> 1.
    # BH over m = 3: sorted p * 3 / rank = 0.75, 1.5, 1 -> running min from the top, capped at 1
    rows = summary["by_metric"]
    assert [r["p_value"] for r in rows] == [0.25, 1.0, 1.0]
    assert [r["q_value"] for r in rows] == [0.75, 1.0, 1.0]
    # pooled over the 9 rows of all three scopes, com's q would be min(1, 0.25 * 9) = 1, not 0.75.
    # "left" on its own: com [-2, -0.5] -> 2/4; iou [0.4] and relation_wasserstein [-2], one pair each -> 1;
    # BH over m = 3: 0.5 * 3 / 1 = 1.5, then 1.5 and 1 -> all 1
    left = summary["by_relation"]["left"]
    assert [r["p_value"] for r in left] == [0.5, 1.0, 1.0]
    assert [r["q_value"] for r in left] == [1.0, 1.0, 1.0]


def test_add_q_values_planted_p():
    # p sorted: .005 (rank 1), .01 (2), .03 (3), .04 (4); m = 4 (None is no test)
    # p * m / rank = .02, .02, .04, .04; running min from the top leaves them
    rows = add_q_values([{"p_value": p} for p in (0.01, 0.04, None, 0.03, 0.005)])
    assert [r["q_value"] for r in rows] == pytest.approx([0.02, 0.04, None, 0.04, 0.02])


def test_star_by_q_not_p():
    assert significance_star({"p_value": 0.001, "q_value": 0.049}) == "*"
    assert significance_star({"p_value": 0.01, "q_value": 0.2}) == ""   # p < 0.05, but not after BH
    assert significance_star({"p_value": None, "q_value": None}) == ""


def test_without_baseline_paired_fields_are_null():
    s = summarise_samples([_world(0, "left", 1.0, 0.5, 2.0), _world(1, "right", 2.0, 0.4, None)],
                          n_boot=50, n_perm=50)
    com = _row(s["by_metric"], "subject_cross", "com")
    assert com["real_mean"] == pytest.approx(1.5) and com["n_paired"] == 0
    assert all(com[k] is None for k in ("shuffled_mean", "mean_diff", "ci_lo", "ci_hi", "p_value", "q_value"))


def test_written_files(summary, tmp_path):
    write_summary(tmp_path, summary, {"skipped": {"count": 1, "reasons": {"bad image": 1}}})

    def no_nan(name):
        raise ValueError(f"non-JSON constant {name}")

    data = json.loads((tmp_path / "summary.json").read_text(), parse_constant=no_nan)
    assert data["skipped"]["count"] == 1 and data["n_worlds"] == 4
    assert [r["q_value"] for r in data["by_metric"]] == [0.75, 1.0, 1.0]
    with open(tmp_path / "summary.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0][:4] == ["map", "metric", "relation", "better"] and rows[0][-2:] == ["p_value", "q_value"]
    assert [r[-1] for r in rows[1:4]] == ["0.75", "1.0", "1.0"]
    assert len(rows) == 1 + 3 * 3  # header + 3 map/metric rows for each of all, left, above
    assert {r[2] for r in rows[1:]} == {"all", "left", "above"}
    with pytest.raises(ValueError):
        write_summary(tmp_path, summary, {"n_worlds": 5})


def _png_ok(path):
    assert path.stat().st_size > 1000
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 100


def test_plot_summary(summary, tmp_path):
    plot_summary(summary, tmp_path)
    _png_ok(tmp_path / "real_vs_shuffled.png")
    _png_ok(tmp_path / "metric_by_relation.png")


def test_mask_outline_is_the_cell_boundary():
    mask = np.zeros((4, 4), bool)
    mask[1:3, 1:2] = True  # a 2x1 column: perimeter 2 + 2 + 1 + 1
    assert len(mask_outline(mask)) == 6


def test_world_panel(tmp_path):
    rng = np.random.default_rng(0)
    image = Image.fromarray((rng.random((96, 96, 3)) * 255).astype("uint8"))
    subject, obj = np.zeros((6, 6), bool), np.zeros((6, 6), bool)
    subject[1:3, 0:2] = True
    obj[3:5, 3:6] = True
    maps = {"object_cross": rng.random((6, 6)), "subject_cross": rng.random((6, 6)), "relation_cross": None}
    plot_world_panel(tmp_path / "w.png", image, maps, subject, obj, "world 0: red circle left of blue square")
    _png_ok(tmp_path / "w.png")
    plot_world_panel(tmp_path / "w2.png", image, maps, subject, obj, "with baseline",
                     shuffled_maps={k: rng.random((6, 6)) for k in maps}, shuffled_image=image.rotate(90))
    _png_ok(tmp_path / "w2.png")


def test_rows_equal_each_row_alone():
    """The summary draws every row's intervals and tests together: each row must hold what it would alone (nulls,
    worlds without a shuffled value, a binding metric's own test), over every scope."""
    from spatial_attention.stats.inference import bootstrap_ci, mean_std, paired_permutation_p

    rng = np.random.default_rng(2)
    records = []
    for index in range(60):
        real = {"subject_cross": {"iou": float(rng.uniform()), "specificity_word_swap": float(rng.normal(0.1))},
                "object_cross": {"iou": None if index % 7 == 0 else float(rng.uniform())}}
        shuffled = {"subject_cross": {"iou": float(rng.uniform()), "specificity_word_swap": float(rng.normal())},
                    "object_cross": {"iou": None if index % 5 == 0 else float(rng.uniform())}}
        records.append({"shard": 0, "index": index, "relation": ("left", "right", "above")[index % 3],
                        "metrics": {"real": real, **({"shuffled": shuffled} if index % 4 else {})}})
    summary = summarise_samples(records, seed=4, n_boot=300, n_perm=3000)
    scopes = [(None, summary["by_metric"])] + list(summary["by_relation"].items())
    for relation, rows in scopes:
        assert len(rows) == 3
        for row in rows:
            # in the summary's order: all worlds are its relations' worlds one relation after another
            chosen = [r for rel in summary["by_relation"] for r in records if rel == r["relation"] and
                      relation in (None, rel)]
            real = np.array([np.nan if (v := r["metrics"]["real"][row["map"]][row["metric"]]) is None else v
                             for r in chosen])
            shuf = np.array([np.nan if "shuffled" not in r["metrics"] or (v := r["metrics"]["shuffled"][row["map"]][
                row["metric"]]) is None else v for r in chosen])
            both = np.isfinite(real) & np.isfinite(shuf)
            diff = real[both] - shuf[both]
            assert (row["n"], row["real_mean"], row["real_std"]) == mean_std(real)
            assert (row["real_ci_lo"], row["real_ci_hi"]) == bootstrap_ci(real, n_boot=300, seed=4)
            assert (row["shuffled_ci_lo"], row["shuffled_ci_hi"]) == bootstrap_ci(shuf, n_boot=300, seed=4)
            assert row["n_paired"] == int(both.sum()) and row["mean_diff"] == float(diff.mean())
            assert (row["ci_lo"], row["ci_hi"]) == bootstrap_ci(diff, n_boot=300, seed=4)
            assert row["p_value"] == paired_permutation_p(diff, n_perm=3000, seed=4)
            binding = row["metric"] == "specificity_word_swap"
            assert row["real_p_value"] == (paired_permutation_p(real, n_perm=3000, seed=4) if binding else None)
