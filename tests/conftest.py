"""Shared fixtures: the tiny-random models (built once per session) and paths; the order the test files run in
and the threads each parallel worker may use (pytest.ini runs the files on pytest-xdist workers)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    # each worker, and every script a test starts, gets its share of the cores instead of all of them
    share = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(name, str(share))

import subprocess

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
REAL_SAMPLE = REPO.parent / "shared" / "fixtures" / "shapeworld_real" / "agreement" / "relational"
# The longest files first, so that the workers start on them and finish together (pytest.ini keeps this order:
# --no-loadscope-reorder); the rest follow in collection order.
LONGEST_FIRST = ("test_study.py", "test_gpu_check.py", "test_random_7b.py", "test_controls.py", "test_accelerate.py",
                 "test_corner_stats.py", "test_new_families.py", "test_vlm_analysis.py")


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups off the marks
def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's tests keep their order
    for item in items:  # one worker per file (module fixtures built once); the study's users on one worker
        item.add_marker(pytest.mark.xdist_group("tiny_study" if "tiny_study" in item.fixturenames else item.path.name))


@pytest.fixture(scope="session")
def real_sample() -> Path:
    """The real ShapeWorld sample in ../shared/fixtures (skips when absent)."""
    if not REAL_SAMPLE.is_dir():
        pytest.skip(f"real ShapeWorld sample absent: {REAL_SAMPLE} does not exist (it lives in ../shared, beside the checkout)")
    return REAL_SAMPLE


@pytest.fixture(scope="session")
def tiny_models():
    """family -> tiny-random adapter (fp32, CPU). Qwen2-VL fed at 224x224 unless a test sets it."""
    from models import load_adapter

    return {family: load_adapter(family, "tiny-random", device="cpu", dtype="fp32") for family in ("llava", "qwen2")}


@pytest.fixture(params=["llava", "qwen2"])
def adapter(request, tiny_models):
    ad = tiny_models[request.param]
    if request.param == "qwen2":
        ad.set_feed_size(224)
    return ad


@pytest.fixture
def no_model_load(monkeypatch):
    """Loading a model fails the test: the checks under test must come before it."""
    import models

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the options, outputs and inputs were checked")

    monkeypatch.setattr(models, "load_adapter", refuse)


def random_images(n: int, seed: int = 0, size: int = 100) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray((rng.random((size, size, 3)) * 255).astype("uint8")) for _ in range(n)]


def require_toy(family: str) -> None:
    """Skip, saying why, where the committed toy model of ``family`` is absent."""
    from models import toy_folder

    if not (toy_folder(family) / "model.safetensors").is_file():
        pytest.skip(f"no committed toy for {family} in {toy_folder(family)} (train_toy_vlm.py --model {family})")


def committed_toy(family: str):
    """The committed toy of ``family``, loaded as --model-path toy (fp32, CPU); skips where it is absent."""
    from models import TOY, load_adapter

    require_toy(family)
    return load_adapter(family, TOY, device="cpu", dtype="fp32")


# --- the study at toy scale, run once for every test that reads it ------------------------------------------

FAILING = "qwen2/exp2-control"  # the step the stand-in interpreter fails


def _stand_in_python(root: Path) -> tuple[Path, Path]:
    """A PYTHON that fails the qwen2 experiment 2 control while ``marker`` exists, and runs the real one
    otherwise."""
    marker = root / "fail_qwen2_exp2_control"
    marker.touch()
    stand_in = root / "python"
    stand_in.write_text(
        "#!/usr/bin/env bash\n"
        f'if [ -e "{marker}" ] && [[ "$*" == *text_only_llm_analysis.py*"--model qwen2 "*--control* ]]; then\n'
        '  echo "forced failure: the test stands in for a checkpoint that will not load" >&2; exit 3\nfi\n'
        f'exec "{sys.executable}" "$@"\n')
    stand_in.chmod(0o755)
    return stand_in, marker


@pytest.fixture(scope="session")
def tiny_study(tmp_path_factory) -> dict:
    """``run_study.sh`` at toy scale: tiny-random, both families, 6 worlds, 4 pairs per corner, one control
    initialisation (on the first 3 worlds for experiments 1 and 2), the ablation of the unique and the shared heads against 2 random sets, and ``FAILING`` forced
    to fail. Its folders serve the study's tests and the corner sweep's (the sweep runs inside it, once per
    family and once per family's control): ``{"root", "out", "env", "marker", "first", "html"}``."""
    root = tmp_path_factory.mktemp("study")
    stand_in, marker = _stand_in_python(root)
    env = {"MODEL_PATH_LLAVA": "tiny-random", "MODEL_PATH_QWEN2": "tiny-random", "WORLDS": "6", "COUNT": "4",
           "CONTROL_SEEDS": "1", "CONTROL_ITEMS": "3", "DATA_DIR": str(root / "data"), "OUT_DIR": str(root / "out"),
           "PYTHON": str(stand_in), "DEVICE": "cpu", "RANDOM_CONTROLS": "2"}  # the sweep's own settings pass through
    first = subprocess.run(["bash", str(REPO / "run_study.sh")], env={**os.environ, **env}, capture_output=True,
                           text=True, timeout=900)
    return {"root": root, "out": root / "out", "env": env, "marker": marker, "first": first,
            "html": (root / "out" / "report" / "index.html").read_text()}
