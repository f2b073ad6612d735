"""LLaVA-NeXT (LLaVA-1.6, the llava-hf conversion): CLIP ViT-L/14-336 + Mistral-7B, "anyres" image tokens.

An image becomes a base view (the whole image at 336 x 336: 24 x 24 = 576 tokens, raster order, CLS dropped as in
LLaVA-1.5) and high-resolution crops at the best of the checkpoint's ``image_grid_pinpoints``, unpadded to the
image's aspect ratio, with an ``image_newline`` token at the end of each row of crop features; the processor
writes all of them as ``<image>`` tokens, the base view first (the model's ``pack_image_features``). The analysed
image-token grid is the base view, as for LLaVA-OneVision: its 576 tokens are the first image tokens, and every
map, renormalisation and "image tokens" in this project means those (the crops see the picture again at higher
resolution; newlines are never cells). The picture is centre-cropped to 336 x 336 as for LLaVA-1.5, so that the
base view is the picture itself, one CLIP patch per cell; the crops (the best pinpoint of a square picture is
336 x 672: two tiles) are then the picture at the same scale and padding, which the model's unpadding drops. The vision tower runs each image's base view and crops as one batch; its maps are the
base view's, CLS dropped (the LLaVA-1.5 adapter's rule, inherited).
"""
from __future__ import annotations

import copy

import numpy as np
import torch

from models.base import _registered_attention
from models.llava import LlavaAdapter
from models.llava_onevision import base_view_first
from models.tiny import llama_style_tokenizer

# The checkpoint's chat template (Mistral's [INST] turns, the image before the text), used by the tiny model;
# real checkpoints carry their own.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}[INST] "
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}<image>\n{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}"
    "{% endfor %} [/INST]{% else %}{{ message['content'][0]['text'] }}{% endif %}{% endfor %}"
)
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


class LlavaNextAdapter(LlavaAdapter):
    family = "llava_next"
    default_model_path = "llava-hf/llava-v1.6-mistral-7b-hf"

    TINY_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=2)
    # The 7B checkpoint (llava-hf/llava-v1.6-mistral-7b-hf config.json, as published; not checked here):
    # Mistral-7B-Instruct-v0.2 and CLIP ViT-L/14-336, read at its second-to-last layer
    SEVEN_B_TEXT = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                        num_key_value_heads=8, rms_norm_eps=1e-5, vocab_size=32064,
                        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})

    @classmethod
    def build_random(cls, text: dict | None = None, vision: dict | None = None, image_side: int | None = None,
                     tokenizer=None, dtype: torch.dtype | None = None):
        from transformers import (CLIPVisionConfig, LlavaNextConfig, LlavaNextForConditionalGeneration,
                                  LlavaNextImageProcessor, LlavaNextProcessor, MistralConfig)

        tokenizer = tokenizer or llama_style_tokenizer(["<image>", "<pad>"])
        side = image_side or 336
        vision = CLIPVisionConfig(**{**cls.TINY_VISION, **(vision or {})}, image_size=side, patch_size=14)
        text = MistralConfig(**{**cls.TINY_TEXT, "vocab_size": len(tokenizer), **(text or {})},
                             max_position_embeddings=32768, sliding_window=None, pad_token_id=tokenizer.pad_token_id,
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
        pinpoints = [[side, 2 * side], [2 * side, side], [2 * side, 2 * side], [3 * side, side], [side, 3 * side]]
        config = LlavaNextConfig(vision_config=vision, text_config=text,
                                 image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                                 vision_feature_layer=-2, vision_feature_select_strategy="default",
                                 image_grid_pinpoints=pinpoints)
        model = LlavaNextForConditionalGeneration._from_config(
            copy.deepcopy(config), attn_implementation=_registered_attention(), dtype=dtype or torch.float32)
        image_processor = LlavaNextImageProcessor(size={"shortest_edge": side},
                                                  crop_size={"height": side, "width": side},
                                                  image_grid_pinpoints=pinpoints, image_mean=CLIP_MEAN,
                                                  image_std=CLIP_STD)
        processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                                       vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                       chat_template=CHAT_TEMPLATE)
        return model, processor

    def image_prompt(self, text: str) -> str:
        return self.chat_prompt(text, image=True)  # the checkpoint's chat template, not LLaVA-1.5's fixed format

    def text_prompt(self, text: str) -> str:
        return self.chat_prompt(text, image=False)

    def grid_positions(self, image_positions: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
        """The base view's tokens: the first gh x gw image tokens (module docstring)."""
        return image_positions[: grid[0] * grid[1]]

    def vision_views(self, inputs: dict) -> list[int]:
        """Each image's base view, then its crops, as the model runs them."""
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        side = int(self.model.config.vision_config.image_size)
        return base_view_first([image_size_to_num_patches(size, self.model.config.image_grid_pinpoints, side)
                                for size in inputs["image_sizes"].tolist()])
