"""What a researcher's run survives: bad options refused before a model loads, Ctrl-C and a
failing disk ending in one line with run.json saying how the run ended, an unreachable hub
failing in seconds, and independent random streams (experiments 1 and 2, tiny-random)."""
from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import models
import models.hub
from spatial_attention.common.errors import OptionError
from spatial_attention.common.runio import write_json
from spatial_attention.data.generate import generate_shapeworld
from spatial_attention.experiments import text_analysis, vlm_analysis
from spatial_attention.run import runloop

FAST = ["--model-path", "tiny-random", "--feed-size", "224", "--plot-samples", "0"]
REPO = Path(__file__).resolve().parents[1]
DRIVERS = {"experiment 1": vlm_analysis.main,  # experiment 2 has no image options
           "experiment 2": lambda family, argv: text_analysis.main(family, argv[:2] + argv[len(FAST):])}


@pytest.fixture(scope="module")
def worlds(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sw")
    generate_shapeworld(root, shards=1, worlds_per_shard=4, seed=3)
    return root


def _one_line_exit(capsys, run, code: int = 2) -> str:
    with pytest.raises(SystemExit) as exit_info:
        run()
    assert exit_info.value.code == code
    stderr = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", capsys.readouterr().err)  # progress bars' cursor moves
    lines = [line for line in stderr.replace("\r", "\n").splitlines()  # and redraws
             if line.startswith(("error:", "interrupted:"))]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# --------------------------------------------------------------------------- options before the model

@pytest.mark.parametrize("driver", sorted(DRIVERS))
@pytest.mark.parametrize("bad, names", [
    (["--limit", "0"], "--limit"), (["--limit", "-1"], "--limit"), (["--seed", "-1"], "--seed"),
    (["--batch-size", "0"], "--batch-size"), (["--device", "cuda"], "--device"), (["--device", "tpu"], "--device"),
    (["--layers", "every"], "--layers"), (["--layers", "0"], "--layers"), (["--shards", "0,0"], "--shards"),
    (["--shards", "-1"], "--shards")])
def test_bad_options_fail_before_the_model_loads(driver, bad, names, worlds, tmp_path, capsys, no_model_load):
    if bad[:2] == ["--device", "cuda"] and __import__("torch").cuda.is_available():
        pytest.skip("this machine has a GPU")
    err = _one_line_exit(capsys, lambda: DRIVERS[driver]("llava", [*FAST, "--data", str(worlds),
                                                                   "--out", str(tmp_path / "o"), *bad]))
    assert err.startswith(f"error: {names}")


@pytest.mark.parametrize("feed", ["13", "0", "500"])
def test_qwen2_feed_size_that_the_processor_would_change_is_refused(feed, worlds, tmp_path, capsys, no_model_load):
    err = _one_line_exit(capsys, lambda: vlm_analysis.main("qwen2", [
        "--model-path", "tiny-random", "--data", str(worlds), "--out", str(tmp_path / "o"), "--feed-size", feed]))
    assert err.startswith(f"error: --feed-size {feed}") and "multiple of 28" in err


@pytest.mark.parametrize("driver", sorted(DRIVERS))
def test_unwritable_out_fails_before_the_model_loads(driver, worlds, tmp_path, capsys, no_model_load):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for out, why in ((a_file, "is a file"), (a_file / "below", "is a file"),
                     (Path("/proc/self/no_results_here"), "cannot write")):
        err = _one_line_exit(capsys, lambda: DRIVERS[driver]("llava", [*FAST, "--data", str(worlds),
                                                                       "--out", str(out)]))
        assert err.startswith(f"error: --out {out}") and why in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]  # nothing made on the way


@pytest.mark.parametrize("driver", sorted(DRIVERS))
def test_unusable_data_fails_before_the_model_loads(driver, tmp_path, capsys, no_model_load):
    empty = tmp_path / "empty"
    (empty / "shard0").mkdir(parents=True)
    err = _one_line_exit(capsys, lambda: DRIVERS[driver]("llava", [*FAST, "--data", str(empty),
                                                                   "--out", str(tmp_path / "o")]))
    assert err.startswith("error:") and str(empty) in err


# --------------------------------------------------------------------------- how a run ends

def _interrupt_the_second_batch(monkeypatch):
    """Ctrl-C in the second batch's forward and metrics (``score_worlds``; its inputs are prepared ahead);
    returns the real function."""
    real = vlm_analysis.score_worlds
    calls = []

    def interrupted_on_second_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(vlm_analysis, "score_worlds", interrupted_on_second_batch)
    return real


def test_ctrl_c_keeps_finished_worlds_marks_run_json_and_resumes(worlds, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    real = _interrupt_the_second_batch(monkeypatch)
    argv = [*FAST, "--data", str(worlds), "--out", str(out), "--batch-size", "1"]
    err = _one_line_exit(capsys, lambda: vlm_analysis.main("llava", argv), code=130)
    assert err.startswith("interrupted:") and str(out) in err and "rerun" in err
    assert len(_records(out / "samples.jsonl")) == 1
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "interrupted"

    monkeypatch.setattr(vlm_analysis, "score_worlds", real)
    vlm_analysis.main("llava", argv)
    assert len(_records(out / "samples.jsonl")) == 4
    assert json.loads((out / "run.json").read_text())["status"] == "finished"


def test_worlds_finished_before_a_ctrl_c_keep_their_figures(worlds, tmp_path, capsys, monkeypatch):
    """Figures are drawn after the loop; a run stopped early still draws those of its finished worlds, which a
    rerun would not redo."""
    _interrupt_the_second_batch(monkeypatch)
    out = tmp_path / "out"
    argv = ["--model-path", "tiny-random", "--plot-samples", "4", "--data", str(worlds), "--out", str(out),
            "--batch-size", "1", "--no-baseline"]
    _one_line_exit(capsys, lambda: vlm_analysis.main("llava", argv), code=130)
    (record,) = _records(out / "samples.jsonl")
    assert vlm_analysis.figure_path(out, record["shard"], record["index"]).exists()


def test_verify_attention_checks_before_the_model_loads(tmp_path, capsys, no_model_load):
    from spatial_attention.experiments import verify

    a_folder = tmp_path / "report"
    a_folder.mkdir()
    for bad, option in ((["--device", "cuda"], "--device"), (["--seed", "-1"], "--seed"),
                        (["--samples", "0"], "--samples"), (["--out", str(a_folder)], "--out"),
                        (["--out", str(tmp_path / "a_file" / "r.json")], "--out"),
                        (["--data", str(tmp_path / "missing")], str(tmp_path / "missing")),
                        (["--attention-tolerance", "0"], "--attention-tolerance"),
                        (["--attention-tolerance", "nan"], "--attention-tolerance")):
        if bad[:2] == ["--device", "cuda"] and __import__("torch").cuda.is_available():
            continue
        (tmp_path / "a_file").write_text("x")
        err = _one_line_exit(capsys, lambda: verify.main(["--model", "qwen2", "--model-path", "tiny-random",
                                                          "--feed-size", "224", *bad]))
        assert err.startswith(f"error: {option}"), err
    err = _one_line_exit(capsys, lambda: verify.main(["--model", "qwen2", "--model-path", "tiny-random",
                                                      "--feed-size", "13"]))
    assert err.startswith("error: --feed-size 13")


def test_disk_turning_read_only_mid_run_is_one_line(worlds, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    real = runloop.append_jsonl
    appended = []

    def append_then_fail(path, record):
        if appended:
            raise OSError(30, "Read-only file system", str(path))
        appended.append(record)
        real(path, record)

    monkeypatch.setattr(runloop, "append_jsonl", append_then_fail)
    err = _one_line_exit(capsys, lambda: vlm_analysis.main("llava", [*FAST, "--data", str(worlds), "--out", str(out),
                                                                    "--no-baseline"]), code=1)
    assert "Read-only file system" in err and "samples.jsonl" in err and "rerun" in err
    assert len(_records(out / "samples.jsonl")) == 1
    assert json.loads((out / "run.json").read_text())["status"] == "failed"


@pytest.mark.parametrize("driver, results", [("experiment 1", "samples.jsonl"), ("experiment 2", "pairs.jsonl")])
@pytest.mark.parametrize("bad_line", [b"not json", b"\xff\xfe not utf-8", b'{"foo": 1}', b"[1, 2]"])
def test_malformed_middle_line_names_the_line(driver, results, bad_line, worlds, tmp_path, capsys, no_model_load):
    out = tmp_path / "out"
    out.mkdir()
    keys = vlm_analysis.RECORD_KEYS if driver == "experiment 1" else (*text_analysis.CSV_COLUMNS, "layers")
    good = [json.dumps({**dict.fromkeys(keys, 0), "index": i}).encode() for i in (0, 1)]
    (out / results).write_bytes(b"\n".join([good[0], bad_line, good[1]]) + b"\n")
    err = _one_line_exit(capsys, lambda: DRIVERS[driver]("llava", [*FAST, "--data", str(worlds),
                                                                   "--out", str(out)]))
    assert f"{results}, line 2" in err and "delete that line" in err


@pytest.mark.parametrize("driver", sorted(DRIVERS))
def test_a_run_with_no_usable_world_is_not_finished(driver, tmp_path, capsys):
    data = tmp_path / "sw"
    generate_shapeworld(data, shards=1, worlds_per_shard=2, seed=4)
    if driver == "experiment 1":
        for image in (data / "shard0").glob("world-*.png"):
            image.write_bytes(b"not a png")
    else:
        (data / "shard0" / "caption.txt").write_text("nonsense\nnonsense\n")
    out = tmp_path / "out"
    err = _one_line_exit(capsys, lambda: DRIVERS[driver]("llava", [*FAST, "--data", str(data), "--out", str(out)]))
    assert str(data) in err
    assert not (out / "summary.json").exists()
    if (out / "run.json").exists():
        assert json.loads((out / "run.json").read_text())["status"] == "failed"


@pytest.mark.parametrize("script", ["head_ablation.py", "vlm_atten_analysis_llava.py"])
def test_sigterm_while_a_script_starts_ends_in_one_line_and_130(script, tmp_path):
    """Stopped during its imports (torch and transformers take seconds), before its main begins: one line on
    stderr and exit status 130, as when stopped later (it was a silent 143)."""
    proc = subprocess.Popen([sys.executable, str(REPO / script), "--model-path", "tiny-random", "--out",
                             str(tmp_path / "out")], stderr=subprocess.PIPE, text=True)
    time.sleep(0.8)  # inside the imports, after the interpreter has started
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("interrupted: ")


def test_sigterm_ends_like_ctrl_c(worlds, tmp_path):
    out = tmp_path / "out"
    script = (f"import os, signal, sys; sys.path.insert(0, {str(Path(__file__).parents[1])!r})\n"
              "from spatial_attention.experiments import vlm_analysis\n"
              "real = vlm_analysis.score_worlds\n"
              "calls = []\n"
              "def once_then_sigterm(*a, **k):\n"
              "    calls.append(1)\n"
              "    if len(calls) == 2: os.kill(os.getpid(), signal.SIGTERM)\n"
              "    return real(*a, **k)\n"
              "vlm_analysis.score_worlds = once_then_sigterm\n"
              f"vlm_analysis.main('llava', {[*FAST, '--data', str(worlds), '--out', str(out), '--batch-size', '1']!r})\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 130, done.stderr
    assert "interrupted:" in done.stderr and "Traceback" not in done.stderr
    assert json.loads((out / "run.json").read_text())["status"] == "interrupted"
    assert len(_records(out / "samples.jsonl")) == 1


@pytest.mark.parametrize("where", ["score_worlds", "prepare_worlds"])  # the main thread, the background thread
def test_an_unexpected_error_keeps_its_traceback_and_marks_run_json(where, worlds, tmp_path, monkeypatch):
    def bug(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(vlm_analysis, where, bug)
    out = tmp_path / "out"
    with pytest.raises(ZeroDivisionError):
        vlm_analysis.main("llava", [*FAST, "--data", str(worlds), "--out", str(out)])
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "failed" and "ZeroDivisionError: a bug" in run["ended_because"]


def test_outputs_follow_the_umask_and_run_json_command_pastes_back(worlds, tmp_path, monkeypatch):
    out = tmp_path / "out with space"
    argv = [*FAST, "--data", str(worlds), "--out", str(out), "--limit", "1", "--no-baseline"]
    monkeypatch.setattr(sys, "argv", ["vlm_atten_analysis_llava.py", *argv])
    old = os.umask(0o022)
    try:
        vlm_analysis.main("llava", argv)
    finally:
        os.umask(old)
    for name in ("summary.json", "summary.csv", "run.json", "samples.jsonl"):
        assert (out / name).stat().st_mode & 0o777 == 0o644, name
    command = json.loads((out / "run.json").read_text())["command"]
    assert shlex.split(command) == ["vlm_atten_analysis_llava.py", *argv]


def test_write_json_mode_follows_a_strict_umask(tmp_path):
    old = os.umask(0o077)
    try:
        write_json(tmp_path / "a.json", {"a": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o600


def test_experiment_2_says_on_the_console_when_it_skips_worlds(tmp_path, caplog):
    data = tmp_path / "sw"
    generate_shapeworld(data, shards=1, worlds_per_shard=3, seed=2)
    captions = (data / "shard0" / "caption.txt").read_text().splitlines()
    captions[1] = "an unparsable caption " * 10000  # 220 KB
    (data / "shard0" / "caption.txt").write_text("\n".join(captions) + "\n")
    text_analysis.main("llava", ["--model-path", "tiny-random", "--data", str(data), "--out", str(tmp_path / "o")])
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("skipping" in w for w in warnings)
    assert max(len(w) for w in warnings) < 2000
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["counts"]["pairs_skipped"] == 1
    assert all(len(key) < 100 for key in summary["counts"]["skipped_reasons"])


# --------------------------------------------------------------------------- the hub

@pytest.fixture
def no_from_pretrained(monkeypatch):
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("from_pretrained was called (it retries an unreachable hub for minutes)")

    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.AutoModelForImageTextToText, "from_pretrained", refuse)


def test_unresolvable_hub_fails_in_seconds(monkeypatch, no_from_pretrained):
    def no_dns(*args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "create_connection", no_dns)
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    started = time.time()
    with pytest.raises(OptionError) as err:
        models.load_adapter("llava", "nobody/not-a-cached-model", device="cpu")
    assert time.time() - started < 10
    message = str(err.value)
    assert "\n" not in message and "cannot be resolved" in message and "tiny-random" in message


def test_offline_mode_fails_in_seconds(monkeypatch, no_from_pretrained):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # what HF_HUB_OFFLINE=1 sets at import
    with pytest.raises(OptionError, match="HF_HUB_OFFLINE"):
        models.load_adapter("qwen2", "nobody/not-a-cached-model", device="cpu")


def test_a_hub_that_answers_or_is_slow_keeps_its_retries(monkeypatch):
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)

    class Connection:
        def close(self):
            pass

    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: Connection())
    assert models.hub.hub_unreachable() is None

    def slow(*args, **kwargs):
        time.sleep(2)
        return Connection()

    monkeypatch.setattr(socket, "create_connection", slow)
    monkeypatch.setattr(models.hub, "HUB_PROBE_SECONDS", 0.2)
    assert models.hub.hub_unreachable() is None


# --------------------------------------------------------------------------- random streams

def test_background_seeds_do_not_depend_on_the_baseline_switch(worlds, tmp_path):
    with_baseline, without = tmp_path / "with", tmp_path / "without"
    vlm_analysis.main("qwen2", [*FAST, "--data", str(worlds), "--out", str(with_baseline)])
    vlm_analysis.main("qwen2", [*FAST, "--data", str(worlds), "--out", str(without), "--no-baseline"])
    a, b = _records(with_baseline / "samples.jsonl"), _records(without / "samples.jsonl")
    assert len(a) == len(b) == 4
    for x, y in zip(a, b):
        assert x["metrics"]["real"] == y["metrics"]["real"]


def test_a_run_that_keeps_nothing_partial_does_not_promise_a_resume(tmp_path):
    from spatial_attention.common.runio import mark_unfinished, start_run

    start_run(tmp_path / "run.json", {"command": "head_ablation.py"}, resumable=False)  # writes at the end
    said = mark_unfinished("interrupted", "Ctrl-C")
    assert "a rerun starts over" in said and "resume" not in said
    assert json.loads((tmp_path / "run.json").read_text())["status"] == "interrupted"
    assert mark_unfinished("interrupted", "Ctrl-C") == "no results had been written yet"  # forgotten once marked
