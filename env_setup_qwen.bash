#!/usr/bin/env bash
# Environment for the Qwen2-VL scripts: the same shared .venv (see README "Environments").
# It takes no argument but --help / -h, which prints this and the settings below, and runs nothing.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$here/env/entry.bash"
entry_args "${BASH_SOURCE[0]}" "$here/env/setup_venv.bash" -- "$@"
bash "$here/env/setup_venv.bash"
