"""What a run computes, counted before it runs (``run_study.sh``'s plan, ``study/cost.py``).

Each experiment module says which forwards it makes for given settings (its ``planned_forwards``), next to the
code that makes them, in the unit here; the study prices them with a calibration of the device
(``study/calibration.py``). A test holds every count to the forwards a tiny run actually makes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Forwards:
    """``inputs`` input sequences through the top ``layers`` language-model layers, ``batch`` rows per forward.

    ``full``: the whole model (the vision encoder and the embeddings too); otherwise only those layers, rerun on a
    batch's kept prefix (``engine/prefix.py``), with ``answer_only`` at each input's answer position alone (one
    token a row, reading the keys and values of the input's other positions: ``prefix.answer_logits``), then
    ``batch`` counts those rows. ``image``: the input holds an image (else text alone);
    ``captured``: attention is recorded on the way (``engine/capture.py``), which costs more than a plain forward.
    ``layers`` may be a mean where the lowest rerun layer is not known before the run (the ablated heads')."""
    inputs: int
    batch: int
    layers: float
    full: bool = True
    image: bool = True
    captured: bool = False
    answer_only: bool = False


def batched(items: int, batch: int) -> int:
    """Rows of the first forward when ``items`` go ``batch`` at a time (what a batch holds at most)."""
    return max(1, min(items, batch))


def chunks(items: int, size: int) -> int:
    """How many forwards ``items`` take, ``size`` at a time."""
    return math.ceil(items / size) if items else 0


def full_inputs(forwards: list[Forwards]) -> int:
    """Inputs that run the whole model: the plan's "forwards"."""
    return sum(f.inputs for f in forwards if f.full)


def rerun_inputs(forwards: list[Forwards]) -> int:
    """Inputs rerun through the upper layers only (patching, ablation)."""
    return sum(f.inputs for f in forwards if not f.full)
