"""The offline builds (tiny-random, random-7b) of the newer families hold the published checkpoints' constants that
issue 34 found wrong: each test states the published value and the file it is read from. The 7B builds are made
on the meta device (shapes only)."""
from __future__ import annotations

import functools

import numpy as np
import torch
from conftest import random_images

from models import ADAPTERS


@functools.lru_cache(maxsize=None)
def build(family: str, seven_b: bool):
    """The family's tiny-random adapter, or its random-7b model and processor on the meta device."""
    cls = ADAPTERS[family]
    if not seven_b:
        return cls(*cls.build_random(), "tiny-random")
    with torch.device("meta"):
        return cls.build_random(**cls.seven_b())


def both_models(family: str):
    return [build(family, False).model, build(family, True)[0]]


def test_llava_onevision_7b_vocabulary_is_152128():
    """llava-hf/llava-onevision-qwen2-7b-ov-hf config.json, text_config.vocab_size 152128: Qwen2-7B-Instruct's 152064
    with <image> and <video> added and padded to a multiple of 64 (transformers'
    convert_llava_onevision_weights_to_hf.py: resize_token_embeddings(152066, pad_to_multiple_of=64))."""
    model, _ = build("llava_onevision", True)
    assert model.config.text_config.vocab_size == 152128
    assert model.get_input_embeddings().weight.shape[0] == model.lm_head.weight.shape[0] == 152128


def test_llava_onevision_pinpoints_are_the_6_x_6_grid_up_to_2304():
    """image_grid_pinpoints of llava-hf/llava-onevision-qwen2-7b-ov-hf (config.json and preprocessor_config.json):
    every (height, width) of 384, 768, ..., 2304 px, 36 pinpoints (transformers' LlavaOnevisionConfig and
    LlavaOnevisionImageProcessor default to the same list)."""
    from transformers import LlavaOnevisionConfig

    sides = [384, 768, 1152, 1536, 1920, 2304]
    published = [[h, w] for h in sides for w in sides]
    assert LlavaOnevisionConfig().image_grid_pinpoints == published
    tiny, (seven_b, processor) = build("llava_onevision", False), build("llava_onevision", True)
    for pinpoints in (tiny.model.config.image_grid_pinpoints, tiny.processor.image_processor.image_grid_pinpoints,
                      seven_b.config.image_grid_pinpoints, processor.image_processor.image_grid_pinpoints):
        assert [list(p) for p in pinpoints] == published


def test_llava_onevision_chat_template_and_its_layout():
    """The chat template of transformers' convert_llava_onevision_weights_to_hf.py (the llava-hf checkpoints'): a user
    turn "<|im_start|>user\\n<image>\\n{text}<|im_end|>\\n", then "<|im_start|>assistant\\n". The base view's
    image tokens still follow "user\\n", and every word of the caption is found after all the image tokens."""
    adapter = build("llava_onevision", False)
    assert adapter.image_prompt("a red square") == (
        "<|im_start|>user\n<image>\na red square<|im_end|>\n<|im_start|>assistant\n")
    assert adapter.text_prompt("a red square") == "<|im_start|>user\na red square<|im_end|>\n<|im_start|>assistant\n"
    caption = "there are two shapes a cyan semicircle and a blue pentagon . the spatial relation is left ."
    layout = adapter.encode([caption], random_images(1)).layouts[0]
    start = layout.image_positions[0]
    assert adapter.tokenizer.decode(layout.input_ids[:start]) == "<|im_start|>user\n"
    assert layout.grid == (27, 27) and np.array_equal(layout.image_positions, start + np.arange(27 * 27))
    last_image = np.flatnonzero(layout.input_ids == adapter.model.config.image_token_id).max()  # the crops' last
    for word in ("cyan", "semicircle", "blue", "pentagon", "left"):
        positions = layout.word_positions(word)
        assert positions.min() > last_image
        assert adapter.tokenizer.decode(layout.input_ids[positions]).strip() == word
    assert adapter.tokenizer.decode(layout.input_ids).endswith(  # the crops' tokens, then the text
        "<image>\n" + caption + "<|im_end|>\n<|im_start|>assistant\n")


def test_internvl3_text_rope_is_dynamic_ntk_with_factor_2():
    """OpenGVLab/InternVL3-8B config.json, llm_config: rope_scaling {"type": "dynamic", "factor": 2.0}, rope_theta
    1000000.0 (convert_internvl_weights_to_hf.py copies the llm_config into the -hf text_config); transformers 5
    spells it rope_parameters {"rope_type": "dynamic", ...}. Up to max_position_embeddings (32768) it is plain
    RoPE."""
    published = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1000000.0}
    for model in both_models("internvl3"):
        assert model.config.text_config.rope_parameters == published
        assert model.config.text_config.max_position_embeddings == 32768
    rotary = build("internvl3", False).model.model.language_model.rotary_emb
    head_dim = rotary.inv_freq.shape[0] * 2
    plain = 1.0 / 1000000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    assert rotary.rope_type == "dynamic"
    torch.testing.assert_close(rotary.inv_freq.double(), plain, rtol=1e-6, atol=0)


def test_internvl3_vision_attention_has_q_k_v_biases():
    """InternViT-300M-448px-V2.5 config.json: "qkv_bias": true, which transformers' convert_internvl_weights_to_hf.py
    writes as vision_config.attention_bias (and splits the qkv bias into q_proj, k_proj and v_proj)."""
    for model in both_models("internvl3"):
        assert model.config.vision_config.attention_bias is True
        attention = model.model.vision_tower.encoder.layer[0].attention
        assert all(getattr(attention, name).bias is not None for name in ("q_proj", "k_proj", "v_proj"))


def test_qwen3vl_processor_is_the_published_one():
    """Qwen/Qwen3-VL-8B-Instruct preprocessor_config.json: image_mean and image_std 0.5, size shortest_edge 65536
    (256 x 256 px) and longest_edge 16777216 (4096 x 4096 px), patch_size 16."""
    for processor in (build("qwen3vl", False).processor, build("qwen3vl", True)[1]):
        image_processor = processor.image_processor
        assert list(image_processor.image_mean) == list(image_processor.image_std) == [0.5, 0.5, 0.5]
        assert (image_processor.size["shortest_edge"], image_processor.size["longest_edge"]) == (65536, 16777216)
        assert image_processor.patch_size == 16


def test_qwen3vl_max_position_embeddings_is_262144():
    """Qwen/Qwen3-VL-8B-Instruct config.json, text_config.max_position_embeddings 262144."""
    for model in both_models("qwen3vl"):
        assert model.config.text_config.max_position_embeddings == 262144


def test_qwen2_5vl_max_position_embeddings_is_128000():
    """Qwen/Qwen2.5-VL-7B-Instruct config.json, max_position_embeddings 128000."""
    for model in both_models("qwen2_5vl"):
        assert model.config.text_config.max_position_embeddings == 128000

