"""``train_toy_vlm.py``: train a toy VLM with its known circuit (``toy_circuit.train``), or read the committed
one: ``--evaluate DIR`` (its yes/no answers on a folder) or ``--circuit`` (its trained heads' probes). The toy's
architecture, tasks and data are ``toy.py``; the model card is models/toy/README.md.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np

from spatial_attention.common.console import check_at_least, command_parser, user_errors_exit
from spatial_attention.common.errors import DataError, OptionError
from spatial_attention.common.runio import check_output_dir, run_record, setup_logging, write_json
from spatial_attention.data.counterfactual import corner_prompt, read_pairs
from spatial_attention.data.shapeworld import (FLIPPED_RELATION, format_caption, list_shards, load_rgb, parse_caption,
                                               read_shard)
from spatial_attention.experiments import toy_circuit
from spatial_attention.experiments.toy import (HELD_OUT, TASK_SHARE, TASKS, TOY_SHAPES, Sample, accuracy, build_toy,
                                               held_out)
from spatial_attention.run import controls

log = logging.getLogger("spatial_attention")


# --- evaluating on a folder -------------------------------------------------------------------

def folder_samples(path: Path) -> tuple[str, list[Sample], list[Sample]]:
    """(task, samples, swapped) of a ShapeWorld-format folder (agreement, from agreement.txt; ``swapped``:
    its true captions with the relation swapped, every one false) or a corner data set folder (its full
    images should be 'yes', its controls 'no'; nothing swapped)."""
    path = Path(path)
    if (path / "metadata.jsonl").is_file():
        pairs = read_pairs(path)
        corners = {pair.corner for pair in pairs}
        if len(corners) != 1:
            raise DataError(f"--evaluate {path}: pairs of several corners ({', '.join(sorted(corners))})")
        question = corner_prompt(corners.pop())
        samples = []
        for pair in pairs:
            samples += [Sample(question, load_rgb(pair.full_image), True),
                        Sample(question, load_rgb(pair.control_image), False)]
        return "corner", samples, []
    if not list_shards(path):
        raise DataError(f"--evaluate {path}: neither a corner data set (metadata.jsonl) nor a ShapeWorld folder "
                        f"(shard*/); point it at data/dataset_{{corner}} or an agreement/relational folder")
    samples = []
    for shard in list_shards(path):
        shard_dir = path / f"shard{shard}"
        captions, agreements, _ = read_shard(shard_dir, agreement_only=True)  # agreement.txt: the truth
        samples += [Sample(caption, load_rgb(shard_dir / f"world-{index}.png"), agreement == 1.0)
                    for index, (caption, agreement) in enumerate(zip(captions, agreements))]
    swapped = [Sample(swap_relation(s.text), s.image, False) for s in samples if s.answer]
    return "agreement", samples, swapped


def swap_relation(text: str) -> str:
    """The caption with its relation word swapped (above/below, left/right): false where it was true."""
    caption = parse_caption(text)
    return format_caption(caption.color1, caption.shape1, caption.color2, caption.shape2,
                          FLIPPED_RELATION[caption.relation])


# --- the command ---------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    from models import FAMILIES

    parser = command_parser(
        "train_toy_vlm.py",
        "Train a toy VLM of a family's real architecture (small widths, an 8 x 8 image-token grid) on "
        "the project's generated data: yes/no ShapeWorld agreement, corner questions and 'is there a "
        "{color} {shape} ?'. It is the positive control of every instrument: `--model-path toy` loads "
        "the committed one in every script. With --evaluate, print the committed toy's accuracy on a "
        "folder as one JSON line instead.")
    parser.add_argument("--model", required=True, choices=FAMILIES, help="model family")
    parser.add_argument("--out", type=Path, default=None, help="where the trained toy is saved "
                                                                 "(default: models/toy/{family})")
    parser.add_argument("--seed", type=int, default=0, help="initialisation and data seed")
    parser.add_argument("--steps", type=int, default=None,
                        help="optimizer steps (default: " + ", ".join(f"{family} {shapes['steps']}" for family, shapes
                                                                      in TOY_SHAPES.items()) + ": 30 minutes on 2 CPU cores)")
    parser.add_argument("--batch-size", type=int, default=32, help="samples per step")
    parser.add_argument("--lr", type=float, default=2e-3,
                        help="peak learning rate (AdamW; warm-up, flat, decay; the last 2/9 of the steps again at half)")
    parser.add_argument("--held-out", type=int, default=400, help="held-out samples per task after training")
    parser.add_argument("--evaluate", type=Path, default=None, metavar="DIR",
                        help="print the toy's accuracy on DIR (a ShapeWorld agreement/relational folder or a "
                             "data/dataset_{corner} folder) as one JSON line, and train nothing")
    parser.add_argument("--circuit", action="store_true",
                        help="print, as one JSON line, how much each trained head attends to its target on "
                             "--held-out generated captions (true and relation-swapped), beside the other heads "
                             "of its layer and uniform attention, and train nothing")
    parser.add_argument("--model-path", default="toy",
                        help="with --evaluate or --circuit: the checkpoint to read ('toy': the committed one)")
    controls.add_control_args(parser)
    parser.add_argument("--verbose", action="store_true", help="debug logging")
    return parser


@user_errors_exit
def main(argv=None) -> None:
    from models import toy_folder

    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    check_at_least(0, seed=args.seed)
    args.steps = TOY_SHAPES[args.model]["steps"] if args.steps is None else args.steps
    check_at_least(1, steps=args.steps, batch_size=args.batch_size, held_out=args.held_out)
    if args.steps >= HELD_OUT:
        raise OptionError(f"--steps {args.steps}: must stay below {HELD_OUT}, where the held-out data's streams begin")
    if not args.lr > 0:
        raise OptionError(f"--lr {args.lr}: must be > 0")
    seeds = controls.init_seeds(args)
    if args.evaluate is not None and args.circuit:
        raise OptionError("--evaluate and --circuit: give one of them")
    if args.evaluate is not None or args.circuit:
        for seed in seeds or [None]:  # the toy, or each random initialisation of its architecture
            read(args, seed)
        return
    if seeds is not None:
        raise OptionError("--control: only with --evaluate or --circuit (a trained toy has no control to train)")
    out = check_output_dir(args.out or toy_folder(args.model), "--out")  # before half an hour of training
    started = time.time()
    adapter = build_toy(args.model, args.seed)
    log.info("toy %s: %.2f M parameters", args.model, sum(p.numel() for p in adapter.model.parameters()) / 1e6)
    history = toy_circuit.train(adapter, args.seed, args.steps, args.batch_size, args.lr)
    wall = time.time() - started
    adapter.model.half().save_pretrained(out)  # fp16: the committed file stays small
    adapter.processor.save_pretrained(out)
    saved = load_toy(args.model, out)
    held = {task: accuracy(saved, held_out(task, args.seed, args.held_out)) for task in TASKS}
    for task, result in held.items():
        log.info("held-out %s: %s", task, result)
    circuit = toy_circuit.circuit_probes(saved, held_out("agreement", args.seed, args.held_out))
    log.info("the trained heads on held-out captions: %s", circuit)
    write_json(out / "training.json", run_record(
        vars(args), saved, task_shares=TASK_SHARE, stages=toy_circuit.stages(args.steps, args.lr),
        train_seconds=round(wall, 1), final_loss={name: round(float(np.mean(v[-100:])), 4) for name, v in history.items()},
        loss_every_100=toy_circuit.every_100(history), held_out=held, circuit=circuit))


def load_toy(family: str, folder: Path):
    """The saved toy, loaded as every script loads a checkpoint (fp32 on the CPU)."""
    from models import load_adapter

    return load_adapter(family, str(folder), device="cpu", dtype="fp32")


def read(args, init_seed: int | None) -> None:
    """--evaluate or --circuit: one JSON line of the checkpoint's (or, with ``init_seed``, one random
    initialisation's of its architecture) answers on a folder, or its trained heads' probes."""
    from models import load_adapter

    adapter = load_adapter(args.model, args.model_path, device="cpu", dtype="fp32", random_init_seed=init_seed)
    which = {"model_path": args.model_path, **({"initialisation seed": init_seed} if init_seed is not None else {})}
    if args.circuit:
        samples = held_out("agreement", args.seed, args.held_out)
        print(json.dumps({"circuit": toy_circuit.circuit_probes(adapter, samples), "n_captions": len(samples),
                          **which}))
        return
    task, samples, swapped = folder_samples(args.evaluate)
    result = {"task": task, "n": len(samples), **{k: v for k, v in accuracy(adapter, samples).items() if k != "n"}}
    if swapped:  # the folder's true captions against the same captions with the relation swapped
        said_true = accuracy(adapter, [s for s in samples if s.answer])["accuracy"]
        said_swapped = accuracy(adapter, swapped)["accuracy"]
        result.update(n_swapped=len(swapped), accuracy_true=said_true, accuracy_swapped=said_swapped,
                      balanced_accuracy=round((said_true + said_swapped) / 2, 4))
    print(json.dumps({**result, **which, "data": str(args.evaluate)}))
