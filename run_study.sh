#!/usr/bin/env bash
# The whole study in one command: experiments 1, 2 and 4, the corner sweep and its ablation, for every model, each
# beside its random-weights control, into one folder tree; then one report (OUT_DIR/report/index.html, REPORT.md).
#
# Settings (environment variables, defaults in brackets):
#   MODELS ["llava qwen2"]      the model families, space-separated
#   MODEL_PATH_LLAVA, MODEL_PATH_QWEN2 [the paper's checkpoints]   a hub id, a local folder, toy, tiny-random,
#                               random-7b[:N] (as --model-path; MODEL_PATH_<FAMILY> for every family)
#   WORLDS [all]                ShapeWorld worlds for experiments 1 and 2 (all, or a number: --limit)
#   COUNT [100]                 pairs per corner (experiment 3 and the ablation)
#   CONTROLS [1]                1: also each step's random-weights control, CONTROL_SEEDS [19] initialisations (the
#                               fewest whose rank test can reach 5%; fewer read "untestable"), experiments 1 and 2
#                               on the first CONTROL_ITEMS [100] worlds (all, or a number), the sweep on all pairs
#   ABLATE [1]                  1: ablate each corner's heads after experiment 3 (head_ablation.py)
#   DATA_DIR [data]             ShapeWorld data in DATA_DIR/spatial_twoshapes/agreement/relational, corner pairs in
#                               DATA_DIR/dataset_{corner}; what is missing is generated first (a step of its own)
#   OUT_DIR [results/study]     the study's folder
#   DEVICE [auto]  DTYPE [auto]  BATCH_SIZE [empty: 8 on a GPU, 1 on the CPU]
#   PYTHON [the checkout's .venv/bin/python, else the active virtual environment's; with neither, refused, naming
#                               the setup command (bash env_setup_llava.bash)]: runs every step
#   PLAN [0]                    1: write the cost plan (OUT_DIR/plan.json) and run nothing
#   CALIBRATION [none]          a device's calibration (bench/gpu_check.sh writes bench/results/calibration-{gpu}.json):
#                               the plan prices for that device; without it, the one recorded for this GPU, else (tiny
#                               and toy models) a timed forward here, else counts without seconds
# The corner sweep's own settings (SCORE, ABLATE_HEADS, ABLATE_MODE, RANDOM_CONTROLS, LAYERS, ...; see
# run_corner_experiments.sh) pass through to it. One default differs from the sweep's: ABLATE_POSITIONS [answer]
# ablates the heads at the answer position, where experiment 3's score found them (the paper's, all, recomputes
# every position for each random head set: hours of a GPU at 7B); the report says which was done.
#
# Before any step the plan is printed and written to OUT_DIR/plan.json: per step its model builds, forwards,
# tokens per forward, token-layers and estimated seconds, and the total (spatial_attention/study/cost.py).
# Each step runs in its own process, its output in OUT_DIR/logs/{step}.log; one line is printed as it starts and
# one as it ends. A step that fails is recorded (OUT_DIR/steps/{step}.json, with the end of its log) and the next
# one starts; the report shows it. Rerunning resumes: a finished step is skipped, one cut off or failed is run
# again and picks up where its script stopped. A rerun with another model path, WORLDS, COUNT, CONTROL_SEEDS,
# CONTROL_ITEMS, DTYPE or DATA_DIR is refused before any step (OUT_DIR/study.json keeps them). Exit status: 0 when
# every step finished, 1 when one failed (or the report found a file it cannot read), 2 for a bad setting or an
# argument (it takes none but --help / -h, which prints this and runs nothing), 130 when interrupted.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$HERE/env/entry.bash"
entry_args "${BASH_SOURCE[0]}" -- "$@"
find_python "$HERE"
export PYTHON
PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}" exec "$PYTHON" -m spatial_attention.study.study
