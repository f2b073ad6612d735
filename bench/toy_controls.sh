#!/usr/bin/env bash
# The README's Controls table for one family: every instrument on the committed toy (the positive control)
# and on its random-weights control (the negative control), then the table rows.
#
#   bash bench/toy_controls.sh llava            # or qwen2; 4 to 6 minutes on 2 CPU cores
#
# Settings (environment): OUT [results/toy_controls/$FAMILY]  WORLDS [200]  PAIRS [40]  SEEDS [3]
#   RANDOM_CONTROLS [100]  BATCH_SIZE [16]
# Writes $OUT/exp1, $OUT/exp2, $OUT/corners (the sweep with the paper's attention score, ABLATE=1),
# $OUT/corners_patching (the sweep with SCORE=patching, each corner's top 4 and unique heads mean-ablated at the
# answer position), $OUT/exp4 (the relation's heads on relation-swapped caption pairs), each with its control
# under control_random_weights/, and $OUT/table.md (printed too).
# Every step resumes, as the scripts do.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
FAMILY="${1:?usage: bash bench/toy_controls.sh llava|qwen2}"
OUT="${OUT:-results/toy_controls/$FAMILY}"
WORLDS="${WORLDS:-200}"
PAIRS="${PAIRS:-40}"
SEEDS="${SEEDS:-3}"
RANDOM_CONTROLS="${RANDOM_CONTROLS:-100}"
BATCH_SIZE="${BATCH_SIZE:-16}"
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$HERE/.venv/bin/python" ]; then PYTHON="$HERE/.venv/bin/python"; else PYTHON=python3; fi
fi
control=(--control random-weights --control-seeds "$SEEDS")
model=(--model-path toy --batch-size "$BATCH_SIZE" --device cpu --dtype fp32)

data="$OUT/data/shapeworld"
[ -d "$data/shard0" ] || "$PYTHON" "$HERE/generate_data.py" shapeworld --out "$data" --shards 2 \
  --worlds-per-shard $(( (WORLDS + 1) / 2 )) --seed 11
[ -f "$OUT/data/dataset_topleft/metadata.jsonl" ] || "$PYTHON" "$HERE/generate_data.py" counterfactual \
  --out "$OUT/data" --count "$PAIRS" --seed 17

for extra in "" control; do
  args=("${model[@]}" --data "$data" --limit "$WORLDS")
  [ -n "$extra" ] && args+=("${control[@]}")
  "$PYTHON" "$HERE/vlm_atten_analysis_$FAMILY.py" "${args[@]}" --out "$OUT/exp1" --plot-samples 2
  "$PYTHON" "$HERE/text_only_llm_analysis_$FAMILY.py" "${args[@]}" --out "$OUT/exp2"
  "$PYTHON" "$HERE/relation_heads.py" --model "$FAMILY" "${args[@]}" --random-sets "$RANDOM_CONTROLS" --out "$OUT/exp4"
done
sweep() {  # CONTROL OUT_DIR [SETTING=VALUE ...]
  local control=$1 out_dir=$2
  shift 2
  env MODEL="$FAMILY" MODEL_PATH=toy COUNT="$PAIRS" DATA_DIR="$OUT/data" OUT_DIR="$out_dir" DEVICE=cpu DTYPE=fp32 \
    BATCH_SIZE="$BATCH_SIZE" ABLATE=1 RANDOM_CONTROLS="$RANDOM_CONTROLS" CONTROL="$control" CONTROL_SEEDS="$SEEDS" \
    PYTHON="$PYTHON" "$@" bash "$HERE/run_corner_experiments.sh"
}
for extra in "" random-weights; do
  sweep "$extra" "$OUT/corners"  # the paper's: attention score; unique and shared heads zeroed everywhere
  sweep "$extra" "$OUT/corners_patching" SCORE=patching ABLATE_HEADS="unique top:4" ABLATE_MODE=mean \
    ABLATE_POSITIONS=answer
done
# beyond the sweep: the four heads whose attention changes most, mean-ablated, on the top-left corner
for extra in "" control; do
  args=("${model[@]}" --model "$FAMILY" --stats-dir "$OUT/corners/head_diff_stats_topleft" --heads top:4 --mode mean
        --dataset "$OUT/data/dataset_topleft" --random-controls "$RANDOM_CONTROLS" --max-pairs "$PAIRS"
        --out-dir "$OUT/corners/ablation_topleft_top4_mean")
  [ -n "$extra" ] && args+=("${control[@]}")
  "$PYTHON" "$HERE/head_ablation.py" "${args[@]}"
done
"$PYTHON" "$HERE/bench/control_table.py" "$OUT" | tee "$OUT/table.md"
