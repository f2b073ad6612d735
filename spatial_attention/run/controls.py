"""The random-weights control (``--control random-weights``), a negative control for every instrument.

The model's architecture is built from its checkpoint's config, with its processor and tokenizer, and
its weights are drawn at random instead of loaded ("model-parameter randomisation", Adebayo et al.
2018). An effect such a model also shows is not evidence of anything the checkpoint learned. One
initialisation is one draw, whose attention can carry a bias of that draw, so the control runs
``--control-seeds K`` initialisations (torch seeds ``INIT_SEED_BASE + k``), each into its own folder:

    OUT/control_random_weights/init_seed_{S}/   laid out exactly as OUT itself

where OUT is the folder the command's output option names. Pooled over the seeds, each metric's mean
gets a hierarchical bootstrap interval (resample the seeds, then the items). Where the model's own results
are in OUT, the comparison sets the model, which is one draw, against the distribution of the seeds (each
seed's mean over the items the model also has): a rank p and a prediction interval with K - 1 degrees of
freedom (``stats.inference.against_initialisations``). The rank p cannot go below 1 / (K + 1), so the
default is the K = 19 at which it reaches 0.05. ``OUT/control_comparison.json`` and ``.csv``, also added to
``OUT/summary.json`` (key ``model_minus_control``) when there is one.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Hashable

import numpy as np

from spatial_attention.common.console import check_at_least
from spatial_attention.common.errors import OptionError
from spatial_attention.common.runio import read_jsonl, write_atomic, write_json
from spatial_attention.run.options import ModelOptions
from spatial_attention.stats.inference import (RANK_MIN_SEEDS, against_initialisations, hierarchical_bootstrap_ci,
                                               json_safe)

log = logging.getLogger("spatial_attention")

RANDOM_WEIGHTS = "random-weights"
CONTROL_FOLDER = "control_random_weights"
INIT_SEED_BASE = 1000  # far from the small --seed values that draw tiny-random's own weights
DEFAULT_SEEDS = RANK_MIN_SEEDS  # the fewest for which the model can lie beyond them at 5%
MAX_SEEDS = 1000  # each initialisation reruns the whole experiment: more is a typo, not a plan
COMPARISON_FILE = "control_comparison"
COMPARISON_COLUMNS = ("metric", "n_items", "n_seeds", "control_mean", "control_ci_lo", "control_ci_hi",
                      "model_mean", "n_paired", "diff_mean", "diff_pi_lo", "diff_pi_hi",
                      "rank_p_above", "rank_p_below", "pred_p_above", "pred_p_below")


def add_control_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("random-weights control (a negative control: see docs/controls.md)")
    group.add_argument("--control", choices=[RANDOM_WEIGHTS], default=None,
                       help="instead of the model, run K random initialisations of its architecture (its "
                            "config, processor and tokenizer; no weights are read) into "
                            f"OUT/{CONTROL_FOLDER}/init_seed_S/, then compare with the model's results in OUT")
    group.add_argument("--control-seeds", type=int, default=None,
                       help=f"with --control: how many initialisations (torch seeds {INIT_SEED_BASE}, "
                            f"{INIT_SEED_BASE + 1}, ...; default {DEFAULT_SEEDS}); the comparison pools every "
                            f"initialisation folder it finds")


def init_seeds(args) -> range | None:
    """The control's initialisation seeds (a range: nothing is built per seed here), None without --control;
    OptionError for a count below 1 or above ``MAX_SEEDS``, or a count without --control (it would be ignored)."""
    count = getattr(args, "control_seeds", None)
    if getattr(args, "control", None) is None:
        if count is not None:
            raise OptionError(f"--control-seeds {count}: only means something with --control {RANDOM_WEIGHTS}")
        return None
    count = DEFAULT_SEEDS if count is None else count
    check_at_least(1, control_seeds=count)
    if count > MAX_SEEDS:
        raise OptionError(f"--control-seeds {count}: at most {MAX_SEEDS} (each initialisation runs the whole "
                          f"experiment again; a rank test at 5% needs 19)")
    return range(INIT_SEED_BASE, INIT_SEED_BASE + count)


def seed_folder(out: Path, init_seed: int) -> Path:
    """Where initialisation ``init_seed`` of the control of ``out`` writes."""
    return Path(out) / CONTROL_FOLDER / f"init_seed_{init_seed}"


def runs(options: ModelOptions, out: Path, args) -> list[tuple[ModelOptions, Path]]:
    """(model options, output folder) of each run the command makes: the model into ``out``, or with
    --control each initialisation into its seed folder."""
    seeds = init_seeds(args)
    if seeds is None:
        return [(options, Path(out))]
    return [(replace(options, random_init_seed=seed), seed_folder(out, seed)) for seed in seeds]


def counterpart(folder: Path, init_seed: int, option: str) -> Path:
    """The control's counterpart of an input folder made by another command (a stats dir, an analysis
    dir): ``folder``'s own seed folder, or its sibling's (``parent/control.../init_seed_S/name``, the
    layout of a command that wrote one folder per corner under one parent)."""
    folder = Path(folder)
    for candidate in (seed_folder(folder, init_seed), seed_folder(folder.parent, init_seed) / folder.name):
        if candidate.is_dir():
            return candidate
    raise OptionError(f"{option} {folder}: no random-weights control of it for initialisation {init_seed} (looked "
                      f"in {seed_folder(folder, init_seed)} and {seed_folder(folder.parent, init_seed) / folder.name}); "
                      f"run the command that made it with --control {RANDOM_WEIGHTS} and the same --control-seeds")


# --- pooling and comparing -------------------------------------------------------------------

@dataclass(frozen=True)
class ItemMetrics:
    """How an experiment's results file gives per-item metric values, for pooling and pairing."""
    results_name: str  # the results file in an output folder (samples.jsonl, ...)
    key: Callable[[dict], Hashable]  # a record's item (world, caption, pair)
    values: Callable[[dict], dict[str, float | None]]  # a record's metric values by name


def read_items(folder: Path, items: ItemMetrics) -> dict[str, dict[Hashable, float]]:
    """{metric: {item: value}} of the finished records in ``folder`` (empty when there are none)."""
    table: dict[str, dict[Hashable, float]] = {}
    path = Path(folder) / items.results_name
    if not path.is_file():
        return table
    for record in read_jsonl(path, repair=False):  # the run that owns the file may still be appending
        key = items.key(record)
        for metric, value in items.values(record).items():
            if value is not None and math.isfinite(value):
                table.setdefault(metric, {})[key] = float(value)
    return table


def compare(model: dict[str, dict], control: list[dict[str, dict]], seed: int = 0, n_boot: int = 2000) -> list[dict]:
    """One row per metric: the control's mean over seeds and items with its hierarchical bootstrap interval,
    and where the model has the metric, the model's mean over the items both have against the distribution of
    the seeds' means over the same items (``against_initialisations``: rank p, prediction interval and test;
    the model is one draw, so the initialisations are the unit, not the items)."""
    metrics = list(dict.fromkeys(m for table in control for m in table))
    rows = []
    for metric in metrics:
        tables = [table.get(metric, {}) for table in control]
        items = sorted(set().union(*tables), key=repr)
        values = np.array([[t.get(i, np.nan) for i in items] for t in tables])
        lo, hi = hierarchical_bootstrap_ci(values, n_boot=n_boot, seed=seed)
        row = {"metric": metric, "n_items": len(items), "n_seeds": len(tables),
               "control_mean": float(np.nanmean(values)) if np.isfinite(values).any() else None,
               "control_ci_lo": lo, "control_ci_hi": hi}
        mine = model.get(metric, {})
        paired = [i for i in items if i in mine]
        if paired:
            model_mean = float(np.mean([mine[i] for i in paired]))
            seed_means = [_mean_of(t, paired) for t in tables]
            test = against_initialisations(model_mean, seed_means)
            row.update(model_mean=model_mean, n_paired=len(paired), seed_means=seed_means,
                       diff_mean=test["diff"], **{k: test[k] for k in COMPARISON_COLUMNS[-6:]})
        rows.append(row)
    return rows


def _mean_of(table: dict, items: list) -> float | None:
    """A seed's mean over ``items`` (those it has); None where it has none."""
    values = [table[i] for i in items if i in table]
    return float(np.mean(values)) if values else None


def control_seed_folders(out: Path) -> list[Path]:
    """The seed folders of ``out``'s control, in seed order."""
    root = Path(out) / CONTROL_FOLDER
    folders = [p for p in root.glob("init_seed_*") if p.is_dir()] if root.is_dir() else []
    return sorted(folders, key=lambda p: int(p.name.rsplit("_", 1)[1]) if p.name.rsplit("_", 1)[1].isdigit() else -1)


def write_comparison(out: Path, items: ItemMetrics, seed: int = 0,
                     seed_folders: list[Path] | None = None) -> list[dict] | None:
    """Pool the control of ``out`` over its seeds and compare it with the model's results there (what exists
    of both): ``OUT/control_comparison.{json,csv}`` and ``model_minus_control`` in ``OUT/summary.json``. ``seed_folders``: the control's folders where they
    are not ``out``'s own (``control_seed_folders``). None when there is no finished control."""
    out = Path(out)
    folders = control_seed_folders(out) if seed_folders is None else seed_folders
    control = [read_items(folder, items) for folder in folders]
    if not any(control):
        return None
    control = [table for table in control if table]
    model = read_items(out, items)
    rows = compare(model, control, seed=seed)
    seeds = [str(folder) for folder, table in zip(folders, control) if table]
    described = {"control": RANDOM_WEIGHTS, "seed_folders": seeds,
                 "definitions": {"control_ci": "95% bootstrap of the control's mean: resample the seeds, then the items",
                                 "diff": "the model's mean minus the mean of the seeds' means, over the items both "
                                         "have (seed_means); diff_pi: its 95% prediction interval (t, K-1 degrees "
                                         "of freedom), which excludes 0 when the model lies outside the spread of "
                                         "the initialisations",
                                 "rank_p": "(1 + seeds at least as high (above) or low (below) as the model) / "
                                           "(K + 1)",
                                 "pred_p": "one-sided p of the prediction test (t, K-1 degrees of freedom)"},
                 "rows": rows}
    write_json(out / f"{COMPARISON_FILE}.json", json_safe(described))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COMPARISON_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row.get(k) is None else row.get(k) for k in COMPARISON_COLUMNS})
    write_atomic(out / f"{COMPARISON_FILE}.csv", buf.getvalue())
    summary_path = out / "summary.json"
    if model and summary_path.is_file():
        try:
            summary = json.loads(summary_path.read_text())
        except (OSError, ValueError):
            summary = None
        if isinstance(summary, dict):
            summary["model_minus_control"] = json_safe(described)
            write_json(summary_path, summary)
    if model:
        log.info("random-weights control (%d seeds) compared with the model: %s", len(control),
                 out / f"{COMPARISON_FILE}.csv")
    else:
        log.info("random-weights control (%d seeds) pooled in %s; no results of the model in %s yet to compare "
                 "with (run the same command without --control)", len(control), out / f"{COMPARISON_FILE}.csv", out)
    return rows
