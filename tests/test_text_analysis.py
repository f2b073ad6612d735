"""Experiment 2 (text-only asymmetry) on the tiny-random models: counterfactuals, token lookup,
the scores against known attention and the eager path, end to end, bad input, resume, batching."""
from __future__ import annotations

import csv
import json
import math
import runpy
import shutil
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO
from PIL import Image

from spatial_attention.data.generate import generate_shapeworld
from spatial_attention.data.shapeworld import RELATIONS, counterfactual_caption, format_caption, parse_caption
from spatial_attention.engine import capture as capture_module
from spatial_attention.engine.capture import CaptureRequest
from spatial_attention.engine.reference import reference_capture
from spatial_attention.experiments import text_analysis as TA
from spatial_attention.experiments.text_analysis import analyse_pairs, main, pair_record, sentence_positions

FAST = ["--model-path", "tiny-random"]
COLUMNS = ["shard", "index", "sent1", "sent2", "e1", "e2", "relation", "r_to_e1_s1", "r_to_e2_s1", "asym_s1",
           "r_to_e1_s2", "r_to_e2_s2", "asym_s2", "symmetry_score"]
FLIP = {"left": "right", "right": "left", "above": "below", "below": "above"}
# (colour1, shape1, colour2, shape2): different colours, one colour twice, multi-token shapes
ENTITY_CASES = [("cyan", "ellipse", "blue", "circle"), ("red", "semicircle", "red", "pentagon"),
                ("gray", "pentagon", "gray", "semicircle"), ("yellow", "square", "magenta", "semicircle")]
CASES = [(*entities, relation) for entities in ENTITY_CASES for relation in RELATIONS]


def _caption(c1, s1, c2, s2, rel):
    return parse_caption(format_caption(c1, s1, c2, s2, rel))


def _items(cases=CASES):
    return [(0, k, _caption(*case)) for k, case in enumerate(cases)]


# ----------------------------------------------------------------------------- counterfactuals and tokens

@pytest.mark.parametrize("case", CASES, ids=lambda case: "-".join(case))
def test_counterfactual_swaps_the_phrases_and_flips_the_relation(case):
    c1, s1, c2, s2, rel = case
    caption = _caption(*case)
    cf = counterfactual_caption(caption)
    assert cf.text == (f"there are two shapes a {c2} {s2} and a {c1} {s1} . what is the spatial relationship "
                       f"from the first shape to the second shape ? the spatial relation is {FLIP[rel]} .")
    assert (cf.color1, cf.shape1, cf.color2, cf.shape2, cf.relation) == (c2, s2, c1, s1, FLIP[rel])
    assert counterfactual_caption(cf) == caption


def _decoded(adapter, layout, positions) -> str:
    return adapter.tokenizer.decode(layout.input_ids[positions].tolist()).strip()


def test_relation_and_shape_tokens_are_the_right_ones(adapter):
    sentences = [c for _, _, caption in _items() for c in (caption, counterfactual_caption(caption))]
    batch = adapter.encode([s.text for s in sentences])
    for layout, sentence in zip(batch.layouts, sentences):
        pos = sentence_positions(layout, sentence)
        assert _decoded(adapter, layout, pos["relation"]) == sentence.relation
        assert _decoded(adapter, layout, pos["e1"]) == sentence.shape1
        assert _decoded(adapter, layout, pos["e2"]) == sentence.shape2
        for positions in pos.values():  # one word, no gaps
            assert np.array_equal(positions, np.arange(positions[0], positions[-1] + 1))
        # first-mentioned shape, then the second, then the relation word (even when the colours are equal)
        assert pos["e1"][-1] < pos["e2"][0] <= pos["e2"][-1] < pos["relation"][0]
        for name in ("e1", "e2"):  # the tiny tokenizers split these two shapes, like the real ones
            if _decoded(adapter, layout, pos[name]) in ("semicircle", "pentagon"):
                assert len(pos[name]) > 1


# ----------------------------------------------------------------------------- scores from known attention

def test_pair_record_from_hand_made_recordings():
    s1 = _caption("red", "semicircle", "blue", "square", "left")
    s2 = counterfactual_caption(s1)
    # (layers, relation tokens, shape tokens); per-layer means written beside each block
    rec1 = {"e1": np.array([[[0.1, 0.3, 0.2]], [[0.4, 0.4, 0.4]]], np.float32),  # 0.2, 0.4 -> 0.3
            "e2": np.array([[[0.05]], [[0.15]]], np.float32)}  # 0.05, 0.15 -> 0.1
    rec2 = {"e1": np.array([[[0.0]], [[0.2]]], np.float32),  # 0.0, 0.2 -> 0.1
            "e2": np.array([[[0.2, 0.2, 0.2]], [[0.5, 0.1, 0.3]]], np.float32)}  # 0.2, 0.3 -> 0.25
    row = pair_record(2, 7, s1, s2, rec1, rec2, [1, 3])
    want = {"r_to_e1_s1": 0.3, "r_to_e2_s1": 0.1, "asym_s1": 0.2, "r_to_e1_s2": 0.1, "r_to_e2_s2": 0.25,
            "asym_s2": -0.15, "symmetry_score": 0.05}
    for key, value in want.items():
        assert row[key] == pytest.approx(value, abs=1e-7), key
    assert row["layer_asym_s1"] == pytest.approx([0.15, 0.25], abs=1e-7)
    assert row["layer_asym_s2"] == pytest.approx([-0.2, -0.1], abs=1e-7)
    assert (row["shard"], row["index"], row["layers"]) == (2, 7, [2, 4])
    assert (row["sent1"], row["sent2"]) == (s1.text, s2.text)
    assert (row["e1"], row["e2"], row["relation"]) == ("red semicircle", "blue square", "left")


def _exponent(layer: int, head: int) -> float:
    return 0.25 * layer + 0.125 * head


def test_injected_attention_through_the_engine_gives_the_expected_scores(adapter, monkeypatch):
    """The engine's softmax (recorded path) replaced by a known causal attention:
    A[l, h, q, k] proportional to (k + 1) ** p(l, h) for k <= q."""
    n_layers = adapter.num_layers
    calls = []

    def known_attention(scores):
        dim = -1
        layer = len(calls) % n_layers  # every layer recorded: called once per layer, in order
        calls.append(layer)
        _, heads, _, keys = scores.shape
        p = torch.tensor([_exponent(layer, h) for h in range(heads)], dtype=scores.dtype).view(1, heads, 1, 1)
        weights = (torch.arange(keys, dtype=scores.dtype) + 1).view(1, 1, 1, keys) ** p
        weights = torch.where(scores > torch.finfo(scores.dtype).min / 2, weights, torch.zeros_like(weights))
        return weights / weights.sum(dim, keepdim=True).clamp_min(1e-30)

    items = _items(CASES[::3])
    layers = list(range(n_layers))
    monkeypatch.setattr(capture_module, "softmax_in_place", known_attention)
    records = analyse_pairs(adapter, items, layers, Counter())
    monkeypatch.undo()
    assert calls and len(calls) % n_layers == 0

    def expected(layout, rows, cols):  # per layer, mean over heads and (row, col) pairs, float64
        out = []
        for layer in layers:
            per_head = []
            for h in range(adapter.num_heads):
                w = np.arange(layout.length, dtype=np.float64) + 1.0
                w = w ** _exponent(layer, h)
                per_head.append(np.mean([w[c] / w[: r + 1].sum() for r in rows for c in cols]))
            out.append(np.mean(per_head))
        return np.array(out)

    assert len(records) == len(items)
    for (_, _, caption), record in zip(items, records):
        want = {}
        for tag, sentence in (("s1", caption), ("s2", counterfactual_caption(caption))):
            layout = adapter.encode([sentence.text]).layouts[0]
            pos = sentence_positions(layout, sentence)
            per_layer = {e: expected(layout, pos["relation"], pos[e]) for e in ("e1", "e2")}
            want[f"r_to_e1_{tag}"], want[f"r_to_e2_{tag}"] = per_layer["e1"].mean(), per_layer["e2"].mean()
            want[f"asym_{tag}"] = want[f"r_to_e1_{tag}"] - want[f"r_to_e2_{tag}"]
            want[f"layer_asym_{tag}"] = per_layer["e1"] - per_layer["e2"]
        want["symmetry_score"] = want["asym_s1"] + want["asym_s2"]
        for key, value in want.items():
            np.testing.assert_allclose(record[key], value, rtol=0, atol=1e-6, err_msg=key)
        assert abs(record["asym_s1"]) > 1e-4  # the known attention is far from symmetric: a real check


def test_scores_equal_a_direct_computation_from_the_eager_path(adapter):
    layers = [1, 3]
    items = _items(CASES[1::4])
    records = analyse_pairs(adapter, items, layers, Counter())
    sentences = [c for *_, c in items] + [counterfactual_caption(c) for *_, c in items]
    batch = adapter.encode([s.text for s in sentences])
    positions = [sentence_positions(layout, s) for layout, s in zip(batch.layouts, sentences)]
    request = CaptureRequest(layers=layers, keep="layer_head",
                             blocks={e: [(p["relation"], p[e]) for p in positions] for e in ("e1", "e2")})
    eager, _ = reference_capture(adapter, batch, request)  # full float64 tensors, (L, H, R, C) per block
    n = len(items)
    for k, record in enumerate(records):
        direct = {f"r_to_{e}_{tag}": eager[k + offset][e].mean() for tag, offset in (("s1", 0), ("s2", n))
                  for e in ("e1", "e2")}
        direct["asym_s1"] = direct["r_to_e1_s1"] - direct["r_to_e2_s1"]
        direct["asym_s2"] = direct["r_to_e1_s2"] - direct["r_to_e2_s2"]
        direct["symmetry_score"] = direct["asym_s1"] + direct["asym_s2"]
        for key, value in direct.items():
            assert abs(record[key] - value) <= 1e-6, key
        per_layer = eager[k]["e1"].mean(axis=(1, 2, 3)) - eager[k]["e2"].mean(axis=(1, 2, 3))
        np.testing.assert_allclose(record["layer_asym_s1"], per_layer, rtol=0, atol=1e-6)


def test_a_pair_whose_words_are_not_found_is_skipped_once(tiny_models, monkeypatch):
    adapter = tiny_models["llava"]
    cases = [case for case in CASES if case[4] == "left"]
    items = _items(cases)
    found = sentence_positions

    def no_pentagon(layout, caption):
        if "pentagon" in caption.text:
            raise ValueError("no token covers 'pentagon'")
        return found(layout, caption)

    monkeypatch.setattr(TA, "sentence_positions", no_pentagon)
    failed = Counter()
    records = analyse_pairs(adapter, items, [0, 1], failed)
    kept = [k for k, case in enumerate(cases) if "pentagon" not in case]
    assert [r["index"] for r in records] == kept
    # both sentences of a broken pair fail, but it is one pair skipped
    assert sum(failed.values()) == len(items) - len(kept)
    assert set(failed) == {"tokens_not_found"}  # counted by kind; the words go to the log


# ----------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def two_shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sw")
    generate_shapeworld(root, shards=2, worlds_per_shard=3, seed=1)
    return root


def _no_nan(text: str) -> None:
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-finite JSON constant {c}"))


def _captions(data: Path) -> dict[tuple[int, int], str]:
    return {(int(shard.name[5:]), i): line for shard in data.glob("shard*")
            for i, line in enumerate((shard / "caption.txt").read_text().splitlines())}


def _check_outputs(out: Path, data: Path, n_pairs: int, n_layers: int) -> list[dict]:
    with open(out / "pairs.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == COLUMNS
        rows = list(reader)
    assert len(rows) == n_pairs
    captions = _captions(data)
    assert [(int(r["shard"]), int(r["index"])) for r in rows] == sorted((int(r["shard"]), int(r["index"])) for r in rows)
    for r in rows:
        s1 = parse_caption(r["sent1"])
        assert r["sent1"] == captions[int(r["shard"]), int(r["index"])]
        assert r["sent2"] == counterfactual_caption(s1).text
        assert (r["e1"], r["e2"], r["relation"]) == (f"{s1.color1} {s1.shape1}", f"{s1.color2} {s1.shape2}",
                                                     s1.relation)
        v = {k: float(r[k]) for k in COLUMNS[7:]}
        assert all(math.isfinite(x) for x in v.values())
        assert all(0.0 <= v[k] <= 1.0 for k in ("r_to_e1_s1", "r_to_e2_s1", "r_to_e1_s2", "r_to_e2_s2"))
        assert v["asym_s1"] == pytest.approx(v["r_to_e1_s1"] - v["r_to_e2_s1"], abs=1e-12)
        assert v["asym_s2"] == pytest.approx(v["r_to_e1_s2"] - v["r_to_e2_s2"], abs=1e-12)
        assert v["symmetry_score"] == pytest.approx(v["asym_s1"] + v["asym_s2"], abs=1e-12)

    text = (out / "summary.json").read_text()
    _no_nan(text)
    summary = json.loads(text)
    assert summary["counts"]["pairs_built"] == n_pairs
    overall = summary["all"]
    assert overall["n"] == n_pairs
    for name in ("asym_s1", "asym_s2", "symmetry_score", "abs_symmetry_score"):
        values = [abs(float(r["symmetry_score"])) if name == "abs_symmetry_score" else float(r[name]) for r in rows]
        assert overall[name]["mean"] == pytest.approx(np.mean(values), abs=1e-12)
        assert overall[name]["ci_lo"] <= overall[name]["mean"] <= overall[name]["ci_hi"]
    assert set(summary["by_relation"]) == {r["relation"] for r in rows}
    assert sum(block["n"] for block in summary["by_relation"].values()) == n_pairs
    profile = summary["layer_profile"]
    assert profile["layers"] == list(range(1, n_layers + 1))
    # the pair scores average the layers, so the profile averages back to the overall means
    assert np.mean(profile["asym_s1"]) == pytest.approx(overall["asym_s1"]["mean"], abs=1e-9)
    assert np.mean(profile["asym_s2"]) == pytest.approx(overall["asym_s2"]["mean"], abs=1e-9)

    for name in ("asym_scatter.png", "example_pair_bars.png", "layer_asym_profile.png"):
        with Image.open(out / "figures" / name) as image:
            assert image.size[0] > 300 and image.size[1] > 200
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "finished" and run["model"]["model_path"] == "tiny-random"
    assert run["counts"] == summary["counts"] and run["layers_0based"] == list(range(n_layers))
    assert run["timing"]["items"] == n_pairs and run["timing"]["forward_seconds"] > 0  # where the time went
    assert {"torch", "transformers", "numpy"} <= run["versions"].keys()
    _no_nan((out / "run.json").read_text())
    for line in (out / "pairs.jsonl").read_text().splitlines():
        _no_nan(line)
    return rows


@pytest.mark.parametrize("family", ["llava", "qwen2"])
def test_runs_on_generated_shards(family, two_shards, tmp_path, tiny_models):
    out = tmp_path / "out"
    main(family, [*FAST, "--data", str(two_shards), "--out", str(out)])
    _check_outputs(out, two_shards, 6, tiny_models[family].num_layers)
    counts = json.loads((out / "summary.json").read_text())["counts"]
    assert counts == {"captions_read": 6, "captions_not_true": 0, "pairs_built": 6, "pairs_skipped": 0,
                      "skipped_reasons": {}}


@pytest.mark.parametrize("family", ["llava", "qwen2"])
def test_every_caption_of_the_real_sample_yields_a_pair(family, real_sample, tmp_path, tiny_models):
    out = tmp_path / "out"
    main(family, [*FAST, "--data", str(real_sample), "--out", str(out), "--batch-size", "8"])
    n = len((real_sample / "shard0" / "caption.txt").read_text().splitlines())
    _check_outputs(out, real_sample, n, tiny_models[family].num_layers)
    counts = json.loads((out / "summary.json").read_text())["counts"]
    assert counts["captions_read"] == counts["pairs_built"] == n and counts["pairs_skipped"] == 0


def test_a_caption_outside_the_grammar_is_skipped_and_counted(two_shards, tmp_path, caplog):
    data = tmp_path / "data"
    shutil.copytree(two_shards, data)
    lines = (data / "shard1" / "caption.txt").read_text().splitlines()
    lines[1] = lines[1].replace("there are two shapes", "there are three shapes")
    lines[2] = lines[2].replace("relation is", "relation be")
    (data / "shard1" / "caption.txt").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    main("llava", [*FAST, "--data", str(data), "--out", str(out)])
    summary = json.loads((out / "summary.json").read_text())
    counts = summary["counts"]
    assert (counts["captions_read"], counts["pairs_built"], counts["pairs_skipped"]) == (6, 4, 2)
    assert counts["skipped_reasons"] == {"caption": 2}  # counted by kind; each reason goes to the console
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    for line_number in (2, 3):
        assert any(f"caption.txt line {line_number}" in w and "outside the ShapeWorld grammar" in w for w in warnings)
    keys = {(int(r["shard"]), int(r["index"])) for r in csv.DictReader(open(out / "pairs.csv"))}
    assert keys == {(0, 0), (0, 1), (0, 2), (1, 0)}


def _jsonl(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]


def world_key(record: dict) -> tuple[int, int]:
    return record["shard"], record["index"]


def test_resume_after_a_torn_last_line_gives_the_same_pairs(two_shards, tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    main("qwen2", [*FAST, "--data", str(two_shards), "--out", str(full)])
    main("qwen2", [*FAST, "--data", str(two_shards), "--out", str(resumed), "--limit", "3"])
    assert len(_jsonl(resumed)) == 3
    with open(resumed / "pairs.jsonl", "a") as f:  # killed while writing the fourth line
        f.write('{"shard": 1, "index": 0, "sent1": "there are two sha')
    main("qwen2", [*FAST, "--data", str(two_shards), "--out", str(resumed)])
    assert sorted(_jsonl(resumed), key=world_key) == sorted(_jsonl(full), key=world_key)
    for name in ("pairs.csv", "summary.json"):
        assert (resumed / name).read_text() == (full / name).read_text()


def test_resuming_with_other_layers_is_refused(two_shards, tmp_path, capsys):
    out = tmp_path / "out"
    main("llava", [*FAST, "--data", str(two_shards), "--out", str(out), "--limit", "2", "--layers", "last_2"])
    assert json.loads((out / "summary.json").read_text())["layer_profile"]["layers"] == [3, 4]
    with pytest.raises(SystemExit) as code:
        main("llava", [*FAST, "--data", str(two_shards), "--out", str(out), "--layers", "all"])
    assert code.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the first run's progress bar
    assert last.startswith("error: --out") and "--layers" in last


@pytest.mark.parametrize("family", ["llava", "qwen2"])
def test_batch_size_three_equals_batch_size_one(family, two_shards, tmp_path):
    one, three = tmp_path / "bs1", tmp_path / "bs3"
    main(family, [*FAST, "--data", str(two_shards), "--out", str(one), "--batch-size", "1"])
    main(family, [*FAST, "--data", str(two_shards), "--out", str(three), "--batch-size", "3"])
    a, b = sorted(_jsonl(one), key=world_key), sorted(_jsonl(three), key=world_key)
    assert [world_key(r) for r in a] == [world_key(r) for r in b]
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            if key in COLUMNS[7:] or key.startswith("layer_asym"):
                np.testing.assert_allclose(x[key], y[key], rtol=0, atol=1e-7, err_msg=key)
            else:
                assert x[key] == y[key], key


@pytest.mark.parametrize("family", ["llava", "qwen2"])
def test_entry_point_help_and_defaults(family, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", [f"text_only_llm_analysis_{family}.py", "--help"])
    with pytest.raises(SystemExit) as code:
        runpy.run_path(str(REPO / f"text_only_llm_analysis_{family}.py"), run_name="__main__")
    assert code.value.code == 0
    text = capsys.readouterr().out
    assert f"text_only_llm_analysis_{family}.py" in text
    for option in ("--model-path", "--data", "--out", "--shards", "--limit", "--layers", "--batch-size", "--device",
                   "--dtype", "--seed"):
        assert option in text
    args = TA.build_parser(family).parse_args([])
    assert args.out == Path(f"results/text_only/{family}")
    assert args.data == Path("data/spatial_twoshapes/agreement/relational")


def test_default_data_is_generated_with_a_notice(tmp_path, monkeypatch, caplog, tiny_models):
    import spatial_attention.data.generate as generate

    small = generate.generate_shapeworld
    monkeypatch.setattr(generate, "generate_shapeworld",
                        lambda path, seed=0: small(path, shards=1, worlds_per_shard=2, seed=seed))
    monkeypatch.chdir(tmp_path)
    main("llava", FAST)
    assert "NOTICE" in caplog.text and "does not exist; generating" in caplog.text
    out = tmp_path / "results" / "text_only" / "llava"
    _check_outputs(out, tmp_path / "data" / "spatial_twoshapes" / "agreement" / "relational", 2,
                   tiny_models["llava"].num_layers)
