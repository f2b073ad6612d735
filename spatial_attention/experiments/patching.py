"""Experiment 3's causal score (``head_attention_stats.py --score patching``): how much of a pair's answer
difference each head's output at the answer position carries.

The attention score (the paper's) asks where a head looks; on the toy models it misses the heads the answer
depends on: a head that always reads the named corner puts the same mass there whether the subject is there or
not, and only its output changes (docs/controls.md). This score measures that output's effect directly, by
activation patching (Meng et al. 2022, "Locating and editing factual associations in GPT"; Wang et al. 2023,
"Interpretability in the wild"):

For a pair's full and control image, one (layer, head) at a time, the head's output at the answer position
(its slice before o_proj) is swapped between the two images, and with log-odds LO = logsumexp(yes logits) -
logsumexp(no logits), read as the ablation reads them:

- score_full[l, h]    = LO_full    - LO_full    with head l.h's answer-position output from the control image;
- score_control[l, h] = LO_control - LO_control with head l.h's answer-position output from the full image;

so score_full - score_control = gap - gap after the swap, gap = LO_full - LO_control: the part of the
model's answer difference that passes through that head at the answer position (positive: the head carries
it; 0: swapping it changes nothing). The count cubes, the sign-flip test and ``--heads top:K`` then rank the
heads by it as they rank attention differences.

Exact, not a gradient estimate: attribution patching (the first-order estimate) was tried on the LLaVA toy
and ranked its heads wrongly (correlation 0.08 with the exact swap; one of its two causal heads got the wrong
sign). The price: one forward of the pair's two images per scored head, batched ``heads_per_forward`` heads
at a time with one unpatched copy of the pair, and each from the lowest layer of its batch of heads up (the
layers below, and the vision encoder, run once per pair: ``prefix.py``), at the answer position alone (a swap there
changes nothing before it: ``prefix.answer_logits``); ``--layers`` restricts the heads scored.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from spatial_attention.engine.capture import AttentionHook, greedy_answers
from spatial_attention.engine.prefix import answer_logits, run_prefix
from spatial_attention.experiments.ablation_measure import log_odds
from spatial_attention.run.cost import Forwards

Head = tuple[int, int]  # (layer, head), both 0-based


class AnswerOutputs(AttentionHook):
    """Edits nothing; keeps every language-model layer's per-head output at each sample's answer position."""

    def __init__(self, adapter, last: torch.Tensor):
        self.layer_of = {id(m): i for i, m in enumerate(adapter.lm_attention_modules())}
        self.last = last  # (B,) each sample's answer position
        self.outputs: dict[int, torch.Tensor] = {}  # layer -> (B, heads, head_dim)

    def edit_output(self, module, output):
        layer = self.layer_of.get(id(module))
        if layer is not None:
            self.outputs[layer] = output[torch.arange(len(self.last), device=output.device),
                                         self.last.to(output.device)].detach()
        return output


class AnswerSwap(AttentionHook):
    """Replaces, per sample (row), one head's output at the answer position with a given vector."""

    def __init__(self, adapter, last: torch.Tensor, heads: list[Head], fills: torch.Tensor):
        """Row i gets head ``heads[i]``'s answer-position output replaced by ``fills[i]`` (head_dim,)."""
        self.layer_of = {id(m): i for i, m in enumerate(adapter.lm_attention_modules())}
        self.rows_of: dict[int, torch.Tensor] = {}
        layers = torch.tensor([layer for layer, _ in heads])
        for layer in set(layers.tolist()):
            self.rows_of[layer] = torch.nonzero(layers == layer).flatten()
        self.last, self.heads, self.fills = last, torch.tensor([h for _, h in heads]), fills

    def edit_output(self, module, output):
        rows = self.rows_of.get(self.layer_of.get(id(module), -1))
        if rows is None:
            return output
        device = output.device
        edited = output.clone()
        # a call of one position is answer_logits's: the answer position
        at = self.last[rows].to(device) if output.shape[1] > 1 else torch.zeros(len(rows), dtype=torch.long,
                                                                                 device=device)
        edited[rows.to(device), at, self.heads[rows].to(device)] = self.fills[rows].to(device, output.dtype)
        return edited


@torch.inference_mode()
def pair_scores(adapter, batch, heads: list[Head], answer_ids: tuple[list[int], list[int]], heads_per_forward: int
                ) -> tuple[dict[Head, tuple[float, float]], tuple[float, float], tuple[str, str]]:
    """Per head of ``heads``: (score_full, score_control) as the module docstring defines them, for the pair
    encoded as ``batch``: its full image (or any input whose answer is yes), then its control (``encode_pair``);
    the pair's unpatched log-odds (full, control) and answers (the greedy first token of each)."""
    if len(batch) != 2:
        raise ValueError(f"pair_scores: a batch of {len(batch)} inputs, not one pair")
    last = torch.tensor([layout.last_position for layout in batch.layouts])
    chunks = head_chunks(heads, heads_per_forward)
    recorder = AnswerOutputs(adapter, last)
    # one forward of the pair: its logits, every head's answer-position output, and the input of each chunk's
    # lowest layer, from which only the layers above run again (prefix.py)
    prefixes, logits = run_prefix(adapter, batch, sorted({min(layer for layer, _ in chunk) for chunk in chunks}),
                                  recorder, keys_values=True)
    base = log_odds(logits, *answer_ids)
    said = tuple(greedy_answers(adapter, logits))
    scores = {}
    for chunk in chunks:
        rows = [head for head in chunk for _ in range(2)]  # per head: the full image, then the control image
        # the full image's row gets the control image's output of that head, and the other way round
        fills = torch.stack([recorder.outputs[layer][1 - kind, head].float().cpu()  # layers may lie on several GPUs
                             for layer, head in chunk for kind in range(2)])
        # one more, unpatched copy of the pair: each swap is compared with a forward of the same batch shape,
        # since a GPU's kernels (bf16 above all) round differently at another batch size
        copies = len(chunk) + 1
        swap = AnswerSwap(adapter, last.repeat(copies), rows, fills)
        prefix = prefixes[min(layer for layer, _ in chunk)]
        patched = log_odds(answer_logits(adapter, prefix, copies, swap), *answer_ids).reshape(copies, 2)
        unpatched = patched[-1]
        for head, after in zip(chunk, patched[:-1]):
            scores[head] = (float(unpatched[0] - after[0]), float(unpatched[1] - after[1]))
    return scores, (float(base[0]), float(base[1])), said


def head_chunks(heads: list[Head], heads_per_forward: int) -> list[list[Head]]:
    """The heads swapped together, one forward each."""
    return [heads[start:start + heads_per_forward] for start in range(0, len(heads), heads_per_forward)]


def planned_forwards(pairs: int, heads: list[Head], num_layers: int, heads_per_forward: int) -> list[Forwards]:
    """The forwards of ``pair_scores`` over ``pairs`` pairs scoring ``heads`` in a model of ``num_layers``
    layers: one whole forward of each pair, then per chunk of heads the pair's answer positions once per head and
    once unpatched, from the chunk's lowest layer up."""
    reruns = [Forwards(2 * (len(chunk) + 1) * pairs, 2 * (len(chunk) + 1),
                       num_layers - min(layer for layer, _ in chunk), full=False, answer_only=True)
              for chunk in head_chunks(heads, heads_per_forward)]
    return [Forwards(2 * pairs, 2, num_layers)] + reruns


def encode_pair(adapter, prompt: str, full: Image.Image, control: Image.Image):
    """A corner pair's two images with one prompt, as ``pair_scores`` takes it."""
    return adapter.encode([prompt] * 2, [full, control])


def score_cubes(scores: dict[Head, tuple[float, float]], layers: list[int], num_heads: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """``pair_scores``' scores as [len(layers), num_heads] arrays (full, control), layers 0-based."""
    full = np.array([[scores[(layer, h)][0] for h in range(num_heads)] for layer in layers])
    control = np.array([[scores[(layer, h)][1] for h in range(num_heads)] for layer in layers])
    return full, control
