"""The study's cost plan: ``run_study.sh`` prints it before any step runs and writes it to ``OUT_DIR/plan.json``
(``PLAN=1``: that alone, nothing run). Per step: its Python processes, model builds, forwards (inputs through the
whole model), reruns (inputs rerun through the upper layers: patching, ablation), tokens per forward, token-layers
(tokens x layers run, reruns included) and estimated seconds, split into its ``parts`` (process starts, builds,
whole forwards, reruns, host work); and the total, split alike.

Each step also works outside its forwards (inputs, metrics, writing, summaries, figures): per run and per
item of each kind of run, from ``host_seconds`` (the calibration's own, else ``bench/results/host_seconds.json``,
which ``bench/host_costs.py`` measures on this machine's CPU; the plan names the source).

The counts are the experiment modules' own (each ``planned_forwards`` sits beside the code that makes the
forwards); the sweep's processes follow ``run_corner_experiments.sh``. The seconds come from a calibration
(``calibration.py``): ``CALIBRATION=FILE``; else the one recorded for this machine's GPU
(``bench/results/calibration-{gpu}.json``); else, where every model is tiny-random or toy, one measured here (a
few seconds). A checkpoint on a device never calibrated gets the counts and no seconds, and the plan says how to
get them (``bash bench/gpu_check.sh`` on that device).
"""
from __future__ import annotations

import inspect
import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

from spatial_attention.common.console import duration
from spatial_attention.common.runio import write_json
from spatial_attention.data.counterfactual import CORNERS, split_pairs
from spatial_attention.run.cost import Forwards, full_inputs, rerun_inputs
from spatial_attention.study.calibration import (Geometry, device_slug, forward_seconds, measure_here, model_geometry,
                                                 read_calibration)
from spatial_attention.study.folder import PLAN_FILE

log = logging.getLogger("spatial_attention.study")

RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results"
HOST_SECONDS = RESULTS / "host_seconds.json"  # bench/host_costs.py
PARTS = ("processes", "builds", "forwards", "reruns", "host")  # where a step's seconds go
SMALL_MODELS = ("tiny-random", "toy")  # built and timed here in seconds
SWEEP_DEFAULTS = {"SCORE": "attention", "LAYERS": "all", "ABLATE_HEADS": "unique shared", "ABLATE_MODE": "zero",
                  "RANDOM_CONTROLS": "100", "SAME_PAIRS": "0", "ABLATE_POSITIONS": "all"}  # run_corner_experiments.sh's


@dataclass
class StepWork:
    """What one step computes: its Python processes (of a model script; ``analyses``: those that load no model,
    priced whole as host work), model builds (``reinits``: a control's further initialisations, each re-initialising
    the process's one model in place) and forwards, and its runs' work outside the forwards (``host``: (kind, runs,
    items a run), priced by ``host_seconds``)."""
    processes: int = 0
    analyses: int = 0
    builds: int = 0
    reinits: int = 0
    forwards: list[Forwards] = field(default_factory=list)
    host: list[tuple[str, int, int]] = field(default_factory=list)

    def add(self, processes: int = 0, builds: int = 0, forwards: list[Forwards] = (), times: int = 1,
            host: list[tuple[str, int, int]] = ()) -> None:
        """``processes`` more, and ``times`` runs of ``builds`` models, ``forwards`` and ``host`` (one per
        initialisation: a model built once, then re-initialised)."""
        self.processes += processes
        self.builds += builds
        self.reinits += builds * (times - 1)
        self.forwards += [replace(f, inputs=f.inputs * times) for f in forwards]
        self.host += [(kind, runs * times, items) for kind, runs, items in host]


def shapeworld_worlds(s) -> int:
    """The worlds experiments 1, 2 and 4 read: those of the data folder (or of the one the data step will
    generate), at most WORLDS."""
    from spatial_attention.data.generate import generate_shapeworld
    from spatial_attention.data.shapeworld import Skipped, iter_worlds

    if s.shapeworld.is_dir():
        found = sum(not isinstance(item, Skipped) for item in iter_worlds(s.shapeworld, limit=s.worlds))
    else:
        defaults = inspect.signature(generate_shapeworld).parameters
        found = defaults["shards"].default * defaults["worlds_per_shard"].default
    return min(found, s.worlds or found)


def model_work(s, model: str, geometry: Geometry, batch: int, worlds: int, steps: dict) -> dict[str, StepWork]:
    """Per step of ``model`` (its name's tail: exp1, exp1-control, ...), what it computes; ``steps``: the study's
    steps by name, whose commands and settings say what they will run (the sweep's settings, the figures)."""
    import spatial_attention.experiments.relation_heads as exp4
    from spatial_attention.experiments import ablation, corner_stats, text_analysis, vlm_analysis
    from spatial_attention.run.options import layer_indices

    L, H, seeds = geometry.layers, geometry.heads, s.control_seeds
    control_worlds = min(worlds, s.control_items or worlds)

    def plot_samples(step: str) -> int:  # the per-world figures the step's command asks for
        command = steps[step].commands[0] if step in steps else ()
        return vlm_analysis.build_parser(model).parse_known_args(list(command[2:]))[0].plot_samples

    panels, control_panels = plot_samples(f"{model}/exp1"), plot_samples(f"{model}/exp1-control")
    work = {}
    for name, count in (("exp1", vlm_analysis.planned_forwards), ("exp2", text_analysis.planned_forwards)):
        work[name], work[f"{name}-control"] = StepWork(), StepWork()
        figures = [("exp1_panel", 1, min(panels, worlds))] if name == "exp1" else []
        control_figures = [("exp1_panel", 1, min(control_panels, control_worlds))] if name == "exp1" else []
        work[name].add(1, 1, count(worlds, batch, L), host=[(name, 1, worlds)] + figures)
        work[f"{name}-control"].add(1, 0)
        work[f"{name}-control"].add(0, 1, count(control_worlds, batch, L), times=seeds,
                                    host=[(name, 1, control_worlds)] + control_figures)
    args = exp4.build_parser().parse_args(["--model", model])
    work["exp4"], work["exp4-control"] = StepWork(), StepWork()
    work["exp4"].add(1, 1, exp4.planned_forwards(args, worlds, batch, L, H), host=[("exp4", 1, worlds)])
    args.control = "random-weights"
    work["exp4-control"].add(1, 0)
    work["exp4-control"].add(0, 1, exp4.planned_forwards(args, control_worlds, batch, L, H), times=seeds,
                             host=[("exp4", 1, len(split_pairs(range(control_worlds), "test")))])
    environ = dict(steps[f"{model}/corners"].env) if f"{model}/corners" in steps else {}  # what the sweep is given
    sweep = {k: environ.get(k) or v for k, v in SWEEP_DEFAULTS.items()}
    same = sweep["SAME_PAIRS"] == "1"
    scored = len(split_pairs(range(s.count), "all" if same else "discovery"))
    tested = len(split_pairs(range(s.count), "all" if same else "test"))
    scoring = corner_stats.planned_forwards(scored, len(CORNERS), batch, sweep["SCORE"],
                                            layer_indices(sweep["LAYERS"], L), L, H)
    ablating = ablation.planned_forwards(tested, len(CORNERS), sweep["ABLATE_HEADS"].split(), batch, L, H,
                                         int(sweep["RANDOM_CONTROLS"]), sweep["ABLATE_MODE"],
                                         positions=sweep["ABLATE_POSITIONS"]) if s.ablate else []
    missing = any(not (s.data_dir / f"dataset_{c}" / "metadata.jsonl").is_file() for c in CORNERS)
    specs = len(sweep["ABLATE_HEADS"].split()) if s.ablate else 0
    for name, runs in (("corners", 1), ("corners-control", seeds)):
        work[name] = StepWork()
        work[name].add(int(missing and name == "corners" and model == s.models[0]))  # the pairs generated
        work[name].add(1 + int(s.ablate))  # scoring, the ablation
        work[name].analyses += runs  # each run's shared/unique analysis
        work[name].add(0, 1 + int(s.ablate), scoring + ablating, times=runs,
                       host=[("corners", len(CORNERS), scored), ("corner_analysis", 1, 0),
                             ("ablation", len(CORNERS) * specs, tested)])
    return work


def host_costs(calibration: dict | None) -> tuple[dict | None, str | None]:
    """Per kind of run, its seconds outside the forwards (per_run, per_item): the calibration's own, the kinds it
    lacks from the recorded file; and a note of where they come from (None: all the calibration's)."""
    own = (calibration or {}).get("host_seconds") or {}
    try:
        recorded = json.loads(HOST_SECONDS.read_text())
    except (OSError, ValueError):
        recorded = None
    if recorded is None:
        return own or None, None if own else (f"no host work priced ({HOST_SECONDS} is missing or unreadable: "
                                              "python bench/host_costs.py)")
    if set(own) >= set(recorded["kinds"]):
        return own, None
    lacking = " of the kinds the calibration lacks" if own else ""
    return {**recorded["kinds"], **own}, (f"host work (outside the forwards){lacking} from "
                                          f"{HOST_SECONDS.relative_to(RESULTS.parents[1])}, measured on "
                                          f"{recorded['machine']}")


def study_calibration(s) -> tuple[dict | None, str]:
    """The calibration the plan prices with, and where it comes from (or why there is none)."""
    if s.calibration:
        return read_calibration(s.calibration), str(s.calibration)
    import torch

    if s.device != "cpu" and torch.cuda.is_available():
        recorded = RESULTS / f"calibration-{device_slug(torch.cuda.get_device_name())}.json"
        if recorded.is_file():
            return read_calibration(recorded), f"{recorded} (recorded for this GPU)"
    small = {m: p for m, p in s.model_paths.items() if p in SMALL_MODELS}
    if len(small) < len(s.model_paths):
        return None, ("no calibration for these checkpoints on this device: give CALIBRATION=FILE (bash "
                      "bench/gpu_check.sh writes bench/results/calibration-{gpu}.json on the device)")
    return measure_here(small, s.device, s.dtype), "measured here"


def plan_study(s, steps) -> dict:
    """The plan of the study ``steps`` (study.plan) with settings ``s``."""
    calibration, source = study_calibration(s)
    here = calibration is not None and calibration["source"] == "measured here before the study"
    device_type = (calibration or {}).get("device_type", "cuda" if s.device.startswith("cuda") else "cpu")
    batch = s.batch_size or (8 if device_type == "cuda" else 1)
    worlds = shapeworld_worlds(s)
    rows, notes = [], [f"calibration, not measured: {figure}" for figure in (calibration or {}).get("estimated", [])]
    host, host_source = host_costs(calibration)
    notes += [host_source] if host_source else []
    for model in s.models:
        families = (calibration or {}).get("families", {})
        if here and model in families:
            geometry, assumed = Geometry(**families[model]["geometry"]), None
        else:
            geometry, assumed = model_geometry(model, s.model_paths[model])
        notes += [assumed] if assumed else []
        entry, scaled = families.get(model), None
        if entry is None and families and not here:
            scaled = next(iter(families))
            entry = families[scaled]
        work = model_work(s, model, geometry, batch, worlds, {step.name: step for step in steps})
        for step in steps:
            family, _, tail = step.name.partition("/")
            if family == model:
                rows.append(price(step.name, work[tail], geometry, entry, calibration, scaled, host))
    generated = all(Path(p).exists() for step in steps if step.name == "data" for p in step.creates)
    rows.insert(0, price("data", StepWork(processes=int(not generated)), None, None, calibration, None, host))
    known = [row["seconds"] for row in rows if row["seconds"] is not None]
    total = sum(known) if len(known) == len(rows) else None
    largest = max(rows, key=lambda row: row["seconds"] or 0)["step"] if known else None
    parts = {part: round(sum(row["parts"][part] for row in rows), 1) for part in PARTS} if total is not None else None
    return {"calibration": {"source": source, **{k: (calibration or {}).get(k) for k in (
                "device", "device_type", "dtype", "process_seconds")}},
            "settings": {"models": list(s.models), "model_paths": dict(s.model_paths), "worlds": worlds,
                         "control_items": s.control_items, "count": s.count, "controls": s.controls,
                         "control_seeds": s.control_seeds, "ablate": s.ablate, "batch_size": batch},
            "steps": rows, "total_seconds": None if total is None else round(total, 1), "largest_step": largest,
            "total_parts": parts,
            "notes": notes}


def price(name: str, work: StepWork, geometry: Geometry | None, entry: dict | None, calibration: dict | None,
          scaled: str | None, host: dict | None = None) -> dict:
    """One step's row of the plan: its counts, and its seconds where there is a calibration of its family
    (``host_seconds``: its runs' work outside the forwards, counted where given), with ``parts``: the seconds of
    its process starts, builds, whole forwards, reruns and host work."""
    forwards = full_inputs(work.forwards)
    token_layers = sum(f.inputs * geometry.row_tokens(f) * f.layers for f in work.forwards) if geometry else 0
    tokens = sum(f.inputs * geometry.row_tokens(f) for f in work.forwards if f.full) if geometry else 0
    parts = None
    if calibration is not None and (entry is not None or not work.forwards):
        parts = dict.fromkeys(PARTS, 0.0)
        parts["processes"] = work.processes * calibration["process_seconds"]
        if entry is not None:
            build = entry["build_seconds"]
            if scaled:  # a build takes as long as its parameters to draw or read
                build *= geometry.params / Geometry(**entry["geometry"]).params
            reinit = entry["reinit_seconds"] * build / entry["build_seconds"] if "reinit_seconds" in entry and \
                entry["build_seconds"] else build  # scaled as the build is
            parts["builds"] = work.builds * build + work.reinits * reinit
            for f in work.forwards:
                parts["forwards" if f.full else "reruns"] += forward_seconds(entry, geometry, f)
        if host:
            parts["host"] = sum(runs * (host[kind]["per_run"] + items * host[kind]["per_item"])
                                for kind, runs, items in work.host if kind in host)
        if "corner_analysis" not in (host or {}):  # the analyses' processes, priced as starts
            parts["processes"] += work.analyses * calibration["process_seconds"]
    return {"step": name, "processes": work.processes + work.analyses, "builds": work.builds,
            "reinits": work.reinits, "forwards": forwards,
            "reruns": rerun_inputs(work.forwards), "tokens_per_forward": round(tokens / forwards) if forwards else 0,
            "token_layers": round(token_layers),
            "seconds": None if parts is None else round(sum(parts.values()), 1),
            **({"parts": {k: round(v, 1) for k, v in parts.items()}} if parts else {}),
            **({"scaled_from": scaled} if scaled else {})}


def report_plan(plan: dict, out_dir: Path) -> Path:
    """Print the plan, one line a step, and write it to OUT_DIR/plan.json."""
    log.info("plan (calibration: %s%s):", plan["calibration"]["source"],
             f"; {plan['calibration']['device']}" if plan["calibration"]["device"] else "")
    for row in plan["steps"]:
        seconds = "no estimate" if row["seconds"] is None else f"~{duration(row['seconds'])}"
        log.info("  %-22s %d builds%-11s %9s forwards x %4d tokens, %7s reruns, %.2g token-layers: %s%s",
                 row["step"], row["builds"], f" +{row['reinits']} re-inits," if row["reinits"] else ",",
                 f"{row['forwards']:,}", row["tokens_per_forward"], f"{row['reruns']:,}",
                 row["token_layers"], seconds, f" (scaled from {row['scaled_from']})" if "scaled_from" in row else "")
    total = plan["total_seconds"]
    log.info("  total: %s%s", "no estimate" if total is None else f"~{duration(total)}",
             f"; largest step: {plan['largest_step']}" if plan["largest_step"] else "")
    if plan["total_parts"]:
        log.info("  of which: %s", ", ".join(f"{part} ~{duration(s)}" for part, s in plan["total_parts"].items()))
    for note in plan["notes"]:
        log.info("  note: %s", note)
    path = out_dir / PLAN_FILE
    write_json(path, plan)
    return path


