#!/usr/bin/env bash
# Experiment 3: sweep the four corners, then the shared/unique head analysis.
#
# Settings (environment variables, defaults in brackets):
#   MODEL [qwen2]  qwen2 | llava | qwen2_5vl | llava_onevision | llava_next | internvl3 | qwen3vl   MODEL_PATH [the paper's checkpoint; tiny-random for a smoke run]
#   COUNT [100]    pairs per corner        LAYERS [all]   all | 1,5,30 | mid_third | ...
#   MAX_NEW_TOKENS [1]   TOPK [3]          PATCH_SIZE [empty: all image tokens; the blank control then
#                                                     covers the corner quarter of the token grid]
#   SCORE [attention]  attention (the paper's) | patching (the causal score: each head's answer-position
#                      output swapped between the pair's images; head_attention_stats.py --help)
#   DATA_DIR [data]      OUT_DIR [results/corners/$MODEL]
#   BATCH_SIZE [empty: 8 on a GPU, 1 on the CPU]   DEVICE [auto]   DTYPE [auto]
#   ABLATE [0]  1: then ablate each corner's heads named by ABLATE_HEADS (head_ablation.py)
#   ABLATE_HEADS ["unique shared"]  head_ablation.py --heads values, space-separated (e.g. "unique top:4")
#   ABLATE_MODE [zero]  zero | mean     RANDOM_CONTROLS [100]
#   ABLATE_POSITIONS [all]  all (the paper's) | answer (only the answer position, where SCORE=patching measures)
#   SAME_PAIRS [0]  0: the heads are found on the discovery half of each corner's COUNT pairs (the 1st, 3rd, ...)
#                   and ablated on the test half (the 2nd, 4th, ...); 1: both on all pairs, as the paper did (the
#                   chosen heads then beat random heads on their own pairs by chance too; the report says so)
#   CONTROL [empty]  random-weights: run every step on CONTROL_SEEDS [19] random initialisations of the model's
#                    architecture instead of the model (the negative control; docs/controls.md), into
#                    $OUT_DIR/control_random_weights/init_seed_S/, laid out as $OUT_DIR; run the sweep once
#                    without and once with it, in either order, for the model-minus-control comparison
# With ABLATE=1 also: $OUT_DIR/ablation_{corner}_{heads}/ per ABLATE_HEADS value (top:4 -> top-4).
#   PYTHON [the checkout's .venv/bin/python, else the active virtual environment's; with neither, refused, naming
#           the setup command (bash env_setup_llava.bash)]
# Results: $OUT_DIR/head_diff_stats_{corner}/ and $OUT_DIR/count_shared_unique/.
# A missing corner data set is generated first (COUNT pairs), with a notice.
# The settings above (not DEVICE, BATCH_SIZE, DATA_DIR, ABLATE, CONTROL, CONTROL_SEEDS) are kept in $OUT_DIR/sweep_settings.txt; a rerun
# with other values is refused before its first step.
# Rerunning resumes: each corner folder keeps its scored pairs in pairs_scores.jsonl, a complete corner is
# not rescored, and a pair whose images cannot be used is skipped with a warning (counted in its meta.json);
# a finished ablation folder is left as it is, an interrupted one resumes, and one made with other settings
# (ABLATE_MODE, RANDOM_CONTROLS ...) is refused: choose another OUT_DIR or delete it. A bad setting stops the
# sweep before any step.
# Relative paths are taken from the current folder, as for the Python scripts. It takes no argument but --help / -h,
# which prints this and runs nothing.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$HERE/env/entry.bash"
entry_args "${BASH_SOURCE[0]}" -- "$@"

MODEL="${MODEL:-qwen2}"
MODEL_PATH="${MODEL_PATH:-}"
COUNT="${COUNT:-100}"
LAYERS="${LAYERS:-all}"
MAX_NEW_TOKENS="${MAX_NEW_TOKENS:-1}"
TOPK="${TOPK:-3}"
PATCH_SIZE="${PATCH_SIZE:-}"
SCORE="${SCORE:-attention}"
DATA_DIR="${DATA_DIR:-data}"
OUT_DIR="${OUT_DIR:-results/corners/$MODEL}"
BATCH_SIZE="${BATCH_SIZE:-}"
DEVICE="${DEVICE:-auto}"
DTYPE="${DTYPE:-auto}"
ABLATE="${ABLATE:-0}"
ABLATE_MODE="${ABLATE_MODE:-zero}"
ABLATE_HEADS="${ABLATE_HEADS:-unique shared}"
ABLATE_POSITIONS="${ABLATE_POSITIONS:-all}"
SAME_PAIRS="${SAME_PAIRS:-0}"
RANDOM_CONTROLS="${RANDOM_CONTROLS:-100}"
CONTROL="${CONTROL:-}"
CONTROL_SEEDS="${CONTROL_SEEDS:-19}"
CORNERS=(topleft topright bottomleft bottomright)
# The model families (models.FAMILIES), the choices of head_attention_stats.py --score, head_ablation.py --mode
# and --dtype (spatial_attention/corner_stats.py, ablation.py build_parser and cli.add_model_args);
# tests/test_sweep_checks.py keeps these lists equal to those.
MODELS=(qwen2 llava qwen2_5vl llava_onevision llava_next internvl3 qwen3vl)
SCORES=(attention patching)
ABLATE_POSITIONS_CHOICES=(all answer)
ABLATE_MODES=(zero mean)
DTYPES=(auto bf16 fp16 fp32)

# Every setting is checked here, in one line each, before anything is generated or scored: a mistake
# found after the four corners are scored costs hours. (LAYERS, DEVICE, MODEL_PATH and the folders are
# checked by the first Python step, before it loads a model.)
fail() { echo "error: $1" >&2; exit 2; }
check_choice() {  # NAME VALUE CHOICE...
  local name=$1 value=$2 choice
  shift 2
  for choice in "$@"; do [ "$value" = "$choice" ] && return 0; done
  fail "$name=$value: must be one of $*"
}
check_positive() {  # NAME VALUE: a whole number of 1 or more
  [[ $2 =~ ^0*[1-9][0-9]*$ ]] || fail "$1=$2: must be a whole number of 1 or more"
}
check_choice MODEL "$MODEL" "${MODELS[@]}"
check_choice ABLATE "$ABLATE" 0 1
check_choice SAME_PAIRS "$SAME_PAIRS" 0 1
check_choice ABLATE_MODE "$ABLATE_MODE" "${ABLATE_MODES[@]}"
check_choice SCORE "$SCORE" "${SCORES[@]}"
check_choice ABLATE_POSITIONS "$ABLATE_POSITIONS" "${ABLATE_POSITIONS_CHOICES[@]}"
[ "$SCORE" = attention ] || [ -z "$PATCH_SIZE" ] || fail "PATCH_SIZE=$PATCH_SIZE does not apply to SCORE=$SCORE (each \
head's output at the answer position is swapped, whatever it attends to); leave PATCH_SIZE empty"
[ "$SCORE" = attention ] || [ "$MAX_NEW_TOKENS" = 1 ] || fail "MAX_NEW_TOKENS=$MAX_NEW_TOKENS does not apply to \
SCORE=$SCORE (it scores the prompt's last position); leave it at 1"
read -r -a ablate_heads <<< "$ABLATE_HEADS"
[ "$ABLATE" = 0 ] || [ ${#ablate_heads[@]} -gt 0 ] ||
  fail "ABLATE_HEADS is empty: name the heads to ablate (e.g. \"unique shared\")"
check_choice DTYPE "$DTYPE" "${DTYPES[@]}"
check_positive COUNT "$COUNT"
[ "$ABLATE" = 0 ] || [ "$SAME_PAIRS" = 1 ] || [ "$COUNT" -ge 2 ] || fail "COUNT=$COUNT: the ablation tests the heads on \
the half of the pairs they were not found on, so at least 2 are needed; raise COUNT, or SAME_PAIRS=1"
check_positive TOPK "$TOPK"
check_positive MAX_NEW_TOKENS "$MAX_NEW_TOKENS"
check_positive RANDOM_CONTROLS "$RANDOM_CONTROLS"
check_positive CONTROL_SEEDS "$CONTROL_SEEDS"
[ -z "$CONTROL" ] || check_choice CONTROL "$CONTROL" random-weights
[ -z "$PATCH_SIZE" ] || check_positive PATCH_SIZE "$PATCH_SIZE"
[ -z "$BATCH_SIZE" ] || check_positive BATCH_SIZE "$BATCH_SIZE"
find_python "$HERE"

datasets=() missing=()
for corner in "${CORNERS[@]}"; do
  datasets+=("$DATA_DIR/dataset_$corner")
  [ -f "$DATA_DIR/dataset_$corner/metadata.jsonl" ] || missing+=("$corner")
done
if [ ${#missing[@]} -gt 0 ]; then
  corners_csv=$(IFS=,; echo "${missing[*]}")
  echo "NOTICE: no data for corner(s) $corners_csv in $DATA_DIR; generating $COUNT pairs each" >&2
  "$PYTHON" "$HERE/generate_data.py" counterfactual --out "$DATA_DIR" --count "$COUNT" --corners "$corners_csv"
fi

args=(--model "$MODEL" --dataset "${datasets[@]}" --max-pairs "$COUNT" --layers "$LAYERS"
      --max-new-tokens "$MAX_NEW_TOKENS" --topk "$TOPK" --score "$SCORE" --out-dir "$OUT_DIR" --device "$DEVICE"
      --dtype "$DTYPE")
[ -n "$MODEL_PATH" ] && args+=(--model-path "$MODEL_PATH")
[ -n "$PATCH_SIZE" ] && args+=(--patch-size "$PATCH_SIZE")
# the heads are found on one half of the pairs and tested on the other, unless SAME_PAIRS=1
if [ "$SAME_PAIRS" = 1 ]; then args+=(--pairs all); ablate_pairs=(--pairs all --same-pairs)
else args+=(--pairs discovery); ablate_pairs=(--pairs test); fi
[ -n "$BATCH_SIZE" ] && args+=(--batch-size "$BATCH_SIZE")
control_args=()
[ -n "$CONTROL" ] && control_args=(--control "$CONTROL" --control-seeds "$CONTROL_SEEDS")

# The sweep's settings, one per line, kept in OUT_DIR: a rerun with other values would rescore some steps and be
# refused at others (an ablation made with another COUNT), leaving a folder of mixed settings; refused here.
settings=$(printf '%s\n' "MODEL=$MODEL" "MODEL_PATH=$MODEL_PATH" "COUNT=$COUNT" "LAYERS=$LAYERS" \
  "MAX_NEW_TOKENS=$MAX_NEW_TOKENS" "TOPK=$TOPK" "PATCH_SIZE=$PATCH_SIZE" "DTYPE=$DTYPE" "ABLATE_MODE=$ABLATE_MODE" \
  "RANDOM_CONTROLS=$RANDOM_CONTROLS")
# settings added later: recorded where not the default, so that a folder swept before them still resumes
[ "$SCORE" = attention ] || settings+=$'\n'"SCORE=$SCORE"
[ "$ABLATE_POSITIONS" = all ] || settings+=$'\n'"ABLATE_POSITIONS=$ABLATE_POSITIONS"
settings+=$'\n'"SAME_PAIRS=$SAME_PAIRS"  # always: a folder swept before the split found and tested on all pairs
record="$OUT_DIR/sweep_settings.txt"
if [ -f "$record" ] && ! grep -q '^SAME_PAIRS=' "$record"; then  # swept before the split: all pairs for both
  [ "$SAME_PAIRS" = 1 ] || fail "SAME_PAIRS=0: $OUT_DIR was swept before the discovery/test split, its heads \
found and ablated on the same pairs; rerun with SAME_PAIRS=1 to resume it, or use another OUT_DIR"
  echo "SAME_PAIRS=1" >> "$record"
fi
if [ -f "$record" ]; then
  while IFS= read -r line; do
    grep -qxF -- "$line" "$record" || fail "$line: $OUT_DIR was swept with $(grep "^${line%%=*}=" "$record" || \
      echo "no ${line%%=*}") (sweep_settings.txt there); use those settings, or another OUT_DIR"
  done <<< "$settings"
  while IFS= read -r line; do  # a later setting recorded there but at its default now
    grep -qxF -- "$line" <<< "$settings" || fail "${line%%=*} unset: $OUT_DIR was swept with $line \
(sweep_settings.txt there); use those settings, or another OUT_DIR"
  done < "$record"
fi
for corner in "${CORNERS[@]}"; do  # a folder made with a smaller COUNT would give every step fewer pairs, quietly
  have=$(grep -c . "$DATA_DIR/dataset_$corner/metadata.jsonl" || true)
  [ "$have" -ge "$COUNT" ] || fail "COUNT=$COUNT: $DATA_DIR/dataset_$corner holds $have pairs; lower COUNT, or give \
another DATA_DIR (the sweep generates COUNT pairs per corner where there are none)"
done
mkdir -p "$OUT_DIR"
printf '%s\n' "$settings" > "$record"

echo "== scoring heads on ${CORNERS[*]} ($MODEL${CONTROL:+, $CONTROL control}) -> $OUT_DIR" >&2
"$PYTHON" "$HERE/head_attention_stats.py" "${args[@]}" "${control_args[@]}"

# the model's folder, or each initialisation's folder of the control (laid out alike)
roots=("$OUT_DIR")
[ -n "$CONTROL" ] && roots=("$OUT_DIR"/control_random_weights/init_seed_*)
for root in "${roots[@]}"; do
  echo "== shared / unique head analysis -> $root/count_shared_unique" >&2
  root_stats=()
  for corner in "${CORNERS[@]}"; do root_stats+=("$root/head_diff_stats_$corner"); done
  "$PYTHON" "$HERE/analyze_corner_heads.py" "${root_stats[@]}" --out-dir "$root/count_shared_unique"
done
if [ "$ABLATE" = 1 ]; then
  ablate_args=(--model "$MODEL" --mode "$ABLATE_MODE" --positions "$ABLATE_POSITIONS" "${ablate_pairs[@]}"
               --random-controls "$RANDOM_CONTROLS" --max-pairs "$COUNT" --analysis-dir "$OUT_DIR/count_shared_unique"
               --device "$DEVICE" --dtype "$DTYPE")
  [ -n "$MODEL_PATH" ] && ablate_args+=(--model-path "$MODEL_PATH")
  [ -n "$BATCH_SIZE" ] && ablate_args+=(--batch-size "$BATCH_SIZE")
  stats_dirs=()
  for corner in "${CORNERS[@]}"; do stats_dirs+=("$OUT_DIR/head_diff_stats_$corner"); done
  # one call, one model load: each corner with each head spec into $OUT_DIR/ablation_{corner}_{heads}
  echo "== ablating --heads ${ablate_heads[*]} on ${CORNERS[*]} -> $OUT_DIR/ablation_*" >&2
  "$PYTHON" "$HERE/head_ablation.py" "${ablate_args[@]}" "${control_args[@]}" --heads "${ablate_heads[@]}" \
    --stats-dir "${stats_dirs[@]}" --dataset "${datasets[@]}" --out-parent "$OUT_DIR"
fi
echo "== done: $OUT_DIR" >&2
