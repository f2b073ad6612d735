"""Qwen3-VL-Instruct: Qwen2-VL's layout on 16-px patches (merged 2 x 2: 32 px per image token, a grid read from
``image_grid_thw``), a ViT without windows, and DeepStack.

The ViT stores its patches in 2 x 2 merge-window order, as Qwen2-VL's, and attends over the whole image in every
block (no window order to undo); its attention is pooled to the merged grid in raster order by the same rule
(tested on a grid whose merge order is not its own inverse). DeepStack: besides the last block's output (through
the merger, into the image tokens), the blocks ``deepstack_visual_indexes`` (8, 16 and 24 of 27 at 8B) each feed
their own merger, whose output is added to the hidden states of the image tokens after the first language-model
layers. So the language model reads the ViT at several depths, and the vision maps average every block, 0 to
the last: each one feeds what the language model reads. The default feed is 768 px, the paper's 24 x 24 tokens
at 32 px each.
"""
from __future__ import annotations

from models.qwen2vl import Qwen2VLAdapter

# The Qwen3-VL-Instruct chat template (image and text content; no default system turn), used by the tiny model;
# real checkpoints carry their own.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class Qwen3VLAdapter(Qwen2VLAdapter):
    family = "qwen3vl"
    default_model_path = "Qwen/Qwen3-VL-8B-Instruct"
    FAMILY_NAME = "Qwen3-VL"
    paper_layers = "all"  # the paper's mid-third rule was Qwen2-VL's
    default_feed_size = 768  # 24 x 24 tokens, as the paper's 672 px gave Qwen2-VL
    FEED_CELL = 32
    PATCH = 16
    # The published processor (Qwen/Qwen3-VL-8B-Instruct preprocessor_config.json): images of 65,536 to 16,777,216
    # px (256 x 256 to 4096 x 4096), normalised with mean and std 0.5
    IMAGE_PROCESSOR = dict(size={"shortest_edge": 65536, "longest_edge": 16777216}, image_mean=[0.5] * 3,
                           image_std=[0.5] * 3)
    MIN_FEED_TOKENS = 8  # 256 px, its smallest image: a smaller feed would be enlarged behind the grid's back
    CHAT_TEMPLATE = CHAT_TEMPLATE
    ROPE = {"rope_type": "default", "rope_theta": 5000000.0, "mrope_interleaved": True}
    MAX_POSITIONS = 262144  # Qwen/Qwen3-VL-8B-Instruct config.json

    TINY_VISION = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=4, num_position_embeddings=144,
                       deepstack_visual_indexes=[0, 1])
    # The 8B checkpoint (Qwen/Qwen3-VL-8B-Instruct config.json, as published; not checked here)
    SEVEN_B_TEXT = dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                        num_key_value_heads=8, rms_norm_eps=1e-6, vocab_size=151936, tie_word_embeddings=False)
    SEVEN_B_VISION = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16,
                          num_position_embeddings=2304, deepstack_visual_indexes=[8, 16, 24])

    @classmethod
    def seven_b(cls, depth: int = 0) -> dict:
        """As the base class; a model cut to ``depth`` blocks keeps the DeepStack blocks below the cut (at least
        its first block)."""
        sizes = super().seven_b(depth)
        if depth:
            vision = sizes["vision"]
            vision["deepstack_visual_indexes"] = [i for i in vision["deepstack_visual_indexes"]
                                                  if i < vision["depth"]] or [0]
        return sizes

    def after_layer(self, index, hidden, lm_inputs, times):
        """DeepStack: after each of the first layers, its merger's output added to the image tokens' hidden states
        (the language model's own ``_deepstack_process``)."""
        embeds = lm_inputs.get("deepstack_visual_embeds")
        if embeds is None or index >= len(embeds):
            return hidden
        return self.language_model()._deepstack_process(hidden, lm_inputs["visual_pos_masks"].repeat(times, 1),
                                                        embeds[index].repeat(times, 1))

    @classmethod
    def _classes(cls):
        from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor, Qwen3VLVideoProcessor

        return Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor, Qwen3VLVideoProcessor

    @classmethod
    def _vision_config(cls, vision: dict | None, text_hidden: int) -> dict:
        """The ViT's width is ``hidden_size``; ``out_hidden_size`` is the mergers' output."""
        return {**cls.TINY_VISION, **(vision or {}), "out_hidden_size": text_hidden, "patch_size": cls.PATCH,
                "spatial_merge_size": 2, "temporal_patch_size": 2, "in_channels": 3}

    @staticmethod
    def _mrope_section(head_dim: int) -> list[int]:
        """As the 8B's 24, 20, 20 of 64 (interleaved)."""
        spatial = 5 * head_dim // 32
        return [head_dim // 2 - 2 * spatial, spatial, spatial]

    @classmethod
    def _text_config(cls, text: dict, head_dim: int) -> dict:
        return {**text, "head_dim": head_dim}  # its config's default is the 8B's 128
