"""Toy VLMs: small models of each family's real architecture, trained on the project's own generated
data, as positive controls (``train_toy_vlm.py``; the model card is models/toy/README.md).

A toy is the family's transformers classes with small widths (``TOY_SHAPES``), built by the adapter's
``build_random`` with the tiny tokenizers, fed through the adapter's own prompt and processor path
(``VLMAdapter.encode``) at a small image side (an 8 x 8 image-token grid). It learns yes/no questions:

- ``agreement``: a ShapeWorld world with its caption, exactly as experiment 1 feeds it, and the same world
  with the caption's relation swapped (above/below, left/right), both in the same batch, so that saying
  yes (or no) to everything scores 50%;
- ``corner``: "Is there anything in the {corner} corner?" (experiment 3's question) on the full and
  control image of a counterfactual pair, asking its own corner half of the time, another the rest;
- ``exists``: "is there a {color} {shape} ?" on a ShapeWorld world, which ties the words to what
  they name in the image.

Beside the answer, two dense losses give the words their meaning (``train``): each image position
learns its cell's colour and shape words (``cell_targets``), and the true caption's informative words are
predicted as a language model would (``caption_targets``): each shape word after its colour, the second
colour, and the relation word, softly over every relation that holds from the first shape to the second.
The answer is read as the instruments read it (``ablation.log_odds``: yes when the yes tokens' logsumexp
beats the no tokens'). Each batch is drawn from its own seeded stream ([seed, task, step]), so training
is a function of the seed; held-out data comes from other streams.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from spatial_attention.common.console import check_at_least, command_parser, user_errors_exit
from spatial_attention.common.errors import DataError, OptionError
from spatial_attention.common.runio import check_output_dir, run_record, setup_logging, write_json
from spatial_attention.data.counterfactual import CORNERS, corner_prompt, read_pairs
from spatial_attention.data.generate import corner_pair, draw_scene, random_scene
from spatial_attention.data.shapeworld import (COLORS, FLIPPED_RELATION, RELATIONS, SHAPES, format_caption,
                                               list_shards, load_rgb, parse_caption, read_shard)

log = logging.getLogger("spatial_attention")

# Per family: language-model and vision-encoder widths, and the image side (8 x 8 image tokens:
# LLaVA 112 px / 14-px patches; Qwen2-VL 224 px / 28 px per merged token), about 1.4 M parameters, and
# the default steps (about 60 minutes of training on 2 CPU cores; models/toy/README.md).
# Qwen2-VL's toy turns its rotary frequencies faster than the 7B (rope_theta 10, not 1e6): its ViT has no
# absolute position, so the language model reads where an image token lies only from M-RoPE, and with 8
# frequency pairs per head at theta 1e6 the width section turns by about 1e-4 rad per column: left and
# right would be invisible (models/toy/README.md, what was tried).
TOY_SHAPES = {
    "llava": dict(text=dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=8,
                            num_key_value_heads=8),
                  vision=dict(hidden_size=96, intermediate_size=192, num_hidden_layers=3, num_attention_heads=4,
                              projection_dim=96),
                  image_side=112, steps=6000),
    "qwen2": dict(text=dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=8,
                            num_key_value_heads=2, rope_theta=10.0),
                  vision=dict(depth=3, embed_dim=96, mlp_ratio=2, num_heads=4),
                  image_side=224, steps=4000),
}
TASKS = ("agreement", "corner", "exists")
TASK_SHARE = {"agreement": 0.5, "corner": 0.25, "exists": 0.25}  # of each training batch
SHAPEWORLD_SIDE = 100  # ShapeWorld's world size
CORNER_SIDE = 64  # the counterfactual pairs' image size (generate_data.py's default)
CELL_WEIGHT = 0.5  # of the image positions' colour-and-shape-word loss beside the answer's
CAPTION_WEIGHT = 1.0  # of the true captions' word loss beside the answer's
WARMUP, DECAY = 0.05, 0.2  # shares of the steps: linear warm-up, flat, then linear decay to 0
# the head taught to bind: at a named shape's word it attends to that shape's cells (its attention mass
# there, -log, is a loss): without it no word learned to read the image's content (models/toy/README.md)
BIND_HEAD = (0, 0)  # (layer, head), 0-based
HELD_OUT = 10_000  # stream offset of the held-out data: no training step reaches it

GRID = 8  # image tokens per side
COLOR_NAMES = list(COLORS)
_BASE_RGB = np.array([COLORS[c] for c in COLOR_NAMES]) * 255.0


class Sample(NamedTuple):
    """One yes/no item."""

    text: str  # the question (for agreement: the caption)
    image: Image.Image
    answer: bool  # whether the right answer is yes
    entities: tuple = ()  # the scene's shapes, for the per-cell shape words (empty: colours read off pixels)
    relations: tuple = ()  # a true caption's relations that hold from its first shape to its second


# --- data ------------------------------------------------------------------------------

def _image(pixels: np.ndarray) -> Image.Image:
    return Image.fromarray(pixels, "RGB")


def _cells(labels: np.ndarray, grid: int) -> np.ndarray:
    """[grid * grid] raster order: per cell the most frequent non-zero label of ``labels`` (a pixel map), or
    0 where labelled pixels cover less than a quarter of the cell."""
    side = labels.shape[0]
    edges = np.linspace(0, side, grid + 1).round().astype(int)
    out = np.zeros(grid * grid, dtype=np.int64)
    for r in range(grid):
        for c in range(grid):
            cell = labels[edges[r]:edges[r + 1], edges[c]:edges[c + 1]]
            shape = cell[cell > 0]
            if shape.size >= cell.size / 4:
                out[r * grid + c] = np.bincount(shape).argmax()
    return out


def cell_colors(image: Image.Image, grid: int = GRID) -> np.ndarray:
    """[grid * grid] raster order: per image-token cell, 1 + the index in COLOR_NAMES of the colour that
    covers most of the cell's shape pixels (the nearest base colour), or 0 where shapes cover less than a
    quarter of it. The background is the colour of the picture's corner pixel."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    occupied = np.abs(pixels - pixels[0, 0]).max(-1) > 24
    labels = np.zeros(occupied.shape, dtype=np.int64)
    labels[occupied] = ((pixels[occupied][:, None, :] - _BASE_RGB) ** 2).sum(-1).argmin(-1) + 1
    return _cells(labels, grid)


def cell_entities(entities: tuple, side: int, grid: int = GRID) -> np.ndarray:
    """[grid * grid] raster order: per cell, 1 + the index in ``entities`` of the shape covering most of it
    (each drawn alone, as ``draw_scene`` draws it), or 0 where shapes cover less than a quarter of it."""
    labels = np.zeros((side, side), dtype=np.int64)
    for index, entity in enumerate(entities):
        labels[draw_scene([entity], side).max(-1) > 24] = index + 1
    return _cells(labels, grid)


def _holds(relation: str, first: dict, second: dict) -> bool:
    """Whether ``relation`` holds from ``first`` to ``second`` on their centres (y grows downward)."""
    (x1, y1), (x2, y2) = first["center"], second["center"]
    return {"left": x1 < x2, "right": x1 > x2, "above": y1 < y2, "below": y1 > y2}[relation]


def agreement_pair(rng: np.random.Generator) -> list[Sample]:
    """A world with its true caption, and the same world with the caption's relation swapped (false: the
    generator places the shapes apart along the relation's axis)."""
    first, second, relation, ordered = random_scene(rng, SHAPEWORLD_SIDE)
    image = _image(draw_scene(ordered, SHAPEWORLD_SIDE))
    holding = tuple(r for r in RELATIONS if _holds(r, first, second))
    words = (first["color"], first["shape"], second["color"], second["shape"])
    return [Sample(format_caption(*words, relation), image, True, tuple(ordered), holding),
            Sample(format_caption(*words, FLIPPED_RELATION[relation]), image, False, tuple(ordered))]


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
    return Sample(f"is there a {color} {shape} ?", _image(draw_scene(ordered, SHAPEWORLD_SIDE)),
                  (color, shape) in present, tuple(ordered))


def corner_sample(rng: np.random.Generator) -> Sample:
    """A pair's full or control image and a corner question: its own corner half of the time."""
    corner = CORNERS[int(rng.integers(len(CORNERS)))]
    _, full, control = corner_pair(rng, corner, CORNER_SIDE)
    is_full = bool(rng.random() < 0.5)
    asked = corner if rng.random() < 0.5 else CORNERS[int(rng.integers(len(CORNERS)))]
    opposite = CORNERS[3 - CORNERS.index(corner)]  # topleft <-> bottomright, topright <-> bottomleft
    occupied = {opposite, corner} if is_full else {opposite}
    return Sample(corner_prompt(asked), _image(full if is_full else control), asked in occupied)


# each sampler's items per draw: agreement draws a world's true and swapped caption together
SAMPLERS: dict[str, Callable[[np.random.Generator], list[Sample]]] = {
    "agreement": agreement_pair, "corner": lambda rng: [corner_sample(rng)],
    "exists": lambda rng: [exists_sample(rng)]}


def _draw(task: str, rng: np.random.Generator, count: int) -> list[Sample]:
    samples = []
    while len(samples) < count:
        samples += SAMPLERS[task](rng)
    return samples


def batch_samples(seed: int, step: int, batch_size: int) -> tuple[list[Sample], list[str]]:
    """Training batch ``step`` and each sample's task: each task's share of it (``TASK_SHARE``; agreement's
    rounded to whole pairs), each task from its own stream."""
    counts = {task: int(round(TASK_SHARE[task] * batch_size)) for task in TASKS}
    counts["agreement"] = max(2, 2 * ((batch_size - counts["corner"] - counts["exists"]) // 2))
    samples, tasks = [], []
    for index, task in enumerate(TASKS):
        drawn = _draw(task, np.random.default_rng([seed, index, step]), counts[task])
        samples += drawn
        tasks += [task] * len(drawn)
    return samples, tasks


def held_out(task: str, seed: int, count: int) -> list[Sample]:
    """``count`` held-out samples of ``task`` (streams no training step draws from; agreement in pairs)."""
    return _draw(task, np.random.default_rng([seed, TASKS.index(task), HELD_OUT]), count)


# --- the model -----------------------------------------------------------------------------

def build_toy(family: str, seed: int):
    """A freshly initialised toy adapter of ``family`` (weights drawn with ``seed``)."""
    from models import family_adapter

    cls = family_adapter(family)
    torch.manual_seed(seed)
    shapes = TOY_SHAPES[family]
    model, processor = cls.build_random(text=shapes["text"], vision=shapes["vision"], image_side=shapes["image_side"])
    model.set_attn_implementation("eager")  # training reads the binding head's attention (BIND_HEAD)
    return cls(model.float(), processor, "toy")


def _prompt_ids(adapter, text: str) -> list[int]:
    return adapter.tokenizer(adapter.image_prompt(text), add_special_tokens=False)["input_ids"]


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


def word_tokens(adapter, words) -> dict[str, int]:
    """Per word, the first token it gets inside a caption ("... is {word} ."), checked distinct: a
    prediction of that token names the word."""
    base = len(adapter.tokenizer("the spatial relation is", add_special_tokens=False)["input_ids"])
    first = {w: adapter.tokenizer(f"the spatial relation is {w} .", add_special_tokens=False)["input_ids"][base]
             for w in words}
    if len(set(first.values())) != len(first):
        raise RuntimeError(f"words share a first token in this tokenizer: {first}")
    return first


class Targets:
    """The token ids the dense losses train on, read off the toy's tokenizer once."""

    def __init__(self, adapter):
        self.yes, self.no = answer_tokens(adapter)
        self.colors = word_tokens(adapter, COLOR_NAMES)
        self.shapes = word_tokens(adapter, SHAPES)
        self.relations = word_tokens(adapter, RELATIONS)
        self.vocab = adapter.model.get_output_embeddings().weight.shape[0]

    def cells(self, adapter, sample: Sample) -> torch.Tensor:
        """[GRID * GRID, vocab] the distribution an image position learns: its cell's colour and shape word,
        half each (colour alone where the scene's shapes are unknown), the no token on the background."""
        out = torch.zeros(GRID * GRID, self.vocab)
        if sample.entities:
            for cell, label in enumerate(cell_entities(sample.entities, sample.image.size[0])):
                if label:
                    entity = sample.entities[label - 1]
                    out[cell, self.colors[entity["color"]]] += 0.5
                    out[cell, self.shapes[entity["shape"]]] += 0.5
        else:
            for cell, label in enumerate(cell_colors(adapter.prepare_image(sample.image))):
                if label:
                    out[cell, self.colors[COLOR_NAMES[label - 1]]] = 1.0
        out[out.sum(-1) == 0, self.no] = 1.0
        return out

    def caption(self, sample: Sample, layout) -> tuple[list[int], torch.Tensor]:
        """(positions, [n, vocab] targets) of a true caption's informative words, each predicted from the
        position before it: the first shape after its colour, the second colour, the second shape after it,
        and the relation word, spread evenly over every relation that holds (``Sample.relations``)."""
        caption = parse_caption(sample.text)
        second_colour = 1 if caption.color2 == caption.color1 else 0
        words = [(caption.shape1, 0, {self.shapes[caption.shape1]: 1.0}),
                 (caption.color2, second_colour, {self.colors[caption.color2]: 1.0}),
                 (caption.shape2, 0, {self.shapes[caption.shape2]: 1.0}),
                 (caption.relation, 0, {self.relations[r]: 1 / len(sample.relations) for r in sample.relations})]
        positions, targets = [], torch.zeros(len(words), self.vocab)
        for row, (word, occurrence, target) in enumerate(words):
            positions.append(int(layout.word_positions(word, occurrence)[0]) - 1)
            for token, weight in target.items():
                targets[row, token] = weight
        return positions, targets


    def binding(self, sample: Sample, layout) -> list[tuple[int, np.ndarray]]:
        """(position, image positions) pairs for the binding head (``BIND_HEAD``): at a true caption's shape
        words, and at an exists question's shape word where the world has that shape in that colour, the
        image positions of the cells that shape covers."""
        if not sample.entities or not (sample.relations or sample.answer):
            return []
        if sample.relations:
            caption = parse_caption(sample.text)
            named = [(caption.shape1, caption.color1), (caption.shape2, caption.color2)]
        else:
            if not sample.text.startswith("is there a "):
                return []
            color, shape = sample.text[len("is there a "):-2].split()
            named = [(shape, color)]
        cells = cell_entities(sample.entities, sample.image.size[0])
        out = []
        for shape, color in named:
            index = next(k for k, e in enumerate(sample.entities) if (e["shape"], e["color"]) == (shape, color))
            covered = np.flatnonzero(cells == index + 1)
            if covered.size:
                out.append((int(layout.word_positions(shape)[-1]), layout.image_positions[covered]))
        return out


def forward(adapter, samples: list[Sample]):
    """(logits [B, T, vocab], the batch) of the samples in the family's prompt format."""
    batch = adapter.encode([s.text for s in samples], [s.image for s in samples])
    return adapter.model(**batch.inputs).logits, batch


def answer_logits(logits: torch.Tensor, batch) -> torch.Tensor:
    """(B, vocab) logits at each sample's last prompt position (the answer's)."""
    last = torch.tensor([layout.last_position for layout in batch.layouts], device=logits.device)
    return logits[torch.arange(len(batch), device=logits.device), last].float()


def last_logits(adapter, samples: list[Sample]) -> torch.Tensor:
    """(B, vocab) logits at each sample's last prompt position."""
    return answer_logits(*forward(adapter, samples))


def batch_losses(adapter, targets: Targets, samples: list[Sample], tasks: list[str]) -> dict[str, torch.Tensor]:
    """The batch's losses: the answer's cross-entropy per task, the image positions' (``cells``) and the
    true captions' words (``caption``)."""
    cross_entropy = torch.nn.functional.cross_entropy
    batch = adapter.encode([s.text for s in samples], [s.image for s in samples])
    output = adapter.model(**batch.inputs, output_hidden_states=True, output_attentions=True)
    logits, embedded = output.logits, output.hidden_states[0]  # [0]: the language model's input
    answers = cross_entropy(answer_logits(logits, batch), torch.tensor([targets.yes if s.answer else targets.no
                                                                        for s in samples]), reduction="none")
    losses = {task: answers[torch.tensor([t == task for t in tasks])].mean() for task in TASKS if task in tasks}
    rows = torch.cat([torch.full((layout.image_positions.size,), b) for b, layout in enumerate(batch.layouts)])
    columns = torch.cat([torch.as_tensor(layout.image_positions) for layout in batch.layouts])
    cells = torch.cat([targets.cells(adapter, s) for s in samples])
    losses["cells"] = cross_entropy(logits[rows, columns].float(), cells)
    # the same words read off the image tokens as they enter the language model, against the input
    # embeddings: an image token of a red square then resembles the words "red" and "square", so that a
    # word can find it by attention (without it, binding stayed at chance: models/toy/README.md)
    words_in = embedded[rows, columns].float() @ adapter.model.get_input_embeddings().weight.float().T
    losses["cells_input"] = cross_entropy(words_in, cells)
    rows, columns, words = [], [], []
    for b, (sample, layout) in enumerate(zip(samples, batch.layouts)):
        if sample.relations:
            positions, target = targets.caption(sample, layout)
            rows += [b] * len(positions)
            columns += positions
            words.append(target)
    if words:
        losses["caption"] = cross_entropy(logits[rows, columns].float(), torch.cat(words))
    layer, head = BIND_HEAD
    attention = output.attentions[layer][:, head]  # [B, T, T]
    bound = [-torch.log(attention[b, position, cells].sum() + 1e-6)
             for b, (sample, layout) in enumerate(zip(samples, batch.layouts))
             for position, cells in targets.binding(sample, layout)]
    if bound:
        losses["binding"] = torch.stack(bound).mean()
    return losses


def learning_rate_scale(step: int, steps: int) -> float:
    """Linear warm-up over ``WARMUP`` of the steps, flat, then linear decay to 0 over the last ``DECAY``."""
    warmup, decay_from = max(1, int(WARMUP * steps)), int((1 - DECAY) * steps)
    if step < warmup:
        return (step + 1) / warmup
    if step < decay_from:
        return 1.0
    return max(0.0, (steps - step) / max(1, steps - decay_from))


def train(adapter, seed: int, steps: int, batch_size: int, lr: float) -> dict[str, list[float]]:
    """The plain torch loop: AdamW, warm-up, flat, then linear decay (``learning_rate_scale``), on the
    answer's cross-entropy plus the dense losses (``CELL_WEIGHT``, ``CAPTION_WEIGHT``) that give image
    tokens and words their meaning, which the answer alone teaches too slowly. Returns every loss per step."""
    targets = Targets(adapter)
    weights = {"cells": CELL_WEIGHT, "cells_input": CELL_WEIGHT, "caption": CAPTION_WEIGHT}  # the rest weigh 1
    model = adapter.model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: learning_rate_scale(s, steps))
    history: dict[str, list[float]] = {}
    for step in (bar := tqdm(range(steps), desc="train", unit="step")):
        samples, tasks = batch_samples(seed, step, batch_size)
        losses = batch_losses(adapter, targets, samples, tasks)
        loss = sum(weights.get(name, 1.0) * value for name, value in losses.items())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        for name, value in losses.items():
            history.setdefault(name, []).append(value.item())
        history.setdefault("total", []).append(loss.item())
        if step % 100 == 0:
            bar.set_postfix({name: f"{np.mean(values[-100:]):.3f}" for name, values in history.items()})
            log.debug("step %d: %s", step, {name: round(float(np.mean(v[-100:])), 3) for name, v in history.items()})
    model.eval()
    return history


@torch.no_grad()
def accuracy(adapter, samples: list[Sample], batch_size: int = 32) -> dict:
    """Share of samples answered right, reading yes/no as the instruments do (log-odds > 0)."""
    from spatial_attention.experiments.ablation_measure import log_odds, yes_no_ids

    yes, no = yes_no_ids(adapter.tokenizer)
    said = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        said += list(log_odds(last_logits(adapter, chunk).cpu(), yes, no) > 0)
    truth = np.array([s.answer for s in samples])
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
    swapped = [sample._replace(text=swap_relation(sample.text), answer=False) for sample in samples if sample.answer]
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
    history = train(adapter, args.seed, args.steps, args.batch_size, args.lr)
    wall = time.time() - started
    adapter.model.half().save_pretrained(out)  # fp16: the committed file stays small
    adapter.processor.save_pretrained(out)
    saved = load_toy(args.model, out)
    held = {task: accuracy(saved, held_out(task, args.seed, args.held_out)) for task in TASKS}
    for task, result in held.items():
        log.info("held-out %s: %s", task, result)
    write_json(out / "training.json", run_record(
        vars(args), saved, task_shares=TASK_SHARE, loss_weights={"cells": CELL_WEIGHT, "caption": CAPTION_WEIGHT},
        train_seconds=round(wall, 1), final_loss={name: round(float(np.mean(v[-100:])), 4) for name, v in history.items()},
        loss_every_100={name: [round(float(np.mean(v[i:i + 100])), 4) for i in range(0, len(v), 100)]
                        for name, v in history.items()},
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
        said_true = accuracy(adapter, [s for s in samples if s.answer])["accuracy"]
        said_swapped = accuracy(adapter, swapped)["accuracy"]
        result.update(n_swapped=len(swapped), accuracy_true=said_true, accuracy_swapped=said_swapped,
                      balanced_accuracy=round((said_true + said_swapped) / 2, 4))
    print(json.dumps({**result, "model_path": args.model_path, "data": str(args.evaluate)}))
