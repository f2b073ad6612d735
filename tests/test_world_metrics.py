"""Experiment 1's batched metrics (experiments/world_metrics.py, torch, on the recordings' device) against the
slow, obvious path they replaced: metrics.py applied map by map to numpy maps, kept here as the reference. Same
keys in the same order, the same None, top-k IoU exactly, every other value within 1e-9."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from spatial_attention.data.generate import generate_shapeworld
from spatial_attention.data.shapeworld import RELATION_AXIS, World, iter_worlds
from spatial_attention.engine.capture import capture
from spatial_attention.experiments import vlm_analysis as VA
from spatial_attention.stats import metrics as M


def _maps(recording: dict, rows: dict[str, np.ndarray], grid, seeds: dict, seed_cells: np.ndarray
          ) -> dict[str, np.ndarray | None]:
    """Word maps (rows renormalised over the image, sub-token rows averaged) and seed maps (the image blocks'
    rows are those of ``seed_cells``)."""
    cross = recording["cross"].astype(np.float64)
    cross = cross / cross.sum(1, keepdims=True)
    maps, start = {}, 0
    for name, positions in rows.items():
        maps[f"{name}_cross"] = cross[start:start + len(positions)].mean(0).reshape(grid)
        start += len(positions)
    lm = recording["image_self"].astype(np.float64)
    vit = recording["vision"].astype(np.float64)
    for source, seed_rows in (("lm", lm), ("vit", vit)):
        for name, seed in seeds.items():
            seed_map = None if seed is None else M.seed_map(seed_rows[np.searchsorted(seed_cells, seed)], seed)
            maps[f"{name}_self_{source}"] = None if seed_map is None else seed_map.reshape(grid)
    return maps


def _metrics(maps: dict, regions: dict, world: World) -> dict[str, dict]:
    """Every metric of every map against its target region (docs/metrics.md: what each map is scored against)."""
    targets = {"subject": (regions["subject"], regions["subject_only"], regions["background"]),
               "object": (regions["object"], regions["object_only"], regions["background"]),
               "relation": (regions["entities"], regions["entities"], regions["background"]),
               "background": (regions["background"], regions["background"], regions["entities"])}
    result = {}
    for name, a in maps.items():  # every map _maps made, in its order (the records' key order)
        role = name.split("_")[0]
        result[name] = ({metric: None for metric in M.METRIC_NAMES} if a is None
                        else M.map_metrics(a, *targets[role]))
        if role in M.SPECIFIC_ROLES:
            result[name].update({metric: None for metric in M.SPECIFICITY_METRICS} if a is None
                                else M.specificity(a, regions[role], regions[M.SPECIFIC_ROLES[role]]))
    rel = world.caption.relation
    axis = RELATION_AXIS[rel]
    first = M.first_along_axis(rel)
    second = "object" if first == "subject" else "subject"
    g = M.relation_target(regions[first], regions[second], axis)
    result["relation_cross"]["relation_wasserstein"] = (
        None if g is None else M.relation_wasserstein(maps["relation_cross"], g, axis))
    return result


def _add_distance_matched(metrics: dict, recording: dict, seed_cells: np.ndarray, regions: dict,
                          image_positions: np.ndarray) -> None:
    """The subject's and the object's seed maps gain their distance-matched specificity, read from the rows of
    every cell of their shape (language model and vision encoder). In the language model a seed sees, under the
    causal mask, only the cells whose tokens come before its own (``image_positions``: each cell's)."""
    for source, block, order in (("lm", "image_self", image_positions), ("vit", "vision", None)):
        rows = recording[block].astype(np.float64)
        for role, other in M.SPECIFIC_ROLES.items():
            cells = np.flatnonzero(regions[role])
            metrics[f"{role}_self_{source}"][M.DISTANCE_MATCHED] = M.distance_matched_specificity(
                rows[np.searchsorted(seed_cells, cells)], cells, regions[role], regions[other], regions["background"],
                order)


def slow_world_metrics(adapter, prepared, layers: list[int]) -> list[tuple[dict, dict]]:
    """Per world, its metrics by kind and its maps by kind, map by map in numpy (the per-world loop the batched
    path replaced)."""
    p = prepared
    recordings, _ = capture(adapter, p.batch, VA.world_request(layers, p.batch.layouts, p.word_rows, p.seed_cells))
    n, out = len(p.loaded), []
    for i, ((world, _), grid) in enumerate(zip(p.loaded, p.grids)):
        maps = {kind: _maps(recordings[k * n + i], p.word_rows[k * n + i], grid, p.seeds[i], p.seed_cells[k * n + i])
                for k, kind in enumerate(p.kinds)}
        metrics = {}
        for k, kind in enumerate(p.kinds[:-1]):
            metrics[kind] = _metrics(maps[kind], p.regions[i], world)
            _add_distance_matched(metrics[kind], recordings[k * n + i], p.seed_cells[k * n + i], p.regions[i],
                                  p.batch.layouts[k * n + i].image_positions)
        for role in M.SPECIFIC_ROLES:
            metrics["real"][f"{role}_cross"][M.WORD_SWAP] = M.word_swap_specificity(
                maps["real"][f"{role}_cross"], maps["swapped"][f"{role}_cross"], p.regions[i][role])
        out.append((metrics, maps))
    return out


def _close(got, want, where: str) -> None:
    if isinstance(want, dict):
        assert list(got) == list(want), where  # the records' key order too
        for key in want:
            _close(got[key], want[key], f"{where}/{key}")
    elif want is None:
        assert got is None, where
    elif where.endswith("/iou"):
        assert got == want, where
    else:
        assert got == pytest.approx(want, rel=1e-9, abs=1e-12), where


@pytest.mark.parametrize("baseline", [True, False])
def test_batched_metrics_equal_the_per_map_path(adapter, tmp_path, baseline):
    root = tmp_path / "sw"
    generate_shapeworld(root, shards=1, worlds_per_shard=5, seed=21)
    loaded = [(w, w.load_image()) for w in iter_worlds(root) if isinstance(w, World)]
    layers = list(range(adapter.num_layers))
    prepared = VA.prepare_worlds(adapter, loaded, seed=0, baseline=baseline)
    fast = VA.score_worlds(adapter, prepared, layers)
    slow = slow_world_metrics(adapter, prepared, layers)
    for (record, maps), (metrics, slow_maps) in zip(fast, slow):
        _close(record["metrics"], metrics, "metrics")
        for kind in prepared.kinds[:-1]:
            for name, want in slow_maps[kind].items():
                assert (maps[kind][name] is None) == (want is None), name
                if want is not None:
                    np.testing.assert_allclose(maps[kind][name], want, rtol=1e-9, atol=1e-15)


def _boxes(world: World, subject, obj) -> World:
    return replace(world, subject=replace(world.subject, bbox=subject), object=replace(world.object, bbox=obj))


def test_batched_metrics_equal_the_per_map_path_on_edge_cases_and_mixed_grids(adapter, tmp_path, monkeypatch):
    """Worlds where metrics are None (no background, one box inside the other, boxes on the same stretch of the
    relation's axis), single-cell shapes in the corners (a causal seed at cell 0), and for Qwen2-VL worlds of three
    token grids in one batch (scored one grid at a time)."""
    root = tmp_path / "sw"
    generate_shapeworld(root, shards=1, worlds_per_shard=6, seed=5)
    base = [w for w in iter_worlds(root) if isinstance(w, World)]
    worlds = [_boxes(base[0], (0.0, 0.0, 1.0, 1.0), (0.3, 0.3, 0.6, 0.6)),
              _boxes(base[1], (0.1, 0.1, 0.5, 0.5), (0.2, 0.2, 0.4, 0.4)),
              _boxes(base[2], (0.1, 0.1, 0.4, 0.9), (0.1, 0.5, 0.4, 0.95)),
              _boxes(base[3], (0.0, 0.0, 0.02, 0.02), (0.97, 0.97, 1.0, 1.0)), *base[4:]]
    loaded = [(w, w.load_image()) for w in worlds]
    if adapter.family == "qwen2":  # each picture fed at its own size: (8, 8), (6, 10) and (10, 6) token grids
        sizes = [(224, 224), (280, 168), (168, 280)]
        loaded = [(w, image.resize(sizes[i % 3])) for i, (w, image) in enumerate(loaded)]
        real = type(adapter).prepare_image
        monkeypatch.setattr(adapter, "feed_size", adapter.feed_size)

        def own_size(image):
            adapter.feed_size = (image.height, image.width)
            return real(adapter, image)

        monkeypatch.setattr(adapter, "prepare_image", own_size)
    layers = list(range(adapter.num_layers))
    prepared = VA.prepare_worlds(adapter, loaded, seed=3)
    assert len(set(prepared.grids)) == (3 if adapter.family == "qwen2" else 1)
    fast = VA.score_worlds(adapter, prepared, layers)
    slow = slow_world_metrics(adapter, prepared, layers)
    nones = set()
    for (record, maps), (metrics, slow_maps) in zip(fast, slow):
        _close(record["metrics"], metrics, "metrics")
        nones |= {metric for kinds in metrics.values() for by_map in kinds.values() for metric, v in by_map.items()
                  if v is None}
        for kind in prepared.kinds[:-1]:
            for name, want in slow_maps[kind].items():
                assert (maps[kind][name] is None) == (want is None), name
                if want is not None:
                    np.testing.assert_allclose(maps[kind][name], want, rtol=1e-9, atol=1e-15)
    assert {"com", "entity_bg_ratio", M.RELATION_METRIC} <= nones  # the edge cases were reached
