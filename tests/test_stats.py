"""spatial_attention.stats.inference against hand-worked examples and planted effects."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from spatial_attention.stats.inference import (benjamini_hochberg, bootstrap_ci, bootstrap_cis, json_safe, mean_std,
                                               paired_permutation_p, paired_permutation_ps, paired_signflip_test,
                                               signflip_is_exact, signflip_method, signflip_min_permutations,
                                               signflip_p_floor)


def test_mean_std_ignores_missing():
    # [1, 3]: mean 2, sample std sqrt(((1-2)^2 + (3-2)^2) / 1) = sqrt(2)
    n, mean, std = mean_std([1.0, None, float("nan"), 3.0])
    assert (n, mean) == (2, 2.0) and std == pytest.approx(math.sqrt(2))
    assert mean_std([]) == (0, None, None)
    assert mean_std(np.array([5.0])) == (1, 5.0, None)


def test_bootstrap_ci_covers_the_mean_and_repeats():
    x = np.random.default_rng(0).normal(5.0, 1.0, size=50)
    lo, hi = bootstrap_ci(x, seed=1)
    assert lo < x.mean() < hi
    assert hi - lo == pytest.approx(2 * 1.96 / math.sqrt(50), rel=0.3)   # ~ normal-theory width for sd 1
    assert bootstrap_ci(x, seed=1) == (lo, hi)
    assert bootstrap_ci(x, seed=2) != (lo, hi)
    assert bootstrap_ci([1.0, None, 1.0, float("nan")]) == (1.0, 1.0)   # constant sample
    assert bootstrap_ci([3.0]) == (None, None)
    assert bootstrap_ci([]) == (None, None)


def test_permutation_p_small_for_a_clear_shift():
    diff = 1.0 + 0.1 * np.random.default_rng(0).normal(size=30)
    # no random sign vector reaches the observed sum: p = (0 + 1) / (10000 + 1)
    assert paired_permutation_p(diff, n_perm=10000, seed=0) == pytest.approx(1 / 10001)


def test_permutation_p_large_for_symmetric_noise():
    # exactly symmetric differences: observed mean 0, every sign vector reaches it -> p = 1
    assert paired_permutation_p([1.0, -1.0, 2.0, -2.0, 0.5, -0.5] * 4, n_perm=2000) == 1.0
    noise = np.random.default_rng(1).normal(size=40)
    assert paired_permutation_p(noise, n_perm=2000, seed=0) > 0.1
    assert paired_permutation_p([None, float("nan")]) is None


def test_permutation_p_exact_enumeration():
    # 2**4 = 16 <= n_perm: all sign vectors. diff [3, 1, 1, 1], observed |sum| = 6; only all + and
    # all - reach |sum| >= 6 (flipping any element gives at most 4) -> p = 2/16
    assert paired_permutation_p([3.0, 1.0, 1.0, 1.0], n_perm=10000) == 0.125
    # [2, 1, 1]: sums +-4, +-2, +-2, 0 (x2) -> |sum| >= 4 twice in 8 -> 0.25
    assert paired_permutation_p([2.0, 1.0, 1.0]) == 0.25
    # with n_perm < 16 it samples instead: p = (count + 1) / (n_perm + 1) with count <= n_perm
    p = paired_permutation_p([3.0, 1.0, 1.0, 1.0], n_perm=8, seed=0)
    assert p in [(c + 1) / 9 for c in range(9)]


def _bootstrap_one_draw(x, n_boot, seed):
    """The slow, obvious bootstrap: every resample of one sample drawn at once, its means' 2.5/97.5% quantiles."""
    v = np.array([np.nan if value is None else value for value in x], dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size < 2:
        return None, None
    resamples = np.random.default_rng(seed).integers(0, v.size, size=(n_boot, v.size))
    lo, hi = np.quantile(v[resamples].mean(axis=1), [0.025, 0.975])
    return float(lo), float(hi)


def _signflip_one_sample(x, n_perm, seed):
    """The slow, obvious sign-flip p of one sample: its own random sign vectors (or all of them), counted."""
    v = np.array([np.nan if value is None else value for value in x], dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return None
    if 2 ** v.size <= n_perm:
        signs = 1.0 - 2.0 * ((np.arange(2 ** v.size)[:, None] >> np.arange(v.size)) & 1)
    else:
        signs = 1.0 - 2.0 * np.random.default_rng(seed).integers(0, 2, size=(n_perm, v.size))
    reached = np.count_nonzero(np.abs(signs @ v) >= abs(v.sum()) - 1e-12 * np.abs(v).sum())
    return reached / len(signs) if 2 ** v.size <= n_perm else (reached + 1) / (n_perm + 1)


def test_batched_draws_equal_each_sample_alone():
    """bootstrap_cis and paired_permutation_ps share one draw between the samples of a size: the numbers must be
    those of each sample drawn alone (sizes 0 to 300: exact and Monte Carlo tests, chunked resamples)."""
    rng = np.random.default_rng(5)
    samples = [rng.normal(0.1, 1.0, size=n).tolist() for n in (100, 25, 100, 300, 0, 1, 2, 9, 25, 14, 100)]
    samples[2][3], samples[5] = None, [float("nan")]  # a null: size 99; nothing finite
    samples.append([1.0] * 40)  # constant
    assert bootstrap_cis(samples, n_boot=2000, seed=3) == [_bootstrap_one_draw(x, 2000, 3) for x in samples]
    assert [bootstrap_ci(x, seed=3) for x in samples] == [_bootstrap_one_draw(x, 2000, 3) for x in samples]
    assert paired_permutation_ps(samples, n_perm=10000, seed=3) == [_signflip_one_sample(x, 10000, 3)
                                                                      for x in samples]


def test_benjamini_hochberg_hand_example():
    # p sorted: .005 (rank 1), .01 (2), .03 (3), .04 (4); m = 4
    # p*m/rank: .02, .02, .04, .04; running min from the top: .02, .02, .04, .04
    q, reject = benjamini_hochberg(np.array([[0.01, 0.04], [0.03, 0.005]]), alpha=0.03)
    np.testing.assert_allclose(q, [[0.02, 0.04], [0.04, 0.02]])
    np.testing.assert_array_equal(reject, [[True, False], [False, True]])
    # [.01, .04, .045]: p*m/rank = .03, .06, .045 -> the min from above pulls .06 down to .045
    q, _ = benjamini_hochberg([0.01, 0.04, 0.045])
    np.testing.assert_allclose(q, [0.03, 0.045, 0.045])
    # q is capped at 1; NaN stays out of m
    q, reject = benjamini_hochberg([0.9, np.nan, 0.8])
    np.testing.assert_allclose(q, [0.9, np.nan, 0.9])
    assert not reject.any()


def test_signflip_test_finds_a_planted_effect():
    rng = np.random.default_rng(0)
    control = rng.normal(size=(40, 3, 4))
    full = control + rng.normal(size=(40, 3, 4))
    full[:, 1, 2] += 2.0
    p = paired_signflip_test(full, control, n_perm=2000, seed=0)
    assert p.shape == (3, 4)
    assert p[1, 2] == pytest.approx(1 / 2001)
    _, reject = benjamini_hochberg(p, alpha=0.05)
    assert reject.sum() == 1 and reject[1, 2]
    # one cell alone gives the same p as the scalar test with the same seed
    assert paired_permutation_p(full[:, 0, 0] - control[:, 0, 0], n_perm=2000, seed=0) == pytest.approx(p[0, 0])


def test_signflip_test_exact_and_noise():
    full = np.array([[2.0, 1.0], [1.0, -1.0], [1.0, 0.0]])   # N = 3, two cells
    p = paired_signflip_test(full, np.zeros_like(full), n_perm=2000)
    # cell 0: [2, 1, 1] -> 0.25 (see the exact test above); cell 1: [1, -1, 0] -> observed 0 -> 1
    np.testing.assert_allclose(p, [0.25, 1.0])
    noise = np.random.default_rng(3).normal(size=(30, 8, 8))
    _, reject = benjamini_hochberg(paired_signflip_test(noise, np.zeros_like(noise), n_perm=1000, seed=0))
    assert not reject.any()


def test_signflip_test_head_grid_size():
    # LLaVA-1.5-7B's head grid (32 x 32) and 100 pairs with 2000 random sign vectors: shape and floor
    rng = np.random.default_rng(0)
    full, control = rng.random((100, 32, 32)), rng.random((100, 32, 32))
    p = paired_signflip_test(full, control, n_perm=2000, seed=0)
    assert p.shape == (32, 32) and np.all((p >= 1 / 2001) & (p <= 1))


def test_signflip_min_permutations_for_the_7b_head_grids():
    # ceil(20 m / alpha): the floor 1/(n_perm + 1) lies 20x below BH's smallest threshold alpha / m
    assert signflip_min_permutations(28 * 28, 0.05) == 313600   # Qwen2-VL-7B
    assert signflip_min_permutations(32 * 32, 0.05) == 409600   # LLaVA-1.5-7B
    assert signflip_min_permutations(784, 0.01) == 1568000
    assert signflip_min_permutations(27, 0.009) == 60000        # not 60001 from float noise
    for m in (12, 784, 1024):
        n_perm = signflip_min_permutations(m, 0.05)
        assert signflip_p_floor(100, n_perm) < 0.05 / (20 * m)


def test_signflip_floor_and_method():
    assert signflip_is_exact(10, 1024) and not signflip_is_exact(11, 1024) and not signflip_is_exact(100, 10**30)
    assert signflip_p_floor(10, 1024) == 2 / 1024     # all-plus and all-minus always reach the observed sum
    assert signflip_p_floor(11, 1024) == 1 / 1025
    assert signflip_method(3, 2000) == "sign-flip, exact over all 2^3 = 8 sign vectors, p >= 2/2^3"
    assert signflip_method(30, 2000) == ("sign-flip, Monte Carlo with n_perm = 2000 random sign vectors, "
                                         "p >= 1/(n_perm+1)")
    # the exact floor is reached: four equal positive differences
    assert paired_permutation_p([1.0, 1.0, 1.0, 1.0], n_perm=16) == signflip_p_floor(4, 16)


def test_json_safe():
    obj = {"a": np.float64("nan"), "b": [np.int64(3), float("inf")], "c": np.array([1.0, np.nan]),
           np.int64(2): (np.bool_(True), np.float32(0.5)), "d": {"e": -np.inf, "f": "text", "g": None}}
    got = json_safe(obj)
    assert got == {"a": None, "b": [3, None], "c": [1.0, None], 2: [True, 0.5],
                   "d": {"e": None, "f": "text", "g": None}}
    assert type(got["b"][0]) is int and type(got[2][0]) is bool and type(got[2][1]) is float
    json.dumps(got, allow_nan=False)
