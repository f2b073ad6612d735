"""The slow, obvious path the capture engine is checked against.

The language model runs under transformers' own eager attention with
``output_attentions=True``: every layer's full (B, H, T, T) tensor comes back
and the reductions are taken from it on the CPU in float64. The vision encoders
do not all return their attention (Qwen2-VL's ViT returns none, even under
eager), so for them a plain eager function that keeps every probability tensor
is registered under its own name. This is what the paper's scripts did, and
what ``--verify-attention`` / ``verify_attention.py`` compare with (``check``,
at the end of this file).
"""
from __future__ import annotations

import contextlib
import logging

import numpy as np
import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from spatial_attention.engine.capture import (ATTENTION_NAME, CaptureRequest, at_last_positions, capture,
                                              logits_to_keep, plain_logits)

log = logging.getLogger("spatial_attention")

REFERENCE_NAME = "spatial_attention_reference"
_kept: dict[int, list[torch.Tensor]] | None = None


def _keep_everything(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    groups = getattr(module, "num_key_value_groups", 1)
    weights = torch.matmul(query, repeat_kv(key, groups).transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask[:, :, :, : key.shape[-2]]
    weights = torch.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    if _kept is not None:
        _kept.setdefault(id(module), []).append(weights.float().cpu())
    return torch.matmul(weights, repeat_kv(value, groups)).transpose(1, 2).contiguous(), weights


AttentionInterface.register(REFERENCE_NAME, _keep_everything)
AttentionMaskInterface.register(REFERENCE_NAME, eager_mask)


@contextlib.contextmanager
def eager_model(adapter):
    """The adapter's model with eager attention (vision: the keep-everything function)."""
    global _kept
    adapter.model.set_attn_implementation({"text_config": "eager", "vision_config": REFERENCE_NAME, "": "eager"})
    _kept = {}
    try:
        yield _kept
    finally:
        _kept = None
        adapter.model.set_attn_implementation(ATTENTION_NAME)


@torch.inference_mode()
def reference_capture(adapter, batch, request: CaptureRequest) -> tuple[list[dict[str, np.ndarray]], torch.Tensor]:
    """The same recordings as ``capture``, from full eager attention tensors."""
    keep = logits_to_keep(batch)  # the LM head at the last positions only, as the engine's forward
    with eager_model(adapter) as kept:
        out = adapter.model(**batch.inputs, use_cache=False, output_attentions=True, logits_to_keep=keep)
        lm = [a.double().cpu() for a in out.attentions]  # per layer (B, H, T, T)
        vision_calls = {i: kept.get(id(m), []) for i, m in enumerate(adapter.vision_attention_modules())}
    last = [lay.last_position for lay in batch.layouts]
    views = adapter.vision_views(batch.inputs)  # the vision encoder's images -> their samples
    logits = at_last_positions(out.logits, batch, keep)
    results = []
    for b in range(len(batch)):
        sample = {}
        for name, pairs in request.blocks.items():
            rows, cols = (torch.as_tensor(x) for x in pairs[b])
            per_layer_head = torch.stack([lm[l][b][:, rows][:, :, cols] for l in request.layers])  # (L, H, R, C)
            if request.heads is not None:
                per_layer_head = per_layer_head[:, request.heads]
            sample[name] = {"mean": per_layer_head.mean(dim=(0, 1)), "layer": per_layer_head.mean(1),
                            "layer_head": per_layer_head}[request.keep].numpy()
        if request.last_mass is not None:
            cols = torch.as_tensor(request.last_mass[b])
            sample["last_mass"] = torch.stack(
                [lm[l][b][:, last[b]][:, cols].sum(-1) for l in request.layers]).numpy()
        if request.vision_cells is not None:
            sample["vision"] = _vision_reference(adapter, vision_calls, views.index(b), request.vision_cells[b])
        results.append(sample)
    return results, logits


def _vision_reference(adapter, vision_calls, image: int, cells) -> np.ndarray:
    """Layer average of the adapter's grid mapping of the chosen cells' rows of each layer's head-mean
    attention of one image (``image``: its view's place among the encoder's views)."""
    maps = []
    rows = torch.as_tensor(adapter.vision_query_rows(np.asarray(cells, np.int64)))
    for layer in adapter.vision_map_layers():
        per_image = torch.cat([c.reshape(-1, *c.shape[-3:]) for c in vision_calls[layer]])  # (images, H, N, N)
        head_mean = per_image[image].double().mean(0)
        maps.append(adapter.vision_to_grid(head_mean[rows]))
    return torch.stack(maps).mean(0).numpy()


def verify(adapter, batch, request: CaptureRequest) -> dict:
    """Compare every recording and the logits of the engine with the reference path.

    Returns the largest absolute difference per recording, and between the
    engine's logits and a plain forward's, plus whether the argmax agrees.
    """
    engine, engine_logits = capture(adapter, batch, request)
    reference, _ = reference_capture(adapter, batch, request)
    plain = plain_logits(adapter, batch)
    absolute, relative = {}, {}
    for got, want in zip(engine, reference):
        for name in want:
            absolute[name] = max(absolute.get(name, 0.0), recording_difference(name, got[name], want[name], False))
            relative[name] = max(relative.get(name, 0.0), recording_difference(name, got[name], want[name], True))
    return {"max_abs_diff": absolute, "max_rel_diff": relative,
            "logits_max_abs_diff": float((engine_logits - plain).abs().max()),
            "largest_logit": float(plain.abs().max()),
            "argmax_agree": bool((engine_logits.argmax(-1) == plain.argmax(-1)).all())}


def recording_difference(name: str, got: np.ndarray, want: np.ndarray, relative: bool) -> float:
    """The largest |got - want| of one recording; ``relative``: row by row, the maps first renormalised over their
    columns (the image tokens or grid cells; ``last_mass``, a mass per head, is not a map), each row's difference
    divided by that row's largest reference value. Row by row, because one row can dwarf the others (under the
    causal mask the first image token sees only itself: its row is [1, 0, ...])."""
    if not want.size:
        return 0.0
    got, want = got.astype(np.float64), want.astype(np.float64)
    if not relative:
        return float(np.max(np.abs(got - want)))
    if name != "last_mass":
        got = got / np.maximum(got.sum(-1, keepdims=True), 1e-30)
        want = want / np.maximum(want.sum(-1, keepdims=True), 1e-30)
    scale = np.maximum(np.abs(want).max(-1, keepdims=True), 1e-30)
    return float(np.max(np.abs(got - want) / scale))


# --- the check of the engine against this path (verify_attention.py, --verify-attention) ---

# dtype -> (attention tolerance, whether it is relative (row by row), logits tolerance relative to the largest
# |logit|). fp32: absolute. bf16 / fp16: eager rounds every probability to 8 / 11 bits, and a cell of an image
# block holds about 1/576, so an absolute 1e-2 would pass any map at all: the maps are compared renormalised over
# the image tokens, each row's difference relative to its largest value (recording_difference).
TOLERANCES = {torch.float32: (1e-4, False, 1e-4), torch.bfloat16: (5e-2, True, 5e-2),
              torch.float16: (1e-2, True, 2e-2)}


def verification_request(batch, layers: list[int]) -> CaptureRequest:
    """Every kind of recording the experiments use, for the given layers, over every image cell."""
    lays = batch.layouts
    return CaptureRequest(layers=layers, vision_cells=[np.arange(len(l.image_positions)) for l in lays],
                          blocks={"cross": [(l.text_positions(), l.image_positions) for l in lays],
                                  "image_self": [(l.image_positions, l.image_positions) for l in lays]},
                          last_mass=[l.image_positions for l in lays])


def check(adapter, batch, request: CaptureRequest, attention_tol: float | None = None,
          logits_tol: float | None = None) -> tuple[dict, bool]:
    """Compare engine and eager on ``batch``; returns (report, passed)."""
    default_attn, relative, default_logits = TOLERANCES.get(adapter.dtype, TOLERANCES[torch.bfloat16])
    attention_tol = default_attn if attention_tol is None else attention_tol
    logits_tol = default_logits if logits_tol is None else logits_tol
    report = verify(adapter, batch, request)
    scale = report["largest_logit"]
    compared = report["max_rel_diff" if relative else "max_abs_diff"]
    report.update(attention_tolerance=attention_tol, logits_tolerance=logits_tol * scale,
                  attention_compared="relative to each row's largest value, renormalised over the image" if relative
                  else "absolute",
                  dtype=str(adapter.dtype).replace("torch.", ""))
    passed = (max(compared.values()) <= attention_tol and report["argmax_agree"]
              and report["logits_max_abs_diff"] <= logits_tol * scale)
    report["passed"] = passed
    return report, passed


def log_report(report: dict) -> None:
    relative = report["attention_compared"] != "absolute"
    for name, diff in report["max_rel_diff" if relative else "max_abs_diff"].items():
        log.info("verify: %-12s max |engine - eager|%s = %.3g (tolerance %.1g)", name,
                 " / row max" if relative else "", diff, report["attention_tolerance"])
    log.info("verify: next-token logits max |engine - plain| = %.3g (tolerance %.3g), argmax agree: %s",
             report["logits_max_abs_diff"], report["logits_tolerance"], report["argmax_agree"])
    log.info("verify: %s", "PASSED" if report["passed"] else "FAILED")
