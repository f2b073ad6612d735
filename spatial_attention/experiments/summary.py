"""Experiment 1's summary: per map and metric, REAL vs patch-shuffled SHUF with the
paired difference, a bootstrap interval and a permutation p-value (metrics.md,
"Baseline"), over all worlds and per relation; written as JSON, CSV and two figures.
About 80 map x metric rows are tested per scope, so each row also gets a
Benjamini-Hochberg q-value within its scope (all worlds; each relation), and the
figures star by q.

Only numbers are kept while reading the records, so a summary of a large
``samples.jsonl`` streams it once.
"""
from __future__ import annotations

import csv
import io
import logging
import math
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
from matplotlib.figure import Figure

from spatial_attention.common.runio import write_atomic, write_json
from spatial_attention.data.shapeworld import RELATIONS
from spatial_attention.run.figures import save_figure
from spatial_attention.stats.inference import benjamini_hochberg, bootstrap_cis, mean_std, paired_permutation_ps
from spatial_attention.stats.metrics import BINDING_METRICS, CROSS_MAPS, HIGHER_IS_BETTER, MAPS, METRICS, display_order

log = logging.getLogger("spatial_attention")

CSV_COLUMNS = ("map", "metric", "relation", "better", "n", "n_null", "n_paired", "n_null_shuffled",
               "real_mean", "real_std", "real_ci_lo", "real_ci_hi",
               "shuffled_mean", "shuffled_std", "shuffled_ci_lo", "shuffled_ci_hi",
               "real_p_value", "mean_diff", "ci_lo", "ci_hi", "p_value", "q_value")
SIGNIFICANCE = 0.05  # q below this gets a star in the figures


@dataclass
class _Values:
    """One (map, metric, relation) cell: per world its real and shuffled value (NaN = null or absent)."""
    real: array = field(default_factory=lambda: array("d"))
    shuffled: array = field(default_factory=lambda: array("d"))
    n_null: int = 0           # real value recorded as null (e.g. relation_wasserstein undefined)
    n_null_shuffled: int = 0  # shuffled value recorded as null (records without "shuffled" not counted)

    def add(self, real, shuffled, has_shuffled: bool) -> None:
        r, s = _float(real), _float(shuffled)
        self.real.append(r)
        self.shuffled.append(s)
        self.n_null += math.isnan(r)
        self.n_null_shuffled += has_shuffled and math.isnan(s)

    def extend(self, other: _Values) -> None:
        self.real.extend(other.real)
        self.shuffled.extend(other.shuffled)
        self.n_null += other.n_null
        self.n_null_shuffled += other.n_null_shuffled


def _float(x) -> float:
    return math.nan if x is None else float(x)


def better(metric: str) -> str:
    return "higher" if metric in HIGHER_IS_BETTER else "lower"


def _rows(cells: list[tuple[str, str, _Values]], seed: int, n_boot: int, n_perm: int) -> list[dict]:
    """A summary row per (map, metric, values). n / real_* use every non-null real value, shuffled_* every
    non-null shuffled one; n_paired, mean_diff, ci_* and p_value only the worlds where both are non-null.
    real_p_value: the sign-flip p of the real mean = 0, for the binding metrics (None for the others). Every
    row's intervals and tests are drawn together (``bootstrap_cis``, ``paired_permutation_ps``): the same
    numbers as row by row, at a fraction of the draws."""
    samples = []  # per row: the real values, the shuffled values, the paired differences
    for _, _, v in cells:
        real, shuf = np.asarray(v.real), np.asarray(v.shuffled)
        paired = np.isfinite(real) & np.isfinite(shuf)
        samples.append((real[np.isfinite(real)], shuf[np.isfinite(shuf)], real[paired] - shuf[paired]))
    cis = iter(bootstrap_cis([x for sample in samples for x in sample], n_boot=n_boot, seed=seed))
    # a specificity's 0 means "no preference between the shapes": its own test, beside the shuffle's
    tested = [diff for _, _, diff in samples] + [real for (_, metric, _), (real, _, _) in zip(cells, samples)
                                                 if metric in BINDING_METRICS]
    p_values = paired_permutation_ps(tested, n_perm=n_perm, seed=seed)
    paired_p, real_p = iter(p_values[:len(cells)]), iter(p_values[len(cells):])
    rows = []
    for (map_name, metric, v), (real, shuf, diff) in zip(cells, samples):
        n, real_mean, real_std = mean_std(real)
        _, shuf_mean, shuf_std = mean_std(shuf)
        (real_lo, real_hi), (shuf_lo, shuf_hi), (ci_lo, ci_hi) = next(cis), next(cis), next(cis)
        rows.append({"map": map_name, "metric": metric, "better": better(metric), "n": n, "n_null": v.n_null,
                     "n_paired": int(diff.size), "n_null_shuffled": v.n_null_shuffled,
                     "real_mean": real_mean, "real_std": real_std, "real_ci_lo": real_lo, "real_ci_hi": real_hi,
                     "real_p_value": next(real_p) if metric in BINDING_METRICS else None,
                     "shuffled_mean": shuf_mean, "shuffled_std": shuf_std, "shuffled_ci_lo": shuf_lo,
                     "shuffled_ci_hi": shuf_hi, "mean_diff": float(diff.mean()) if diff.size else None,
                     "ci_lo": ci_lo, "ci_hi": ci_hi, "p_value": next(paired_p)})
    return rows


def add_q_values(rows: list[dict]) -> list[dict]:
    """Set each row's ``q_value``: Benjamini-Hochberg over the rows' p-values, i.e. over one
    scope's tests (None where the p-value is None; those rows do not count in m)."""
    p = np.array([np.nan if r["p_value"] is None else r["p_value"] for r in rows], dtype=np.float64)
    q, _ = benjamini_hochberg(p)
    for row, value in zip(rows, q):
        row["q_value"] = float(value) if np.isfinite(value) else None
    return rows


def significance_star(row: dict) -> str:
    """"*" when the row's BH q-value is below SIGNIFICANCE (not its raw p-value), else ""."""
    q = row.get("q_value")
    return "*" if q is not None and q < SIGNIFICANCE else ""


def summarise_samples(records: Iterable[dict], seed: int = 0, n_boot: int = 2000, n_perm: int = 10000) -> dict:
    """One pass over Experiment 1's records -> {"n_worlds", "n_worlds_shuffled", "n_worlds_by_relation",
    "by_metric": [rows over all worlds], "by_relation": {relation: [rows]}} (rows: see ``_rows``, plus
    ``q_value``: BH within the list the row is in)."""
    cells: dict[tuple[str, str, str], _Values] = {}
    n_worlds = n_shuffled = 0
    by_relation: dict[str, int] = {}
    for rec in records:
        relation = rec.get("relation") or "unknown"
        metrics = rec.get("metrics") or {}
        real, shuffled = metrics.get("real") or {}, metrics.get("shuffled")
        n_worlds += 1
        n_shuffled += shuffled is not None
        by_relation[relation] = by_relation.get(relation, 0) + 1
        for map_name, values in real.items():
            shuf_values = (shuffled or {}).get(map_name) or {}
            for metric, value in values.items():
                cell = cells.setdefault((map_name, metric, relation), _Values())
                cell.add(value, shuf_values.get(metric), shuffled is not None)

    maps = display_order((k[0] for k in cells), MAPS)
    metrics = display_order((k[1] for k in cells), METRICS)
    relations = display_order(by_relation, RELATIONS)

    def rows(rels: list[str]) -> list[dict]:
        scope = []
        for map_name in maps:
            for metric in metrics:
                merged = _Values()
                for rel in rels:
                    if (map_name, metric, rel) in cells:
                        merged.extend(cells[map_name, metric, rel])
                if len(merged.real):
                    scope.append((map_name, metric, merged))
        return add_q_values(_rows(scope, seed, n_boot, n_perm))

    summary = {"n_worlds": n_worlds, "n_worlds_shuffled": n_shuffled, "n_worlds_by_relation": by_relation,
               "by_metric": rows(relations), "by_relation": {rel: rows([rel]) for rel in relations}}
    log.info("summarised %d worlds (%d with a shuffled baseline), %d map/metric rows",
             n_worlds, n_shuffled, len(summary["by_metric"]))
    return summary


def write_summary(out_dir: Path, summary: dict, extra: dict) -> None:
    """``summary.json`` (the summary plus ``extra``, e.g. skipped counts) and ``summary.csv``
    (one row per map, metric and relation scope: "all" or a relation), both atomic."""
    out_dir = Path(out_dir)
    clash = set(summary) & set(extra)
    if clash:
        raise ValueError(f"extra keys {sorted(clash)} would overwrite summary fields")
    write_json(out_dir / "summary.json", {**summary, **extra})
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    scopes = [("all", summary["by_metric"])] + list(summary["by_relation"].items())
    for relation, rows in scopes:
        for row in rows:
            writer.writerow({k: "" if row.get(k) is None else row.get(k) for k in CSV_COLUMNS} | {"relation": relation})
    write_atomic(out_dir / "summary.csv", buf.getvalue())
    log.info("wrote %s and %s", out_dir / "summary.json", out_dir / "summary.csv")


def _err(rows: list[dict], prefix: str) -> np.ndarray:
    """Asymmetric error bars (2, n) from a row's ``{prefix}mean`` and ``{prefix}ci_lo/hi`` (0 when absent)."""
    lo = [r[prefix + "mean"] - r[prefix + "ci_lo"] if r[prefix + "ci_lo"] is not None else 0.0 for r in rows]
    hi = [r[prefix + "ci_hi"] - r[prefix + "mean"] if r[prefix + "ci_hi"] is not None else 0.0 for r in rows]
    return np.maximum(np.array([lo, hi]), 0.0)


def _panel_grid(n: int, ncols: int = 3, size: tuple[float, float] = (4.6, 3.4)) -> tuple[Figure, list]:
    nrows = max(1, math.ceil(n / ncols))
    ncols = min(ncols, max(n, 1))
    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows))
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel().tolist()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def _finish(fig: Figure, axes: list) -> None:
    """One legend for the figure, under the title, then a tight layout around both."""
    entries = {}  # label -> handle, first seen across all panels
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    top = 0.95
    if entries:
        fig.legend(list(entries.values()), list(entries), loc="upper center", ncol=len(entries), fontsize=9,
                   frameon=False, bbox_to_anchor=(0.5, 0.965))
        top = 0.94
    fig.tight_layout(rect=(0, 0, 1, top))


def _title(metric: str) -> str:
    return f"{metric} ({better(metric)} is better)"


def _plot_specificity(rows: list[dict], n_worlds: int, path: Path) -> None:
    """A panel per specificity metric: per subject/object map, the REAL and SHUF means with 95% bootstrap
    CIs around the zero line (above it: the map looks at its own referent more than at the other shape)."""
    metrics = [m for m in BINDING_METRICS if any(r["metric"] == m and r["real_mean"] is not None for r in rows)]
    if not metrics:
        return
    fig, axes = _panel_grid(len(metrics))
    for ax, metric in zip(axes, metrics):
        mrows = [r for r in rows if r["metric"] == metric and r["real_mean"] is not None]
        x = np.arange(len(mrows))
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.errorbar(x - 0.15, [r["real_mean"] for r in mrows], yerr=_err(mrows, "real_"), fmt="o",
                    color="tab:blue", capsize=3, label="real")
        srows = [(i, r) for i, r in enumerate(mrows) if r["shuffled_mean"] is not None]
        if srows:
            ax.errorbar([i + 0.15 for i, _ in srows], [r["shuffled_mean"] for _, r in srows],
                        yerr=_err([r for _, r in srows], "shuffled_"), fmt="s", color="tab:gray", capsize=3,
                        label="shuffled")
        ax.set_xticks(x, [r["map"].replace("_", " ") for r in mrows], rotation=40, ha="right", fontsize=8)
        ax.set_xlim(-0.6, len(mrows) - 0.4)
        ax.set_title(metric, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"Binding specificity, {n_worlds} worlds (mean, 95% bootstrap CI): own referent minus the other "
                 f"shape; above 0 = looks at its own shape more", fontsize=12)
    _finish(fig, axes)
    save_figure(fig, path)


def plot_summary(summary: dict, fig_dir: Path) -> None:
    """``real_vs_shuffled.png`` (a panel per metric: REAL and SHUF means with 95% bootstrap CIs per map,
    * where the row's q < 0.05, Benjamini-Hochberg within all worlds' rows), ``specificity.png`` (the binding
    specificity rows around zero) and ``metric_by_relation.png`` (a panel per metric: the cross maps' REAL
    means with 95% CIs per relation)."""
    fig_dir = Path(fig_dir)
    rows = summary["by_metric"]
    metrics = list(dict.fromkeys(r["metric"] for r in rows))
    fig, axes = _panel_grid(len(metrics))
    for ax, metric in zip(axes, metrics):
        mrows = [r for r in rows if r["metric"] == metric and r["real_mean"] is not None]
        x = np.arange(len(mrows))
        ax.errorbar(x - 0.15, [r["real_mean"] for r in mrows], yerr=_err(mrows, "real_"),
                    fmt="o", color="tab:blue", capsize=3, label="real")
        srows = [(i, r) for i, r in enumerate(mrows) if r["shuffled_mean"] is not None]
        if srows:
            ax.errorbar([i + 0.15 for i, _ in srows], [r["shuffled_mean"] for _, r in srows],
                        yerr=_err([r for _, r in srows], "shuffled_"), fmt="s", color="tab:gray", capsize=3,
                        label="shuffled")
        lo, hi = ax.get_ylim()
        ax.set_ylim(lo, hi + 0.12 * (hi - lo))  # headroom for the significance stars
        for i, r in enumerate(mrows):
            if significance_star(r):
                ax.annotate("*", (i, 0.99), xycoords=("data", "axes fraction"), ha="center", va="top", fontsize=13)
        ax.set_xticks(x, [r["map"].replace("_", " ") for r in mrows], rotation=40, ha="right", fontsize=8)
        ax.set_xlim(-0.6, len(mrows) - 0.4)
        ax.set_title(_title(metric), fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    n_tests = sum(r["p_value"] is not None for r in rows)
    fig.suptitle(f"Real vs patch-shuffled attention, {summary['n_worlds']} worlds (mean, 95% bootstrap CI; "
                 f"* q < {SIGNIFICANCE:g}, Benjamini-Hochberg within the {n_tests} map x metric tests)", fontsize=12)
    _finish(fig, axes)
    save_figure(fig, fig_dir / "real_vs_shuffled.png")
    _plot_specificity(rows, summary["n_worlds"], fig_dir / "specificity.png")

    relations = list(summary["by_relation"])
    cross = [m for m in CROSS_MAPS if any(r["map"] == m for r in rows)]
    fig, axes = _panel_grid(len(metrics))
    width = 0.8 / max(len(cross), 1)
    for ax, metric in zip(axes, metrics):
        for j, map_name in enumerate(cross):
            pts = [(i, r) for i, rel in enumerate(relations) for r in summary["by_relation"][rel]
                   if r["map"] == map_name and r["metric"] == metric and r["real_mean"] is not None]
            if pts:
                ax.errorbar([i - 0.4 + width * (j + 0.5) for i, _ in pts], [r["real_mean"] for _, r in pts],
                            yerr=_err([r for _, r in pts], "real_"), fmt="o", capsize=3,
                            label=map_name.replace("_", " "), color=f"C{j}")
        counts = summary.get("n_worlds_by_relation", {})
        ax.set_xticks(range(len(relations)), [f"{rel}\n(n={counts.get(rel, '?')})" for rel in relations], fontsize=8)
        ax.set_title(_title(metric), fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("Cross-attention maps by relation (real mean, 95% bootstrap CI)", fontsize=12)
    _finish(fig, axes)
    save_figure(fig, fig_dir / "metric_by_relation.png")
    log.info("wrote figures to %s", fig_dir)
