"""The prefix cache (prefix.py) against the slow path: a whole forward with the same edit, for both families, in a
right-padded batch, with every copy of the batch editing other heads."""
from __future__ import annotations

import pytest
import torch
from conftest import random_images

from models import FAMILIES
from spatial_attention.engine.capture import plain_logits
from spatial_attention.engine.prefix import run_prefix, upper_logits
from spatial_attention.experiments.ablation_measure import HeadAblation, hooked_logits

CAPTIONS = ["Is there anything in the top left corner?", "Is there anything?", "a red square"]


def test_upper_layers_alone_equal_the_whole_forward(adapter):
    batch = adapter.encode(CAPTIONS, random_images(3, seed=4))
    assert batch.inputs["attention_mask"].min() == 0  # padded
    first = 1
    prefixes, logits = run_prefix(adapter, batch, [first])
    prefix = prefixes[first]
    plain = plain_logits(adapter, batch)
    assert torch.equal(logits, plain)
    torch.testing.assert_close(upper_logits(adapter, prefix, 1), plain, rtol=0, atol=1e-5)

    head_sets = [[(first, 0)], [(first, 1), (first + 1, 2)], [(first + 1, 0)]]
    for answer_only in (False, True):
        together = upper_logits(adapter, prefix, len(head_sets),
                                HeadAblation(adapter, head_sets, answer_only=answer_only).for_batch(batch))
        for s, heads in enumerate(head_sets):
            alone = hooked_logits(adapter, batch, HeadAblation(adapter, [heads], answer_only=answer_only)
                                  .for_batch(batch))
            torch.testing.assert_close(together[s * len(batch):(s + 1) * len(batch)], alone, rtol=0, atol=1e-5)
            assert not torch.allclose(alone, plain, rtol=0, atol=1e-4)  # the edit matters


def test_the_answer_position_alone_equals_the_whole_upper_layers(adapter):
    """answer_logits (one position a row through the upper layers) against upper_logits, with answer-position edits
    and none, in a right-padded batch whose inputs end at different positions."""
    from spatial_attention.engine.prefix import answer_logits
    from spatial_attention.experiments.patching import AnswerSwap

    batch = adapter.encode(CAPTIONS, random_images(3, seed=5))
    first = 1
    prefix = run_prefix(adapter, batch, [first], keys_values=True)[0][first]
    assert len(set(prefix.last)) == 3
    torch.testing.assert_close(answer_logits(adapter, prefix, 2), upper_logits(adapter, prefix, 2), rtol=0,
                               atol=1e-5)
    head_sets = [[(first, 0)], [(first, 1), (first + 1, 2)], [(adapter.num_layers - 1, 0)]]
    ablation = HeadAblation(adapter, head_sets, answer_only=True).for_batch(batch)
    fast = answer_logits(adapter, prefix, len(head_sets), ablation)
    torch.testing.assert_close(fast, upper_logits(adapter, prefix, len(head_sets), ablation), rtol=0, atol=1e-5)
    assert not torch.allclose(fast[:3], fast[3:6], rtol=0, atol=1e-4)  # the edits matter
    last = torch.tensor(prefix.last)
    heads = [(first, 1), (first + 1, 0), (first + 1, 3)]
    fills = torch.randn(len(heads), adapter.model.config.text_config.hidden_size // adapter.num_heads,
                        generator=torch.Generator().manual_seed(0))
    slow = upper_logits(adapter, prefix, 1, AnswerSwap(adapter, last, heads, fills))
    fast = answer_logits(adapter, prefix, 1, AnswerSwap(adapter, last, heads, fills))
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-5)
    assert not torch.allclose(fast, upper_logits(adapter, prefix, 1), rtol=0, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_s_reruns_equal_its_whole_forward(family):
    """From the lowest layers too, where Qwen3-VL's forward adds its DeepStack features between the layers: both
    reruns against the whole forward with the same ablation."""
    from models import load_adapter

    adapter = load_adapter(family, "tiny-random", device="cpu", dtype="fp32")
    for captions in (CAPTIONS, CAPTIONS[:1] * 2):  # padded, and not (the layers then get no mask)
        _compare_reruns(adapter, adapter.encode(captions, random_images(len(captions), seed=6)))


def _compare_reruns(adapter, batch):
    from spatial_attention.engine.prefix import answer_logits

    for first in (0, 1):
        prefix = run_prefix(adapter, batch, [first], keys_values=True)[0][first]
        head_sets = [[(first, 0)], [(first, 1), (first + 1, 2)]]
        for answer_only in (False, True):
            def ablation(sets):
                return HeadAblation(adapter, sets, answer_only=answer_only).for_batch(batch)

            whole = torch.cat([hooked_logits(adapter, batch, ablation([heads])) for heads in head_sets])
            reruns = [upper_logits] + [answer_logits] * answer_only
            for rerun in reruns:
                torch.testing.assert_close(rerun(adapter, prefix, len(head_sets), ablation(head_sets)), whole,
                                           rtol=0, atol=1e-5, msg=f"{rerun.__name__} from layer {first}")
