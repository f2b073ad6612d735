"""Experiment 1's maps and metrics for a whole batch of worlds at once, in torch on the device the recordings are on
(``stats/map_batch.py``), so that scoring a batch takes a few vectorised passes instead of some 1,500 small numpy
calls a world between two forwards. What is computed, and the records' keys and their order, are those of the
per-map definitions in ``stats/metrics.py`` applied map by map (docs/metrics.md); tests/test_world_metrics.py
holds this to that slow path.

Inputs are numbered as ``vlm_analysis.analyse_worlds`` feeds them: kind k (real, shuffled, ..., and the word-swap
input last) of world w is input ``k * n + w``.
"""
from __future__ import annotations

import numpy as np
import torch

from spatial_attention.data.shapeworld import RELATION_AXIS
from spatial_attention.stats import map_batch as B
from spatial_attention.stats import metrics as M

WORDS = ("subject", "object", "relation")  # the word maps, in the order of the recording's "cross" rows
SEEDS = ("subject", "object", "background")
SOURCES = {"lm": "image_self", "vit": "vision"}  # seed-map source -> its block in a recording
MAP_NAMES = tuple(f"{word}_cross" for word in WORDS) + tuple(f"{seed}_self_{source}" for source in SOURCES
                                                             for seed in SEEDS)
REGIONS = ("subject", "object", "subject_only", "object_only", "background", "entities")
# a map's role -> (its target mask, entity_only, background) for ``map_metrics`` (docs/metrics.md)
TARGETS = {"subject": ("subject", "subject_only", "background"), "object": ("object", "object_only", "background"),
           "relation": ("entities", "entities", "background"), "background": ("background", "background", "entities")}


def score_worlds(recordings: list[dict], word_rows: list[dict], seed_cells: list[np.ndarray], seeds: list[dict],
                 regions: list[dict], relations: list[str], image_positions: list[np.ndarray], kinds: list[str],
                 grid: tuple[int, int]) -> tuple[list[dict], list[dict]]:
    """Per world: its metrics by scored kind (every kind but the last, the word swap, whose maps only give the word
    maps' ``specificity_word_swap`` to "real"), and its maps by kind (numpy (gh, gw), None where undefined).
    ``recordings``: the engine's tensors of every input, all worlds on one ``grid``."""
    n, scored = len(regions), len(kinds) - 1
    device = recordings[0]["cross"].device
    maps, defined = input_maps(recordings, word_rows, seed_cells, seeds)
    region_masks = torch.as_tensor(np.stack([[r[name].ravel() for name in REGIONS] for r in regions]), device=device)
    flat, flat_defined = maps[:scored * n].flatten(0, 1), defined[:scored * n].flatten()
    flat = B.normalise(torch.where(flat_defined[:, None], flat, 1.0))
    scores = _map_scores(flat, region_masks, n, grid)
    relation_maps = flat.view(scored * n, len(MAP_NAMES), -1)[:, MAP_NAMES.index("relation_cross")]
    scores[M.RELATION_METRIC] = _relation_scores(relation_maps, regions, relations, scored, grid)
    scores[M.DISTANCE_MATCHED] = _distance_matched(recordings[:scored * n], seed_cells, regions, region_masks,
                                                   image_positions, grid)
    scores[M.WORD_SWAP] = _word_swap(maps, region_masks, n, grid)
    values = {name: (v.tolist(), d.tolist()) for name, (v, d) in scores.items()}
    is_defined = defined.cpu().numpy()
    metrics = [{kind: _kind_metrics(values, k * n + w, is_defined[k * n + w]) for k, kind in enumerate(kinds[:-1])}
               for w in range(n)]
    if "real" in kinds[:-1]:
        real = kinds.index("real")
        for w in range(n):
            for j, role in enumerate(M.SPECIFIC_ROLES):
                metrics[w]["real"][f"{role}_cross"][M.WORD_SWAP] = _value(values[M.WORD_SWAP], (real * n + w) * 2 + j)
    as_arrays = torch.where(defined[..., None], maps, torch.nan).view(*maps.shape[:2], *grid).cpu().numpy()
    shown = [{kind: {name: (as_arrays[k * n + w, j] if is_defined[k * n + w, j] else None)
                     for j, name in enumerate(MAP_NAMES)} for k, kind in enumerate(kinds)} for w in range(n)]
    return metrics, shown


def input_maps(recordings: list[dict], word_rows: list[dict], seed_cells: list[np.ndarray], seeds: list[dict]
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Every input's maps (inputs, len(MAP_NAMES), gh * gw) float64 and whether each is defined: the word maps (each
    caption row renormalised over the image, a word's sub-token rows averaged) and the seed maps (``seed_map`` of
    the seed cell's row of each block; undefined where the world has no such seed or nothing is left)."""
    device = recordings[0]["cross"].device
    cross = torch.cat([r["cross"] for r in recordings]).to(torch.float64)
    cross = cross / cross.sum(1, keepdim=True)
    counts = np.array([len(rows[word]) for rows in word_rows for word in WORDS])
    words = torch.zeros(len(counts), cross.shape[1], dtype=torch.float64, device=device).index_add_(
        0, torch.as_tensor(np.repeat(np.arange(len(counts)), counts), device=device), cross)
    words = words / torch.as_tensor(counts, dtype=torch.float64, device=device)[:, None]
    block_rows = torch.cat([r[block] for block in SOURCES.values() for r in recordings])
    starts = np.cumsum([0] + [len(cells) for cells in seed_cells] * len(SOURCES))[:-1].reshape(len(SOURCES), -1)
    picks, cells, present = [], [], []
    for i, (cells_i, seeds_i) in enumerate(zip(seed_cells, _every_input(seeds, len(recordings)))):
        for s in range(len(SOURCES)):
            for seed in (seeds_i[name] for name in SEEDS):
                picks.append(starts[s, i] + (0 if seed is None else np.searchsorted(cells_i, seed)))
                cells.append(0 if seed is None else seed)
                present.append(seed is not None)
    seed_maps, usable = B.seed_maps(block_rows[torch.as_tensor(picks, device=device)],
                                    torch.as_tensor(cells, device=device))
    usable &= torch.as_tensor(present, device=device)
    maps = torch.cat([words.view(len(recordings), len(WORDS), -1),
                      seed_maps.view(len(recordings), len(SOURCES) * len(SEEDS), -1)], 1)
    defined = torch.cat([torch.ones(len(recordings), len(WORDS), dtype=torch.bool, device=device),
                         usable.view(len(recordings), -1)], 1)
    return maps, defined


def _every_input(per_world: list, n_inputs: int) -> list:
    """A per-world list repeated for every input (kind k of world w is input k * n + w)."""
    return per_world * (n_inputs // len(per_world))


def _map_scores(maps: torch.Tensor, region_masks: torch.Tensor, n: int, grid) -> dict[str, B.Scores]:
    """``map_metrics`` and ``specificity`` of every map (rows: input-major, MAP_NAMES within), each against its
    role's targets (TARGETS; specificity: the map's own shape and the other one, read only for those roles)."""
    worlds = torch.arange(maps.shape[0], device=maps.device) // len(MAP_NAMES) % n
    roles = [name.split("_")[0] for name in MAP_NAMES]

    def masks(region_of_role) -> torch.Tensor:
        index = torch.as_tensor([REGIONS.index(region_of_role(role)) for role in roles], device=maps.device)
        return region_masks[worlds, index.repeat(maps.shape[0] // len(MAP_NAMES))]

    ranks = B.descending_ranks(maps)
    scores = B.map_metrics(maps, *(masks(lambda role, t=t: TARGETS[role][t]) for t in range(3)), grid, ranks)
    own = masks(lambda role: role if role in M.SPECIFIC_ROLES else "subject")
    other = masks(lambda role: M.SPECIFIC_ROLES.get(role, "subject"))
    return {**scores, **B.specificity(maps, own, other, grid, ranks)}


def _relation_scores(relation_maps: torch.Tensor, regions: list[dict], relations: list[str], scored: int,
                     grid) -> B.Scores:
    """The relation word's W1 to its relation target (``metrics.relation_target``) of every scored input."""
    n = len(regions)
    values = torch.zeros(len(relation_maps), dtype=torch.float64, device=relation_maps.device)
    defined = torch.zeros(len(relation_maps), dtype=torch.bool, device=relation_maps.device)
    for axis in ("x", "y"):
        targets = {}
        for w, (r, relation) in enumerate(zip(regions, relations)):
            first = M.first_along_axis(relation)
            if RELATION_AXIS[relation] == axis:
                targets[w] = M.relation_target(r[first], r[M.SPECIFIC_ROLES[first]], axis)
        rows = [k * n + w for k in range(scored) for w, g in targets.items() if g is not None]
        if not rows:
            continue
        g = torch.as_tensor(np.stack([targets[i % n] for i in rows]), device=relation_maps.device)
        index = torch.as_tensor(rows, device=relation_maps.device)
        values[index] = B.w1(B.marginals(relation_maps[index], grid, axis), g)
        defined[index] = True
    return values, defined


def _distance_matched(recordings: list[dict], seed_cells: list[np.ndarray], regions: list[dict],
                      region_masks: torch.Tensor, image_positions: list[np.ndarray], grid) -> B.Scores:
    """``distance_matched_specificity`` of the subject's and the object's seeds, from every cell of the shape, per
    scored input, source (SOURCES) and role (``metrics.SPECIFIC_ROLES``), in that order (input-major)."""
    n = len(regions)
    device = region_masks.device
    rows, cells, groups, order, causal = [], [], [], [], []
    for i, recording in enumerate(recordings):
        for source, block in SOURCES.items():
            for role in M.SPECIFIC_ROLES:
                shape_cells = np.flatnonzero(regions[i % n][role])
                rows.append(recording[block][torch.as_tensor(np.searchsorted(seed_cells[i], shape_cells),
                                                             device=device)])
                cells.append(shape_cells)
                groups.append(np.full(len(shape_cells), len(order)))
                order.append(image_positions[i] if source == "lm" else np.zeros(len(image_positions[i]), np.int64))
                causal.append(source == "lm")
    roles = [(REGIONS.index(role), REGIONS.index(other)) for role, other in M.SPECIFIC_ROLES.items()]
    worlds = np.repeat(np.arange(len(recordings)) % n, len(SOURCES) * len(roles))
    own, other = (torch.as_tensor(np.array([roles[g % len(roles)][t] for g in range(len(order))]), device=device)
                  for t in range(2))
    worlds = torch.as_tensor(worlds, device=device)
    return B.distance_matched_specificity(
        torch.cat(rows), torch.as_tensor(np.concatenate(cells), device=device),
        torch.as_tensor(np.concatenate(groups), device=device), region_masks[worlds, own], region_masks[worlds, other],
        region_masks[worlds, REGIONS.index("background")], torch.as_tensor(np.stack(order), device=device),
        torch.as_tensor(causal, device=device), grid)


def _word_swap(maps: torch.Tensor, region_masks: torch.Tensor, n: int, grid) -> B.Scores:
    """``word_swap_specificity`` of the subject's and the object's word maps of every scored input (input-major,
    then role), against the word-swap input (the last n) of its world."""
    scored = maps.shape[0] // n - 1
    roles = list(M.SPECIFIC_ROLES)
    named = maps[:scored * n, :len(roles)].flatten(0, 1)
    swapped = maps[scored * n:, :len(roles)].repeat(scored, 1, 1).flatten(0, 1)
    referent = region_masks[:, [REGIONS.index(role) for role in roles]].repeat(scored, 1, 1).flatten(0, 1)
    return B.minus(B.topk_iou(B.descending_ranks(B.normalise(named)), referent),
                   B.topk_iou(B.descending_ranks(B.normalise(swapped)), referent))


def _value(scores: tuple[list, list], index: int) -> float | None:
    values, defined = scores
    return values[index] if defined[index] else None


def _kind_metrics(values: dict, i: int, defined: np.ndarray) -> dict[str, dict]:
    """One scored input's metrics, keyed and ordered as the per-map path writes them."""
    result = {}
    for j, name in enumerate(MAP_NAMES):
        role = name.split("_")[0]
        names = M.METRIC_NAMES + (M.SPECIFICITY_METRICS if role in M.SPECIFIC_ROLES else ())
        row = i * len(MAP_NAMES) + j
        result[name] = {metric: _value(values[metric], row) if defined[j] else None for metric in names}
    result["relation_cross"][M.RELATION_METRIC] = _value(values[M.RELATION_METRIC], i)
    for s, source in enumerate(SOURCES):
        for r, role in enumerate(M.SPECIFIC_ROLES):
            result[f"{role}_self_{source}"][M.DISTANCE_MATCHED] = _value(
                values[M.DISTANCE_MATCHED], (i * len(SOURCES) + s) * len(M.SPECIFIC_ROLES) + r)
    return result
