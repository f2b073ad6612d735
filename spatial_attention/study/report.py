"""The study's report (``make_report.py``, and ``run_study.sh`` at its end), built from the saved outputs only:
``study.json`` and ``steps/`` of ``run_study.sh``, and each script's ``summary.json``, ``control_comparison.json``,
``meta.json``, ``run.json`` and figures. Nothing is recomputed: every number is a field of one of those files.

Two renderings of one list of blocks (``report_blocks.py``): ``report/index.html``, a single self-contained file (figures embedded as
data, inline style, no script, nothing fetched) in which every number names its file and field (``data-file``,
``data-path``, and a tooltip), and ``report/REPORT.md``, whose figures link to the result folders.

The one-sentence readings follow the rules stated in the report's "How to read" section (``RULES`` in
``report_readings.py``); the sections are ``report_sections.py``. A file that is there but cannot be read (cut off,
damaged) is never taken for a step that did not finish: it is named at the top of the report and on the terminal,
its readings say unreadable, and ``make_report.py`` exits 1.
"""
from __future__ import annotations

from pathlib import Path

from spatial_attention.study.folder import EXPERIMENTS, REPORT_DIR, STUDY_FILE
from spatial_attention.study.report_blocks import Bullets, Heading, Link, Para, render_html, render_markdown
from spatial_attention.study.report_readings import (ALPHA, RULES, Outputs, decide, model_label, status_line,
                                                     study_models, unreadable_line)
from spatial_attention.study.report_sections import (ablation, experiment_1, experiment_2, experiment_3, experiment_4,
                                                     manifest, steps)


def build(out: Path) -> tuple[str, list, Outputs]:
    """The report's title, its blocks and what it read (``verdicts``: its readings' tests, decided as one family;
    ``unreadable``), from the study folder ``out``."""
    o = Outputs(out)
    models = study_models(o)
    title = "Spatial attention study: " + ", ".join(model_label(o, m) for m in models)
    sections = (experiment_1(o, models) + experiment_2(o, models) + experiment_3(o, models) + ablation(o, models)
                + experiment_4(o, models)
                + manifest(o, models) + steps(o))
    decide(o.verdicts)
    contents = [[Link(h.text, h.anchor)] for h in sections if isinstance(h, Heading) and h.level == 2]
    blocks = [Para([status_line(o)])]
    if o.unreadable:  # every file read by now: the sections read them all
        blocks += [Para(["**Files that are there but cannot be read** (cut off or damaged): their readings say "
                         "unreadable, and the Benjamini-Hochberg family lacks their tests, so the other q's change; "
                         "restore them (or rerun their step) and rebuild the report:"]),
                   Bullets([[unreadable_line(o, rel)] for rel in o.unreadable])]
    blocks += [Bullets(contents), Heading(2, "How to read", "rules"), Bullets([[rule] for rule in RULES])]
    blocks += sections
    return title, blocks, o


def write_report(out: Path) -> tuple[Path, Path, dict[str, str]]:
    """Write ``out/report/index.html``, ``out/report/REPORT.md`` and ``out/report/readings.json`` (every
    reading's test, p, q and verdict); the first two's paths, and the files that could not be read (relative to
    ``out``) with what is wrong."""
    from spatial_attention.common.runio import write_atomic, write_json

    out = Path(out)
    title, blocks, o = build(out)
    html_path, md_path = out / REPORT_DIR / "index.html", out / REPORT_DIR / "REPORT.md"
    write_atomic(html_path, render_html(out, title, blocks))
    write_atomic(md_path, render_markdown(title, blocks))
    write_json(out / REPORT_DIR / "readings.json",
               {"family": "Benjamini-Hochberg over every tested reading", "alpha": ALPHA,
                "m": sum(v.q is not None for v in o.verdicts), "readings": [v.record() for v in o.verdicts],
                "unreadable": o.unreadable})
    return html_path, md_path, o.unreadable


def is_study(out: Path) -> bool:
    """Whether ``out`` holds a study: run_study.sh's study.json, or a model folder with an experiment's results."""
    return (Path(out) / STUDY_FILE).exists() or bool(study_models(Outputs(out)))


def main(argv=None) -> int:
    import argparse
    import sys

    parser = argparse.ArgumentParser(
        prog="make_report.py",
        description="Write OUT_DIR/report/index.html (one self-contained file: figures embedded, nothing fetched, "
                    "opens offline), OUT_DIR/report/REPORT.md and OUT_DIR/report/readings.json (every reading's "
                    "test, p, and q over the report's one Benjamini-Hochberg family) from the study folder's saved "
                    "outputs only "
                    "(run_study.sh's study.json and steps/, each experiment's summary.json, control_comparison.json, "
                    "meta.json, run.json and figures); no model is loaded and nothing is recomputed. A file that is "
                    "there but cannot be read is named, one line each (unreadable: FILE: what is wrong), here and in "
                    "the report, its readings say unreadable, and the exit status is 1; a folder without a study is "
                    "refused.")
    parser.add_argument("out_dir", type=Path, help="the study folder (run_study.sh's OUT_DIR)")
    args = parser.parse_args(argv)
    if not args.out_dir.is_dir():
        print(f"error: {args.out_dir}: not a folder; give run_study.sh's OUT_DIR", file=sys.stderr)
        raise SystemExit(2)
    if not is_study(args.out_dir):
        print(f"error: {args.out_dir}: holds no study (no {STUDY_FILE}, and no model folder with results in "
              f"{'/, '.join(EXPERIMENTS)}/); give run_study.sh's OUT_DIR", file=sys.stderr)
        raise SystemExit(2)
    try:
        html_path, md_path, unreadable = write_report(args.out_dir)
    except OSError as err:
        where = err.filename or args.out_dir / REPORT_DIR
        print(f"error: {where}: cannot write the report there ({err.strerror or err}); give a study folder you can "
              f"write to, or copy it somewhere writable", file=sys.stderr)
        raise SystemExit(2) from None
    for rel, why in unreadable.items():
        print(f"unreadable: {args.out_dir / rel}: {why}", file=sys.stderr)
    print(f"report: {html_path} (and {md_path})" + (f", with {len(unreadable)} unreadable file(s)" if unreadable
                                                      else ""))
    return 1 if unreadable else 0
