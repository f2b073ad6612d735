#!/usr/bin/env bash
# The whole GPU check in one call, no downloads (random-7b weights): the torch build, verify_attention.py in bf16
# and fp32, bench_capture.py --size 7b at batch 1 and 8, experiment 1 on 100 worlds and the corner sweep on 20
# pairs per corner, each timed with its peak GPU memory; one JSON summary, also written to
# bench/results/gpu_check-{gpu}.json. --smoke: the same steps on the CPU at tiny-random size (CI runs it).
# Options: bench/gpu_check.py --help.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$HERE/.venv/bin/python" ]; then PYTHON="$HERE/.venv/bin/python"; else PYTHON=python3; fi
fi
exec "$PYTHON" "$HERE/bench/gpu_check.py" "$@"
