"""Several processes through accelerate: merged outputs equal a single-process run."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from spatial_attention.data.generate import generate_shapeworld

REPO = Path(__file__).resolve().parents[1]
ACCELERATE = Path(sys.executable).with_name("accelerate")
# On a machine without GPUs, `--multi_gpu` makes accelerate start the processes through
# torchrun; they join a gloo group on the CPU (runloop.ProcessShare).
LAUNCH = [str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
          "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517"]


def _run(cmd: list[str]) -> str:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stderr


def _assert_same(a, b, where="") -> None:
    """Equal, numbers to 1e-6: processes may use other thread counts, so sums may round differently."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert abs(a - b) <= 1e-6 * max(1.0, abs(a)), where
    else:
        assert a == b, where


def _lines(path: Path) -> list[dict]:
    return sorted((json.loads(line) for line in path.read_text().splitlines()), key=lambda r: (r["shard"], r["index"]))


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sw")
    generate_shapeworld(root, shards=2, worlds_per_shard=2, seed=3)
    return root


@pytest.mark.skipif(not ACCELERATE.exists(), reason=f"accelerate launcher not found beside {sys.executable}")
@pytest.mark.parametrize("script,result,summary_key", [
    ("vlm_atten_analysis_llava.py", "samples.jsonl", "by_metric"),
    ("text_only_llm_analysis_qwen2.py", "pairs.jsonl", "all"),
])
def test_two_processes_equal_one(script, result, summary_key, shards, tmp_path):
    common = ["--model-path", "tiny-random", "--data", str(shards), "--plot-samples", "1"][: 4 if "text" in script else 6]
    _run([sys.executable, script, *common, "--out", str(tmp_path / "one")])
    log = _run([*LAUNCH, script, *common, "--out", str(tmp_path / "two")])
    assert "process 2 of 2" in log  # the work really was split
    _assert_same(_lines(tmp_path / "one" / result), _lines(tmp_path / "two" / result))
    assert not list((tmp_path / "two").glob("*.part*"))
    one = json.loads((tmp_path / "one" / "summary.json").read_text())
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    _assert_same(one[summary_key], two[summary_key])


@pytest.mark.skipif(not ACCELERATE.exists(), reason=f"accelerate launcher not found beside {sys.executable}")
def test_refusal_stops_every_process_in_one_line(shards, tmp_path):
    """A rerun with other --layers under accelerate launch: the main process says why, once, and no process goes
    on (was: the other process loaded the model, then died in the gloo group with a traceback of its own)."""
    argv = ["vlm_atten_analysis_llava.py", "--model-path", "tiny-random", "--data", str(shards), "--plot-samples",
            "0", "--out", str(tmp_path / "two")]
    _run([*LAUNCH, *argv])
    before = (tmp_path / "two" / "samples.jsonl").read_text()
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([*LAUNCH, *argv, "--layers", "1"], cwd=REPO, capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: --out {tmp_path / 'two'}: its results were made with --layers [1, 2, 3, 4], not [1]; "
                      f"rerun with the same setting to resume, or choose another --out"]
    assert "gloo" not in done.stderr.lower() and (tmp_path / "two" / "samples.jsonl").read_text() == before
