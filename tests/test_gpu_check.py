"""bench/gpu_check.sh's CPU path (--smoke: tiny-random, small counts), so that the GPU check is known to run before
a GPU is ever lent (a check that it runs, not a timed test)."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_end_to_end_at_the_smoke_size(tmp_path):
    out = tmp_path / "gpu_check.json"
    done = subprocess.run(["bash", "bench/gpu_check.sh", "--smoke", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=900)
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
