"""What an ablation measures (the model's yes/no answer with heads removed, through the capture engine), and its
table and figure.

Ablating a head replaces its slice of its layer's per-head attention output,
at every position (``--positions all``, the paper's) or at the answer position
only (``--positions answer``: what ``--score patching`` swaps, so that the heads
it found are tested where it found them), before the output projection (o_proj):

- ``zero``: with zeros;
- ``mean``: at each position, with that head's mean output at that position
  over every image of the run (full and control of each pair) in the unablated
  model, computed in a first pass over the data. Every input has the same
  prompt and image size, hence the same length, so position t is the same
  token (or image patch) in each; inputs of different lengths are refused. At
  the answer position the head thus says what it says there on average,
  whatever the image: its image-specific contribution is removed while its
  output stays in distribution. (A mean over all positions, one vector per
  head, would put an image-token-like vector at the answer position, since
  nearly all positions are image tokens: an off-distribution input rather
  than information removed.)

It goes through the capture engine's attention function (``HeadAblation`` is an
``AttentionHook`` whose ``edit_output`` replaces the chosen slices), so the model
code is never copied; with no head chosen the forward is the plain model's. Each
batch runs once up to the lowest ablated layer; the layers above run again for
several head sets per forward (``measure``, ``prefix.py``); several groups of
head sets (--heads specs) on the same pairs share that one forward
(``measure_groups``).

Measured for every pair, image kind (full: subject in the corner, should be
"yes"; control: subject removed, should be "no") and head set, at the answer
position: log-odds = logsumexp(logits of the yes tokens) - logsumexp(no tokens),
the yes tokens being every vocabulary entry that decodes to "yes" in any case,
with or without a leading space (likewise "no"); the answer is "yes" when the
log-odds are > 0. Metrics per pair: log_odds_full, log_odds_control, gap
(full minus control), accuracy_full, accuracy_control, accuracy (both kinds);
a metric's effect is its mean over the pairs of ablated minus unablated.

For each metric, the chosen heads' mean effect is placed in the distribution of
the random sets' mean effects (``ablation_heads.py``): p_drop = (1 + #{random <= chosen}) / (1 + R),
p_rise = (1 + #{random >= chosen}) / (1 + R), two-sided = min(1, 2 min(p_drop,
p_rise)). The primary test is p_drop of the log-odds on full images: do the
chosen heads lower the model's "yes" when the subject is there more than heads
picked at random from the same layers?
"""
from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from tqdm import tqdm

from spatial_attention.common.errors import DataError, OptionError
from spatial_attention.data.counterfactual import Pair
from spatial_attention.data.shapeworld import load_rgb
from spatial_attention.engine.capture import AttentionHook, active, last_position_logits
from spatial_attention.engine.prefix import answer_logits, run_prefix, upper_logits
from spatial_attention.experiments.ablation_heads import Head, head_name
from spatial_attention.run.cost import Forwards, batched, chunks
from spatial_attention.run.figures import save_figure
from spatial_attention.stats.inference import bootstrap_ci

KINDS = ("full", "control")


METRICS = ("log_odds_full", "log_odds_control", "gap", "accuracy_full", "accuracy_control", "accuracy")


PRIMARY = "log_odds_full"


class HeadAblation(AttentionHook):
    """Replace chosen heads' outputs (before o_proj) with zeros, or with the per-position means
    ``means[layer][:, head]`` (see ``HeadMeans``): at every position, or with ``answer_only`` at each sample's
    answer position (``for_batch`` says where that is).

    Several head sets at once: the batch holds its inputs once per set, set after set (samples a, b, a, b, ...),
    and the rows of set s get set s's heads replaced (a per-row head mask)."""

    def __init__(self, adapter, head_sets: list[list[Head]], means: dict[int, torch.Tensor] | None = None,
                 answer_only: bool = False):
        self.sets = len(head_sets)
        self.answer_only = answer_only
        self.last: torch.Tensor | None = None  # (inputs,) answer positions of one copy of the batch (answer_only)
        modules = adapter.lm_attention_modules()
        # module id -> ((sets, heads) bool: which heads each set replaces, (T, heads, head_dim) means or None)
        self.edits = {}
        for layer in sorted({layer for heads in head_sets for layer, _ in heads}):
            device = next(modules[layer].parameters()).device  # its own GPU under --device-map
            chosen = torch.zeros(self.sets, adapter.num_heads, dtype=torch.bool)
            for s, heads in enumerate(head_sets):
                chosen[s, [h for l, h in heads if l == layer]] = True
            self.edits[id(modules[layer])] = (chosen.to(device), None if means is None else means[layer].to(device))

    def for_batch(self, batch) -> HeadAblation:
        """This hook, set to edit ``batch``'s answer positions (with answer_only); ``batch``: one copy of the
        inputs."""
        self.last = torch.tensor([layout.last_position for layout in batch.layouts])
        return self

    def edit_output(self, module, output):
        if id(module) not in self.edits:
            return output
        chosen, fill = self.edits[id(module)]
        rows = output.shape[0]
        if rows % self.sets:
            raise RuntimeError(f"HeadAblation of {self.sets} head sets on a batch of {rows} rows")
        where = chosen.repeat_interleave(rows // self.sets, 0)[:, None, :, None]  # (rows, 1, heads, 1)
        if self.answer_only:
            if self.last is None or rows != self.sets * len(self.last):
                raise RuntimeError("HeadAblation(answer_only=True) needs for_batch(batch) before each forward")
            last = self.last.repeat(self.sets).to(output.device)
            if output.shape[1] == 1:  # answer_logits's call: the answer position alone
                fill = None if fill is None else fill[last.to(fill.device)][:, None]  # (rows, 1, heads, head_dim)
            else:
                at_answer = torch.zeros(rows, output.shape[1], dtype=torch.bool, device=output.device)
                at_answer[torch.arange(rows, device=output.device), last] = True
                where = where & at_answer[:, :, None, None]
        return torch.where(where, output.new_zeros(()) if fill is None else fill.to(output.dtype), output)


class HeadMeans(AttentionHook):
    """Edits nothing; sums every head's output of the given layers over the inputs, position by position.

    The inputs must all have the same length (checked per batch), so that a position means the same token in
    each and no batch is padded.
    """

    def __init__(self, adapter, layers: list[int]):
        self.adapter = adapter
        self.layer_of = {id(m): i for i, m in enumerate(adapter.lm_attention_modules()) if i in layers}
        self.sums: dict[int, torch.Tensor] = {}
        self.inputs = 0
        self.length = None

    def record(self, batch) -> torch.Tensor:
        """Last-position logits of the unedited forward of ``batch``; its head outputs join the sums."""
        lengths = {layout.length for layout in batch.layouts}
        if self.length is not None:
            lengths.add(self.length)
        if len(lengths) > 1:
            raise DataError(f"--mode mean: inputs of {min(lengths)} and {max(lengths)} tokens; a per-position mean "
                            "needs every input to have the same length (one prompt, one image size); use --mode zero")
        self.length = lengths.pop()
        self.inputs += len(batch)
        return hooked_logits(self.adapter, batch, self)

    def edit_output(self, module, output):
        layer = self.layer_of.get(id(module))
        if layer is not None:
            total = output.float().sum(0)  # (T, heads, head_dim)
            self.sums[layer] = total if layer not in self.sums else self.sums[layer] + total
        return output

    def means(self) -> dict[int, torch.Tensor]:
        """layer -> (T, heads, head_dim) mean output vectors per position, fp32."""
        return {layer: total / self.inputs for layer, total in self.sums.items()}


@torch.inference_mode()
def hooked_logits(adapter, batch, hook: AttentionHook) -> torch.Tensor:
    """Last-position logits (B, V) of one forward with ``hook`` active."""
    with active(hook):
        return last_position_logits(adapter, batch)


def yes_no_ids(tokenizer) -> tuple[list[int], list[int]]:
    """Ids of the single tokens that decode to "yes" / "no" (any case, with or without a leading space)."""
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))], skip_special_tokens=True)
    words = [t.strip().lower() for t in texts]
    yes = [i for i, w in enumerate(words) if w == "yes"]
    no = [i for i, w in enumerate(words) if w == "no"]
    if not yes or not no:
        raise OptionError("the model's tokenizer has no single token for "
                          f"{'yes' if not yes else 'no'}; the yes/no log-odds cannot be read off the logits")
    return yes, no


def log_odds(logits: torch.Tensor, yes: list[int], no: list[int]) -> np.ndarray:
    """(B,) logsumexp over the yes tokens minus logsumexp over the no tokens."""
    logits = logits.double()
    return (torch.logsumexp(logits[:, yes], -1) - torch.logsumexp(logits[:, no], -1)).numpy()


def head_means(adapter, pairs: list[Pair], prompt: str, layers: list[int], batch_size: int) -> dict[int, torch.Tensor]:
    """``--mode mean``'s first pass: every head's per-position mean output in ``layers`` over every image of
    ``pairs`` (full and control), in the unablated model; ``batch_size`` counts pairs."""
    recorder = HeadMeans(adapter, layers)
    for start in tqdm(range(0, len(pairs), batch_size), desc="head means", unit="batch"):
        recorder.record(encode_pairs(adapter, pairs[start:start + batch_size], prompt))
    return recorder.means()


def measure(adapter, batch, head_sets: list[list[Head]], answer_ids: tuple[list[int], list[int]],
            means: dict[int, torch.Tensor] | None = None, answer_only: bool = False, sets_per_forward: int = 8
            ) -> tuple[np.ndarray, np.ndarray]:
    """Log-odds [N, 2] (kinds full, control) of the unablated model and [S, N, 2] with each head set ablated, for
    one batch of N pairs encoded as 2N inputs: full, control, full, ... (``encode_pairs``; any pair whose first
    input should be answered yes and its second no).

    One plain forward runs the batch up to the lowest layer any set ablates (``prefix.run_prefix``); only the
    layers from there up run again, ``sets_per_forward`` copies of the batch per forward with a per-copy head set
    (``HeadAblation``), and with ``answer_only`` only at the answer positions (``prefix.answer_logits``). Every
    forward has that many copies (the last is filled with unablated ones), and the unablated log-odds are those of
    an unablated copy in the first: on a GPU, kernels round differently at another batch size, which would
    otherwise be part of every effect."""
    return measure_groups(adapter, batch, [head_sets], answer_ids, means, answer_only, sets_per_forward)[0]


def measure_groups(adapter, batch, groups: list[list[list[Head]]], answer_ids: tuple[list[int], list[int]],
                   means: dict[int, torch.Tensor] | None = None, answer_only: bool = False, sets_per_forward: int = 8
                   ) -> list[tuple[np.ndarray, np.ndarray]]:
    """``measure`` of each group of head sets (the ablations of several --heads specs on the same pairs), the same
    numbers, from one whole forward of the batch: it keeps the input of each group's lowest ablated layer, and
    each group reruns from its own, as it would alone."""
    if sets_per_forward < 2:
        raise ValueError("measure: sets_per_forward must be >= 2 (one unablated copy and one head set)")
    firsts = [min(layer for heads in head_sets for layer, _ in heads) for head_sets in groups]
    starts = run_prefix(adapter, batch, sorted(set(firsts)), keys_values=answer_only)[0]
    return [_ablated_log_odds(adapter, batch, starts[first], head_sets, answer_ids, means, answer_only,
                              sets_per_forward) for first, head_sets in zip(firsts, groups)]


def _ablated_log_odds(adapter, batch, start, head_sets: list[list[Head]], answer_ids, means, answer_only: bool,
                      sets_per_forward: int) -> tuple[np.ndarray, np.ndarray]:
    """``measure``'s reruns from ``start`` (the prefix of the head sets' lowest layer)."""
    pairs = len(batch) // 2
    rerun = answer_logits if answer_only else upper_logits  # an answer-position edit: that position alone reruns
    per_forward = sets_per_forward - 1
    base, ablated = None, []
    for i in range(0, len(head_sets), per_forward):
        sets = head_sets[i:i + per_forward]
        copies = [[]] + sets + [[]] * (per_forward - len(sets))  # copy 0: unablated
        hook = HeadAblation(adapter, copies, means, answer_only).for_batch(batch)
        lo = log_odds(rerun(adapter, start, len(copies), hook), *answer_ids).reshape(len(copies), -1)
        base = lo[0] if base is None else base
        ablated.append(lo[1:1 + len(sets)])
    return base.reshape(pairs, 2), np.concatenate(ablated).reshape(len(head_sets), pairs, 2)


def planned_forwards(pairs: int, batch: int, sets: int, num_layers: int, first_layer: float,
                     sets_per_forward: int = 8, answer_only: bool = False) -> list[Forwards]:
    """The reruns of ``measure`` over ``pairs`` pairs, ``batch`` at a time, with ``sets`` head sets whose lowest
    ablated layer is ``first_layer``: ``sets_per_forward`` copies of each batch per forward from that layer up
    (with ``answer_only``, of its answer positions). The whole forwards, one per batch (and with --mode mean
    ``head_means``' pass), are shared by every group of head sets on those pairs: ``whole_forwards``."""
    rows = 2 * batched(pairs, batch)
    reruns = chunks(sets, sets_per_forward - 1) * sets_per_forward
    return [Forwards(reruns * 2 * pairs, sets_per_forward * rows, num_layers - first_layer, full=False,
                     answer_only=answer_only)]


def whole_forwards(pairs: int, batch: int, num_layers: int, means: bool = False) -> list[Forwards]:
    """The whole forwards of ``measure_groups`` over ``pairs`` pairs, ``batch`` at a time: one per batch, with
    ``means`` first ``head_means``' pass."""
    return [Forwards(2 * pairs, 2 * batched(pairs, batch), num_layers)] * (2 if means else 1)


def encode_pairs(adapter, pairs: list[Pair], prompt: str):
    """The pairs' images (full, control, full, ...) with ``prompt``, as one batch."""
    images = [load_rgb(image) for pair in pairs for image in (pair.full_image, pair.control_image)]
    return adapter.encode([prompt] * len(images), images)


def pair_metrics(lo: np.ndarray) -> dict[str, np.ndarray]:
    """Every metric per pair from log-odds [..., N, 2]; correct = says yes on full, no on control."""
    correct = np.stack([lo[..., 0] > 0, lo[..., 1] <= 0], axis=-1).astype(np.float64)
    return {"log_odds_full": lo[..., 0], "log_odds_control": lo[..., 1], "gap": lo[..., 0] - lo[..., 1],
            "accuracy_full": correct[..., 0], "accuracy_control": correct[..., 1], "accuracy": correct.mean(-1)}


def summarize(base: np.ndarray, ablated: np.ndarray, seed: int) -> dict:
    """Per metric: unablated and ablated means, the chosen heads' mean effect (set 0) with a 95% bootstrap
    interval, the random sets' mean effects (sets 1..R) and the permutation p-values."""
    before, after = pair_metrics(base), pair_metrics(ablated)
    n_random = ablated.shape[0] - 1
    out = {}
    for name in METRICS:
        delta = after[name] - before[name]  # [S, N]
        effect, random_effects = float(delta[0].mean()), delta[1:].mean(-1)
        ci_lo, ci_hi = bootstrap_ci(delta[0], seed=seed)
        p_drop = (1 + int((random_effects <= effect).sum())) / (1 + n_random)
        p_rise = (1 + int((random_effects >= effect).sum())) / (1 + n_random)
        out[name] = {"unablated": float(before[name].mean()), "ablated": float(after[name][0].mean()),
                     "effect": effect, "ci_lo": ci_lo, "ci_hi": ci_hi,
                     "random_effects": random_effects.tolist(), "random_mean": float(random_effects.mean()),
                     "random_std": float(random_effects.std(ddof=1)) if n_random > 1 else None,
                     "p_drop": p_drop, "p_rise": p_rise, "p_two_sided": min(1.0, 2 * min(p_drop, p_rise))}
    return out


def ablation_csv(pairs: list[Pair], head_sets: list[list[Head]], base: np.ndarray, ablated: np.ndarray) -> str:
    """One row per (head set, pair, image kind)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["head_set", "heads", "pair_id", "kind", "log_odds", "unablated_log_odds", "delta_log_odds",
                     "says_yes", "unablated_says_yes", "correct", "unablated_correct", "delta_correct"])
    for s, heads in enumerate(head_sets):
        name, heads_text = ("chosen" if s == 0 else f"random_{s - 1}"), " ".join(map(head_name, heads))
        for i, pair in enumerate(pairs):
            for k, kind in enumerate(KINDS):
                now, then = float(ablated[s, i, k]), float(base[i, k])
                right_now, right_then = int((now > 0) == (k == 0)), int((then > 0) == (k == 0))
                writer.writerow([name, heads_text, pair.id, kind, now, then, now - then, int(now > 0),
                                 int(then > 0), right_now, right_then, right_now - right_then])
    return buffer.getvalue()


def plot_effects(path: Path, metrics: dict, title: str) -> None:
    """Per metric: a histogram of the random sets' mean effects, the chosen heads' effect marked."""
    fig = Figure(figsize=(12, 6.5))
    for ax, name in zip(fig.subplots(2, 3).ravel(), METRICS):
        m = metrics[name]
        ax.hist(m["random_effects"], bins=max(5, len(m["random_effects"]) // 2), color="0.65",
                label=f"{len(m['random_effects'])} random sets")
        ax.axvline(m["effect"], color="tab:red", linewidth=2, label="chosen heads")
        if m["ci_lo"] is not None:
            ax.axvspan(m["ci_lo"], m["ci_hi"], color="tab:red", alpha=0.15, label="chosen: 95% CI over pairs")
        ax.axvline(0.0, color="black", linewidth=0.8, linestyle=":")
        ax.set_title(f"{name}\np_drop {m['p_drop']:.3g}, p_rise {m['p_rise']:.3g}", fontsize=9)
        ax.set_xlabel("mean change (ablated - unablated)", fontsize=8)
        ax.set_ylabel("random sets", fontsize=8)
        ax.locator_params(axis="x", nbins=5)
        ax.tick_params(labelsize=7)
    fig.axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)
