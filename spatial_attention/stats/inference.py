"""Numpy statistics for every summary: means, bootstrap intervals, paired sign-flip
permutation tests, a model against the distribution of its random initialisations,
Benjamini-Hochberg, and JSON-safe conversion.

Missing values (None, NaN, +-inf) are dropped wherever a function takes a sample.
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

# Random draws (matrix elements) per chunk, so that memory stays bounded for large samples: a few 4 MB
# arrays at a time, so that the end-of-run summary of 5,000 worlds peaks no higher than that of 1,000
# (bench/long_run_memory.py).
_CHUNK_ELEMENTS = 1 << 19


def _finite(x: Iterable[float | None] | np.ndarray) -> np.ndarray:
    """The finite values of x as a float64 vector (None, NaN and +-inf dropped)."""
    if isinstance(x, np.ndarray) and x.dtype != object:
        values = x.astype(np.float64).ravel()
    else:
        values = np.array([np.nan if v is None else v for v in np.ravel(np.asarray(x, dtype=object))],
                          dtype=np.float64)
    return values[np.isfinite(values)]


def mean_std(x: Iterable[float | None] | np.ndarray) -> tuple[int, float | None, float | None]:
    """(n, mean, sample std with ddof=1) of the finite values; mean None when n = 0, std None when n < 2."""
    v = _finite(x)
    n = int(v.size)
    mean = float(v.mean()) if n else None
    std = float(v.std(ddof=1)) if n >= 2 else None
    return n, mean, std


def bootstrap_ci(x: Iterable[float | None] | np.ndarray, n_boot: int = 2000, alpha: float = 0.05,
                 seed: int = 0) -> tuple[float | None, float | None]:
    """Percentile bootstrap (1 - alpha) interval of the mean: the alpha/2 and 1 - alpha/2
    quantiles of the means of ``n_boot`` resamples with replacement. (None, None) when n < 2."""
    return bootstrap_cis([x], n_boot=n_boot, alpha=alpha, seed=seed)[0]


def bootstrap_cis(samples: list, n_boot: int = 2000, alpha: float = 0.05,
                  seed: int = 0) -> list[tuple[float | None, float | None]]:
    """``bootstrap_ci`` of each sample, the same numbers: the resamples depend on the seed and the sample's size
    only, so they are drawn once per size and shared by every sample of that size (a summary's ~100 rows of one
    scope have one or two sizes; drawing them is most of the work)."""
    values = [_finite(x) for x in samples]
    out: list[tuple[float | None, float | None]] = [(None, None)] * len(values)
    for n, members in _by_size(values):
        if n < 2:
            continue
        rng = np.random.default_rng(seed)
        rows = max(1, _CHUNK_ELEMENTS // n)
        means = np.empty((len(members), n_boot))
        for start in range(0, n_boot, rows):
            resamples = rng.integers(0, n, size=(min(rows, n_boot - start), n))
            for row, i in enumerate(members):
                means[row, start:start + len(resamples)] = values[i][resamples].mean(axis=1)
        for row, i in enumerate(members):
            lo, hi = np.quantile(means[row], [alpha / 2, 1 - alpha / 2])
            out[i] = float(lo), float(hi)
    return out


def _by_size(values: list[np.ndarray]) -> list[tuple[int, list[int]]]:
    """The indices of ``values`` grouped by their length, in order of first appearance."""
    groups: dict[int, list[int]] = {}
    for i, v in enumerate(values):
        groups.setdefault(int(v.size), []).append(i)
    return list(groups.items())


def hierarchical_bootstrap_ci(values: np.ndarray, n_boot: int = 2000, alpha: float = 0.05,
                              seed: int = 0) -> tuple[float | None, float | None]:
    """Percentile bootstrap (1 - alpha) interval of the mean of ``values`` [groups, items] (NaN: missing),
    resampling the groups (e.g. random initialisations) with replacement, then the items (worlds, pairs)
    with replacement: an interval that covers the spread between groups as well as between items. With one
    group it is the items' bootstrap. (None, None) when fewer than 2 finite values."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2:
        raise ValueError(f"hierarchical_bootstrap_ci: values must be [groups, items], got shape {values.shape}")
    finite = np.isfinite(values)
    if finite.sum() < 2:
        return None, None
    groups, items = values.shape
    filled, counts = np.where(finite, values, 0.0), finite.astype(np.float64)
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    for b in range(n_boot):
        g = rng.integers(0, groups, size=groups) if groups > 1 else np.zeros(1, dtype=np.int64)
        i = rng.integers(0, items, size=items)
        total, count = filled[np.ix_(g, i)].sum(), counts[np.ix_(g, i)].sum()
        means[b] = total / count if count else np.nan
    means = means[np.isfinite(means)]
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


# The fewest initialisations for which the rank p, (1 + #{seeds at least as far}) / (K + 1), can reach 0.05.
RANK_MIN_SEEDS = 19


def against_initialisations(model: float, seeds: Iterable[float | None] | np.ndarray, alpha: float = 0.05) -> dict:
    """The model, one draw, against the distribution of K random initialisations' values of the same quantity
    (the unit that varies is the initialisation, so K, not the items, sets the evidence):

    - ``rank_p_above`` = (1 + #{seeds >= model}) / (K + 1), ``rank_p_below`` likewise with <=: exact and
      distribution-free if the model were one more initialisation; never below 1 / (K + 1);
    - ``diff`` = model - mean(seeds), with ``diff_pi_lo`` / ``diff_pi_hi`` = diff -+ t(K-1, 1 - alpha/2) s
      sqrt(1 + 1/K): it excludes 0 exactly when the model lies outside the (1 - alpha) prediction interval of
      one more initialisation (normal seeds assumed; K >= 2);
    - ``pred_p_above`` / ``pred_p_below``: the one-sided p-values of that prediction test (t with K - 1 degrees
      of freedom), which, unlike the rank p, can be small enough for a correction over many readings; the rank
      p where the seeds do not vary (a t of infinity would claim p = 0 from no spread at all).

    Values that are None or not finite are dropped; the fields that need more seeds are None."""
    from scipy import stats as scipy_stats  # here: scipy.stats takes a second to import, and few commands need it

    s = _finite(seeds)
    k = int(s.size)
    out = {"n_seeds": k, "seed_mean": float(s.mean()) if k else None,
           "rank_p_above": float((1 + np.count_nonzero(s >= model)) / (k + 1)),
           "rank_p_below": float((1 + np.count_nonzero(s <= model)) / (k + 1)),
           "diff": float(model - s.mean()) if k else None,
           "diff_pi_lo": None, "diff_pi_hi": None, "pred_p_above": None, "pred_p_below": None}
    if k >= 2:
        scale = float(s.std(ddof=1)) * math.sqrt(1 + 1 / k)
        half = float(scipy_stats.t.ppf(1 - alpha / 2, k - 1)) * scale
        if scale > 0:
            t = out["diff"] / scale
            above, below = float(scipy_stats.t.sf(t, k - 1)), float(scipy_stats.t.cdf(t, k - 1))
        else:  # identical seeds: no spread to predict from, so the rank p is all the evidence there is
            above, below = out["rank_p_above"], out["rank_p_below"]
        out.update(diff_pi_lo=out["diff"] - half, diff_pi_hi=out["diff"] + half, pred_p_above=above,
                   pred_p_below=below)
    return out


def signflip_is_exact(n: int, n_perm: int) -> bool:
    """Whether the sign-flip test of n pairs enumerates all 2**n sign vectors (2**n <= n_perm)."""
    return n < 63 and 2 ** n <= n_perm


def signflip_p_floor(n: int, n_perm: int) -> float:
    """The smallest p-value the sign-flip test can return: 2 / 2**n when exact (the all-plus and
    all-minus vectors always reach the observed statistic), else 1 / (n_perm + 1)."""
    return 2.0 / 2 ** n if signflip_is_exact(n, n_perm) else 1.0 / (n_perm + 1)


def signflip_method(n: int, n_perm: int) -> str:
    """One line naming how the sign-flip p-values of n pairs are computed, with their floor."""
    if signflip_is_exact(n, n_perm):
        return f"sign-flip, exact over all 2^{n} = {2 ** n} sign vectors, p >= 2/2^{n}"
    return f"sign-flip, Monte Carlo with n_perm = {n_perm} random sign vectors, p >= 1/(n_perm+1)"


def signflip_min_permutations(n_tests: int, alpha: float) -> int:
    """Random sign vectors that put the Monte Carlo floor 1/(n_perm + 1) 20x below alpha / m,
    Benjamini-Hochberg's smallest threshold over m = n_tests tests: ceil(20 m / alpha).
    With fewer, BH cannot reject unless many tests sit at the floor together."""
    # rounded first: 20 * 27 / 0.009 is 60000.00000000001 in floating point
    return max(1, math.ceil(round(20 * n_tests / alpha, 6)))


def _signflip_p(diff: np.ndarray, n_perm: int, seed: int) -> np.ndarray:
    """Two-sided sign-flip p-values of mean(diff[:, c]) = 0 for every column c of diff [N, C].

    Statistic |sum of diff| (equivalent to |mean|). Exact when 2**N <= n_perm: all 2**N
    sign vectors, p = share with a statistic >= the observed one. Otherwise n_perm random
    sign vectors (one set shared by all columns) and p = (count + 1) / (n_perm + 1).
    Ties are judged with a tolerance of 1e-12 * sum |diff| (rounding of reordered sums).
    """
    n, cells = diff.shape
    observed = np.abs(diff.sum(axis=0))
    reach = observed - 1e-12 * np.abs(diff).sum(axis=0)  # a sign vector counts when its |sum| >= reach
    exact = signflip_is_exact(n, n_perm)
    total = 2 ** n if exact else n_perm
    rng = np.random.default_rng(seed)
    rows = max(1, _CHUNK_ELEMENTS // max(n, cells))
    count = np.zeros(cells, dtype=np.int64)
    for start in range(0, total, rows):
        size = min(rows, total - start)
        if exact:
            codes = np.arange(start, start + size)[:, None]
            signs = 1.0 - 2.0 * ((codes >> np.arange(n)) & 1)
        else:
            signs = 1.0 - 2.0 * rng.integers(0, 2, size=(size, n))
        sums = signs @ diff
        np.abs(sums, out=sums)  # in place: [rows, C] is the loop's largest array
        count += np.count_nonzero(sums >= reach, axis=0)
    return count / total if exact else (count + 1) / (n_perm + 1)


def paired_permutation_p(diff: Iterable[float | None] | np.ndarray, n_perm: int = 10000, seed: int = 0) -> float | None:
    """Two-sided paired sign-flip permutation p-value of mean(diff) = 0 (see _signflip_p);
    None when there is no finite difference."""
    return paired_permutation_ps([diff], n_perm=n_perm, seed=seed)[0]


def paired_permutation_ps(samples: list, n_perm: int = 10000, seed: int = 0) -> list[float | None]:
    """``paired_permutation_p`` of each sample, the same numbers: the samples of one size are tested together
    (``_signflip_p``'s columns), with the one set of sign vectors each would draw alone."""
    values = [_finite(x) for x in samples]
    out: list[float | None] = [None] * len(values)
    for n, members in _by_size(values):
        if n == 0:
            continue
        p = _signflip_p(np.stack([values[i] for i in members], axis=1), n_perm, seed)
        for i, value in zip(members, p):
            out[i] = float(value)
    return out


def benjamini_hochberg(pvalues: np.ndarray, alpha: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """(q-values, reject) for p-values of any shape: q_(i) = min over j >= i of p_(j) * m / j
    (sorted ascending, capped at 1), reject = q <= alpha. NaN p-values are left out
    (q NaN, not rejected) and do not count in m."""
    p = np.asarray(pvalues, dtype=np.float64)
    flat = p.ravel()
    ok = np.flatnonzero(np.isfinite(flat))
    q = np.full(flat.shape, np.nan)
    if ok.size:
        order = ok[np.argsort(flat[ok], kind="stable")]
        m = ok.size
        scaled = flat[order] * m / np.arange(1, m + 1)
        q[order] = np.minimum(np.minimum.accumulate(scaled[::-1])[::-1], 1.0)
    q = q.reshape(p.shape)
    with np.errstate(invalid="ignore"):
        reject = q <= alpha
    return q, reject


def paired_signflip_test(full: np.ndarray, control: np.ndarray, n_perm: int = 2000, seed: int = 0) -> np.ndarray:
    """Two-sided paired sign-flip p-value of mean(full - control) = 0 for every cell of the
    trailing dimensions: full, control [N, ...] -> p [...] (see _signflip_p; every cell
    sees the same sign vectors). NaN where a cell has a non-finite difference."""
    full, control = np.asarray(full, dtype=np.float64), np.asarray(control, dtype=np.float64)
    if full.shape != control.shape or full.ndim < 1:
        raise ValueError(f"paired_signflip_test: shapes {full.shape} and {control.shape} must match, [N, ...]")
    diff = (full - control).reshape(full.shape[0], int(np.prod(full.shape[1:])))
    ok = np.isfinite(diff).all(axis=0)
    p = np.full(diff.shape[1], np.nan)
    if ok.any() and diff.shape[0] > 0:
        p[ok] = _signflip_p(diff[:, ok], n_perm, seed)
    return p.reshape(full.shape[1:])


def json_safe(obj):
    """obj with numpy scalars and arrays made Python (lists, int, float, bool), tuples made
    lists, and NaN / +-inf made None, recursively: JSON never holds NaN."""
    if isinstance(obj, dict):
        return {json_safe(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if isinstance(obj, np.generic):
        return json_safe(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
