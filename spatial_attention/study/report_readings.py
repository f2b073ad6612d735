"""How the report reads a study folder: its JSON files read once each, numbers with their source, intervals, and
the one-sentence readings by the rules of ``RULES``."""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import replace
from pathlib import Path

from spatial_attention.run.controls import COMPARISON_FILE
from spatial_attention.study.folder import STEPS_DIR, STUDY_FILE
from spatial_attention.study.report_blocks import Heading, Num, Para

ALPHA = 0.05  # the significance level of every test the summaries carry


RULES = [
    "A claim with a direction reads **yes** when the 95% interval of its number lies wholly on the side the claim "
    "states, **no (the opposite)** when it lies wholly on the other side, and **inconclusive** when it covers 0.",
    "A claim that a number differs from 0 (either sign) reads **yes** when its 95% interval excludes 0, else "
    "**inconclusive**.",
    "Experiment 1's patch-shuffle test (real minus shuffled) reads **yes** only when, in addition, its "
    "Benjamini-Hochberg q (over the summary's map x metric rows) is below 0.05, as the summary marks it.",
    "**Beyond random weights** applies the same rule to the model-minus-control difference (per item, the model's "
    "value minus each random initialisation's; the interval resamples the initialisations, then the items). "
    "A finding that random weights also produce is not a finding.",
    "Experiment 3's significant heads (paired sign-flip test, Benjamini-Hochberg FDR 5% over all heads) have no "
    "interval: the reading is **yes** when the model has more of them than every random initialisation, else **no**; "
    "**untestable** when the test's smallest possible p (with few pairs) lies above 0.05, or is not recorded: "
    "Benjamini-Hochberg rejects nothing then, whatever the model does.",
    "An ablation reads **yes** when its effect's 95% interval lies below 0 and p_drop <= 0.05 (the chosen heads "
    "lower the answer more than random heads of the same layers), **inconclusive** when the interval covers 0, "
    "**no** otherwise, and **untestable** when its random head sets are too few for p_drop to reach 0.05 (its "
    "smallest value is 1 / (1 + sets)) or their number is not recorded; beyond random weights: the model's effect "
    "minus the control's, below 0.",
]


class Outputs:
    """The study folder's JSON files, read once each."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self._docs: dict[str, object] = {}

    def json(self, rel: str | Path):
        rel = str(rel)
        if rel not in self._docs:
            path = self.out / rel
            try:
                self._docs[rel] = json.loads(path.read_text()) if path.is_file() else None
            except (OSError, ValueError):
                self._docs[rel] = None
        return self._docs[rel]

    def num(self, rel: str | Path, *path, fmt: str = "+.3g", op: str = "") -> Num:
        value = self.json(rel)
        for key in path:
            try:
                value = value[key]
            except (KeyError, IndexError, TypeError):
                value = None
                break
        if op == "len":
            value = None if value is None else len(value)
        return Num(value if isinstance(value, (int, float)) and not isinstance(value, bool) else None,
                   str(rel), tuple(path), fmt, op)

    def rel(self, path: Path) -> str:
        return os.path.relpath(path, self.out)


def row_index(rows, **match) -> int | None:
    for i, row in enumerate(rows or []):
        if all(row.get(k) == v for k, v in match.items()):
            return i
    return None


def ci_format(lo: float | None, hi: float | None) -> str:
    """The format of a mean and its interval: enough decimals to show the interval's width to 2 digits."""
    if lo is None or hi is None or hi == lo:
        return "+.3f"
    return f"+.{min(8, max(1, 1 - math.floor(math.log10(abs(hi - lo)))))}f"


def ci_parts(o: Outputs, rel: str, prefix: tuple, mean: str, lo: str, hi: str) -> list:
    """[mean, " [", lo, ", ", hi, "]"] from the row at ``prefix`` of ``rel``; ["n/a"] where there is none."""
    if None in prefix:
        return ["n/a"]
    m, low, high = (o.num(rel, *prefix, key) for key in (mean, lo, hi))
    if m.value is None:
        return ["n/a"]
    fmt = ci_format(low.value, high.value)
    m, low, high = (replace(n, fmt=fmt) for n in (m, low, high))
    return [m, " [", low, ", ", high, "]"] if low.value is not None else [m]


def bounds(parts: list) -> tuple[float | None, float | None]:
    nums = [p for p in parts if isinstance(p, Num)]
    return (nums[1].value, nums[2].value) if len(nums) >= 3 else (None, None)


def verdict(lo: float | None, hi: float | None, sided: int = 1) -> str:
    """The rule of ``RULES``: a directed claim (``sided`` 1: above 0; -1: below 0) or a two-sided one (0)."""
    if lo is None or hi is None:
        return "n/a"
    if sided == 0:
        return "yes" if lo > 0 or hi < 0 else "inconclusive"
    if sided < 0:
        lo, hi = -hi, -lo
    if lo > 0:
        return "yes"
    return "no (the opposite)" if hi < 0 else "inconclusive"


def shuffle_verdict(lo: float | None, hi: float | None, q: float | None) -> str:
    """The paper's test: the interval above 0 and the Benjamini-Hochberg q below ``ALPHA`` (as the summary
    marks a difference)."""
    said = verdict(lo, hi, 1)
    if said == "yes" and (q is None or q >= ALPHA):
        return "inconclusive (q >= 0.05)"
    return said


def study_models(o: Outputs) -> list[str]:
    """The models of the study: study.json's, else every folder holding an experiment's results."""
    study = o.json(STUDY_FILE) or {}
    models = (study.get("settings") or {}).get("models")
    if models:
        return list(models)
    return sorted(p.name for p in o.out.iterdir() if p.is_dir() and any((p / e).is_dir() for e in
                                                                          ("exp1", "exp2", "corners")))


def model_label(o: Outputs, model: str) -> str:
    for rel in (f"{model}/exp1/run.json", f"{model}/exp2/run.json", f"{model}/corners/head_diff_stats_topleft/run.json"):
        run = o.json(rel)
        if run:
            return f"{model} ({(run.get('settings') or {}).get('model_path') or (run.get('model') or {}).get('model_path')})"
    return model


def comparison_row(o: Outputs, folder: str, metric: str) -> tuple[str, tuple]:
    rel = f"{folder}/{COMPARISON_FILE}.json"
    doc = o.json(rel) or {}
    return rel, ("rows", row_index(doc.get("rows"), metric=metric))


def control_cells(o: Outputs, folder: str, metric: str) -> tuple[list, list]:
    """The random-weights control's mean [CI] and the model-minus-control difference [CI] of ``metric``."""
    rel, prefix = comparison_row(o, folder, metric)
    return (ci_parts(o, rel, prefix, "control_mean", "control_ci_lo", "control_ci_hi"),
            ci_parts(o, rel, prefix, "diff_mean", "diff_ci_lo", "diff_ci_hi"))


def reading(label: str, claim: str, value: list, diff: list, sided: int, stat: str, no_control: str,
             said: str | None = None) -> list:
    """One sentence: the claim, its verdict (``said``, else by ``verdict``) with the number, and the verdict of
    the model-minus-control difference (``no_control`` where there is none)."""
    said = said or verdict(*bounds(value), sided)
    parts = [f"{label}: {claim}: {said} ({stat} ", *value, ")"]
    if diff != ["n/a"]:
        parts += ["; beyond random weights: ", verdict(*bounds(diff), sided), " (model minus control ", *diff, ")"]
    else:
        parts += [f"; {no_control}"]
    return parts + ["."]


def why_no_control(o: Outputs, step: str) -> str:
    """Why a number has no control beside it: the control step did not finish, or was not run."""
    record = o.json(f"{STEPS_DIR}/{step.replace('/', '-')}.json")
    if record and record.get("status") != "ok":
        return f"its random-weights control did not finish ({step}: {record.get('status')}, see Steps)"
    return "no random-weights control was run"


def figure_paths(o: Outputs, folder: Path, patterns: list[str], limit: dict | None = None) -> list:
    found = []
    for pattern in patterns:
        paths = sorted(folder.glob(pattern), key=lambda p: [int(t) if t.isdigit() else t
                                                            for t in re.split(r"(\d+)", p.name)])
        found += [(o.rel(p), o.rel(p)) for p in paths[:(limit or {}).get(pattern, len(paths))]]
    return found


def opening(o: Outputs, models: list[str], summary: str, heading: Heading, intro: str) -> tuple[list, list]:
    """An experiment's heading and introduction, and the models with its ``summary`` (relative to the model's
    folder); a "No results" line where none has."""
    blocks = [heading, Para([intro])]
    present = [m for m in models if o.json(f"{m}/{summary}")]
    if not present:
        blocks.append(Para(["No results (the step did not finish; see Steps)."]))
    return blocks, present


def value_header(present: list[str]) -> list[str]:
    """A table's header with, per model, the value, the random-weights control and the model minus the control."""
    return ["quantity"] + [col for m in present for col in (m, f"{m}: random weights", f"{m}: model minus random")]


def status_line(o: Outputs) -> str:
    study = o.json(STUDY_FILE)
    if not study:
        return "Built from the result folders found (no study.json: not made by run_study.sh)."
    records = [o.json(f"{STEPS_DIR}/{step['key']}.json") or {} for step in study.get("steps", [])]
    failed = [step["name"] for step, record in zip(study["steps"], records) if record.get("status") != "ok"]
    done = f"{len(records) - len(failed)} of {len(records)} steps finished"
    return done + (f"; not finished: {', '.join(failed)} (see Steps, with the end of each log)." if failed else ".")
