"""The prefix cache (prefix.py) against the slow path: a whole forward with the same edit, for both families, in a
right-padded batch, with every copy of the batch editing other heads."""
from __future__ import annotations

import torch
from conftest import random_images

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
