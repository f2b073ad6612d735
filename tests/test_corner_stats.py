"""Experiment 3, step 1 (head_attention_stats.py / corner_stats.py) and the corner
sweep (run_corner_experiments.sh) on the tiny-random models of both families:
the sweep end to end, cube shapes, the corner patch positions, agreement with the
eager reference path, batching, generation over several steps, the blank
(position-only) control on the corner block, resume, and unusable images."""
from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.base import Batch
from spatial_attention.common.errors import DataError, OptionError
from spatial_attention.common.runio import read_jsonl
from spatial_attention.data.counterfactual import CORNER_PROMPT, CORNER_WORDS, CORNERS, read_pairs
from spatial_attention.data.generate import generate_counterfactual
from spatial_attention.engine.capture import CaptureRequest
from spatial_attention.engine.reference import reference_capture
from spatial_attention.experiments import corner_stats
from spatial_attention.experiments.corner_stats import (DEFAULT_LAYERS, PAIRS_FILE, _scored_positions, build_parser,
                                                        check_scoring, identity, main, pair_results, read_dataset,
                                                        score_dataset)
from spatial_attention.run.options import ModelOptions, layer_indices
from spatial_attention.run.runloop import IDENTITY_FILE, ProcessShare, Run

REPO = Path(__file__).resolve().parents[1]
PROMPT = "Is there anything in the top left corner?"
STEP_FILES = ("scores_full_LHN.npy", "scores_control_LHN.npy", "scores_blank_LHM.npy", "scores_blank_image_LHM.npy",
              "count_LHN.npy", "count_LH.npy", "answers.csv", "count_bars.png", "meta.json", "run.json", PAIRS_FILE)
ARRAYS = ("scores_full_LHN", "scores_control_LHN", "scores_blank_LHM", "scores_blank_image_LHM", "count_LHN",
          "count_LH")
ANALYSIS_FILES = ("summary.json", "shared_head.txt", "unique_heads.txt", "heatmap_shared.png",
                  "unique_head_curves.png", "top_pixels_shared.txt",
                  *(f"{kind}_{c}{ext}" for c in CORNERS
                    for kind, ext in (("heatmap_residual", ".png"), ("top_pixels_diff", ".txt"))))


def run_sweep(tmp_path: Path, **env) -> subprocess.CompletedProcess:
    settings = {**os.environ, "PYTHON": sys.executable, "MODEL_PATH": "tiny-random",
                "DATA_DIR": str(tmp_path / "data"), "OUT_DIR": str(tmp_path / "out"), **env}
    return subprocess.run(["bash", str(REPO / "run_corner_experiments.sh")], env=settings, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def topleft(tmp_path_factory) -> Path:
    """Three top-left pairs."""
    return generate_counterfactual(tmp_path_factory.mktemp("pairs"), count=3, corners=["topleft"])[0]


def stats_args(family: str, *options: str):
    return build_parser().parse_args(["--model", family, "--dataset", "unused", *options])


def session_run(adapter, args) -> Run:
    """The Run main() would load, on the session's adapter."""
    layers = layer_indices(args.layers or DEFAULT_LAYERS, adapter.num_layers)
    options = replace(ModelOptions.from_args(adapter.family, args), model_path=adapter.model_path)
    return Run(options, ProcessShare(), adapter, tuple(layers), args.batch_size or 1, out=None, data=None,
               settings=vars(args))


def run_step(adapter, folder: Path, out: Path, *options: str) -> dict[str, np.ndarray]:
    """score_dataset on the session's adapter; the saved files as arrays (plus meta and answers)."""
    args = stats_args(adapter.family, *options)
    score_dataset(session_run(adapter, args), check_scoring(args), read_dataset(folder, args.max_pairs),
                  pair_results(out))
    saved = {name: np.load(out / f"{name}.npy") for name in ARRAYS}
    saved["meta"] = json.loads((out / "meta.json").read_text())
    with open(out / "answers.csv") as f:
        saved["answers"] = list(csv.DictReader(f))
    return saved


def corner_cells(grid: tuple[int, int], corner: str, k: int) -> list[int]:
    """Raster indices of the k x k corner block, written out cell by cell."""
    gh, gw = grid
    rows = range(k) if corner.startswith("top") else range(gh - k, gh)
    cols = range(k) if corner.endswith("left") else range(gw - k, gw)
    return sorted(r * gw + c for r in rows for c in cols)


# --- the sweep ------------------------------------------------------------------

@pytest.mark.parametrize("family", ["qwen2", "llava"])
def test_sweep_end_to_end(family, tiny_study, tiny_models):
    """The sweep as the study at toy scale runs it (COUNT=4, ABLATE=1, RANDOM_CONTROLS=2): every corner's step
    files (its heads found on the discovery half of the pairs: ids 0 and 2), the analysis and the ablations of the
    unique and the shared heads (on the held-out test half: ids 1 and 3)."""
    out, pairs = tiny_study["out"] / family / "corners", int(tiny_study["env"]["COUNT"])
    n = len(range(0, pairs, 2))
    log = (tiny_study["out"] / "logs" / f"{family}-corners.log").read_text()
    assert json.loads((tiny_study["out"] / "steps" / f"{family}-corners.json").read_text())["status"] == "ok"
    if family == "llava":  # the first sweep of the study finds no pairs and generates them
        assert "NOTICE: no data for corner(s) topleft,topright,bottomleft,bottomright" in log
    adapter = tiny_models[family]
    L, H = adapter.num_layers, adapter.num_heads
    for corner in CORNERS:
        folder = out / f"head_diff_stats_{corner}"
        for name in STEP_FILES:
            assert (folder / name).is_file() and (folder / name).stat().st_size > 0, folder / name
        full, control = np.load(folder / "scores_full_LHN.npy"), np.load(folder / "scores_control_LHN.npy")
        count, count_lh = np.load(folder / "count_LHN.npy"), np.load(folder / "count_LH.npy")
        assert full.shape == control.shape == count.shape == (L, H, n)
        assert full.dtype == control.dtype == np.float32 and count.dtype == np.uint8
        blank_block = np.load(folder / "scores_blank_LHM.npy")
        blank_image = np.load(folder / "scores_blank_image_LHM.npy")
        assert blank_block.shape == blank_image.shape == (L, H, 1) and (blank_block <= blank_image + 1e-6).all()
        assert (count.sum(axis=1) == 3).all() and (count_lh == count.sum(-1)).all()
        assert ((full >= 0) & (full <= 1 + 1e-5)).all() and not np.array_equal(full, control)
        meta = json.loads((folder / "meta.json").read_text())
        assert meta["model"] == family and meta["corner"] == corner and meta["layers"] == list(range(1, L + 1))
        assert (meta["L"], meta["H"], meta["N"], meta["topk"]) == (L, H, n, 3)
        assert meta["prompt"] == f"Is there anything in the {CORNER_WORDS[corner]} corner?"
        assert meta["patch_size"] is None and "torch" in meta["versions"]
        assert meta["blank_block"]["corner"] == corner and meta["skipped"]["count"] == 0
        with open(folder / "answers.csv") as f:
            assert [row["id"] for row in csv.DictReader(f)] == [str(i) for i in range(0, pairs, 2)]
    for name in ANALYSIS_FILES:
        assert (out / "count_shared_unique" / name).is_file(), name
    summary = json.loads((out / "count_shared_unique" / "summary.json").read_text())
    assert summary["layers"] == list(range(1, L + 1))
    for corner in CORNERS:  # the ABLATE=1 step
        for heads in ("unique", "shared"):
            folder = out / f"ablation_{corner}_{heads}"
            for name in ("ablation.csv", "summary.json", "run.json", "figures/effect_vs_random.png"):
                assert (folder / name).is_file(), folder / name
            with open(folder / "ablation.csv") as f:
                rows = list(csv.DictReader(f))
            assert {r["head_set"] for r in rows} == {"chosen", "random_0", "random_1"}
            assert len(rows) == 3 * n * 2  # head sets x pairs x image kinds
            assert {r["pair_id"] for r in rows} == {str(i) for i in range(1, pairs, 2)}
            assert json.loads((folder / "summary.json").read_text())["pairs"] == {
                "tested_on": "test", "heads_found_on": "discovery", "held_out": True}


def test_failing_step_stops_the_sweep(tmp_path):
    generate_counterfactual(tmp_path / "data", count=1)
    done = run_sweep(tmp_path, MODEL="llava", DEVICE="nonsense", COUNT="1")  # passed on; the scoring step refuses
    assert done.returncode == 2
    assert "error: --device 'nonsense': not a device" in done.stderr
    assert "== shared / unique" not in done.stderr and not (tmp_path / "out" / "count_shared_unique").exists()


@pytest.mark.parametrize("options, message", [
    (["--max-new-tokens", "0"], "--max-new-tokens 0: must be at least 1"),
    (["--patch-size", "0"], "--patch-size 0: must be at least 1"),
    (["--corner", "topright"], "--corner topright only applies with --patch-size"),
    (["--topk", "0"], "--topk 0: must be at least 1"),
    (["--feed-size", "0"], "--feed-size 0: must be at least 1"),
    (["--seed", "-1"], "--seed -1: must be 0 or more"),
    (["--model", "qwen2", "--feed-size", "13"], "--feed-size 13: Qwen2-VL needs a multiple of 28"),
    (["--prompt", "{foo}"], "--prompt '{foo}': '{corner}' is the only placeholder"),
    (["--prompt", "Is it in the {corner"], "'{corner}' is the only placeholder"),
    (["--prompt", "{0} corner?"], "'{corner}' is the only placeholder"),
    (["--prompt", ""], "--prompt '': empty"),
    (["--score", "patching", "--patch-size", "2"], "--patch-size does not apply to --score patching"),
    (["--score", "patching", "--max-new-tokens", "3"], "--max-new-tokens does not apply to --score patching"),
])
def test_bad_options_fail_before_loading(options, message, topleft, capsys, no_model_load):
    with pytest.raises(SystemExit) as exit_info:  # a later --model wins
        main(["--model", "llava", "--model-path", "no-such-checkpoint", "--dataset", str(topleft), *options])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


# --- what is scored -----------------------------------------------------------------

@pytest.mark.parametrize("corner", CORNERS)
def test_scored_positions_are_the_corner_cells(adapter, corner):
    """Mark the corner block in the picture and find which image tokens' pixels changed
    (LLaVA: the 14 px patches of pixel_values; Qwen2-VL: each merged token's 2x2 patches,
    consecutive rows of pixel_values), then map those cells to token positions by the
    order of the image tokens. Qwen2-VL is fed non-square (224 x 336)."""
    if adapter.family == "qwen2":
        adapter.set_feed_size((224, 336))
        height, width, cell = 224, 336, 28
    else:
        height, width, cell = 336, 336, 14
    blank = Image.new("RGB", (width, height), (245, 245, 245))
    batch = adapter.encode([PROMPT], [blank])
    layout = batch.layouts[0]
    gh, gw = layout.grid
    assert (gh, gw) == (height // cell, width // cell)
    assert np.array_equal(_scored_positions(layout, corner, None), layout.image_positions)
    for k in (2, 3):
        marked = blank.copy()
        x0 = 0 if corner.endswith("left") else width - k * cell
        y0 = 0 if corner.startswith("top") else height - k * cell
        marked.paste((0, 0, 0), (x0, y0, x0 + k * cell, y0 + k * cell))
        diff = (adapter.encode([PROMPT], [marked]).inputs["pixel_values"]
                - batch.inputs["pixel_values"]).abs().float()
        if adapter.family == "qwen2":
            per_token = diff.mean(-1).view(gh * gw, -1).mean(-1)  # rows: merged cells in raster order, 4 each
        else:
            per_token = diff[0].mean(0).view(gh, 14, gw, 14).mean((1, 3)).flatten()
        changed = torch.nonzero(per_token > 0.5 * per_token.max()).flatten().tolist()
        assert changed == corner_cells((gh, gw), corner, k)
        positions = _scored_positions(layout, corner, k)
        assert positions.tolist() == layout.image_positions[changed].tolist()
        assert (layout.input_ids[positions] == adapter.model.config.image_token_id).all()


# --- the scores against the eager reference --------------------------------------------

def reference_scores(adapter, folder: Path, columns) -> np.ndarray:
    """[2N + 1, L, H]: the eager reference's last-position mass on ``columns(layout)`` for the
    images full_0, control_0, full_1, ..., blank, all in one batch."""
    pairs = read_pairs(folder)
    images = [im for pair in pairs for im in pair.load_images()]
    images.append(Image.new("RGB", images[0].size, (245, 245, 245)))
    batch = adapter.encode([PROMPT] * len(images), images)
    request = CaptureRequest(layers=list(range(adapter.num_layers)),
                             last_mass=[columns(lay) for lay in batch.layouts])
    recordings, _ = reference_capture(adapter, batch, request)
    return np.stack([r["last_mass"] for r in recordings])


def test_scores_equal_reference_and_batching(adapter, topleft, tmp_path):
    one = run_step(adapter, topleft, tmp_path / "b1", "--batch-size", "1")
    three = run_step(adapter, topleft, tmp_path / "b3", "--batch-size", "3", "--layers", "1,3")
    L, H = adapter.num_layers, adapter.num_heads
    assert one["scores_full_LHN"].shape == (L, H, 3) and one["meta"]["layers"] == list(range(1, L + 1))
    assert three["scores_full_LHN"].shape == (2, H, 3) and three["meta"]["layers"] == [1, 3]
    assert three["scores_blank_LHM"].shape == (2, H, 1) and three["count_LH"].shape == (2, H)
    for name in ("scores_full_LHN", "scores_control_LHN", "scores_blank_LHM", "scores_blank_image_LHM"):
        np.testing.assert_allclose(three[name], one[name][[0, 2]], atol=1e-5)
    assert (three["count_LHN"] == one["count_LHN"][[0, 2]]).all()
    assert three["answers"] == one["answers"]
    assert one["meta"]["prompt_template"] == CORNER_PROMPT and one["meta"]["dtype"] == "float32"

    want = reference_scores(adapter, topleft, lambda lay: lay.image_positions)
    np.testing.assert_allclose(one["scores_full_LHN"], np.moveaxis(want[0:6:2], 0, -1), atol=1e-5)
    np.testing.assert_allclose(one["scores_control_LHN"], np.moveaxis(want[1:6:2], 0, -1), atol=1e-5)
    np.testing.assert_allclose(one["scores_blank_image_LHM"][..., 0], want[6], atol=1e-5)


def test_patch_scores_equal_reference(adapter, topleft, tmp_path):
    """--patch-size 2 --corner bottomright on top-left pairs: the score covers the bottom-right block only."""
    got = run_step(adapter, topleft, tmp_path / "patch", "--batch-size", "3", "--patch-size", "2",
                   "--corner", "bottomright")
    assert got["meta"]["patch_size"] == 2 and got["meta"]["patch_corner"] == "bottomright"
    want = reference_scores(adapter, topleft,
                            lambda lay: lay.image_positions[corner_cells(lay.grid, "bottomright", 2)])
    np.testing.assert_allclose(got["scores_full_LHN"], np.moveaxis(want[0:6:2], 0, -1), atol=1e-5)
    np.testing.assert_allclose(got["scores_control_LHN"], np.moveaxis(want[1:6:2], 0, -1), atol=1e-5)
    np.testing.assert_allclose(got["scores_blank_LHM"][..., 0], want[6], atol=1e-5)
    assert (got["scores_full_LHN"] < 0.5).all()  # 4 of the image's tokens


def test_three_new_tokens_average_three_steps(adapter, topleft, tmp_path):
    """--max-new-tokens 3: the score is the mean over the three greedy steps, redone here
    by hand with the eager reference (no cache: each step re-runs the whole sequence)."""
    got = run_step(adapter, topleft, tmp_path / "gen", "--max-new-tokens", "3", "--max-pairs", "1")
    full_image = read_pairs(topleft)[0].load_images()[0]
    batch = adapter.encode([PROMPT], [full_image])
    layout = batch.layouts[0]
    request = CaptureRequest(layers=list(range(adapter.num_layers)), last_mass=[layout.image_positions])
    inputs, steps, tokens = dict(batch.inputs), [], []
    for _ in range(3):
        recordings, logits = reference_capture(adapter, Batch(inputs, [layout]), request)
        steps.append(recordings[0]["last_mass"])
        token = int(logits[0].argmax())
        tokens.append(token)
        if token == adapter.tokenizer.eos_token_id:
            break
        new = torch.tensor([[token]], device=inputs["input_ids"].device)
        inputs["input_ids"] = torch.cat([inputs["input_ids"], new], dim=1)
        inputs["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(new)], dim=1)
        if "mm_token_type_ids" in inputs:  # Qwen2-VL: 0 = a text token
            inputs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(new)], dim=1)
        layout = replace(layout, input_ids=np.append(layout.input_ids, token))
    assert len(steps) == 3, "the tiny model stopped early; pick another pair"
    np.testing.assert_allclose(got["scores_full_LHN"][..., 0], np.mean(steps, axis=0), atol=1e-5)
    assert not np.allclose(got["scores_full_LHN"][..., 0], steps[0], atol=1e-4)  # not just the first step
    assert got["answers"][0]["full_answer"] == adapter.tokenizer.decode(tokens, skip_special_tokens=True).strip()
    assert got["meta"]["max_new_tokens"] == 3


# --- the blank (position-only) control ---------------------------------------------------

def quarter_cells(grid: tuple[int, int], corner: str) -> list[int]:
    """Raster indices of the corner quarter (gh // 2 rows x gw // 2 cols), cell by cell."""
    gh, gw = grid
    rows = range(gh // 2) if corner.startswith("top") else range(gh - gh // 2, gh)
    cols = range(gw // 2) if corner.endswith("left") else range(gw - gw // 2, gw)
    return sorted(r * gw + c for r in rows for c in cols)


@pytest.fixture(scope="module")
def two_corners(tmp_path_factory) -> dict[str, Path]:
    """One top-left and one bottom-right pair."""
    folders = generate_counterfactual(tmp_path_factory.mktemp("two"), count=1, corners=["topleft", "bottomright"])
    return dict(zip(["topleft", "bottomright"], folders))


def test_default_blank_control_is_about_the_corner(adapter, two_corners, tmp_path):
    """Without --patch-size the pairs are scored on all image tokens, but the blank image on the corner
    quarter: with one prompt for both corners the blank scores differ between them only there."""
    got = {corner: run_step(adapter, folder, tmp_path / corner, "--prompt", "Is there anything here?")
           for corner, folder in two_corners.items()}
    blank = Image.new("RGB", read_pairs(two_corners["topleft"])[0].load_images()[1].size, (245, 245, 245))
    batch = adapter.encode(["Is there anything here?"], [blank])
    gh, gw = batch.layouts[0].grid
    for corner, saved in got.items():
        assert saved["meta"]["blank_block"] == {"corner": corner, "rows": gh // 2, "cols": gw // 2, "grid": [gh, gw]}
        assert saved["meta"]["patch_size"] is None
        block = batch.layouts[0].image_positions[quarter_cells((gh, gw), corner)]
        recordings, _ = reference_capture(adapter, batch, CaptureRequest(layers=list(range(adapter.num_layers)),
                                                                         last_mass=[block]))
        np.testing.assert_allclose(saved["scores_blank_LHM"][..., 0], recordings[0]["last_mass"], atol=1e-5)
        assert (saved["scores_blank_LHM"] < saved["scores_blank_image_LHM"]).all()
    np.testing.assert_allclose(got["topleft"]["scores_blank_image_LHM"], got["bottomright"]["scores_blank_image_LHM"],
                               atol=1e-5)  # the same picture and prompt
    assert np.abs(got["topleft"]["scores_blank_LHM"] - got["bottomright"]["scores_blank_LHM"]).max() > 1e-3


# --- resume and unusable pairs ------------------------------------------------------------

def test_killed_run_resumes_with_the_missing_pairs(tiny_models, topleft, tmp_path, monkeypatch):
    adapter = tiny_models["llava"]
    whole = run_step(adapter, topleft, tmp_path / "whole", "--batch-size", "1")
    out = tmp_path / "killed"
    real = corner_stats.score_images
    calls = []

    def killed_after_first_batch(*args, **kwargs):
        if calls:
            raise RuntimeError("killed")
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(corner_stats, "score_images", killed_after_first_batch)
    with pytest.raises(RuntimeError, match="killed"):
        run_step(adapter, topleft, out, "--batch-size", "1")
    assert [r["id"] for r in read_jsonl(out / PAIRS_FILE)] == [0] and not (out / "meta.json").exists()

    n_images = []

    def counting(adapter_, images, *args, **kwargs):
        n_images.append(len(images))
        return real(adapter_, images, *args, **kwargs)

    monkeypatch.setattr(corner_stats, "score_images", counting)
    resumed = run_step(adapter, topleft, out, "--batch-size", "1")
    assert n_images == [2, 2, 2]  # pairs 1 and 2, then the blank image twice
    assert [r["id"] for r in read_jsonl(out / PAIRS_FILE)] == [0, 1, 2]
    for name in ARRAYS:
        assert np.array_equal(resumed[name], whole[name]), name
    assert resumed["answers"] == whole["answers"]
    assert resumed["meta"]["pair_ids"] == whole["meta"]["pair_ids"] == [0, 1, 2]

    n_images.clear()  # complete: a rerun scores nothing
    run_step(adapter, topleft, out, "--batch-size", "1")
    assert n_images == []
    for options, option in ((["--layers", "1,3"], "--layers"), (["--prompt", "Anything?"], "--prompt"),
                            (["--patch-size", "2"], "--patch-size"), (["--max-new-tokens", "2"], "--max-new-tokens")):
        with pytest.raises(OptionError, match=f"its results were made with {option} "):
            run_step(adapter, topleft, out, *options)


def test_unreadable_image_skips_its_pair(tiny_models, topleft, tmp_path, caplog):
    adapter = tiny_models["llava"]
    folder = tmp_path / "dataset_topleft"
    shutil.copytree(topleft, folder)
    damaged = folder / "images" / "pair_00001_control.png"
    damaged.write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    with caplog.at_level(logging.WARNING, logger="spatial_attention"):
        got = run_step(adapter, folder, tmp_path / "out")
    assert got["scores_full_LHN"].shape[-1] == 2 and got["meta"]["pair_ids"] == [0, 2]
    skipped = got["meta"]["skipped"]
    assert skipped["count"] == 1 and skipped["by_reason"] == {"unusable_images": 1}
    assert skipped["pairs"][0]["id"] == 1 and str(damaged) in skipped["pairs"][0]["detail"]
    assert any("skipping pair 1" in r.getMessage() for r in caplog.records)
    shutil.copy(topleft / "images" / "pair_00001_control.png", damaged)  # repaired: the rerun adds pair 1 in order
    again = run_step(adapter, folder, tmp_path / "out")
    assert again["meta"]["pair_ids"] == [0, 1, 2] and again["meta"]["skipped"]["count"] == 0
    assert np.array_equal(again["scores_full_LHN"][..., [0, 2]], got["scores_full_LHN"])


def test_out_dir_that_is_a_file_fails_before_loading(topleft, tmp_path, capsys, no_model_load):
    taken = tmp_path / "a_file"
    taken.write_text("")
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", "llava", "--model-path", "tiny-random", "--dataset", str(topleft), "--out-dir", str(taken)])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and err[0].startswith(f"error: --out-dir {taken}: is a file")


# --- what a rerun checks, before and after the model loads ---------------------------------

@pytest.fixture(scope="module")
def scored(tiny_models, topleft, tmp_path_factory) -> dict[str, Path]:
    """family -> an out-dir with the three top-left pairs scored (Qwen2-VL fed at 224)."""
    tiny_models["qwen2"].set_feed_size(224)
    outs = {}
    for family, adapter in tiny_models.items():
        outs[family] = tmp_path_factory.mktemp(f"scored_{family}")
        run_step(adapter, topleft, outs[family])
    return outs


def copy_of(out: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    return copy


def rerun(family: str, folder: Path, out: Path, *options: str) -> None:
    """main() on the CPU, as the scored fixture was run (with no_model_load: it ends at the load)."""
    feed = ["--feed-size", "224"] if family == "qwen2" else []
    main(["--model", family, "--model-path", "tiny-random", "--device", "cpu", "--dataset", str(folder),
          "--out-dir", str(out), *feed, *options])


def one_line_error(capsys, exit_info) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1, err
    return err[0]


@pytest.mark.parametrize("family", ["llava", "qwen2"])
def test_settings_known_before_loading_are_the_loaded_ones(family, tiny_models, topleft):
    """What main() compares before the load is what the loaded model gives (else a valid resume is refused)."""
    adapter = tiny_models[family]
    adapter.set_feed_size(224)
    for layers in ([], ["--layers", "1,3"]):
        args = stats_args(family, "--model-path", "tiny-random", "--device", "cpu", "--feed-size", "224", *layers)
        dataset, scoring = read_dataset(topleft, None), check_scoring(args)
        before = identity(ModelOptions.from_args(family, args).identity(DEFAULT_LAYERS), scoring, dataset)
        after = identity(session_run(adapter, args).identity(), scoring, dataset)
        assert before == {key: after[key] for key in before}
        assert ("--layers" in before) == bool(layers) and after["--dataset"] == str(topleft.resolve())


@pytest.mark.parametrize("family", ["llava", "qwen2"])
def test_matching_rerun_reaches_the_load(family, scored, topleft, tmp_path, no_model_load):
    with pytest.raises(AssertionError, match="a model was loaded"):
        rerun(family, topleft, copy_of(scored[family], tmp_path))


@pytest.mark.parametrize("family, options, option", [
    ("llava", ["--model-path", "other-checkpoint"], "--model-path"),
    ("llava", ["--revision", "v2"], "--revision"),
    ("llava", ["--dtype", "bf16"], "--dtype"),
    ("llava", ["--prompt", "Anything in the {corner}?"], "--prompt"),
    ("llava", ["--patch-size", "2"], "--patch-size"),
    ("llava", ["--max-new-tokens", "2"], "--max-new-tokens"),
    ("llava", ["--layers", "1,3"], "--layers"),
    ("qwen2", ["--feed-size", "336"], "--feed-size"),
])
def test_changed_setting_is_refused_before_loading(family, options, option, scored, topleft, tmp_path, capsys,
                                                   no_model_load):
    with pytest.raises(SystemExit) as exit_info:
        rerun(family, topleft, copy_of(scored[family], tmp_path), *options)  # a later --feed-size wins
    assert f"its results were made with {option} " in one_line_error(capsys, exit_info)


def test_rerun_on_another_dataset_of_the_corner_is_refused(tiny_models, scored, topleft, tmp_path, capsys,
                                                           no_model_load):
    """Pair ids 0-2 again, but other pictures: another folder, or the same folder regenerated."""
    out = copy_of(scored["llava"], tmp_path)
    other = generate_counterfactual(tmp_path / "other", count=3, image_size=80, seed=9, corners=["topleft"])[0]
    with pytest.raises(SystemExit) as exit_info:
        rerun("llava", other, out)
    assert f"its results were made with --dataset {str(topleft.resolve())!r}" in one_line_error(capsys, exit_info)
    with pytest.raises(OptionError, match="made with --dataset "):  # the same check after the load
        run_step(tiny_models["llava"], other, out)

    regenerated = tmp_path / "regenerated" / "dataset_topleft"
    shutil.copytree(topleft, regenerated)
    run_step(tiny_models["llava"], regenerated, tmp_path / "out2")
    capsys.readouterr()  # its progress bars
    shutil.rmtree(regenerated)
    generate_counterfactual(regenerated.parent, count=3, image_size=80, seed=9, corners=["topleft"])
    with pytest.raises(SystemExit) as exit_info:
        rerun("llava", regenerated, tmp_path / "out2")
    assert "made with --dataset (sha256 of its metadata.jsonl) " in one_line_error(capsys, exit_info)

    settings = json.loads((out / IDENTITY_FILE).read_text())  # an out-dir from before the data set was recorded
    del settings["--dataset"], settings["--dataset (sha256 of its metadata.jsonl)"]
    (out / IDENTITY_FILE).write_text(json.dumps(settings))
    with pytest.raises(SystemExit) as exit_info:
        rerun("llava", topleft, out)
    assert "does not record --dataset, so there is no telling" in one_line_error(capsys, exit_info)


def insert_line(path: Path, number: int, line: str) -> None:
    lines = path.read_text().splitlines(keepends=True)
    lines.insert(number - 1, line + "\n")
    path.write_text("".join(lines))


@pytest.mark.parametrize("line, problem", [
    ("[1, 2]", "not a JSON object"),
    ('{"id": 3}', "lacks full, control, full_answer, control_answer"),
    ('{"id": 3, "full": [[0.1]], "control": [[0.1]], "full_answer": "", "control_answer": ""}',
     "full has shape [1, 1], but pair 0's has ["),
    ('{"id": 3, "full": [0.1], "control": [0.1], "full_answer": "", "control_answer": ""}',
     "full has shape [1], not [layers, heads]"),
    ('{"id": 3, "full": "high", "control": [[0.1]], "full_answer": "", "control_answer": ""}',
     "full is not a table of numbers"),
    ('{"id": [3], "full": [[0.1]], "control": [[0.1]], "full_answer": "", "control_answer": ""}',
     "id [3] is not a pair id"),
])
def test_foreign_results_line_fails_before_loading(line, problem, scored, topleft, tmp_path, capsys, no_model_load):
    out = copy_of(scored["llava"], tmp_path)
    insert_line(out / PAIRS_FILE, 2, line)
    with pytest.raises(SystemExit) as exit_info:
        rerun("llava", topleft, out)
    error = one_line_error(capsys, exit_info)
    assert error.startswith(f"error: {out / PAIRS_FILE}, line 2: not a result record here ({problem}")
    assert error.endswith("; delete that line to redo its item, or use another output folder")


def test_damaged_middle_line_fails_before_loading(scored, topleft, tmp_path, capsys, no_model_load):
    out = copy_of(scored["llava"], tmp_path)
    insert_line(out / PAIRS_FILE, 2, '{"id": 1, "full": [[0.1')
    with pytest.raises(SystemExit) as exit_info:
        rerun("llava", topleft, out)
    assert f"{out / PAIRS_FILE}, line 2: not a JSON record" in one_line_error(capsys, exit_info)


def test_foreign_results_line_is_named_after_loading(tiny_models, scored, topleft, tmp_path):
    out = copy_of(scored["llava"], tmp_path)
    (out / PAIRS_FILE).write_text((out / PAIRS_FILE).read_text() + "\n[1, 2]\n")  # a blank line counts
    with pytest.raises(DataError, match=rf"{PAIRS_FILE}, line 5: not a result record here \(not a JSON object\); "):
        run_step(tiny_models["llava"], topleft, out)
