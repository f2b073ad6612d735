"""The whole GPU check in one call (bench/gpu_check.sh runs this): no downloads, random-7b weights.

    bash bench/gpu_check.sh            # on a CUDA machine: random-7b, bf16 and fp32, batch 1 and 8
    bash bench/gpu_check.sh --smoke    # the same steps on the CPU at tiny-random size (CI runs this)

Steps, each in its own process, timed, with its peak memory (GPU: the process's
torch.cuda.max_memory_allocated; CPU: its peak RSS; the benchmark reports each
mode's own in ``reports``; the sweep, several processes, has none):

1. the torch build: version, CUDA version, whether a GPU is visible, its name;
2. per family, ``verify_attention.py`` at ``random-7b`` (full depth) in bf16 and in fp32;
3. per family, ``bench/bench_capture.py --size 7b`` at batch 1 and batch 8 (plain, paper, engine);
4. per family, experiment 1 on 100 generated worlds and the corner sweep
   (``run_corner_experiments.sh``) on 20 pairs per corner, at ``random-7b``.

A failed step is recorded (its exit status and the end of its stderr) and the
check goes on. One JSON summary is printed and written to
bench/results/gpu_check-{gpu}.json (``--out`` to change it); the exit status is 1
when any step failed. At the end, the device's calibration for the study's cost plan
(``run_study.sh`` with ``CALIBRATION=FILE``; ``spatial_attention/study/calibration.py``) goes beside
it, calibration-{gpu}.json, from the families whose benchmark and experiment 1 finished.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import runpy
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FAMILIES = ("llava", "qwen2")


def measured(argv: list[str]) -> int:
    """Worker: run the Python script ``argv[0]`` with ``argv[1:]`` in this process, then print its peak memory
    (a line ``PEAK_MB <value>``) and return its exit status."""
    sys.argv = argv
    sys.path.insert(0, str(Path(argv[0]).resolve().parent))  # as running the script would
    status = 0
    try:
        runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as stop:
        status = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    import torch

    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = next(int(line.split()[1]) / 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    print(f"PEAK_MB {peak:.1f}", flush=True)
    return status


def step(name: str, command: list[str], timeout: int, env: dict | None = None, measure: bool = True) -> dict:
    """Run one step and time it: a Python script through ``measured`` (its peak memory; ``measure=False``: a
    script that reports its own, in its own processes), or a shell command."""
    python = command[0].endswith(".py")
    full = [sys.executable, *([__file__, "--measure"] if measure else []), *command] if python else command
    start = time.perf_counter()
    if timeout <= 0:
        print(f"[gpu_check] {name}: skipped (--deadline reached)", file=sys.stderr)
        return {"step": name, "command": " ".join(command), "seconds": 0.0, "peak_mb": None, "ok": False,
                "status": "skipped: --deadline reached"}
    # its own process group: on a timeout every process it started stops too (the sweep's, the benchmark's)
    child = subprocess.Popen(full, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, **(env or {})}, start_new_session=True)
    try:
        out, err = child.communicate(timeout=timeout)
        status = child.returncode
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        out, _ = child.communicate()
        status, err = "timeout", f"stopped after {timeout:.0f} s"
    peaks = [float(m) for m in re.findall(r"^PEAK_MB (\S+)$", out, re.M)]
    result = {"step": name, "command": " ".join(command), "seconds": round(time.perf_counter() - start, 1),
              "peak_mb": peaks[-1] if peaks else None, "ok": status == 0}
    if status != 0:
        result.update(status=status, stderr_tail=(err or "")[-1500:])
    print(f"[gpu_check] {name}: {'ok' if status == 0 else 'FAILED'} in {result['seconds']} s"
          + (f", peak {result['peak_mb']:.0f} MB" if result["peak_mb"] is not None else ""), file=sys.stderr)
    return result


def torch_build() -> dict:
    import torch

    cuda = torch.cuda.is_available()
    return {"torch": torch.__version__, "cuda_build": torch.version.cuda, "cuda_available": cuda,
            "gpu": torch.cuda.get_device_name() if cuda else None,
            "gpu_memory_gb": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if cuda else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true",
                        help="the same steps on the CPU at tiny-random size, small counts (a test that it runs)")
    parser.add_argument("--families", default=",".join(FAMILIES), help="comma-separated model families")
    parser.add_argument("--out", type=Path, default=None,
                        help="default bench/results/gpu_check-{gpu}.json; rewritten after every step")
    parser.add_argument("--deadline", type=float, default=None,
                        help="seconds for the whole check (default: 480 on a GPU, none with --smoke); a step is "
                             "stopped at it, later ones are recorded as skipped")
    parser.add_argument("--work", type=Path, help="where the steps write their outputs (default: a new temporary folder)")
    parser.add_argument("--measure", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)  # worker
    args = parser.parse_args()
    if args.measure:
        sys.exit(measured(args.measure))

    build = torch_build()
    print(f"[gpu_check] torch {build['torch']}, CUDA build {build['cuda_build']}, GPU: {build['gpu']}",
          file=sys.stderr)
    if not args.smoke and not build["cuda_available"]:
        sys.exit("gpu_check: no CUDA GPU is visible to this torch build (torch.cuda.is_available() is False); "
                 "install a CUDA build of torch, or run with --smoke for the CPU smoke check")
    smoke = args.smoke
    model_path = "tiny-random" if smoke else "random-7b"
    device = "cpu" if smoke else "cuda"
    worlds, pairs = (4, 2) if smoke else (100, 20)
    deadline = time.perf_counter() + (args.deadline or (math.inf if smoke else 480))
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(REPO))
    from spatial_attention.study.calibration import device_slug, from_gpu_check

    gpu = device_slug(build["gpu"])
    out = args.out or REPO / "bench" / "results" / f"gpu_check-{gpu}{'-smoke' if smoke else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    steps, summary = [], {}
    for name, command, options in plan(args.families.split(","), model_path, device, worlds, pairs, smoke, work):
        left = min(600.0, deadline - time.perf_counter())  # 600 s: the most one command may take on a lent GPU
        steps.append(step(name, command, left, **options))
        summary = {"smoke": smoke, "model_path": model_path, "device": device, **build,
                   "total_seconds": round(sum(s["seconds"] for s in steps), 1), "all_ok": all(s["ok"] for s in steps),
                   "steps": steps, "reports": reports(work)}
        out.write_text(json.dumps(summary, indent=2) + "\n")  # after every step: a stopped check keeps what it did
    calibration = from_gpu_check(summary, str(out))
    if calibration["families"]:
        written = out.parent / f"calibration-{gpu}{'-smoke' if smoke else ''}.json"
        written.write_text(json.dumps(calibration, indent=2) + "\n")
        print(f"[gpu_check] calibration of this device: {written}", file=sys.stderr)
    print(json.dumps(summary))
    sys.exit(0 if summary["all_ok"] else 1)


def plan(families: list[str], model_path: str, device: str, worlds: int, pairs: int, smoke: bool,
         work: Path) -> list[tuple[str, list[str], dict]]:
    """The check's steps in order: (name, command, options of ``step``)."""
    steps = [("generate worlds", [str(REPO / "generate_data.py"), "shapeworld", "--out", str(work / "worlds"),
                                  "--shards", "1", "--worlds-per-shard", str(worlds)], {}),
             ("generate corner pairs", [str(REPO / "generate_data.py"), "counterfactual", "--out", str(work / "pairs"),
                                        "--count", str(pairs)], {})]
    for family in families:
        for dtype in ("bf16", "fp32"):
            steps.append((f"{family} verify_attention {dtype}", [
                str(REPO / "verify_attention.py"), "--model", family, "--model-path", model_path, "--device", device,
                "--dtype", dtype, "--samples", "2", "--out", str(work / f"verify-{family}-{dtype}.json")], {}))
        for batch in (1, 8):
            steps.append((f"{family} bench_capture batch {batch}", [
                str(REPO / "bench" / "bench_capture.py"), "--model", family, "--size", "tiny" if smoke else "7b",
                "--device", device, "--batch-size", str(batch), "--samples", "2" if smoke else "8",
                "--repeats", "1" if smoke else "2", "--out", str(work / f"bench-{family}-b{batch}.json")],
                {"measure": False}))
        steps.append((f"{family} experiment 1, {worlds} worlds", [
            str(REPO / f"vlm_atten_analysis_{family}.py"), "--model-path", model_path, "--device", device,
            "--data", str(work / "worlds"), "--limit", str(worlds), "--out", str(work / f"exp1-{family}")], {}))
        sweep = {"MODEL": family, "MODEL_PATH": model_path, "COUNT": str(pairs), "DATA_DIR": str(work / "pairs"),
                 "OUT_DIR": str(work / f"corners-{family}"), "DEVICE": device, "PYTHON": sys.executable}
        steps.append((f"{family} corner sweep, {pairs} pairs per corner",
                      ["bash", str(REPO / "run_corner_experiments.sh")], {"env": sweep}))
    return steps


def reports(work: Path) -> dict:
    """The verification and benchmark reports written so far, in short."""
    details = {}
    for name in sorted(work.glob("verify-*.json")):
        report = json.loads(name.read_text())
        details[name.stem] = {k: report.get(k) for k in ("passed", "dtype", "max_abs_diff", "max_rel_diff",
                                                          "attention_compared", "logits_max_abs_diff")}
    for name in sorted(work.glob("bench-*.json")):
        report = json.loads(name.read_text())
        details[name.stem] = {**{k: report.get(k) for k in ("overhead_vs_plain", "speedup_vs_paper", "extra_peak_mb",
                                                            "max_abs_diff", "logits_max_abs_diff_vs_plain")},
                              "seconds_per_sample": {m: v["seconds_per_sample"] for m, v in report["modes"].items()},
                              "answer_seconds": report.get("answer_seconds"),
                              "reinit_seconds": report.get("reinit_seconds"),
                              "peak_memory_mb": {m: v["peak_memory_mb"] for m, v in report["modes"].items()}}
    for run in sorted(work.glob("exp1-*/run.json")):  # where experiment 1's time went after its build
        timing = json.loads(run.read_text()).get("timing")
        if timing:
            details[run.parent.name] = timing
    return details


if __name__ == "__main__":
    main()
