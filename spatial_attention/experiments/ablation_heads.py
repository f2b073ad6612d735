"""Which heads an ablation removes (``head_ablation.py --heads``), and its null.

Head specs: ``shared`` (the analysis's shared head at its peak layer), ``unique`` (the stats dir corner's unique
head), ``top:K`` (the K cells of largest |mean(full - control)| score) or explicit ``LAYER.HEAD`` lists.

The null: ``--random-controls`` sets of as many heads, drawn (seeded) from the
same layers, per layer as many as were chosen there, from all of the layer's
heads (the chosen set is one possible draw, as a valid null needs); where no
more other sets exist than R, each is used once instead (an exact test).
"""
from __future__ import annotations

import itertools
import json
import logging
import math
import re
from collections import Counter
from pathlib import Path

import numpy as np

from spatial_attention.common.errors import DataError, OptionError
from spatial_attention.experiments.corner_results import CornerRun
from spatial_attention.experiments.heads import top_cells

log = logging.getLogger("spatial_attention")


Head = tuple[int, int]  # (layer, head), both 0-based


HEADS_HELP = ("shared: the analysis's shared head at its peak layer; unique: the stats dir corner's unique head "
              "at its peak layer; top:K: the K (layer, head) cells of largest |mean(full - control)| score in the "
              "stats dir; or LAYER.HEAD,... with layers 1-based and heads 0-based (e.g. 12.5,14.0)")


def parse_heads(spec: str, run: CornerRun, analysis_dir: Path) -> list[Head]:
    """The heads ``--heads spec`` names (see HEADS_HELP), 0-based and sorted."""
    if spec in ("shared", "unique"):
        return [_analysis_head(spec, run.corner, Path(analysis_dir))]
    if spec.startswith("top:"):
        return _top_heads(spec, run)
    return _explicit_heads(spec)


def _analysis_head(spec: str, corner: str, analysis_dir: Path) -> Head:
    path = analysis_dir / "summary.json"
    if not path.is_file():
        raise DataError(f"{path}: missing; --heads {spec} reads the summary of analyze_corner_heads.py "
                        "(give its out-dir with --analysis-dir)")
    try:
        summary = json.loads(path.read_text())
        if spec == "shared":
            head, layer = summary["shared_head"], summary["shared_head_layer"]
        else:
            head, layer = summary["unique_heads"][corner], summary["unique_head_layers"][corner]
        return int(layer) - 1, int(head)
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: not readable JSON ({err})") from None
    except (KeyError, TypeError) as err:
        raise DataError(f"{path}: no {spec} head for corner {corner!r} (missing {err})") from None


def _top_heads(spec: str, run: CornerRun) -> list[Head]:
    k = spec[len("top:"):]
    cells = run.full.shape[0] * run.full.shape[1]
    if not k.isdigit() or not 1 <= int(k) <= cells:
        raise OptionError(f"--heads {spec!r}: top:K needs a whole number K from 1 to the stats dir's "
                          f"{cells} (layer, head) cells, e.g. top:3")
    mean_diff = (run.full.astype(np.float64) - run.control).mean(-1)
    return sorted((run.layers[li] - 1, h) for li, h, _ in top_cells(mean_diff, int(k), by_abs=True))


def _explicit_heads(spec: str) -> list[Head]:
    heads = []
    for item in spec.split(","):
        match = re.fullmatch(r"\s*(\d+)\.(\d+)\s*", item)
        if not match:
            raise OptionError(f"--heads {spec!r}: {item.strip()!r} is not shared, unique, top:K or "
                              "LAYER.HEAD (layer 1-based, head 0-based, e.g. 12.5)")
        if int(match[1]) < 1:
            raise OptionError(f"--heads {spec!r}: {item.strip()!r}: layers are numbered from 1")
        heads.append((int(match[1]) - 1, int(match[2])))
    if len(set(heads)) < len(heads):
        raise OptionError(f"--heads {spec!r}: a head is listed twice")
    return sorted(heads)


def planned_heads(spec: str) -> tuple[list[int], int | None]:
    """Before the heads are found (a plan): how many heads ``--heads spec`` names in each of its layers, and its
    lowest layer where the spec says (explicit lists), else None. ``shared`` and ``unique`` name one head; ``top:K``
    is planned as one head in each of K layers (the most null sets)."""
    if spec.startswith("top:") and spec[len("top:"):].isdigit():
        return [1] * int(spec[len("top:"):]), None
    if spec in ("shared", "unique"):
        return [1], None
    heads = _explicit_heads(spec)
    return list(Counter(layer for layer, _ in heads).values()), min(layer for layer, _ in heads)


def check_heads(heads: list[Head], spec: str, num_layers: int | None, num_heads: int) -> None:
    """OptionError when a head lies outside the model (``num_layers`` None: its depth is unknown, so only
    the head numbers are checked)."""
    for layer, head in heads:
        if not ((num_layers is None or layer < num_layers) and 0 <= head < num_heads):
            shape = "" if num_layers is None else f"layers 1..{num_layers} and "
            raise OptionError(f"--heads {spec!r}: head {head_name((layer, head))} is outside the model's "
                              f"{shape}heads 0..{num_heads - 1}")


def check_heads_in_stats_model(heads: list[Head], spec: str, run: CornerRun) -> None:
    """``check_heads`` before the model loads, against the model that scored the stats dir (check_stats_model
    makes sure it is the one to be loaded): its heads per layer from meta.json, its depth from run.json, where
    head_attention_stats.py records the model (meta.json's layers are only the scored ones)."""
    try:
        depth = int(json.loads((run.folder / "run.json").read_text())["model"]["num_layers"])
    except (OSError, ValueError, KeyError, TypeError):
        depth = None  # the layers are checked once the model is loaded
    check_heads(heads, spec, depth, int(run.meta["H"]))


def head_name(head: Head) -> str:
    """'LAYER.HEAD', layer 1-based, head 0-based (as the reports write heads)."""
    return f"{head[0] + 1}.{head[1]}"


def heads_json(heads: list[Head]) -> list[dict]:
    return [{"layer": layer + 1, "head": head} for layer, head in heads]


def _possible_sets(per_layer, num_heads: int) -> int:
    """Head sets with ``per_layer`` heads in each of their layers (the chosen set among them)."""
    return math.prod(math.comb(num_heads, k) for k in per_layer)


def null_set_count(per_layer: list[int], num_heads: int, count: int) -> int:
    """How many null sets ``random_head_sets`` draws for a chosen set of ``per_layer`` heads in each of its layers."""
    return min(count, _possible_sets(per_layer, num_heads) - 1)


def random_head_sets(chosen: list[Head], num_heads: int, count: int, seed: int) -> list[list[Head]]:
    """The null sets: per layer of ``chosen``, as many heads drawn from all of that layer's heads, so that the
    chosen set is one possible draw (the p-value is then valid; drawing only from the other heads made it too
    small). ``count`` seeded random draws; or, where no more than ``count`` other sets exist, every set but
    the chosen one once: an exact test, p = (1 + sets at least as harmful) / (all sets)."""
    per_layer = Counter(layer for layer, _ in chosen)
    total = _possible_sets(per_layer.values(), num_heads)
    if total - 1 <= count:
        log.warning("only %d other head sets exist in these layers: each is used once instead of %d random "
                    "draws (an exact test; the smallest possible p is 1/%d)", total - 1, count, total)
        per_layer_sets = [[[(layer, h) for h in heads] for heads in itertools.combinations(range(num_heads), k)]
                          for layer, k in sorted(per_layer.items())]
        every = [sorted(head for part in combination for head in part)
                 for combination in itertools.product(*per_layer_sets)]
        return [heads for heads in every if heads != sorted(chosen)]
    rng = np.random.default_rng(seed)
    return [sorted((layer, int(h)) for layer, k in per_layer.items()
                   for h in rng.choice(num_heads, k, replace=False)) for _ in range(count)]
