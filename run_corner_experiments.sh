#!/usr/bin/env bash
# Experiment 3: sweep the four corners, then the shared/unique head analysis.
#
# Settings (environment variables, defaults in brackets):
#   MODEL [qwen2]  qwen2 | llava          MODEL_PATH [the paper's checkpoint; tiny-random for a smoke run]
#   COUNT [100]    pairs per corner        LAYERS [all]   all | 1,5,30 | mid_third | ...
#   MAX_NEW_TOKENS [1]   TOPK [3]          PATCH_SIZE [empty: all image tokens]
#   DATA_DIR [data]      OUT_DIR [results/corners/$MODEL]
#   BATCH_SIZE [empty: 8 on a GPU, 1 on the CPU]   DEVICE [auto]   DTYPE [auto]
#   PYTHON [.venv/bin/python when it exists, else python3]
# Results: $OUT_DIR/head_diff_stats_{corner}/ and $OUT_DIR/count_shared_unique/.
# A missing corner data set is generated first (COUNT pairs), with a notice.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

MODEL="${MODEL:-qwen2}"
MODEL_PATH="${MODEL_PATH:-}"
COUNT="${COUNT:-100}"
LAYERS="${LAYERS:-all}"
MAX_NEW_TOKENS="${MAX_NEW_TOKENS:-1}"
TOPK="${TOPK:-3}"
PATCH_SIZE="${PATCH_SIZE:-}"
DATA_DIR="${DATA_DIR:-data}"
OUT_DIR="${OUT_DIR:-results/corners/$MODEL}"
BATCH_SIZE="${BATCH_SIZE:-}"
DEVICE="${DEVICE:-auto}"
DTYPE="${DTYPE:-auto}"
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
CORNERS=(topleft topright bottomleft bottomright)

case "$MODEL" in qwen2|llava) ;; *) echo "error: MODEL=$MODEL is not qwen2 or llava" >&2; exit 2;; esac

datasets=()
for corner in "${CORNERS[@]}"; do
  dir="$DATA_DIR/dataset_$corner"
  if [ ! -f "$dir/metadata.jsonl" ]; then
    echo "NOTICE: $dir is missing; generating $COUNT pairs there" >&2
    "$PYTHON" generate_data.py counterfactual --out "$DATA_DIR" --count "$COUNT" --corners "$corner"
  fi
  datasets+=("$dir")
done

args=(--model "$MODEL" --dataset "${datasets[@]}" --max-pairs "$COUNT" --layers "$LAYERS"
      --max-new-tokens "$MAX_NEW_TOKENS" --topk "$TOPK" --out-dir "$OUT_DIR" --device "$DEVICE" --dtype "$DTYPE")
[ -n "$MODEL_PATH" ] && args+=(--model-path "$MODEL_PATH")
[ -n "$PATCH_SIZE" ] && args+=(--patch-size "$PATCH_SIZE")
[ -n "$BATCH_SIZE" ] && args+=(--batch-size "$BATCH_SIZE")

echo "== scoring heads on ${CORNERS[*]} ($MODEL) -> $OUT_DIR" >&2
"$PYTHON" head_attention_stats.py "${args[@]}"

echo "== shared / unique head analysis -> $OUT_DIR/count_shared_unique" >&2
"$PYTHON" analyze_corner_heads.py "${CORNERS[@]/#/$OUT_DIR/head_diff_stats_}" --out-dir "$OUT_DIR/count_shared_unique"
echo "== done: $OUT_DIR" >&2
