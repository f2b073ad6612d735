"""InternVL3 (the transformers-native ``-hf`` conversion): InternViT at 448 px + Qwen2.5, pixel-shuffle merge.

The ViT sees 448 x 448 px as 32 x 32 patches of 14 px after a CLS token; ``pixel_shuffle`` (downsample ratio 0.5)
folds each 2 x 2 block of patches into one feature, and the projected 16 x 16 = 256 features are the image's
``<IMG_CONTEXT>`` tokens, in raster order of the merged grid, between ``<img>`` and ``</img>`` (its two
reshapes and permutes move the patch (2r + dr, 2c + dc) into token r * 16 + c: tested against the model's own
features). Dynamic tiling cuts a picture into 448-px tiles on the aspect-ratio grid that fits it best and, with
more than one tile, appends a thumbnail of the whole picture; a square picture fits the 1 x 1 grid, so the
picture is centre-cropped to 448 px and becomes exactly one tile, no thumbnail: the analysed grid is that base
tile, the image's 256 tokens (a picture that tiled into more would fail the grid check in ``encode``).

The vision maps are the ViT's rows of a cell's four patches (CLS after it dropped and the rows renormalised, as
LLaVA's), their keys summed over each 2 x 2 block and the four rows averaged: one row per merged cell over the
merged grid, from every ViT layer (``vision_feature_layer`` -1).
"""
from __future__ import annotations

import copy

import numpy as np
import torch
from PIL import Image

from models.base import VLMAdapter, _registered_attention, centre_square
from models.tiny import byte_level_tokenizer

# The checkpoint's chat template (Qwen2.5's turns, the image placeholder before the text), used by the tiny
# model; real checkpoints carry their own.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}<IMG_CONTEXT>\n{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
NAMED_TOKENS = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
                "video_token": "<video>"}
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


class InternVL3Adapter(VLMAdapter):
    family = "internvl3"
    default_model_path = "OpenGVLab/InternVL3-8B-hf"

    def __init__(self, model, processor, model_path, revision=None):
        super().__init__(model, processor, model_path, revision)
        vision = model.config.vision_config
        self.vision_select_layer = int(model.config.vision_feature_layer)
        self.side = int(vision.image_size[0])
        self._patch_side = self.side // int(vision.patch_size[0])
        self.merge = round(1 / float(model.config.downsample_ratio))
        self._grid = self._patch_side // self.merge

    TINY_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=2)
    TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4)
    # The 8B checkpoint (OpenGVLab/InternVL3-8B-hf config.json, as published; not checked here): Qwen2.5-7B and
    # InternViT-300M-448px-V2.5
    SEVEN_B_TEXT = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                        num_key_value_heads=4, rms_norm_eps=1e-6, vocab_size=151674)
    SEVEN_B_VISION = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16)
    # The language model's RoPE (OpenGVLab/InternVL3-8B config.json, llm_config: rope_theta 1e6, rope_scaling
    # {"type": "dynamic", "factor": 2.0}) in transformers 5's spelling; dynamic NTK rescales only sequences longer
    # than max_position_embeddings (32768), so the prompts here see plain RoPE
    ROPE = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1000000.0}

    @classmethod
    def build_random(cls, text: dict | None = None, vision: dict | None = None, image_side: int | None = None,
                     tokenizer=None, dtype: torch.dtype | None = None):
        from transformers import (GotOcr2ImageProcessor, InternVLConfig, InternVLForConditionalGeneration,
                                  InternVLProcessor, InternVLVideoProcessor, InternVLVisionConfig, Qwen2Config)

        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *NAMED_TOKENS.values()]
        tokenizer = tokenizer or byte_level_tokenizer(specials, pad_token="<|endoftext|>", eos_token="<|im_end|>",
                                                      chat_template=CHAT_TEMPLATE, **NAMED_TOKENS)
        side = image_side or 448
        # InternViT-300M-448px-V2.5's q, k and v have biases (its config's qkv_bias, which transformers'
        # convert_internvl_weights_to_hf.py writes as attention_bias)
        vision = InternVLVisionConfig(**{**cls.TINY_VISION, **(vision or {})}, image_size=side, patch_size=14,
                                      attention_bias=True)
        text = Qwen2Config(**{**cls.TINY_TEXT, "vocab_size": len(tokenizer), **(text or {})},
                           max_position_embeddings=32768, pad_token_id=tokenizer.pad_token_id,
                           eos_token_id=tokenizer.eos_token_id, bos_token_id=None, rope_parameters=dict(cls.ROPE))
        config = InternVLConfig(vision_config=vision, text_config=text,
                                image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"), downsample_ratio=0.5,
                                vision_feature_layer=-1, vision_feature_select_strategy="default")
        model = InternVLForConditionalGeneration._from_config(
            copy.deepcopy(config), attn_implementation=_registered_attention(), dtype=dtype or torch.float32)
        image_processor = GotOcr2ImageProcessor(size={"height": side, "width": side}, crop_to_patches=True,
                                                min_patches=1, max_patches=12, image_mean=IMAGENET_MEAN,
                                                image_std=IMAGENET_STD)
        processor = InternVLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                      video_processor=InternVLVideoProcessor(),
                                      image_seq_length=(side // 14 // 2) ** 2, chat_template=CHAT_TEMPLATE)
        return model, processor

    def prepare_image(self, image: Image.Image) -> Image.Image:
        return centre_square(image, self.side)  # one tile, no thumbnail (module docstring)

    def image_grid(self, inputs: dict, index: int) -> tuple[int, int]:
        return (self._grid, self._grid)

    def token_grid(self, prepared: Image.Image) -> tuple[int, int]:
        return (self._grid, self._grid)

    def _expanded_prompt(self, prompt: str, n_image_tokens: int) -> str:
        """As the processor expands it: ``<img>``, the context tokens, ``</img>``."""
        token = self.processor.image_token
        if n_image_tokens == 0:
            return prompt
        framed = self.processor.start_image_token + token * n_image_tokens + self.processor.end_image_token
        return prompt.replace(token, framed, 1)

    def vision_attention_modules(self) -> list[torch.nn.Module]:
        return [layer.attention for layer in self.model.model.vision_tower.encoder.layer]

    def vision_query_rows(self, cells: np.ndarray) -> np.ndarray:
        """Each cell's four patches (2r + dr, 2c + dc), consecutive, after CLS."""
        rows, cols = np.divmod(np.asarray(cells), self._grid)
        offsets = np.arange(self.merge)
        patch_rows = (rows[:, None, None] * self.merge + offsets[None, :, None])
        patch_cols = (cols[:, None, None] * self.merge + offsets[None, None, :])
        return (1 + patch_rows * self._patch_side + patch_cols).reshape(-1)

    def vision_to_grid(self, rows: torch.Tensor) -> torch.Tensor:
        patches = rows[:, 1:]  # drop the CLS column
        patches = patches / patches.sum(-1, keepdim=True).clamp_min(1e-30)
        m, g = self.merge, self._grid
        blocks = patches.reshape(-1, m * m, g, m, g, m).sum((3, 5))  # [cells, its patches, g, g]
        return blocks.mean(1).reshape(-1, g * g)
