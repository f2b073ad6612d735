"""Toy VLMs: small models of each family's real architecture, trained on the project's own generated
data, as positive controls (``train_toy_vlm.py``; the model card is models/toy/README.md).

A toy is the family's transformers classes with small widths (``TOY_SHAPES``), built by the adapter's
``build_random`` with the tiny tokenizers, fed through the adapter's own prompt and processor path
(``VLMAdapter.encode``) at a small image side (an 8 x 8 image-token grid). It learns yes/no questions:

- ``agreement``: a ShapeWorld caption, exactly as experiment 1 feeds it, true of the world, or the same
  caption with its relation swapped (the only false ones, so only the relation can tell them apart);
- ``corner``: "Is there anything in the {corner} corner?" (experiment 3's question) on the full and
  control image of a counterfactual pair, asking its own corner half of the time, another the rest;
- ``exists``: "is there a {color} {shape} ?" on a ShapeWorld world, which ties the words to what
  they name in the image.

The losses beside the answer, which train the known circuit, are ``toy_circuit.py``'s. The answer is read
as the instruments read it (``ablation.log_odds``: yes when the yes tokens' logsumexp beats the no
tokens'). Each batch is drawn from its own seeded stream ([seed, task, step]), so training is a function of
the seed; held-out data comes from other streams.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np
import torch
from PIL import Image

from spatial_attention.data.counterfactual import CORNERS, corner_prompt
from spatial_attention.data.generate import corner_pair, draw_scene, random_scene
from spatial_attention.data.shapeworld import COLORS, FLIPPED_RELATION, SHAPES, format_caption

# Per family: language-model and vision-encoder widths, and the image side (8 x 8 image tokens:
# LLaVA 112 px / 14-px patches; Qwen2-VL 224 px / 28 px per merged token), about 1.4 M parameters, and
# the default steps: at most 60 minutes of training on 2 CPU cores.
TOY_SHAPES = {
    "llava": dict(text=dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=8,
                            num_key_value_heads=8),
                  vision=dict(hidden_size=96, intermediate_size=192, num_hidden_layers=3, num_attention_heads=4,
                              projection_dim=96),
                  image_side=112, steps=6000, position_scale=10.0),
    # Qwen2-VL's places reach the language model only as M-RoPE rotations; at the 7B's theta (1e6) the toy's
    # 8 frequency pairs give the width section (the last 3) under 2e-4 rad a column, so the toy turns faster
    "qwen2": dict(text=dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=8,
                            num_key_value_heads=2, rope_parameters={"rope_theta": 10.0}),
                  vision=dict(depth=3, embed_dim=96, mlp_ratio=2, num_heads=4),
                  image_side=224, steps=4500),
}
TASKS = ("agreement", "corner", "exists")
TASK_SHARE = {"agreement": 0.6, "corner": 0.2, "exists": 0.2}  # of each training batch
SHAPEWORLD_SIDE = 100  # ShapeWorld's world size
CORNER_SIDE = 64  # the counterfactual pairs' image size (generate_data.py's default)
HELD_OUT = 10_000  # stream offset of the held-out data: no training step reaches it


class Sample(NamedTuple):
    """One yes/no item."""

    text: str  # the question (for agreement: the caption)
    image: Image.Image
    answer: bool  # whether the right answer is yes
    entities: tuple = ()  # a ShapeWorld world's shapes (the per-cell targets); empty for a corner picture
    named: tuple = ()  # a caption's: indices into ``entities`` of its first and second mentioned shape


GRID = 8  # image tokens per side
COLOR_NAMES = list(COLORS)
_BASE_RGB = np.array([COLORS[c] for c in COLOR_NAMES]) * 255.0

# --- data ------------------------------------------------------------------------------

def _image(pixels: np.ndarray) -> Image.Image:
    return Image.fromarray(pixels, "RGB")


def _cell_edges(side: int, grid: int) -> np.ndarray:
    return np.linspace(0, side, grid + 1).round().astype(int)


def _cell_share(mask: np.ndarray, grid: int = GRID) -> np.ndarray:
    """[grid * grid] raster order: the share of each image-token cell that ``mask`` (side x side) covers."""
    edges = _cell_edges(mask.shape[0], grid)
    return np.array([mask[edges[r]:edges[r + 1], edges[c]:edges[c + 1]].mean()
                     for r in range(grid) for c in range(grid)])


def cell_colors(image: Image.Image, grid: int = GRID) -> np.ndarray:
    """[grid * grid] raster order: per image-token cell, 1 + the index in COLOR_NAMES of the colour that
    covers most of the cell's shape pixels (the nearest base colour), or 0 where shapes cover less than a
    quarter of it. The background is the colour of the picture's corner pixel."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    occupied = np.abs(pixels - pixels[0, 0]).max(-1) > 24
    labels = np.zeros(occupied.shape, dtype=np.int64)
    labels[occupied] = ((pixels[occupied][:, None, :] - _BASE_RGB) ** 2).sum(-1).argmin(-1) + 1
    edges = _cell_edges(pixels.shape[0], grid)
    out = np.zeros(grid * grid, dtype=np.int64)
    for r in range(grid):
        for c in range(grid):
            cell = labels[edges[r]:edges[r + 1], edges[c]:edges[c + 1]]
            shape = cell[cell > 0]
            if shape.size >= cell.size / 4:
                out[r * grid + c] = np.bincount(shape).argmax()
    return out


def entity_cover(entities: tuple, side: int = SHAPEWORLD_SIDE, grid: int = GRID) -> np.ndarray:
    """[len(entities), grid * grid]: the share of each cell that each shape (drawn alone) covers."""
    return np.stack([_cell_share(draw_scene([entity], side).max(-1) > 24, grid) for entity in entities])


def agreement_pair(rng: np.random.Generator) -> list[Sample]:
    """A world with its true caption, and the same world with the caption's relation swapped (false: the
    generator places the shapes apart along the relation's axis)."""
    first, second, relation, ordered = random_scene(rng, SHAPEWORLD_SIDE)
    image = _image(draw_scene(ordered, SHAPEWORLD_SIDE))
    words = (first["color"], first["shape"], second["color"], second["shape"])
    named = (ordered.index(first), ordered.index(second))
    return [Sample(format_caption(*words, relation), image, True, tuple(ordered), named),
            Sample(format_caption(*words, FLIPPED_RELATION[relation]), image, False, tuple(ordered), named)]


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
    return samples[:count] if task != "agreement" else samples


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
    """A freshly initialised toy adapter of ``family`` (weights drawn with ``seed``): the family's classes at
    ``TOY_SHAPES`` widths, with eager attention (training reads the trained heads' attention) and, where the
    family has one, the vision encoder's position table scaled up (``position_scale``)."""
    from models import family_adapter

    cls = family_adapter(family)
    torch.manual_seed(seed)
    shapes = TOY_SHAPES[family]
    model, processor = cls.build_random(text=shapes["text"], vision=shapes["vision"], image_side=shapes["image_side"])
    if "position_scale" in shapes:
        # CLIP's table starts at std 0.02, too faint beside the patches for the image tokens to keep their place:
        # trained from it, the committed toy's image tokens told their column at chance (models/toy/README.md)
        with torch.no_grad():
            model.model.vision_tower.embeddings.position_embedding.weight.mul_(shapes["position_scale"])
    model.set_attn_implementation("eager")
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


def last_logits(adapter, samples: list[Sample]) -> torch.Tensor:
    """(B, vocab) fp32 logits at each sample's last prompt position (the answer's)."""
    from spatial_attention.engine.capture import plain_logits

    return plain_logits(adapter, adapter.encode([s.text for s in samples], [s.image for s in samples]))


@torch.no_grad()
def accuracy(adapter, samples: list[Sample], batch_size: int = 32) -> dict:
    """Share of samples answered right, reading yes/no as the instruments do (log-odds > 0)."""
    from spatial_attention.experiments.ablation_measure import log_odds, yes_no_ids

    yes, no = yes_no_ids(adapter.tokenizer)
    said = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        said += list(log_odds(last_logits(adapter, chunk), yes, no) > 0)
    truth = np.array([s.answer for s in samples])
    right = np.array(said) == truth
    on_yes = round(float(right[truth].mean()), 4) if truth.any() else None
    on_no = round(float(right[~truth].mean()), 4) if (~truth).any() else None
    return {"n": len(samples), "accuracy": round(float(right.mean()), 4), "accuracy_yes": on_yes,
            "accuracy_no": on_no,  # balanced: a yes-bias or a no-bias scores 0.5
            "balanced_accuracy": round((on_yes + on_no) / 2, 4) if None not in (on_yes, on_no) else None}
