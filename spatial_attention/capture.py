"""The attention-capture engine: exact reductions of attention, computed on the
device while the model runs, never the full per-layer tensors.

How it works. transformers 5 looks a model's attention function up by name. We
register one name, ``spatial_attention``, for every attention module of both
families (the Llama / Qwen2 language models, CLIP, the Qwen2-VL ViT) and load
the models with it. While no capture is active the function is plain sdpa (and
the mask function is sdpa's), so the model is exactly what a user would run.
During a capture, the layers that are recorded compute their attention once in
fp32 -- softmax(q k^T * scaling + mask) -- use those probabilities both for the
layer's output and for the requested reductions, then drop them; other layers
stay on sdpa. The eager mask function is used during a capture, because a
recomputation without an explicit mask would silently be non-causal.

Recorded points (all per sample, on the device, fp32):

- ``blocks[name]``: the attention of chosen query rows onto chosen key columns
  of the language model (e.g. caption tokens x image tokens, image x image),
  averaged over heads and the selected layers (``keep="mean"``), or kept per
  layer (``"layer"``) or per layer and head (``"layer_head"``);
- ``last_mass``: per (selected layer, head), the attention mass of the last
  real position onto chosen key columns (the corner experiments' head score);
- ``vision``: the vision encoder's self-attention on the image-token grid,
  per layer: head mean, adapter-specific mapping (CLS dropped / merge windows
  undone and pooled), rows renormalised; then averaged over the layers the
  language model sees (metrics.md).

Padding: batches are right-padded (``VLMAdapter.encode``), so every real token
sees exactly what it would see alone and the last real position is
``layout.last_position``.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

ATTENTION_NAME = "spatial_attention"
KEEP_MODES = ("mean", "layer", "layer_head")


class AttentionHook:
    """What an active capture (or ablation) does inside the attention function."""

    # The eager (explicit) mask while this hook is active, which ``wants_probabilities`` needs.
    # A hook that only edits outputs sets False and keeps sdpa's mask, so that with nothing
    # edited the forward is the plain model's, kernel for kernel.
    explicit_mask = True

    def wants_probabilities(self, module: torch.nn.Module) -> bool:
        """Whether this module's attention must be computed explicitly (fp32) this pass."""
        return False

    def observe(self, module: torch.nn.Module, probs: torch.Tensor) -> None:
        """Called with (batch, heads, q, k) fp32 probabilities of a module that wanted them."""

    def edit_output(self, module: torch.nn.Module, output: torch.Tensor) -> torch.Tensor:
        """Called with the per-head output (batch, q, heads, head_dim) before the output projection."""
        return output


_active_hook: AttentionHook | None = None


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
    hook = _active_hook
    if hook is None or not hook.wants_probabilities(module):
        output, _ = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                           scaling=scaling, **kwargs)
    else:
        groups = getattr(module, "num_key_value_groups", 1)
        scores = torch.matmul(query.float(), repeat_kv(key, groups).float().transpose(2, 3))
        scores.mul_(scaling if scaling is not None else query.shape[-1] ** -0.5)
        if attention_mask is not None:
            scores.add_(attention_mask[:, :, :, : key.shape[-2]].float())
        probs = softmax_in_place(scores)
        del scores
        output = torch.matmul(probs, repeat_kv(value, groups).float()).to(query.dtype).transpose(1, 2)
        hook.observe(module, probs)
        del probs
    if hook is not None:
        output = hook.edit_output(module, output)
    return output.contiguous(), None


def softmax_in_place(scores: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dimension, overwriting ``scores``: at a ViT's 2304 patches a
    second (B, H, T, T) fp32 buffer would be another 170 MB."""
    probs = scores.sub_(scores.amax(dim=-1, keepdim=True)).exp_()
    return probs.div_(probs.sum(dim=-1, keepdim=True))


def _mask(*args, **kwargs):
    # sdpa's mask (None for plain causal) unless a hook needs explicit probabilities.
    if _active_hook is None or not _active_hook.explicit_mask:
        return sdpa_mask(*args, **kwargs)
    return eager_mask(*args, **kwargs)


def register() -> None:
    """Register the engine's attention and mask functions (idempotent)."""
    if ATTENTION_NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(ATTENTION_NAME, _attention)
        AttentionMaskInterface.register(ATTENTION_NAME, _mask)


register()


@dataclass
class CaptureRequest:
    """What to record for one batch. Positions index each sample's token sequence."""

    layers: list[int] = field(default_factory=list)  # language-model layers, 0-based
    blocks: dict[str, list[tuple[np.ndarray, np.ndarray]]] = field(default_factory=dict)  # name -> per sample (rows, cols)
    keep: str = "mean"
    last_mass: list[np.ndarray] | None = None  # per sample: key positions
    vision: bool = False

    def __post_init__(self):
        if self.keep not in KEEP_MODES:
            raise ValueError(f"keep must be one of {KEEP_MODES}")


def _indexer(positions, device) -> slice | torch.Tensor:
    """A slice where the positions are one contiguous run (image tokens are), else an index tensor.

    Slicing takes a view; index_select copies, which on the CPU cost about a sixth
    of a recorded forward pass.
    """
    positions = np.asarray(positions, dtype=np.int64)
    if positions.size and np.array_equal(positions, np.arange(positions[0], positions[0] + positions.size)):
        return slice(int(positions[0]), int(positions[0]) + positions.size)
    return torch.as_tensor(positions, device=device)


def _select(tensor: torch.Tensor, dim: int, index: slice | torch.Tensor) -> torch.Tensor:
    if isinstance(index, slice):
        return tensor.narrow(dim, index.start, index.stop - index.start)
    return tensor.index_select(dim, index)


class _Recorder(AttentionHook):
    def __init__(self, adapter, batch, request: CaptureRequest):
        self.adapter, self.batch, self.request = adapter, batch, request
        device = adapter.device
        self.lm_index = {id(m): i for i, m in enumerate(adapter.lm_attention_modules())}
        self.slot = {layer: s for s, layer in enumerate(request.layers)}  # layer -> position among selected
        self.vision_index = {}
        if request.vision:
            wanted = set(adapter.vision_map_layers())
            self.vision_index = {id(m): i for i, m in enumerate(adapter.vision_attention_modules()) if i in wanted}
            self.vision_layers = len(wanted)
            self.vision_calls = {}  # module id -> images seen so far (Qwen2-VL calls once per image)
            self.vision_sum = [None] * len(batch)
        self.blocks = {name: [(_indexer(r, device), _indexer(c, device)) for r, c in pairs]
                       for name, pairs in request.blocks.items()}
        self.block_sum = {name: [None] * len(batch) for name in request.blocks}
        self.last_cols = None
        if request.last_mass is not None:
            self.last_cols = [_indexer(c, device) for c in request.last_mass]
            self.last_rows = [lay.last_position for lay in batch.layouts]
            self.mass = torch.zeros(len(batch), len(request.layers), adapter.num_heads, device=device)
            self.mass_passes = [0] * len(request.layers)  # > 1 when generating: averaged over steps

    def wants_probabilities(self, module):
        key = id(module)
        return (key in self.lm_index and self.lm_index[key] in self.slot) or key in self.vision_index

    def observe(self, module, probs):
        key = id(module)
        if key in self.vision_index:
            self._observe_vision(key, probs)
            return
        slot = self.slot[self.lm_index[key]]
        n_layers = len(self.request.layers)
        for name, pairs in self.blocks.items():
            for b, (rows, cols) in enumerate(pairs):
                block = _select(_select(probs[b], 1, rows), 2, cols)  # (H, R, C)
                self._accumulate(name, b, slot, block, n_layers)
        if self.last_cols is not None:
            for b, cols in enumerate(self.last_cols):
                self.mass[b, slot] += _select(probs[b, :, self.last_rows[b]], 1, cols).sum(-1)
            self.mass_passes[slot] += 1

    def _accumulate(self, name, b, slot, block, n_layers):
        keep = self.request.keep
        if keep == "mean":
            part = block.mean(0) / n_layers
            acc = self.block_sum[name][b]
            self.block_sum[name][b] = part if acc is None else acc.add_(part)
            return
        if self.block_sum[name][b] is None:
            shape = (n_layers, *block.shape) if keep == "layer_head" else (n_layers, *block.shape[1:])
            self.block_sum[name][b] = block.new_zeros(shape)
        self.block_sum[name][b][slot] = block if keep == "layer_head" else block.mean(0)

    def _observe_vision(self, key, probs):
        mean_heads = probs.mean(1)  # (images in this call, N, N)
        first = self.vision_calls.get(key, 0)
        self.vision_calls[key] = first + mean_heads.shape[0]
        for j in range(mean_heads.shape[0]):
            image = first + j
            grid_map = self.adapter.vision_to_grid(mean_heads[j], image, self.batch.inputs) / self.vision_layers
            acc = self.vision_sum[image]
            self.vision_sum[image] = grid_map if acc is None else acc.add_(grid_map)

    def results(self) -> list[dict[str, np.ndarray]]:
        out = []
        for b in range(len(self.batch)):
            sample = {name: sums[b].float().cpu().numpy() for name, sums in self.block_sum.items()}
            if self.last_cols is not None:
                passes = torch.tensor(self.mass_passes, device=self.mass.device).clamp_min(1).view(-1, 1)
                sample["last_mass"] = (self.mass[b] / passes).cpu().numpy()
            if self.request.vision:
                sample["vision"] = self.vision_sum[b].float().cpu().numpy()
            out.append(sample)
        return out


@torch.inference_mode()
def capture(adapter, batch, request: CaptureRequest) -> tuple[list[dict[str, np.ndarray]], torch.Tensor]:
    """Run ``batch`` once and return (per-sample recordings, last-position logits (B, V) fp32 on CPU)."""
    recorder = _Recorder(adapter, batch, request)
    with active(recorder):
        logits = last_position_logits(adapter, batch)
    return recorder.results(), logits


@torch.inference_mode()
def capture_generate(adapter, batch, request: CaptureRequest, max_new_tokens: int) -> tuple[dict, str]:
    """Greedy generation of one sample with ``last_mass`` averaged over the generated steps.

    At every step the position that predicts the next token is the last query
    row (the prompt's last position first, then each new token), so the score
    is the mean over the ``max_new_tokens`` predictions. Returns (recording, answer).
    """
    if len(batch) != 1 or request.blocks or request.vision:
        raise ValueError("capture_generate takes one sample and records last_mass only")
    recorder = _Recorder(adapter, batch, request)
    recorder.last_rows = [-1]
    with active(recorder):
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
    last = [lay.last_position for lay in batch.layouts]
    keep = sorted(set(last))
    device = adapter.device
    logits = adapter.model(**batch.inputs, use_cache=False,
                           logits_to_keep=torch.tensor(keep, device=device)).logits
    column = torch.tensor([keep.index(p) for p in last], device=logits.device)
    return logits[torch.arange(len(last), device=logits.device), column].float().cpu()
