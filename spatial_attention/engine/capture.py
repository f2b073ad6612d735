"""The attention-capture engine: exact reductions of attention, computed on the
device while the model runs, never the full per-layer tensors.

How it works. transformers 5 looks a model's attention function up by name. We
register one name, ``spatial_attention``, for every attention module of both
families (the Llama / Qwen2 language models, CLIP, the Qwen2-VL ViT) and load
the models with it, with sdpa's mask function. Every layer's output comes from
the same sdpa call the plain model makes, so a captured forward is the plain
forward, kernel for kernel. For a recorded layer the engine also computes, in
fp32, the attention rows of just the query positions the request reads:
softmax(q_rows k^T * scaling + mask rows) over the full key range, with each
query head against its KV head (grouped-query attention) and the mask rows
taken from the layer's own mask (or sdpa's causal rule where it has none). That
is O(rows x T) work and memory per layer instead of O(T^2). The rows are reduced
on the device and dropped.

Recorded points (all per sample, on the device, fp32):

- ``blocks[name]``: the attention of chosen query rows onto chosen key columns
  of the language model (e.g. caption tokens x image tokens, seed cells x
  image), averaged over heads and the selected layers (``keep="mean"``), or
  kept per layer (``"layer"``) or per layer and head (``"layer_head"``); the
  heads are every head of a layer, or the request's ``heads`` of each;
- ``last_mass``: per (selected layer, head), the attention mass of the last
  real position onto chosen key columns (the corner experiments' head score);
- ``vision``: the vision encoder's self-attention rows of chosen image-token
  grid cells (``vision_cells``), per layer: head mean, mapped to the grid by the
  adapter (CLS dropped / a merged cell's patches pooled), rows renormalised;
  then averaged over the layers the language model sees (metrics.md).

All the rows one sample needs in one layer are computed together (the union of
every block's rows and the answer row). Padding: batches are right-padded
(``VLMAdapter.encode``), so every real token sees exactly what it would see
alone and the last real position is ``layout.last_position``.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTENTION_NAME = "spatial_attention"
KEEP_MODES = ("mean", "layer", "layer_head")


class AttentionHook:
    """What an active capture (or ablation) does inside the attention function."""

    def query_rows(self, module: torch.nn.Module, query_shape: torch.Size) -> torch.Tensor | None:
        """(batch, rows) query positions of this call (query: (batch, heads, q, head_dim)) whose attention rows
        ``observe`` wants; None: none."""
        return None

    def observe(self, module: torch.nn.Module, probs: torch.Tensor) -> None:
        """Called with the (batch, heads, rows, keys) fp32 probabilities of the rows ``query_rows`` asked for."""

    def edit_output(self, module: torch.nn.Module, output: torch.Tensor) -> torch.Tensor:
        """Called with the per-head output (batch, q, heads, head_dim) before the output projection."""
        return output

    def keys_values(self, module: torch.nn.Module, key: torch.Tensor, value: torch.Tensor) -> None:
        """Called with the keys and values (batch, kv_heads, keys, head_dim) the call attends to, after RoPE."""


_active_hook: AttentionHook | None = None
_forward_seconds = 0.0  # ``forward_seconds``


def forward_seconds() -> float:
    """Seconds this process has spent in the model's forwards (``last_position_logits``, ``capture_generate``, the
    reruns of ``prefix.py``), each timed until its result is on the CPU: on a GPU the forward's time, not its
    launch's (run.json's ``timing``)."""
    return _forward_seconds


@contextlib.contextmanager
def timed_forward():
    global _forward_seconds
    start = time.perf_counter()
    try:
        yield
    finally:
        _forward_seconds += time.perf_counter() - start


@contextlib.contextmanager
def active(hook: AttentionHook):
    """Make ``hook`` the one the registered attention function consults."""
    global _active_hook
    if _active_hook is not None:
        raise RuntimeError("an attention capture is already active")
    _active_hook = hook
    try:
        yield hook
    finally:
        _active_hook = None


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    output, _ = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                       **kwargs)
    hook = _active_hook
    if hook is not None:
        hook.keys_values(module, key, value)
        rows = hook.query_rows(module, query.shape)
        if rows is not None:  # (on the layer's own device under --device-map)
            hook.observe(module, row_probabilities(module, query, key, attention_mask, scaling,
                                                   rows.to(query.device), kwargs.get("is_causal")))
        output = hook.edit_output(module, output)
    return output.contiguous(), None


def row_probabilities(module, query, key, attention_mask, scaling, rows, is_causal=None) -> torch.Tensor:
    """fp32 attention probabilities (B, H, R, K) of the query positions ``rows`` (B, R) of one attention call.

    Exactly the rows of the full softmax(q k^T * scaling + mask): each row is taken over every key, query head h
    meets KV head h // groups (grouped-query attention, as repeat_kv pairs them), and the mask rows are the call's
    own mask's, or sdpa's causal rule (query i sees keys <= i) where the call has no mask.
    """
    batch, heads, _, dim = query.shape
    kv_heads, keys = key.shape[1], key.shape[2]
    n_rows = rows.shape[1]
    picked = query.gather(2, rows[:, None, :, None].expand(batch, heads, n_rows, dim)).float()
    # (B, H, R, d) -> (B, KV, groups * R, d): a KV head's query heads are consecutive
    scores = torch.matmul(picked.view(batch, kv_heads, -1, dim), key.float().transpose(2, 3))
    scores = scores.view(batch, heads, n_rows, keys).mul_(scaling if scaling is not None else dim ** -0.5)
    bias = _row_bias(module, attention_mask, rows, query.shape[2], keys, is_causal)
    if bias is not None:
        scores.add_(bias)
    return softmax_in_place(scores)


def _row_bias(module, attention_mask, rows, q_len, keys, is_causal) -> torch.Tensor | None:
    """The additive mask (B, 1 or H, R, K) of the query positions ``rows``; None where every key is seen."""
    blocked = torch.finfo(torch.float32).min
    if attention_mask is None:
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        if not (causal and q_len > 1):  # sdpa's rule: one query (decoding) sees every key
            return None
        allowed = torch.arange(keys, device=rows.device) <= rows[:, :, None]
        return torch.zeros(allowed.shape, device=rows.device).masked_fill_(~allowed, blocked)[:, None]
    mask = attention_mask[..., :keys]
    mask = mask.expand(rows.shape[0], *mask.shape[1:])
    picked = mask.gather(2, rows[:, None, :, None].expand(-1, mask.shape[1], -1, keys))
    if picked.dtype == torch.bool:
        return torch.zeros(picked.shape, device=picked.device).masked_fill_(~picked, blocked)
    return picked.float()


def softmax_in_place(scores: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dimension, overwriting ``scores``."""
    probs = scores.sub_(scores.amax(dim=-1, keepdim=True)).exp_()
    return probs.div_(probs.sum(dim=-1, keepdim=True))


def register() -> None:
    """Register the engine's attention function, with sdpa's mask function (idempotent)."""
    if ATTENTION_NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(ATTENTION_NAME, _attention)
        AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


register()


@dataclass
class CaptureRequest:
    """What to record for one batch. Positions index each sample's token sequence."""

    layers: list[int] = field(default_factory=list)  # language-model layers, 0-based
    blocks: dict[str, list[tuple[np.ndarray, np.ndarray]]] = field(default_factory=dict)  # name -> per sample (rows, cols)
    keep: str = "mean"
    last_mass: list[np.ndarray] | None = None  # per sample: key positions
    vision_cells: list[np.ndarray] | None = None  # per sample: image-token grid cells (raster) whose ViT rows to record
    heads: list[int] | None = None  # the heads of each selected layer that the blocks keep (None: every head)

    def __post_init__(self):
        if self.keep not in KEEP_MODES:
            raise ValueError(f"keep must be one of {KEEP_MODES}")


def _indexer(positions, device) -> slice | torch.Tensor:
    """A slice where the positions are one contiguous run (image tokens are), else an index tensor.

    Slicing takes a view; index_select copies.
    """
    positions = np.asarray(positions, dtype=np.int64)
    if positions.size and np.array_equal(positions, np.arange(positions[0], positions[0] + positions.size)):
        return slice(int(positions[0]), int(positions[0]) + positions.size)
    return torch.as_tensor(positions, device=device)


def _select(tensor: torch.Tensor, dim: int, index: slice | torch.Tensor) -> torch.Tensor:
    if isinstance(index, slice):
        return tensor.narrow(dim, index.start, index.stop - index.start)
    return tensor.index_select(dim, index.to(tensor.device))  # (a no-op but on another layer's device)


def _device_key(tensor: torch.Tensor):
    """Which of ``_Sums``'s per-device sums a tensor joins: its device (a test splits one device in two)."""
    return tensor.device


class _Sums:
    """A sum kept on each device its terms arrive on (under --device-map a model's layers live on several GPUs,
    and each layer's probabilities on its own), added up on one device only at the end."""

    def __init__(self):
        self.parts: dict = {}

    def add(self, value: torch.Tensor) -> None:
        key = _device_key(value)
        part = self.parts.get(key)
        self.parts[key] = value.clone() if part is None else part.add_(value)

    def add_at(self, shape: tuple, index, value: torch.Tensor) -> None:
        """Add ``value`` at ``index`` of a sum of ``shape`` (zeros where nothing was added)."""
        key = _device_key(value)
        if key not in self.parts:
            self.parts[key] = value.new_zeros(shape)
        self.parts[key][index] += value

    def total(self, device) -> torch.Tensor | None:
        """The sum over every device, on ``device``; None when nothing was added."""
        parts = [part.to(device) for part in self.parts.values()]
        return None if not parts else torch.stack(parts).sum(0)


def _padded_rows(row_lists: list[np.ndarray], device) -> torch.Tensor:
    """(B, R) row positions, each sample's list padded with its last row to the longest (a repeated row is
    computed and ignored)."""
    width = max(len(r) for r in row_lists)
    return torch.as_tensor(np.stack([np.pad(r, (0, width - len(r)), mode="edge") if len(r) else np.zeros(width)
                                     for r in row_lists]).astype(np.int64), device=device)


def sample_rows(request: CaptureRequest, b: int, answer_row: int) -> np.ndarray:
    """The language-model rows the engine computes for sample ``b`` in each recorded layer, sorted: the union of
    every block's rows and, with ``last_mass``, the answer row."""
    parts = [np.asarray(pairs[b][0], dtype=np.int64) for pairs in request.blocks.values()]
    if request.last_mass is not None:
        parts.append(np.array([answer_row]))
    return np.unique(np.concatenate(parts)) if parts else np.zeros(0, np.int64)


class _Recorder(AttentionHook):
    def __init__(self, adapter, batch, request: CaptureRequest, answer_rows: list[int] | None = None):
        """``answer_rows``: the row whose mass ``last_mass`` sums, per sample (default: the last real position;
        -1: the last query of each call, for generation)."""
        self.adapter, self.batch, self.request = adapter, batch, request
        device = adapter.device
        self.lm_index = {id(m): i for i, m in enumerate(adapter.lm_attention_modules())}
        self.slot = {layer: s for s, layer in enumerate(request.layers)}  # layer -> position among selected
        self.heads = None if request.heads is None else torch.as_tensor(request.heads, device=device)
        answer_rows = answer_rows or [lay.last_position for lay in batch.layouts]
        row_lists = [sample_rows(request, b, answer_rows[b]) for b in range(len(batch))]
        self.lm_rows = _padded_rows(row_lists, device) if any(len(r) for r in row_lists) else None
        self.relative_rows = any(r < 0 for r in answer_rows)  # counted from each call's last query
        self.blocks = {name: [(_indexer(np.searchsorted(row_lists[b], r), device), _indexer(c, device))
                              for b, (r, c) in enumerate(pairs)] for name, pairs in request.blocks.items()}
        self.block_sum = {name: [_Sums() for _ in range(len(batch))] for name in request.blocks}
        self.last_cols = None
        if request.last_mass is not None:
            self.last_cols = [_indexer(c, device) for c in request.last_mass]
            self.answer_slot = [int(np.searchsorted(row_lists[b], answer_rows[b])) for b in range(len(batch))]
            self.mass = _Sums()  # (B, selected layers, heads)
            self.mass_passes = [0] * len(request.layers)  # > 1 when generating: averaged over steps
        self.vision_index = {}
        if request.vision_cells is not None:
            wanted = set(adapter.vision_map_layers())
            self.vision_index = {id(m): i for i, m in enumerate(adapter.vision_attention_modules()) if i in wanted}
            self.vision_layers = len(wanted)
            vision_rows = [np.asarray(adapter.vision_query_rows(np.asarray(c, np.int64)), np.int64)
                           for c in request.vision_cells]
            self.vision_row_counts = [len(r) for r in vision_rows]
            self.vision_rows = _padded_rows(vision_rows, device) if any(self.vision_row_counts) else None
            self.vision_calls = {}  # module id -> views seen so far (Qwen2-VL calls once per image)
            self.vision_images = range(0)  # the views of the current call
            self.view_sample = adapter.vision_views(batch.inputs)  # view -> its sample, -1: not analysed
            self.vision_sum = [_Sums() for _ in range(len(batch))]

    def query_rows(self, module, query_shape):
        key = id(module)
        if key in self.vision_index:  # CLIP runs the batch's images in one call, Qwen2-VL's ViT one image per call
            first = self.vision_calls.get(key, 0)
            self.vision_images = range(first, first + query_shape[0])
            self.vision_calls[key] = self.vision_images.stop
            if self.vision_rows is None:
                return None
            samples = [max(self.view_sample[v], 0) for v in self.vision_images]  # other views: any rows, unread
            return self.vision_rows[torch.as_tensor(samples, device=self.vision_rows.device)]
        layer = self.lm_index.get(key)
        if layer is None or layer not in self.slot or self.lm_rows is None:
            return None
        return self.lm_rows + query_shape[2] * (self.lm_rows < 0) if self.relative_rows else self.lm_rows

    def observe(self, module, probs):
        key = id(module)
        if key in self.vision_index:
            self._observe_vision(probs)
            return
        slot = self.slot[self.lm_index[key]]
        n_layers = len(self.request.layers)
        for name, pairs in self.blocks.items():
            for b, (rows, cols) in enumerate(pairs):
                block = _select(_select(probs[b], 1, rows), 2, cols)  # (H, R, C)
                self._accumulate(name, b, slot, block, n_layers)
        if self.last_cols is not None:
            shape = (len(self.batch), len(self.request.layers), probs.shape[1])
            for b, cols in enumerate(self.last_cols):
                self.mass.add_at(shape, (b, slot), _select(probs[b, :, self.answer_slot[b]], 1, cols).sum(-1))
            self.mass_passes[slot] += 1

    def _accumulate(self, name, b, slot, block, n_layers):
        keep = self.request.keep
        if self.heads is not None:
            block = block.index_select(0, self.heads.to(block.device))
        if keep == "mean":
            self.block_sum[name][b].add(block.mean(0) / n_layers)
            return
        part = block if keep == "layer_head" else block.mean(0)
        self.block_sum[name][b].add_at((n_layers, *part.shape), slot, part)

    def _observe_vision(self, probs):
        mean_heads = probs.mean(1)  # (views in this call, rows, N)
        for j, view in enumerate(self.vision_images):
            sample = self.view_sample[view]
            if sample < 0:
                continue
            rows = mean_heads[j, :self.vision_row_counts[sample]]
            self.vision_sum[sample].add(self.adapter.vision_to_grid(rows) / self.vision_layers)

    def results(self, device=None) -> list[dict]:
        """Per sample, every recorded point: numpy on the CPU, or (``device`` given) fp32 tensors on ``device``."""
        if self.vision_index and set(self.vision_calls.values()) - {len(self.view_sample)}:
            raise RuntimeError(f"the vision encoder ran {sorted(set(self.vision_calls.values()))} views where the "
                               f"adapter's vision_views expects {len(self.view_sample)}: its maps would go to the "
                               "wrong samples")
        out = []
        where = torch.device("cpu") if device is None else device

        def result(total: torch.Tensor):
            return total.float().numpy() if device is None else total.float()

        mass = None
        if self.last_cols is not None:
            mass = self.mass.total(where)
            if mass is None:  # no layer recorded
                mass = torch.zeros(len(self.batch), len(self.request.layers), self.adapter.num_heads, device=where)
        for b in range(len(self.batch)):
            sample = {name: result(sums[b].total(where)) for name, sums in self.block_sum.items()}
            if mass is not None:
                passes = torch.tensor(self.mass_passes, device=where).clamp_min(1).view(-1, 1)
                sample["last_mass"] = result(mass[b] / passes)
            if self.request.vision_cells is not None:
                total = self.vision_sum[b].total(where)
                sample["vision"] = result(torch.zeros((0, 0), device=where) if total is None else total)
            out.append(sample)
        return out


@torch.inference_mode()
def capture(adapter, batch, request: CaptureRequest, device=None) -> tuple[list[dict], torch.Tensor]:
    """Run ``batch`` once and return (per-sample recordings, last-position logits (B, V) fp32 on CPU); the
    recordings as numpy arrays, or with ``device`` as fp32 tensors left there (for work on the device after it)."""
    recorder = _Recorder(adapter, batch, request)
    with active(recorder):
        logits = last_position_logits(adapter, batch)
    return recorder.results(device), logits


@torch.inference_mode()
def capture_generate(adapter, batch, request: CaptureRequest, max_new_tokens: int) -> tuple[dict, str]:
    """Greedy generation of one sample with ``last_mass`` averaged over the generated steps.

    At every step the position that predicts the next token is the last query
    row (the prompt's last position first, then each new token), so the score
    is the mean over the ``max_new_tokens`` predictions. Returns (recording, answer).
    """
    if len(batch) != 1 or request.blocks or request.vision_cells is not None:
        raise ValueError("capture_generate takes one sample and records last_mass only")
    recorder = _Recorder(adapter, batch, request, answer_rows=[-1])
    with active(recorder), timed_forward():
        ids = adapter.model.generate(**batch.inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=adapter.tokenizer.pad_token_id)
        answer = adapter.tokenizer.decode(ids[0, batch.layouts[0].length:], skip_special_tokens=True)
    return recorder.results()[0], answer.strip()


@torch.inference_mode()
def plain_logits(adapter, batch) -> torch.Tensor:
    """Last-position logits of the model's ordinary forward (no capture active)."""
    if _active_hook is not None:
        raise RuntimeError("plain_logits called while a capture is active")
    return last_position_logits(adapter, batch)


def greedy_answers(adapter, logits: torch.Tensor) -> list[str]:
    """Each sample's greedy next token of ``logits`` (B, V), decoded and stripped: the answer's first word."""
    return [adapter.tokenizer.decode([int(t)], skip_special_tokens=True).strip() for t in logits.argmax(-1)]


def last_position_logits(adapter, batch) -> torch.Tensor:
    """One forward; the logits at each sample's last real position, (B, V) fp32 on CPU.

    Only those positions go through the LM head (``logits_to_keep``): at a
    150k-token vocabulary the full logits would dwarf everything else.
    """
    keep = logits_to_keep(batch)
    with timed_forward():
        return at_last_positions(adapter.model(**batch.inputs, use_cache=False, logits_to_keep=keep).logits, batch,
                                 keep)


def logits_to_keep(batch) -> torch.Tensor:
    """The distinct last real positions of the batch's samples, sorted: the forward's ``logits_to_keep``.
    On the CPU: under --device-map the last hidden states sit on the last GPU, and a CPU index serves any device."""
    return torch.tensor(sorted({lay.last_position for lay in batch.layouts}))


def at_last_positions(logits: torch.Tensor, batch, keep: torch.Tensor) -> torch.Tensor:
    """Each sample's row of ``logits`` (B, len(keep), V) at its last real position, (B, V) fp32 on CPU."""
    column = torch.tensor([keep.tolist().index(lay.last_position) for lay in batch.layouts], device=logits.device)
    return logits[torch.arange(len(batch.layouts), device=logits.device), column].float().cpu()
