"""Long runs stay flat: peak RSS of experiment 1 after 1,000 and after 5,000 worlds.

    python bench/long_run_memory.py --worlds 5000 --checkpoint 1000

Generates the worlds, runs ``vlm_atten_analysis_{model}.py`` on tiny-random in a
child process, and samples the child's peak RSS (VmHWM) as samples.jsonl grows.
Writes bench/results/long_run_memory-{model}.json.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from models import FAMILIES  # noqa: E402  (after the path)


def peak_rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=FAMILIES, default="llava")
    parser.add_argument("--worlds", type=int, default=5000)
    parser.add_argument("--checkpoint", type=int, default=1000)
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=["--no-baseline"],
                        help="further options for the experiment script (default: --no-baseline)")
    args = parser.parse_args()
    from spatial_attention.data.generate import generate_shapeworld

    work = Path(tempfile.mkdtemp(prefix="long_run_"))
    shards = -(-args.worlds // 100)
    generate_shapeworld(work / "data", shards=shards, worlds_per_shard=100, seed=0)
    out = work / "out"
    cmd = [sys.executable, str(REPO / f"vlm_atten_analysis_{args.model}.py"), "--model-path", "tiny-random",
           "--data", str(work / "data"), "--limit", str(args.worlds), "--out", str(out), *args.extra]
    child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    samples = out / "samples.jsonl"
    at_checkpoint, started, last = None, time.time(), 0.0
    while child.poll() is None:
        done = sum(1 for _ in open(samples)) if samples.exists() else 0
        try:
            last = peak_rss_mb(child.pid)
        except FileNotFoundError:
            break
        if at_checkpoint is None and done >= args.checkpoint:
            at_checkpoint = {"worlds": done, "peak_rss_mb": last, "seconds": round(time.time() - started)}
        time.sleep(2)
    if child.returncode != 0:
        sys.exit(f"run failed ({child.returncode}): {' '.join(cmd)}")
    done = sum(1 for _ in open(samples))
    result = {"model": args.model, "command": " ".join(cmd), "at_checkpoint": at_checkpoint,
              "at_end": {"worlds": done, "peak_rss_mb": last, "seconds": round(time.time() - started)},
              "growth": (last - at_checkpoint["peak_rss_mb"]) / at_checkpoint["peak_rss_mb"] if at_checkpoint else None}
    path = REPO / "bench" / "results" / f"long_run_memory-{args.model}-{args.worlds}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
