"""The whole study in one command (``run_study.sh``): every experiment for every model, with its random-weights
control, into one folder tree, then one report (``report.py``).

Each step runs the experiment's own script in its own process, its output appended to its own log, so a step
that fails (a checkpoint that will not load, GPU memory) is recorded and the next step starts. The scripts
resume, so a step cut off is picked up where it stopped; a step recorded as finished with the same command is
not run again. A rerun with settings that change numbers (a model path, WORLDS, COUNT, ...) is refused before
any step, naming the setting: a study folder never mixes two settings.

Layout of OUT_DIR:
    study.json                 the settings, the steps and how the last run ended
    steps/{step}.json          each step: its commands, status, exit code, seconds, the end of its log
    logs/{step}.log            each step's output, every try appended
    {model}/exp1, {model}/exp2, {model}/corners   each script's own results (README), controls inside them
    report/index.html, report/REPORT.md
"""
from __future__ import annotations

import ctypes
import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace

from spatial_attention.common.console import duration
from spatial_attention.common.errors import OptionError
from spatial_attention.data.shapeworld import DEFAULT_SHAPEWORLD
from spatial_attention.run.cli import DTYPES
from spatial_attention.run.controls import (COMPARISON_FILE, DEFAULT_SEEDS, MAX_SEEDS, RANDOM_WEIGHTS, init_seeds,
                                            seed_folder)
from spatial_attention.study.folder import LOGS_DIR, PLAN_FILE, STEPS_DIR, STUDY_FILE

log = logging.getLogger("spatial_attention.study")

REPO = Path(__file__).resolve().parents[2]
DEFAULT_MODELS = "llava qwen2"  # the paper's two models
SHAPEWORLD_SUBDIR = DEFAULT_SHAPEWORLD.relative_to("data")  # where the experiment scripts look by default
# the settings that change numbers: a rerun into the same OUT_DIR with other values is refused
RECORDED = ("model_paths", "worlds", "count", "control_seeds", "control_items", "dtype", "data_dir",
            "control_initialisation")
# run_corner_experiments.sh's own settings, passed through to the sweep steps and part of what they did
SWEEP_SETTINGS = ("SCORE", "LAYERS", "MAX_NEW_TOKENS", "TOPK", "PATCH_SIZE", "ABLATE_HEADS", "ABLATE_MODE",
                  "ABLATE_POSITIONS", "RANDOM_CONTROLS", "SAME_PAIRS")
# unlike run_corner_experiments.sh's default (all, the paper's: every position above the lowest ablated layer rerun
# for each random set, hours at 7B), the heads ablated where experiment 3 found them; the report says which
STUDY_SWEEP_DEFAULTS = {"ABLATE_POSITIONS": "answer"}
# what may change between runs without redoing a finished step: where and how fast it runs, not what it computes
NOT_COMPARED = {"--device": 1, "--batch-size": 1}
NOT_COMPARED_ENV = ("DEVICE", "BATCH_SIZE", "PYTHON")
LOG_TAIL_LINES = 15
CONTROL_ITEMS = 100  # worlds of experiments 1 and 2 per random initialisation: 19 x 100, about 4x the model's 500
CONTROL_OPTIONS = {"exp1": ("--plot-samples", "0")}  # an initialisation's per-world figures are in no report
PR_SET_PDEATHSIG = 1  # prctl option (linux/prctl.h)


def _env_int(environ, name: str, default: int | None, allow_all: bool = False, most: int | None = None) -> int | None:
    text = environ.get(name, "").strip()
    if not text:
        return default
    if allow_all and text == "all":
        return None
    if not text.isdigit() or int(text) < 1:
        raise OptionError(f"{name}={text}: must be a whole number of 1 or more" + (" or 'all'" if allow_all else ""))
    if most is not None and int(text) > most:
        raise OptionError(f"{name}={text}: at most {most}")
    return int(text)


def _env_flag(environ, name: str, default: str) -> bool:
    text = environ.get(name, default).strip()
    if text not in ("0", "1"):
        raise OptionError(f"{name}={text}: must be 0 or 1")
    return text == "1"


@dataclass(frozen=True)
class StudySettings:
    """The study's settings, read from the environment (``run_study.sh`` lists them) and checked."""
    models: tuple[str, ...]
    model_paths: dict[str, str]
    worlds: int | None  # None: every world in the data
    count: int
    controls: bool
    control_seeds: int
    control_items: int | None  # the first worlds of experiments 1 and 2 each initialisation runs (None: all)
    ablate: bool
    out_dir: Path
    data_dir: Path
    device: str
    dtype: str
    batch_size: int | None
    python: str = field(default=sys.executable)
    plan_only: bool = False  # PLAN=1: write the cost plan, run nothing
    calibration: Path | None = None  # CALIBRATION: the device the plan prices for (study/calibration.py)

    @classmethod
    def from_env(cls, environ=os.environ) -> "StudySettings":
        """Every setting checked in one line each, before any step runs."""
        from models import ADAPTERS
        from spatial_attention.run.options import check_device

        models = tuple(environ.get("MODELS", DEFAULT_MODELS).split())
        if not models:
            raise OptionError(f"MODELS is empty: name one or more of {', '.join(ADAPTERS)}")
        for model in models:
            if model not in ADAPTERS:
                raise OptionError(f"MODELS: {model!r} is not one of {', '.join(ADAPTERS)}")
        if len(set(models)) < len(models):
            raise OptionError(f"MODELS={' '.join(models)}: a model is named twice")
        paths = {}
        for model in models:
            name = f"MODEL_PATH_{model.upper()}"
            path = environ.get(name, "").strip() or ADAPTERS[model].default_model_path
            if path.startswith(("/", "./", "../")) and not Path(path).exists():
                raise OptionError(f"{name}={path}: no such folder; give a downloaded checkpoint folder, a hub id, "
                                  "toy, tiny-random or random-7b[:N]")
            paths[model] = path
        dtype = environ.get("DTYPE", "auto").strip()
        if dtype not in DTYPES:
            raise OptionError(f"DTYPE={dtype}: must be one of {', '.join(DTYPES)}")
        device = environ.get("DEVICE", "auto").strip()
        try:
            check_device(device)
        except OptionError as err:
            raise OptionError(f"DEVICE={device}: {str(err).split(': ', 1)[1]}") from None
        out_dir = Path(environ.get("OUT_DIR", "results/study"))
        if out_dir.exists() and not out_dir.is_dir():
            raise OptionError(f"OUT_DIR={out_dir}: is a file; choose a folder for the study")
        data_dir = Path(environ.get("DATA_DIR", "data"))
        if data_dir.exists() and not data_dir.is_dir():
            raise OptionError(f"DATA_DIR={data_dir}: is a file; choose the data folder")
        python = environ.get("PYTHON", "").strip() or sys.executable
        calibration = Path(environ["CALIBRATION"]) if environ.get("CALIBRATION", "").strip() else None
        if calibration:
            from spatial_attention.study.calibration import read_calibration

            read_calibration(calibration)  # a bad file is refused before anything runs
        if shutil.which(python) is None:
            raise OptionError(f"PYTHON={python}: not an executable; point it at the interpreter of the environment "
                              "(docs/environments.md), or leave it unset")
        return cls(models=models, model_paths=paths, worlds=_env_int(environ, "WORLDS", None, allow_all=True),
                   count=_env_int(environ, "COUNT", 100), controls=_env_flag(environ, "CONTROLS", "1"),
                   control_seeds=_env_int(environ, "CONTROL_SEEDS", DEFAULT_SEEDS, most=MAX_SEEDS),
                   control_items=_env_int(environ, "CONTROL_ITEMS", CONTROL_ITEMS, allow_all=True),
                   ablate=_env_flag(environ, "ABLATE", "1"),
                   out_dir=out_dir, data_dir=data_dir, device=device, dtype=dtype,
                   batch_size=_env_int(environ, "BATCH_SIZE", None), python=python,
                   plan_only=_env_flag(environ, "PLAN", "0"), calibration=calibration)

    def recorded(self) -> dict:
        """The settings kept in study.json that a rerun must repeat."""
        from models.base import CONTROL_INITIALISATION

        return {"model_paths": dict(self.model_paths), "worlds": self.worlds, "count": self.count,
                "control_seeds": self.control_seeds, "control_items": self.control_items, "dtype": self.dtype,
                "data_dir": str(self.data_dir.resolve()),
                "control_initialisation": CONTROL_INITIALISATION if self.controls else None}

    @property
    def shapeworld(self) -> Path:
        return self.data_dir / SHAPEWORLD_SUBDIR


@dataclass(frozen=True)
class Step:
    """One step: its name (``llava/exp1-control``; files use ``llava-exp1-control``), what it is, and the
    commands it runs in order (with extra environment variables).

    ``creates``: per command, a path it makes, or ""; a command whose path exists is not run. ``outputs``: the
    files a finished step leaves; a step recorded as finished runs again when one is missing (deleted, or never
    written)."""
    name: str
    title: str
    commands: tuple[tuple[str, ...], ...]
    env: tuple[tuple[str, str], ...] = ()
    results: str = ""  # its results folder, relative to OUT_DIR
    creates: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    python: str = ""  # the interpreter the commands name (not part of the signature)

    @property
    def key(self) -> str:
        return self.name.replace("/", "-")

    def signature(self) -> dict:
        """What the step computes: its commands and settings without the interpreter, the device and the batch
        size, which change where and how fast it runs, not its numbers (the scripts' identities refuse what
        would)."""
        commands = []
        for command in self.commands:
            kept, skip = [], 0
            for i, arg in enumerate(command):
                if skip:
                    skip -= 1
                elif i == 0 and self.python and arg == self.python:
                    kept.append("PYTHON")
                elif arg in NOT_COMPARED:
                    skip = NOT_COMPARED[arg]
                else:
                    kept.append(arg)
            commands.append(kept)
        return {"commands": commands, "env": {k: v for k, v in self.env if k not in NOT_COMPARED_ENV}}


def _data_step(s: StudySettings) -> Step:
    """Generate the ShapeWorld-format folder (5 x 100 worlds, as the experiment scripts do for their default
    folder) when it is missing, into a temporary folder first, so that a cut-off generation leaves no partial
    folder behind. (The corner pairs are generated by the sweep, COUNT per corner, where they are missing.)"""
    target, partial = str(s.shapeworld), str(s.shapeworld) + ".partial"
    commands = (("rm", "-rf", partial), (s.python, str(REPO / "generate_data.py"), "shapeworld", "--out", partial),
                ("mv", partial, target))
    return Step("data", "the ShapeWorld data, generated where missing", commands, creates=(target,) * 3,
                python=s.python)


def plan(s: StudySettings) -> list[Step]:
    """Every step of the study, in order: the data, then per model experiments 1 and 2 and the corner sweep
    (with the ablation when ABLATE=1), each followed by its random-weights control when CONTROLS=1."""
    steps = [_data_step(s)]
    control = ("--control", "random-weights", "--control-seeds", str(s.control_seeds))
    comparison = f"{COMPARISON_FILE}.json"
    control_init_seeds = init_seeds(SimpleNamespace(control=RANDOM_WEIGHTS, control_seeds=s.control_seeds))
    for model in s.models:
        options = ("--model-path", s.model_paths[model], "--device", s.device, "--dtype", s.dtype)
        if s.batch_size:
            options += ("--batch-size", str(s.batch_size))
        limits = [n for n in (s.worlds, s.control_items) if n]
        control_limit = ("--limit", str(min(limits))) if limits else ()
        if s.worlds:
            options += ("--limit", str(s.worlds))
        for exp, script, what in (("exp1", "vlm_atten_analysis", "experiment 1: localisation"),
                                  ("exp2", "text_only_llm_analysis", "experiment 2: text-only binding"),
                                  ("exp4", "relation_heads", "experiment 4: the relation's heads")):
            out = s.out_dir / model / exp
            base = (s.python, str(REPO / f"{script}.py"), "--model", model, *options, "--data", str(s.shapeworld),
                    "--out", str(out))
            steps.append(Step(f"{model}/{exp}", what, (base,), results=f"{model}/{exp}",
                              outputs=(str(out / "summary.json"),), python=s.python))
            if s.controls:  # the same items for every initialisation: the first CONTROL_ITEMS (a later --limit wins)
                # experiment 4's control compares nothing where the model chose no heads; each initialisation
                # still writes its summary
                done = (str(out / comparison),) if exp != "exp4" else tuple(
                    str(seed_folder(out, seed) / "summary.json") for seed in control_init_seeds)
                steps.append(Step(f"{model}/{exp}-control", f"{what}, random-weights control",
                                  (base + control_limit + control + CONTROL_OPTIONS.get(exp, ()),),
                                  results=f"{model}/{exp}", outputs=done, python=s.python))
        corners = s.out_dir / model / "corners"
        sweep_env = {"MODEL": model, "MODEL_PATH": s.model_paths[model], "COUNT": str(s.count),
                     "DATA_DIR": str(s.data_dir), "OUT_DIR": str(corners), "DEVICE": s.device, "DTYPE": s.dtype,
                     "BATCH_SIZE": str(s.batch_size or ""), "ABLATE": "1" if s.ablate else "0", "PYTHON": s.python,
                     **STUDY_SWEEP_DEFAULTS, **{k: os.environ[k] for k in SWEEP_SETTINGS if k in os.environ}}
        sweep = (("bash", str(REPO / "run_corner_experiments.sh")),)
        what = "experiment 3: corner heads" + (" and their ablation" if s.ablate else "")
        analysis = str(corners / "count_shared_unique" / "summary.json")
        steps.append(Step(f"{model}/corners", what, sweep, tuple(sorted(sweep_env.items())), f"{model}/corners",
                          outputs=(analysis,)))
        if s.controls:
            control_env = {**sweep_env, "CONTROL": "random-weights", "CONTROL_SEEDS": str(s.control_seeds)}
            seeds = [seed_folder(corners, seed) / "count_shared_unique" / "summary.json"
                     for seed in control_init_seeds]
            steps.append(Step(f"{model}/corners-control", f"{what}, random-weights control", sweep,
                              tuple(sorted(control_env.items())), f"{model}/corners",
                              outputs=tuple(map(str, seeds))))
    return steps


def check_study_folder(s: StudySettings) -> dict | None:
    """The study.json of an earlier run into OUT_DIR; OptionError when it was run with other settings."""
    from spatial_attention.common.runio import LOCK_FILE, check_output_dir

    check_output_dir(s.out_dir, "OUT_DIR")
    path = s.out_dir / STUDY_FILE
    if not path.is_file():
        if s.out_dir.is_dir() and any(p.name not in (LOCK_FILE, PLAN_FILE) for p in s.out_dir.iterdir()):
            raise OptionError(f"OUT_DIR={s.out_dir}: holds files but no {STUDY_FILE} (not a study folder); "
                              "choose an empty or new folder")
        return None
    try:
        earlier = json.loads(path.read_text())
        before = earlier["settings"]
    except (ValueError, KeyError, TypeError):
        raise OptionError(f"OUT_DIR={s.out_dir}: {path} is damaged; choose another OUT_DIR") from None
    now = s.recorded()
    for key in RECORDED:
        old, new = before.get(key), now[key]
        if key == "model_paths":  # a model added later is fine; a model's checkpoint changed is not
            for model in set(old or {}) & set(new):
                if old[model] != new[model]:
                    raise OptionError(f"MODEL_PATH_{model.upper()}={new[model]}: {s.out_dir} was run with "
                                      f"{old[model]} ({path}); use that, or another OUT_DIR")
        elif key == "control_initialisation" and old != new:  # the controls' weights are other draws now
            raise OptionError(f"OUT_DIR={s.out_dir}: its random-weights controls were drawn otherwise than by {new!r} "
                              f"({path}); new draws would not pool with them: use another OUT_DIR (or CONTROLS=0)")
        elif old != new:
            name = key.upper()
            shown = (lambda v: "all" if v is None else v) if key in ("worlds", "control_items") else (lambda v: v)
            raise OptionError(f"{name}={shown(new)}: {s.out_dir} was run with {name}={shown(old)} ({path}); use "
                              "that, or another OUT_DIR")
    return earlier


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> list[str]:
    """The last ``lines`` lines of a log, a progress bar's redrawn line kept at its last state."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return []
    shown = [line.rsplit("\r", 1)[-1].rstrip() for line in text.splitlines()]
    return [line for line in shown if line][-lines:]


class Interrupted(Exception):
    """The study was stopped (Ctrl-C, SIGTERM) during the step it names."""


def _record(path: Path) -> dict | None:
    """A step's record; None where there is none or it cannot be read (the step then runs)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _stop(proc: subprocess.Popen) -> None:
    """Stop a step's whole process group (the sweep's bash and its Python steps): SIGTERM first, which the
    scripts take as Ctrl-C (they record where they stopped), and which, unlike SIGINT, a study started in the
    background (nohup, &) does not pass on as ignored; then SIGKILL after a minute."""
    for sig, wait in ((signal.SIGTERM, 60), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _stop_with_the_study() -> None:
    """Run in a step's process before its command (Linux): the kernel sends it SIGTERM when the study dies, even
    by SIGKILL, and the scripts take SIGTERM as Ctrl-C. Where this is not available, the study's lock, which the
    step's processes hold too, keeps a rerun out of the folder while any of them lives."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def run_step(step: Step, out_dir: Path, index: int, total: int) -> dict:
    """Run ``step`` unless it finished earlier with the same signature and left its outputs; its record (also
    in steps/)."""
    from spatial_attention.common.runio import lock_descriptor, write_json

    record_path = out_dir / STEPS_DIR / f"{step.key}.json"
    log_path = out_dir / LOGS_DIR / f"{step.key}.log"
    earlier = _record(record_path)
    where = f"[{index}/{total}] {step.name}"
    done = all(Path(p).exists() for p in step.creates + step.outputs if p)
    if earlier and earlier.get("status") == "ok" and earlier.get("signature") == step.signature() and done:
        log.info("%s: finished earlier (%s), skipped", where, duration(earlier.get("seconds", 0)))
        return earlier
    env = dict(step.env)
    record = {"name": step.name, "title": step.title, "results": step.results, "signature": step.signature(),
              "commands": [list(c) for c in step.commands], "env": env, "log": str(log_path.relative_to(out_dir)),
              "status": "running", "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "tries": (earlier or {}).get("tries", 0) + 1}
    write_json(record_path, record)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log.info("%s: %s ... (log: %s)", where, step.title, log_path)
    start, rc = time.monotonic(), 0
    with open(log_path, "ab") as log_file:
        log_file.write(f"\n=== {record['started']} try {record['tries']}\n".encode())
        for command, creates in zip(record["commands"], step.creates or [""] * len(step.commands)):
            if creates and Path(creates).exists():
                log_file.write(f"{creates} exists\n".encode())
                continue
            shown = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()) + " " * bool(env) + shlex.join(command)
            log_file.write(f"$ {shown}\n".encode())
            log_file.flush()
            try:  # its own process group: a stop reaches every process of the step, and only through _stop;
                # the study's lock goes with it, so that a rerun stays out while a step outlives a killed study
                proc = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT,
                                        env={**os.environ, **env}, start_new_session=True,
                                        pass_fds=(lock_descriptor(out_dir),), preexec_fn=_stop_with_the_study)
            except OSError as err:
                log_file.write(f"cannot start {command[0]}: {err}\n".encode())
                rc = 127
                break
            try:
                rc = proc.wait()
            except KeyboardInterrupt:
                _stop(proc)
                record.update(status="interrupted", seconds=round(time.monotonic() - start, 1),
                              tail=log_tail(log_path))
                write_json(record_path, record)
                raise Interrupted(step.name) from None
            if rc:
                break
    record.update(status="ok" if rc == 0 else "failed", returncode=rc, seconds=round(time.monotonic() - start, 1),
                  ended=time.strftime("%Y-%m-%dT%H:%M:%S%z"), tail=log_tail(log_path) if rc else [])
    write_json(record_path, record)
    if rc:
        log.warning("%s: FAILED (exit %d) after %s; the end of %s:\n    %s", where, rc, duration(record["seconds"]),
                    log_path, "\n    ".join(record["tail"][-5:]))
    else:
        log.info("%s: done in %s", where, duration(record["seconds"]))
    return record


def run_study(s: StudySettings) -> int:
    """Every step, then the report; the exit status: 0 when every step finished and the report read every file,
    1 otherwise."""
    from spatial_attention.common.runio import claim_output, package_versions, release_outputs, write_json
    from spatial_attention.study.cost import plan_study, report_plan

    earlier = check_study_folder(s) or {}
    if s.plan_only:
        log.info("PLAN=1: the plan is in %s; nothing was run", report_plan(plan_study(s, plan(s)), s.out_dir))
        return 0
    claim_output(s.out_dir, "OUT_DIR")  # one study at a time in a folder: two would run each step twice
    try:
        steps = plan(s)
        report_plan(plan_study(s, steps), s.out_dir)
        before = earlier.get("settings") or {}
        # a model run earlier and not named now stays in the study (and in its report), with its checkpoint
        models = list(dict.fromkeys([*(before.get("models") or []), *s.models]))
        recorded = s.recorded()
        recorded["model_paths"] = {**(before.get("model_paths") or {}), **recorded["model_paths"]}
        listed = {step.key: asdict(step) | {"key": step.key} for step in steps}
        kept = [old for old in earlier.get("steps") or [] if old.get("key") not in listed]
        study = {"settings": {**recorded, "models": models, "controls": s.controls, "ablate": s.ablate,
                              "device": s.device, "batch_size": s.batch_size, "out_dir": str(s.out_dir),
                              "python": s.python},
                 "command": "run_study.sh", "steps": kept + list(listed.values()), "versions": package_versions(),
                 "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "status": "running"}
        write_json(s.out_dir / STUDY_FILE, study)
        return _run_steps(s, steps, study)
    finally:
        release_outputs()


def _run_steps(s: StudySettings, steps: list[Step], study: dict) -> int:
    """Run the steps in order, recording the study's end in study.json, then write the report; the exit status:
    1 where a step failed or the report found a file it cannot read."""
    from spatial_attention.common.runio import write_json
    from spatial_attention.study import report

    start = time.monotonic()
    # SIGTERM (kill, a cluster's time limit) ends the study like Ctrl-C: the running step is stopped and recorded
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        records = [run_step(step, s.out_dir, i, len(steps)) for i, step in enumerate(steps, 1)]
    except (Interrupted, KeyboardInterrupt) as err:
        study.update(status="interrupted", seconds=round(time.monotonic() - start, 1))
        write_json(s.out_dir / STUDY_FILE, study)
        log.error("interrupted%s; finished steps and results are kept: rerun the same command to resume",
                  f" during {err}" if str(err) else "")
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    failed = [r["name"] for r in records if r["status"] != "ok"]
    study.update(status="failed" if failed else "finished", failed=failed, seconds=round(time.monotonic() - start, 1),
                 ended=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    write_json(s.out_dir / STUDY_FILE, study)
    html, markdown, unreadable = report.write_report(s.out_dir)
    log.info("%d of %d steps finished%s in %s", len(records) - len(failed), len(records),
             f"; failed: {', '.join(failed)}" if failed else "", duration(study["seconds"]))
    for rel, why in unreadable.items():
        log.error("unreadable: %s: %s", s.out_dir / rel, why)
    log.info("report: %s (and %s)", html, markdown)
    return 1 if failed or unreadable else 0


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    try:
        settings = StudySettings.from_env()
        status = run_study(settings)
    except OptionError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    raise SystemExit(status)


if __name__ == "__main__":
    main()
