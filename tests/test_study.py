"""run_study.sh and make_report.py: the whole study at toy scale (tiny-random, both families, a few worlds, COUNT=4,
one control initialisation), a step forced to fail, the report parsed, and a rerun that resumes.

One study is run for the module (about 3 minutes on 2 CPU cores); the report's reading rules are also tested on
hand-made summaries with planted numbers, without a model."""
from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from conftest import FAILING  # noqa: E402

from spatial_attention.common.errors import OptionError  # noqa: E402
from spatial_attention.stats.inference import benjamini_hochberg  # noqa: E402
from spatial_attention.study import (report, report_blocks, report_readings,  # noqa: E402  (after the path)
                                     report_sections)
from spatial_attention.study.study import StudySettings, plan  # noqa: E402

SECTIONS = ("rules", "experiment-1", "experiment-2", "experiment-3", "ablation", "experiment-4", "manifest", "steps")


def _run(env: dict, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / "run_study.sh")], env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture
def study(tiny_study):
    """The study at toy scale (conftest's ``tiny_study``, shared with the sweep tests)."""
    return tiny_study


class _Page(HTMLParser):
    """Every tag's attributes, the ids, the number spans with their text, and the <pre> texts."""

    def __init__(self):
        super().__init__()
        self.tags, self.ids, self.numbers, self.pres = [], set(), [], []
        self._num, self._pre = None, None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append((tag, attrs))
        if "id" in attrs:
            self.ids.add(attrs["id"])
        if tag == "span" and attrs.get("class") == "num":
            self._num = [attrs, ""]
        if tag == "pre":
            self._pre = ""

    def handle_data(self, data):
        if self._num is not None:
            self._num[1] += data
        if self._pre is not None:
            self._pre += data

    def handle_endtag(self, tag):
        if tag == "span" and self._num is not None:
            self.numbers.append(tuple(self._num))
            self._num = None
        if tag == "pre":
            self.pres.append(self._pre)
            self._pre = None


def _page(text: str) -> _Page:
    page = _Page()
    page.feed(text)
    return page


def test_a_failed_step_does_not_stop_the_others(study):
    first, out = study["first"], study["out"]
    assert first.returncode == 1, first.stderr[-3000:]
    steps = plan(StudySettings.from_env({**os.environ, **study["env"]}))
    records = {s.name: json.loads((out / "steps" / f"{s.key}.json").read_text()) for s in steps}
    assert records[FAILING]["status"] == "failed" and records[FAILING]["returncode"] == 3
    assert any("forced failure" in line for line in records[FAILING]["tail"])
    assert all(r["status"] == "ok" for name, r in records.items() if name != FAILING)
    # after the failed step, the next one (qwen2's corner sweep) still ran
    names = [s.name for s in steps]
    assert names.index("qwen2/corners") > names.index(FAILING)
    # one line as each step starts and one as it ends, with its time
    for i, step in enumerate(steps, 1):
        assert re.search(rf"\[{i}/{len(steps)}\] {re.escape(step.name)}: .* \.\.\. \(log: ", first.stderr)
        assert re.search(rf"\[{i}/{len(steps)}\] {re.escape(step.name)}: (done in|FAILED \(exit 3\) after) "
                         rf"\d+m\d\ds", first.stderr)
    assert f"report: {out / 'report' / 'index.html'}" in first.stderr
    assert json.loads((out / "study.json").read_text())["failed"] == [FAILING]


def test_report_is_one_self_contained_file_with_every_section(study):
    page = _page(study["html"])
    assert set(SECTIONS) <= page.ids
    assert not any(tag in ("script", "link", "iframe", "object", "embed") for tag, _ in page.tags)
    images = [attrs for tag, attrs in page.tags if tag == "img"]
    for tag, attrs in page.tags:
        for name in ("src", "href"):
            value = attrs.get(name)
            if value is not None:  # only embedded data and links within the page
                assert value.startswith(("data:image/png;base64,", "#")), (tag, value[:80])
    assert "http://" not in study["html"] and "https://" not in study["html"]
    for attrs in images:
        assert base64.b64decode(attrs["src"].split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    # every summary figure of both models, and a few per-world panels
    out = study["out"]
    expected = set()
    for model in ("llava", "qwen2"):
        figures = out / model / "exp1" / "figures"
        expected |= {f"{model}/exp1/figures/{name}.png" for name in ("real_vs_shuffled", "specificity",
                                                                      "metric_by_relation")}
        expected |= {str(p.relative_to(out)) for p in sorted(figures.glob("world_*.png"))[:report_sections.WORLD_PANELS]}
        assert (out / model / "exp4" / "figures" / "head_shares.png").is_file()
        for exp in ("exp2", "exp4"):
            expected |= {str(p.relative_to(out)) for p in (out / model / exp / "figures").glob("*.png")}
        corners = out / model / "corners"
        expected |= {str(p.relative_to(out)) for p in corners.glob("head_diff_stats_*/count_bars.png")}
        expected |= {str(p.relative_to(out)) for p in corners.glob("count_shared_unique/*.png")}
        expected |= {str(p.relative_to(out)) for p in corners.glob("ablation_*/figures/*.png")}
    assert len(expected) > 40
    assert {attrs["alt"] for attrs in images} == expected
    assert all((out / name).is_file() for name in expected)
    # LLaVA and Qwen2-VL side by side in each experiment's table
    for header in ("llava: random weights", "qwen2: random weights", "llava: p_drop", "qwen2: p_drop"):
        assert f"<th>{header}</th>" in study["html"]
    markdown = (out / "report" / "REPORT.md").read_text()
    for title in ("## Experiment 1", "## Experiment 2", "## Experiment 3", "## The causal test", "## What was run",
                  "## Steps"):
        assert title in markdown


def _follow(doc, path):
    for key in path:
        doc = doc[key]
    return doc


def test_every_number_is_its_summary_field(study):
    out, page = study["out"], _page(study["html"])
    assert len(page.numbers) > 300
    files = set()
    for attrs, text in page.numbers:
        files.add(attrs["data-file"])
        value = json.loads(attrs["data-value"])
        if value is None:
            assert text == "n/a"
            continue
        held = _follow(json.loads((out / attrs["data-file"]).read_text()), json.loads(attrs["data-path"]))
        if attrs["data-op"] == "len":
            held = len(held)
        assert held == value, attrs
    for model in ("llava", "qwen2"):
        for rel in ("exp1/summary.json", "exp1/control_comparison.json", "exp2/summary.json",
                    "corners/count_shared_unique/summary.json", "corners/ablation_topleft_unique/summary.json",
                    "corners/ablation_topleft_unique/control_comparison.json", "exp1/run.json"):
            assert f"{model}/{rel}" in files, rel
    assert "llava/exp2/control_comparison.json" in files  # the failed control is qwen2's
    # a headline number checked by hand: the paper's test on LLaVA, subject word, as the summary holds it
    summary = json.loads((out / "llava" / "exp1" / "summary.json").read_text())
    row = next(r for r in summary["by_metric"] if (r["map"], r["metric"]) == ("subject_cross", "iou"))
    comparison = json.loads((out / "llava" / "exp1" / "control_comparison.json").read_text())
    control = next(r for r in comparison["rows"] if r["metric"] == "subject_cross/iou real-shuffled")

    def shown(mean, lo, hi):  # no interval where there is none (one initialisation: no prediction interval)
        fmt = report_readings.ci_format(lo, hi)
        return f"{mean:{fmt}} [{lo:{fmt}}, {hi:{fmt}}]" if lo is not None else f"{mean:{fmt}}"

    cells = (f"| subject_cross iou, real minus shuffled | {shown(row['mean_diff'], row['ci_lo'], row['ci_hi'])}, "
             f"p={row['p_value']:.2g} | "
             f"{shown(control['control_mean'], control['control_ci_lo'], control['control_ci_hi'])} | "
             f"{shown(control['diff_mean'], control['diff_pi_lo'], control['diff_pi_hi'])} |")
    assert cells in (out / "report" / "REPORT.md").read_text()


def test_the_controls_of_experiments_1_and_2_run_on_the_first_control_items_worlds(study):
    """CONTROL_ITEMS=3 of WORLDS=6: each initialisation runs experiment 1 on the first 3 worlds, and the
    comparison pairs the model's values on those 3."""
    for model in ("llava", "qwen2"):
        exp1 = study["out"] / model / "exp1"
        mine = [json.loads(line) for line in (exp1 / "samples.jsonl").read_text().splitlines()]
        seed = [json.loads(line) for line in
                (exp1 / "control_random_weights" / "init_seed_1000" / "samples.jsonl").read_text().splitlines()]
        assert len(mine) == 6 and [(r["shard"], r["index"]) for r in seed] == [(r["shard"], r["index"])
                                                                              for r in mine[:3]]
        rows = json.loads((exp1 / "control_comparison.json").read_text())["rows"]
        paired = [row["n_paired"] for row in rows if row.get("n_paired") is not None]
        assert max(paired) == 3 and min(paired) >= 1  # fewer where a metric is undefined in a world


def test_the_study_ablates_at_the_answer_position_says_so_and_times_each_script(study):
    out = study["out"]
    for model in ("llava", "qwen2"):
        summary = json.loads((out / model / "corners" / "ablation_topleft_unique" / "summary.json").read_text())
        assert summary["positions"] == "answer"
    for rel in ("corners/head_diff_stats_topleft", "corners/ablation_topleft_unique", "exp4"):  # each script's
        timing = json.loads((out / "llava" / rel / "run.json").read_text())["timing"]  # where its time went
        shared = {"ablations_sharing_forwards": 2} if "ablation" in rel else {}  # the corner's unique and shared
        assert timing.keys() - shared.keys() == {"items", "forward_seconds", "other_seconds"}, rel
        assert {key: timing[key] for key in shared} == shared and timing["items"] > 0, rel
        assert timing["forward_seconds"] > 0 and timing["other_seconds"] > 0, rel
    markdown = (out / "report" / "REPORT.md").read_text()
    assert "heads are ablated at the answer position alone (ABLATE_POSITIONS=answer, the study's default" in markdown
    assert "heads (L" in markdown and ") at the answer position lowers the full images' yes log-odds" in markdown


def test_the_failed_step_shows_in_the_report_with_the_end_of_its_log(study):
    page = _page(study["html"])
    assert f"{FAILING}: failed (exit 3)" in study["html"]
    assert any("forced failure" in text for text in page.pres)
    assert f"not finished: {FAILING}" in study["html"]
    assert "No results" not in study["html"].split('id="experiment-2"')[1].split('id="experiment-3"')[0]


def test_a_rerun_resumes_only_the_unfinished_step_and_other_settings_are_refused(study):
    out, env = study["out"], study["env"]
    refused = _run({**env, "COUNT": "5"}, timeout=120)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1].startswith(f"error: COUNT=5: {out} was run with COUNT=4")
    study["marker"].unlink()
    (out / "llava" / "exp2" / "summary.json").unlink()  # an output gone: its step runs again
    before = {p.name: json.loads(p.read_text()) for p in (out / "steps").glob("*.json")}
    again = _run({**env, "BATCH_SIZE": "2"})  # how fast a step runs is not what it computes: nothing redone for it
    assert again.returncode == 0, again.stderr[-3000:]
    after = {p.name: json.loads(p.read_text()) for p in (out / "steps").glob("*.json")}
    key, redone = FAILING.replace("/", "-") + ".json", "llava-exp2.json"
    assert after[key]["status"] == "ok" and after[key]["tries"] == 2
    assert after[redone]["status"] == "ok" and after[redone]["tries"] == 2
    assert (out / "llava" / "exp2" / "summary.json").is_file()
    assert {k: v for k, v in after.items() if k not in (key, redone)} == \
        {k: v for k, v in before.items() if k not in (key, redone)}
    assert again.stderr.count("finished earlier") == len(before) - 2
    log = (out / "logs" / key.replace(".json", ".log")).read_text()
    assert "forced failure" in log and "try 2" in log  # the failed try's output is kept
    html = (out / "report" / "index.html").read_text()
    assert "not finished" not in html and f"{FAILING}: failed" not in html


def test_an_interrupted_study_records_the_step_and_exits_130(tmp_path):
    stand_in = tmp_path / "python"
    # the data step's command runs a child of its own, as the sweep's bash runs Python: both must stop
    stand_in.write_text('#!/usr/bin/env bash\nif [[ "$*" == *generate_data.py* ]]; then sleep 301; exit 1; fi\n'
                        f'exec "{sys.executable}" "$@"\n')
    stand_in.chmod(0o755)
    env = {**os.environ, "MODELS": "llava", "MODEL_PATH_LLAVA": "tiny-random", "DATA_DIR": str(tmp_path / "data"),
           "OUT_DIR": str(tmp_path / "out"), "PYTHON": str(stand_in), "DEVICE": "cpu"}
    proc = subprocess.Popen(["bash", str(REPO / "run_study.sh")], env=env, stderr=subprocess.PIPE, text=True)
    record = tmp_path / "out" / "steps" / "data.json"
    deadline = time.monotonic() + 60
    while not record.is_file() and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert json.loads(record.read_text())["status"] == "interrupted"
    assert json.loads((tmp_path / "out" / "study.json").read_text())["status"] == "interrupted"
    assert "rerun the same command to resume" in err
    time.sleep(0.5)
    assert subprocess.run(["pgrep", "-f", "sleep 301"], capture_output=True).returncode == 1  # none left


def _wait_for(path: Path, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not path.is_file() and time.monotonic() < deadline:
        time.sleep(0.2)


def test_a_killed_study_stops_its_step_and_no_rerun_overlaps_one_that_lives_on(tmp_path):
    """SIGKILL of the study: the running step is sent SIGTERM by the kernel; a step process that survives it
    still holds the study's lock, so a rerun is refused (one line, exit 2) until it is gone."""
    stand_in, flag = tmp_path / "python", tmp_path / "deaf"
    # the data step: a process that stops on SIGTERM (as the Python scripts do), or while ``flag`` exists one
    # that ignores it and runs a child (as a bash step's Python child lives on when bash is stopped)
    stand_in.write_text('#!/usr/bin/env bash\nif [[ "$*" == *generate_data.py* ]]; then\n'
                        f'  touch "{tmp_path}/started"\n'
                        f'  if [ -e "{flag}" ]; then trap "" TERM; sleep 302; exit 1; fi\n'
                        '  exec sleep 302\n'
                        f'fi\nexec "{sys.executable}" "$@"\n')
    stand_in.chmod(0o755)
    env = {"MODELS": "llava", "MODEL_PATH_LLAVA": "tiny-random", "DATA_DIR": str(tmp_path / "data"),
           "OUT_DIR": str(tmp_path / "out"), "PYTHON": str(stand_in), "DEVICE": "cpu"}

    def start_and_kill() -> None:
        (tmp_path / "started").unlink(missing_ok=True)
        study = subprocess.Popen(["bash", str(REPO / "run_study.sh")], env={**os.environ, **env},
                                 stderr=subprocess.DEVNULL)
        _wait_for(tmp_path / "started")
        study.kill()
        study.wait(timeout=30)
        time.sleep(1)

    def alive() -> bool:
        return subprocess.run(["pgrep", "-f", "sleep 302"], capture_output=True).returncode == 0

    start_and_kill()  # a step that stops on SIGTERM: gone with the study
    assert not alive()
    flag.touch()
    start_and_kill()  # a step that ignores it: alive, and the folder stays the step's
    try:
        assert alive()
        rerun = _run(env, timeout=120)
        assert rerun.returncode == 2 and "another run (process" in rerun.stderr, rerun.stderr
        assert len(rerun.stderr.strip().splitlines()) == 1
    finally:
        subprocess.run(["pkill", "-KILL", "-f", "sleep 302"])
    time.sleep(0.5)
    flag.unlink()
    start_and_kill()  # the step gone, the folder is free again: a rerun starts
    assert not alive()


@pytest.mark.parametrize("settings, error", [
    ({"MODELS": "llava gpt4"}, "MODELS: 'gpt4' is not one of"),
    ({"MODELS": " "}, "MODELS is empty"),
    ({"MODELS": "llava llava"}, "a model is named twice"),
    ({"WORLDS": "0"}, "WORLDS=0: must be a whole number of 1 or more or 'all'"),
    ({"COUNT": "many"}, "COUNT=many: must be a whole number of 1 or more"),
    ({"CONTROL_SEEDS": "100000000"}, "CONTROL_SEEDS=100000000: at most 1000"),
    ({"CONTROLS": "yes"}, "CONTROLS=yes: must be 0 or 1"),
    ({"ABLATE": "2"}, "ABLATE=2: must be 0 or 1"),
    ({"DTYPE": "fp8"}, "DTYPE=fp8: must be one of"),
    ({"DEVICE": "tpu"}, "DEVICE=tpu:"),
    ({"MODEL_PATH_QWEN2": "./no/such/folder"}, "MODEL_PATH_QWEN2=./no/such/folder: no such folder"),
])
def test_bad_settings_are_refused_in_one_line(settings, error):
    with pytest.raises(OptionError, match=re.escape(error)):
        StudySettings.from_env({"DEVICE": "cpu", **settings})


def test_a_study_whose_controls_were_drawn_otherwise_is_refused(tmp_path):
    """A study folder from before the controls' weights came from transformers' init: its control results are
    other draws, which a rerun must not pool with new ones."""
    from spatial_attention.study.folder import STUDY_FILE
    from spatial_attention.study.study import StudySettings, check_study_folder

    environ = {"MODEL_PATH_LLAVA": "tiny-random", "MODEL_PATH_QWEN2": "tiny-random", "OUT_DIR": str(tmp_path / "out"),
               "DATA_DIR": str(tmp_path / "data")}
    settings = StudySettings.from_env(environ)
    settings.out_dir.mkdir()
    recorded = settings.recorded()
    (settings.out_dir / STUDY_FILE).write_text(json.dumps({"settings": recorded}))
    assert check_study_folder(settings)["settings"] == recorded  # the same settings resume
    del recorded["control_initialisation"]
    (settings.out_dir / STUDY_FILE).write_text(json.dumps({"settings": recorded}))
    with pytest.raises(OptionError, match="controls were drawn otherwise .* use another OUT_DIR"):
        check_study_folder(settings)
    assert check_study_folder(StudySettings.from_env({**environ, "CONTROLS": "0"}))  # no controls: nothing to mix


def test_a_folder_of_other_files_is_not_taken_for_a_study(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    done = _run({"OUT_DIR": str(tmp_path), "DEVICE": "cpu"}, timeout=120)
    assert done.returncode == 2 and "holds files but no study.json" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


# ----------------------------------------------------------------------------- the reading rules, planted numbers

def _write(path: Path, doc) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))


def _exp1_row(map_name, metric, **values):
    return {"map": map_name, "metric": metric, **values}


def _comparison(metric, model_mean, seed_means):
    diff = model_mean - float(np.mean(seed_means))
    return {"metric": metric, "control_mean": float(np.mean(seed_means)), "control_ci_lo": min(seed_means),
            "control_ci_hi": max(seed_means), "model_mean": model_mean, "seed_means": seed_means,
            "diff_mean": diff, "diff_pi_lo": diff - 0.01, "diff_pi_hi": diff + 0.01}


TIGHT = [0.01 + 0.0001 * k for k in range(19)]  # 19 initialisations, close together


def _plant_study(root: Path) -> Path:
    """Planted summaries of one model, every kind of reading: see the test below."""
    m = root / "llava"
    rows = [_exp1_row("subject_cross", "iou", mean_diff=0.12, ci_lo=0.08, ci_hi=0.16, p_value=1e-4),
            _exp1_row("object_cross", "iou", mean_diff=0.05, ci_lo=0.01, ci_hi=0.09, p_value=1e-3),
            _exp1_row("relation_cross", "iou", mean_diff=0.03, ci_lo=0.005, ci_hi=0.055, p_value=0.4),
            _exp1_row("subject_cross", "specificity_word_swap", real_mean=0.01, real_ci_lo=-0.02, real_ci_hi=0.04,
                      real_p_value=0.5),
            _exp1_row("object_cross", "specificity_word_swap", real_mean=-0.06, real_ci_lo=-0.09, real_ci_hi=-0.03,
                      real_p_value=1e-4),
            _exp1_row("subject_self_vit", "specificity_distance_matched", real_mean=0.2, real_ci_lo=0.1,
                      real_ci_hi=0.3, real_p_value=1e-4),
            _exp1_row("subject_self_lm", "specificity_iou", real_mean=0.3, real_ci_lo=0.2, real_ci_hi=0.4,
                      real_p_value=1e-6)]  # locality passes it: shown, not read
    _write(m / "exp1" / "summary.json", {"by_metric": rows})
    comparison = [_comparison("subject_cross/iou real-shuffled", 0.13, TIGHT),  # beyond every seed, far
                  _comparison("object_cross/iou real-shuffled", 0.05, [0.0] * 18 + [0.06]),  # one seed reaches it
                  _comparison("subject_self_vit/specificity_distance_matched", 0.2, [0.0, 0.01, 0.02]),  # 3 seeds
                  # beyond every seed, but upwards from below 0: the claim is "above 0", so no finding
                  _comparison("object_cross/specificity_word_swap", -0.06, [-1.0 - t for t in TIGHT])]
    _write(m / "exp1" / "control_comparison.json", {"rows": comparison})
    _write(m / "exp2" / "summary.json", {"all": {"symmetry_score": {"mean": -0.002, "ci_lo": -0.003, "ci_hi": -0.001,
                                                                    "p_value": 1e-4}}})
    _write(m / "exp2" / "control_comparison.json", {"rows": [  # differs from 0: sizes compared, |-0.002| > 0.0001
        _comparison("symmetry_score", -0.002, [0.0001 * (k % 5) * (-1) ** k for k in range(19)])]})
    for name, effect, lo, hi, p_drop, model_mean, sets in (
            ("ablation_topleft_unique", -9.8, -12.0, -7.5, 1e-3, -9.8, 1000),
            ("ablation_topleft_shared", -9.8, -12.0, -7.5, 1e-3, None, 1000),  # on the pairs it was found on
            ("ablation_topright_unique", -0.5, -1.5, 0.4, 1e-3, None, 1000),
            ("ablation_bottomleft_unique", -2.0, -3.0, -1.0, 0.4, 1.0, 100),
            ("ablation_bottomright_unique", -9.8, -12.0, -7.5, 0.25, None, 3),  # p_drop can only reach 1/4
            ("ablation_bottomright_shared", -9.8, -12.0, -7.5, 0.01, None, None)):
        _write(m / "corners" / name / "summary.json",
               {"heads": [{"layer": 1, "head": 2}], "metrics": {"log_odds_full": {
                   "effect": effect, "ci_lo": lo, "ci_hi": hi, "random_mean": -1.0, "p_drop": p_drop}},
                "pairs": {"held_out": name != "ablation_topleft_shared"},
                **({} if sets is None else {"random_controls": {"count": sets}})})
        if model_mean is not None:
            _write(m / "corners" / name / "control_comparison.json", {"rows": [
                _comparison("effect_log_odds_full", model_mean, [-0.1 - t for t in TIGHT])]})
    corners = m / "corners"
    significant = {"topleft": [{}] * 3, "topright": [{}] * 2, "bottomleft": [], "bottomright": [{}]}
    # bottomright: above 0.05 / 16 heads but below 0.05, so BH can still reject (it read untestable before)
    floors = {"topleft": 1e-5, "topright": 1e-5, "bottomleft": 0.125, "bottomright": 0.01}
    _write(corners / "count_shared_unique" / "summary.json",
           {"significant_heads": significant, "fdr": {"alpha": 0.05, "p_floor": floors}})
    for corner in significant:
        _write(corners / f"head_diff_stats_{corner}" / "meta.json", {"L": 4, "H": 4})
    for k in range(19):  # the initialisations' counts: at most 1, except one seed with 2 in topright
        counts = (k % 2, 2 if k == 0 else 1, 0, 0)
        _write(corners / "control_random_weights" / f"init_seed_{1000 + k}" / "count_shared_unique" / "summary.json",
               {"significant_heads": {c: [{}] * n for c, n in zip(significant, counts)}})
    return corners


def test_readings_follow_the_stated_rules_on_planted_numbers(tmp_path):
    """Planted summaries: a finding beyond every initialisation, one that an initialisation reaches, one with too
    few initialisations, a p above the family's threshold, an opposite sign, a size against sizes; an ablation
    that passes, one whose interval covers 0, one with a large p_drop, one with too few random sets and one whose
    sets are not recorded; significant-head counts testable, untestable, testable only at BH's largest threshold,
    and without a recorded floor. Every q is Benjamini-Hochberg over the report's tested readings."""
    corners = _plant_study(tmp_path)
    report.write_report(tmp_path)
    markdown = (tmp_path / "report" / "REPORT.md").read_text()
    recorded = json.loads((tmp_path / "report" / "readings.json").read_text())
    tested = [r for r in recorded["readings"] if r["q"] is not None]
    q, _ = benjamini_hochberg(np.array([r["p"] for r in tested]))
    assert [r["q"] for r in tested] == pytest.approx(q.tolist()) and recorded["m"] == len(tested) == 19

    def said(claim_end, reading):
        return re.search(re.escape(claim_end) + ": " + reading, markdown)

    shuffled = "than on a patch-shuffled image"
    assert said(shuffled, r"yes \(q=[0-9.e-]+\) \(real minus shuffled \+0\.120 \[\+0\.080, \+0\.160\]\); beyond "
                          r"random weights: yes \(q=")
    assert said(shuffled, r"yes \(q=[0-9.e-]+\) \(real minus shuffled \+0\.050 \[\+0\.010, \+0\.090\]\); beyond "
                          r"random weights: inconclusive \(q=[0-9.e-]+, but 1 of 19 initialisations reach the model\)")
    assert said(shuffled, r"inconclusive \(q=[0-9.]+\) \(real minus shuffled \+0\.030")
    assert "salience (the paper's test, not evidence of grounding): the subject word's" in markdown
    named = "names the other shape)"
    assert said(named, r"inconclusive \(q=[0-9.]+\) \(specificity_word_swap \+0\.010 \[-0\.020, "
                       r"\+0\.040\]\); no random-weights control was run\.")
    assert said(named, r"no \(the opposite\) \(q=[0-9.e-]+\) \(specificity_word_swap -0\.060 \[-0\.090, "
                       r"-0\.030\]\); beyond random weights: inconclusive \(q=[0-9.e-]+, but the model's own number is "
                       r"not on the claimed side\)")
    assert "specificity_iou: " not in markdown and "| subject_self_lm specificity_iou | +0.30 [+0.20, +0.40]" in markdown
    assert said("beyond the other shape's share", r"yes \(q=[0-9.e-]+\) \(specificity_distance_matched \+0\.20 \[\+0\.10, "
                r"\+0\.30\]\); beyond random weights: untestable with 3 initialisations \(the model beyond all of them "
                r"has rank p 1/4; 19 are needed\)")
    assert said("flips with the roles)", r"yes \(q=[0-9.e-]+\) \(symmetry_score -0\.0020 \[-0\.0030, -0\.0010\]\); "
                                         r"beyond random weights: yes")
    assert "heads are ablated at every position (ABLATE_POSITIONS=all, the paper's)" in markdown  # none recorded
    layers = "random heads of their layers"
    assert said(layers, r"yes \(q=[0-9.e-]+\) \(effect -9\.8 \[-12\.0, -7\.5\], random sets -1, p_drop 0\.001\); "
                        r"beyond random weights: yes \(q=")
    assert said(layers, r"inconclusive \(q=[0-9.e-]+, but the effect's interval reaches 0\) \(effect -0\.5")
    assert said("shared heads (L1.H2) lowers the full images' yes log-odds more than " + layers,
                r"untestable on the pairs its heads were found on \(--same-pairs, or made before the split\)")
    assert said(layers, r"inconclusive \(q=[0-9.]+\) \(effect -2\.0 \[-3\.0, -1\.0\], random sets -1, p_drop 0\.4\); "
                        r"beyond random weights: inconclusive \(q=1\)")
    assert said(layers, r"untestable with 3 random head sets \(p_drop cannot go below 1/4\)")
    assert said(layers, r"untestable \(the number of random head sets is not recorded\)")
    # experiment 3: more significant heads than every initialisation, one reached by a seed, a test no head
    # could pass, and one passing only at BH's largest threshold
    counted = "than in the random initialisations"
    assert said("topleft: more heads change their score significantly " + counted,
                r"yes \(q=[0-9.e-]+\) \(3 heads; random weights: 0, 1, 0,")
    assert said("topright: more heads change their score significantly " + counted,
                r"inconclusive \(q=[0-9.e-]+(, but 1 of 19 initialisations reach the model)?\) \(2 heads")
    assert said("bottomleft: more heads change their score significantly " + counted,
                r"untestable at this number of pairs \(0 heads; random weights: 0, 0,")
    # every initialisation found 0 heads: no spread to predict from, so the rank p (1/20) is the test's p, which
    # the family's correction does not let through
    assert said("bottomright: more heads change their score significantly " + counted, r"inconclusive \(q=")
    bottomright = next(r for r in recorded["readings"] if r["claim"].startswith("llava, bottomright: more heads"))
    assert bottomright["p"] == pytest.approx(1 / 20)
    # a floor that is not recorded counts as untestable, not as testable
    summary = json.loads((corners / "count_shared_unique" / "summary.json").read_text())
    del summary["fdr"]["p_floor"]["bottomright"]
    _write(corners / "count_shared_unique" / "summary.json", summary)
    markdown = report_blocks.render_markdown(*report.build(tmp_path)[:2])
    assert "llava, bottomright: more heads change their score significantly than in the random initialisations: " \
           "untestable (the analysis records no smallest possible p) (1 heads;" in markdown


def test_intervals_show_their_width_to_two_digits():
    assert report_readings.ci_format(0.08, 0.16) == "+.3f"
    assert report_readings.ci_format(-0.00014, 0.00004) == "+.5f"
    assert report_readings.ci_format(-12.0, -7.5) == "+.1f"
    assert report_readings.ci_format(1.0, 1.0) == "+.3f"


@pytest.mark.parametrize("damage", ["garbage", "cut in half"])
def test_a_summary_it_cannot_parse_is_named_and_its_readings_say_unreadable(tmp_path, damage, capsys):
    """Was: exit 0, no warning, "No results (the step did not finish)" beside a step that finished, and the step's
    readings gone from the report and from readings.json."""
    _plant_study(tmp_path)
    report.write_report(tmp_path)
    intact = json.loads((tmp_path / "report" / "readings.json").read_text())["readings"]
    summary = tmp_path / "llava" / "exp1" / "summary.json"
    text = summary.read_text()
    summary.write_text('{"a": [1, 2, garbage' if damage == "garbage" else text[:len(text) // 2])
    assert report.main([str(tmp_path)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"unreadable: {summary}: not valid JSON, damaged or cut off (")
    markdown = (tmp_path / "report" / "REPORT.md").read_text()
    named = "unreadable: llava/exp1/summary.json: " + err[0].split(": ", 2)[2]
    section = markdown.split("## Experiment 1")[1].split("## Experiment 2")[0]
    assert f"- {named}" in markdown and f"{named} (its readings below say unreadable)" in section
    assert "No results" not in section and "| subject_cross iou, real minus shuffled | unreadable |" in section
    recorded = json.loads((tmp_path / "report" / "readings.json").read_text())
    assert [r["claim"] for r in recorded["readings"]] == [r["claim"] for r in intact]
    exp1 = [r for r in recorded["readings"] if r["claim"].startswith("llava, subject_cross iou")]
    assert exp1 and all(r["reading"] == "unreadable (llava/exp1/summary.json)" and r["q"] is None for r in exp1)
    assert recorded["unreadable"] == {"llava/exp1/summary.json": named.split(": ", 2)[2]}


def test_every_file_the_report_reads_is_named_where_it_cannot_be_read(tmp_path):
    """A comparison, a step record and study.json, each damaged: each is named, never taken for one that is absent
    ("no random-weights control was run", "not run", "No study.json")."""
    _plant_study(tmp_path)
    _write(tmp_path / "study.json", {"settings": {"models": ["llava"]}, "steps": [
        {"key": "llava-exp1", "name": "llava/exp1", "title": "experiment 1"}]})
    (tmp_path / "steps").mkdir()
    (tmp_path / "steps" / "llava-exp1.json").write_bytes(b"\xff\xfe")
    (tmp_path / "llava" / "exp2" / "control_comparison.json").write_text("[]")
    _, _, unreadable = report.write_report(tmp_path)
    assert unreadable == {"llava/exp2/control_comparison.json": "holds a JSON list, not an object",
                          "steps/llava-exp1.json": "not UTF-8 text"}
    markdown = (tmp_path / "report" / "REPORT.md").read_text()
    assert "beyond random weights: unreadable (llava/exp2/control_comparison.json)" in markdown
    assert "| llava/exp1 | experiment 1 | unreadable |" in markdown
    assert "step records unreadable: llava/exp1" in markdown
    (tmp_path / "study.json").write_text('{"settings": ')
    assert "unreadable: study.json: not valid JSON" in report_blocks.render_markdown(*report.build(tmp_path)[:2])


def test_make_report_refuses_a_missing_folder(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "make_report.py"), str(tmp_path / "nope")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stderr.strip() == f"error: {tmp_path / 'nope'}: not a folder; give " \
                                                           "run_study.sh's OUT_DIR"


@pytest.mark.parametrize("content", [[], ["notes.txt", "llava/notes.txt"]])
def test_make_report_refuses_a_folder_without_a_study(tmp_path, content, capsys):
    """Was: exit 0 and an empty report."""
    for rel in content:
        _write(tmp_path / rel, "mine")
    with pytest.raises(SystemExit) as exit_info:
        report.main([str(tmp_path)])
    assert exit_info.value.code == 2 and capsys.readouterr().err.splitlines() == [
        f"error: {tmp_path}: holds no study (no study.json, and no model folder with results in exp1/, exp2/, exp4/, "
        "corners/); give run_study.sh's OUT_DIR"]
    assert not (tmp_path / "report").exists()


def test_make_report_refuses_a_folder_it_cannot_write_in_one_line(tmp_path, capsys):
    _plant_study(tmp_path)
    (tmp_path / "report").write_text("a file where the report's folder goes")
    with pytest.raises(SystemExit) as exit_info:
        report.main([str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and err.startswith(f"error: {tmp_path / 'report'}: cannot write the report there")
    assert "\n" not in err
