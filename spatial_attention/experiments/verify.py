"""The self-check: the capture engine against the plain eager path, on the
user's own model and inputs.

It runs a few ShapeWorld scenes through both paths (``reference.check``),
prints the largest absolute difference of every recording and of the
next-token logits against a plain forward, and fails when they disagree beyond
the tolerance of the dtype (bf16 eager attention rounds probabilities to 8
mantissa bits, so its tolerance is wider than fp32's).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import tempfile
from pathlib import Path

from spatial_attention.common.errors import DataError, OptionError
from spatial_attention.engine.reference import check, log_report, verification_request

log = logging.getLogger("spatial_attention")

def build_parser() -> argparse.ArgumentParser:
    from spatial_attention.common.console import command_parser
    from spatial_attention.run.cli import add_model_args

    parser = command_parser(
        "verify_attention.py",
        "Check that the attention-capture engine reproduces the plain eager attention "
        "(output_attentions=True) and leaves the model's next-token logits unchanged. "
        "Exits 1 when a difference exceeds the tolerance.")
    add_model_args(parser, None, feed_size="the family's")
    parser.add_argument("--data", type=Path, default=None,
                        help="ShapeWorld folder to take the scenes from (default: a few generated ones)")
    parser.add_argument("--samples", type=int, default=3, help="how many scenes (all in one batch)")
    parser.add_argument("--attention-tolerance", type=float, default=None,
                        help="largest allowed difference on any recording: in fp32 |engine - eager| (default "
                             "1e-4); in bf16 / fp16, of the maps renormalised over the image tokens, each row's relative "
                             "to that row's largest value (default 5e-2 / 1e-2)")
    parser.add_argument("--out", type=Path, default=None, help="also write the report as JSON here")
    return parser


def main(argv=None) -> int:
    from spatial_attention.common.console import check_at_least, user_errors_exit
    from spatial_attention.common.runio import check_output_dir, setup_logging, write_json
    from spatial_attention.run.options import ModelOptions
    from spatial_attention.run.runloop import join_processes, load_run

    @user_errors_exit
    def run() -> int:
        args = build_parser().parse_args(argv)
        setup_logging(args.verbose)
        options = ModelOptions.from_args(args.model, args)  # everything that can be judged before the model loads
        check_at_least(1, samples=args.samples)
        tolerance = args.attention_tolerance
        if tolerance is not None and not (math.isfinite(tolerance) and tolerance > 0):
            raise OptionError(f"--attention-tolerance {tolerance}: must be a positive number (e.g. 1e-4)")
        if args.out is not None:
            if args.out.is_dir():
                raise OptionError(f"--out {args.out}: is a folder; give a file name for the JSON report")
            check_output_dir(args.out.parent, "--out")
        worlds = _scenes(args.data, args.samples, args.seed)
        images = [w.load_image() for w in worlds]
        options, share = join_processes(options)
        model = load_run(options, share, vars(args), out=None, default_layers="all")
        batch = model.adapter.encode([w.caption.text for w in worlds], images)
        report, passed = check(model.adapter, batch, verification_request(batch, list(model.layers)),
                               args.attention_tolerance)
        log_report(report)
        if args.out:
            write_json(args.out, report)
        print(json.dumps(report))
        return 0 if passed else 1

    return run()


def _scenes(data: Path | None, n: int, seed: int) -> list:
    from spatial_attention.data.generate import generate_shapeworld
    from spatial_attention.data.shapeworld import World, iter_worlds

    if data is None:
        data = Path(tempfile.mkdtemp(prefix="verify_scenes_"))
        generate_shapeworld(data, shards=1, worlds_per_shard=n, seed=seed)
    worlds = []
    for item in iter_worlds(data, limit=n):
        if isinstance(item, World):
            worlds.append(item)
        else:
            log.warning("skipping: %s", item.reason)
    if not worlds:
        raise DataError(f"--data {data}: no usable ShapeWorld scene (see the warnings above)")
    return worlds
