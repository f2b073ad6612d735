"""Adapters: prompts, token layouts, grids, word positions, vision raster order, load errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import random_images
from PIL import Image

from models import load_adapter
from spatial_attention.common.errors import OptionError

CAPTION = ("there are two shapes a cyan semicircle and a blue pentagon . what is the spatial relationship "
           "from the first shape to the second shape ? the spatial relation is left .")


def _decoded(adapter, layout, positions):
    return "".join(adapter.tokenizer.decode([int(layout.input_ids[p])]) for p in positions).replace(" ", "")


def test_llava_image_tokens_follow_user_not_at_end(tiny_models):
    ad = tiny_models["llava"]
    layout = ad.encode([CAPTION], random_images(1)).layouts[0]
    pos = layout.image_positions
    assert len(pos) == 576 and layout.grid == (24, 24)
    assert np.array_equal(pos, np.arange(pos[0], pos[0] + 576))  # contiguous
    assert _decoded(ad, layout, range(pos[0])).endswith("USER:")
    assert pos[-1] < layout.length - 20  # the caption and "ASSISTANT:" come after the image
    assert _decoded(ad, layout, range(layout.length - 4, layout.length)).endswith("ASSISTANT:")


@pytest.mark.parametrize("feed,grid", [((672, 672), (24, 24)), ((480, 640), (17, 23))])
def test_qwen2_grid_from_image_grid_thw(tiny_models, feed, grid):
    ad = tiny_models["qwen2"]
    ad.set_feed_size(feed)
    try:
        batch = ad.encode([CAPTION], random_images(1))
    finally:
        ad.set_feed_size(224)
    layout = batch.layouts[0]
    assert layout.grid == grid
    assert len(layout.image_positions) == grid[0] * grid[1]
    ids = layout.input_ids
    start = ad.tokenizer.convert_tokens_to_ids("<|vision_start|>")
    assert ids[layout.image_positions[0] - 1] == start


def test_multi_token_word_positions(adapter):
    layout = adapter.encode([CAPTION], random_images(1)).layouts[0]
    for word in ("semicircle", "pentagon", "left", "cyan"):
        pos = layout.word_positions(word)
        assert _decoded(adapter, layout, pos) == word
    assert len(layout.word_positions("semicircle")) > 1  # split into sub-tokens by these tokenizers
    assert np.all(np.diff(layout.word_positions("semicircle")) == 1)


def test_word_occurring_twice(adapter):
    layout = adapter.encode([CAPTION], random_images(1)).layouts[0]
    first, second = layout.word_positions("shape", 0), layout.word_positions("shape", 1)
    assert _decoded(adapter, layout, first) == "shape" == _decoded(adapter, layout, second)
    assert second[0] > first[-1]
    # "shape" must not match inside "shapes"
    shapes = layout.word_positions("shapes")
    assert first[0] > shapes[-1]
    with pytest.raises(ValueError):
        layout.word_positions("shape", 2)


def test_text_only_layout(adapter):
    layout = adapter.encode([CAPTION]).layouts[0]
    assert layout.image_positions.size == 0 and layout.grid is None
    assert _decoded(adapter, layout, layout.text_positions()) == CAPTION.replace(" ", "")


def window_to_raster(grid_h: int, grid_w: int, merge: int) -> torch.Tensor:
    """perm with x_raster = x_window[perm]: merged cells in raster order, patches in raster order inside."""
    rows = torch.arange(grid_h).view(-1, 1).expand(grid_h, grid_w)
    cols = torch.arange(grid_w).view(1, -1).expand(grid_h, grid_w)
    cell = (rows // merge) * (grid_w // merge) + cols // merge
    within = (rows % merge) * merge + cols % merge
    return (cell * merge * merge + within).reshape(-1)


def merge_window_family(family: str, tiny_models):
    """The session's Qwen2-VL, or a tiny-random Qwen3-VL (16-px patches, the same 2 x 2 merge-window order)."""
    return tiny_models[family] if family in tiny_models else load_adapter(family, "tiny-random", device="cpu")


@pytest.mark.parametrize("family", ["qwen2", "qwen3vl"])
def test_merge_window_order_of_the_real_image_processor(family, tiny_models):
    """The order vision_to_grid assumes: patch k of the processor's pixel_values sits at window_to_raster, a
    permutation that is not its own inverse on this grid (so a mapping applied the wrong way round fails)."""
    ad = merge_window_family(family, tiny_models)
    p = ad.PATCH
    h, w = 4, 6  # patches
    assert not torch.equal(window_to_raster(h, w, 2)[window_to_raster(h, w, 2)], torch.arange(h * w))
    img = np.zeros((h * p, w * p, 3), np.uint8)
    for r in range(h):
        for c in range(w):
            img[r * p:(r + 1) * p, c * p:(c + 1) * p] = (r * 40, c * 40, 0)
    out = ad.processor.image_processor(images=[Image.fromarray(img)], return_tensors="pt", do_resize=False,
                                       do_normalize=False, do_rescale=False)
    assert out["image_grid_thw"].tolist() == [[1, h, w]]
    patches = out["pixel_values"].view(h * w, 3, 2, p, p)[:, :2, 0, 0, 0]  # (patch, [red, green])
    raster = patches[window_to_raster(h, w, 2)]
    expect = torch.tensor([[r * 40, c * 40] for r in range(h) for c in range(w)], dtype=raster.dtype)
    assert torch.equal(raster, expect)
    assert not torch.equal(patches, expect)  # window order is not raster order


@pytest.mark.parametrize("family", ["qwen2", "qwen3vl"])
def test_qwen_vision_map_is_raster_order(family, tiny_models):
    """vision_to_grid of vision_query_rows against a naive loop over raster patch coordinates, for every cell and
    for a few cells out of order."""
    ad = merge_window_family(family, tiny_models)
    h, w, m = 4, 6, 2
    attn = torch.rand(h * w, h * w, dtype=torch.float64)
    attn /= attn.sum(-1, keepdim=True)
    every = np.arange(h * w // (m * m))
    got = ad.vision_to_grid(attn[ad.vision_query_rows(every)])

    def window_index(r, c):
        return ((r // m) * (w // m) + c // m) * m * m + (r % m) * m + c % m

    gh, gw = h // m, w // m
    want = torch.zeros(gh * gw, gh * gw, dtype=torch.float64)
    for qi in range(gh):
        for qj in range(gw):
            for ki in range(gh):
                for kj in range(gw):
                    total = 0.0
                    for dq in [(a, b) for a in range(m) for b in range(m)]:
                        for dk in [(a, b) for a in range(m) for b in range(m)]:
                            q = window_index(qi * m + dq[0], qj * m + dq[1])
                            k = window_index(ki * m + dk[0], kj * m + dk[1])
                            total += attn[q, k].item()
                    want[qi * gw + qj, ki * gw + kj] = total / (m * m)
    torch.testing.assert_close(got, want)
    # reading the window-order matrix as if it were raster order gives something else
    as_raster = attn.view(gh, m, gw, m, gh, m, gw, m).mean(dim=(1, 3)).sum(dim=(3, 5)).reshape(gh * gw, gh * gw)
    assert not torch.allclose(as_raster, want)
    torch.testing.assert_close(got.sum(-1), torch.ones(gh * gw, dtype=torch.float64))
    some = np.array([5, 0, 3])
    torch.testing.assert_close(ad.vision_to_grid(attn[ad.vision_query_rows(some)]), want[some])


@pytest.mark.parametrize("family", ["llava", "qwen2"])
def test_unloadable_model_is_one_clear_line(family, tmp_path):
    with pytest.raises(OptionError) as err:
        load_adapter(family, str(tmp_path / "no-such-checkpoint"), device="cpu")
    message = str(err.value)
    assert "\n" not in message and "--model-path" in message and "tiny-random" in message


@pytest.mark.parametrize("family", ["llava", "qwen2"])
def test_random_weights_control_keeps_the_checkpoints_architecture_and_processor(family, tiny_models, tmp_path):
    """random_init_seed: the saved checkpoint's config and processor, its weights not read but drawn with the seed
    (the same seed, the same weights; another seed, others). A process builds the control's model once: the next
    initialisation re-initialises it in place, to exactly the weights a fresh build of that seed gets."""
    from models import ADAPTERS
    from models.base import VLMAdapter

    saved = tiny_models[family]
    folder = tmp_path / "checkpoint"
    saved.model.save_pretrained(folder)
    saved.processor.save_pretrained(folder)
    cls = ADAPTERS[family]
    draws, states = [], []
    for s in (1, 1, 2):
        draws.append(cls.load(str(folder), device="cpu", dtype="fp32", random_init_seed=s))
        states.append({k: v.clone() for k, v in draws[-1].model.state_dict().items()})
    assert draws[0].model is draws[1].model is draws[2].model  # built once
    VLMAdapter._control = None
    fresh = cls.load(str(folder), device="cpu", dtype="fp32", random_init_seed=2).model.state_dict()
    assert fresh.keys() == states[2].keys() and all(torch.equal(fresh[k], states[2][k]) for k in fresh)
    loaded = cls.load(str(folder), device="cpu", dtype="fp32")
    assert VLMAdapter._control is None  # a model of its own frees the control's
    want = dict(saved.model.named_parameters())
    for adapter in draws:
        got = dict(adapter.model.named_parameters())
        assert got.keys() == want.keys() and all(got[k].shape == want[k].shape for k in want)
        assert adapter.num_layers == saved.num_layers and adapter.num_heads == saved.num_heads
        assert adapter.tokenizer("a red square").input_ids == saved.tokenizer("a red square").input_ids
    embedding = "model.language_model.embed_tokens.weight"
    assert torch.equal(loaded.model.get_input_embeddings().weight, saved.model.get_input_embeddings().weight)
    assert not torch.equal(states[0][embedding], saved.model.get_input_embeddings().weight)  # the control draws
    assert torch.equal(states[0][embedding], states[1][embedding])
    assert not torch.equal(states[0][embedding], states[2][embedding])
    if saved.feed_size:  # the session's Qwen2-VL may be fed at another size than the family's default
        draws[0].set_feed_size(saved.feed_size)
    layout = draws[0].encode(["a red square"], random_images(1)).layouts[0]  # it runs like the model it stands for
    assert len(layout.image_positions) == len(saved.encode(["a red square"], random_images(1)).layouts[0].image_positions)
