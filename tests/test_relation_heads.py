"""Experiment 4 (relation_heads.py): its pairs are true and false as built, discovery and test never share a pair,
a rerun resumes and one with other settings is refused, and the random-weights control ablates the model's own
heads."""
from __future__ import annotations

import json

import numpy as np
import pytest

from spatial_attention.data.generate import generate_shapeworld
from spatial_attention.data.shapeworld import FLIPPED_RELATION, RELATION_AXIS, Skipped, iter_worlds, parse_caption
from spatial_attention.experiments import relation_heads
from spatial_attention.experiments.relation_heads import RelationPair, main


@pytest.fixture(scope="module")
def worlds_dir(tmp_path_factory):
    return generate_shapeworld(tmp_path_factory.mktemp("sw") / "sw", shards=1, worlds_per_shard=12, seed=5)


def test_pairs_are_the_caption_against_its_swap_or_its_mirror(worlds_dir):
    worlds = [w for w in iter_worlds(worlds_dir) if not isinstance(w, Skipped)]
    for world in worlds:
        texts, images = RelationPair(world, "swap").inputs("Q: {caption}")
        caption, swapped = parse_caption(texts[0][3:]), parse_caption(texts[1][3:])
        assert texts[0] == f"Q: {world.caption.text}" and swapped.relation == FLIPPED_RELATION[caption.relation]
        assert (swapped.color1, swapped.shape1, swapped.color2, swapped.shape2) == \
            (caption.color1, caption.shape1, caption.color2, caption.shape2)
        assert np.array_equal(np.asarray(images[0]), np.asarray(images[1]))
        texts, images = RelationPair(world, "mirror").inputs("{caption}")
        assert texts == [world.caption.text] * 2
        pixels, mirrored = np.asarray(images[0]), np.asarray(images[1])
        axis = 1 if RELATION_AXIS[world.caption.relation] == "x" else 0
        assert np.array_equal(np.flip(pixels, axis=axis), mirrored)


def refused(argv, capsys) -> str:
    """The one line a refused command prints (exit status 2)."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def _argv(worlds_dir, out, *extra):
    return ["--model", "llava", "--model-path", "tiny-random", "--data", str(worlds_dir), "--out", str(out),
            "--random-sets", "5", *extra]


def test_discovery_and_test_halves_resume_and_refuse_other_settings(worlds_dir, tmp_path, capsys):
    """--alpha 0.99 chooses heads on tiny-random's noise, so that the test half runs: its pairs are the other half,
    a rerun does nothing again, and another --kind or --positions is refused before the model loads."""
    out = tmp_path / "out"
    main(_argv(worlds_dir, out, "--alpha", "0.99"))
    summary = json.loads((out / "summary.json").read_text())
    discovery = [json.loads(line)["id"] for line in (out / relation_heads.DISCOVERY_FILE).read_text().splitlines()]
    test = [json.loads(line)["id"] for line in (out / relation_heads.TEST_FILE).read_text().splitlines()]
    assert len(discovery) == len(test) == 6 and not set(discovery) & set(test)
    assert summary["pairs"] == {"discovery": 6, "test": 6} and 1 <= len(summary["chosen_heads"]) <= 4
    assert summary["test"]["random_sets"] == 5 and np.load(out / "scores_true_LHN.npy").shape[-1] == 6
    chosen = [line for line in (out / "heads.csv").read_text().splitlines()[1:] if line.endswith(",1")]
    assert len(chosen) == len(summary["chosen_heads"])
    assert (out / "figures" / "head_shares.png").is_file() and (out / "figures" / "effect_vs_random.png").is_file()
    before = {p: p.stat().st_mtime_ns for p in (out / relation_heads.DISCOVERY_FILE, out / relation_heads.TEST_FILE)}
    main(_argv(worlds_dir, out, "--alpha", "0.99"))
    assert {p: p.stat().st_mtime_ns for p in before} == before  # nothing appended: every pair was done
    for extra, option in ((["--kind", "mirror"], "--kind"), (["--positions", "all"], "--positions")):
        assert f"were made with {option}" in refused(_argv(worlds_dir, out, "--alpha", "0.99", *extra), capsys)


def test_a_refused_run_leaves_nothing_behind(worlds_dir, tmp_path, capsys):
    """Refused once the model is known (--layers beyond its depth). Was: --out was left holding discovery/.lock and
    test/.lock."""
    out = tmp_path / "out"
    assert "--layers '99'" in refused(_argv(worlds_dir, out, "--layers", "99"), capsys)
    assert not out.exists()


def test_where_no_head_is_chosen_a_rerun_with_other_test_settings_is_refused(worlds_dir, tmp_path, capsys):
    """tiny-random carries no gap: no head is chosen and no test pair runs, yet the summary was made with the test's
    settings. Was: a rerun with another --positions, --random-sets, --alpha or --max-heads was accepted and rewrote
    summary.json and run.json."""
    out = tmp_path / "out"
    main(_argv(worlds_dir, out))
    assert json.loads((out / "summary.json").read_text())["chosen_heads"] == []
    before = {name: (out / name).read_bytes() for name in ("summary.json", "run.json")}
    for option, value in (("--positions", "all"), ("--random-sets", "7"), ("--alpha", "0.01"), ("--max-heads", "2")):
        assert f"were made with {option}" in refused(_argv(worlds_dir, out, option, value), capsys)
    assert {name: (out / name).read_bytes() for name in before} == before
    main(_argv(worlds_dir, out))  # the same command is still taken


def test_control_ablates_the_model_s_heads_and_needs_them(worlds_dir, tmp_path, capsys):
    """Without the model's run, the control says so (was: "summary.json has no chosen heads", of a file that was not
    there)."""
    out = tmp_path / "out"
    line = refused(_argv(worlds_dir, out, "--control", "random-weights", "--control-seeds", "1"), capsys)
    assert line == (f"error: --control: the model's own run is missing (no {out / 'summary.json'}); run the same "
                    "command without --control first, so that the control ablates the model's heads in random "
                    "initialisations")
    main(_argv(worlds_dir, out, "--alpha", "0.99"))
    main(_argv(worlds_dir, out, "--alpha", "0.99", "--control", "random-weights", "--control-seeds", "1"))
    model = json.loads((out / "summary.json").read_text())
    seed = json.loads((out / "control_random_weights" / "init_seed_1000" / "summary.json").read_text())
    assert seed["chosen_heads"] == model["chosen_heads"] and seed["chosen_by"] == "the model's own run"
    rows = {r["metric"]: r for r in json.loads((out / "control_comparison.json").read_text())["rows"]}
    assert rows["gap_change"]["n_seeds"] == 1 and rows["gap_change"]["n_paired"] == 6


@pytest.mark.parametrize("argv, message", [
    (["--prompt", "Is it true?"], "must contain '{caption}'"),
    (["--prompt", "{caption} {other}"], "only '{caption}' may stand in braces"),
    (["--alpha", "1"], "--alpha 1.0: must lie strictly between 0 and 1"),
    (["--max-heads", "0"], "--max-heads"),
])
def test_bad_options_are_one_line_before_any_load(worlds_dir, tmp_path, argv, message, no_model_load, capsys):
    assert message in refused(_argv(worlds_dir, tmp_path / "out", *argv), capsys)


def _simulated_discovery(carried: dict, n_pairs: int = 50, seed: int = 0):
    """A 7B-sized discovery (32 layers x 32 heads, ``n_pairs`` pairs): gaps around 4 log-odds; each head's swap
    effect on the true input is noise (sd 0.3) plus, for the heads in ``carried``, that share of the pair's
    gap; on the false input, noise."""
    rng = np.random.default_rng(seed)
    gap = rng.normal(4.0, 1.0, n_pairs)
    true = rng.normal(0.0, 0.3, (32, 32, n_pairs))
    false = rng.normal(0.0, 0.3, (32, 32, n_pairs))
    for (layer, head), share in carried.items():
        true[layer, head] += share * gap
    return true, false, gap


def test_the_heads_that_carry_the_gap_are_chosen_and_no_other():
    """Planted: three heads carry 30%, 20% and 10% of the gap among 1,024 (50 discovery pairs): all three are
    chosen, largest first, and no other; a head that works against the gap is significant but not chosen."""
    carried = {(20, 5): 0.3, (14, 31): 0.2, (3, 0): 0.1, (9, 9): -0.2}
    true, false, gap = _simulated_discovery(carried)
    _, ranking = relation_heads.choose_heads(true, false, gap, 0.05, 4, 0, list(range(1, 33)))
    assert [(h["layer"] - 1, h["head"]) for h in ranking["chosen"]] == [(20, 5), (14, 31), (3, 0)]
    assert ranking["chosen"][0]["share_of_gap"] == pytest.approx(0.3, abs=0.05)
    assert ranking["n_significant"] >= 4 and ranking["n_carriers"] == 3


def test_no_head_is_chosen_where_none_carries_the_gap():
    true, false, gap = _simulated_discovery({})
    _, ranking = relation_heads.choose_heads(true, false, gap, 0.05, 4, 0, list(range(1, 33)))
    assert ranking["chosen"] == []
