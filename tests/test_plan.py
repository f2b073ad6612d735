"""The study's cost plan (``PLAN=1``, ``CALIBRATION``; spatial_attention/study/cost.py): its counts are the forwards a
tiny run makes, a family the calibration lacks is scaled and says so, PLAN=1 runs nothing, and a bad calibration
is refused in one line before anything runs."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

import models
from spatial_attention.data.generate import generate_shapeworld
from spatial_attention.experiments import ablation_measure, patching, text_analysis, vlm_analysis
from spatial_attention.run.cost import Forwards, full_inputs
from spatial_attention.study.calibration import Geometry

REPO = Path(__file__).resolve().parents[1]
H200 = REPO / "bench" / "results" / "calibration-nvidia-h200.json"


class Counter:
    """Counts what a model computes: builds, re-initialisations in place (a control's model loaded again), whole
    forwards (rows through the embeddings) and token-layers (rows x tokens through each decoder layer, reruns above
    a prefix included)."""

    def __init__(self):
        self.builds, self.reinits, self.forwards, self.token_layers = 0, 0, 0, 0
        self.models = set()

    def watch(self, adapter):
        if id(adapter.model) in self.models:
            self.reinits += 1
            return adapter
        self.models.add(id(adapter.model))
        self.builds += 1

        def embedded(module, args, output):
            self.forwards += output.shape[0]

        def layer(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            self.token_layers += hidden.shape[0] * hidden.shape[1]

        adapter.model.get_input_embeddings().register_forward_hook(embedded)
        for decoder in adapter.lm_layers():
            decoder.register_forward_pre_hook(layer, with_kwargs=True)
        return adapter


@pytest.fixture
def counted(monkeypatch):
    """Every model the run loads, counted."""
    counter, load = Counter(), models.load_adapter
    monkeypatch.setattr(models, "load_adapter", lambda *a, **k: counter.watch(load(*a, **k)))
    return counter


@pytest.fixture(scope="module")
def worlds(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sw")
    generate_shapeworld(root, shards=1, worlds_per_shard=5, seed=2)
    return root


@pytest.mark.parametrize("family", ["llava", "qwen2"])
def test_the_plan_counts_the_forwards_of_experiments_1_and_2(family, worlds, tmp_path, counted, tiny_models):
    """A tiny run of 3 worlds at batch 2 (a batch and a remainder), with its random-weights control of 2
    initialisations: the builds and the whole forwards the plan counts are those made."""
    layers = tiny_models[family].num_layers
    common = ["--model-path", "tiny-random", "--device", "cpu", "--data", str(worlds), "--limit", "3",
              "--batch-size", "2"]
    vlm_analysis.main(family, [*common, "--plot-samples", "0", "--out", str(tmp_path / "exp1")])
    text_analysis.main(family, [*common, "--out", str(tmp_path / "exp2"), "--control", "random-weights",
                                "--control-seeds", "2"])
    planned = vlm_analysis.planned_forwards(3, 2, layers) + text_analysis.planned_forwards(3, 2, layers) * 2
    assert counted.builds == 1 + 1 and counted.reinits == 1  # the control's second initialisation: in place
    assert counted.forwards == full_inputs(planned) == 3 * 3 + 2 * 2 * 3


@pytest.mark.parametrize("family", ["llava", "qwen2"])
def test_the_plan_counts_the_reruns_of_patching_and_ablation(family):
    """Token-layers, reruns above the prefix included: the patching of every head of a pair and the ablation of
    planted head sets, counted against the plan's (the same tokens in every row: one prompt, one picture size)."""
    from PIL import Image

    counter = Counter()
    adapter = counter.watch(models.load_adapter(family, "tiny-random", device="cpu", dtype="fp32"))
    if family == "qwen2":
        adapter.set_feed_size(224)
    L, H = adapter.num_layers, adapter.num_heads
    images = [Image.new("RGB", (100, 100), c) for c in ("white", "gray")]
    batch = patching.encode_pair(adapter, "Is there a shape in the top left corner?", *images)
    tokens = batch.layouts[0].length
    answers = ablation_measure.yes_no_ids(adapter.tokenizer)
    heads = [(layer, h) for layer in range(L) for h in range(H)]
    patching.pair_scores(adapter, batch, heads, answers, 3)
    sets = [[(1, 0)], [(1, 1)], [(2, 0)], [(L - 1, 2)]]  # lowest ablated layer: 1
    ablation_measure.measure(adapter, batch, sets, answers, sets_per_forward=3)
    planned = patching.planned_forwards(1, heads, L, 3) + ablation_measure.whole_forwards(1, 1, L) + \
        ablation_measure.planned_forwards(1, 1, 4, L, 1, 3)
    assert counter.forwards == full_inputs(planned) == 4
    assert counter.token_layers == sum(f.inputs * f.layers * (1 if f.answer_only else tokens) for f in planned)
    # two groups of head sets (two --heads specs) share one whole forward, each rerunning from its own lowest layer
    planned = ablation_measure.whole_forwards(1, 1, L) + \
        ablation_measure.planned_forwards(1, 1, 4, L, 1, 3, answer_only=True) + \
        ablation_measure.planned_forwards(1, 1, 1, L, 2, 3, answer_only=True)
    before = counter.forwards, counter.token_layers
    ablation_measure.measure_groups(adapter, batch, [sets, [[(2, 1)]]], answers, sets_per_forward=3, answer_only=True)
    assert counter.forwards - before[0] == full_inputs(planned) == 2
    assert counter.token_layers - before[1] == sum(f.inputs * f.layers * (1 if f.answer_only else tokens)
                                                   for f in planned)


def _plan(tmp_path, **env) -> subprocess.CompletedProcess:
    settings = {"PLAN": "1", "OUT_DIR": str(tmp_path / "out"), "DATA_DIR": str(tmp_path / "data"), **env}
    return subprocess.run(["bash", str(REPO / "run_study.sh")], env={**os.environ, **settings}, capture_output=True,
                          text=True, timeout=300)


def test_plan_1_writes_the_plan_runs_nothing_and_scales_a_family_the_calibration_lacks(tmp_path):
    """The H200's calibration has LLaVA's figures only: Qwen2-VL's steps are priced from them, marked scaled."""
    done = _plan(tmp_path, CALIBRATION=str(H200), MODEL_PATH_LLAVA="random-7b:2", MODEL_PATH_QWEN2="random-7b:2",
                 WORLDS="10", COUNT="4", CONTROL_SEEDS="2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["plan.json"] and not (tmp_path / "data").exists()
    plan = json.loads((tmp_path / "out" / "plan.json").read_text())
    rows = {row["step"]: row for row in plan["steps"]}
    assert {name for name, row in rows.items() if "scaled_from" in row} == {n for n in rows if n.startswith("qwen2/")}
    assert all(rows[n]["scaled_from"] == "llava" for n in rows if n.startswith("qwen2/"))
    assert rows["llava/exp1"]["forwards"] == 3 * 10 and rows["llava/exp1-control"]["builds"] == 1 \
        and rows["llava/exp1-control"]["reinits"] == 1
    assert rows["llava/exp1"]["tokens_per_forward"] > 576 and rows["llava/exp2"]["tokens_per_forward"] < 100
    assert plan["total_seconds"] == pytest.approx(sum(row["seconds"] for row in plan["steps"]), abs=0.1)
    assert plan["calibration"]["device"] == "NVIDIA H200" and plan["settings"]["batch_size"] == 8
    assert "total: ~" in done.stderr and "(scaled from llava)" in done.stderr


def test_the_host_s_work_is_priced_per_run_and_per_item(tmp_path):
    """A calibration's own host_seconds: experiment 1's runs priced at per_run + worlds x per_item + its per-world
    figures (8 for the model, none for an initialisation), every other kind at 0."""
    from spatial_attention.study.cost import HOST_SECONDS

    calibration = json.loads(H200.read_text())
    kinds = json.loads(HOST_SECONDS.read_text())["kinds"]
    settings = dict(MODELS="llava", MODEL_PATH_LLAVA="random-7b:2", WORLDS="10", COUNT="4", CONTROL_SEEDS="2",
                    CONTROL_ITEMS="4")
    rows = {}
    for name, host in (("none", {}), ("exp1", {"exp1": {"per_run": 10.0, "per_item": 1.0},
                                               "exp1_panel": {"per_run": 0.0, "per_item": 100.0}})):
        calibration["host_seconds"] = {kind: {"per_run": 0.0, "per_item": 0.0} for kind in kinds} | host
        (tmp_path / name).mkdir()
        path = tmp_path / name / "calibration.json"
        path.write_text(json.dumps(calibration))
        done = _plan(tmp_path / name, CALIBRATION=str(path), **settings)
        assert done.returncode == 0, done.stderr[-3000:]
        rows[name] = {row["step"]: row["seconds"] for row in
                      json.loads((tmp_path / name / "out" / "plan.json").read_text())["steps"]}
    assert rows["exp1"]["llava/exp1"] - rows["none"]["llava/exp1"] == pytest.approx(10 + 10 * 1 + 8 * 100, abs=0.2)
    assert rows["exp1"]["llava/exp1-control"] - rows["none"]["llava/exp1-control"] == pytest.approx(2 * (10 + 4),
                                                                                                 abs=0.2)
    assert all(rows["exp1"][step] == rows["none"][step] for step in rows["none"] if "exp1" not in step)


def test_scaling_prices_a_family_by_its_work():
    """A family priced from another's rate: twice the parameters a layer and twice the tokens, four times the
    language model's part."""
    small = Geometry(2, 4, 100.0, 1, 10.0, 8, {"image": 50, "text": 10})
    big = Geometry(2, 4, 200.0, 1, 10.0, 8, {"image": 100, "text": 20})
    rerun = Forwards(1, 1, 2, full=False)
    assert big.work(rerun) == 4 * small.work(rerun)
    assert small.work(Forwards(1, 1, 2)) == small.work(rerun) + 8 * 10.0


@pytest.mark.parametrize("content, says", [("{", "not JSON"), ('{"format": 2}', "process_seconds"),
                                            ('{"format": 1}', "run bench/gpu_check.sh again"),
                                            (None, "cannot be read")])
def test_a_bad_calibration_is_refused_in_one_line_before_anything_runs(tmp_path, content, says):
    path = tmp_path / "calibration.json"
    if content is not None:
        path.write_text(content)
    done = _plan(tmp_path, CALIBRATION=str(path), PLAN="0", MODEL_PATH_LLAVA="tiny-random",
                 MODEL_PATH_QWEN2="tiny-random")
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: CALIBRATION={path}: ") and says in lines[0]
    assert not (tmp_path / "out").exists()


def test_an_answer_position_rerun_is_priced_by_its_rows():
    """Rows a layer at the measured seconds a row (interpolated between the rows measured), scaled by the size of
    a layer; their work counts one token a row."""
    from dataclasses import asdict

    from spatial_attention.study.calibration import forward_seconds

    small = Geometry(2, 4, 100.0, 1, 10.0, 8, {"image": 50, "text": 10})
    big = Geometry(4, 4, 200.0, 1, 10.0, 8, {"image": 100, "text": 20})
    entry = {"geometry": asdict(small), "seconds_per_input": {"1": 1.0}, "capture_overhead": {"1": 1.0},
             "answer_seconds": {"2": 0.5, "32": 0.1}, "build_seconds": 0.0}
    rows = Forwards(64, 32, 1, full=False, answer_only=True)
    assert forward_seconds(entry, small, rows) == pytest.approx(64 * 0.1 / 2)
    assert forward_seconds(entry, big, rows) == pytest.approx(2 * 64 * 0.1 / 2)
    assert forward_seconds(entry, small, Forwards(64, 17, 1, full=False, answer_only=True)) == pytest.approx(
        64 * 0.3 / 2)
    assert small.work(rows) == 1 * 100.0 and small.row_tokens(rows) == 1


def test_the_recorded_h200_calibration_reads():
    from spatial_attention.study.calibration import read_calibration

    calibration = read_calibration(H200)
    assert set(calibration["families"]) == {"llava"} and calibration["device_type"] == "cuda"
