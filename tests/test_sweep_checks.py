"""run_corner_experiments.sh checks every setting it reads before anything is generated or scored.

The sweep runs with PYTHON set to a stand-in that only notes that it was called: a setting the
script refuses must stop it before any Python step (data generation, scoring, analysis, ablation)."""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "run_corner_experiments.sh"


def corner_folders(data: Path, pairs: int) -> None:
    """A DATA_DIR whose four corner folders hold ``pairs`` lines of metadata each (their content is not read)."""
    for corner in ("topleft", "topright", "bottomleft", "bottomright"):
        (data / f"dataset_{corner}").mkdir(parents=True)
        (data / f"dataset_{corner}" / "metadata.jsonl").write_text("{}\n" * pairs)


def sweep_with_stand_in(tmp_path: Path, **settings: str) -> tuple[subprocess.CompletedProcess, Path]:
    """Run the sweep with ``settings``; PYTHON is a stand-in that appends its arguments to the returned
    file and fails, so that nothing past the first Python step runs."""
    calls = tmp_path / "python_calls.txt"
    stand_in = tmp_path / "python"
    stand_in.write_text(f'#!/usr/bin/env bash\necho "$@" >> "{calls}"\nexit 1\n')
    stand_in.chmod(0o755)
    env = {**os.environ, "PYTHON": str(stand_in), "MODEL_PATH": "tiny-random", "DATA_DIR": str(tmp_path / "data"),
           "OUT_DIR": str(tmp_path / "out"), **settings}
    done = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)
    return done, calls


@pytest.mark.parametrize("settings, error", [
    ({"ABLATE": "yes"}, "ABLATE=yes: must be one of 0 1"),  # was: silently no ablation
    ({"SAME_PAIRS": "yes"}, "SAME_PAIRS=yes: must be one of 0 1"),
    ({"ABLATE": "1", "COUNT": "1"}, "COUNT=1: the ablation tests the heads on the half of the pairs they were not "
                                    "found on, so at least 2 are needed; raise COUNT, or SAME_PAIRS=1"),
    ({"ABLATE": "1", "ABLATE_MODE": "foo"}, "ABLATE_MODE=foo: must be one of zero mean"),  # was: after scoring
    ({"RANDOM_CONTROLS": "0"}, "RANDOM_CONTROLS=0: must be a whole number of 1 or more"),  # was: after scoring
    ({"RANDOM_CONTROLS": "many"}, "RANDOM_CONTROLS=many: must be a whole number of 1 or more"),
    ({"COUNT": "0"}, "COUNT=0: must be a whole number of 1 or more"),
    ({"COUNT": "-5"}, "COUNT=-5: must be a whole number of 1 or more"),
    ({"TOPK": "1.5"}, "TOPK=1.5: must be a whole number of 1 or more"),
    ({"MAX_NEW_TOKENS": "0"}, "MAX_NEW_TOKENS=0: must be a whole number of 1 or more"),
    ({"PATCH_SIZE": "0"}, "PATCH_SIZE=0: must be a whole number of 1 or more"),
    ({"BATCH_SIZE": "eight"}, "BATCH_SIZE=eight: must be a whole number of 1 or more"),
    ({"MODEL": "gpt4"}, "MODEL=gpt4: must be one of qwen2 llava qwen2_5vl llava_onevision llava_next internvl3 qwen3vl"),
    ({"DTYPE": "int8"}, "DTYPE=int8: must be one of auto bf16 fp16 fp32"),
    ({"SCORE": "gradient"}, "SCORE=gradient: must be one of attention patching"),
    ({"ABLATE_POSITIONS": "last"}, "ABLATE_POSITIONS=last: must be one of all answer"),
    ({"SCORE": "patching", "PATCH_SIZE": "2"}, "PATCH_SIZE=2 does not apply to SCORE=patching (each head's output "
                                               "at the answer position is swapped, whatever it attends to); leave "
                                               "PATCH_SIZE empty"),
    ({"ABLATE": "1", "ABLATE_HEADS": " "}, 'ABLATE_HEADS is empty: name the heads to ablate (e.g. "unique shared")'),
])
def test_bad_setting_stops_the_sweep_before_any_step(tmp_path, settings, error):
    done, calls = sweep_with_stand_in(tmp_path, **settings)
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [f"error: {error}"]
    assert not calls.exists() and not (tmp_path / "out").exists() and not (tmp_path / "data").exists()


@pytest.mark.parametrize("settings", [
    {},  # the defaults
    {"MODEL": "llava", "COUNT": "010", "ABLATE": "1", "ABLATE_MODE": "mean", "RANDOM_CONTROLS": "3",
     "PATCH_SIZE": "2", "BATCH_SIZE": "4", "DTYPE": "fp32"},
])
def test_good_settings_pass_the_checks(tmp_path, settings):
    """Valid values reach the first step (here: generating the missing data)."""
    done, calls = sweep_with_stand_in(tmp_path, **settings)
    assert done.returncode == 1 and "error:" not in done.stderr
    assert calls.read_text().split()[:2] == [str(REPO / "generate_data.py"), "counterfactual"]


def script_list(name: str) -> list[str]:
    match = re.search(rf"^{name}=\(([^)]*)\)$", SCRIPT.read_text(), re.MULTILINE)
    assert match, f"{SCRIPT.name} has no {name}=(...) line"
    return match[1].split()


def test_script_choices_are_the_python_choices():
    """The script's lists of families, --score, --mode and --dtype values are copies: they must stay the
    parsers'."""
    from models import FAMILIES
    from spatial_attention.experiments.ablation import build_parser
    from spatial_attention.experiments.corner_stats import SCORES

    choices = {action.dest: list(action.choices) for action in build_parser()._actions if action.choices}
    assert sorted(script_list("MODELS")) == sorted(FAMILIES)
    assert script_list("ABLATE_MODES") == choices["mode"]
    assert script_list("SCORES") == list(SCORES)
    assert script_list("ABLATE_POSITIONS_CHOICES") == choices["positions"]
    assert script_list("DTYPES") == choices["dtype"]


def test_rerun_with_other_settings_is_refused_before_any_step(tmp_path):
    """Was: COUNT=3 on a COUNT=4 sweep rescored the corners and the analysis, then the ablation refused."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "sweep_settings.txt").write_text("MODEL=qwen2\nMODEL_PATH=tiny-random\nCOUNT=4\nLAYERS=all\n"
                                           "MAX_NEW_TOKENS=1\nTOPK=3\nPATCH_SIZE=\nDTYPE=auto\nABLATE_MODE=zero\n"
                                           "RANDOM_CONTROLS=100\nSAME_PAIRS=0\n")
    corner_folders(tmp_path / "data", pairs=4)  # no data to generate: the first step scores
    done, calls = sweep_with_stand_in(tmp_path, COUNT="3")
    assert done.returncode == 2 and not calls.exists()
    assert done.stderr.splitlines()[-1] == (f"error: COUNT=3: {out} was swept with COUNT=4 (sweep_settings.txt there); "
                                            "use those settings, or another OUT_DIR")
    done, calls = sweep_with_stand_in(tmp_path, COUNT="4", DEVICE="cpu", BATCH_SIZE="2")  # not settings of the sweep
    assert done.returncode == 1 and "head_attention_stats.py" in calls.read_text()  # a file from before SCORE
    done, _ = sweep_with_stand_in(tmp_path, COUNT="4", SCORE="patching")
    assert done.stderr.splitlines()[-1] == (f"error: SCORE=patching: {out} was swept with no SCORE "
                                            "(sweep_settings.txt there); use those settings, or another OUT_DIR")
    (out / "sweep_settings.txt").write_text((out / "sweep_settings.txt").read_text() + "SCORE=patching\n")
    done, _ = sweep_with_stand_in(tmp_path, COUNT="4")  # the default again, on a patching sweep
    assert done.stderr.splitlines()[-1] == (f"error: SCORE unset: {out} was swept with SCORE=patching "
                                            "(sweep_settings.txt there); use those settings, or another OUT_DIR")


def test_a_folder_swept_before_the_discovery_test_split_resumes_only_as_it_was_made(tmp_path):
    """A sweep folder from before SAME_PAIRS (heads found and ablated on all pairs) is refused under the split,
    naming SAME_PAIRS=1; with it, the sweep goes on and records it."""
    out = tmp_path / "out"
    out.mkdir()
    before = ("MODEL=qwen2\nMODEL_PATH=tiny-random\nCOUNT=4\nLAYERS=all\nMAX_NEW_TOKENS=1\nTOPK=3\nPATCH_SIZE=\n"
              "DTYPE=auto\nABLATE_MODE=zero\nRANDOM_CONTROLS=100\n")
    (out / "sweep_settings.txt").write_text(before)
    corner_folders(tmp_path / "data", pairs=4)  # no data to generate: the first step scores
    done, calls = sweep_with_stand_in(tmp_path, COUNT="4")
    assert done.returncode == 2 and not calls.exists()
    assert done.stderr.splitlines()[-1] == (f"error: SAME_PAIRS=0: {out} was swept before the discovery/test split, "
                                            "its heads found and ablated on the same pairs; rerun with SAME_PAIRS=1 "
                                            "to resume it, or use another OUT_DIR")
    done, calls = sweep_with_stand_in(tmp_path, COUNT="4", SAME_PAIRS="1")
    assert done.returncode == 1 and calls.exists(), done.stderr  # past the checks: the stand-in's first step
    assert (out / "sweep_settings.txt").read_text() == before + "SAME_PAIRS=1\n"
    assert "--pairs all" in calls.read_text()


def test_a_data_set_with_fewer_pairs_than_count_is_refused_before_any_step(tmp_path):
    """Was: COUNT=32 on folders of 2 pairs scored 1 discovery pair per corner, with a warning in the log only."""
    corner_folders(tmp_path / "data", pairs=2)  # fewer than COUNT
    done, calls = sweep_with_stand_in(tmp_path, COUNT="32")
    assert done.returncode == 2 and not calls.exists()
    assert done.stderr.splitlines()[-1] == (f"error: COUNT=32: {tmp_path / 'data'}/dataset_topleft holds 2 pairs; "
                                            "lower COUNT, or give another DATA_DIR (the sweep generates COUNT pairs "
                                            "per corner where there are none)")
