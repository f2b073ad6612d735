"""Smoke test of the capture benchmark at the tiny size (a benchmark, not a timed test)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("family", ["llava", "qwen2"])
def test_tiny_benchmark_runs_and_agrees_with_the_paper_path(family, tmp_path):
    out = tmp_path / "result.json"
    done = subprocess.run([sys.executable, "bench/bench_capture.py", "--model", family, "--size", "tiny",
                           "--samples", "2", "--repeats", "1", "--device", "cpu", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result["modes"]) == {"plain", "paper", "engine"}
    for key in ("speedup_vs_paper", "overhead_vs_plain", "memory_saving_vs_paper", "max_abs_diff"):
        assert key in result
    assert set(result["max_abs_diff"]) == {"cross", "image_self", "vision"}
    assert max(result["max_abs_diff"].values()) <= 1e-4
    assert result["modes"]["engine"]["image_tokens"] == result["modes"]["paper"]["image_tokens"]
