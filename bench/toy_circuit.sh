#!/usr/bin/env bash
# Every instrument scored against a toy's known circuit (docs/controls.md, "The known circuit"): the toy was trained
# with head 2.0 binding each mention to its shape and heads 3.1 / 3.2 carrying the two shapes to the answer
# (spatial_attention/experiments/toy_circuit.py), so what each instrument should find is known.
#
#   bash bench/toy_circuit.sh llava            # or qwen2; about 10 minutes on 2 CPU cores
#
# Settings (environment): OUT [results/toy_circuit/$FAMILY]  WORLDS [200]  SEEDS [3]  RANDOM_SETS [100]
#   BATCH_SIZE [16]
# Writes $OUT/evaluate.jsonl and $OUT/circuit.jsonl (the toy, then each initialisation of its control),
# $OUT/exp4_mirror and $OUT/exp4_swap (experiment 4 on each kind of pair), $OUT/exp1_head_2.0 and
# $OUT/exp1_heads_2.other (experiment 1's maps of the binding head, and of the other heads of its layer), each
# with its random-weights control, and $OUT/table.md (printed too). Experiment 3 on the corners:
# bench/toy_controls.sh. Every step resumes, as the scripts do.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
FAMILY="${1:?usage: bash bench/toy_circuit.sh llava|qwen2}"
OUT="${OUT:-results/toy_circuit/$FAMILY}"
WORLDS="${WORLDS:-200}"
SEEDS="${SEEDS:-3}"
RANDOM_SETS="${RANDOM_SETS:-100}"
BATCH_SIZE="${BATCH_SIZE:-16}"
PYTHON="${PYTHON:-$HERE/.venv/bin/python}"
control=(--control random-weights --control-seeds "$SEEDS")
model=(--model-path toy --batch-size "$BATCH_SIZE" --device cpu --dtype fp32)
real="$HERE/../shared/fixtures/shapeworld_real/agreement/relational"

data="$OUT/data/shapeworld"
[ -d "$data/shard0" ] || "$PYTHON" "$HERE/generate_data.py" shapeworld --out "$data" --shards 2 \
  --worlds-per-shard $(( (WORLDS + 1) / 2 )) --seed 11
if [ ! -s "$OUT/evaluate.jsonl" ]; then
  for folder in "$data" $([ -d "$real" ] && echo "$real"); do
    "$PYTHON" "$HERE/train_toy_vlm.py" --model "$FAMILY" --evaluate "$folder"
  done > "$OUT/evaluate.tmp" && mv "$OUT/evaluate.tmp" "$OUT/evaluate.jsonl"
fi
if [ ! -s "$OUT/circuit.jsonl" ]; then
  { "$PYTHON" "$HERE/train_toy_vlm.py" --model "$FAMILY" --circuit --held-out "$WORLDS" \
    && "$PYTHON" "$HERE/train_toy_vlm.py" --model "$FAMILY" --circuit --held-out "$WORLDS" "${control[@]}"; } \
    > "$OUT/circuit.tmp" && mv "$OUT/circuit.tmp" "$OUT/circuit.jsonl"
fi

others=$(seq -s, 1 7)  # the binding head's layer has 8 heads in both toys
for extra in "" control; do
  args=("${model[@]}" --data "$data" --limit "$WORLDS")
  [ -n "$extra" ] && args+=("${control[@]}")
  for kind in mirror swap; do
    "$PYTHON" "$HERE/relation_heads.py" --model "$FAMILY" "${args[@]}" --kind "$kind" --random-sets "$RANDOM_SETS" \
      --out "$OUT/exp4_$kind"
  done
  "$PYTHON" "$HERE/vlm_atten_analysis_$FAMILY.py" "${args[@]}" --layers 2 --heads 0 --no-baseline --plot-samples 2 \
    --out "$OUT/exp1_head_2.0"
  "$PYTHON" "$HERE/vlm_atten_analysis_$FAMILY.py" "${args[@]}" --layers 2 --heads "$others" --no-baseline \
    --plot-samples 0 --out "$OUT/exp1_heads_2.other"
done
"$PYTHON" "$HERE/bench/circuit_table.py" "$OUT" | tee "$OUT/table.md"
