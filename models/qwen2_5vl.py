"""Qwen2.5-VL-Instruct: Qwen2-VL's layout (14-px patches merged 2 x 2, image tokens in raster order of the
merged grid, the grid read from ``image_grid_thw``), with a windowed ViT.

Before its blocks the ViT reorders the merged cells into 112-px windows (``window_index``) and restores raster
order only after the merger, so inside the blocks every query row and key column is in window order; the
vision-encoder maps are mapped back to raster order here. Most blocks attend within a window only; the vision
maps average the full-attention blocks (``fullatt_block_indexes``: 7, 15, 23, 31 at 7B), because a windowed
block's map is confined to the seed's own window by construction and would say where the window is, not where
the encoder looks. Everything else (prompt, processor, feed size) is Qwen2-VL's.
"""
from __future__ import annotations

import functools

import numpy as np
import torch

from models.qwen2vl import Qwen2VLAdapter, pool_merge_windows


@functools.lru_cache(maxsize=8)
def _window_order(grid_h: int, grid_w: int, merge: int, window_size: int, patch_size: int) -> np.ndarray:
    from transformers.vision_utils import get_vision_window_index

    index, _ = get_vision_window_index(torch.tensor([[1, grid_h, grid_w]]), merge, window_size, patch_size)
    return index.numpy()


class Qwen2_5VLAdapter(Qwen2VLAdapter):
    family = "qwen2_5vl"
    default_model_path = "Qwen/Qwen2.5-VL-7B-Instruct"
    FAMILY_NAME = "Qwen2.5-VL"

    # tiny-random: 4 blocks, windowed but for blocks 1 and 3 (like 7B's pattern of every 8th block)
    TINY_VISION = dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=4, window_size=112,
                       fullatt_block_indexes=[1, 3])
    # The 7B checkpoint (Qwen/Qwen2.5-VL-7B-Instruct config.json): Qwen2-VL-7B's language model, a 32-block ViT
    SEVEN_B_TEXT = dict(Qwen2VLAdapter.SEVEN_B_TEXT)
    SEVEN_B_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, window_size=112,
                          fullatt_block_indexes=[7, 15, 23, 31])
    MAX_POSITIONS = 128000  # Qwen/Qwen2.5-VL-7B-Instruct config.json

    @classmethod
    def seven_b(cls, depth: int = 0) -> dict:
        """As the base class; a model cut to ``depth`` blocks keeps the full-attention blocks below the cut, and
        its last block is full-attention where none is (the vision maps read only those)."""
        sizes = super().seven_b(depth)
        if depth:
            vision = sizes["vision"]
            kept = [i for i in vision["fullatt_block_indexes"] if i < vision["depth"]]
            vision["fullatt_block_indexes"] = kept or [vision["depth"] - 1]
        return sizes

    @classmethod
    def _classes(cls):
        from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor,
                                  Qwen2VLVideoProcessor)

        return Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor, Qwen2VLVideoProcessor

    @classmethod
    def _vision_config(cls, vision: dict | None, text_hidden: int) -> dict:
        """The ViT's width is ``hidden_size``; ``out_hidden_size`` is the merger's output."""
        return {**cls.TINY_VISION, **(vision or {}), "out_hidden_size": text_hidden, "patch_size": 14,
                "spatial_merge_size": 2, "temporal_patch_size": 2, "in_channels": 3}

    def vision_map_layers(self) -> list[int]:
        """The full-attention blocks (module docstring)."""
        full = set(self.model.config.vision_config.fullatt_block_indexes)
        return [i for i in range(len(self.vision_attention_modules())) if i in full]

    def window_order(self) -> np.ndarray:
        """For each merged cell in the ViT's window order, its raster cell (the model's own ``window_index``)
        for an image at the feed size (``prepare_image`` feeds every image at it; ``image_grid`` reads it
        back from ``image_grid_thw``)."""
        vision = self.model.config.vision_config
        return _window_order(*(side // vision.patch_size for side in self.feed_size), self.merge,
                             vision.window_size, vision.patch_size)

    def vision_query_rows(self, cells: np.ndarray) -> np.ndarray:
        place = np.argsort(self.window_order())  # raster cell -> its place in window order
        return super().vision_query_rows(place[np.asarray(cells, np.int64)])

    def vision_to_grid(self, rows: torch.Tensor) -> torch.Tensor:
        place = torch.as_tensor(np.argsort(self.window_order()), device=rows.device)
        return pool_merge_windows(rows, self.merge)[:, place]  # key columns from window order to raster
