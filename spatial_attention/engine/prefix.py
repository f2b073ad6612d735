"""Run a batch once up to a language-model layer, then many variants of the layers above it.

An edit that starts at layer L (a head ablation, a head swap) leaves everything
below it as it was: the vision encoder, the embeddings and layers 0 .. L-1. So
``run_prefix`` makes one forward of the batch and keeps, at a named point, the
input of layer L, for each L asked for (its hidden states and the keyword
arguments the model passed it: mask, position embeddings); ``upper_logits`` then
runs only layers L .. end and the LM head on that input, repeated ``times`` over
(samples a, b, a, b, ...), while a hook edits the attention outputs. The
layers are the model's own modules, called as the model calls them, with what
the model's forward adds between two layers added as it adds it
(``adapter.after_layer``: Qwen3-VL's DeepStack features, at the image tokens).

An edit of the answer position alone (``--score patching``'s swap, ``--positions
answer``'s ablation) changes nothing before it: in a causal model no earlier
position sees a later one. So ``answer_logits`` runs only each input's last real
position through layers L .. end, one token a row instead of the whole input:
its attention reads the keys and values of the earlier positions that the
prefix's forward computed (``run_prefix(keys_values=True)`` keeps them, as the
attention function received them), handed to the model's attention through its
``cache`` argument, as generation hands a cache to it. Its hooks see a call of one
query position: the answer position. (What ``after_layer`` adds goes to image
tokens, never to the answer position, and reaches it through those keys.)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from spatial_attention.engine.capture import AttentionHook, active, last_position_logits, timed_forward


@dataclass
class Prefix:
    """The input of language-model layer ``first`` for one batch (see the module docstring)."""

    first: int
    hidden: torch.Tensor  # (B, T, D)
    layer_kwargs: list[dict]  # per layer first .. end: the keyword arguments the model called it with
    last: list[int]  # each sample's last real position
    lm_inputs: dict  # the keyword arguments the language model was called with (adapter.after_layer reads them)
    keys_values: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # per layer first .. end, (B, kv, T, d) each


class _KeysValues(AttentionHook):
    """``hook``, which also keeps the keys and values of the attention modules ``layer_of`` names."""

    def __init__(self, hook: AttentionHook, layer_of: dict[int, int]):
        self.hook, self.layer_of, self.kept = hook, layer_of, {}

    def query_rows(self, module, query_shape):
        return self.hook.query_rows(module, query_shape)

    def observe(self, module, probs):
        self.hook.observe(module, probs)

    def edit_output(self, module, output):
        return self.hook.edit_output(module, output)

    def keys_values(self, module, key, value):
        if id(module) in self.layer_of:
            self.kept[self.layer_of[id(module)]] = (key, value)
        self.hook.keys_values(module, key, value)


@torch.inference_mode()
def run_prefix(adapter, batch, starts: list[int], hook: AttentionHook | None = None, keys_values: bool = False
               ) -> tuple[dict[int, Prefix], torch.Tensor]:
    """One forward of ``batch`` (with ``hook`` active, if any): (per layer of ``starts``, its input and every later
    layer's arguments, with ``keys_values`` also their keys and values (for ``answer_logits``); the last-position
    logits (B, V) fp32 on the CPU)."""
    layers = adapter.lm_layers()
    lowest = min(starts)
    hook = hook or AttentionHook()
    if keys_values:
        hook = _KeysValues(hook, {id(m): i for i, m in enumerate(adapter.lm_attention_modules()) if i >= lowest})
    hidden: dict[int, torch.Tensor] = {}
    layer_kwargs: dict[int, dict] = {}

    def keep(index):
        def pre_hook(module, args, kwargs):
            if index in starts:  # only these layers' hidden states: the others' would cost a copy per layer
                hidden[index] = args[0] if args else kwargs["hidden_states"]
            layer_kwargs[index] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        return pre_hook

    lm_inputs = {}
    handles = [layers[i].register_forward_pre_hook(keep(i), with_kwargs=True) for i in range(lowest, len(layers))]
    handles.append(adapter.language_model().register_forward_pre_hook(
        lambda module, args, kwargs: lm_inputs.update(kwargs), with_kwargs=True))
    try:
        with active(hook):
            logits = last_position_logits(adapter, batch)
    finally:
        for handle in handles:
            handle.remove()
    last = [lay.last_position for lay in batch.layouts]
    kept = hook.kept if keys_values else None
    return {start: Prefix(start, hidden[start], [layer_kwargs[i] for i in range(start, len(layers))], last,
                          lm_inputs, [kept[i] for i in range(start, len(layers))] if kept else None)
            for start in starts}, logits


@torch.inference_mode()
def upper_logits(adapter, prefix: Prefix, times: int, hook: AttentionHook | None = None) -> torch.Tensor:
    """Last-position logits (times * B, V) fp32 on the CPU of layers ``prefix.first`` .. end on the prefix's input
    repeated ``times`` over, with ``hook`` active."""
    batch = prefix.hidden.shape[0]
    repeated: dict[int, torch.Tensor] = {}  # the layers share their mask and position embeddings: repeat each once
    hidden = _repeat(prefix.hidden, times, batch, repeated)
    layers = adapter.lm_layers()[prefix.first:]
    with active(hook or AttentionHook()), timed_forward():
        for index, (layer, kwargs) in enumerate(zip(layers, prefix.layer_kwargs), prefix.first):
            hidden = layer(hidden, **_repeat(kwargs, times, batch, repeated))
            hidden = adapter.after_layer(index, hidden, prefix.lm_inputs, times)
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


@torch.inference_mode()
def answer_logits(adapter, prefix: Prefix, times: int, hook: AttentionHook | None = None) -> torch.Tensor:
    """``upper_logits`` for an edit of the answer positions alone (see the module docstring): the same logits
    (times * B, V), with only each input's last real position run through layers ``prefix.first`` .. end."""
    if prefix.keys_values is None:
        raise ValueError("answer_logits needs the prefix's keys and values: run_prefix(..., keys_values=True)")
    batch, length = prefix.hidden.shape[:2]
    last = torch.tensor(prefix.last, device=prefix.hidden.device)
    hidden = prefix.hidden[torch.arange(batch, device=last.device), last][:, None].repeat(times, 1, 1)
    layers = adapter.lm_layers()[prefix.first:]
    at_answer: dict[int, object] = {}  # the layers share their mask and position embeddings: each taken once
    with active(hook or AttentionHook()), timed_forward():
        for layer, kwargs, (keys, values) in zip(layers, prefix.layer_kwargs, prefix.keys_values):
            hidden = layer(hidden, **_answer_kwargs(kwargs, last, length, times, at_answer),
                           cache=_EarlierPositions(keys, values, times))
        return adapter.lm_logits(hidden)[:, 0].float().cpu()


class _EarlierPositions:
    """One layer's keys and values of the prefix's positions, as the model's attention takes a cache: it hands
    over the answer position's own and attends to them appended, at key index T (``_answer_mask``)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, times: int):
        self.keys, self.values, self.times = keys, values, times

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, **kwargs):
        return self._joined(self.keys, key), self._joined(self.values, value)

    def _joined(self, kept: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """(times * B, kv, T + 1, d): ``kept`` (B, kv, T, d) once per copy, then each row's ``new`` (one write of
        the copies, not a repeat and then a concatenation)."""
        batch, heads, length, dim = kept.shape
        joined = kept.new_empty(self.times * batch, heads, length + 1, dim)
        joined.view(self.times, batch, heads, length + 1, dim)[:, :, :, :length] = kept
        joined[:, :, length:] = new
        return joined


def _answer_kwargs(kwargs: dict, last: torch.Tensor, length: int, times: int, done: dict) -> dict:
    """A layer's keyword arguments for the answer positions ``last`` alone, repeated ``times`` over."""
    out = {}
    for name, value in {"attention_mask": None, **kwargs}.items():  # no mask (no padding) is sdpa's causal rule
        if name in ("cache", "use_cache", "logits_to_keep"):  # ours, and the LM head's (passed down unused)
            continue
        if name == "attention_mask" or isinstance(value, torch.Tensor) or (isinstance(value, (tuple, list)) and
                                               any(isinstance(v, torch.Tensor) for v in value)):
            key = (name, tuple(map(id, value)) if isinstance(value, (tuple, list)) else id(value))
            if key not in done:
                done[key] = _at_answer(name, value, last, length, times)
            value = done[key]
        out[name] = value
    return out


def _at_answer(name: str, value, last: torch.Tensor, length: int, times: int):
    """One layer argument at the answer positions: the mask's rows of them (``_answer_mask``), the position
    embeddings' and ids' entries at them; an argument of another name is refused (its layout is not known)."""
    if name == "attention_mask":
        return _answer_mask(value, last, length).repeat(times, 1, 1, 1)
    if name == "position_embeddings":  # (cos, sin), each (B or 1, T, d)
        return type(value)(_entries(v, last, -2).repeat(times, 1, 1) for v in value)
    if name == "position_ids":  # (B or 1, T), or (sections, B or 1, T)
        picked = _entries(value, last, -1)
        return picked.repeat(*[1] * (picked.dim() - 2), times, 1)
    raise ValueError(f"answer_logits: the language model's layers take an argument {name!r} whose layout is not "
                     "known here; rerun the whole upper layers instead (upper_logits)")


def _entries(tensor: torch.Tensor, last: torch.Tensor, dim: int) -> torch.Tensor:
    """``tensor``'s entries at each input's position ``last[b]`` along ``dim`` (negative), which keeps size 1;
    the batch is the dimension before it (a broadcast row of 1 serves every input)."""
    shape = list(tensor.shape)
    shape[dim - 1] = len(last)
    index_shape = [1] * len(shape)
    index_shape[dim - 1] = len(last)
    target = shape.copy()
    target[dim] = 1
    index = last.to(tensor.device).view(index_shape).expand(target)
    expanded = tensor.expand(shape)
    return expanded.gather(dim, index)


def _answer_mask(mask: torch.Tensor | None, last: torch.Tensor, length: int) -> torch.Tensor:
    """The boolean mask (B, 1 or heads, 1, T + 1) of each input's answer position over the prefix's T positions
    and its own new key at index T: its row of the layer's mask (sdpa's causal rule where there is none), less its
    own old key, whose keys and values the upper layers recompute."""
    rows = torch.arange(len(last), device=last.device)
    if mask is None:
        earlier = (torch.arange(length, device=last.device) < last[:, None])[:, None]  # (B, 1, T)
    elif mask.dtype == torch.bool:  # (on the embeddings' GPU under --device-map: the indices go there)
        mask = mask.expand(len(last), *mask.shape[1:])
        rows, last = rows.to(mask.device), last.to(mask.device)
        earlier = mask[rows, :, last, :length].clone()  # (B, 1 or heads, T)
        earlier[rows, :, last] = False
    else:
        raise ValueError(f"answer_logits: an attention mask of dtype {mask.dtype}; the registered mask function "
                         "(sdpa's) makes boolean ones")
    own = torch.ones(*earlier.shape[:2], 1, dtype=torch.bool, device=earlier.device)
    return torch.cat([earlier, own], -1)[:, :, None]
