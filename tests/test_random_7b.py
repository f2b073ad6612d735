"""--model-path random-7b[:N]: the 7B checkpoints' exact geometry (shared/specs/models.md) with random weights,
built offline; the engine is exact against eager attention at that geometry (verify_attention.py)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models import ADAPTERS
from models.base import random_7b_depth
from spatial_attention.common.errors import OptionError

REPO = Path(__file__).resolve().parents[1]

# models.md, "The two 7B checkpoints' configs": (layers, heads, KV heads, head_dim, hidden, intermediate, vocab),
# (vision layers, vision heads, vision hidden)
SEVEN_B = {"llava": ((32, 32, 32, 128, 4096, 11008, 32064), (24, 16, 1024)),
           "qwen2": ((28, 28, 4, 128, 3584, 18944, 152064), (32, 16, 1280))}


@pytest.mark.parametrize("family", ["llava", "qwen2"])
def test_random_7b_has_the_checkpoint_geometry(family):
    cls = ADAPTERS[family]
    with torch.device("meta"):  # shapes only: no memory, no time
        full, _ = cls.build_random(**cls.seven_b())
        two, _ = cls.build_random(**cls.seven_b(2))
    (layers, heads, kv, head_dim, hidden, intermediate, vocab), (v_layers, v_heads, v_hidden) = SEVEN_B[family]
    text, vision = full.config.text_config, full.config.vision_config
    assert (text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads, text.hidden_size,
            text.intermediate_size, text.vocab_size) == (layers, heads, kv, hidden, intermediate, vocab)
    assert full.model.language_model.layers[0].self_attn.head_dim == head_dim
    assert full.get_input_embeddings().weight.shape == (vocab, hidden)
    assert len(full.model.language_model.layers) == layers and len(two.model.language_model.layers) == 2
    if family == "llava":
        assert (vision.num_hidden_layers, vision.num_attention_heads, vision.hidden_size) == (v_layers, v_heads, v_hidden)
        assert (vision.image_size, vision.patch_size, vision.hidden_act) == (336, 14, "quick_gelu")
        assert text.rms_norm_eps == 1e-5 and text.rope_parameters["rope_theta"] == 10000.0
        assert len(two.model.vision_tower.encoder.layers) == 2
    else:
        assert (vision.depth, vision.num_heads, vision.embed_dim) == (v_layers, v_heads, v_hidden)
        assert text.rope_parameters["mrope_section"] == [16, 24, 24] and text.rope_parameters["rope_theta"] == 1e6
        assert text.rms_norm_eps == 1e-6 and not full.config.tie_word_embeddings
        assert (vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size) == (14, 2, 2)
        assert len(two.model.visual.blocks) == 2


def test_random_7b_names():
    assert random_7b_depth("random-7b") == 0 and random_7b_depth("random-7b:2") == 2
    assert random_7b_depth("tiny-random") is None and random_7b_depth("llava-hf/llava-1.5-7b-hf") is None
    for bad in ("random-7b:0", "random-7b:x", "random-7b:-1"):
        with pytest.raises(OptionError, match="random-7b:N needs a whole number"):
            random_7b_depth(bad)


@pytest.mark.parametrize("family, samples", [("llava", 2), ("qwen2", 1)])
def test_verify_attention_passes_at_the_7b_geometry(family, samples, tmp_path):
    """The first two layers of the real geometry (32 heads of 128; 28 query heads over 4 KV heads, 2304-patch
    ViT) in fp32 on the CPU: about 35 s / 5 GB (LLaVA) and 55 s / 9.6 GB (Qwen2-VL, one sample)."""
    out = tmp_path / "report.json"
    done = subprocess.run([sys.executable, "verify_attention.py", "--model", family, "--model-path", "random-7b:2",
                           "--device", "cpu", "--dtype", "fp32", "--samples", str(samples), "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["passed"] and max(report["max_abs_diff"].values()) <= 1e-5
    assert report["logits_max_abs_diff"] == 0.0
