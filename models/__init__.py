"""Model adapters: one per family, one interface (see ``models.base.VLMAdapter``).

    adapter = load_adapter("qwen2", model_path="tiny-random")

``model_path`` is a hub id, a local checkpoint folder, ``tiny-random`` for a
random-weight model of the same architecture built offline (numbers mean nothing), or
``toy`` for the family's committed toy model (small, trained: a positive control).
"""
from __future__ import annotations

from pathlib import Path

from models.base import TINY_RANDOM, TOY, TOY_ROOT, Batch, TokenLayout, VLMAdapter
from models.internvl3 import InternVL3Adapter
from models.llava import LlavaAdapter
from models.llava_next import LlavaNextAdapter
from models.llava_onevision import LlavaOnevisionAdapter
from models.qwen2_5vl import Qwen2_5VLAdapter
from models.qwen2vl import Qwen2VLAdapter
from models.qwen3vl import Qwen3VLAdapter
from spatial_attention.common.errors import OptionError

ADAPTERS: dict[str, type[VLMAdapter]] = {"llava": LlavaAdapter, "qwen2": Qwen2VLAdapter,
                                          "qwen2_5vl": Qwen2_5VLAdapter, "llava_onevision": LlavaOnevisionAdapter,
                                          "llava_next": LlavaNextAdapter, "internvl3": InternVL3Adapter,
                                          "qwen3vl": Qwen3VLAdapter}
FAMILIES = tuple(ADAPTERS)  # the --model choices


def family_adapter(family: str) -> type[VLMAdapter]:
    """The adapter class of ``family``; OptionError for a family there is none for."""
    if family not in ADAPTERS:
        raise OptionError(f"--model {family!r} is not one of {', '.join(ADAPTERS)}")
    return ADAPTERS[family]


def toy_folder(family: str) -> Path:
    """Where ``family``'s toy model is saved (``--model-path toy``)."""
    return TOY_ROOT / family_adapter(family).family


def load_adapter(family: str, model_path: str | None = None, **kwargs) -> VLMAdapter:
    """Load ``family`` (one of ``FAMILIES``); kwargs go to ``VLMAdapter.load``."""
    return family_adapter(family).load(model_path, **kwargs)


__all__ = ["ADAPTERS", "FAMILIES", "family_adapter", "TINY_RANDOM", "TOY", "toy_folder", "Batch", "TokenLayout", "VLMAdapter",
           "load_adapter", "LlavaAdapter", "Qwen2VLAdapter", "Qwen2_5VLAdapter", "LlavaOnevisionAdapter",
           "LlavaNextAdapter", "InternVL3Adapter", "Qwen3VLAdapter"]
