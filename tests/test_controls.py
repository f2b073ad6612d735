"""The random-weights control: its statistics (planted effects and nulls) and its runs end to end."""
from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from conftest import require_toy
from scipy.stats import t as scipy_t

from models.base import CONTROL_INITIALISATION
from spatial_attention.common.errors import OptionError
from spatial_attention.run import controls
from spatial_attention.stats.inference import against_initialisations, bootstrap_ci, hierarchical_bootstrap_ci
from spatial_attention.study import report_readings


def test_hierarchical_interval_widens_with_the_spread_between_seeds():
    """Three initialisations with their own biases (-0.5, 0, +0.5) and 200 worlds each: the flat bootstrap
    over all 600 values calls the mean 0 +- a little; the hierarchical one sees that a fourth seed could
    move it by far more."""
    rng = np.random.default_rng(0)
    values = np.array([-0.5, 0.0, 0.5])[:, None] + rng.normal(0, 0.1, size=(3, 200))
    flat_lo, flat_hi = bootstrap_ci(values.ravel(), n_boot=1000)
    lo, hi = hierarchical_bootstrap_ci(values, n_boot=1000)
    assert lo < 0 < hi
    assert (hi - lo) > 5 * (flat_hi - flat_lo)


def test_hierarchical_interval_finds_a_planted_effect_and_passes_a_null():
    """3 seeds x 100 pairs, per-pair sd 1: an effect of 0.4 is found in nearly every draw, a null is
    called in about 5% (at most 4 of 40 draws here)."""
    found = false_alarms = 0
    for draw in range(40):
        rng = np.random.default_rng(draw)
        noise = rng.normal(0, 1, size=(3, 100)) + rng.normal(0, 0.05, size=(3, 1))  # a small seed bias
        lo, _ = hierarchical_bootstrap_ci(noise + 0.4, n_boot=400, seed=draw)
        found += lo > 0
        lo, hi = hierarchical_bootstrap_ci(noise, n_boot=400, seed=draw)
        false_alarms += not lo < 0 < hi
    assert found >= 38
    assert false_alarms <= 4


def test_hierarchical_interval_skips_missing_values_and_needs_two():
    values = np.array([[1.0, np.nan, 3.0], [np.nan, 2.0, np.nan]])
    lo, hi = hierarchical_bootstrap_ci(values, n_boot=200)
    assert 1.0 <= lo <= hi <= 3.0
    assert hierarchical_bootstrap_ci(np.array([[1.0, np.nan]])) == (None, None)
    with pytest.raises(ValueError):
        hierarchical_bootstrap_ci(np.zeros(4))


def _initialisation(rng, shared, shift=0.0):
    """One draw of a random initialisation's per-item values: the items' own part, a bias of the draw as large
    as the items' spread (seeds as variable as items), and noise."""
    return {"m": {i: v + shift + rng.normal(0, 1) + e for i, (v, e) in enumerate(zip(shared, rng.normal(0, 1, 60)))}}


def _beyond(row: dict) -> bool:
    """The report's reading of one comparison row, a family of one (q = p): beyond random weights, above."""
    verdicts = []

    class Collect:
        def verdict(self, claim, test, **fields):
            verdicts.append(report_readings.Verdict(claim, test, **fields))
            return verdicts[-1]

    said = report_readings.beyond_verdict(Collect(), "m", row["model_mean"], row["seed_means"], 1)
    report_readings.decide(verdicts)
    return said.text().startswith("yes")


def test_a_model_that_is_one_more_initialisation_reads_beyond_random_weights_at_most_5_percent():
    """400 draws, 60 items, 19 initialisations, the "model" a 20th: the report reads "beyond random weights" in
    at most 5% + 2 Monte Carlo standard errors (7.2%). The old rule (the hierarchical interval of the
    model-minus-control difference, resampling the seeds) read it in 46% of such draws. A model 4 seed-sds away
    is found in at least 90%."""
    false = found = 0
    draws = 400
    for draw in range(draws):
        rng = np.random.default_rng(draw)
        shared = rng.normal(0, 1, 60)
        control = [_initialisation(rng, shared) for _ in range(controls.DEFAULT_SEEDS)]
        row, = controls.compare(_initialisation(rng, shared), control, n_boot=2)
        false += _beyond(row)
        if draw < 100:
            row, = controls.compare(_initialisation(rng, shared, shift=4.0), control, n_boot=2)
            found += _beyond(row)
    assert false / draws <= 0.05 + 2 * (0.05 * 0.95 / draws) ** 0.5, false
    assert found >= 90, found


def test_compare_sets_the_model_against_the_seeds_and_pairs_by_item():
    rng = np.random.default_rng(1)
    shared = rng.normal(0, 1, 60)
    control = [_initialisation(rng, shared) for _ in range(19)]
    model = _initialisation(rng, shared, shift=6.0)
    model["m"] = {i: v for i, v in model["m"].items() if i < 40}  # fewer items: only the common ones are paired
    row, = controls.compare(model, control, n_boot=50)
    assert row["n_items"] == 60 and row["n_seeds"] == 19 and row["n_paired"] == 40 and len(row["seed_means"]) == 19
    seed_means = [np.mean([t["m"][i] for i in range(40)]) for t in control]
    assert row["seed_means"] == pytest.approx(seed_means)
    assert row["diff_mean"] == pytest.approx(np.mean([model["m"][i] for i in range(40)]) - np.mean(seed_means))
    assert row["rank_p_above"] == pytest.approx(1 / 20) and row["rank_p_below"] == 1.0
    assert row["diff_pi_lo"] > 0 and row["pred_p_above"] < 1e-3
    row, = controls.compare({}, control, n_boot=200)  # no model results: the control alone
    assert "diff_mean" not in row and row["control_ci_lo"] < row["control_mean"] < row["control_ci_hi"]


def test_the_prediction_interval_is_the_t_interval_by_hand():
    seeds = [0.1, 0.4, -0.2, 0.3, 0.0]
    got = against_initialisations(0.5, seeds)
    half = 2.7764451051977987 * np.std(seeds, ddof=1) * np.sqrt(1 + 1 / 5)  # t(4, 0.975)
    assert got["diff"] == pytest.approx(0.5 - np.mean(seeds))
    assert (got["diff_pi_lo"], got["diff_pi_hi"]) == pytest.approx((got["diff"] - half, got["diff"] + half))
    assert got["rank_p_above"] == pytest.approx(1 / 6) and got["rank_p_below"] == 1.0
    assert got["pred_p_above"] + got["pred_p_below"] == pytest.approx(1.0)
    t = (0.5 - np.mean(seeds)) / (np.std(seeds, ddof=1) * np.sqrt(1 + 1 / 5))
    assert got["pred_p_above"] == pytest.approx(scipy_t.sf(t, 4))  # K - 1 = 4 degrees of freedom, not K or normal
    assert against_initialisations(0.5, [0.2])["diff_pi_lo"] is None  # one seed: no spread to predict from
    ties = against_initialisations(0.3, [0.3, 0.1, 0.3, 0.5])  # seeds equal to the model count against it
    assert ties["rank_p_above"] == pytest.approx(4 / 5) and ties["rank_p_below"] == pytest.approx(4 / 5)
    flat = against_initialisations(1.0, [0.0] * 19)  # no spread: the rank p, not a p of 0 from t = infinity
    assert flat["pred_p_above"] == flat["rank_p_above"] == pytest.approx(1 / 20) and flat["pred_p_below"] == 1.0


def test_seed_options_and_counterparts(tmp_path):
    class Args:
        control, control_seeds = "random-weights", 2

    assert list(controls.init_seeds(Args)) == [controls.INIT_SEED_BASE, controls.INIT_SEED_BASE + 1]
    Args.control_seeds = 0
    with pytest.raises(OptionError, match="--control-seeds"):
        controls.init_seeds(Args)
    Args.control_seeds = 100_000_000  # refused in one line before anything is built (it grew to 4.7 GB before)
    with pytest.raises(OptionError, match="--control-seeds 100000000: at most 1000 "):
        controls.init_seeds(Args)
    Args.control_seeds = None
    assert len(controls.init_seeds(Args)) == controls.DEFAULT_SEEDS
    Args.control = None
    assert controls.init_seeds(Args) is None
    Args.control_seeds = 2
    with pytest.raises(OptionError, match="--control-seeds 2: only means something with --control"):
        controls.init_seeds(Args)  # would be silently ignored
    # a stats dir's counterpart: its own seed folder, or its sibling's (one folder per corner under a parent)
    own = controls.seed_folder(tmp_path / "stats", 1000)
    own.mkdir(parents=True)
    assert controls.counterpart(tmp_path / "stats", 1000, "--stats-dir") == own
    sibling = controls.seed_folder(tmp_path, 1001) / "head_diff_stats_topleft"
    sibling.mkdir(parents=True)
    assert controls.counterpart(tmp_path / "head_diff_stats_topleft", 1001, "--stats-dir") == sibling
    with pytest.raises(OptionError, match="--stats-dir .*--control random-weights"):
        controls.counterpart(tmp_path / "head_diff_stats_topright", 1001, "--stats-dir")


def test_experiment_1_control_runs_each_seed_and_compares(tmp_path, capsys):
    """The model, then its control with two initialisations: one folder each, identities that say so,
    and the comparison in the model's summary."""
    from spatial_attention.data.generate import generate_shapeworld
    from spatial_attention.experiments.vlm_analysis import main

    data = generate_shapeworld(tmp_path / "sw", shards=1, worlds_per_shard=3, seed=2)
    out = tmp_path / "out"
    common = ["--model-path", "tiny-random", "--plot-samples", "0", "--data", str(data), "--out", str(out)]
    main("llava", common)
    main("llava", common + ["--control", "random-weights", "--control-seeds", "2"])
    folders = controls.control_seed_folders(out)
    assert [f.name for f in folders] == ["init_seed_1000", "init_seed_1001"]
    model_records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    for folder, seed in zip(folders, (1000, 1001)):
        identity = json.loads((folder / "identity.json").read_text())
        assert identity["--control"] == "random-weights" and identity["initialisation seed"] == seed
        records = [json.loads(line) for line in (folder / "samples.jsonl").read_text().splitlines()]
        assert len(records) == 3
        assert records[0]["metrics"] != model_records[0]["metrics"]  # other weights, other attention
    # an initialisation drawn before the controls' weights came from transformers' init is not resumed into
    drawn_before = folders[0] / "identity.json"
    identity = json.loads(drawn_before.read_text())
    del identity["initialisation"]
    drawn_before.write_text(json.dumps(identity))
    capsys.readouterr()
    with pytest.raises(SystemExit) as refused:
        main("llava", common + ["--control", "random-weights", "--control-seeds", "2"])
    assert refused.value.code == 2 and "does not record initialisation" in capsys.readouterr().err
    drawn_before.write_text(json.dumps({**identity, "initialisation": CONTROL_INITIALISATION}))
    rows = list(csv.DictReader((out / "control_comparison.csv").open()))
    by_metric = {row["metric"]: row for row in rows}
    row = by_metric["subject_cross/iou"]
    assert row["n_seeds"] == "2" and row["n_paired"] == "3" and row["diff_mean"] != ""
    assert "subject_cross/specificity_iou" in by_metric and "subject_cross/iou real-shuffled" in by_metric
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model_minus_control"]["rows"] and summary["n_worlds"] == 3
    # a rerun of the control resumes: nothing is redone, nothing refused
    main("llava", common + ["--control", "random-weights", "--control-seeds", "2"])


def test_a_control_seed_count_beyond_reason_stops_the_command_at_once(tmp_path, capsys, no_model_load):
    from spatial_attention.experiments.vlm_analysis import main

    with pytest.raises(SystemExit) as exit_info:
        main("llava", ["--model-path", "tiny-random", "--data", str(tmp_path / "worlds"), "--out", str(tmp_path / "out"),
                       "--control", "random-weights", "--control-seeds", "100000000"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and err.startswith("error: --control-seeds 100000000: at most 1000 ")
    assert "\n" not in err and not (tmp_path / "worlds").exists()  # before any data is generated


def test_experiment_2_control_for_qwen2(tmp_path, caplog):
    from spatial_attention.data.generate import generate_shapeworld
    from spatial_attention.experiments.text_analysis import main

    data = generate_shapeworld(tmp_path / "sw", shards=1, worlds_per_shard=3, seed=3)
    out = tmp_path / "out"
    common = ["--model-path", "tiny-random", "--data", str(data), "--out", str(out)]
    with caplog.at_level(logging.INFO, logger="spatial_attention"):
        main("qwen2", common + ["--control", "random-weights", "--control-seeds", "2"])  # the control first
    assert (out / "control_comparison.csv").is_file() and not (out / "summary.json").exists()
    said = caplog.text  # no model results yet: nothing was compared with the model, and the log says so
    assert "compared with the model" not in said and "no results of the model" in said
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="spatial_attention"):
        main("qwen2", common)  # then the model: its summary gets the comparison
    assert "random-weights control (2 seeds) compared with the model" in caplog.text
    summary = json.loads((out / "summary.json").read_text())
    rows = {row["metric"]: row for row in summary["model_minus_control"]["rows"]}
    assert set(rows) == {"asym_s1", "asym_s2", "symmetry_score", "abs_symmetry_score"}
    assert rows["asym_s1"]["n_seeds"] == 2 and rows["asym_s1"]["n_paired"] == 3


def test_sweep_control_runs_every_step_per_initialisation(tiny_study):
    """CONTROL=random-weights beside a sweep (the study's corners-control step, CONTROL_SEEDS=1,
    RANDOM_CONTROLS=2): each initialisation gets the corners, the analysis and the ablations of its own heads,
    and each corner's and ablation's folder the comparison."""
    from spatial_attention.data.counterfactual import CORNERS

    assert json.loads((tiny_study["out"] / "steps" / "llava-corners-control.json").read_text())["status"] == "ok"
    out = tiny_study["out"] / "llava" / "corners"
    seed, = controls.control_seed_folders(out)
    assert seed.name == "init_seed_1000"
    assert (seed / "count_shared_unique" / "summary.json").is_file()
    for corner in CORNERS:
        assert (seed / f"head_diff_stats_{corner}" / "meta.json").is_file()
        rows = list(csv.DictReader((out / f"head_diff_stats_{corner}" / "control_comparison.csv").open()))
        assert {row["metric"] for row in rows} >= {"full_answer_yes", "head_score_diff_max"}
        for heads in ("unique", "shared"):  # an ablation's control lies in its own out-dir, as every command's
            control_out = controls.seed_folder(out / f"ablation_{corner}_{heads}", 1000)
            control_summary = json.loads((control_out / "summary.json").read_text())
            assert control_summary["random_controls"]["count"] == 2
            identity = json.loads((control_out / "identity.json").read_text())
            assert identity["initialisation seed"] == 1000
            comparison = json.loads((out / f"ablation_{corner}_{heads}" / "summary.json").read_text())
            assert {row["metric"] for row in comparison["model_minus_control"]["rows"]} >= {"effect_log_odds_full"}


def test_random_weights_binding_specificity_stays_near_zero(tmp_path):
    """The negative control's outcome held in place: experiment 1 on two random initialisations of the LLaVA
    toy's architecture, where each binding specificity's interval covers 0, or its size is under a tenth of
    the same run's real-minus-shuffled difference (docs/controls.md; bench/toy_controls.sh gives the table)."""
    from spatial_attention.data.generate import generate_shapeworld
    from spatial_attention.experiments.vlm_analysis import main

    require_toy("llava")

    data = generate_shapeworld(tmp_path / "sw", shards=1, worlds_per_shard=60, seed=5)
    out = tmp_path / "out"
    main("llava", ["--model-path", "toy", "--data", str(data), "--out", str(out), "--plot-samples", "0",
                  "--batch-size", "16", "--control", "random-weights", "--control-seeds", "2"])
    rows = {row["metric"]: row for row in json.loads((out / "control_comparison.json").read_text())["rows"]}
    for map_name in ("subject_cross", "object_cross"):
        for metric in ("iou", "soft_iou", "com"):
            row = rows[f"{map_name}/specificity_{metric}"]
            shuffle = rows[f"{map_name}/{metric} real-shuffled"]["control_mean"]
            covers = row["control_ci_lo"] <= 0 <= row["control_ci_hi"]
            assert covers or abs(row["control_mean"]) < abs(shuffle) / 10, (map_name, metric, row, shuffle)


def test_patching_finds_the_toy_s_causal_corner_heads_and_not_random_weights(tmp_path):
    """The positive and negative control of experiment 3 + the ablation, held in place (docs/controls.md): on
    the LLaVA toy, --score patching finds significant heads in every corner (on the discovery half of the
    pairs), and mean-ablating a corner's top 4 at the answer position (on the held-out test half) lowers the full
    images' log-odds more than 100 random sets of the same layers (p_drop <= 0.05) and abolishes the yes/no gap; the paper's attention score picks heads whose ablation
    barely moves the gap; on a random initialisation the found heads carry nothing (the gap is ~0 to begin
    with and ablating them leaves it there)."""
    from spatial_attention.data.counterfactual import CORNERS
    from spatial_attention.data.generate import generate_counterfactual
    from spatial_attention.experiments import ablation, corner_analysis, corner_stats

    require_toy("llava")
    folders = dict(zip(CORNERS, generate_counterfactual(tmp_path / "data", count=16, seed=31)))  # 8 + 8
    model = ["--model", "llava", "--model-path", "toy", "--device", "cpu", "--dtype", "fp32", "--batch-size", "12"]
    control = ["--control", "random-weights", "--control-seeds", "1"]
    corner = "bottomleft"

    def found_and_ablated(score: str, extra: list[str], corners: list[str]) -> tuple[Path, dict]:
        """Experiment 3 with ``score`` on ``corners``, then the corner's top 4 ablated; the stats root (the
        control's seed folder under --control) and the ablation's metrics."""
        stats = tmp_path / f"{score}{'_control' if extra else ''}"
        corner_stats.main(model + extra + ["--score", score, "--dataset", *(str(folders[c]) for c in corners),
                                           "--pairs", "discovery", "--out-dir", str(stats)])
        out = tmp_path / f"ablation_{stats.name}"
        corner_stats_dir = stats if len(corners) == 1 else stats / f"head_diff_stats_{corner}"
        ablation.main(model + extra + ["--stats-dir", str(corner_stats_dir), "--heads", "top:4", "--mode", "mean",
                                       "--positions", "answer", "--random-controls", "100",
                                       "--dataset", str(folders[corner]), "--out-dir", str(out)])
        if extra:
            stats, out = controls.seed_folder(stats, 1000), controls.seed_folder(out, 1000)
        return stats, json.loads((out / "summary.json").read_text())["metrics"]

    root, toy = found_and_ablated("patching", [], list(CORNERS))
    corner_analysis.main([str(root / f"head_diff_stats_{c}") for c in CORNERS]
                         + ["--out-dir", str(root / "count_shared_unique")])
    significant = json.loads((root / "count_shared_unique" / "summary.json").read_text())["significant_heads"]
    assert all(significant[c] for c in CORNERS), {c: len(s) for c, s in significant.items()}
    assert toy["log_odds_full"]["p_drop"] <= 0.05, toy["log_odds_full"]
    assert toy["gap"]["unablated"] > 5 and toy["gap"]["effect"] < -0.8 * toy["gap"]["unablated"], toy["gap"]

    _, paper = found_and_ablated("attention", [], [corner])
    assert abs(paper["gap"]["effect"]) < 0.5 * abs(toy["gap"]["effect"]), paper["gap"]

    _, random_weights = found_and_ablated("patching", control, [corner])
    gap = random_weights["gap"]
    assert abs(gap["unablated"]) < 0.05 * toy["gap"]["unablated"], gap
    assert abs(gap["effect"]) < 0.05 * toy["gap"]["unablated"], gap
