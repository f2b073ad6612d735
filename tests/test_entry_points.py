"""The shell entry points (run_study.sh, run_corner_experiments.sh, the env scripts): --help / -h prints their
settings and runs nothing, any other argument is refused in one line, and the study and the sweep find the project's
environment or say how to make it. No model work starts: every interpreter they could reach is a stand-in that
notes its calls, or the check stops them first."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# each script, and settings its --help must name
SCRIPTS = {"run_study.sh": ("MODELS", "OUT_DIR", "CONTROL_SEEDS", "PYTHON"),
           "run_corner_experiments.sh": ("MODEL", "COUNT", "ABLATE", "PYTHON"),
           "env_setup_llava.bash": ("VENV", "PYTHON", "TORCH_INDEX_URL"),
           "env_setup_qwen.bash": ("VENV", "PYTHON", "TORCH_INDEX_URL")}


def _run(script: Path, *args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(script), *args], env=env, capture_output=True, text=True, timeout=60)


@pytest.fixture
def watched(tmp_path) -> tuple[dict, Path]:
    """An environment whose every output goes under ``tmp_path`` and whose PYTHON notes each call in the returned
    file and fails: a script that ran anything leaves a trace."""
    calls = tmp_path / "calls.txt"
    stand_in = tmp_path / "python"
    stand_in.write_text(f'#!/usr/bin/env bash\necho "$@" >> "{calls}"\nexit 1\n')
    stand_in.chmod(0o755)
    env = {**os.environ, "PYTHON": str(stand_in), "OUT_DIR": str(tmp_path / "out"), "DATA_DIR": str(tmp_path / "data"),
           "VENV": str(tmp_path / "venv"), "MODEL_PATH": "tiny-random"}
    return env, calls


def _nothing_ran(tmp_path: Path, calls: Path) -> bool:
    return not calls.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["python"]


@pytest.mark.parametrize("flag", ["--help", "-h"])
@pytest.mark.parametrize("script", SCRIPTS)
def test_help_lists_the_settings_and_runs_nothing(script, flag, watched, tmp_path):
    """Was: run_study.sh --help started the default 7B study, run_corner_experiments.sh --help the sweep."""
    env, calls = watched
    done = _run(REPO / script, flag, env=env)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert "defaults in brackets" in done.stdout and all(name in done.stdout for name in SCRIPTS[script])
    assert "#" not in done.stdout.split("\n", 1)[0] and _nothing_ran(tmp_path, calls)


@pytest.mark.parametrize("script", SCRIPTS)
def test_an_unknown_argument_is_refused_in_one_line(script, watched, tmp_path):
    env, calls = watched
    done = _run(REPO / script, "--model", "llava", env=env)
    assert done.returncode == 2 and done.stderr.splitlines() == [
        f"error: --model: unknown argument; {script} takes its settings from environment variables (bash {script} "
        "--help lists them)"]
    assert _nothing_ran(tmp_path, calls)


@pytest.fixture
def bare_checkout(tmp_path) -> Path:
    """The study's and the sweep's scripts in a checkout without a .venv."""
    checkout = tmp_path / "checkout"
    (checkout / "env").mkdir(parents=True)
    for name in ("run_study.sh", "run_corner_experiments.sh", "env/entry.bash"):
        shutil.copy(REPO / name, checkout / name)
    return checkout


@pytest.mark.parametrize("script", ["run_study.sh", "run_corner_experiments.sh"])
def test_without_the_project_s_environment_the_setup_command_is_named(script, bare_checkout, tmp_path):
    """Was: a system python3, ending in a bare ModuleNotFoundError traceback. The sweep's data are there, so that
    its first step would be scoring."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "VIRTUAL_ENV")}
    env.update(OUT_DIR=str(tmp_path / "out"), DATA_DIR=str(tmp_path / "data"))
    done = _run(bare_checkout / script, env=env)
    assert done.returncode == 2 and done.stderr.splitlines() == [
        f"error: no Python environment: {bare_checkout} has no .venv and none is active; make the project's "
        f"environment with: bash {bare_checkout}/env_setup_llava.bash (or set PYTHON to an interpreter that has its "
        "packages)"]
    # an active environment without the packages (another project's) is refused alike
    lacking = tmp_path / "other_venv"
    (lacking / "bin").mkdir(parents=True)
    (lacking / "bin" / "python").write_text(f'#!/usr/bin/env bash\nexec "{sys.executable}" -S "$@"\n')
    (lacking / "bin" / "python").chmod(0o755)
    done = _run(bare_checkout / script, env={**env, "VIRTUAL_ENV": str(lacking)})
    assert done.returncode == 2 and done.stderr.splitlines() == [
        f"error: {lacking}/bin/python lacks the project's packages (torch, transformers), or cannot run; make the "
        f"project's environment with: bash {bare_checkout}/env_setup_llava.bash (or set PYTHON to an interpreter that "
        "has its packages)"]
    assert not (tmp_path / "out").exists() and not (tmp_path / "data").exists()


def test_an_active_environment_is_used_where_the_checkout_has_none(bare_checkout):
    """The environment made elsewhere (VENV=...) and activated: run_study.sh runs the study with it (here up to
    its check of MODELS, which refuses)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHON"}
    env.update(VIRTUAL_ENV=sys.prefix, PYTHONPATH=str(REPO), MODELS="gpt4")
    done = _run(bare_checkout / "run_study.sh", env=env)
    assert done.returncode == 2 and done.stderr.splitlines()[-1].startswith("error: MODELS: 'gpt4' is not one of")


@pytest.mark.parametrize("given, kept", [(None, "AUTO,STRICT"), ("COMPATIBLE", "COMPATIBLE")])
def test_cpu_runs_repeat_their_bytes_unless_told_otherwise(given, kept):
    """Every command imports the package before torch: it asks MKL for reproducible products (MKL_CBWR) before
    torch loads MKL, and keeps a value the environment gives."""
    env = {k: v for k, v in os.environ.items() if k != "MKL_CBWR"} | ({"MKL_CBWR": given} if given else {})
    done = subprocess.run([sys.executable, "-c", "import sys; import spatial_attention, os; "
                           "print('torch' in sys.modules, os.environ['MKL_CBWR'])"],
                          cwd=REPO, env=env, capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["False", kept]
