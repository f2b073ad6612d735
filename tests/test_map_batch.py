"""The batched torch metrics (stats/map_batch.py) against their definitions, metrics.py applied map by map: top-k
IoU exactly, every sum within 1e-9 (torch adds in another order than numpy, so the last digits may differ)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from spatial_attention.stats import map_batch as B
from spatial_attention.stats import metrics as M

GRID = (6, 7)
TOL = dict(rel=1e-9, abs=1e-12)


def _maps_and_masks(n: int = 40, seed: int = 0):
    """Random maps (some with ties and zeros: equal values must rank by raster index) and random box-like masks,
    some empty (the metrics' None)."""
    rng = np.random.default_rng(seed)
    maps = rng.random((n, *GRID)) ** 3
    maps[::3] = np.round(maps[::3], 1)  # ties
    maps[1::5, :2] = 0.0
    masks = []
    for i in range(4 * n):
        mask = np.zeros(GRID, bool)
        if i % 7:
            r, c = rng.integers(0, GRID[0] - 1), rng.integers(0, GRID[1] - 1)
            mask[r:r + rng.integers(1, 4), c:c + rng.integers(1, 4)] = True
        masks.append(mask)
    return maps, np.array(masks).reshape(4, n, *GRID)


def _same(got: tuple, want: list) -> None:
    values, defined = (t.tolist() for t in got)
    assert defined == [w is not None for w in want]
    for value, ok, w in zip(values, defined, want):
        if ok:
            assert value == pytest.approx(w, **TOL)


def test_every_map_metric_equals_the_per_map_definition():
    maps, (mask, entity_only, background, _) = _maps_and_masks()
    flat = B.normalise(torch.as_tensor(maps.reshape(len(maps), -1)))
    as_t = [torch.as_tensor(m.reshape(len(m), -1)) for m in (mask, entity_only, background)]
    got = B.map_metrics(flat, *as_t, GRID, B.descending_ranks(flat))
    assert tuple(got) == M.METRIC_NAMES
    want = [M.map_metrics(a, m, e, b) for a, m, e, b in zip(maps, mask, entity_only, background)]
    for name in M.METRIC_NAMES:
        _same(got[name], [w[name] for w in want])
    assert got["iou"][0].tolist() == [w["iou"] or 0.0 for w in want]  # a ratio of counts: exactly


def test_specificity_and_word_swap_equal_the_per_map_definitions():
    maps, (own, other, _, _) = _maps_and_masks(seed=1)
    flat = B.normalise(torch.as_tensor(maps.reshape(len(maps), -1)))
    own_t, other_t = (torch.as_tensor(m.reshape(len(m), -1)) for m in (own, other))
    got = B.specificity(flat, own_t, other_t, GRID, B.descending_ranks(flat))
    want = [M.specificity(a, o, t) for a, o, t in zip(maps, own, other)]
    for name in M.SPECIFICITY_METRICS:
        _same(got[name], [w[name] for w in want])
    swapped = maps[::-1].copy()
    ranks = [B.descending_ranks(B.normalise(torch.as_tensor(m.reshape(len(m), -1)))) for m in (maps, swapped)]
    _same(B.minus(B.topk_iou(ranks[0], own_t), B.topk_iou(ranks[1], own_t)),
          [M.word_swap_specificity(a, s, o) for a, s, o in zip(maps, swapped, own)])


def test_relation_wasserstein_and_seed_maps_equal_the_per_map_definitions():
    maps, (first, second, _, _) = _maps_and_masks(seed=2)
    flat = B.normalise(torch.as_tensor(maps.reshape(len(maps), -1)))
    for axis in ("x", "y"):
        for i, (f, s) in enumerate(zip(first, second)):
            g = M.relation_target(f, s, axis) if f.any() and s.any() else None
            if g is not None:
                got = B.w1(B.marginals(flat[i:i + 1], GRID, axis), torch.as_tensor(g)[None])
                assert got.item() == pytest.approx(M.relation_wasserstein(maps[i], g, axis), **TOL)
    rows = maps.reshape(len(maps), -1)
    rows[3] = 0.0
    rows[3, 5] = 1.0  # nothing left once its own cell is removed: None
    seeds = np.arange(len(rows)) % rows.shape[1]
    seeds[3] = 5
    got, defined = B.seed_maps(torch.as_tensor(rows), torch.as_tensor(seeds))
    for row, seed, g, ok in zip(rows, seeds, got.numpy(), defined.tolist()):
        want = M.seed_map(row, int(seed))
        assert ok == (want is not None)
        if ok:
            np.testing.assert_allclose(g, want, rtol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
def test_distance_matched_specificity_equals_the_per_map_definition(causal):
    rng = np.random.default_rng(3)
    _, (own_masks, other_masks, _, _) = _maps_and_masks(n=12, seed=4)
    rows, cells, groups, order, wanted, own_list, other_list, background_list = [], [], [], [], [], [], [], []
    for g, (own, other) in enumerate(zip(own_masks, other_masks)):
        background = ~(own | other)
        positions = rng.permutation(own.size) + 10  # each cell's place in the sequence
        shape_cells = np.flatnonzero(own)
        seed_rows = rng.random((len(shape_cells), own.size)) ** 4
        wanted.append(M.distance_matched_specificity(seed_rows, shape_cells, own, other, background,
                                                     positions if causal else None))
        rows.append(seed_rows)
        cells.append(shape_cells)
        groups.append(np.full(len(shape_cells), g))
        order.append(positions)
        own_list.append(own.ravel())
        other_list.append(other.ravel())
        background_list.append(background.ravel())
    per_seed = [torch.as_tensor(np.concatenate(parts)) for parts in (rows, cells, groups)]
    per_group = [torch.as_tensor(np.stack(parts)) for parts in (own_list, other_list, background_list, order)]
    got = B.distance_matched_specificity(*per_seed, *per_group, torch.full((len(order),), causal), GRID)
    assert any(w is not None for w in wanted) and any(w is None for w in wanted)
    _same(got, wanted)


def test_normalise_refuses_what_the_definition_refuses():
    for bad in (np.full(GRID, np.nan), -np.ones(GRID), np.zeros(GRID)):
        with pytest.raises(ValueError):
            M.normalise(bad)
        with pytest.raises(ValueError):
            B.normalise(torch.as_tensor(bad.reshape(1, -1)))
