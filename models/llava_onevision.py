"""LLaVA-OneVision (the llava-hf conversion): SigLIP-so400m at 384 px + Qwen2, "anyres" image tokens.

An image becomes a base view (the whole image at 384 x 384: 27 x 27 = 729 tokens, raster order, no CLS) and
high-resolution crops at the best of the checkpoint's ``image_grid_pinpoints``, unpadded to the image's aspect
ratio, with an ``image_newline`` token at the end of each row; the processor writes all of them as ``<image>``
tokens, the base view first. The analysed image-token grid is the base view: its 729 tokens are the first
image tokens, in raster order of the picture, and every map, renormalisation and "image tokens" in this project
means those (the crops see the same picture again at higher resolution; newlines are never cells). The vision
tower runs the base view and the crops of each image as one batch; its maps are the base view's.

SigLIP's 27 patches of 14 px cover the first 378 of its 384 px (a "valid" convolution). So the picture analysed
(``prepare_image``: the grid's cells, the entity masks, the patch shuffle) is 378 x 378, 14 px per cell, and it
is fed (``feed_image``) padded with 6 black pixels on the right and at the bottom to 384 x 384, which the
processor then leaves as it is: every cell is exactly one SigLIP patch, and the padding is seen by no patch. At
that size the crops are one tile of the same picture.
"""
from __future__ import annotations

import copy

import numpy as np
import torch
from PIL import Image

from models.base import VLMAdapter, _registered_attention, centre_square
from models.tiny import byte_level_tokenizer

# The checkpoint's chat template (transformers' convert_llava_onevision_weights_to_hf.py, which wrote the llava-hf
# checkpoints': each turn's images first, one "<image>\n" each, then its text), used by the tiny model; real
# checkpoints carry their own.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}<image>\n{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]


def base_view_first(view_counts: list[int]) -> list[int]:
    """``VLMAdapter.vision_views`` of an anyres family that runs each sample's image as its base view followed by
    ``view_counts[b] - 1`` crops (LLaVA-OneVision, LLaVA-NeXT)."""
    views = []
    for sample, count in enumerate(view_counts):
        views += [sample] + [-1] * (count - 1)
    return views


class LlavaOnevisionAdapter(VLMAdapter):
    family = "llava_onevision"
    default_model_path = "llava-hf/llava-onevision-qwen2-7b-ov-hf"

    def __init__(self, model, processor, model_path, revision=None):
        super().__init__(model, processor, model_path, revision)
        vision = model.config.vision_config
        self.vision_select_layer = int(model.config.vision_feature_layer)
        self.side = int(vision.image_size)
        self._base_grid = self.side // int(vision.patch_size)
        self.picture = self._base_grid * int(vision.patch_size)  # the pixels the patches cover

    TINY_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=2)
    TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4)
    # The 7B checkpoint (llava-hf/llava-onevision-qwen2-7b-ov-hf config.json, as published; not checked here):
    # Qwen2-7B and SigLIP-so400m without its last layer. Its vocabulary is Qwen2-7B-Instruct's 152064 with <image>
    # and <video> added, padded to a multiple of 64 (convert_llava_onevision_weights_to_hf.py): 152128.
    SEVEN_B_TEXT = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                        num_key_value_heads=4, rms_norm_eps=1e-6, vocab_size=152128)
    SEVEN_B_VISION = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26, num_attention_heads=16)

    @classmethod
    def build_random(cls, text: dict | None = None, vision: dict | None = None, image_side: int | None = None,
                     tokenizer=None, dtype: torch.dtype | None = None):
        from transformers import (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration,
                                  LlavaOnevisionImageProcessor, LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor,
                                  Qwen2Config, SiglipVisionConfig)

        tokenizer = tokenizer or byte_level_tokenizer(SPECIAL_TOKENS, pad_token="<|endoftext|>", eos_token="<|im_end|>",
                                                      chat_template=CHAT_TEMPLATE)
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
        side = image_side or 384
        vision = SiglipVisionConfig(**{**cls.TINY_VISION, **(vision or {})}, image_size=side, patch_size=14)
        text = Qwen2Config(**{**cls.TINY_TEXT, "vocab_size": len(tokenizer), **(text or {})},
                           max_position_embeddings=32768, pad_token_id=ids["<|endoftext|>"],
                           eos_token_id=ids["<|im_end|>"], bos_token_id=None)
        # the checkpoint's anyres grid: every (h, w) of 1 to 6 tiles a side, 384 ... 2304 px at 384 px a tile
        pinpoints = [[side * h, side * w] for h in range(1, 7) for w in range(1, 7)]
        config = LlavaOnevisionConfig(vision_config=vision, text_config=text, image_token_index=ids["<image>"],
                                      video_token_index=ids["<video>"], vision_feature_layer=-1,
                                      vision_feature_select_strategy="full", image_grid_pinpoints=pinpoints)
        model = LlavaOnevisionForConditionalGeneration._from_config(
            copy.deepcopy(config), attn_implementation=_registered_attention(), dtype=dtype or torch.float32)
        image_processor = LlavaOnevisionImageProcessor(size={"height": side, "width": side},
                                                       image_grid_pinpoints=pinpoints)
        processor = LlavaOnevisionProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                            video_processor=LlavaOnevisionVideoProcessor(),
                                            num_image_tokens=(side // 14) ** 2, vision_feature_select_strategy="full",
                                            chat_template=CHAT_TEMPLATE)
        return model, processor

    def prepare_image(self, image: Image.Image) -> Image.Image:
        return centre_square(image, self.picture)  # the picture the base view's patches cover (module docstring)

    def feed_image(self, prepared: Image.Image) -> Image.Image:
        framed = Image.new("RGB", (self.side, self.side))
        framed.paste(prepared, (0, 0))
        return framed

    def image_grid(self, inputs: dict, index: int) -> tuple[int, int]:
        return (self._base_grid, self._base_grid)

    def token_grid(self, prepared: Image.Image) -> tuple[int, int]:
        return (self._base_grid, self._base_grid)

    def grid_positions(self, image_positions: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
        """The base view's tokens: the first gh x gw image tokens (module docstring)."""
        return image_positions[: grid[0] * grid[1]]

    def vision_views(self, inputs: dict) -> list[int]:
        """The base view of each image comes first among its views (base, then the crops); an image of a
        sample with several images is run as its base view alone (the model's own rule)."""
        from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

        counts = inputs.get("batch_num_images")
        pinpoints = self.model.config.image_grid_pinpoints
        return base_view_first([image_size_to_num_patches(size, pinpoints, self.side)
                                if counts is None or int(counts[b]) == 1 else 1
                                for b, size in enumerate(inputs["image_sizes"].tolist())])

    def vision_attention_modules(self) -> list[torch.nn.Module]:
        return [layer.self_attn for layer in self.model.model.vision_tower.encoder.layers]

    def vision_query_rows(self, cells: np.ndarray) -> np.ndarray:
        return np.asarray(cells)  # SigLIP has no CLS: patch i is grid cell i

    def vision_to_grid(self, rows: torch.Tensor) -> torch.Tensor:
        return rows
