"""bench/gpu_check.sh's CPU path (--smoke: tiny-random, small counts), so that the GPU check is known to run before
a GPU is ever lent (a check that it runs, not a timed test); and the capture benchmark it runs at the tiny size,
read from the same run (a benchmark, not a timed test)."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from spatial_attention.study.calibration import read_calibration

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One run of the smoke check, its steps' outputs kept (--work)."""
    root = tmp_path_factory.mktemp("gpu_check")
    out, work = root / "gpu_check.json", root / "work"
    done = subprocess.run(["bash", "bench/gpu_check.sh", "--smoke", "--out", str(out), "--work", str(work)], cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    return {"done": done, "out": out, "work": work}


def test_gpu_check_runs_end_to_end_at_the_smoke_size(smoke):
    done, out = smoke["done"], smoke["out"]
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert summary["all_ok"] and summary["smoke"] and summary["model_path"] == "tiny-random"
    names = [s["step"] for s in summary["steps"]]
    for family in ("llava", "qwen2"):
        assert {f"{family} verify_attention bf16", f"{family} verify_attention fp32", f"{family} bench_capture batch 1",
                f"{family} bench_capture batch 8", f"{family} experiment 1, 4 worlds",
                f"{family} corner sweep, 2 pairs per corner"} <= set(names)
        assert summary["reports"][f"verify-{family}-bf16"]["attention_compared"].startswith("relative")
        assert summary["reports"][f"verify-{family}-fp32"]["passed"]
    measured = [s for s in summary["steps"] if "verify" in s["step"] or "experiment 1" in s["step"]]
    assert all(s["peak_mb"] > 0 and s["seconds"] > 0 for s in measured)
    assert json.loads(done.stdout.strip().splitlines()[-1]) == summary
    calibration = read_calibration(out.parent / "calibration-cpu-smoke.json")
    assert set(calibration["families"]) == {"llava", "qwen2"} and calibration["device_type"] == "cpu"


@pytest.mark.parametrize("family", ["llava", "qwen2"])
def test_tiny_benchmark_runs_and_agrees_with_the_paper_path(family, smoke):
    """bench/bench_capture.py --size tiny --samples 2 --repeats 1 --device cpu at batch 1, as the smoke check runs
    it (the step ``{family} bench_capture batch 1``)."""
    summary = json.loads(smoke["out"].read_text())
    step = next(s for s in summary["steps"] if s["step"] == f"{family} bench_capture batch 1")
    assert step["ok"] and "--size tiny --device cpu --batch-size 1 --samples 2 --repeats 1" in step["command"], step
    result = json.loads((smoke["work"] / f"bench-{family}-b1.json").read_text())
    assert set(result["modes"]) == {"plain", "paper", "engine"}
    for key in ("speedup_vs_paper", "overhead_vs_plain", "memory_saving_vs_paper", "max_abs_diff"):
        assert key in result
    assert set(result["max_abs_diff"]) == {"cross", "image_self", "vision"}
    assert max(result["max_abs_diff"].values()) <= 1e-4
    assert result["modes"]["engine"]["image_tokens"] == result["modes"]["paper"]["image_tokens"]
