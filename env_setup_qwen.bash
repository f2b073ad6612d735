#!/usr/bin/env bash
# Environment for the Qwen2-VL scripts: the same shared .venv (see README "Environments").
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bash "$here/env/setup_venv.bash"
