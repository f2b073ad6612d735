"""The report's sections, one function each: experiments 1, 2 and 3, the ablation, experiment 4, the run manifest and the
steps. Each returns its blocks, built from the saved outputs only."""
from __future__ import annotations

import json

from spatial_attention.data.counterfactual import CORNERS
from spatial_attention.run.controls import control_seed_folders
from spatial_attention.stats.metrics import DISTANCE_MATCHED, WORD_SWAP
from spatial_attention.study.folder import STEPS_DIR, STUDY_FILE
from spatial_attention.study.report_blocks import Bullets, Figures, Heading, Para, Pre, Table
from spatial_attention.study.report_readings import (ALPHA, Outputs, beyond_parts, beyond_verdict, bounds, ci_parts,
                                                     control_cells, figure_paths, model_label, opening, reading,
                                                     row_index, unreadable_line, value_header, why_no_control)

WORLD_PANELS = 2  # per-world panels of experiment 1 shown per model


# experiment 1's headline rows: (map, metric, what is compared, the claim its sign states)
EXP1_ROWS = [
    ("subject_cross", "iou", "shuffle",
     "salience (the paper's test, not evidence of grounding): the subject word's attention overlaps its shape more "
     "than on a patch-shuffled image"),
    ("object_cross", "iou", "shuffle",
     "salience (the paper's test, not evidence of grounding): the object word's attention overlaps its shape more "
     "than on a patch-shuffled image"),
    ("relation_cross", "iou", "shuffle",
     "salience (not evidence of grounding): the relation word's attention overlaps the two shapes more than on a "
     "patch-shuffled image"),
    ("subject_cross", WORD_SWAP, "real", "the subject word's attention follows the shape it names (more on its "
                                         "shape than when the same position names the other shape)"),
    ("object_cross", WORD_SWAP, "real", "the object word's attention follows the shape it names (more on its "
                                        "shape than when the same position names the other shape)"),
    # the language model's: matched on distance in the image, not on distance in the token sequence (recency),
    # which a causal model's attention can follow: shown without a reading
    ("subject_self_lm", DISTANCE_MATCHED, "real", None),
    ("subject_self_vit", DISTANCE_MATCHED, "real",
     "in the vision encoder, a patch of the subject attends to its own shape more than to cells as far away, beyond "
     "the other shape's share"),
    # the paper-style specificities, shown without a reading: salience (cross) and locality (self) pass them
    ("subject_cross", "specificity_iou", "real", None),
    ("object_cross", "specificity_iou", "real", None),
    ("subject_self_lm", "specificity_iou", "real", None),
    ("subject_self_vit", "specificity_iou", "real", None),
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


def experiment_1(o: Outputs, models: list[str]) -> list:
    blocks, present = opening(
        o, models, "exp1/summary.json", Heading(2, "Experiment 1: where the caption's words look in the image", "experiment-1"),
        "Cross-attention of the caption's words to the image tokens and image self-attention, scored against the "
        "entity boxes, beside a patch-shuffle baseline (the paper's test, a salience test) and the binding "
        "specificities that salience and locality cannot pass: a word's map against the same caption position naming "
        "the other shape (word swap), and a seed patch's map against the cells as far from it (distance-matched). The "
        "paper-style specificity (own shape minus the other) is shown without a reading. Per model: the value with its 95% interval, the random-weights control, and the "
        "model minus the control.")
    if not present:
        return blocks
    header, rows, readings = value_header(present), [], []
    for map_name, metric, kind, claim in EXP1_ROWS:
        label = f"{map_name} {metric}" + (", real minus shuffled" if kind == "shuffle" else "")
        row = [[label]]
        for m in present:
            rel = f"{m}/exp1/summary.json"
            prefix = ("by_metric", row_index((o.json(rel) or {}).get("by_metric"), map=map_name, metric=metric))
            if kind == "shuffle":
                value = ci_parts(o, rel, prefix, "mean_diff", "ci_lo", "ci_hi")
                p = o.num(rel, *prefix, "p_value", fmt=".2g")
                key = f"{map_name}/{metric} real-shuffled"
            else:
                value = ci_parts(o, rel, prefix, "real_mean", "real_ci_lo", "real_ci_hi")
                p = o.num(rel, *prefix, "real_p_value", fmt=".2g")
                key = f"{map_name}/{metric}"
            shown = value + ([", p=", p] if p.value is not None else [])
            control = control_cells(o, f"{m}/exp1", key)
            row += [shown, control[0], control[1]]
            if claim:
                readings.append(reading(o, f"{m}, {label}", claim, value, p, 1,
                                        "real minus shuffled" if kind == "shuffle" else metric, control,
                                        why_no_control(o, f"{m}/exp1-control")))
        rows.append(row)
    blocks += [Table(header, rows), Heading(3, "Readings"), Bullets(readings), Heading(3, "Figures")]
    for m in present:
        folder = o.out / m / "exp1" / "figures"
        blocks.append(Heading(4, model_label(o, m)))
        blocks.append(Figures(figure_paths(o, folder, ["real_vs_shuffled.png", "specificity.png", "metric_by_relation.png",
                                                   "world_*.png"], {"world_*.png": WORLD_PANELS})))
    return blocks


def experiment_2(o: Outputs, models: list[str]) -> list:
    blocks, present = opening(
        o, models, "exp2/summary.json", Heading(2, "Experiment 2: does the relation word bind to the shapes by role?",
                                   "experiment-2"),
        "Text only: attention from the relation word to the two shape words, asym = first-mentioned minus "
        "second-mentioned, in the caption (s1) and in its entity-swapped counterfactual (s2); symmetry_score = "
        "asym_s1 + asym_s2 is near 0 for role-consistent attention and 2 asym for attention that follows word "
        "position.")
    if not present:
        return blocks
    header, rows, readings = value_header(present), [], []
    for metric, sided, claim in EXP2_ROWS:
        row = [[metric]]
        for m in present:
            rel = f"{m}/exp2/summary.json"
            value = ci_parts(o, rel, ("all", metric), "mean", "ci_lo", "ci_hi")
            p = o.num(rel, "all", metric, "p_value", fmt=".2g")
            control = control_cells(o, f"{m}/exp2", metric)
            row += [value + ([", p=", p] if p.value is not None else []), control[0], control[1]]
            if sided is not None:
                readings.append(reading(o, f"{m}, {metric}", claim, value, p, sided, metric, control,
                                        why_no_control(o, f"{m}/exp2-control")))
        rows.append(row)
    blocks += [Table(header, rows), Heading(3, "Readings"), Bullets(readings), Heading(3, "Figures")]
    for m in present:
        blocks.append(Heading(4, model_label(o, m)))
        blocks.append(Figures(figure_paths(o, o.out / m / "exp2" / "figures", ["*.png"])))
    return blocks


def _head(o: Outputs, rel: str, layer_path: tuple, head_path: tuple) -> list:
    layer, head = o.num(rel, *layer_path, fmt="d"), o.num(rel, *head_path, fmt="d")
    return [layer.missing] if layer.value is None else ["L", layer, ".H", head]


def experiment_3(o: Outputs, models: list[str]) -> list:
    blocks, present = opening(
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
            full_control, control_control = (control_cells(o, folder, f"{kind}_answer_yes")[0]
                                             for kind in ("full", "control"))
            heads = o.num(rel, "significant_heads", corner, fmt="d", op="len")
            total = o.num(meta, "L", fmt="d"), o.num(meta, "H", fmt="d")
            seeds = [o.num(o.rel(s / "count_shared_unique" / "summary.json"), "significant_heads", corner, fmt="d",
                     op="len") for s in control_seed_folders(o.out / m / "corners")]
            seeds = [s for s in seeds if s.value is not None or o.problem(s.file)]
            row += [[o.num(meta, "answers_yes_full", fmt=".2f"), " / ", o.num(meta, "answers_yes_control", fmt=".2f")],
                    full_control + [" / "] + control_control,
                    [heads, " of ", total[0], " x ", total[1]],
                    _join(seeds) if seeds else ["n/a"],
                    _head(o, rel, ("unique_head_layers", corner), ("unique_heads", corner))]
            if heads.value is not None or o.problem(rel):
                readings.append(_count_reading(o, m, corner, rel, heads, seeds))
        rows.append(row)
    blocks += [Table(header, rows)]
    shared = [[f"{m}: the shared head (counted in all corners) is ",
               *_head(o, f"{m}/corners/count_shared_unique/summary.json", ("shared_head_layer",), ("shared_head",)), "."]
              for m in present]
    blocks += [Bullets(shared), Heading(3, "Readings"), Bullets(readings), Heading(3, "Figures")]
    for m in present:
        corners = o.out / m / "corners"
        blocks.append(Heading(4, model_label(o, m)))
        blocks.append(Figures(figure_paths(o, corners, [f"head_diff_stats_{c}/count_bars.png" for c in CORNERS]
                                       + ["count_shared_unique/*.png"])))
    return blocks


def _count_reading(o: Outputs, m: str, corner: str, rel: str, heads, seeds: list) -> list:
    """Experiment 3's reading: more significant heads than the random initialisations (``beyond_verdict``)."""
    claim = f"{m}, {corner}: more heads change their score significantly than in the random initialisations"
    floor = o.num(rel, "fdr", "p_floor", corner, fmt=".2g")
    alpha = (o.json(rel) or {}).get("fdr", {}).get("alpha", ALPHA)
    test = "significant-head count against the random initialisations'"
    # BH rejects something only where some p can reach alpha (at the largest of its m thresholds)
    if o.problem(rel, *(s.file for s in seeds)):
        said = o.verdict(claim, test, fixed=o.problem(rel, *(s.file for s in seeds)))
    elif floor.value is None:
        said = o.verdict(claim, test, fixed="untestable (the analysis records no smallest possible p)")
    elif floor.value > alpha:
        said = o.verdict(claim, test, fixed="untestable at this number of pairs")
    elif not seeds:
        said = o.verdict(claim, test, fixed=why_no_control(o, f"{m}/corners-control"))
    else:
        said = beyond_verdict(o, claim, heads.value, [s.value for s in seeds], 1)
    return [f"{claim}: ", said, " (", heads, " heads; random weights: ", *(_join(seeds) if seeds else ["none"]),
            "; smallest possible p ", floor, ")."]


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
    present = {m: _ablation_folders(o, m) for m in models}
    blocks = [Heading(2, "The causal test: ablating the heads experiment 3 found", "ablation"),
              Para(["Each corner's chosen heads are ablated ", _ablated_where(o, present), " and the change of the "
                    "full images' yes/no log-odds (mean over pairs, 95% interval) is set against random head sets of "
                    "the same layers: p_drop = (1 + random sets lowering it at least as much) / (1 + R). The "
                    "random-weights column is the same ablation in random initialisations, each ablating the heads "
                    "its own experiment 3 found."])]
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
            effect = ci_parts(o, rel, metric, "effect", "ci_lo", "ci_hi")
            p_drop = o.num(rel, *metric, "p_drop", fmt=".2g")
            control = control_cells(o, f"{m}/corners/{name}", "effect_log_odds_full")
            row += [effect, [o.num(rel, *metric, "random_mean")], [p_drop], control[0]]
            if effect != ["n/a"]:
                readings.append(_ablation_reading(o, m, corner, spec, rel, effect, p_drop, control))
        rows.append(row)
    blocks += [Table(header, rows), Heading(3, "Readings"), Bullets(readings), Heading(3, "Figures")]
    for m in shown:
        corners = o.out / m / "corners"
        blocks.append(Heading(4, model_label(o, m)))
        blocks.append(Figures(figure_paths(o, corners, [f"{name}/figures/*.png" for name in present[m]])))
    return blocks


POSITIONS_READ = {"answer": "at the answer position alone (ABLATE_POSITIONS=answer, the study's default: where "
                             "experiment 3's score measured them; the paper ablated every position)",
                  "all": "at every position (ABLATE_POSITIONS=all, the paper's)"}


def _ablated_where(o: Outputs, present: dict[str, list[str]]) -> str:
    """Where the ablations shown ablated their heads, from their summaries."""
    found = {(o.json(f"{m}/corners/{name}/summary.json") or {}).get("positions", "all")
             for m, names in present.items() for name in names}
    return "; ".join(POSITIONS_READ.get(p, f"at positions {p!r}") for p in sorted(found)) or "(none ran)"


def _ablation_reading(o: Outputs, m: str, corner: str, spec: str, rel: str, effect: list, p_drop, control) -> list:
    """An ablation's reading: its p_drop in the report's family, its effect's interval below 0, and its effect
    against the random initialisations' (``beyond_verdict``)."""
    heads = (o.json(rel) or {}).get("heads") or []
    named = " ".join(f"L{h['layer']}.H{h['head']}" for h in heads) or o.missing(rel)
    where = "at the answer position " if (o.json(rel) or {}).get("positions") == "answer" else ""
    claim = (f"{m}, {corner}: ablating the {spec} heads ({named}) {where}lowers the full images' yes log-odds more "
             f"than random heads of their layers")
    sets = ((o.json(rel) or {}).get("random_controls") or {}).get("count")
    lo, hi = bounds(effect)
    test = f"p_drop against {sets} random head sets of the same layers"
    if o.problem(rel):
        said = o.verdict(claim, test, fixed=o.problem(rel))
    elif hi is None or p_drop.value is None:
        said = o.verdict(claim, test, fixed="n/a")
    elif sets is None:
        said = o.verdict(claim, test, fixed="untestable (the number of random head sets is not recorded)")
    elif 1 / (1 + sets) > ALPHA:
        said = o.verdict(claim, test, fixed=f"untestable with {sets} random head sets (p_drop cannot go below "
                                            f"1/{sets + 1})")
    elif not ((o.json(rel) or {}).get("pairs") or {}).get("held_out"):  # its p is too small: out of the family
        said = o.verdict(claim, test, fixed="untestable on the pairs its heads were found on (--same-pairs, or made "
                                            "before the split)")
    else:
        said = o.verdict(claim, test, p=p_drop.value, blocked="the effect's interval reaches 0" if hi >= 0 else None)
    return [f"{claim}: ", said, " (effect ", *effect, ", random sets ",
            o.num(rel, "metrics", "log_odds_full", "random_mean"), ", p_drop ", p_drop, ")"] \
        + beyond_parts(o, claim, control, -1, why_no_control(o, f"{m}/corners-control"),
                       own_side=hi is not None and hi < 0, own_file=rel)


def experiment_4(o: Outputs, models: list[str]) -> list:
    blocks, present = opening(
        o, models, "exp4/summary.json", Heading(2, "Experiment 4: the heads that carry the relation", "experiment-4"),
        "Each true caption makes a pair with its relation word swapped (relation_heads.py --kind swap). On the "
        "discovery half of the pairs each head's answer-position output is swapped between the pair's two inputs "
        "(its share of the yes/no gap, true minus false); heads significant under Benjamini-Hochberg that carry "
        "the gap are chosen and ablated together on the held-out test half, against random head sets of the same "
        "layers. Change = the test pairs' gap ablated minus unablated (mean, 95% interval); the random-weights "
        "column ablates the same heads in random initialisations.")
    if not present:
        return blocks
    header = ["model", "pairs (discovery, test)", "test: balanced accuracy", "chosen heads", "gap",
              "change with them ablated", "share moved", "random sets' mean", "p_drop", "random weights: change"]
    rows, readings = [], []
    for m in present:
        rel = f"{m}/exp4/summary.json"
        summary = o.json(rel) or {}
        named = " ".join(f"L{h['layer']}.H{h['head']}" for h in summary.get("chosen_heads") or []) or \
            ("unreadable" if o.problem(rel) else "none")
        change = ci_parts(o, rel, ("test",), "gap_change", "gap_change_lo", "gap_change_hi")
        p_drop = o.num(rel, "test", "p_drop", fmt=".2g")
        control = control_cells(o, f"{m}/exp4", "gap_change")
        rows.append([[m], [o.num(rel, "pairs", "discovery", fmt="d"), ", ", o.num(rel, "pairs", "test", fmt="d")],
                     [o.num(rel, "test", "balanced_accuracy", fmt=".2f")], [named],
                     [o.num(rel, "test", "gap_unablated")], change, [o.num(rel, "test", "gap_moved_share", fmt=".0%")],
                     [o.num(rel, "test", "random_gap_change_mean")], [p_drop], control[0]])
        if o.problem(rel):  # which heads, and whether any, is in the file
            claim = f"{m}: ablating the heads chosen on the discovery pairs lowers the held-out pairs' gap more " \
                    "than random heads of their layers"
            readings.append([f"{claim}: ", o.verdict(claim, "p_drop against random head sets of the same layers, "
                                                            "on held-out pairs", fixed=o.problem(rel)), "."])
            continue
        if named == "none":  # nothing was tested, and the control had nothing to ablate
            readings.append([f"{m}: no head carries the gap between a caption and its swap on the discovery pairs (",
                             o.num(rel, "discovery", "n_significant", fmt="d"), " significant; mean gap ",
                             o.num(rel, "discovery", "gap_mean", fmt="+.2g"), " log-odds): no ablation to test, and "
                             "none for the random-weights control"])
            continue
        claim = f"{m}: ablating the heads chosen on the discovery pairs ({named}) lowers the held-out pairs' gap more " \
                "than random heads of their layers"
        sets = o.num(rel, "test", "random_sets", fmt="d").value
        lo, hi = bounds(change)
        test = f"p_drop against {sets} random head sets of the same layers, on held-out pairs"
        if hi is None or p_drop.value is None:
            said = o.verdict(claim, test, fixed="n/a (no head was chosen)")
        elif 1 / (1 + sets) > ALPHA:
            said = o.verdict(claim, test, fixed=f"untestable with {sets} random head sets")
        else:
            said = o.verdict(claim, test, p=p_drop.value, blocked="the change's interval reaches 0" if hi >= 0 else None)
        readings.append([f"{claim}: ", said, " (change ", *change, ", p_drop ", p_drop, ")"]
                        + beyond_parts(o, claim, control, -1, why_no_control(o, f"{m}/exp4-control"),
                                       own_side=hi is not None and hi < 0, own_file=rel))
    blocks += [Table(header, rows), Heading(3, "Readings"), Bullets(readings), Heading(3, "Figures")]
    for m in present:
        blocks.append(Heading(4, model_label(o, m)))
        blocks.append(Figures(figure_paths(o, o.out / m / "exp4" / "figures", ["*.png"])))
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
                (f"{m}/exp2/run.json", f"{m}/exp2/run.json", ("counts", "pairs_built")),
                (f"{m}/exp4/run.json", f"{m}/exp4/summary.json", ("pairs", "test"))]
        runs += [(f"{m}/corners/head_diff_stats_{c}/run.json", f"{m}/corners/head_diff_stats_{c}/run.json",
                  ("pairs_scored",)) for c in CORNERS]
        runs += [(f"{m}/corners/{name}/run.json", f"{m}/corners/{name}/summary.json", ("n_pairs",))
                 for name in ablations]
        for rel, items_file, items in runs:
            run = o.json(rel)
            if not run:
                if o.problem(rel):
                    rows.append([[m], [rel.rsplit("/run.json", 1)[0]]] + [[""]] * 7 + [[o.missing(rel)], [""], [""]])
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
        return blocks + [Para([unreadable_line(o, STUDY_FILE) if o.problem(STUDY_FILE) else
                               "No study.json: these results were not made by run_study.sh."])]
    header, rows, failures = ["step", "what", "status", "time", "tries", "log"], [], []
    for step in study.get("steps", []):
        rel = f"{STEPS_DIR}/{step['key']}.json"
        record = o.json(rel)
        if record is None:
            rows.append([[step["name"]], [step["title"]], [o.missing(rel) if o.problem(rel) else "not run"], [""],
                         [""], [""]])
            continue
        rows.append([[step["name"]], [step["title"]], [record.get("status", "?")],
                     [o.num(rel, "seconds", fmt=".0f"), " s"], [o.num(rel, "tries", fmt="d")], [record.get("log", "")]])
        if record.get("status") != "ok":
            failures += [Heading(3, f"{step['name']}: {record.get('status')} (exit {record.get('returncode')})"),
                         Para([f"The end of {record.get('log')}:"]), Pre(record.get("tail") or ["(empty)"])]
    return blocks + [Table(header, rows)] + failures
