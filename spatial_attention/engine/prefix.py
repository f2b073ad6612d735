"""Run a batch once up to a language-model layer, then many variants of the layers above it.

An edit that starts at layer L (a head ablation, a head swap) leaves everything
below it as it was: the vision encoder, the embeddings and layers 0 .. L-1. So
``run_prefix`` makes one forward of the batch and keeps, at a named point, the
input of layer L, for each L asked for (its hidden states and the keyword
arguments the model passed it: mask, position embeddings); ``upper_logits`` then
runs only layers L .. end and the LM head on that input, repeated ``times`` over
(samples a, b, a, b, ...), while a hook edits the attention outputs. The
layers are the model's own modules, called as the model calls them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from spatial_attention.engine.capture import AttentionHook, active, last_position_logits


@dataclass
class Prefix:
    """The input of language-model layer ``first`` for one batch (see the module docstring)."""

    first: int
    hidden: torch.Tensor  # (B, T, D)
    layer_kwargs: list[dict]  # per layer first .. end: the keyword arguments the model called it with
    last: list[int]  # each sample's last real position


@torch.inference_mode()
def run_prefix(adapter, batch, starts: list[int], hook: AttentionHook | None = None
               ) -> tuple[dict[int, Prefix], torch.Tensor]:
    """One forward of ``batch`` (with ``hook`` active, if any): (per layer of ``starts``, its input and every later
    layer's arguments; the last-position logits (B, V) fp32 on the CPU)."""
    layers = adapter.lm_layers()
    lowest = min(starts)
    hidden: dict[int, torch.Tensor] = {}
    layer_kwargs: dict[int, dict] = {}

    def keep(index):
        def pre_hook(module, args, kwargs):
            if index in starts:  # only these layers' hidden states: the others' would cost a copy per layer
                hidden[index] = args[0] if args else kwargs["hidden_states"]
            layer_kwargs[index] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        return pre_hook

    handles = [layers[i].register_forward_pre_hook(keep(i), with_kwargs=True) for i in range(lowest, len(layers))]
    try:
        with active(hook or AttentionHook()):
            logits = last_position_logits(adapter, batch)
    finally:
        for handle in handles:
            handle.remove()
    last = [lay.last_position for lay in batch.layouts]
    return {start: Prefix(start, hidden[start], [layer_kwargs[i] for i in range(start, len(layers))], last)
            for start in starts}, logits


@torch.inference_mode()
def upper_logits(adapter, prefix: Prefix, times: int, hook: AttentionHook | None = None) -> torch.Tensor:
    """Last-position logits (times * B, V) fp32 on the CPU of layers ``prefix.first`` .. end on the prefix's input
    repeated ``times`` over, with ``hook`` active."""
    batch = prefix.hidden.shape[0]
    repeated: dict[int, torch.Tensor] = {}  # the layers share their mask and position embeddings: repeat each once
    hidden = _repeat(prefix.hidden, times, batch, repeated)
    layers = adapter.lm_layers()[prefix.first:]
    with active(hook or AttentionHook()):
        for layer, kwargs in zip(layers, prefix.layer_kwargs):
            hidden = layer(hidden, **_repeat(kwargs, times, batch, repeated))
    last = torch.tensor(prefix.last * times, device=hidden.device)
    at_last = hidden[torch.arange(len(last), device=hidden.device), last][:, None]  # (times * B, 1, D)
    return adapter.lm_logits(at_last)[:, 0].float().cpu()


def _repeat(value, times: int, batch: int, repeated: dict[int, torch.Tensor]):
    """``value`` with every tensor whose first dimension is the batch repeated ``times`` over along it (a tensor
    broadcast over the batch, first dimension 1, is left as it is); in tuples, lists and dicts alike. ``repeated``
    keeps each tensor's repetition (by id), so that a tensor passed to every layer is repeated once."""
    if isinstance(value, torch.Tensor):
        if not (value.dim() and value.shape[0] == batch):
            return value
        if id(value) not in repeated:
            repeated[id(value)] = value.repeat(times, *[1] * (value.dim() - 1))
        return repeated[id(value)]
    if isinstance(value, (tuple, list)):
        return type(value)(_repeat(v, times, batch, repeated) for v in value)
    if isinstance(value, dict):
        return {k: _repeat(v, times, batch, repeated) for k, v in value.items()}
    return value
