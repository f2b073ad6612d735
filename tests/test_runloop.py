"""The one run loop (runloop.py): results never mixed or duplicated, and every option checked before a model
loads. The loop itself on made-up items; then what a new user tried on experiments 1 and 2 (tiny-random):
a rerun with other layers or another family into the same --out, two runs on one --out, and a narrower
rerun whose summary must cover only what it asked for."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from spatial_attention.common.errors import DataError, OptionError
from spatial_attention.common.runio import append_jsonl, claim_output, lacks_keys, release_outputs
from spatial_attention.data.generate import generate_counterfactual, generate_shapeworld
from spatial_attention.experiments import ablation, corner_stats, text_analysis, verify, vlm_analysis
from spatial_attention.run.runloop import (IDENTITY_FILE, RESULTS_KEY, ProcessShare, Results, ahead, check_free,
                                           mark_results, resumable_map, resumable_map_many)

REPO = Path(__file__).resolve().parents[1]
FAST = ["--model-path", "tiny-random", "--plot-samples", "0"]


def results_at(path: Path) -> Results:
    return Results(path, item_key=lambda item: item, record_key=lambda record: record["key"],
                   check=lacks_keys("key", "value"))


def square(chunk: list[int]) -> list[dict]:
    return [{"key": k, "value": k * k} for k in chunk]


@pytest.fixture(scope="module")
def share() -> ProcessShare:
    return ProcessShare("cpu")


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# --- the loop -------------------------------------------------------------------------

def test_each_key_is_written_once_and_the_result_is_what_was_asked(share, tmp_path):
    path = tmp_path / "out" / "records.jsonl"
    done = []

    def fn(chunk):
        done.extend(chunk)
        return square(chunk)

    got = resumable_map(share, results_at(path), [3, 1, 3, 2, 1], fn, {"--x": 1}, batch_size=2)
    assert done == [3, 1, 2] and [r["key"] for r in got] == [3, 1, 2]
    assert json.loads((path.parent / IDENTITY_FILE).read_text()) == {RESULTS_KEY: "records.jsonl", "--x": 1}

    done.clear()  # a narrower rerun: nothing to do, and only its own records come back
    assert [r["key"] for r in resumable_map(share, results_at(path), [2], fn, {"--x": 1})] == [2]
    assert done == [] and [r["key"] for r in lines(path)] == [3, 1, 2]

    done.clear()  # a wider one does only the new items
    got = resumable_map(share, results_at(path), [0, 1, 2, 3, 4], fn, {"--x": 1})
    assert done == [0, 4] and [r["key"] for r in got] == [0, 1, 2, 3, 4] and len(lines(path)) == 5
    # read from the file as they are iterated (in the items' order, not the file's), not held in memory
    assert len(got) == 5 and list(got) == [lines(path)[i] for i in (3, 1, 2, 0, 4)]
    assert not any(isinstance(value, list) and value and isinstance(value[0], dict) for value in vars(got).values())


def test_several_results_files_share_each_item_and_each_resumes_what_it_lacks(share, tmp_path):
    """One item's work, a record for each of two folders (two --heads specs of one ablation): an item runs when
    either folder lacks it, and each record goes only where it is missing; each folder has its own identity."""
    a, b = results_at(tmp_path / "a" / "records.jsonl"), results_at(tmp_path / "b" / "records.jsonl")
    resumable_map(share, a, [1, 2], square, {"--heads": "a"})  # a has 1 and 2 from an earlier, interrupted run
    done = []

    def both(chunk, wanted):
        done.append((chunk, wanted))
        return zip(square(chunk) if wanted[0] else [None] * len(chunk), [{"key": k, "value": -k} for k in chunk])

    got = resumable_map_many(share, [(a, {"--heads": "a"}), (b, {"--heads": "b"})], [1, 2, 3], both, batch_size=2)
    assert done == [([1, 2], (False, True)), ([3], (True, True))]  # b lacked them all; a's work not redone
    assert [r["value"] for r in lines(a.path)] == [1, 4, 9] and [r["value"] for r in lines(b.path)] == [-1, -2, -3]
    assert [list(records) for records in got] == [lines(a.path), lines(b.path)]
    assert (got[0].made, got[1].made) == (1, 3)  # what each folder was given
    assert json.loads((b.path.parent / IDENTITY_FILE).read_text())["--heads"] == "b"
    done.clear()
    assert resumable_map_many(share, [(a, {"--heads": "a"}), (b, {"--heads": "b"})], [3], both)[1].made == 0
    assert done == []
    with pytest.raises(OptionError, match="--heads 'a', not 'c'"):  # each folder's identity is its own
        resumable_map_many(share, [(a, {"--heads": "c"}), (b, {"--heads": "b"})], [4], both)


def test_prepare_runs_one_batch_ahead_in_another_thread(share, tmp_path):
    """With ``prepare``, batch i + 1 is prepared in a background thread while ``fn`` works on batch i (``fn`` waits
    for it to start: were it prepared after, the wait would time out), ``fn`` gets the prepared batches in order,
    the records are the same, and ``made`` counts this call's items."""
    started = {key: threading.Event() for key in range(1, 7)}
    threads, given, waited = set(), [], []

    def prepare(chunk):
        threads.add(threading.current_thread() is threading.main_thread())
        started[chunk[0]].set()
        return [k * 10 for k in chunk]

    def fn(prepared):
        given.append(prepared)
        following = prepared[0] // 10 + 2
        if following <= 5:
            waited.append(started[following].wait(timeout=30))
        return [{"key": k // 10, "value": k} for k in prepared]

    got = resumable_map(share, results_at(tmp_path / "records.jsonl"), [1, 2, 3, 4, 5], fn, {}, batch_size=2,
                        prepare=prepare)
    assert [r["key"] for r in got] == [1, 2, 3, 4, 5] and got.made == 5
    assert given == [[10, 20], [30, 40], [50]] and waited == [True, True] and threads == {False}
    assert resumable_map(share, results_at(tmp_path / "records.jsonl"), [1, 6], fn, {}, prepare=prepare).made == 1


def test_an_error_while_preparing_is_raised_where_its_batch_is_taken():
    def prepare(chunk):
        if chunk == [2]:
            raise DataError("unreadable")
        return chunk

    taken = []
    with pytest.raises(DataError, match="unreadable"):
        for prepared in ahead(prepare, [[1], [2], [3]]):
            taken.append(prepared)
    assert taken == [[1]]


def test_other_identity_is_refused_naming_the_setting(share, tmp_path):
    path = tmp_path / "records.jsonl"
    resumable_map(share, results_at(path), [1], square, {"--layers": [1, 2], "--seed": 0})
    with pytest.raises(OptionError) as err:
        resumable_map(share, results_at(path), [1, 2], square, {"--layers": [1], "--seed": 0})
    assert str(err.value) == (f"--out {tmp_path}: its results were made with --layers [1, 2], not [1]; rerun with "
                              f"the same setting to resume, or choose another --out")
    assert len(lines(path)) == 1
    path.write_text("")  # no results: any identity may start there
    resumable_map(share, results_at(path), [1], square, {"--layers": [1]})
    assert json.loads((tmp_path / IDENTITY_FILE).read_text()) == {RESULTS_KEY: "records.jsonl", "--layers": [1]}


def test_part_files_of_a_killed_multi_process_run_are_merged_once(share, tmp_path):
    path = tmp_path / "records.jsonl"
    (tmp_path / IDENTITY_FILE).write_text(json.dumps({RESULTS_KEY: "records.jsonl", "--x": 1}))
    append_jsonl(path, {"key": 9, "value": 81})  # an earlier run's item, not asked for now
    append_jsonl(tmp_path / "records.part0.jsonl", {"key": 2, "value": 4})
    append_jsonl(tmp_path / "records.part1.jsonl", {"key": 1, "value": 1})
    append_jsonl(tmp_path / "records.part1.jsonl", {"key": 2, "value": -1})  # written twice: the first one counts
    got = resumable_map(share, results_at(path), [1, 2, 3], square, {"--x": 1})
    assert [(r["key"], r["value"]) for r in got] == [(1, 1), (2, 4), (3, 9)]
    assert [r["key"] for r in lines(path)] == [1, 2, 3, 9] and not list(tmp_path.glob("*.part*"))


# --- experiments 1 and 2 -----------------------------------------------------------------

@pytest.fixture(scope="module")
def worlds(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sw")
    generate_shapeworld(root, shards=2, worlds_per_shard=6, seed=5)
    return root


@pytest.fixture(scope="module")
def exp1(worlds, tmp_path_factory) -> Path:
    """Experiment 1 on tiny LLaVA, all 12 worlds."""
    out = tmp_path_factory.mktemp("exp1") / "out"
    vlm_analysis.main("llava", [*FAST, "--data", str(worlds), "--out", str(out)])
    return out


def one_error_line(capsys, run) -> str:
    with pytest.raises(SystemExit) as exit_info:
        run()
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert exit_info.value.code == 2 and len(errors) == 1, errors
    return errors[0]


@pytest.mark.parametrize("family, options, difference", [
    ("llava", ["--layers", "1"], "with --layers [1, 2, 3, 4], not [1]"),
    ("qwen2", [], "with the model family (--model; experiments 1 and 2: the script) 'llava', not 'qwen2'"),
    ("llava", ["--seed", "1"], "with --seed 0, not 1"),
    ("llava", ["--no-baseline"], "without --no-baseline, and this run is with it"),
])
def test_experiment_1_rerun_with_other_settings_is_refused_before_loading(family, options, difference, exp1,
                                                                          worlds, capsys, no_model_load):
    """Was: pooled silently with the earlier records."""
    before = (exp1 / "samples.jsonl").read_text()
    error = one_error_line(capsys, lambda: vlm_analysis.main(
        family, [*FAST, "--data", str(worlds), "--out", str(exp1), *options]))
    assert error == (f"error: --out {exp1}: its results were made {difference}; rerun with the same setting "
                     f"to resume, or choose another --out")
    assert (exp1 / "samples.jsonl").read_text() == before


def test_experiment_1_layers_mode_is_refused_once_the_depth_is_known(exp1, worlds):
    """'last_2' names layers only once the model's depth is known: refused after the load, before any world
    and before run.json changes."""
    before = {name: (exp1 / name).read_text() for name in ("samples.jsonl", "summary.json", "run.json")}
    with pytest.raises(OptionError, match=r"its results were made with --layers \[1, 2, 3, 4\], not \[3, 4\]"):
        vlm_analysis.main.__wrapped__("llava", [*FAST, "--data", str(worlds), "--out", str(exp1),
                                                "--layers", "last_2"])
    assert {name: (exp1 / name).read_text() for name in before} == before


def test_experiment_1_narrower_rerun_summarises_only_what_it_asks_for(exp1, worlds, tmp_path):
    """Was: --relations left --limit 5 kept every earlier world in the summary."""
    out = tmp_path / "out"
    out.mkdir()
    for name in ("samples.jsonl", IDENTITY_FILE):
        (out / name).write_bytes((exp1 / name).read_bytes())
    vlm_analysis.main("llava", [*FAST, "--data", str(worlds), "--out", str(out), "--relations", "left",
                                "--limit", "2"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_worlds"] == 2 and list(summary["n_worlds_by_relation"]) == ["left"]
    assert (out / "samples.jsonl").read_text() == (exp1 / "samples.jsonl").read_text()  # nothing redone


def test_experiment_2_rerun_with_the_other_family_is_refused_before_loading(worlds, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    text_analysis.main("llava", ["--model-path", "tiny-random", "--data", str(worlds), "--out", str(out),
                                 "--limit", "2"])
    import models

    monkeypatch.setattr(models, "load_adapter", lambda *a, **k: pytest.fail("a model was loaded"))
    error = one_error_line(capsys, lambda: text_analysis.main(
        "qwen2", ["--model-path", "tiny-random", "--data", str(worlds), "--out", str(out)]))
    assert "its results were made with the model family (--model; experiments 1 and 2: the script) 'llava', " \
           "not 'qwen2'" in error


def test_a_folder_holding_another_commands_results_is_refused(share, tmp_path):
    """E.g. an ablation pointed at a stats dir: its identity.json, run.json and summary would be written over."""
    resumable_map(share, results_at(tmp_path / "pairs_scores.jsonl"), [1], square, {"--x": 1})
    with pytest.raises(OptionError, match=r"holds the results of another command \(pairs_scores.jsonl\)"):
        resumable_map(share, results_at(tmp_path / "ablation_pairs.jsonl"), [1], square, {"--x": 1})


def test_a_second_run_on_one_out_stops_in_one_line(worlds, tmp_path, capsys, no_model_load):
    """Was: two processes on one --out wrote every world twice (n = 24 for 12 worlds)."""
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]); "
                               "from spatial_attention.common.runio import claim_output; "
                               "claim_output(sys.argv[2], '--out'); print('claimed', flush=True); time.sleep(60)",
         str(REPO), str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "claimed"
        error = one_error_line(capsys, lambda: vlm_analysis.main("llava", [*FAST, "--data", str(worlds),
                                                                           "--out", str(out)]))
    finally:
        holder.kill()
        holder.wait()
    assert error == (f"error: --out {out}: another run (process {holder.pid}) is writing there now; wait for it to "
                     f"finish, or choose another --out")
    assert not (out / "samples.jsonl").exists()


def test_two_processes_on_one_out_write_each_world_once(worlds, tmp_path):
    """Two runs of experiment 1 started together on one --out: one does the work; the other stops in one line
    (or, when it reaches the folder after the first has finished, finds every world done)."""
    out = tmp_path / "out"
    command = [sys.executable, str(REPO / "vlm_atten_analysis_llava.py"), *FAST, "--data", str(worlds), "--out",
               str(out), "--limit", "4"]
    runs = [subprocess.Popen(command, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    ended = [(run.communicate(timeout=300)[1], run.returncode) for run in runs]
    assert sorted(code for _, code in ended) in ([0, 0], [0, 2]), ended
    for err, code in ended:
        if code == 2:
            assert re.search(r"error: --out .*: another run \(process \d+\) is writing there now", err), err
    assert [(r["shard"], r["index"]) for r in lines(out / "samples.jsonl")] == [(0, 0), (0, 1), (0, 2), (0, 3)]
    assert json.loads((out / "summary.json").read_text())["n_worlds"] == 4


# --- every driver: --batch-size 0 before a model loads -------------------------------------

@pytest.fixture(scope="module")
def corner_folder(tmp_path_factory) -> Path:
    return generate_counterfactual(tmp_path_factory.mktemp("pairs"), count=1, corners=["topleft"])[0]


def test_batch_size_0_fails_before_a_model_loads(worlds, corner_folder, tmp_path, capsys, no_model_load):
    bad = ["--model-path", "tiny-random", "--batch-size", "0"]
    runs = {
        "experiment 1": lambda: vlm_analysis.main("qwen2", [*bad, "--data", str(worlds), "--out", str(tmp_path)]),
        "experiment 2": lambda: text_analysis.main("llava", [*bad, "--data", str(worlds), "--out", str(tmp_path)]),
        "experiment 3": lambda: corner_stats.main(["--model", "llava", *bad, "--dataset", str(corner_folder),
                                                   "--out-dir", str(tmp_path)]),
        "ablation": lambda: ablation.main(["--model", "llava", *bad, "--stats-dir", str(tmp_path), "--dataset",
                                           str(corner_folder)]),
    }
    for name, run in runs.items():
        assert one_error_line(capsys, run) == "error: --batch-size 0: must be at least 1", name
    with pytest.raises(SystemExit) as exit_info:
        verify.main(["--model", "llava", *bad])
    assert exit_info.value.code == 2 and "error: --batch-size 0: must be at least 1" in capsys.readouterr().err


def test_data_regenerated_in_place_is_refused_before_loading(tmp_path, capsys, monkeypatch):
    """Was: the same --data path with other worlds resumed, pooling two data sets in one samples.jsonl."""
    data, out = tmp_path / "sw", tmp_path / "out"
    generate_shapeworld(data, shards=1, worlds_per_shard=4, seed=1)
    vlm_analysis.main("llava", [*FAST, "--data", str(data), "--out", str(out), "--limit", "2"])
    text_analysis.main("llava", ["--model-path", "tiny-random", "--data", str(data), "--out", str(tmp_path / "t"),
                                 "--limit", "2"])
    shutil.rmtree(data)
    generate_shapeworld(data, shards=1, worlds_per_shard=4, seed=2)
    import models

    monkeypatch.setattr(models, "load_adapter", lambda *a, **k: pytest.fail("a model was loaded"))
    for run, folder in ((lambda: vlm_analysis.main("llava", [*FAST, "--data", str(data), "--out", str(out)]), out),
                        (lambda: text_analysis.main("llava", ["--model-path", "tiny-random", "--data", str(data),
                                                              "--out", str(tmp_path / "t")]), tmp_path / "t")):
        assert one_error_line(capsys, run) == (f"error: --out {folder}: its results for (0, 0) were made from other "
                                               f"data than this run's (regenerated in the same folder?); choose "
                                               f"another --out")


def test_a_folder_of_a_command_that_does_not_resume_is_kept_from_others(share, tmp_path):
    """The corner analysis rewrites its outputs each time; no other command may write over its summary.json."""
    (tmp_path / "summary.json").write_text("{}")
    mark_results(tmp_path, "summary.json")
    with pytest.raises(OptionError, match=r"holds the results of another command \(summary.json\)"):
        resumable_map(share, results_at(tmp_path / "records.jsonl"), [1], square, {"--x": 1})
    check_free(tmp_path, "summary.json", "--out-dir")  # the analysis itself may rewrite it
    other = tmp_path / "other"
    resumable_map(share, results_at(other / "records.jsonl"), [1], square, {"--x": 1})
    with pytest.raises(OptionError, match=r"--out-dir .*other: holds the results of another command"):
        check_free(other, "summary.json", "--out-dir")


def test_a_refused_run_leaves_no_folder_it_made(tmp_path):
    """Folders claimed inside a folder the run made (relation_heads.py's out/discovery and out/test) go with it:
    was, a refused run left out/ holding discovery/.lock and test/.lock."""
    made, kept, outer = tmp_path / "made", tmp_path / "kept", tmp_path / "outer"
    kept.mkdir()
    (kept / "mine").mkdir()
    for folder in (made, kept, outer / "discovery", outer / "test", kept / "mine" / "a" / "b"):
        claim_output(folder, "--out")
    release_outputs()
    assert not made.exists() and not outer.exists()
    assert sorted(p.name for p in kept.iterdir()) == [".lock", "mine"]  # the user's folders stay
    assert list((kept / "mine").iterdir()) == []


@pytest.mark.parametrize("options, error", [
    (["--relations", "left,left"], "error: --relations 'left,left': a relation is listed twice"),
    (["--model-path", "./no-such-checkpoint"], "error: --model-path ./no-such-checkpoint: no such folder"),
])
def test_more_options_refused_before_loading(options, error, worlds, tmp_path, capsys, no_model_load):
    argv = [*FAST, "--data", str(worlds), "--out", str(tmp_path / "out"), *options]
    assert one_error_line(capsys, lambda: vlm_analysis.main("llava", argv)).startswith(error)
