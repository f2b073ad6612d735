"""Experiment 3's causal score (--score patching): the batched swaps against one plain forward per head and
image, and the repeated batch against encoding the repeated images."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import committed_toy

from spatial_attention.data.counterfactual import CORNER_PROMPT, fill_corner_prompt, read_dataset
from spatial_attention.data.generate import generate_counterfactual
from spatial_attention.engine.capture import AttentionHook, active, last_position_logits
from spatial_attention.experiments import patching
from spatial_attention.experiments.ablation_measure import log_odds, yes_no_ids

FAMILIES = ["llava", "qwen2"]


class _SetHead(AttentionHook):
    """The obvious edit: one head of one layer gets ``vector`` at the last position (batch of one)."""

    def __init__(self, module, head, vector, last):
        self.module, self.head, self.vector, self.last = module, head, vector, last

    def edit_output(self, module, output):
        if module is not self.module:
            return output
        output = output.clone()
        output[0, self.last, self.head] = self.vector
        return output


class _Keep(AttentionHook):
    def __init__(self, module, last):
        self.module, self.last, self.kept = module, last, None

    def edit_output(self, module, output):
        if module is self.module:
            self.kept = output[0, self.last].clone()
        return output


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_swaps_equal_one_forward_per_head_and_image(family, tmp_path):
    """pair_scores (two images per head, several heads per forward, the batch repeated) against the slow path:
    each image alone, its head output read in one forward and written into the other image's in another."""
    adapter = committed_toy(family)
    folder, = generate_counterfactual(tmp_path, count=1, seed=4, corners=["topright"])
    full, control = read_dataset(folder, None).pairs[0].load_images()
    prompt = fill_corner_prompt(CORNER_PROMPT, "topright")
    answer_ids = yes_no_ids(adapter.tokenizer)
    modules = adapter.lm_attention_modules()
    heads = [(0, 1), (0, 2), (1, 0), (1, 5), (2, 3), (3, 7), (2, 6)]  # two layers share a forward, chunks split one
    scores, base, said = patching.pair_scores(adapter, patching.encode_pair(adapter, prompt, full, control), heads,
                                              answer_ids, heads_per_forward=3)
    assert max(abs(v) for pair in scores.values() for v in pair) > 0.1  # the toy's heads matter: not all ~0

    batches = [adapter.encode([prompt], [image]) for image in (full, control)]
    with torch.inference_mode():
        plain = [float(log_odds(last_position_logits(adapter, b), *answer_ids)[0]) for b in batches]
        assert np.allclose(base, plain, atol=1e-4)
        for layer, head in heads:
            kept = []
            for b in batches:
                keep = _Keep(modules[layer], b.layouts[0].last_position)
                with active(keep):
                    last_position_logits(adapter, b)
                kept.append(keep.kept[head])
            for kind, b in enumerate(batches):
                swap = _SetHead(modules[layer], head, kept[1 - kind], b.layouts[0].last_position)
                with active(swap):
                    after = float(log_odds(last_position_logits(adapter, b), *answer_ids)[0])
                assert scores[(layer, head)][kind] == pytest.approx(plain[kind] - after, abs=1e-3), (layer, head, kind)
    assert said[0].lower() in ("yes", "no") and said[1].lower() in ("yes", "no")


def test_score_cubes_follow_the_layers_given():
    scores = {(layer, h): (10 * layer + h, -h) for layer in (1, 3) for h in range(2)}
    full, control = patching.score_cubes(scores, [3, 1], 2)
    assert full.tolist() == [[30, 31], [10, 11]] and control.tolist() == [[0, -1], [0, -1]]
