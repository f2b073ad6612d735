"""The model and data options every experiment's parser shares (checked in ``options.py``; the help layout
and how a script ends on an error are ``common/console.py``)."""
from __future__ import annotations

import argparse
from pathlib import Path

from spatial_attention.data.shapeworld import DEFAULT_SHAPEWORLD

DTYPES = ("auto", "bf16", "fp16", "fp32")  # the --dtype choices


def add_model_args(parser: argparse.ArgumentParser, family: str | None, feed_size: str | None = None) -> None:
    """The model options; ``--model`` (the family) too when the script is not one family's.
    ``feed_size``: what --feed-size defaults to, in words (None: the script feeds no images, so it has
    no --feed-size)."""
    from models import ADAPTERS, FAMILIES

    group = parser.add_argument_group("model")
    if family is None:
        group.add_argument("--model", required=True, choices=FAMILIES, help="model family")
    default = ADAPTERS[family].default_model_path if family else None
    group.add_argument("--model-path", default=default,
                       help="hub id or local checkpoint folder; 'tiny-random' builds a random-weight model of the "
                            "same architecture offline (smoke runs: its numbers mean nothing); 'random-7b' the "
                            "paper's 7B checkpoint's exact geometry with random weights ('random-7b:N': its first N "
                            "language-model and vision layers; random-7b:2 runs on a CPU); 'toy' loads the "
                            "family's committed toy model (models/toy/, small and trained: a positive control whose "
                            "numbers mean something, on any laptop)"
                            + ("" if default else "; default: the paper's checkpoint of --model ("
                               + ", ".join(f"{name}: {cls.default_model_path}" for name, cls in ADAPTERS.items())
                               + ")"))
    group.add_argument("--revision", default=None, help="hub revision (branch, tag or commit) to load")
    group.add_argument("--device", default="auto", help="'auto' (cuda when available, else cpu), 'cpu', 'cuda', 'cuda:1'")
    group.add_argument("--dtype", default="auto", choices=DTYPES,
                       help="'auto': bf16 on a GPU, fp32 on the CPU")
    group.add_argument("--device-map", default=None,
                       help="passed to from_pretrained (e.g. 'auto' shards the model over several GPUs)")
    group.add_argument("--batch-size", type=int, default=None,
                       help="worlds, caption pairs or image pairs per forward pass (each brings two inputs: "
                            "real + shuffled, sentence + counterfactual, full + control); default 8 on a GPU, "
                            "1 on the CPU")
    group.add_argument("--seed", type=int, default=0, help="seed for every random choice (shuffles, background seeds)")
    group.add_argument("--layers", default=None,
                       help="language-model layers to average: all, first_third, mid_third, last_third, last_K "
                            "(e.g. last_4), or 1-based numbers '1,5,30'")
    if feed_size is not None:
        chosen = ", ".join(f"{name} {cls.default_feed_size}" for name, cls in ADAPTERS.items() if cls.default_feed_size)
        fixed = ", ".join(name for name, cls in ADAPTERS.items() if cls.default_feed_size is None)
        group.add_argument("--feed-size", type=int, default=None,
                           help="the square side, in pixels, the image is resized to before the model, where the "
                                f"family lets it be chosen (default: {feed_size}, i.e. {chosen}); ignored by "
                                f"{fixed}, whose input size is fixed")
    group.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def add_shapeworld_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data")
    group.add_argument("--data", type=Path, default=DEFAULT_SHAPEWORLD,
                       help="ShapeWorld agreement/relational folder with shard0..shardK; the default folder is "
                            "generated offline (5 x 100 worlds) with a notice when it does not exist")
    group.add_argument("--shards", default=None, help="comma-separated shard numbers to read (default: all present)")
    group.add_argument("--limit", type=int, default=None, help="read at most this many worlds (after filtering)")
