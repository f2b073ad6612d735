# What the shell entry points share (sourced, not run): their arguments and the interpreter of their steps.

# entry_args FILE... -- ARG...: --help or -h prints the comment at the top of each FILE (the script's first: its
# settings, the environment variables it reads with their defaults) and exits, running nothing; any other argument
# is refused in one line (exit 2), since the settings are environment variables.
entry_args() {
  local files=() arg file
  while [ "$1" != -- ]; do files+=("$1"); shift; done
  shift
  for arg in "$@"; do
    if [ "$arg" = --help ] || [ "$arg" = -h ]; then
      for file in "${files[@]}"; do
        [ "$file" = "${files[0]}" ] || echo
        sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$file"
      done
      exit 0
    fi
  done
  if [ $# -gt 0 ]; then
    echo "error: $1: unknown argument; ${files[0]##*/} takes its settings from environment variables (bash" \
      "${files[0]##*/} --help lists them)" >&2
    exit 2
  fi
}

# find_python CHECKOUT: PYTHON as given (the caller's choice, used as it is); else CHECKOUT/.venv/bin/python; else the
# active virtual environment's (one made elsewhere with VENV=..., then activated); else a one-line refusal naming the
# setup command. The one found must have the project's packages: a bare system python, or another project's
# environment, would end in a ModuleNotFoundError traceback.
find_python() {
  [ -z "${PYTHON:-}" ] || return 0
  local setup="make the project's environment with: bash $1/env_setup_llava.bash (or set PYTHON to an"
  setup+=" interpreter that has its packages)"
  if [ -x "$1/.venv/bin/python" ]; then PYTHON="$1/.venv/bin/python"
  elif [ -n "${VIRTUAL_ENV:-}" ] && [ -x "$VIRTUAL_ENV/bin/python" ]; then PYTHON="$VIRTUAL_ENV/bin/python"
  else
    echo "error: no Python environment: $1 has no .venv and none is active; $setup" >&2
    exit 2
  fi
  "$PYTHON" -c 'import importlib.util as u, sys
sys.exit(any(u.find_spec(m) is None for m in ("torch", "transformers")))' 2>/dev/null || {
    echo "error: $PYTHON lacks the project's packages (torch, transformers), or cannot run; $setup" >&2
    exit 2
  }
}
