"""LLaVA-1.5 (the llava-hf conversion): CLIP ViT-L/14-336 + Llama-7B.

Prompt as in the paper, without the system sentence:
``USER: <image>\\n{text} ASSISTANT:``. The processor expands ``<image>`` to 576
tokens (a 24x24 grid, CLS dropped), which sit right after ``USER: `` and not at
the end of the sequence; they are found from the input ids.
"""
from __future__ import annotations

import copy

import numpy as np
import torch
from PIL import Image

from models.base import VLMAdapter, _registered_attention, centre_square
from models.tiny import llama_style_tokenizer


class LlavaAdapter(VLMAdapter):
    family = "llava"
    default_model_path = "llava-hf/llava-1.5-7b-hf"
    vision_select_layer = -2  # config.vision_feature_layer of LLaVA-1.5

    def __init__(self, model, processor, model_path, revision=None):
        super().__init__(model, processor, model_path, revision)
        self.vision_select_layer = int(model.config.vision_feature_layer)
        self._patch_grid = model.config.vision_config.image_size // model.config.vision_config.patch_size

    # The tiny-random shapes; ``build_random`` overrides them (the benchmark's sizes).
    TINY_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=2)
    TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                       projection_dim=32)

    SEVEN_B_TEXT = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                        num_key_value_heads=32, rms_norm_eps=1e-5, vocab_size=32064,
                        rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    SEVEN_B_VISION = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                          projection_dim=768, hidden_act="quick_gelu")

    @classmethod
    def build_random(cls, text: dict | None = None, vision: dict | None = None, image_side: int | None = None,
                     tokenizer=None, dtype: torch.dtype | None = None):
        from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                                  LlavaForConditionalGeneration, LlavaProcessor)

        tokenizer = tokenizer or llama_style_tokenizer(["<image>", "<pad>"])
        side = image_side or 336
        vision = CLIPVisionConfig(**{**cls.TINY_VISION, **(vision or {})}, image_size=side, patch_size=14)
        text = LlamaConfig(**{**cls.TINY_TEXT, "vocab_size": len(tokenizer), **(text or {})},
                           max_position_embeddings=4096, pad_token_id=tokenizer.pad_token_id,
                           bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
        config = LlavaConfig(vision_config=vision, text_config=text,
                             image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                             vision_feature_layer=-2, vision_feature_select_strategy="default")
        model = LlavaForConditionalGeneration._from_config(
            copy.deepcopy(config), attn_implementation=_registered_attention(), dtype=dtype or torch.float32)
        image_processor = CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side},
                                             image_mean=[0.481, 0.458, 0.408], image_std=[0.269, 0.261, 0.276])
        processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1)
        return model, processor

    def image_prompt(self, text: str) -> str:
        return f"USER: <image>\n{text} ASSISTANT:"

    def text_prompt(self, text: str) -> str:
        return f"USER: {text} ASSISTANT:"

    def prepare_image(self, image: Image.Image) -> Image.Image:
        return centre_square(image, self.model.config.vision_config.image_size)

    def image_grid(self, inputs: dict, index: int) -> tuple[int, int]:
        return (self._patch_grid, self._patch_grid)

    def token_grid(self, prepared: Image.Image) -> tuple[int, int]:
        return (self._patch_grid, self._patch_grid)

    def vision_attention_modules(self) -> list[torch.nn.Module]:
        return [layer.self_attn for layer in self.model.model.vision_tower.encoder.layers]

    def vision_query_rows(self, cells: np.ndarray) -> np.ndarray:
        return np.asarray(cells) + 1  # after CLS

    def vision_to_grid(self, rows: torch.Tensor) -> torch.Tensor:
        patches = rows[:, 1:]  # drop the CLS column
        return patches / patches.sum(-1, keepdim=True).clamp_min(1e-30)
