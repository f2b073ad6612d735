"""Run a batch once up to a language-model layer, then many variants of the layers above it.

An edit that starts at layer L (a head ablation, a head swap) leaves everything
below it as it was: the vision encoder, the embeddings and layers 0 .. L-1. So
``run_prefix`` makes one plain forward of the batch and keeps, at a named point,
the input of layer L (its hidden states and the keyword arguments the model
passed it: mask, position embeddings); ``upper_logits`` then runs only layers
L .. end and the LM head on that input, repeated ``times`` over (samples in
``Adapter.repeat_batch`` order), while a hook edits the attention outputs. The
layers are the model's own modules, called as the model calls them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from spatial_attention.capture import AttentionHook, active, last_position_logits


@dataclass
class Prefix:
    """The input of language-model layer ``first`` for one batch (see the module docstring)."""

    first: int
    hidden: torch.Tensor  # (B, T, D)
    layer_kwargs: list[dict]  # per layer first .. end: the keyword arguments the model called it with
    last: list[int]  # each sample's last real position


@torch.inference_mode()
def run_prefix(adapter, batch, first: int) -> tuple[Prefix, torch.Tensor]:
    """One plain forward of ``batch``: (the input of layer ``first`` and every later layer's arguments, the
    last-position logits (B, V) fp32 on the CPU)."""
    layers = adapter.lm_layers()
    seen: dict[int, tuple[tuple, dict]] = {}

    def keep(index):
        def hook(module, args, kwargs):
            seen[index] = (args, kwargs)
        return hook

    handles = [layers[i].register_forward_pre_hook(keep(i), with_kwargs=True) for i in range(first, len(layers))]
    try:
        logits = last_position_logits(adapter, batch)
    finally:
        for handle in handles:
            handle.remove()
    args, kwargs = seen[first]
    hidden = args[0] if args else kwargs["hidden_states"]
    layer_kwargs = [{k: v for k, v in seen[i][1].items() if k != "hidden_states"} for i in range(first, len(layers))]
    return Prefix(first, hidden, layer_kwargs, [lay.last_position for lay in batch.layouts]), logits


@torch.inference_mode()
def upper_logits(adapter, prefix: Prefix, times: int, hook: AttentionHook | None = None) -> torch.Tensor:
    """Last-position logits (times * B, V) fp32 on the CPU of layers ``prefix.first`` .. end on the prefix's input
    repeated ``times`` over, with ``hook`` active."""
    batch = prefix.hidden.shape[0]
    hidden = _repeat(prefix.hidden, times, batch)
    layers = adapter.lm_layers()[prefix.first:]
    with active(hook or AttentionHook()):
        for layer, kwargs in zip(layers, prefix.layer_kwargs):
            hidden = layer(hidden, **_repeat(kwargs, times, batch))
    last = torch.tensor(prefix.last * times, device=hidden.device)
    at_last = hidden[torch.arange(len(last), device=hidden.device), last][:, None]  # (times * B, 1, D)
    return adapter.lm_logits(at_last)[:, 0].float().cpu()


def _repeat(value, times: int, batch: int):
    """``value`` with every tensor whose first dimension is the batch repeated ``times`` over along it (a tensor
    broadcast over the batch, first dimension 1, is left as it is); in tuples, lists and dicts alike."""
    if isinstance(value, torch.Tensor):
        return value.repeat(times, *[1] * (value.dim() - 1)) if value.dim() and value.shape[0] == batch else value
    if isinstance(value, (tuple, list)):
        return type(value)(_repeat(v, times, batch) for v in value)
    if isinstance(value, dict):
        return {k: _repeat(v, times, batch) for k, v in value.items()}
    return value
