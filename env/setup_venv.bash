#!/usr/bin/env bash
# Create or refresh (idempotently) the project's virtual environment.
# Used by env_setup_llava.bash and env_setup_qwen.bash; both models run in one
# environment, so both scripts prepare the same .venv.
#
# Settings (environment variables, defaults in brackets):
#   VENV [.venv in the checkout]  where to put the environment
#   PYTHON [python3]              which interpreter creates it (e.g. python3.11)
#   TORCH_INDEX_URL [unset]       a PyTorch wheel index for a specific CUDA build; unset,
#                                 torch/torchvision come from PyPI (CUDA builds that also run on CPU)
#   EXTRA_REQUIREMENTS [none]     further pinned packages, e.g. "qwen-vl-utils==0.0.14"
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/env/entry.bash"
entry_args "${BASH_SOURCE[0]}" -- "$@"
venv="${VENV:-$root/.venv}"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
  echo "[env] creating $venv with $($python --version 2>&1)"
  "$python" -m venv "$venv"
else
  echo "[env] refreshing $venv"
fi
pip=("$venv/bin/python" -m pip install --disable-pip-version-check -q)

torch_pins=$(grep -E '^(torch|torchvision)==' "$root/requirements.txt" | tr '\n' ' ')
if [ -n "${TORCH_INDEX_URL:-}" ]; then
  echo "[env] installing $torch_pins from $TORCH_INDEX_URL"
  "${pip[@]}" --index-url "$TORCH_INDEX_URL" $torch_pins
else
  echo "[env] installing $torch_pins"
  "${pip[@]}" $torch_pins
fi
echo "[env] installing requirements.txt ${EXTRA_REQUIREMENTS:-}"
"${pip[@]}" -r "$root/requirements.txt" ${EXTRA_REQUIREMENTS:-}

"$venv/bin/python" - <<'PY'
import torch, torchvision, transformers, accelerate, numpy, matplotlib, PIL, tqdm
print(f"[env] ok: torch {torch.__version__} (cuda available: {torch.cuda.is_available()}), "
      f"torchvision {torchvision.__version__}, transformers {transformers.__version__}")
PY
echo "[env] activate with: source $venv/bin/activate"
