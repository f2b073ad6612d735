"""Benchmark: each study step's work outside its model's forwards, per run and per item, for the cost plan.

    python bench/host_costs.py            # about 1.5 minutes here; writes bench/results/host_seconds.json

What a step does besides starting processes, building models and running forwards (reading and encoding inputs,
metrics, writing results, summaries, figures) runs on the host, at a cost per item (a world, a pair) and per run
(a model's or an initialisation's summary and figures) that the model's size barely changes. Each script the study
runs is run here twice on tiny-random LLaVA, at two sizes, and its run.json ``timing`` (``other_seconds``: the run's
wall time after its model was built, less its forwards) is fitted as per_run + items x per_item; experiment 1
without its per-world figures, which are timed apart (``exp1_panel``: a third run drawing them); the sweep's
shared/unique analysis (a process of its own, no model) is timed whole, its start included. The plan (``study/cost.py``) adds them to
every step: ``host_seconds`` of the calibration where it has its own, else this file's (measured on this
machine's CPU, the plan says so).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from spatial_attention.data.counterfactual import CORNERS  # noqa: E402  (after the path)
from spatial_attention.study.calibration import import_seconds  # noqa: E402

SIZES = (8, 32)  # items of the two runs of each kind: far enough apart that the per-item slope is not run-to-run noise


def run(script: str, *args: str) -> float:
    """Wall seconds of ``python script args`` (its output discarded unless it fails)."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, str(REPO / script), *args], capture_output=True, text=True,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if done.returncode:
        sys.exit(f"{script} {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def timing(folder: Path) -> tuple[int, float]:
    """(items, other_seconds) of a run.json's timing."""
    record = json.loads((folder / "run.json").read_text())["timing"]
    return record["items"], record["other_seconds"]


def fit(points: list[tuple[int, float]]) -> dict:
    """per_run + items x per_item through the two runs (per_item at least 0)."""
    (n1, s1), (n2, s2) = points
    per_item = max(0.0, (s2 - s1) / (n2 - n1))
    return {"per_run": round(max(0.0, s1 - n1 * per_item), 4), "per_item": round(per_item, 5),
            "runs": [{"items": n, "other_seconds": s} for n, s in points]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "host_seconds.json")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="host_costs_"))
    model = ["--model-path", "tiny-random", "--device", "cpu", "--dtype", "fp32"]
    run("generate_data.py", "shapeworld", "--out", str(work / "worlds"), "--shards", "1", "--worlds-per-shard",
        str(2 * max(SIZES)))
    run("generate_data.py", "counterfactual", "--out", str(work / "pairs"), "--count", str(2 * max(SIZES)))
    kinds = {"exp1": [], "exp2": [], "exp4": [], "corners": [], "ablation": []}
    analysis = []
    for n in SIZES:
        data = ["--data", str(work / "worlds"), "--limit", str(n)]
        run("vlm_atten_analysis_llava.py", *model, *data, "--plot-samples", "0", "--out", str(work / f"exp1-{n}"))
        kinds["exp1"].append(timing(work / f"exp1-{n}"))
        run("text_only_llm_analysis_llava.py", *model, *data, "--out", str(work / f"exp2-{n}"))
        kinds["exp2"].append(timing(work / f"exp2-{n}"))
        # experiment 4 tests on the second half of its pairs: 2n pairs, n of them scored by patching every head
        run("relation_heads.py", "--model", "llava", *model, "--data", str(work / "worlds"), "--limit", str(2 * n),
            "--out", str(work / f"exp4-{n}"))
        kinds["exp4"].append(timing(work / f"exp4-{n}"))
        sweep = work / f"corners-{n}"
        datasets = [str(work / "pairs" / f"dataset_{corner}") for corner in CORNERS]
        stats = [str(sweep / f"head_diff_stats_{corner}") for corner in CORNERS]
        run("head_attention_stats.py", "--model", "llava", *model, "--dataset", *datasets, "--max-pairs", str(2 * n),
            "--pairs", "discovery", "--out-dir", str(sweep))
        kinds["corners"] += [timing(Path(folder)) for folder in stats]
        start = time.perf_counter()
        run("analyze_corner_heads.py", *stats, "--out-dir", str(sweep / "count_shared_unique"))
        analysis.append(time.perf_counter() - start)
        run("head_ablation.py", "--model", "llava", *model, "--positions", "answer", "--heads", "unique",
            "--max-pairs", str(2 * n), "--analysis-dir", str(sweep / "count_shared_unique"), "--stats-dir", *stats,
            "--dataset", *datasets, "--out-parent", str(sweep))
        kinds["ablation"] += [timing(folder) for folder in sorted(sweep.glob("ablation_*"))]
    panels = SIZES[0]
    run("vlm_atten_analysis_llava.py", *model, "--data", str(work / "worlds"), "--limit", str(panels),
        "--plot-samples", str(panels), "--out", str(work / "exp1-panels"))
    with_panels = timing(work / "exp1-panels")[1]
    process = import_seconds()
    fitted = {}
    for kind, points in kinds.items():
        per_size = len(points) // len(SIZES)  # the corner kinds: one run per corner at each size
        mean = [(points[i * per_size][0], sum(s for _, s in points[i * per_size:(i + 1) * per_size]) / per_size)
                for i in range(len(SIZES))]
        fitted[kind] = fit(mean)
    fitted["exp1_panel"] = {"per_run": 0.0, "per_item": round(max(0.0, with_panels - kinds["exp1"][0][1]) / panels, 4),
                            "runs": [{"items": panels, "other_seconds": with_panels}]}
    fitted["corner_analysis"] = {"per_run": round(min(analysis), 4), "per_item": 0.0,
                                 "runs": [{"wall_seconds": s} for s in analysis]}
    import torch

    result = {"machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}", "threads": torch.get_num_threads(),
              "model": "llava tiny-random, fp32, CPU", "process_seconds": round(process, 2), "kinds": fitted,
              "items": {"exp1": "worlds", "exp1_panel": "per-world figures (--plot-samples)", "exp2": "worlds",
                        "exp4": "pairs (discovery and test)", "corners": "pairs of a corner", "ablation": "test pairs of a corner and head spec",
                        "corner_analysis": "one per model or initialisation"}}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
