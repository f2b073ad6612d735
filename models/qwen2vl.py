"""Qwen2-VL-Instruct: a ViT on 14-px patches, 2x2 patch merging, Qwen2 language model.

The image is resized to the feed size (672x672 by default) with qwen-vl-utils;
the processor then gives ``image_grid_thw`` = [1, H/14, W/14] and
(H/28) x (W/28) ``<|image_pad|>`` tokens in raster order of the merged grid.
The grid is read from ``image_grid_thw`` and the merge size, never guessed from
the token count. The ViT stores its patches in 2x2 merge-window order; its
attention is pooled to the merged grid, in raster order, before it becomes a map.
"""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from models.base import VLMAdapter, _registered_attention
from models.tiny import byte_level_tokenizer
from spatial_attention.common.errors import OptionError

# The Qwen2-VL-Instruct chat template (image and text content, default system turn),
# used by the tiny model; real checkpoints carry their own.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]


def pool_merge_windows(rows: torch.Tensor, merge: int) -> torch.Tensor:
    """ViT attention rows of whole merged cells (m*m consecutive query patches per cell, keys in merge-window
    order) -> (cells, N/m^2) on the merged grid, raster order.

    In merge-window order the m*m patches of a merged cell are consecutive and the
    cells follow each other in raster order of the merged grid (the order of the
    image tokens), so undoing the window order and pooling is one reshape: mean
    over a cell's query patches, sum over its key patches (rows still sum to 1).
    """
    k = merge * merge
    return rows.view(rows.shape[0] // k, k, rows.shape[1] // k, k).mean(1).sum(-1)


class Qwen2VLAdapter(VLMAdapter):
    family = "qwen2"
    default_model_path = "Qwen/Qwen2-VL-7B-Instruct"
    vision_select_layer = -1  # the merger reads the last ViT layer
    paper_layers = "mid_third"
    default_feed_size = 672  # the paper's: a 24 x 24 token grid

    def __init__(self, model, processor, model_path, revision=None):
        super().__init__(model, processor, model_path, revision)
        side = self.feed_side_for(processor.image_processor.size.get("longest_edge"))
        self.feed_size = (side, side)
        self.merge = int(model.config.vision_config.spatial_merge_size)

    # Pixels per image token: 14-px patches merged 2 x 2 (the 7B checkpoint and tiny-random alike).
    FEED_CELL = 28
    FAMILY_NAME = "Qwen2-VL"  # in messages
    MIN_FEED_TOKENS = 4  # per side: smaller grids leave no room for two shapes and a background

    @classmethod
    def feed_side_for(cls, max_pixels: int | None) -> int:
        """The default feed side under a processor that takes at most ``max_pixels``: the paper's 672, or
        the largest multiple of 28 px within the cap (a toy's processor caps its input at its own size)."""
        if not max_pixels:
            return cls.default_feed_size
        return min(cls.default_feed_size, math.isqrt(int(max_pixels)) // cls.FEED_CELL * cls.FEED_CELL)

    @classmethod
    def checkpoint_feed_size(cls, model_path: str) -> int | None:
        """From a local checkpoint's image-processor settings (their pixel cap): preprocessor_config.json, as
        the hub's checkpoints have it, or the "image_processor" of processor_config.json, as transformers 5
        saves a processor; the paper's 672 otherwise (a hub id, no cap)."""
        folder = Path(model_path)
        for name, key in (("preprocessor_config.json", None), ("processor_config.json", "image_processor")):
            try:
                config = json.loads((folder / name).read_text())
            except (OSError, ValueError):
                continue
            config = config.get(key) if key and isinstance(config, dict) else config
            if not isinstance(config, dict):
                continue
            size = config.get("size") if isinstance(config.get("size"), dict) else {}
            cap = size.get("longest_edge", config.get("max_pixels"))
            return cls.feed_side_for(cap if isinstance(cap, int) else None)
        return cls.default_feed_size

    @classmethod
    def check_feed_size(cls, size: int) -> None:
        """--feed-size must give an image the processor keeps as it is: a multiple of FEED_CELL px (28; Qwen3-VL
        32; otherwise it is silently rounded), from 4 tokens a side up to the processor's limit."""
        from qwen_vl_utils.vision_process import IMAGE_MAX_TOKEN_NUM

        cell, largest = cls.FEED_CELL, math.isqrt(IMAGE_MAX_TOKEN_NUM) * cls.FEED_CELL
        smallest = cls.MIN_FEED_TOKENS * cell
        if not smallest <= size <= largest or size % cell:
            nearest = min(max(round(size / cell) * cell, smallest), largest)
            raise OptionError(f"--feed-size {size}: {cls.FAMILY_NAME} needs a multiple of {cell} px between {smallest} "
                              f"and {largest} (one image token per {cell} x {cell} px); try {nearest} "
                              f"({nearest // cell} x {nearest // cell} tokens; the default is {cls.default_feed_size})")

    def set_feed_size(self, feed_size: int | tuple[int, int]) -> None:
        """Feed images at (height, width); an int means a square."""
        self.feed_size = (feed_size, feed_size) if isinstance(feed_size, int) else tuple(feed_size)

    # The tiny-random shapes; ``build_random`` overrides them (the benchmark's sizes).
    TINY_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=2)
    TINY_VISION = dict(depth=2, embed_dim=32, mlp_ratio=2, num_heads=4)

    SEVEN_B_TEXT = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                        num_key_value_heads=4, rms_norm_eps=1e-6, vocab_size=152064, tie_word_embeddings=False)
    SEVEN_B_VISION = dict(depth=32, embed_dim=1280, mlp_ratio=4, num_heads=16)
    VISION_DEPTH_KEY = "depth"

    # the tiny model's chat template and language-model rotary settings (mrope sections sized to its heads)
    CHAT_TEMPLATE = CHAT_TEMPLATE
    ROPE = {"rope_type": "default", "rope_theta": 1000000.0}
    MAX_POSITIONS = 32768  # max_position_embeddings of the text config (Qwen/Qwen2-VL-7B-Instruct config.json)
    PATCH = 14  # px per ViT patch
    IMAGE_PROCESSOR: dict = {}  # Qwen2VLImageProcessor's settings other than its defaults (Qwen3-VL's published ones)

    @classmethod
    def _classes(cls):
        """(config, model, processor, video processor) classes of the family."""
        from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor, Qwen2VLVideoProcessor

        return Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor, Qwen2VLVideoProcessor

    @staticmethod
    def _mrope_section(head_dim: int) -> list[int]:
        """M-RoPE's (t, h, w) share of the head_dim / 2 frequency pairs, as the 7B's 16, 24, 24 of 64."""
        spatial = 3 * head_dim // 16
        return [head_dim // 2 - 2 * spatial, spatial, spatial]

    @classmethod
    def _text_config(cls, text: dict, head_dim: int) -> dict:
        """The family's own text-config entries beyond the shared ones (Qwen3-VL: its head width)."""
        return text

    @classmethod
    def _vision_config(cls, vision: dict | None, text_hidden: int) -> dict:
        """The vision config of ``build_random`` (the ViT's width is ``embed_dim``; ``hidden_size`` is the
        merger's output, the language model's width)."""
        return {**cls.TINY_VISION, **(vision or {}), "hidden_size": text_hidden, "patch_size": 14,
                "spatial_merge_size": 2, "temporal_patch_size": 2, "in_channels": 3}

    @classmethod
    def build_random(cls, text: dict | None = None, vision: dict | None = None, image_side: int | None = None,
                     tokenizer=None, dtype: torch.dtype | None = None):
        from transformers import Qwen2VLImageProcessor

        config_class, model_class, processor_class, video_class = cls._classes()
        tokenizer = tokenizer or byte_level_tokenizer(SPECIAL_TOKENS, pad_token="<|endoftext|>", eos_token="<|im_end|>",
                                                      chat_template=cls.CHAT_TEMPLATE)
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
        text = {**cls.TINY_TEXT, "vocab_size": len(tokenizer), **(text or {})}
        head_dim = text["hidden_size"] // text["num_attention_heads"]
        text.update(max_position_embeddings=cls.MAX_POSITIONS,
                    rope_parameters={**cls.ROPE, **text.pop("rope_parameters", {}),
                                     "mrope_section": cls._mrope_section(head_dim)},
                    pad_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], bos_token_id=None)
        text = cls._text_config(text, head_dim)
        config = config_class(text_config=text, vision_config=cls._vision_config(vision, text["hidden_size"]),
                              image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                              vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
        model = model_class._from_config(
            copy.deepcopy(config), attn_implementation=_registered_attention(), dtype=dtype or torch.float32)
        settings = {**copy.deepcopy(cls.IMAGE_PROCESSOR), "patch_size": cls.PATCH}
        if image_side:  # a cap on the pixels the processor takes, so that it is also the default feed size
            settings["size"] = {"shortest_edge": 56 * 56, "longest_edge": image_side ** 2}
        processor = processor_class(image_processor=Qwen2VLImageProcessor(**settings), tokenizer=tokenizer,
                                    video_processor=video_class(), chat_template=cls.CHAT_TEMPLATE)
        return model, processor

    def prepare_image(self, image: Image.Image) -> Image.Image:
        from qwen_vl_utils import fetch_image

        height, width = self.feed_size
        patch = self.model.config.vision_config.patch_size
        return fetch_image({"image": image.convert("RGB"), "resized_height": height, "resized_width": width},
                           image_patch_size=patch)

    def image_grid(self, inputs: dict, index: int) -> tuple[int, int]:
        _, h, w = (int(v) for v in inputs["image_grid_thw"][index])
        return (h // self.merge, w // self.merge)

    def token_grid(self, prepared: Image.Image) -> tuple[int, int]:
        cell = self.model.config.vision_config.patch_size * self.merge
        return (prepared.height // cell, prepared.width // cell)

    def vision_attention_modules(self) -> list[torch.nn.Module]:
        return [block.attn for block in self.model.model.visual.blocks]

    def vision_query_rows(self, cells: np.ndarray) -> np.ndarray:
        k = self.merge * self.merge  # a merged cell's patches, consecutive in merge-window order
        return (np.asarray(cells)[:, None] * k + np.arange(k)).reshape(-1)

    def vision_to_grid(self, rows: torch.Tensor) -> torch.Tensor:
        return pool_merge_windows(rows, self.merge)
