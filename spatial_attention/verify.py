"""The self-check: the capture engine against the plain eager path, on the
user's own model and inputs.

It runs a few ShapeWorld scenes through both paths (``reference.verify``),
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

import torch

from spatial_attention.capture import CaptureRequest
from spatial_attention.errors import DataError, OptionError

log = logging.getLogger("spatial_attention")

# dtype -> (attention tolerance, logits tolerance relative to the largest |logit|)
TOLERANCES = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (1e-2, 5e-2), torch.float16: (5e-3, 2e-2)}


def verification_request(batch, layers: list[int]) -> CaptureRequest:
    """Every kind of recording the experiments use, for the given layers."""
    lays = batch.layouts
    return CaptureRequest(layers=layers, vision=True,
                          blocks={"cross": [(l.text_positions(), l.image_positions) for l in lays],
                                  "image_self": [(l.image_positions, l.image_positions) for l in lays]},
                          last_mass=[l.image_positions for l in lays])


def check(adapter, batch, request: CaptureRequest, attention_tol: float | None = None,
          logits_tol: float | None = None) -> tuple[dict, bool]:
    """Compare engine and eager on ``batch``; returns (report, passed)."""
    from spatial_attention.capture import plain_logits
    from spatial_attention.reference import verify

    default_attn, default_logits = TOLERANCES.get(adapter.dtype, TOLERANCES[torch.bfloat16])
    attention_tol = default_attn if attention_tol is None else attention_tol
    logits_tol = default_logits if logits_tol is None else logits_tol
    report = verify(adapter, batch, request)
    scale = float(plain_logits(adapter, batch).abs().max())
    report.update(attention_tolerance=attention_tol, logits_tolerance=logits_tol * scale,
                  dtype=str(adapter.dtype).replace("torch.", ""))
    passed = (max(report["max_abs_diff"].values()) <= attention_tol and report["argmax_agree"]
              and report["logits_max_abs_diff"] <= logits_tol * scale)
    report["passed"] = passed
    return report, passed


def log_report(report: dict) -> None:
    for name, diff in report["max_abs_diff"].items():
        log.info("verify: %-12s max |engine - eager| = %.3g (tolerance %.1g)", name, diff,
                 report["attention_tolerance"])
    log.info("verify: next-token logits max |engine - plain| = %.3g (tolerance %.3g), argmax agree: %s",
             report["logits_max_abs_diff"], report["logits_tolerance"], report["argmax_agree"])
    log.info("verify: %s", "PASSED" if report["passed"] else "FAILED")


def build_parser() -> argparse.ArgumentParser:
    from spatial_attention.cli import HelpFormatter, add_model_args

    parser = argparse.ArgumentParser(
        prog="verify_attention.py", formatter_class=HelpFormatter,
        description="Check that the attention-capture engine reproduces the plain eager attention "
                    "(output_attentions=True) and leaves the model's next-token logits unchanged. "
                    "Exits 1 when a difference exceeds the tolerance.")
    add_model_args(parser, None, feed_size="the family's")
    parser.add_argument("--data", type=Path, default=None,
                        help="ShapeWorld folder to take the scenes from (default: a few generated ones)")
    parser.add_argument("--samples", type=int, default=3, help="how many scenes (all in one batch)")
    parser.add_argument("--attention-tolerance", type=float, default=None,
                        help="largest allowed |engine - eager| on any recording (default by dtype: fp32 1e-4, "
                             "bf16 1e-2, fp16 5e-3)")
    parser.add_argument("--out", type=Path, default=None, help="also write the report as JSON here")
    return parser


def main(argv=None) -> int:
    from spatial_attention.cli import user_errors_exit
    from spatial_attention.options import ModelOptions, check_at_least
    from spatial_attention.runio import check_output_dir, setup_logging, write_json
    from spatial_attention.runloop import ProcessShare, load_run

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
        model = load_run(options, ProcessShare(options.device), vars(args), default_layers="all")
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
    from spatial_attention.generate import generate_shapeworld
    from spatial_attention.shapeworld import World, iter_worlds

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
