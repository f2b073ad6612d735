"""The map metrics of ``metrics.py`` on a batch of maps at once, in torch on whatever device the maps are on.

Experiment 1 scores about forty maps a world; one vectorised pass per batch keeps that work from sitting
between two forwards. ``metrics.py`` stays the definition: tests/test_map_batch.py holds every function here to
it (top-k IoU exactly; the sums in float64 within 1e-9, their order of addition being torch's, not numpy's).

Maps are (N, gh * gw) rows in raster order, masks (N, gh * gw) bool. A metric comes back as (values, defined):
two (N,) tensors, ``defined`` False where ``metrics.py`` gives None (the value there is 0).
"""
from __future__ import annotations

import torch

from spatial_attention.stats.metrics import ZERO_TOL

Scores = tuple[torch.Tensor, torch.Tensor]  # (values (N,) float64, defined (N,) bool)


def normalise(maps: torch.Tensor) -> torch.Tensor:
    """Each row / its sum, float64; ValueError (as ``metrics.normalise``) where a row is not finite, has a negative
    value or sums to 0."""
    maps = maps.to(torch.float64)
    totals = maps.sum(1, keepdim=True)
    if bool((~torch.isfinite(maps)).any() | (maps < 0).any() | (totals <= 0).any()):
        raise ValueError("attention map: values must be finite and non-negative, and not all zero")
    return maps / totals


def _coordinates(grid: tuple[int, int], device) -> tuple[torch.Tensor, torch.Tensor]:
    """(gh * gw,) row and column of every cell, float64."""
    y, x = torch.meshgrid(torch.arange(grid[0], dtype=torch.float64, device=device),
                          torch.arange(grid[1], dtype=torch.float64, device=device), indexing="ij")
    return y.reshape(-1), x.reshape(-1)


def centres(weights: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, x) centre of mass of each row of non-negative ``weights`` (NaN where a row sums to 0)."""
    y, x = _coordinates(grid, weights.device)
    total = weights.sum(1)
    return (weights * y).sum(1) / total, (weights * x).sum(1) / total


def marginals(maps: torch.Tensor, grid: tuple[int, int], axis: str) -> torch.Tensor:
    """Each row's marginal on ``axis``: per column for 'x', per row for 'y'."""
    cells = maps.view(-1, *grid)
    if axis == "x":
        return cells.sum(1)
    if axis == "y":
        return cells.sum(2)
    raise ValueError(f"axis {axis!r}: must be 'x' or 'y'")


def w1(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Row-wise W1 on a unit-spaced grid: sum |CDF_p - CDF_q|."""
    return (p.cumsum(1) - q.cumsum(1)).abs().sum(1)


def descending_ranks(maps: torch.Tensor) -> torch.Tensor:
    """Each cell's place when its row is sorted by attention, highest first, equal values the lower raster index
    first (``metrics.topk_iou``'s order)."""
    order = torch.sort(maps, dim=1, descending=True, stable=True).indices
    places = torch.arange(maps.shape[1], device=maps.device).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, places)


def topk_iou(ranks: torch.Tensor, masks: torch.Tensor) -> Scores:
    """IoU of each mask with its map's k = |mask| cells of highest attention (``ranks``: ``descending_ranks``)."""
    k = masks.sum(1)
    top = ranks < k[:, None]
    return (top & masks).sum(1, dtype=torch.float64) / (top | masks).sum(1).clamp_min(1), k > 0


def com_distance(maps: torch.Tensor, masks: torch.Tensor, grid: tuple[int, int]) -> Scores:
    """Distance (patches) between each map's centre of mass and its mask's centroid."""
    (ay, ax), (my, mx) = centres(maps, grid), centres(masks.to(torch.float64), grid)
    defined = masks.any(1)
    return torch.where(defined, torch.hypot(ay - my, ax - mx), 0.0), defined


def soft_iou(maps: torch.Tensor, masks: torch.Tensor) -> Scores:
    inter = (maps * masks).sum(1)
    return inter / (1.0 + masks.sum(1) - inter), masks.any(1)


def wasserstein(maps: torch.Tensor, masks: torch.Tensor, grid: tuple[int, int], axis: str) -> Scores:
    """W1 (patches) between each map's marginal on ``axis`` and its normalised mask's."""
    defined = masks.any(1)
    weights = masks.to(torch.float64)
    weights = weights / weights.sum(1, keepdim=True).clamp_min(1)
    return w1(marginals(maps, grid, axis), marginals(weights, grid, axis)), defined


def entity_bg_ratio(maps: torch.Tensor, entity_only: torch.Tensor, background: torch.Tensor) -> Scores:
    """Mass on ``entity_only`` / mass on ``background``; undefined as in ``metrics.entity_bg_ratio``."""
    bg = (maps * background).sum(1)
    defined = entity_only.any(1) & (bg > ZERO_TOL)
    return torch.where(defined, (maps * entity_only).sum(1) / torch.where(defined, bg, 1.0), 0.0), defined


def dispersion(maps: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    y, x = _coordinates(grid, maps.device)
    ym, xm = centres(maps, grid)
    return (maps * ((y - ym[:, None]) ** 2 + (x - xm[:, None]) ** 2)).sum(1)


def entropy(maps: torch.Tensor) -> torch.Tensor:
    """-sum a log a, natural log, 0 log 0 = 0."""
    return -torch.special.xlogy(maps, maps).sum(1)


def map_metrics(maps: torch.Tensor, masks: torch.Tensor, entity_only: torch.Tensor, background: torch.Tensor,
                grid: tuple[int, int], ranks: torch.Tensor) -> dict[str, Scores]:
    """``metrics.map_metrics`` of every normalised row of ``maps`` against its target row of the masks, in
    ``metrics.METRIC_NAMES``'s order."""
    always = torch.ones(maps.shape[0], dtype=torch.bool, device=maps.device)
    return {"com": com_distance(maps, masks, grid), "iou": topk_iou(ranks, masks), "soft_iou": soft_iou(maps, masks),
            "wasserstein_x": wasserstein(maps, masks, grid, "x"), "wasserstein_y": wasserstein(maps, masks, grid, "y"),
            "entity_bg_ratio": entity_bg_ratio(maps, entity_only, background),
            "dispersion": (dispersion(maps, grid), always), "entropy": (entropy(maps), always)}


def minus(first: Scores, second: Scores) -> Scores:
    """first - second, defined where both are."""
    return first[0] - second[0], first[1] & second[1]


def specificity(maps: torch.Tensor, own: torch.Tensor, other: torch.Tensor, grid: tuple[int, int],
                ranks: torch.Tensor) -> dict[str, Scores]:
    """``metrics.specificity`` of every normalised row of ``maps``."""
    return {"specificity_iou": minus(topk_iou(ranks, own), topk_iou(ranks, other)),
            "specificity_soft_iou": minus(soft_iou(maps, own), soft_iou(maps, other)),
            "specificity_com": minus(com_distance(maps, other, grid), com_distance(maps, own, grid))}


def seed_maps(rows: torch.Tensor, seeds: torch.Tensor) -> Scores:
    """``metrics.seed_map`` of each row (N, n) at its seed cell (N,): (maps, defined); an undefined row is 0."""
    rows = rows.to(torch.float64).scatter(1, seeds[:, None], 0.0)
    totals = rows.sum(1, keepdim=True)
    defined = totals[:, 0] > 0
    return torch.where(defined[:, None], rows / torch.where(totals > 0, totals, 1.0), 0.0), defined


def distance_matched_specificity(rows: torch.Tensor, cells: torch.Tensor, groups: torch.Tensor, own: torch.Tensor,
                                 other: torch.Tensor, background: torch.Tensor, order: torch.Tensor,
                                 causal: torch.Tensor, grid: tuple[int, int]) -> Scores:
    """``metrics.distance_matched_specificity`` of several groups of seeds at once. Seed s: the attention row
    ``rows[s]`` of cell ``cells[s]``, pooled into group ``groups[s]``; per group (P of them): the ``own``,
    ``other`` and ``background`` masks (P, n), each cell's position in the sequence (``order``, (P, n)) and
    whether the attention is ``causal`` (a seed sees only the cells before it) or not (every cell but itself)."""
    n = rows.shape[1]
    device = rows.device
    a, usable = seed_maps(rows, cells)
    y, x = (c.to(torch.long) for c in _coordinates(grid, device))
    # each seed's cells by ring: the squared distance to the seed, numbered among the distances the grid has
    distances = (torch.arange(grid[0], device=device)[:, None] ** 2 + torch.arange(grid[1], device=device) ** 2)
    ring_numbers, ring_of = torch.unique(distances, return_inverse=True)
    rings = len(ring_numbers)
    ring = ring_of[(y - y[cells, None]).abs(), (x - x[cells, None]).abs()]  # (S, n)
    seen = torch.where(causal[groups, None], order[groups] < order[groups, cells][:, None],
                       torch.arange(n, device=device) != cells[:, None])
    bg = background[groups] & seen
    bg_count = torch.zeros(len(cells), rings, dtype=torch.float64, device=device).scatter_add_(1, ring, bg.double())
    bg_sum = torch.zeros_like(bg_count).scatter_add_(1, ring, a * bg)
    bg_mean = (bg_sum / bg_count.clamp_min(1)).gather(1, ring)
    bg_seen = (bg_count > 0).gather(1, ring)
    totals = torch.zeros(len(own), 2, 2, dtype=torch.float64, device=device)  # [own, other] x [observed, expected]
    for k, shape in enumerate((own, other)):
        matched = shape[groups] & seen & bg_seen & usable[:, None]
        seed_totals = torch.stack([(a * matched).sum(1), (bg_mean * matched).sum(1)], 1)
        totals[:, k].index_add_(0, groups, seed_totals)
    defined = (totals > 0).flatten(1).all(1)
    ratios = torch.where(defined[:, None, None], totals, 1.0)
    return torch.log(ratios[:, 0, 0] / ratios[:, 0, 1]) - torch.log(ratios[:, 1, 0] / ratios[:, 1, 1]), defined
