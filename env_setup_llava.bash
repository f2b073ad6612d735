#!/usr/bin/env bash
# Environment for the LLaVA-1.5 scripts. Both models share one environment
# (.venv); see README "Environments".
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bash "$here/env/setup_venv.bash"
