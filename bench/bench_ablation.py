"""Benchmark: the ablation's measurement (ablation.measure) against one whole forward per head set.

    python bench/bench_ablation.py --model qwen2 --pairs 30 --random-controls 100

On the ``tiny-random`` model (random weights, real architecture), for one chosen head set (two heads
in each layer from the second up) and --random-controls random sets from its layers, over --pairs counterfactual pairs (generated):

- ``engine``: ``measure``, as head_ablation.py runs each --heads spec (``measure_groups``, which shares the
  plain forward between a corner's specs): one plain forward per batch of pairs, which keeps
  the input of the lowest ablated layer, then only the layers from there up, --sets-per-forward head
  sets per forward (the batch repeated once per set);
- ``whole_forward``: the path before it: the whole model (vision encoder included) once per head set,
  timed on --slow-pairs pairs and scaled to --pairs.

Both give the same log-odds (checked on the slow path's pairs). One JSON object is printed and written
to bench/results/ablation-{model}-tiny-{device}.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from models import FAMILIES, load_adapter  # noqa: E402  (after the path)
from spatial_attention.data.counterfactual import read_pairs  # noqa: E402
from spatial_attention.data.generate import generate_counterfactual  # noqa: E402
from spatial_attention.engine.capture import plain_logits  # noqa: E402
from spatial_attention.experiments.ablation_heads import random_head_sets  # noqa: E402
from spatial_attention.experiments.ablation_measure import (HeadAblation, encode_pairs, hooked_logits,  # noqa: E402
                                                            log_odds, measure, yes_no_ids)

PROMPT = "Is there anything in the top left corner?"


def whole_forward(adapter, pairs, head_sets, answer_ids) -> tuple[np.ndarray, np.ndarray]:
    """The slow path: per batch, one plain forward and one whole forward per head set."""
    batch = encode_pairs(adapter, pairs, PROMPT)
    base = log_odds(plain_logits(adapter, batch), *answer_ids)
    ablated = np.stack([log_odds(hooked_logits(adapter, batch, HeadAblation(adapter, [heads]).for_batch(batch)),
                                 *answer_ids) for heads in head_sets])
    return base.reshape(len(pairs), 2), ablated.reshape(len(head_sets), len(pairs), 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=FAMILIES, default="qwen2")
    parser.add_argument("--pairs", type=int, default=30)
    parser.add_argument("--random-controls", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=1, help="pairs per batch (head_ablation.py's CPU default)")
    parser.add_argument("--sets-per-forward", type=int, default=8)
    parser.add_argument("--slow-pairs", type=int, default=2, help="pairs the whole-forward path is timed on")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    adapter = load_adapter(args.model, "tiny-random", device=args.device)
    folder = generate_counterfactual(Path(tempfile.mkdtemp(prefix="bench_pairs_")), count=args.pairs,
                                     corners=("topleft",))[0]
    pairs = read_pairs(folder)[:args.pairs]
    # two heads in each layer from the second up: enough other sets in these layers for 100 distinct random draws
    chosen = [(layer, head) for layer in range(1, adapter.num_layers) for head in (0, 1)]
    head_sets = [chosen] + random_head_sets(chosen, adapter.num_heads, args.random_controls, seed=0)
    answer_ids = yes_no_ids(adapter.tokenizer)

    measure(adapter, encode_pairs(adapter, pairs[:1], PROMPT), head_sets[:2], answer_ids)  # warm-up
    start = time.perf_counter()
    engine = [measure(adapter, encode_pairs(adapter, pairs[i:i + args.batch_size], PROMPT), head_sets, answer_ids,
                      sets_per_forward=args.sets_per_forward) for i in range(0, len(pairs), args.batch_size)]
    engine_seconds = time.perf_counter() - start

    slow_pairs = pairs[:args.slow_pairs]
    start = time.perf_counter()
    slow = [whole_forward(adapter, slow_pairs[i:i + args.batch_size], head_sets, answer_ids)
            for i in range(0, len(slow_pairs), args.batch_size)]
    slow_seconds = (time.perf_counter() - start) * len(pairs) / len(slow_pairs)
    engine_ablated = np.concatenate([a for _, a in engine], axis=1)[:, :len(slow_pairs)]
    slow_ablated = np.concatenate([a for _, a in slow], axis=1)
    result = {
        "model": args.model, "size": "tiny", "device": args.device, "pairs": len(pairs),
        "head_sets": len(head_sets), "chosen": chosen, "num_layers": adapter.num_layers,
        "batch_size": args.batch_size, "sets_per_forward": args.sets_per_forward,
        "machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}" if args.device == "cpu"
        else torch.cuda.get_device_name(),
        "engine_seconds": engine_seconds,
        "whole_forward_seconds_scaled": slow_seconds, "whole_forward_timed_on_pairs": len(slow_pairs),
        "speedup": slow_seconds / engine_seconds,
        "max_abs_diff_log_odds": float(np.abs(engine_ablated - slow_ablated).max()),
    }
    out = args.out or REPO / "bench" / "results" / f"ablation-{args.model}-tiny-{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
