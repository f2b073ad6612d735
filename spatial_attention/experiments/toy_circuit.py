"""The toys' known circuit: how a toy is trained to check a caption's relation through named heads, and the
probes that show, after training, that each head does its job (models/toy/README.md, docs/controls.md).

A toy answers "is the caption's relation true of the picture?" along a path trained head by head (``JOBS``), so
that every instrument can be scored on whether it finds it. Heads are (layer, head), 0-based; the reports write
layers from 1 ("1.0", "2.0", "3.1", "3.2", "3.3"):

- ``COLOUR_HEAD`` (0, 0): at each mention's shape word, onto its colour word, so that the shape word knows
  which colour to look for;
- ``BINDING_HEAD`` (1, 0): at each mention's shape word (and its colour word where the two colours differ),
  onto the named shape's image tokens; the layer's output there holds that shape's centre (``place``);
- ``MENTION_HEADS`` (2, 1) and (2, 2): at the answer position, onto the first and the second mention's shape
  word, and ``RELATION_HEAD`` (2, 3) onto the relation word; the layer's output there holds both centres
  (``answer_places``), whether the first shape is left of and above the second (``sign``) and the relation word;
  the last layer answers from them.

Beside them the image tokens learn what the words need: each cell's colour word at the output (as the first toys
did), its place where the binding head reads it (``GRID_STATE``), its shape there and at the last layer.
Every target but the colour words and the attention is read by a linear probe on RMS-normalised hidden states;
the probes are trained with the model and discarded. Hidden state k is layer k-1's output (0: the language
model's input), as ``output_hidden_states`` counts them.
"""
from __future__ import annotations

import logging

import numpy as np
import torch
from torch.nn import functional
from tqdm import tqdm

from spatial_attention.data.shapeworld import COLORS, RELATIONS, SHAPES, parse_caption
from spatial_attention.experiments import toy

log = logging.getLogger("spatial_attention")

COLOUR_HEAD, BINDING_HEAD, MENTION_HEADS, RELATION_HEAD = (0, 0), (1, 0), ((2, 1), (2, 2)), (2, 3)
# each trained head: the loss its attention mass on its target (``attention_targets``) is trained under, its job
JOBS = {COLOUR_HEAD: ("colour", "at each mention's shape word, onto its colour word"),
        BINDING_HEAD: ("binding", "at each mention's words, onto the named shape's image tokens"),
        MENTION_HEADS[0]: ("mention", "at the answer, onto the first mention's shape word"),
        MENTION_HEADS[1]: ("mention", "at the answer, onto the second mention's shape word"),
        RELATION_HEAD: ("relation", "at the answer, onto the relation word")}
PLACE_STATE = 2  # hidden state (layer 1's output) at the mention words: the named shape's centre
ANSWER_STATE = 3  # hidden state (layer 2's output) at the answer: both centres, and their left / above signs
# where an image token's place is taught: after layer 0, where the binding head reads it. LLaVA's CLIP tokens bring
# it in (a position table), Qwen2-VL's arrive as M-RoPE rotations; taught at LLaVA's input instead, the named
# shape's place at the mention words stayed imprecise (layer 0 mixes earlier image tokens into each)
GRID_STATE = 1
WEIGHTS = {"cells": 0.5, "grid": 0.5, "shapes": 0.5}  # every other loss weighs 1
# the vision encoder and projector learn at a tenth of the rate: at the full rate their tokens lost their place
# within 10 steps (a fresh probe read the cell's row and column at chance) and had not regained it at step 400
VISION_RATE = 0.1
VISION_MODULES = ("model.vision_tower.", "model.multi_modal_projector.", "model.visual.")  # LLaVA's, Qwen2-VL's
WARMUP, DECAY = 0.05, 0.2  # shares of a stage's steps: linear warm-up, flat, then linear decay to 0
POLISH = (2 / 9, 0.5)  # the second stage: its share of the steps and of the peak rate, with a fresh optimiser
SIGN_MARGIN = 0.5 / toy.GRID  # a left/above target only where the centres differ by half a cell or more


class Probes(torch.nn.Module):
    """The training-only linear read-outs (discarded after training)."""

    def __init__(self, width: int):
        super().__init__()
        self.grid = torch.nn.Linear(width, 2)  # an image token's cell centre (x, y), fractions of the side
        self.shapes = torch.nn.Linear(width, 1 + len(SHAPES))  # its cell's shape (0: background), at the output
        self.shapes_in = torch.nn.Linear(width, len(SHAPES))  # a shape cell's shape where the language model reads it
        self.place = torch.nn.Linear(width, 2)  # at a mention word: the named shape's centre (x, y)
        self.sign = torch.nn.Linear(width, 4)  # first left of second (no, yes), first above second (no, yes)
        self.places = torch.nn.Linear(width, 4)  # the first and the second named shape's centres (x, y, x, y)
        self.relation = torch.nn.Linear(width, len(RELATIONS))  # the caption's relation word

    @staticmethod
    def read(layer: torch.nn.Linear, states: torch.Tensor) -> torch.Tensor:
        return layer(functional.rms_norm(states.float(), (states.shape[-1],)))


def colour_word_ids(adapter) -> torch.Tensor:
    """[1 + colours]: the token an image position learns, per ``cell_colors`` label: the no token on the
    background, else the colour word as it reads inside a caption ("a red square")."""
    words = [adapter.tokenizer(f"a {name}", add_special_tokens=False)["input_ids"][-1] for name in COLORS]
    return torch.tensor([toy.answer_tokens(adapter)[1]] + words)


def _last(layout, word: str, occurrence: int = 0) -> int:
    return int(layout.word_positions(word, occurrence)[-1])


def mention_words(sample: toy.Sample, layout) -> list[tuple[int, int, str]]:
    """(token position, index into ``sample.entities``, "shape" or "colour") of each word the binding head is
    trained at, in a caption: each mention's shape word (its last token) and, where the two colours differ, its
    colour word."""
    if len(sample.named) != 2:
        return []
    caption = parse_caption(sample.text)
    out = [(_last(layout, caption.shape1), sample.named[0], "shape"),
           (_last(layout, caption.shape2), sample.named[1], "shape")]
    if caption.color1 != caption.color2:
        out += [(_last(layout, caption.color1), sample.named[0], "colour"),
                (_last(layout, caption.color2), sample.named[1], "colour")]
    return out


def attention_targets(sample: toy.Sample, layout) -> dict[tuple[int, int], list[tuple[int, np.ndarray]]]:
    """Per trained head (``JOBS``): (query position, the key positions it should attend to) of each of its
    trained rows in this sample. Exists questions train the colour head only ("is there a red square ?": at
    "square", onto "red")."""
    if sample.text.startswith("is there a "):
        colour, shape = sample.text.split()[3:5]
        return {COLOUR_HEAD: [(_last(layout, shape), np.array([_last(layout, colour)]))]}
    if len(sample.named) != 2:
        return {}
    caption = parse_caption(sample.text)
    shape_words = [_last(layout, caption.shape1), _last(layout, caption.shape2)]
    colour_words = [_last(layout, caption.color1), _last(layout, caption.color2, int(caption.color1 == caption.color2))]
    cover = toy.entity_cover(sample.entities) > 0
    return {COLOUR_HEAD: [(s, np.array([c])) for s, c in zip(shape_words, colour_words)],
            BINDING_HEAD: [(position, layout.image_positions[cover[entity]])
                           for position, entity, _ in mention_words(sample, layout)],
            **{head: [(layout.last_position, np.array([word]))] for head, word in zip(MENTION_HEADS, shape_words)},
            RELATION_HEAD: [(layout.last_position, np.array([_last(layout, caption.relation)]))]}


def signs(sample: toy.Sample) -> list[int]:
    """[left, above] targets (0/1) of a caption's first named shape against its second; -100 (ignored) where
    the centres are closer than ``SIGN_MARGIN`` on that axis."""
    first, second = (sample.entities[k]["center"] for k in sample.named)
    return [int(first[axis] < second[axis]) if abs(first[axis] - second[axis]) >= SIGN_MARGIN else -100
            for axis in (0, 1)]


def coordinate_loss(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error of (x, y) fractions of the side, over the variance of a uniform place (1: no knowledge).
    A coordinate, not a class per row: averaged by attention over a shape's cells it gives the shape's centre
    (with a row and a column class per cell, the place at the mention words stayed near chance)."""
    return ((predicted - target) ** 2).mean() * 12


def batch_losses(adapter, probes: Probes, colour_ids: torch.Tensor, samples: list[toy.Sample],
                 tasks: list[str]) -> dict[str, torch.Tensor]:
    """The batch's losses: the answer's cross-entropy per task, and the circuit's targets (module docstring)."""
    yes, no = toy.answer_tokens(adapter)
    batch = adapter.encode([s.text for s in samples], [s.image for s in samples])
    output = adapter.model(**batch.inputs, output_hidden_states=True, output_attentions=True, use_cache=False)
    states, attentions, layouts = output.hidden_states, output.attentions, batch.layouts
    last = torch.tensor([layout.last_position for layout in layouts])
    answers = functional.cross_entropy(output.logits[torch.arange(len(samples)), last].float(),
                                       torch.tensor([yes if s.answer else no for s in samples]), reduction="none")
    losses = {task: answers[torch.tensor([t == task for t in tasks])].mean() for task in toy.TASKS if task in tasks}

    image_rows = torch.cat([torch.full((layout.image_positions.size,), b) for b, layout in enumerate(layouts)])
    image_columns = torch.cat([torch.as_tensor(layout.image_positions) for layout in layouts])
    colours = torch.cat([colour_ids[torch.as_tensor(toy.cell_colors(adapter.prepare_image(s.image)))] for s in samples])
    losses["cells"] = functional.cross_entropy(output.logits[image_rows, image_columns].float(), colours)
    grid_state = states[GRID_STATE]
    cell = torch.arange(toy.GRID * toy.GRID).repeat(len(samples))
    losses["grid"] = coordinate_loss(Probes.read(probes.grid, grid_state[image_rows, image_columns]),
                                     torch.stack([(cell % toy.GRID + 0.5) / toy.GRID,
                                                  (cell // toy.GRID + 0.5) / toy.GRID], -1))

    worlds = [b for b, s in enumerate(samples) if s.entities]
    if worlds:  # each cell's shape (0: background) where the shapes cover a quarter of it or more
        owners = torch.cat([torch.full((layouts[b].image_positions.size,), b) for b in worlds])
        positions = torch.cat([torch.as_tensor(layouts[b].image_positions) for b in worlds])
        labels = torch.cat([torch.as_tensor(cell_shapes(samples[b].entities)) for b in worlds])
        losses["shapes"] = functional.cross_entropy(Probes.read(probes.shapes, states[-1][owners, positions]), labels)
        on_shape = labels > 0  # where the language model reads them, the shapes' cells alone (not swamped)
        losses["shapes_in"] = functional.cross_entropy(
            Probes.read(probes.shapes_in, grid_state[owners[on_shape], positions[on_shape]]), labels[on_shape] - 1)

    targets = [attention_targets(s, layout) for s, layout in zip(samples, layouts)]
    by_loss: dict[str, list[torch.Tensor]] = {}
    for (layer, head), (name, _) in JOBS.items():
        rows = [(b, query, keys) for b, t in enumerate(targets) for query, keys in t.get((layer, head), [])]
        if rows:
            mask = torch.zeros(len(rows), attentions[layer].shape[-1])
            for r, (_, _, keys) in enumerate(rows):
                mask[r, keys] = 1.0
            picked = attentions[layer][torch.tensor([b for b, _, _ in rows]), head, torch.tensor([q for _, q, _ in rows])]
            by_loss.setdefault(name, []).append(-torch.log((picked * mask).sum(-1) + 1e-6))
    losses.update({name: torch.cat(values).mean() for name, values in by_loss.items()})

    mentions = [(b, position, entity) for b in worlds for position, entity, _ in mention_words(samples[b], layouts[b])]
    if mentions:
        place = Probes.read(probes.place, states[PLACE_STATE][torch.tensor([b for b, _, _ in mentions]),
                                                               torch.tensor([p for _, p, _ in mentions])])
        losses["place"] = coordinate_loss(place, torch.tensor([samples[b].entities[e]["center"]
                                                               for b, _, e in mentions], dtype=torch.float32))
    captions = [b for b in worlds if len(samples[b].named) == 2]
    if captions:
        at_answer = states[ANSWER_STATE][torch.tensor(captions), last[captions]]
        centres = [[c for k in samples[b].named for c in samples[b].entities[k]["center"]] for b in captions]
        losses["answer_places"] = coordinate_loss(Probes.read(probes.places, at_answer),
                                                  torch.tensor(centres, dtype=torch.float32))
        losses["relation_word"] = functional.cross_entropy(Probes.read(probes.relation, at_answer), torch.tensor(
            [RELATIONS.index(parse_caption(samples[b].text).relation) for b in captions]))
        sign, truth = Probes.read(probes.sign, at_answer), torch.tensor([signs(samples[b]) for b in captions])
        losses["sign"] = sum(functional.cross_entropy(sign[:, 2 * axis:2 * axis + 2], truth[:, axis],
                                                      ignore_index=-100)
                             for axis in (0, 1) if (truth[:, axis] >= 0).any()) / 2
    return losses


def cell_shapes(entities: tuple) -> np.ndarray:
    """[GRID * GRID]: per cell, 1 + the SHAPES index of the shape covering most of it where shapes cover a quarter
    of it or more, else 0."""
    cover = toy.entity_cover(entities)
    shape_index = np.array([1 + SHAPES.index(e["shape"]) for e in entities])
    return np.where(cover.max(0) >= 0.25, shape_index[cover.argmax(0)], 0)


def learning_rate_scale(step: int, steps: int) -> float:
    """Linear warm-up over ``WARMUP`` of the steps, flat, then linear decay to 0 over the last ``DECAY``."""
    warmup, decay_from = max(1, int(WARMUP * steps)), int((1 - DECAY) * steps)
    if step < warmup:
        return (step + 1) / warmup
    if step < decay_from:
        return 1.0
    return max(0.0, (steps - step) / max(1, steps - decay_from))


def stages(steps: int, lr: float) -> list[tuple[int, float]]:
    """(steps, peak rate) of each stage: the main one, then ``POLISH`` of the steps at a lower rate."""
    polish = int(round(POLISH[0] * steps))
    return [(n, rate) for n, rate in ((steps - polish, lr), (polish, lr * POLISH[1])) if n > 0]


def train(adapter, seed: int, steps: int, batch_size: int, lr: float) -> dict[str, list[float]]:
    """The plain torch loop over ``stages``: each an AdamW (weight decay 0.01, clipping at 1) of its own with
    ``learning_rate_scale``, the vision side at ``VISION_RATE`` of the rate, on the answer's cross-entropy plus
    the circuit's losses (``batch_losses``). Returns every loss per step."""
    model = adapter.model.train()
    probes = Probes(model.config.text_config.hidden_size)
    colour_ids = colour_word_ids(adapter)
    vision = [p for name, p in model.named_parameters() if name.startswith(VISION_MODULES)]
    rest = [p for name, p in model.named_parameters() if not name.startswith(VISION_MODULES)]
    parameters = vision + rest + list(probes.parameters())
    history: dict[str, list[float]] = {}
    step = 0
    bar = tqdm(total=steps, desc="train", unit="step")
    for stage_steps, rate in stages(steps, lr):
        optimizer = torch.optim.AdamW([{"params": vision, "lr": rate * VISION_RATE},
                                       {"params": rest + list(probes.parameters())}], lr=rate, weight_decay=0.01)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s, n=stage_steps: learning_rate_scale(s, n))
        for _ in range(stage_steps):
            samples, tasks = toy.batch_samples(seed, step, batch_size)
            losses = batch_losses(adapter, probes, colour_ids, samples, tasks)
            loss = sum(WEIGHTS.get(name, 1.0) * value for name, value in losses.items())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, 1.0)
            optimizer.step()
            schedule.step()
            for name, value in losses.items():
                history.setdefault(name, []).append(value.item())
            history.setdefault("total", []).append(loss.item())
            if step % 50 == 0:
                bar.set_postfix({name: f"{np.mean(v[-50:]):.2f}" for name, v in history.items()})
            if step % 100 == 0:
                log.debug("step %d: %s", step, {name: round(float(np.mean(v[-100:])), 3) for name, v in history.items()})
            step += 1
            bar.update()
    bar.close()
    model.eval()
    return history


def every_100(history: dict[str, list[float]]) -> dict[str, list[float]]:
    """Each loss's mean over each run of 100 steps (a loss absent from a step counts where present)."""
    return {name: [round(float(np.mean(values[i:i + 100])), 4) for i in range(0, len(values), 100)]
            for name, values in history.items()}


def head_name(layer: int, head: int) -> str:
    """A head as the reports write it: layers from 1."""
    return f"{layer + 1}.{head}"


def circuit_probes(adapter, samples: list[toy.Sample], batch_size: int = 16) -> dict[str, dict]:
    """Whether each trained head does its job on ``samples``: per head (``JOBS``), its mean attention mass on its
    targets (``attention_targets``), beside the other heads of its layer on the same rows and beside uniform
    attention over the keys each row sees. Read with the capture engine (the exact rows the model computes), as
    every instrument reads attention. For the binding head also: its mass by the word (shape or colour), its mass
    on the caption's other shape, and its specificity (named minus other) beside the other heads' best."""
    from spatial_attention.engine.capture import CaptureRequest, capture

    layers = sorted({layer for layer, _ in JOBS})
    masses = {head: [] for head in JOBS}  # per trained head: per row, [heads of its layer]
    uniform = {head: [] for head in JOBS}
    words, elsewhere = [], []  # the binding head's rows: "shape" or "colour"; [heads] mass on the other shape
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        batch = adapter.encode([s.text for s in chunk], [s.image for s in chunk])
        targets = [attention_targets(s, layout) for s, layout in zip(chunk, batch.layouts)]
        request = CaptureRequest(layers=layers, keep="layer_head", blocks={
            head_name(*head): [(np.array([q for q, _ in t.get(head, [])], np.int64), np.arange(layout.length))
                               for t, layout in zip(targets, batch.layouts)] for head in JOBS})
        recorded, _ = capture(adapter, batch, request)
        for sample, layout, t, record in zip(chunk, batch.layouts, targets, recorded):
            for (layer, head), rows in t.items():
                block = record[head_name(layer, head)][layers.index(layer)]  # [heads, rows, keys]
                for r, (query, keys) in enumerate(rows):
                    masses[(layer, head)].append(block[:, r, keys].sum(-1))
                    uniform[(layer, head)].append(len(keys) / (query + 1))
            cover = toy.entity_cover(sample.entities) > 0 if sample.entities else None
            for r, (_, entity, word) in enumerate(mention_words(sample, layout)):
                other = sum(sample.named) - entity  # the caption's other named shape, its cells that are not this one's
                block = record[head_name(*BINDING_HEAD)][layers.index(BINDING_HEAD[0])]
                elsewhere.append(block[:, r, layout.image_positions[cover[other] & ~cover[entity]]].sum(-1))
                words.append(word)
    out = {}
    for (layer, head), (_, job) in JOBS.items():
        if not masses[(layer, head)]:
            continue
        per_row = np.stack(masses[(layer, head)])
        mass, others = per_row.mean(0), np.delete(per_row.mean(0), head)
        out[head_name(layer, head)] = {
            "job": job, "n": len(per_row), "mass": round(float(mass[head]), 4),
            "other_heads_max": round(float(others.max()), 4), "other_heads_mean": round(float(others.mean()), 4),
            "uniform": round(float(np.mean(uniform[(layer, head)])), 4)}
        if (layer, head) == BINDING_HEAD:  # on the named shape, less on the other one: binding, not salience
            kinds, specific = np.array(words), per_row - np.stack(elsewhere)
            out[head_name(layer, head)].update(
                mass_by_word={kind: round(float(per_row[kinds == kind, head].mean()), 4)
                              for kind in ("shape", "colour") if (kinds == kind).any()},
                other_shape_mass=round(float(np.stack(elsewhere)[:, head].mean()), 4),
                specificity=round(float(specific[:, head].mean()), 4),
                other_heads_max_specificity=round(float(np.delete(specific.mean(0), head).max()), 4),
                most_specific_other_head=head_name(layer, int(np.argmax(np.where(
                    np.arange(per_row.shape[1]) == head, -np.inf, specific.mean(0))))))
    return out
