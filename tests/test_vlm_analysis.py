"""Experiment 1 end to end on the tiny-random models: outputs, resume, saved maps, batching."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from spatial_attention.data.generate import generate_shapeworld
from spatial_attention.experiments.vlm_analysis import main
from spatial_attention.stats import metrics as M
from spatial_attention.stats.metrics import MAPS

FAST = ["--model-path", "tiny-random", "--feed-size", "224", "--plot-samples", "1"]


@pytest.fixture(scope="module")
def two_shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sw")
    generate_shapeworld(root, shards=2, worlds_per_shard=3, seed=1)
    return root


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]


def _no_nan(text: str) -> None:
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-finite JSON constant {c}"))


def _check_outputs(out: Path, n_worlds: int, baseline: bool = True) -> list[dict]:
    records = _records(out)
    assert len(records) == n_worlds
    assert len({(r["shard"], r["index"]) for r in records}) == n_worlds
    for r in records:
        assert {"shard", "index", "image", "caption", "relation", "axis", "subject", "object", "grid",
                "metrics"} <= r.keys()
        assert r["axis"] == ("x" if r["relation"] in ("left", "right") else "y")
        for entity in ("subject", "object"):
            assert set(r[entity]) == {"shape", "color", "bbox", "mask_cells"}
            assert all(0.0 <= v <= 1.0 for v in r[entity]["bbox"])
            assert r[entity]["mask_cells"] > 0
        kinds = ["real", "shuffled"] if baseline else ["real"]
        assert sorted(r["metrics"]) == sorted(kinds)
        for kind in kinds:
            assert set(r["metrics"][kind]) == set(MAPS)
            for name in MAPS:
                assert set(M.METRIC_NAMES) <= set(r["metrics"][kind][name])
            assert "relation_wasserstein" in r["metrics"][kind]["relation_cross"]
            for name in MAPS:  # binding specificity for the maps about one entity, only
                has = set(M.SPECIFICITY_METRICS) <= set(r["metrics"][kind][name])
                assert has == name.startswith(("subject_", "object_")), name
                # the controlled ones: the word swap for the real word maps, distance for the seed maps
                assert (M.WORD_SWAP in r["metrics"][kind][name]) == (has and kind == "real" and "_cross" in name)
                assert (M.DISTANCE_MATCHED in r["metrics"][kind][name]) == (has and "_self_" in name)
    for line in (out / "samples.jsonl").read_text().splitlines():
        _no_nan(line)
    _no_nan((out / "summary.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_worlds"] == n_worlds and summary["by_metric"]
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert rows and {"map", "metric", "real_mean", "shuffled_mean", "mean_diff", "ci_lo", "ci_hi", "p_value"} <= rows[0].keys()
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "finished" and run["model"]["model_path"] == "tiny-random"
    assert set(run["timing"]) == {"items", "forward_seconds", "other_seconds"}  # where the time went
    assert run["timing"]["forward_seconds"] > 0 and run["timing"]["other_seconds"] > 0
    assert {"torch", "transformers", "numpy"} <= run["versions"].keys()
    figures = {p.name for p in (out / "figures").iterdir()}
    assert {"real_vs_shuffled.png", "specificity.png", "metric_by_relation.png"} <= figures
    assert {r["metric"] for r in summary["by_metric"]} >= set(M.SPECIFICITY_METRICS)
    assert any(name.startswith("world_") for name in figures)
    return records


@pytest.mark.parametrize("family", ["llava", "qwen2"])
def test_runs_on_generated_shards(family, two_shards, tmp_path):
    out = tmp_path / "out"
    main(family, [*FAST, "--data", str(two_shards), "--out", str(out), "--save-maps", "--verify-attention"])
    records = _check_outputs(out, 6)
    assert {r["shard"] for r in records} == {0, 1}
    # recompute the cross-map metrics from the saved maps: equal to samples.jsonl
    for r in records:
        saved = np.load(out / "maps" / f"shard{r['shard']}_world{r['index']}.npz")
        subject, obj = saved["subject_mask"].astype(bool), saved["object_mask"].astype(bool)
        subject_only, object_only, background = M.region_masks(subject, obj)
        for kind in ("real", "shuffled"):
            got = M.map_metrics(saved[f"{kind}_subject_cross"].astype(np.float64), subject, subject_only, background)
            want = r["metrics"][kind]["subject_cross"]
            for metric, value in got.items():
                assert (value is None and want[metric] is None) or math.isclose(value, want[metric], rel_tol=1e-5,
                                                                                  abs_tol=1e-6), metric
            g = M.relation_target(*((subject, obj) if M.first_along_axis(r["relation"]) == "subject" else (obj, subject)),
                                  r["axis"])
            rw = None if g is None else M.relation_wasserstein(saved[f"{kind}_relation_cross"].astype(np.float64), g,
                                                               r["axis"])
            want_rw = r["metrics"][kind]["relation_cross"]["relation_wasserstein"]
            assert (rw is None and want_rw is None) or math.isclose(rw, want_rw, rel_tol=1e-5, abs_tol=1e-6)


@pytest.mark.parametrize("family", ["llava", "qwen2"])
def test_runs_on_the_real_sample(family, real_sample, tmp_path):
    out = tmp_path / "out"
    main(family, [*FAST, "--data", str(real_sample), "--out", str(out), "--no-baseline"])
    records = _records(out)
    assert len(records) == 16
    world_model = json.loads((real_sample / "shard0" / "world_model.json").read_text())
    for r in records:
        # the subject is the caption's first-mentioned shape, whatever its place in world_model.json
        first_shape = r["caption"].split(" ")[6]
        assert r["subject"]["shape"] == first_shape
        entities = world_model[r["index"]]["entities"]
        match = [e for e in entities if e["shape"]["name"] == first_shape][0]
        assert r["subject"]["bbox"][0] == pytest.approx(max(0.0, match["bounding_box"]["topleft"]["x"]))


def test_resume_after_interruption_gives_the_same_numbers(two_shards, tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    main("llava", [*FAST, "--data", str(two_shards), "--out", str(full)])
    main("llava", [*FAST, "--data", str(two_shards), "--out", str(resumed), "--limit", "3"])
    # a run killed while writing its fourth line: a torn last line
    with open(resumed / "samples.jsonl", "a") as f:
        f.write('{"shard": 1, "index": 0, "image": "trunc')
    main("llava", [*FAST, "--data", str(two_shards), "--out", str(resumed)])
    key = lambda r: (r["shard"], r["index"])  # noqa: E731
    assert sorted(_records(resumed), key=key) == sorted(_records(full), key=key)
    assert json.loads((resumed / "summary.json").read_text())["n_worlds"] == 6
    assert json.loads((resumed / "run.json").read_text())["timing"]["items"] == 3  # this command's worlds only


def test_batched_equals_batch_size_one(two_shards, tmp_path):
    one, three = tmp_path / "bs1", tmp_path / "bs3"
    main("qwen2", [*FAST, "--data", str(two_shards), "--out", str(one), "--batch-size", "1"])
    main("qwen2", [*FAST, "--data", str(two_shards), "--out", str(three), "--batch-size", "4"])
    for a, b in zip(_records(one), _records(three)):
        for kind in a["metrics"]:
            for name, values in a["metrics"][kind].items():
                for metric, value in values.items():
                    other = b["metrics"][kind][name][metric]
                    assert (value is None) == (other is None)
                    if value is not None:
                        assert math.isclose(value, other, rel_tol=1e-4, abs_tol=1e-6), (kind, name, metric)


def test_bad_options_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as code:
        main("llava", ["--model-path", "tiny-random", "--data", str(tmp_path / "missing"), "--out", str(tmp_path)])
    assert code.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --data") and "\n" not in err
    with pytest.raises(SystemExit) as code:
        main("llava", ["--model-path", "tiny-random", "--relations", "inside", "--out", str(tmp_path)])
    assert code.value.code == 2
    capsys.readouterr()
    for heads in ("2.0", "1,1", "-1"):  # 0-based heads of a layer, each once
        with pytest.raises(SystemExit) as code:
            main("llava", ["--model-path", "tiny-random", "--heads", heads, "--out", str(tmp_path)])
        assert code.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: --heads {heads!r}") and "\n" not in err


def test_chosen_heads_make_the_maps_and_are_part_of_the_identity(two_shards, tmp_path, capsys):
    """--heads: the word maps are those heads' (a head out of the model's range refused in one line), and a rerun
    with other heads is refused rather than mixed into the same folder."""
    out = tmp_path / "one_head"
    argv = [*FAST, "--data", str(two_shards), "--limit", "2", "--layers", "2", "--no-baseline"]
    main("llava", [*argv, "--out", str(out), "--heads", "1"])
    every = tmp_path / "every_head"
    main("llava", [*argv, "--out", str(every)])
    one, all_heads = _records(out), _records(every)
    assert [r["metrics"]["real"]["subject_cross"] for r in one] != [r["metrics"]["real"]["subject_cross"]
                                                                     for r in all_heads]
    assert json.loads((out / "identity.json").read_text())["--heads"] == [1]
    capsys.readouterr()
    with pytest.raises(SystemExit) as code:
        main("llava", [*argv, "--out", str(out), "--heads", "0"])
    assert code.value.code == 2 and "--heads" in capsys.readouterr().err
    with pytest.raises(SystemExit) as code:
        main("llava", [*argv, "--out", str(tmp_path / "too_far"), "--heads", "99"])
    assert code.value.code == 2 and "--heads '99'" in capsys.readouterr().err


# --- the instrument on injected attention ------------------------------------------------

def test_injected_attention_gives_the_hand_made_metrics_and_specificity(adapter, tmp_path, monkeypatch):
    """The language model's attention replaced, in every layer and head, by a known pattern pushed through the
    real capture path: the subject's shape word puts all its mass, evenly, on the subject's box; the object's
    shape word spreads it evenly over both boxes (salience without grounding). The maps, every metric, the
    specificity sign and the summary's verdict are then known by hand."""
    from spatial_attention.data.shapeworld import World, iter_worlds
    from spatial_attention.engine import capture as capture_module
    from spatial_attention.experiments import vlm_analysis as VA
    from spatial_attention.experiments.summary import summarise_samples

    root = tmp_path / "sw"
    generate_shapeworld(root, shards=1, worlds_per_shard=6, seed=11)
    worlds = [w for w in iter_worlds(root) if isinstance(w, World)]
    real_rows = capture_module.row_probabilities
    plans = []  # per world: (sequence length, subject rows, object rows, subject keys, both keys, regions)
    for world in worlds:
        image = world.load_image()
        layout = adapter.encode([world.caption.text], [image]).layouts[0]
        regions = VA.world_regions(world, adapter.token_grid(adapter.prepare_image(image)))
        rows = VA.word_rows_of(layout, world)
        plans.append((layout.length, rows["subject"], rows["object"],
                      layout.image_positions[regions["subject"].ravel()],
                      layout.image_positions[(regions["subject"] | regions["object"]).ravel()], regions))
    current = []

    def injected(module, query, key, attention_mask, scaling, rows, is_causal=None):
        length, subject_rows, object_rows, subject_keys, both_keys, _ = current[0]
        probs = real_rows(module, query, key, attention_mask, scaling, rows, is_causal)
        if key.shape[2] == length:  # the language model (not the vision encoder); one sample
            for positions, keys in ((subject_rows, subject_keys), (object_rows, both_keys)):
                for r in np.flatnonzero(np.isin(rows[0].cpu().numpy(), positions)):
                    probs[..., r, :] = 0.0
                    probs[..., r, keys] = 1.0 / len(keys)
        return probs

    monkeypatch.setattr(capture_module, "row_probabilities", injected)
    records = []
    for world, plan in zip(worlds, plans):
        current[:] = [plan]
        (record, maps), = VA.analyse_worlds(adapter, [(world, world.load_image())], list(range(adapter.num_layers)),
                                            seed=0, baseline=False)
        records.append(record)
        regions = plan[-1]
        subject, obj = regions["subject"], regions["object"]
        on_subject = subject / subject.sum()
        on_both = (subject | obj) / (subject | obj).sum()
        np.testing.assert_allclose(maps["real"]["subject_cross"], on_subject, atol=1e-6)
        np.testing.assert_allclose(maps["real"]["object_cross"], on_both, atol=1e-6)
        got = record["metrics"]["real"]
        # the subject word: on its own box only
        assert got["subject_cross"]["iou"] == pytest.approx(1.0) and got["subject_cross"]["com"] == pytest.approx(0.0)
        assert got["subject_cross"]["soft_iou"] == pytest.approx(1.0 / subject.sum())
        centre = lambda m: np.argwhere(m).mean(0)  # noqa: E731  (row, col) centroid of a mask
        distance = float(np.linalg.norm(centre(subject) - centre(obj)))
        overlap = float((subject & obj).sum())
        assert got["subject_cross"]["specificity_com"] == pytest.approx(distance, abs=1e-6)
        assert got["subject_cross"]["specificity_soft_iou"] == pytest.approx(
            1.0 / subject.sum() - (overlap / subject.sum()) / (1.0 + obj.sum() - overlap / subject.sum()))
        # the object word: on both boxes, no preference: soft_iou by hand, com between the two centroids
        n = float((subject | obj).sum())
        own, other = obj.sum() / n, subject.sum() / n
        assert got["object_cross"]["specificity_soft_iou"] == pytest.approx(
            own / (1.0 + obj.sum() - own) - other / (1.0 + subject.sum() - other))
        union_centre = np.argwhere(subject | obj).mean(0)
        assert got["object_cross"]["specificity_com"] == pytest.approx(
            float(np.linalg.norm(union_centre - centre(subject)) - np.linalg.norm(union_centre - centre(obj))),
            abs=1e-6)
        assert got["subject_cross"]["specificity_iou"] > 0  # every sign as defined: own referent above 0
    monkeypatch.undo()

    # the summary's verdict: the grounded word's specificity is above 0 with its whole CI; the salient one's
    # soft_iou specificity is the hand-made mean
    rows = {(r["map"], r["metric"]): r for r in summarise_samples(records)["by_metric"]}
    assert rows["subject_cross", "specificity_soft_iou"]["real_ci_lo"] > 0
    assert rows["subject_cross", "specificity_com"]["real_ci_lo"] > 0
    hand = np.mean([r["metrics"]["real"]["object_cross"]["specificity_soft_iou"] for r in records])
    assert rows["object_cross", "specificity_soft_iou"]["real_mean"] == pytest.approx(hand)


def test_injected_image_self_attention_gives_the_seed_maps(adapter, tmp_path, monkeypatch):
    """The language model's image block replaced by a known pattern: every image token in the subject's box
    attends evenly to the subject's box, every other image token evenly to both boxes. The subject seed's map
    is then its box (the seed cell removed, as seed_map defines), the object seed's map both boxes, and
    their binding specificity is positive for the subject only."""
    from spatial_attention.data.shapeworld import World, iter_worlds
    from spatial_attention.engine import capture as capture_module
    from spatial_attention.experiments import vlm_analysis as VA

    root = tmp_path / "sw"
    generate_shapeworld(root, shards=1, worlds_per_shard=6, seed=12)
    worlds = [w for w in iter_worlds(root) if isinstance(w, World)]
    real_rows = capture_module.row_probabilities
    current = []

    def injected(module, query, key, attention_mask, scaling, rows, is_causal=None):
        length, image_positions, subject, both = current[0]
        probs = real_rows(module, query, key, attention_mask, scaling, rows, is_causal)
        if key.shape[2] == length:  # the language model (not the vision encoder); one sample
            for cells, keys in ((~subject, both), (subject, subject)):
                for r in np.flatnonzero(np.isin(rows[0].cpu().numpy(), image_positions[cells])):
                    probs[..., r, :] = 0.0
                    probs[..., r, image_positions[np.flatnonzero(keys)]] = 1.0 / keys.sum()
        return probs

    monkeypatch.setattr(capture_module, "row_probabilities", injected)
    checked = 0
    for world in worlds:
        image = world.load_image()
        layout = adapter.encode([world.caption.text], [image]).layouts[0]
        regions = VA.world_regions(world, adapter.token_grid(adapter.prepare_image(image)))
        subject, obj = regions["subject"].ravel(), regions["object"].ravel()
        seeds = M.entity_seed(regions["subject"]), M.entity_seed(regions["object"])
        if not subject[seeds[0]] or subject[seeds[1]] or (subject & obj).any():
            continue  # keep the hand values simple: seeds inside their own box, boxes apart
        current[:] = [(layout.length, layout.image_positions, subject, subject | obj)]
        (record, maps), = VA.analyse_worlds(adapter, [(world, image)], list(range(adapter.num_layers)), seed=0,
                                            baseline=False)
        for seed, keys, name in ((seeds[0], subject, "subject_self_lm"), (seeds[1], subject | obj, "object_self_lm")):
            expected = keys.astype(np.float64)
            expected[seed] = 0.0
            np.testing.assert_allclose(maps["real"][name].ravel(), expected / expected.sum(), atol=1e-6)
        got = record["metrics"]["real"]
        assert got["subject_self_lm"]["specificity_soft_iou"] > 0
        assert got["subject_self_lm"]["specificity_com"] > 0
        checked += 1
    assert checked >= 2


def test_the_word_swap_and_distance_matched_specificities_agree_with_separate_plain_captures(adapter, tmp_path):
    """The two specificities that salience and locality cannot pass, as experiment 1 computes them in its one
    batched forward, against the slow path: the counterfactual caption captured alone, and every image cell's
    rows captured (language model and vision encoder), then the metrics' definitions applied by hand."""
    from dataclasses import replace

    from spatial_attention.data.shapeworld import World, counterfactual_caption, iter_worlds
    from spatial_attention.engine.capture import capture
    from spatial_attention.experiments import vlm_analysis as VA

    root = tmp_path / "sw"
    generate_shapeworld(root, shards=1, worlds_per_shard=2, seed=13)
    layers = list(range(adapter.num_layers))
    for world in [w for w in iter_worlds(root) if isinstance(w, World)]:
        image = world.load_image()
        (record, maps), = VA.analyse_worlds(adapter, [(world, image)], layers, seed=0)
        fed = adapter.prepare_image(image)
        grid = adapter.token_grid(fed)
        regions = VA.world_regions(world, grid)
        every_cell = np.arange(grid[0] * grid[1])
        got = record["metrics"]["real"]
        for told, check in ((replace(world, caption=counterfactual_caption(world.caption)), "swap"), (world, "rows")):
            batch = adapter.encode([told.caption.text], [fed])
            rows = VA.word_rows_of(batch.layouts[0], told)
            (recording,), _ = capture(adapter, batch, VA.world_request(layers, batch.layouts, [rows], [every_cell]))
            if check == "swap":
                cross = recording["cross"].astype(np.float64)
                cross = cross / cross.sum(1, keepdims=True)
                starts = np.cumsum([0] + [len(rows[role]) for role in ("subject", "object")])
                for role, start, end in zip(("subject", "object"), starts, starts[1:]):
                    alone = cross[start:end].mean(0).reshape(grid)
                    assert got[f"{role}_cross"][M.WORD_SWAP] == pytest.approx(M.word_swap_specificity(
                        maps["real"][f"{role}_cross"], alone, regions[role]), abs=1e-5)
                continue
            for block, order in (("image_self", batch.layouts[0].image_positions), ("vision", None)):
                source = "lm" if block == "image_self" else "vit"
                for role, other in (("subject", "object"), ("object", "subject")):
                    cells = np.flatnonzero(regions[role])
                    by_hand = M.distance_matched_specificity(recording[block][cells], cells, regions[role],
                                                             regions[other], regions["background"], order)
                    assert got[f"{role}_self_{source}"][M.DISTANCE_MATCHED] == pytest.approx(by_hand, abs=1e-5)
