"""How the report reads a study folder: its JSON files read once each (one that is there but cannot be read is
named, and its readings marked unreadable), numbers with their source, intervals, and the one-sentence readings by
the rules of ``RULES``: each reading's test is a ``Verdict``, and all of them are decided together, as one
Benjamini-Hochberg family, once the report is built."""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from spatial_attention.common.errors import UnreadableFile
from spatial_attention.common.runio import read_json
from spatial_attention.run.controls import COMPARISON_FILE
from spatial_attention.stats.inference import RANK_MIN_SEEDS, against_initialisations, benjamini_hochberg
from spatial_attention.study.folder import EXPERIMENTS, STEPS_DIR, STUDY_FILE
from spatial_attention.study.report_blocks import Heading, Num, Para

ALPHA = 0.05  # the significance level of every test the summaries carry


RULES = [
    "Every yes/no reading is a test with a p-value, and all of the report's tests form **one Benjamini-Hochberg "
    "family** (FDR 5%): a reading says **yes** only when its q (shown) is at most 0.05, and **inconclusive** "
    "otherwise. The 95% intervals beside the numbers are shown for size and are not corrected. Readings "
    "that no p could pass are **untestable** and are left out of the family (m counts the others; the report's "
    "p and q are in report/readings.json).",
    "A claim with a direction is tested two-sided (sign-flip over the items): **yes** when q <= 0.05 and the "
    "number lies on the claimed side, **no (the opposite)** when q <= 0.05 on the other side. A claim that a "
    "number differs from 0 reads **yes** when q <= 0.05.",
    "Experiment 1's patch-shuffle test (real minus shuffled) is **a salience test**: attention that lands on "
    "any shape passes it, and random weights pass it too. It is shown beside its random-weights comparison and "
    "is never read as evidence of grounding; the specificity readings are.",
    "**Beyond random weights** sets the model, one draw, against the spread of K random initialisations of its "
    "architecture (each initialisation's mean over the same items): yes when its rank p, (1 + initialisations at "
    "least as far) / (K + 1), is at most 0.05 (free of any assumption; with the default K = 19, the model beyond "
    "every one of them), the prediction test's q (t with K - 1 degrees of freedom; the rank p where the "
    "initialisations do not vary) is at most 0.05, and the model's own number lies on the claimed side. For a "
    "claim that a number differs from 0, its size |.| is compared. **Untestable** with K < 19 initialisations "
    "(the rank p cannot reach 0.05). A finding that random weights also produce is not a finding.",
    "Experiment 3's significant heads (paired sign-flip test, Benjamini-Hochberg FDR 5% over all heads) are "
    "compared with the random initialisations' counts by the same rule; **untestable** when the test's smallest "
    "possible p (with few pairs) lies above 0.05, or is not recorded: Benjamini-Hochberg rejects nothing then, "
    "whatever the model does.",
    "An ablation's test is p_drop (the chosen heads lower the answer more than random heads of the same layers): "
    "**yes** when its q <= 0.05 and its effect's 95% interval lies below 0; **untestable** when it was measured on "
    "the pairs its heads were found on (the best heads of some pairs beat random heads on those same pairs by "
    "chance too), or when its random head "
    "sets are too few for p_drop to reach 0.05 (its smallest value is 1 / (1 + sets)) or their number is not "
    "recorded; beyond random weights: the model's effect against the initialisations' effects, as above.",
]


@dataclass
class Verdict:
    """A reading's yes/no, decided when the report's one Benjamini-Hochberg family is complete (``decide``).
    ``p``: its test's p-value (two-sided where ``sign`` can be -1); ``sign``: +1 when the estimate lies on the
    claim's side, -1 on the other; ``fixed``: a reading that no test decides (untestable, n/a), left out of the
    family; ``blocked``: why a significant q still cannot read yes (the test counts in the family)."""
    claim: str
    test: str
    p: float | None = None
    sign: int = 1
    fixed: str | None = None
    blocked: str | None = None
    q: float | None = None

    def text(self) -> str:
        if self.fixed:
            return self.fixed
        if self.p is None or self.q is None:
            return "n/a"
        q = f"q={self.q:.2g}"
        if self.q > ALPHA:
            return f"inconclusive ({q})"
        if self.blocked:
            return f"inconclusive ({q}, but {self.blocked})"
        return f"yes ({q})" if self.sign > 0 else f"no (the opposite) ({q})"

    def record(self) -> dict:
        return {"claim": self.claim, "test": self.test, "p": self.p, "q": self.q, "reading": self.text()}


def decide(verdicts: list[Verdict]) -> None:
    """Benjamini-Hochberg over every tested reading of the report; sets each one's q."""
    tested = [v for v in verdicts if v.fixed is None and v.p is not None]
    q, _ = benjamini_hochberg(np.array([v.p for v in tested], dtype=np.float64), ALPHA)
    for v, value in zip(tested, q):
        v.q = float(value)


class Outputs:
    """The study folder's JSON files, read once each. A file that is there but cannot be read (cut off, damaged, not
    a JSON object) is kept in ``unreadable`` with what is wrong, and never taken for a missing one (a step that did
    not finish)."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self._docs: dict[str, object] = {}
        self.unreadable: dict[str, str] = {}  # file (relative to the study folder) -> what is wrong
        self.verdicts: list[Verdict] = []  # every reading's test, in the report's order: one BH family

    def verdict(self, claim: str, test: str, **fields) -> Verdict:
        v = Verdict(claim, test, **fields)
        self.verdicts.append(v)
        return v

    def json(self, rel: str | Path) -> dict | None:
        """The JSON object in ``rel``; None where it is absent or unreadable (``problem`` tells which)."""
        rel = str(rel)
        if rel not in self._docs:
            try:
                doc = read_json(self.out / rel)
            except UnreadableFile as err:
                doc, self.unreadable[rel] = None, err.reason
            if doc is not None and not isinstance(doc, dict):
                doc, self.unreadable[rel] = None, f"holds a JSON {type(doc).__name__}, not an object"
            self._docs[rel] = doc
        return self._docs[rel]

    def problem(self, *rels: str | Path) -> str | None:
        """"unreadable (FILE)" for the first of ``rels`` that is there but cannot be read; None where each is
        readable or absent."""
        for rel in map(str, rels):
            self.json(rel)
            if rel in self.unreadable:
                return f"unreadable ({rel})"
        return None

    def missing(self, rel: str | Path) -> str:
        """What stands for a number of ``rel`` that is not there."""
        return "unreadable" if self.problem(rel) else "n/a"

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
                   str(rel), tuple(path), fmt, op, self.missing(rel))

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
    """[mean, " [", lo, ", ", hi, "]"] from the row at ``prefix`` of ``rel``; ["n/a"] where there is none
    (["unreadable"] where ``rel`` cannot be read)."""
    m, low, high = (o.num(rel, *prefix, key) for key in (mean, lo, hi))
    if None in prefix or m.value is None:
        return [m.missing]
    fmt = ci_format(low.value, high.value)
    m, low, high = (replace(n, fmt=fmt) for n in (m, low, high))
    return [m, " [", low, ", ", high, "]"] if low.value is not None else [m]


def bounds(parts: list) -> tuple[float | None, float | None]:
    nums = [p for p in parts if isinstance(p, Num)]
    return (nums[1].value, nums[2].value) if len(nums) >= 3 else (None, None)


def model_verdict(o: Outputs, claim: str, p: Num, estimate: float | None, sided: int,
                  test: str = "sign-flip over the items, two-sided") -> Verdict:
    """A claim about the model's own number (``sided`` 1: above 0; -1: below 0; 0: differs from 0), ``p`` from
    the file that holds the number."""
    if o.problem(p.file):
        return o.verdict(claim, test, fixed=o.problem(p.file))
    p = p.value
    if p is None or estimate is None:
        return o.verdict(claim, test, fixed="n/a (no p-value recorded)" if estimate is not None else "n/a")
    return o.verdict(claim, test, p=p, sign=1 if sided == 0 or estimate * sided > 0 else -1)


def beyond_verdict(o: Outputs, claim: str, model: float | None, seeds: list, sided: int,
                   own_side: bool = True) -> Verdict:
    """The model against the spread of its random initialisations' values (``seeds``), in the claim's direction:
    the rank p must reach ALPHA and the prediction test's p joins the family. ``own_side``: whether the model's
    own number lies on the claimed side; beyond random weights in the wrong direction is not a finding."""
    seeds = [s for s in seeds if s is not None]
    k = len(seeds)
    test = f"model against {k} random initialisations: rank, and prediction t with {k - 1} degrees of freedom"
    if model is None:
        return o.verdict(claim, test, fixed="n/a")
    if not k:
        return o.verdict(claim, test, fixed="n/a (the control comparison records no initialisation's mean: it was "
                                            "made before the rank test; run the control step again)")
    if 1 / (k + 1) > ALPHA:
        return o.verdict(claim, test, fixed=f"untestable with {k} initialisations (the model beyond all of them "
                                            f"has rank p 1/{k + 1}; {RANK_MIN_SEEDS} are needed)")
    if sided == 0:  # differs from 0: its size against theirs
        model, seeds, sided = abs(model), [abs(s) for s in seeds], 1
    side = "above" if sided > 0 else "below"
    test_of = against_initialisations(model, seeds)
    rank = test_of[f"rank_p_{side}"]
    reach = round(rank * (k + 1)) - 1
    blocked = (None if rank <= ALPHA else f"{reach} of {k} initialisations reach the model") if own_side else \
        "the model's own number is not on the claimed side"
    return o.verdict(claim, test, p=test_of[f"pred_p_{side}"], blocked=blocked)


def study_models(o: Outputs) -> list[str]:
    """The models of the study: study.json's, else every folder holding an experiment's results."""
    study = o.json(STUDY_FILE) or {}
    models = (study.get("settings") or {}).get("models")
    if models:
        return list(models)
    return sorted(p.name for p in o.out.iterdir() if p.is_dir() and any((p / e).is_dir() for e in EXPERIMENTS))


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


def control_cells(o: Outputs, folder: str, metric: str) -> tuple[list, list, dict | None, str]:
    """The random-weights control's mean [CI], the model-minus-control difference [95% prediction interval] of
    ``metric``, its comparison row (None where there is none) and the comparison's file."""
    rel, prefix = comparison_row(o, folder, metric)
    row = None if None in prefix else o.json(rel)["rows"][prefix[1]]
    return (ci_parts(o, rel, prefix, "control_mean", "control_ci_lo", "control_ci_hi"),
            ci_parts(o, rel, prefix, "diff_mean", "diff_pi_lo", "diff_pi_hi"), row, rel)


def reading(o: Outputs, label: str, claim: str, value: list, p, sided: int, stat: str, control: tuple,
            no_control: str) -> list:
    """One sentence: the claim, its verdict (the model's own test, ``p``) with the number, and the verdict of the
    model against its random initialisations (``control``: ``control_cells``; ``no_control`` where there is
    none)."""
    estimate = value[0].value if isinstance(value[0], Num) else None
    said = model_verdict(o, f"{label}: {claim}", p, estimate, sided)
    own_side = sided == 0 or (estimate is not None and estimate * sided > 0)
    return [f"{label}: {claim}: ", said, f" ({stat} ", *value, ")"] + beyond_parts(o, f"{label}: {claim}", control,
                                                                                  sided, no_control, own_side, p.file)


def beyond_parts(o: Outputs, claim: str, control: tuple, sided: int, no_control: str, own_side: bool,
                 own_file: str) -> list:
    """The end of a reading: "; beyond random weights: <verdict> (model minus control <diff [PI]>).", or
    "; <no_control>." where the comparison has no model. ``own_side``: as ``beyond_verdict``, from the model's
    own number in ``own_file``."""
    _, diff, row, rel = control
    if not o.problem(rel) and (row is None or row.get("model_mean") is None):
        return [f"; {no_control}."]
    if o.problem(own_file, rel):
        return ["; beyond random weights: ", o.verdict(f"{claim}, beyond random weights",
                                                       "model against its random initialisations",
                                                       fixed=o.problem(own_file, rel)), "."]
    beyond = beyond_verdict(o, f"{claim}, beyond random weights", row["model_mean"], row.get("seed_means") or [],
                            sided, own_side)
    return ["; beyond random weights: ", beyond, " (model minus control ", *diff, ")."]


def why_no_control(o: Outputs, step: str) -> str:
    """Why a number has no control beside it: the control step did not finish, or was not run."""
    rel = f"{STEPS_DIR}/{step.replace('/', '-')}.json"
    record = o.json(rel)
    if o.problem(rel):
        return f"its random-weights control's record is {o.problem(rel)}"
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
    folder), readable or not; a line for each one that cannot be read (its readings say unreadable), and a
    "No results" line where none has one."""
    blocks = [heading, Para([intro])]
    present = [m for m in models if o.json(f"{m}/{summary}") or o.problem(f"{m}/{summary}")]
    blocks += [Para([unreadable_line(o, f"{m}/{summary}") + " (its readings below say unreadable)"])
               for m in present if o.problem(f"{m}/{summary}")]
    if not present:
        blocks.append(Para(["No results (the step did not finish; see Steps)."]))
    return blocks, present


def unreadable_line(o: Outputs, rel: str) -> str:
    """The line that names a file that is there but cannot be read, and what is wrong."""
    return f"unreadable: {rel}: {o.unreadable[rel]}"


def value_header(present: list[str]) -> list[str]:
    """A table's header with, per model, the value, the random-weights control and the model minus the control."""
    return ["quantity"] + [col for m in present for col in (m, f"{m}: random weights", f"{m}: model minus random")]


def status_line(o: Outputs) -> str:
    study = o.json(STUDY_FILE)
    if not study:
        why = f"study.json is {o.problem(STUDY_FILE)}" if o.problem(STUDY_FILE) else \
            "no study.json: not made by run_study.sh"
        return f"Built from the result folders found ({why})."
    rels = [f"{STEPS_DIR}/{step['key']}.json" for step in study.get("steps", [])]
    unread = [step["name"] for step, rel in zip(study["steps"], rels) if o.problem(rel)]
    failed = [step["name"] for step, rel in zip(study["steps"], rels)
              if step["name"] not in unread and (o.json(rel) or {}).get("status") != "ok"]
    done = f"{len(rels) - len(failed) - len(unread)} of {len(rels)} steps finished"
    return done + (f"; not finished: {', '.join(failed)} (see Steps, with the end of each log)" if failed else "") \
        + (f"; step records unreadable: {', '.join(unread)}" if unread else "") + "."
