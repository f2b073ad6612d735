"""The study's report (``make_report.py``, and ``run_study.sh`` at its end), built from the saved outputs only:
``study.json`` and ``steps/`` of ``run_study.sh``, and each script's ``summary.json``, ``control_comparison.json``,
``meta.json``, ``run.json`` and figures. Nothing is recomputed: every number is a field of one of those files.

Two renderings of one list of blocks: ``report/index.html``, a single self-contained file (figures embedded as
data, inline style, no script, nothing fetched) in which every number names its file and field (``data-file``,
``data-path``, and a tooltip), and ``report/REPORT.md``, whose figures link to the result folders.

The one-sentence readings follow the rules stated in the report's "How to read" section (``RULES``).
"""
from __future__ import annotations

import base64
import html
import json
import math
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path

from spatial_attention.controls import COMPARISON_FILE, control_seed_folders
from spatial_attention.counterfactual import CORNERS
from spatial_attention.study import STEPS_DIR, STUDY_FILE

REPORT_DIR = "report"
ALPHA = 0.05  # the significance level of every test the summaries carry
WORLD_PANELS = 2  # per-world panels of experiment 1 shown per model

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
    "**untestable** when the test's smallest possible p (with few pairs) lies above 0.05 / heads, so that no head "
    "can pass whatever the model does.",
    "An ablation reads **yes** when its effect's 95% interval lies below 0 and p_drop <= 0.05 (the chosen heads "
    "lower the answer more than random heads of the same layers), **inconclusive** when the interval covers 0, "
    "**no** otherwise; beyond random weights: the model's effect minus the control's, below 0.",
]

# experiment 1's headline rows: (map, metric, what is compared, the claim its sign states)
EXP1_ROWS = [
    ("subject_cross", "iou", "shuffle",
     "the subject word's attention overlaps its shape more than on a patch-shuffled image (the paper's test)"),
    ("object_cross", "iou", "shuffle",
     "the object word's attention overlaps its shape more than on a patch-shuffled image (the paper's test)"),
    ("relation_cross", "iou", "shuffle",
     "the relation word's attention overlaps the two shapes more than on a patch-shuffled image"),
    ("subject_cross", "specificity_iou", "real", "the subject word attends to its own shape more than to the other"),
    ("object_cross", "specificity_iou", "real", "the object word attends to its own shape more than to the other"),
    ("subject_self_lm", "specificity_iou", "real",
     "in the language model, a patch of the subject attends to its own shape more than to the other"),
    ("subject_self_vit", "specificity_iou", "real",
     "in the vision encoder, a patch of the subject attends to its own shape more than to the other"),
]
# experiment 2's: (metric, sided: +1 the claim is "above 0", 0 "differs from 0", None no claim, the claim)
EXP2_ROWS = [
    ("asym_s1", 1, "in the caption, the relation word attends to the first-mentioned shape more than to the second"),
    ("asym_s2", 1, "in the swapped caption, the relation word attends to the first-mentioned shape more than to "
                   "the second"),
    ("symmetry_score", 0, "the relation word's attention is not role-consistent (symmetry score differs from 0; "
                          "it is 0 when the preference flips with the roles)"),
    ("abs_symmetry_score", None, ""),
]


# ----------------------------------------------------------------------------- numbers with their source

@dataclass(frozen=True)
class Num:
    """A number as one file holds it: ``file`` (relative to the study folder), the keys ``path`` into its JSON,
    and ``op`` "len" for the number of entries there."""
    value: float | int | None
    file: str
    path: tuple
    fmt: str
    op: str = ""

    def text(self) -> str:
        return "n/a" if self.value is None else format(self.value, self.fmt)


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


def _index(rows, **match) -> int | None:
    for i, row in enumerate(rows or []):
        if all(row.get(k) == v for k, v in match.items()):
            return i
    return None


def ci_format(lo: float | None, hi: float | None) -> str:
    """The format of a mean and its interval: enough decimals to show the interval's width to 2 digits."""
    if lo is None or hi is None or hi == lo:
        return "+.3f"
    return f"+.{min(8, max(1, 1 - math.floor(math.log10(abs(hi - lo)))))}f"


def _ci(o: Outputs, rel: str, prefix: tuple, mean: str, lo: str, hi: str) -> list:
    """[mean, " [", lo, ", ", hi, "]"] from the row at ``prefix`` of ``rel``; ["n/a"] where there is none."""
    if None in prefix:
        return ["n/a"]
    m, low, high = (o.num(rel, *prefix, key) for key in (mean, lo, hi))
    if m.value is None:
        return ["n/a"]
    fmt = ci_format(low.value, high.value)
    m, low, high = (replace(n, fmt=fmt) for n in (m, low, high))
    return [m, " [", low, ", ", high, "]"] if low.value is not None else [m]


def _bounds(parts: list) -> tuple[float | None, float | None]:
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


# ----------------------------------------------------------------------------- blocks

@dataclass(frozen=True)
class Link:
    """A link to a heading of the report itself (never out of it)."""
    label: str
    anchor: str

    def text(self) -> str:
        return self.label


@dataclass
class Heading:
    level: int
    text: str
    anchor: str = ""


@dataclass
class Para:
    parts: list


@dataclass
class Bullets:
    items: list  # each a list of parts


@dataclass
class Table:
    header: list[str]
    rows: list  # each a list of cells, each a list of parts


@dataclass
class Figures:
    figures: list  # (caption, path relative to the study folder)


@dataclass
class Pre:
    lines: list[str]


# ----------------------------------------------------------------------------- what the folders hold

def _models(o: Outputs) -> list[str]:
    """The models of the study: study.json's, else every folder holding an experiment's results."""
    study = o.json(STUDY_FILE) or {}
    models = (study.get("settings") or {}).get("models")
    if models:
        return list(models)
    return sorted(p.name for p in o.out.iterdir() if p.is_dir() and any((p / e).is_dir() for e in
                                                                          ("exp1", "exp2", "corners")))


def _label(o: Outputs, model: str) -> str:
    for rel in (f"{model}/exp1/run.json", f"{model}/exp2/run.json", f"{model}/corners/head_diff_stats_topleft/run.json"):
        run = o.json(rel)
        if run:
            return f"{model} ({(run.get('settings') or {}).get('model_path') or (run.get('model') or {}).get('model_path')})"
    return model


def _comparison_row(o: Outputs, folder: str, metric: str) -> tuple[str, tuple]:
    rel = f"{folder}/{COMPARISON_FILE}.json"
    doc = o.json(rel) or {}
    return rel, ("rows", _index(doc.get("rows"), metric=metric))


def _control_cells(o: Outputs, folder: str, metric: str) -> tuple[list, list]:
    """The random-weights control's mean [CI] and the model-minus-control difference [CI] of ``metric``."""
    rel, prefix = _comparison_row(o, folder, metric)
    return (_ci(o, rel, prefix, "control_mean", "control_ci_lo", "control_ci_hi"),
            _ci(o, rel, prefix, "diff_mean", "diff_ci_lo", "diff_ci_hi"))


def _reading(label: str, claim: str, value: list, diff: list, sided: int, stat: str, no_control: str,
             said: str | None = None) -> list:
    """One sentence: the claim, its verdict (``said``, else by ``verdict``) with the number, and the verdict of
    the model-minus-control difference (``no_control`` where there is none)."""
    said = said or verdict(*_bounds(value), sided)
    parts = [f"{label}: {claim}: {said} ({stat} ", *value, ")"]
    if diff != ["n/a"]:
        parts += ["; beyond random weights: ", verdict(*_bounds(diff), sided), " (model minus control ", *diff, ")"]
    else:
        parts += [f"; {no_control}"]
    return parts + ["."]


def _no_control(o: Outputs, step: str) -> str:
    """Why a number has no control beside it: the control step did not finish, or was not run."""
    record = o.json(f"{STEPS_DIR}/{step.replace('/', '-')}.json")
    if record and record.get("status") != "ok":
        return f"its random-weights control did not finish ({step}: {record.get('status')}, see Steps)"
    return "no random-weights control was run"


def _figures(o: Outputs, folder: Path, patterns: list[str], limit: dict | None = None) -> list:
    found = []
    for pattern in patterns:
        paths = sorted(folder.glob(pattern), key=lambda p: [int(t) if t.isdigit() else t
                                                            for t in re.split(r"(\d+)", p.name)])
        found += [(o.rel(p), o.rel(p)) for p in paths[:(limit or {}).get(pattern, len(paths))]]
    return found


def _opening(o: Outputs, models: list[str], summary: str, heading: Heading, intro: str) -> tuple[list, list]:
    """An experiment's heading and introduction, and the models with its ``summary`` (relative to the model's
    folder); a "No results" line where none has."""
    blocks = [heading, Para([intro])]
    present = [m for m in models if o.json(f"{m}/{summary}")]
    if not present:
        blocks.append(Para(["No results (the step did not finish; see Steps)."]))
    return blocks, present


def _value_header(present: list[str]) -> list[str]:
    """A table's header with, per model, the value, the random-weights control and the model minus the control."""
    return ["quantity"] + [col for m in present for col in (m, f"{m}: random weights", f"{m}: model minus random")]


def experiment_1(o: Outputs, models: list[str]) -> list:
    blocks, present = _opening(
        o, models, "exp1/summary.json", Heading(2, "Experiment 1: where the caption's words look in the image", "experiment-1"),
        "Cross-attention of the caption's words to the image tokens and image self-attention, scored against the "
        "entity boxes, beside a patch-shuffle baseline (the paper's test) and the binding specificity (own shape "
        "minus the other shape). Per model: the value with its 95% interval, the random-weights control, and the "
        "model minus the control.")
    if not present:
        return blocks
    header, rows, readings = _value_header(present), [], []
    for map_name, metric, kind, claim in EXP1_ROWS:
        label = f"{map_name} {metric}" + (", real minus shuffled" if kind == "shuffle" else "")
        row = [[label]]
        for m in present:
            rel = f"{m}/exp1/summary.json"
            prefix = ("by_metric", _index((o.json(rel) or {}).get("by_metric"), map=map_name, metric=metric))
            q = None
            if kind == "shuffle":
                value = _ci(o, rel, prefix, "mean_diff", "ci_lo", "ci_hi")
                q = o.num(rel, *prefix, "q_value", fmt=".2g") if None not in prefix else None
                shown = value + ([", q=", q] if q is not None and q.value is not None else [])
                key = f"{map_name}/{metric} real-shuffled"
            else:
                value = _ci(o, rel, prefix, "real_mean", "real_ci_lo", "real_ci_hi")
                shown, key = value, f"{map_name}/{metric}"
            control, diff = _control_cells(o, f"{m}/exp1", key)
            row += [shown, control, diff]
            said = shuffle_verdict(*_bounds(value), q.value if q is not None else None) if kind == "shuffle" else None
            readings.append(_reading(f"{m}, {label}", claim, value, diff, 1,
                                     "real minus shuffled" if kind == "shuffle" else metric,
                                     _no_control(o, f"{m}/exp1-control"), said))
        rows.append(row)
    blocks += [Table(header, rows), Heading(3, "Readings"), Bullets(readings), Heading(3, "Figures")]
    for m in present:
        folder = o.out / m / "exp1" / "figures"
        blocks.append(Heading(4, _label(o, m)))
        blocks.append(Figures(_figures(o, folder, ["real_vs_shuffled.png", "specificity.png", "metric_by_relation.png",
                                                   "world_*.png"], {"world_*.png": WORLD_PANELS})))
    return blocks


def experiment_2(o: Outputs, models: list[str]) -> list:
    blocks, present = _opening(
        o, models, "exp2/summary.json", Heading(2, "Experiment 2: does the relation word bind to the shapes by role?",
                                   "experiment-2"),
        "Text only: attention from the relation word to the two shape words, asym = first-mentioned minus "
        "second-mentioned, in the caption (s1) and in its entity-swapped counterfactual (s2); symmetry_score = "
        "asym_s1 + asym_s2 is near 0 for role-consistent attention and 2 asym for attention that follows word "
        "position.")
    if not present:
        return blocks
    header, rows, readings = _value_header(present), [], []
    for metric, sided, claim in EXP2_ROWS:
        row = [[metric]]
        for m in present:
            value = _ci(o, f"{m}/exp2/summary.json", ("all", metric), "mean", "ci_lo", "ci_hi")
            control, diff = _control_cells(o, f"{m}/exp2", metric)
            row += [value, control, diff]
            if sided is not None:
                readings.append(_reading(f"{m}, {metric}", claim, value, diff, sided, metric,
                                         _no_control(o, f"{m}/exp2-control")))
        rows.append(row)
    blocks += [Table(header, rows), Heading(3, "Readings"), Bullets(readings), Heading(3, "Figures")]
    for m in present:
        blocks.append(Heading(4, _label(o, m)))
        blocks.append(Figures(_figures(o, o.out / m / "exp2" / "figures", ["*.png"])))
    return blocks


def _head(o: Outputs, rel: str, layer_path: tuple, head_path: tuple) -> list:
    layer, head = o.num(rel, *layer_path, fmt="d"), o.num(rel, *head_path, fmt="d")
    return ["n/a"] if layer.value is None else ["L", layer, ".H", head]


def experiment_3(o: Outputs, models: list[str]) -> list:
    blocks, present = _opening(
        o, models, "corners/count_shared_unique/summary.json",
        Heading(2, "Experiment 3: which heads notice a shape in a corner", "experiment-3"),
        "Per corner, pairs of images with and without a shape in that corner, asked \"Is there anything in the "
        "{corner} corner?\". The answer's yes-rate, the heads whose score differs between the two images (paired "
        "sign-flip test, Benjamini-Hochberg FDR 5% over all heads) in the model and in each random "
        "initialisation, and the corner's unique head (layers 1-based, heads 0-based).")
    if not present:
        return blocks
    header = ["corner"]
    for m in present:
        header += [f"{m}: answers yes, full image / without the shape",
                   f"{m}: random weights: yes, full image / without the shape",
                   f"{m}: significant heads", f"{m}: random weights: significant heads", f"{m}: unique head"]
    rows, readings = [], []
    for corner in CORNERS:
        row = [[corner]]
        for m in present:
            meta = f"{m}/corners/head_diff_stats_{corner}/meta.json"
            rel = f"{m}/corners/count_shared_unique/summary.json"
            folder = f"{m}/corners/head_diff_stats_{corner}"
            full_control, _ = _control_cells(o, folder, "full_answer_yes")
            control_control, _ = _control_cells(o, folder, "control_answer_yes")
            heads = o.num(rel, "significant_heads", corner, fmt="d", op="len")
            total = o.num(meta, "L", fmt="d"), o.num(meta, "H", fmt="d")
            seeds = [o.num(o.rel(s / "count_shared_unique" / "summary.json"), "significant_heads", corner, fmt="d",
                     op="len") for s in control_seed_folders(o.out / m / "corners")]
            seeds = [s for s in seeds if s.value is not None]
            row += [[o.num(meta, "answers_yes_full", fmt=".2f"), " / ", o.num(meta, "answers_yes_control", fmt=".2f")],
                    full_control + [" / "] + control_control,
                    [heads, " of ", total[0], " x ", total[1]],
                    _join(seeds) if seeds else ["n/a"],
                    _head(o, rel, ("unique_head_layers", corner), ("unique_heads", corner))]
            if heads.value is not None:
                floor = o.num(rel, "fdr", "p_floor", corner, fmt=".2g")
                alpha = (o.json(rel) or {}).get("fdr", {}).get("alpha", ALPHA)
                testable = None in (floor.value, total[0].value, total[1].value) or \
                    floor.value <= alpha / (total[0].value * total[1].value)
                said = ("untestable at this number of pairs" if not testable else
                        _no_control(o, f"{m}/corners-control") if not seeds else
                        "yes" if heads.value > max(s.value for s in seeds) else "no")
                readings.append([f"{m}, {corner}: more heads change their score significantly than in every random "
                                 f"initialisation: {said} (", heads, " heads; random weights: ",
                                 *(_join(seeds) if seeds else ["none"]), "; smallest possible p ", floor, ")."])
        rows.append(row)
    blocks += [Table(header, rows)]
    shared = [[f"{m}: the shared head (counted in all corners) is ",
               *_head(o, f"{m}/corners/count_shared_unique/summary.json", ("shared_head_layer",), ("shared_head",)), "."]
              for m in present]
    blocks += [Bullets(shared), Heading(3, "Readings"), Bullets(readings), Heading(3, "Figures")]
    for m in present:
        corners = o.out / m / "corners"
        blocks.append(Heading(4, _label(o, m)))
        blocks.append(Figures(_figures(o, corners, [f"head_diff_stats_{c}/count_bars.png" for c in CORNERS]
                                       + ["count_shared_unique/*.png"])))
    return blocks


def _join(nums: list) -> list:
    parts = []
    for i, n in enumerate(nums):
        parts += ([", "] if i else []) + [n]
    return parts


def _ablation_folders(o: Outputs, model: str) -> list[str]:
    corners = o.out / model / "corners"
    return sorted(p.name for p in corners.glob("ablation_*") if (p / "summary.json").is_file()) \
        if corners.is_dir() else []


def ablation(o: Outputs, models: list[str]) -> list:
    blocks = [Heading(2, "The causal test: ablating the heads experiment 3 found", "ablation"),
              Para(["Each corner's chosen heads are ablated and the change of the full images' yes/no log-odds "
                    "(mean over pairs, 95% interval) is set against random head sets of the same layers: p_drop = "
                    "(1 + random sets lowering it at least as much) / (1 + R). The random-weights column is the "
                    "same ablation in random initialisations, each ablating the heads its own experiment 3 found."])]
    present = {m: _ablation_folders(o, m) for m in models}
    names = sorted({name for folders in present.values() for name in folders},
                   key=lambda n: (n.split("_", 2)[2], CORNERS.index(n.split("_")[1]) if n.split("_")[1] in CORNERS else 9))
    shown = [m for m in models if present[m]]
    if not names:
        return blocks + [Para(["No ablation results (ABLATE=0, or the step did not finish; see Steps)."])]
    header = ["corner, heads"]
    for m in shown:
        header += [f"{m}: effect", f"{m}: random sets' mean", f"{m}: p_drop", f"{m}: random weights: effect"]
    rows, readings = [], []
    for name in names:
        _, corner, spec = name.split("_", 2)
        row = [[f"{corner}, {spec}"]]
        for m in shown:
            rel = f"{m}/corners/{name}/summary.json"
            metric = ("metrics", "log_odds_full")
            effect = _ci(o, rel, metric, "effect", "ci_lo", "ci_hi")
            p_drop = o.num(rel, *metric, "p_drop", fmt=".2g")
            control, diff = _control_cells(o, f"{m}/corners/{name}", "effect_log_odds_full")
            row += [effect, [o.num(rel, *metric, "random_mean")], [p_drop], control]
            if effect != ["n/a"]:
                lo, hi = _bounds(effect)
                said = ("n/a" if hi is None or p_drop.value is None else "inconclusive" if lo <= 0 <= hi else
                        "yes" if hi < 0 and p_drop.value <= ALPHA else "no")
                heads = (o.json(rel) or {}).get("heads") or []
                named = " ".join(f"L{h['layer']}.H{h['head']}" for h in heads)
                readings.append([f"{m}, {corner}: ablating the {spec} heads ({named}) lowers the full images' yes "
                                 f"log-odds more than random heads of their layers: {said} (effect ", *effect,
                                 ", random sets ", o.num(rel, *metric, "random_mean"), ", p_drop ", p_drop, ")"]
                                + (["; beyond random weights: ", verdict(*_bounds(diff), -1), " (model minus control ",
                                    *diff, ")."] if diff != ["n/a"] else [f"; {_no_control(o, f'{m}/corners-control')}."]))
        rows.append(row)
    blocks += [Table(header, rows), Heading(3, "Readings"), Bullets(readings), Heading(3, "Figures")]
    for m in shown:
        corners = o.out / m / "corners"
        blocks.append(Heading(4, _label(o, m)))
        blocks.append(Figures(_figures(o, corners, [f"{name}/figures/*.png" for name in present[m]])))
    return blocks


def manifest(o: Outputs, models: list[str]) -> list:
    blocks = [Heading(2, "What was run", "manifest")]
    study = o.json(STUDY_FILE)
    if study:
        settings = study.get("settings") or {}
        items = [[f"{key}: {json.dumps(value)}"] for key, value in settings.items()]
        blocks += [Para([f"run_study.sh, started {study.get('started')}, {study.get('status')}"
                         + (f" after {study['seconds']:.0f} s" if study.get("seconds") is not None else "") + "."]),
                   Bullets(items)]
    header = ["model", "results", "checkpoint", "revision", "dtype", "device", "layers x heads", "data", "items",
              "status", "started", "wall s (last run)"]
    rows, versions = [], {}
    for m in models:
        ablations = _ablation_folders(o, m)
        # (run.json, where its count of items is: in it, or in the folder's summary.json)
        runs = [(f"{m}/exp1/run.json", f"{m}/exp1/run.json", ("counts", "worlds_in_samples")),
                (f"{m}/exp2/run.json", f"{m}/exp2/run.json", ("counts", "pairs_built"))]
        runs += [(f"{m}/corners/head_diff_stats_{c}/run.json", f"{m}/corners/head_diff_stats_{c}/run.json",
                  ("pairs_scored",)) for c in CORNERS]
        runs += [(f"{m}/corners/{name}/run.json", f"{m}/corners/{name}/summary.json", ("n_pairs",))
                 for name in ablations]
        for rel, items_file, items in runs:
            run = o.json(rel)
            if not run:
                continue
            model = run.get("model") or {}
            versions[json.dumps(run.get("versions"), sort_keys=True)] = run.get("versions")
            data = run.get("data") or run.get("dataset") or (run.get("settings") or {}).get("data")
            rows.append([[m], [rel.rsplit("/run.json", 1)[0]], [str(model.get("model_path"))],
                         [str(model.get("commit_hash") or model.get("revision") or "")], [str(model.get("dtype"))],
                         [str(model.get("device"))],
                         [o.num(rel, "model", "num_layers", fmt="d"), " x ", o.num(rel, "model", "num_heads", fmt="d")],
                         [str(data)], [o.num(items_file, *items, fmt="d")], [str(run.get("status"))],
                         [str(run.get("started"))], [o.num(rel, "wall_seconds", fmt=".0f")]])
    if rows:
        blocks.append(Table(header, rows))
    if len(versions) == 1:
        only = next(iter(versions.values())) or {}
        blocks.append(Para(["Packages (the same in every run): " + ", ".join(f"{k} {v}" for k, v in only.items())]))
    elif versions:
        blocks.append(Para(["Packages differ between runs: " + " | ".join(
            ", ".join(f"{k} {v}" for k, v in (found or {}).items()) for found in versions.values())]))
    return blocks


def steps(o: Outputs) -> list:
    blocks = [Heading(2, "Steps", "steps")]
    study = o.json(STUDY_FILE)
    if not study:
        return blocks + [Para(["No study.json: these results were not made by run_study.sh."])]
    header, rows, failures = ["step", "what", "status", "time", "tries", "log"], [], []
    for step in study.get("steps", []):
        rel = f"{STEPS_DIR}/{step['key']}.json"
        record = o.json(rel)
        if record is None:
            rows.append([[step["name"]], [step["title"]], ["not run"], [""], [""], [""]])
            continue
        rows.append([[step["name"]], [step["title"]], [record.get("status", "?")],
                     [o.num(rel, "seconds", fmt=".0f"), " s"], [o.num(rel, "tries", fmt="d")], [record.get("log", "")]])
        if record.get("status") != "ok":
            failures += [Heading(3, f"{step['name']}: {record.get('status')} (exit {record.get('returncode')})"),
                         Para([f"The end of {record.get('log')}:"]), Pre(record.get("tail") or ["(empty)"])]
    return blocks + [Table(header, rows)] + failures


def _status(o: Outputs) -> str:
    study = o.json(STUDY_FILE)
    if not study:
        return "Built from the result folders found (no study.json: not made by run_study.sh)."
    records = [o.json(f"{STEPS_DIR}/{step['key']}.json") or {} for step in study.get("steps", [])]
    failed = [step["name"] for step, record in zip(study["steps"], records) if record.get("status") != "ok"]
    done = f"{len(records) - len(failed)} of {len(records)} steps finished"
    return done + (f"; not finished: {', '.join(failed)} (see Steps, with the end of each log)." if failed else ".")


def build(out: Path) -> tuple[str, list]:
    """The report's title and blocks, from the study folder ``out``."""
    o = Outputs(out)
    models = _models(o)
    title = "Spatial attention study: " + ", ".join(_label(o, m) for m in models)
    sections = (experiment_1(o, models) + experiment_2(o, models) + experiment_3(o, models) + ablation(o, models)
                + manifest(o, models) + steps(o))
    contents = [[Link(h.text, h.anchor)] for h in sections if isinstance(h, Heading) and h.level == 2]
    blocks = [Para([_status(o)]), Bullets(contents), Heading(2, "How to read", "rules"),
              Bullets([[rule] for rule in RULES])]
    blocks += sections
    return title, blocks


# ----------------------------------------------------------------------------- rendering

STYLE = """body{font-family:sans-serif;max-width:1400px;margin:1em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0;font-size:90%}th,td{border:1px solid #ccc;padding:3px 6px;
vertical-align:top;text-align:left}th{background:#f3f3f3}.num{white-space:nowrap}
.figs{display:flex;flex-wrap:wrap;gap:10px}figure{margin:0;max-width:560px}img{max-width:100%}
figcaption{font-size:80%;color:#555}pre{background:#f6f6f6;padding:.5em;overflow-x:auto}"""


def _bold(text: str) -> str:
    """Escaped text, **x** in bold."""
    return re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", html.escape(text))


def _html_parts(parts: list) -> str:
    out = []
    for part in parts:
        if isinstance(part, Num):
            where = f"{part.file}: {'/'.join(map(str, part.path))}" + (f" ({part.op})" if part.op else "")
            out.append(f'<span class="num" data-file="{html.escape(part.file)}" '
                       f"data-path='{html.escape(json.dumps(list(part.path)))}' data-op=\"{part.op}\" "
                       f'data-value="{html.escape(json.dumps(part.value))}" title="{html.escape(where)}">'
                       f"{html.escape(part.text())}</span>")
        elif isinstance(part, Link):
            out.append(f'<a href="#{part.anchor}">{html.escape(part.label)}</a>')
        else:
            out.append(_bold(str(part)))
    return "".join(out)


def _md_parts(parts: list) -> str:
    shown = (p.text() if isinstance(p, (Num, Link)) else str(p) for p in parts)
    return "".join(shown).replace("|", "\\|")


def render_html(out: Path, title: str, blocks: list) -> str:
    body = [f"<h1>{html.escape(title)}</h1>"]
    for block in blocks:
        if isinstance(block, Heading):
            anchor = f' id="{block.anchor}"' if block.anchor else ""
            body.append(f"<h{block.level}{anchor}>{html.escape(block.text)}</h{block.level}>")
        elif isinstance(block, Para):
            body.append(f"<p>{_html_parts(block.parts)}</p>")
        elif isinstance(block, Bullets):
            body.append("<ul>" + "".join(f"<li>{_html_parts(item)}</li>" for item in block.items) + "</ul>")
        elif isinstance(block, Table):
            head = "".join(f"<th>{html.escape(h)}</th>" for h in block.header)
            rows = "".join("<tr>" + "".join(f"<td>{_html_parts(cell)}</td>" for cell in row) + "</tr>"
                           for row in block.rows)
            body.append(f"<table><tr>{head}</tr>{rows}</table>")
        elif isinstance(block, Figures):
            figures = []
            for caption, rel in block.figures:
                data = base64.b64encode((out / rel).read_bytes()).decode("ascii")
                figures.append(f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
                               f"<figcaption>{html.escape(caption)}</figcaption></figure>")
            body.append(f'<div class="figs">{"".join(figures)}</div>')
        elif isinstance(block, Pre):
            body.append(f"<pre>{html.escape(chr(10).join(block.lines))}</pre>")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def render_markdown(title: str, blocks: list) -> str:
    lines = [f"# {title}", ""]
    for block in blocks:
        if isinstance(block, Heading):
            lines += ["#" * block.level + " " + block.text, ""]
        elif isinstance(block, Para):
            lines += [_md_parts(block.parts), ""]
        elif isinstance(block, Bullets):
            lines += [f"- {_md_parts(item)}" for item in block.items] + [""]
        elif isinstance(block, Table):
            lines += ["| " + " | ".join(block.header) + " |", "|" + " --- |" * len(block.header)]
            lines += ["| " + " | ".join(_md_parts(cell) for cell in row) + " |" for row in block.rows] + [""]
        elif isinstance(block, Figures):
            lines += [f"![{caption}](../{rel})" for caption, rel in block.figures] + [""]
        elif isinstance(block, Pre):
            lines += ["```", *block.lines, "```", ""]
    return "\n".join(lines)


def write_report(out: Path) -> tuple[Path, Path]:
    """Write ``out/report/index.html`` and ``out/report/REPORT.md``; their paths."""
    from spatial_attention.runio import write_atomic

    out = Path(out)
    title, blocks = build(out)
    html_path, md_path = out / REPORT_DIR / "index.html", out / REPORT_DIR / "REPORT.md"
    write_atomic(html_path, render_html(out, title, blocks))
    write_atomic(md_path, render_markdown(title, blocks))
    return html_path, md_path


def main(argv=None) -> None:
    import argparse
    import sys

    parser = argparse.ArgumentParser(
        prog="make_report.py",
        description="Write OUT_DIR/report/index.html (one self-contained file: figures embedded, nothing fetched, "
                    "opens offline) and OUT_DIR/report/REPORT.md from the study folder's saved outputs only "
                    "(run_study.sh's study.json and steps/, each experiment's summary.json, control_comparison.json, "
                    "meta.json, run.json and figures); no model is loaded and nothing is recomputed.")
    parser.add_argument("out_dir", type=Path, help="the study folder (run_study.sh's OUT_DIR)")
    args = parser.parse_args(argv)
    if not args.out_dir.is_dir():
        print(f"error: {args.out_dir}: not a folder; give run_study.sh's OUT_DIR", file=sys.stderr)
        raise SystemExit(2)
    html_path, md_path = write_report(args.out_dir)
    print(f"report: {html_path} (and {md_path})")
