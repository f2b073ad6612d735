"""Toy VLMs: small models of each family's real architecture, trained on the project's own generated
data, as positive controls (``train_toy_vlm.py``; the model card is models/toy/README.md).

A toy is the family's transformers classes with small widths (``TOY_SHAPES``), built by the adapter's
``build_random`` with the tiny tokenizers, fed through the adapter's own prompt and processor path
(``VLMAdapter.encode``) at a small image side (an 8 x 8 image-token grid). It learns yes/no questions:

- ``agreement``: a ShapeWorld caption, exactly as experiment 1 feeds it, true or false of the world;
  false captions change the relation (to one that does not hold on the centres) or one mention's
  colour or shape (to one the world does not have);
- ``corner``: "Is there anything in the {corner} corner?" (experiment 3's question) on the full and
  control image of a counterfactual pair, asking its own corner half of the time, another the rest;
- ``exists``: "is there a {color} {shape} ?" on a ShapeWorld world, which ties the words to what
  they name in the image.

Beside the answer, each image position learns the colour word of its cell (``cell_targets``). The
answer is read as the instruments read it (``ablation.log_odds``: yes when the yes tokens'
logsumexp beats the no tokens'). Each batch is drawn from its own seeded stream ([seed, task, step]),
so training is a function of the seed; held-out data comes from other streams.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from spatial_attention.common.console import check_at_least, command_parser, user_errors_exit
from spatial_attention.common.errors import DataError, OptionError
from spatial_attention.common.runio import check_output_dir, run_record, setup_logging, write_json
from spatial_attention.data.counterfactual import CORNERS, corner_prompt, read_pairs
from spatial_attention.data.generate import corner_pair, draw_scene, random_scene
from spatial_attention.data.shapeworld import (COLORS, FLIPPED_RELATION, RELATIONS, SHAPES, format_caption, list_shards,
                                               load_rgb, parse_caption, read_shard)

log = logging.getLogger("spatial_attention")

# Per family: language-model and vision-encoder widths, and the image side (8 x 8 image tokens:
# LLaVA 112 px / 14-px patches; Qwen2-VL 224 px / 28 px per merged token), about 1.4 M parameters, and
# the default steps: 30 minutes of training on 2 CPU cores.
TOY_SHAPES = {
    "llava": dict(text=dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=8,
                            num_key_value_heads=8),
                  vision=dict(hidden_size=96, intermediate_size=192, num_hidden_layers=3, num_attention_heads=4,
                              projection_dim=96),
                  image_side=112, steps=4500),
    "qwen2": dict(text=dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=8,
                            num_key_value_heads=2),
                  vision=dict(depth=3, embed_dim=96, mlp_ratio=2, num_heads=4),
                  image_side=224, steps=2200),  # fewer steps fit in 30 minutes: its ViT reads 256 patches
}
TASKS = ("agreement", "corner", "exists")
TASK_SHARE = {"agreement": 0.5, "corner": 0.3, "exists": 0.2}  # of each training batch
SHAPEWORLD_SIDE = 100  # ShapeWorld's world size
CORNER_SIDE = 64  # the counterfactual pairs' image size (generate_data.py's default)
CELL_WEIGHT = 0.5  # of the image positions' colour-word loss beside the answer's
HELD_OUT = 10_000  # stream offset of the held-out data: no training step reaches it

Sample = tuple[str, Image.Image, bool]  # question text, image, whether the answer is yes
GRID = 8  # image tokens per side
COLOR_NAMES = list(COLORS)
_BASE_RGB = np.array([COLORS[c] for c in COLOR_NAMES]) * 255.0


# --- data ------------------------------------------------------------------------------

def _image(pixels: np.ndarray) -> Image.Image:
    return Image.fromarray(pixels, "RGB")


def cell_colors(image: Image.Image, grid: int = GRID) -> np.ndarray:
    """[grid * grid] raster order: per image-token cell, 1 + the index in COLOR_NAMES of the colour that
    covers most of the cell's shape pixels (the nearest base colour), or 0 where shapes cover less than a
    quarter of it. The background is the colour of the picture's corner pixel."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    side = pixels.shape[0]
    occupied = np.abs(pixels - pixels[0, 0]).max(-1) > 24
    labels = np.zeros(occupied.shape, dtype=np.int64)
    labels[occupied] = ((pixels[occupied][:, None, :] - _BASE_RGB) ** 2).sum(-1).argmin(-1) + 1
    edges = np.linspace(0, side, grid + 1).round().astype(int)
    out = np.zeros(grid * grid, dtype=np.int64)
    for r in range(grid):
        for c in range(grid):
            cell = labels[edges[r]:edges[r + 1], edges[c]:edges[c + 1]]
            shape = cell[cell > 0]
            if shape.size >= cell.size / 4:
                out[r * grid + c] = np.bincount(shape).argmax()
    return out


def _holds(relation: str, first: dict, second: dict) -> bool:
    """Whether ``relation`` holds from ``first`` to ``second`` on their centres (y grows downward)."""
    (x1, y1), (x2, y2) = first["center"], second["center"]
    return {"left": x1 < x2, "right": x1 > x2, "above": y1 < y2, "below": y1 > y2}[relation]


def agreement_sample(rng: np.random.Generator) -> Sample:
    """A world and its caption, true or (half the time) made false."""
    first, second, relation, ordered = random_scene(rng, SHAPEWORLD_SIDE)
    mentions = [[first["color"], first["shape"]], [second["color"], second["shape"]]]
    true = bool(rng.random() < 0.5)
    if not true:
        if rng.random() < 0.7:
            relation = str(rng.choice([r for r in RELATIONS if not _holds(r, first, second)]))
        else:
            which, attribute = int(rng.integers(2)), int(rng.integers(2))
            present = {e["color"] if attribute == 0 else e["shape"] for e in ordered}
            choices = [v for v in (list(COLORS) if attribute == 0 else SHAPES) if v not in present]
            if attribute == 1:  # the two mentioned shapes always differ
                choices = [v for v in choices if v != mentions[1 - which][1]]
            mentions[which][attribute] = str(rng.choice(choices))
    caption = format_caption(*mentions[0], *mentions[1], relation)
    return caption, _image(draw_scene(ordered, SHAPEWORLD_SIDE)), true


def exists_sample(rng: np.random.Generator) -> Sample:
    """'is there a {color} {shape} ?' of a world: one of its shapes, or (half the time) a colour-shape
    pair it lacks, made from one of its shapes with the colour or the shape changed (a near miss)."""
    _, _, _, ordered = random_scene(rng, SHAPEWORLD_SIDE)
    present = {(e["color"], e["shape"]) for e in ordered}
    entity = ordered[int(rng.integers(2))]
    color, shape = entity["color"], entity["shape"]
    if rng.random() < 0.5:
        if rng.random() < 0.5:
            color = str(rng.choice([c for c in COLORS if (c, shape) not in present]))
        else:
            shape = str(rng.choice([s for s in SHAPES if (color, s) not in present]))
    return f"is there a {color} {shape} ?", _image(draw_scene(ordered, SHAPEWORLD_SIDE)), (color, shape) in present


def corner_sample(rng: np.random.Generator) -> Sample:
    """A pair's full or control image and a corner question: its own corner half of the time."""
    corner = CORNERS[int(rng.integers(len(CORNERS)))]
    _, full, control = corner_pair(rng, corner, CORNER_SIDE)
    is_full = bool(rng.random() < 0.5)
    asked = corner if rng.random() < 0.5 else CORNERS[int(rng.integers(len(CORNERS)))]
    opposite = CORNERS[3 - CORNERS.index(corner)]  # topleft <-> bottomright, topright <-> bottomleft
    occupied = {opposite, corner} if is_full else {opposite}
    return corner_prompt(asked), _image(full if is_full else control), asked in occupied


SAMPLERS: dict[str, Callable[[np.random.Generator], Sample]] = {
    "agreement": agreement_sample, "corner": corner_sample, "exists": exists_sample}


def batch_samples(seed: int, step: int, batch_size: int) -> list[Sample]:
    """Training batch ``step``: each task's share of it (``TASK_SHARE``), each task from its own stream."""
    counts = {task: int(round(TASK_SHARE[task] * batch_size)) for task in TASKS}
    counts["agreement"] += batch_size - sum(counts.values())
    samples = []
    for index, task in enumerate(TASKS):
        rng = np.random.default_rng([seed, index, step])
        samples += [SAMPLERS[task](rng) for _ in range(counts[task])]
    return samples


def held_out(task: str, seed: int, count: int) -> list[Sample]:
    """``count`` held-out samples of ``task`` (streams no training step draws from)."""
    rng = np.random.default_rng([seed, TASKS.index(task), HELD_OUT])
    return [SAMPLERS[task](rng) for _ in range(count)]


# --- the model -----------------------------------------------------------------------------

def build_toy(family: str, seed: int):
    """A freshly initialised toy adapter of ``family`` (weights drawn with ``seed``)."""
    from models import family_adapter

    cls = family_adapter(family)
    torch.manual_seed(seed)
    shapes = TOY_SHAPES[family]
    model, processor = cls.build_random(text=shapes["text"], vision=shapes["vision"], image_side=shapes["image_side"])
    model.set_attn_implementation("sdpa")  # training needs no captured attention
    return cls(model.float(), processor, "toy")


def answer_tokens(adapter) -> tuple[int, int]:
    """The yes and no token ids trained on: the first token of " Yes" / "No" as it follows the family's
    prompt where that token reads "yes" / "no" (as the instruments read them), else a token that does."""
    from spatial_attention.experiments.ablation_measure import yes_no_ids

    prompt = adapter.image_prompt(corner_prompt("topleft"))
    base = adapter.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    space = " " if adapter.family == "llava" else ""  # "ASSISTANT: Yes" vs "<|im_start|>assistant\nYes"
    chosen = []
    for word, ids in zip(("Yes", "No"), yes_no_ids(adapter.tokenizer)):
        natural = adapter.tokenizer(prompt + space + word, add_special_tokens=False)["input_ids"][len(base)]
        chosen.append(natural if natural in ids else ids[0])
    return chosen[0], chosen[1]


def cell_targets(adapter, no: int) -> torch.Tensor:
    """Per cell label of ``cell_colors``, the token trained at an image position: the colour word as it
    reads inside a caption ("a red square"), the no token for the background."""
    words = [adapter.tokenizer(f"a {name}", add_special_tokens=False)["input_ids"][-1] for name in COLOR_NAMES]
    return torch.tensor([no] + words)


def forward(adapter, samples: list[Sample]):
    """(logits [B, T, vocab], the batch) of the samples in the family's prompt format."""
    batch = adapter.encode([s[0] for s in samples], [s[1] for s in samples])
    return adapter.model(**batch.inputs).logits, batch


def answer_logits(logits: torch.Tensor, batch) -> torch.Tensor:
    """(B, vocab) logits at each sample's last prompt position (the answer's)."""
    last = torch.tensor([layout.last_position for layout in batch.layouts], device=logits.device)
    return logits[torch.arange(len(batch), device=logits.device), last].float()


def last_logits(adapter, samples: list[Sample]) -> torch.Tensor:
    """(B, vocab) logits at each sample's last prompt position."""
    return answer_logits(*forward(adapter, samples))


def train(adapter, seed: int, steps: int, batch_size: int, lr: float) -> list[float]:
    """The plain torch loop: AdamW, warm-up then cosine decay, cross-entropy on the answer token, plus
    (weight ``CELL_WEIGHT``) at each image position on its cell's colour word (``cell_targets``): dense
    grounding that gives the image tokens the words' meaning, which the answer alone teaches too slowly."""
    yes, no = answer_tokens(adapter)
    cell_words = cell_targets(adapter, no)
    model = adapter.model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    losses = []
    for step in (bar := tqdm(range(steps), desc="train", unit="step")):
        samples = batch_samples(seed, step, batch_size)
        target = torch.tensor([yes if s[2] else no for s in samples])
        logits, batch = forward(adapter, samples)
        loss = torch.nn.functional.cross_entropy(answer_logits(logits, batch), target)
        rows = torch.cat([torch.full((layout.image_positions.size,), b) for b, layout in enumerate(batch.layouts)])
        columns = torch.cat([torch.as_tensor(layout.image_positions) for layout in batch.layouts])
        cells = torch.cat([cell_words[torch.as_tensor(cell_colors(adapter.prepare_image(s[1])))] for s in samples])
        loss = loss + CELL_WEIGHT * torch.nn.functional.cross_entropy(logits[rows, columns].float(), cells)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}")
    model.eval()
    return losses


@torch.no_grad()
def accuracy(adapter, samples: list[Sample], batch_size: int = 32) -> dict:
    """Share of samples answered right, reading yes/no as the instruments do (log-odds > 0)."""
    from spatial_attention.experiments.ablation_measure import log_odds, yes_no_ids

    yes, no = yes_no_ids(adapter.tokenizer)
    said = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        said += list(log_odds(last_logits(adapter, chunk).cpu(), yes, no) > 0)
    truth = np.array([s[2] for s in samples])
    right = np.array(said) == truth
    on_yes = round(float(right[truth].mean()), 4) if truth.any() else None
    on_no = round(float(right[~truth].mean()), 4) if (~truth).any() else None
    return {"n": len(samples), "accuracy": round(float(right.mean()), 4), "accuracy_yes": on_yes,
            "accuracy_no": on_no,  # balanced: a yes-bias or a no-bias scores 0.5
            "balanced_accuracy": round((on_yes + on_no) / 2, 4) if None not in (on_yes, on_no) else None}


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
            samples += [(question, load_rgb(pair.full_image), True), (question, load_rgb(pair.control_image), False)]
        return "corner", samples, []
    if not list_shards(path):
        raise DataError(f"--evaluate {path}: neither a corner data set (metadata.jsonl) nor a ShapeWorld folder "
                        f"(shard*/); point it at data/dataset_{{corner}} or an agreement/relational folder")
    samples = []
    for shard in list_shards(path):
        shard_dir = path / f"shard{shard}"
        captions, agreements, _ = read_shard(shard_dir, agreement_only=True)  # agreement.txt: the truth
        samples += [(caption, load_rgb(shard_dir / f"world-{index}.png"), agreement == 1.0)
                    for index, (caption, agreement) in enumerate(zip(captions, agreements))]
    swapped = [(swap_relation(text), image, False) for text, image, true in samples if true]
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
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (AdamW, cosine decay)")
    parser.add_argument("--held-out", type=int, default=400, help="held-out samples per task after training")
    parser.add_argument("--evaluate", type=Path, default=None, metavar="DIR",
                        help="print the toy's accuracy on DIR (a ShapeWorld agreement/relational folder or a "
                             "data/dataset_{corner} folder) as one JSON line, and train nothing")
    parser.add_argument("--model-path", default="toy",
                        help="with --evaluate: the checkpoint to evaluate ('toy': the committed one)")
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
    if args.evaluate is not None:
        evaluate(args)
        return
    out = check_output_dir(args.out or toy_folder(args.model), "--out")  # before half an hour of training
    started = time.time()
    adapter = build_toy(args.model, args.seed)
    log.info("toy %s: %.2f M parameters", args.model, sum(p.numel() for p in adapter.model.parameters()) / 1e6)
    losses = train(adapter, args.seed, args.steps, args.batch_size, args.lr)
    wall = time.time() - started
    adapter.model.half().save_pretrained(out)  # fp16: the committed file stays small
    adapter.processor.save_pretrained(out)
    saved = load_toy(args.model, out)
    held = {task: accuracy(saved, held_out(task, args.seed, args.held_out)) for task in TASKS}
    for task, result in held.items():
        log.info("held-out %s: %s", task, result)
    write_json(out / "training.json", run_record(
        vars(args), saved, task_shares=TASK_SHARE, train_seconds=round(wall, 1),
        final_loss=round(float(np.mean(losses[-100:])), 4),
        loss_every_100=[round(float(np.mean(losses[i:i + 100])), 4) for i in range(0, len(losses), 100)],
        held_out=held))


def load_toy(family: str, folder: Path):
    """The saved toy, loaded as every script loads a checkpoint (fp32 on the CPU)."""
    from models import load_adapter

    return load_adapter(family, str(folder), device="cpu", dtype="fp32")


def evaluate(args) -> None:
    task, samples, swapped = folder_samples(args.evaluate)
    from models import load_adapter

    adapter = load_adapter(args.model, args.model_path, device="cpu", dtype="fp32")
    result = {"task": task, "n": len(samples), **{k: v for k, v in accuracy(adapter, samples).items() if k != "n"}}
    if swapped:  # the folder's true captions against the same captions with the relation swapped
        said_true = accuracy(adapter, [s for s in samples if s[2]])["accuracy"]
        said_swapped = accuracy(adapter, swapped)["accuracy"]
        result.update(n_swapped=len(swapped), accuracy_true=said_true, accuracy_swapped=said_swapped,
                      balanced_accuracy=round((said_true + said_swapped) / 2, 4))
    print(json.dumps({**result, "model_path": args.model_path, "data": str(args.evaluate)}))
