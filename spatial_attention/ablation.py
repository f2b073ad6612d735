"""Experiment 3, step 3: ablate the heads the corner analysis found and measure
what happens to the model's yes/no answer.

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
several head sets per forward (``measure``, ``prefix.py``).

Measured for every pair, image kind (full: subject in the corner, should be
"yes"; control: subject removed, should be "no") and head set, at the answer
position: log-odds = logsumexp(logits of the yes tokens) - logsumexp(no tokens),
the yes tokens being every vocabulary entry that decodes to "yes" in any case,
with or without a leading space (likewise "no"); the answer is "yes" when the
log-odds are > 0. Metrics per pair: log_odds_full, log_odds_control, gap
(full minus control), accuracy_full, accuracy_control, accuracy (both kinds);
a metric's effect is its mean over the pairs of ablated minus unablated.

Controls: ``--random-controls`` sets of as many heads, drawn (seeded) from the
same layers, per layer as many as were chosen there, from all of the layer's
heads (the chosen set is one possible draw, as a valid null needs); where no
more other sets exist than R, each is used once instead (an exact test).
For each metric, the chosen heads' mean effect is placed in the distribution of
the random sets' mean effects: p_drop = (1 + #{random <= chosen}) / (1 + R),
p_rise = (1 + #{random >= chosen}) / (1 + R), two-sided = min(1, 2 min(p_drop,
p_rise)). The primary test is p_drop of the log-odds on full images: do the
chosen heads lower the model's "yes" when the subject is there more than heads
picked at random from the same layers?
"""
from __future__ import annotations

import argparse
import csv
import io
import itertools
import json
import logging
import math
import re
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from tqdm import tqdm

from spatial_attention import controls
from spatial_attention.capture import AttentionHook, active, last_position_logits
from spatial_attention.cli import HelpFormatter, add_model_args, user_errors_exit
from spatial_attention.corner_results import CornerRun, load_corner_run
from spatial_attention.counterfactual import CORNER_PROMPT, CornerDataset, Pair, fill_corner_prompt, read_dataset
from spatial_attention.errors import DataError, OptionError
from spatial_attention.figures import save_figure
from spatial_attention.heads import top_cells
from spatial_attention.options import INIT_SEED_KEY, ModelOptions, check_at_least, checkpoint_name
from spatial_attention.prefix import run_prefix, upper_logits
from spatial_attention.runio import (check_output_dir, finish_run, lacks_keys, setup_logging, start_run, write_atomic,
                                     write_json)
from spatial_attention.runloop import (Results, Run, check_identity, join_processes, load_run, open_results,
                                       recorded_identity, resumable_map)
from spatial_attention.shapeworld import load_rgb
from spatial_attention.stats import bootstrap_ci

log = logging.getLogger("spatial_attention")

Head = tuple[int, int]  # (layer, head), both 0-based
KINDS = ("full", "control")
METRICS = ("log_odds_full", "log_odds_control", "gap", "accuracy_full", "accuracy_control", "accuracy")
PRIMARY = "log_odds_full"
POSITIONS = ("all", "answer")  # --positions
FIGURE = "figures/effect_vs_random.png"
PAIRS_FILE = "ablation_pairs.jsonl"  # per pair, as it finishes: its log-odds unablated and with each head set ablated
HEADS_HELP = ("shared: the analysis's shared head at its peak layer; unique: the stats dir corner's unique head "
              "at its peak layer; top:K: the K (layer, head) cells of largest |mean(full - control)| score in the "
              "stats dir; or LAYER.HEAD,... with layers 1-based and heads 0-based (e.g. 12.5,14.0)")


# --- which heads ------------------------------------------------------------------

def parse_heads(spec: str, run: CornerRun, analysis_dir: Path) -> list[Head]:
    """The heads ``--heads spec`` names (see HEADS_HELP), 0-based and sorted."""
    if spec in ("shared", "unique"):
        return [_analysis_head(spec, run.corner, Path(analysis_dir))]
    if spec.startswith("top:"):
        return _top_heads(spec, run)
    return _explicit_heads(spec)


def _analysis_head(spec: str, corner: str, analysis_dir: Path) -> Head:
    path = analysis_dir / "summary.json"
    if not path.is_file():
        raise DataError(f"{path}: missing; --heads {spec} reads the summary of analyze_corner_heads.py "
                        "(give its out-dir with --analysis-dir)")
    try:
        summary = json.loads(path.read_text())
        if spec == "shared":
            head, layer = summary["shared_head"], summary["shared_head_layer"]
        else:
            head, layer = summary["unique_heads"][corner], summary["unique_head_layers"][corner]
        return int(layer) - 1, int(head)
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: not readable JSON ({err})") from None
    except (KeyError, TypeError) as err:
        raise DataError(f"{path}: no {spec} head for corner {corner!r} (missing {err})") from None


def _top_heads(spec: str, run: CornerRun) -> list[Head]:
    k = spec[len("top:"):]
    cells = run.full.shape[0] * run.full.shape[1]
    if not k.isdigit() or not 1 <= int(k) <= cells:
        raise OptionError(f"--heads {spec!r}: top:K needs a whole number K from 1 to the stats dir's "
                          f"{cells} (layer, head) cells, e.g. top:3")
    mean_diff = (run.full.astype(np.float64) - run.control).mean(-1)
    return sorted((run.layers[li] - 1, h) for li, h, _ in top_cells(mean_diff, int(k), by_abs=True))


def _explicit_heads(spec: str) -> list[Head]:
    heads = []
    for item in spec.split(","):
        match = re.fullmatch(r"\s*(\d+)\.(\d+)\s*", item)
        if not match:
            raise OptionError(f"--heads {spec!r}: {item.strip()!r} is not shared, unique, top:K or "
                              "LAYER.HEAD (layer 1-based, head 0-based, e.g. 12.5)")
        if int(match[1]) < 1:
            raise OptionError(f"--heads {spec!r}: {item.strip()!r}: layers are numbered from 1")
        heads.append((int(match[1]) - 1, int(match[2])))
    if len(set(heads)) < len(heads):
        raise OptionError(f"--heads {spec!r}: a head is listed twice")
    return sorted(heads)


def check_heads(heads: list[Head], spec: str, num_layers: int | None, num_heads: int) -> None:
    """OptionError when a head lies outside the model (``num_layers`` None: its depth is unknown, so only
    the head numbers are checked)."""
    for layer, head in heads:
        if not ((num_layers is None or layer < num_layers) and 0 <= head < num_heads):
            shape = "" if num_layers is None else f"layers 1..{num_layers} and "
            raise OptionError(f"--heads {spec!r}: head {head_name((layer, head))} is outside the model's "
                              f"{shape}heads 0..{num_heads - 1}")


def check_heads_in_stats_model(heads: list[Head], spec: str, run: CornerRun) -> None:
    """``check_heads`` before the model loads, against the model that scored the stats dir (check_stats_model
    makes sure it is the one to be loaded): its heads per layer from meta.json, its depth from run.json, where
    head_attention_stats.py records the model (meta.json's layers are only the scored ones)."""
    try:
        depth = int(json.loads((run.folder / "run.json").read_text())["model"]["num_layers"])
    except (OSError, ValueError, KeyError, TypeError):
        depth = None  # the layers are checked once the model is loaded
    check_heads(heads, spec, depth, int(run.meta["H"]))


def head_name(head: Head) -> str:
    """'LAYER.HEAD', layer 1-based, head 0-based (as the reports write heads)."""
    return f"{head[0] + 1}.{head[1]}"


def heads_json(heads: list[Head]) -> list[dict]:
    return [{"layer": layer + 1, "head": head} for layer, head in heads]


def random_head_sets(chosen: list[Head], num_heads: int, count: int, seed: int) -> list[list[Head]]:
    """The null sets: per layer of ``chosen``, as many heads drawn from all of that layer's heads, so that the
    chosen set is one possible draw (the p-value is then valid; drawing only from the other heads made it too
    small). ``count`` seeded random draws; or, where no more than ``count`` other sets exist, every set but
    the chosen one once: an exact test, p = (1 + sets at least as harmful) / (all sets)."""
    per_layer = Counter(layer for layer, _ in chosen)
    total = math.prod(math.comb(num_heads, k) for k in per_layer.values())
    if total - 1 <= count:
        log.warning("only %d other head sets exist in these layers: each is used once instead of %d random "
                    "draws (an exact test; the smallest possible p is 1/%d)", total - 1, count, total)
        per_layer_sets = [[[(layer, h) for h in heads] for heads in itertools.combinations(range(num_heads), k)]
                          for layer, k in sorted(per_layer.items())]
        every = [sorted(head for part in combination for head in part)
                 for combination in itertools.product(*per_layer_sets)]
        return [heads for heads in every if heads != sorted(chosen)]
    rng = np.random.default_rng(seed)
    return [sorted((layer, int(h)) for layer, k in per_layer.items()
                   for h in rng.choice(num_heads, k, replace=False)) for _ in range(count)]


# --- the hooks --------------------------------------------------------------------

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
            at_answer = torch.zeros(rows, output.shape[1], dtype=torch.bool, device=output.device)
            at_answer[torch.arange(rows, device=output.device), self.last.repeat(self.sets).to(output.device)] = True
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


# --- the answer -------------------------------------------------------------------

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


# --- the experiment ---------------------------------------------------------------

def head_means(adapter, pairs: list[Pair], prompt: str, layers: list[int], batch_size: int) -> dict[int, torch.Tensor]:
    """``--mode mean``'s first pass: every head's per-position mean output in ``layers`` over every image of
    ``pairs`` (full and control), in the unablated model; ``batch_size`` counts pairs."""
    recorder = HeadMeans(adapter, layers)
    for start in tqdm(range(0, len(pairs), batch_size), desc="head means", unit="batch"):
        recorder.record(_encode(adapter, pairs[start:start + batch_size], prompt))
    return recorder.means()


def measure(adapter, pairs: list[Pair], prompt: str, head_sets: list[list[Head]],
            answer_ids: tuple[list[int], list[int]], means: dict[int, torch.Tensor] | None = None,
            answer_only: bool = False, sets_per_forward: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Log-odds [N, 2] (kinds full, control) of the unablated model and [S, N, 2] with each head set ablated, for
    one batch of pairs.

    One plain forward runs the batch up to the lowest layer any set ablates (``prefix.run_prefix``); only the
    layers from there up run again, ``sets_per_forward`` copies of the batch per forward with a per-copy head set
    (``HeadAblation``). Every forward has that many copies (the last is filled with unablated ones), and the
    unablated log-odds are those of an unablated copy in the first: on a GPU, kernels round differently at
    another batch size, which would otherwise be part of every effect."""
    if sets_per_forward < 2:
        raise ValueError("measure: sets_per_forward must be >= 2 (one unablated copy and one head set)")
    batch = _encode(adapter, pairs, prompt)
    first = min(layer for heads in head_sets for layer, _ in heads)
    start = run_prefix(adapter, batch, [first])[0][first]
    per_forward = sets_per_forward - 1
    base, ablated = None, []
    for i in range(0, len(head_sets), per_forward):
        sets = head_sets[i:i + per_forward]
        copies = [[]] + sets + [[]] * (per_forward - len(sets))  # copy 0: unablated
        hook = HeadAblation(adapter, copies, means, answer_only).for_batch(batch)
        lo = log_odds(upper_logits(adapter, start, len(copies), hook), *answer_ids).reshape(len(copies), -1)
        base = lo[0] if base is None else base
        ablated.append(lo[1:1 + len(sets)])
    return base.reshape(len(pairs), 2), np.concatenate(ablated).reshape(len(head_sets), len(pairs), 2)


def _encode(adapter, pairs: list[Pair], prompt: str):
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


# --- the command line ---------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="head_ablation.py", formatter_class=HelpFormatter, description=__doc__ +
        "\nWrites ablation_pairs.jsonl (per pair, as it finishes: the resume log), identity.json, ablation.csv, "
        "summary.json, figures/effect_vs_random.png and run.json into the out-dir.")
    add_model_args(parser, None, feed_size="the stats dir's, else the family's")
    controls.add_control_args(parser)
    parser.add_argument("--dataset", type=Path, nargs="+", required=True,
                        help="the corner data set folder(s) data/dataset_{corner}; several: each is ablated with its "
                             "--stats-dir, one model load for all")
    parser.add_argument("--stats-dir", type=Path, nargs="+", required=True,
                        help="the out-dir of head_attention_stats.py for each --dataset's corner "
                             "(head_diff_stats_{corner}), in the same order")
    parser.add_argument("--analysis-dir", type=Path, default=None,
                        help="the out-dir of analyze_corner_heads.py (for --heads shared / unique; default: "
                             "count_shared_unique beside the stats dir)")
    parser.add_argument("--prompt", default=None,
                        help="question asked with every image; '{corner}' becomes 'top left' etc. (default: the "
                             "stats dir's prompt)")
    parser.add_argument("--heads", nargs="+", default=["unique"],
                        help=HEADS_HELP + "; several values: each is ablated on every --dataset")
    parser.add_argument("--mode", choices=["zero", "mean"], default="zero",
                        help="replace an ablated head's output with zeros, or at each position with its mean "
                             "output at that position over the data set's images")
    parser.add_argument("--positions", choices=POSITIONS, default="all",
                        help="ablate the heads at every position (the paper's), or only at the answer position "
                             "(where head_attention_stats.py --score patching measures them)")
    parser.add_argument("--random-controls", type=int, default=20,
                        help="random head sets from the same layers, the null distribution of the effect")
    parser.add_argument("--max-pairs", type=int, default=None, help="use at most this many pairs")
    parser.add_argument("--sets-per-forward", type=int, default=8,
                        help="copies of each batch in one forward pass of the layers from the lowest ablated one "
                             "up: an unablated copy and this minus one head sets (the chosen one and the random "
                             "controls); at least 2; lower it if memory runs out")
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="output folder of one ablation (one --dataset, one --heads; default: "
                             "ablation_{corner}_{heads} in --out-parent); one that holds an ablation made with other "
                             "settings is refused, an unfinished one with the same settings resumes, a finished one "
                             "is left as it is")
    parser.add_argument("--out-parent", type=Path, default=Path("."),
                        help="where each ablation's folder ablation_{corner}_{heads} goes, without --out-dir")
    return parser


@user_errors_exit
def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    # Everything that can be judged without the model is, before it loads: a mistake costs seconds.
    if args.layers:
        raise OptionError("--layers does not apply here: --heads names the layers")
    options = ModelOptions.from_args(args.model, args)
    check_at_least(1, random_controls=args.random_controls, max_pairs=args.max_pairs)
    check_at_least(2, sets_per_forward=args.sets_per_forward)
    if len(args.stats_dir) != len(args.dataset):
        raise OptionError(f"--stats-dir: {len(args.stats_dir)} given for {len(args.dataset)} --dataset; give each "
                          "data set's stats dir, in the same order")
    datasets = [read_dataset(path, args.max_pairs) for path in args.dataset]
    for dataset in datasets:
        check_images(dataset.pairs)
    jobs = [Job(dataset, stats_dir, args.analysis_dir, heads, args.out_dir or args.out_parent / default_out(
                dataset.corner, heads)) for dataset, stats_dir in zip(datasets, args.stats_dir) for heads in args.heads]
    if args.out_dir and len(jobs) > 1:
        raise OptionError(f"--out-dir {args.out_dir}: names one ablation's folder, but {len(datasets)} --dataset x "
                          f"{len(args.heads)} --heads make {len(jobs)}; give --out-parent instead")
    folders = Counter(job.out.resolve() for job in jobs)
    if max(folders.values()) > 1:
        twice = next(folder for folder, n in folders.items() if n > 1)
        raise OptionError(f"--dataset / --heads: two ablations would write {twice} (a corner's data set given twice, "
                          "or a --heads value repeated); give each once")
    seeds = controls.init_seeds(args)
    models = [(options, jobs)] if seeds is None else [  # each initialisation ablates the heads its own analysis found
        (replace(options, random_init_seed=seed), [job.for_control(seed) for job in jobs]) for seed in seeds]
    is_main = [_ablate(args, model_options, model_jobs) for model_options, model_jobs in models][-1]
    if is_main:
        for job in jobs:
            controls.write_comparison(job.out, ITEM_METRICS, seed=options.seed)


def default_out(corner: str, heads: str) -> str:
    """An ablation's folder name: ablation_{corner}_{heads}, every character of heads other than a letter or a
    digit a '-' (top:4 -> top-4), as run_corner_experiments.sh names it."""
    return f"ablation_{corner}_{re.sub(r'[^0-9A-Za-z]', '-', heads)}"


@dataclass(frozen=True)
class Job:
    """One ablation: the heads ``heads`` names, on one corner's data set, into ``out``."""

    dataset: CornerDataset
    stats_dir: Path
    analysis_dir: Path | None
    heads: str
    out: Path

    def for_control(self, seed: int) -> Job:
        """The same ablation on initialisation ``seed`` of the random-weights control: its own stats and
        analysis, into its seed folder."""
        analysis = (controls.counterpart(self.analysis_dir, seed, "--analysis-dir")
                    if self.analysis_dir and self.heads in ("shared", "unique") else None)
        return replace(self, stats_dir=controls.counterpart(self.stats_dir, seed, "--stats-dir"),
                       analysis_dir=analysis, out=controls.seed_folder(self.out, seed))


def _ablate(args, options: ModelOptions, jobs: list[Job]) -> bool:
    """The ablations ``jobs`` with one model (the checkpoint, or one initialisation of the control), loaded once
    for all of them; returns whether this is the main process."""
    options, share = join_processes(options)
    ready = [prepared for job in jobs if (prepared := _prepare(args, options, share, job)) is not None]
    if not ready:
        return share.is_main
    first = ready[0]
    run = load_run(replace(options, feed_size=first.feed_size), share, vars(args), out=first.out,
                   data=first.job.dataset.folder)
    loaded_feed = run.adapter.feed_size  # what a job whose stats dir records none gets, as when run alone
    for prepared in ready:
        _ablate_one(args, run, prepared, loaded_feed)
    return share.is_main


@dataclass(frozen=True)
class Prepared:
    """An ablation checked and its results folder opened, before the model loads."""

    job: Job
    stats: CornerRun
    chosen: list[Head]
    prompt: str
    out: Path
    feed_size: int | None
    head_sets: list[list[Head]]
    settings: dict
    results: Results


def _prepare(args, options: ModelOptions, share, job: Job) -> Prepared | None:
    """``job`` checked against its stats dir and its out-dir opened; None where it is already finished."""
    stats = load_corner_run(job.stats_dir)
    check_stats_model(stats, options)
    chosen = parse_heads(job.heads, stats, job.analysis_dir or job.stats_dir.parent / "count_shared_unique")
    check_heads_in_stats_model(chosen, job.heads, stats)
    pairs, corner = job.dataset.pairs, job.dataset.corner
    if corner != stats.corner:
        log.warning("--dataset holds %s pairs but --stats-dir was scored on %s", corner, stats.corner)
    prompt = ablation_prompt(args.prompt, stats, corner)
    out = check_output_dir(job.out, "--out-dir")
    feed_size = options.feed_size or stats_feed_size(stats)
    head_sets = [chosen] + random_head_sets(chosen, int(stats.meta["H"]), args.random_controls, options.seed)
    # the pairs used too: the summary covers them, and in mean mode the means are taken over them
    settings = {**job.dataset.identity, "--max-pairs (pairs used)": len(pairs), "--prompt": prompt,
                "--heads": list(map(head_name, chosen)), "--mode": args.mode,
                **({} if args.positions == "all" else {"--positions": args.positions}),  # older folders: all
                "--random-controls": args.random_controls,
                "--random-controls (head sets)": [list(map(head_name, heads)) for heads in head_sets[1:]],
                "--seed": options.seed}
    results = Results(out / PAIRS_FILE, item_key=lambda pair: pair.id, record_key=lambda record: record["id"],
                      check=lacks_keys("id", "log_odds", "ablated_log_odds"), option="--out-dir")
    job_options = replace(options, feed_size=feed_size)
    share.main_checks(lambda: open_results(results, {**job_options.identity(), **settings}))
    if finished(out, results, pairs):
        log.info("%s already holds this ablation, finished with the same settings; delete it to redo it", out)
        return None
    return Prepared(job, stats, chosen, prompt, out, feed_size, head_sets, settings, results)


def _ablate_one(args, run: Run, prepared: Prepared, loaded_feed: tuple[int, int] | None) -> None:
    """One prepared ablation with the loaded model of ``run`` (``loaded_feed``: its feed size as loaded)."""
    job, stats, chosen, head_sets, prompt = prepared.job, prepared.stats, prepared.chosen, prepared.head_sets, \
        prepared.prompt
    pairs, corner, out, share = job.dataset.pairs, job.dataset.corner, prepared.out, run.share
    adapter = run.adapter
    if prepared.feed_size or loaded_feed:
        adapter.set_feed_size(prepared.feed_size or loaded_feed)
    settings = {**run.settings, "dataset": str(job.dataset.folder), "stats_dir": str(job.stats_dir),
                "analysis_dir": job.analysis_dir and str(job.analysis_dir), "heads": job.heads, "out_dir": str(out)}
    run = replace(run, options=replace(run.options, feed_size=prepared.feed_size), out=out, data=job.dataset.folder,
                  settings=settings)  # run.json: this ablation's own inputs
    if stats.full.shape[1] != adapter.num_heads:
        raise DataError(f"{job.stats_dir}: scored {stats.full.shape[1]} heads per layer, the model has "
                        f"{adapter.num_heads}; the stats dir comes from another model")
    check_heads(chosen, job.heads, adapter.num_layers, adapter.num_heads)
    log.info("%s: ablating %s (%s, mode %s, %s positions) on %d pairs, %d random controls", corner,
             " ".join(map(head_name, chosen)), job.heads, args.mode, args.positions, len(pairs), args.random_controls)

    identity = {**run.identity(), **prepared.settings}
    share.main_checks(lambda: check_identity(prepared.results.path, identity, "--out-dir"))  # before run.json changes
    record = run.record(dataset=str(job.dataset.folder))
    if share.is_main:
        start_run(out / "run.json", record)
    answer_ids = yes_no_ids(adapter.tokenizer)
    layers = sorted({layer for heads in head_sets for layer, _ in heads})
    means = head_means(adapter, pairs, prompt, layers, run.batch_size) if args.mode == "mean" else None

    def ablate(chunk: list[Pair]) -> list[dict]:
        base, ablated = measure(adapter, chunk, prompt, head_sets, answer_ids, means,
                                answer_only=args.positions == "answer", sets_per_forward=args.sets_per_forward)
        return [{"id": pair.id, "log_odds": base[i].tolist(), "ablated_log_odds": ablated[:, i].tolist()}
                for i, pair in enumerate(chunk)]

    records = resumable_map(share, prepared.results, pairs, ablate, identity, batch_size=run.batch_size,
                            desc=f"ablation {corner} {job.heads} ({len(head_sets)} head sets)", unit="pair")
    if not share.is_main:
        return
    base = np.array([r["log_odds"] for r in records])  # [N, 2]
    ablated = np.array([r["ablated_log_odds"] for r in records]).transpose(1, 0, 2)  # [S, N, 2]
    metrics = write_outputs(out, adapter, pairs, corner, prompt, job.heads, args.mode, args.positions, run.options.seed,
                            head_sets, base, ablated, answer_ids)
    finish_run(out / "run.json", record)
    m = metrics[PRIMARY]
    ci = "n/a" if m["ci_lo"] is None else f"{m['ci_lo']:+.3f}..{m['ci_hi']:+.3f}"
    log.info("%s: change of the log-odds on full images %+.3f (95%% CI %s), random sets %+.3f on average; "
             "p_drop %.3g -> %s", corner, m["effect"], ci, m["random_mean"], m["p_drop"], out)


def _pair_effects(record: dict) -> dict[str, float]:
    """Per pair: the chosen heads' change of the log-odds (full, control images) and its excess over the
    random head sets' mean change."""
    base = np.asarray(record["log_odds"], np.float64)  # [2]: full, control
    ablated = np.asarray(record["ablated_log_odds"], np.float64)  # [sets, 2]; set 0: the chosen heads
    effect = ablated - base
    random_mean = effect[1:].mean(0) if len(effect) > 1 else np.full(2, np.nan)
    return {"log_odds_full": base[0], "log_odds_control": base[1],
            "effect_log_odds_full": effect[0, 0], "effect_log_odds_control": effect[0, 1],
            "effect_minus_random_log_odds_full": effect[0, 0] - random_mean[0]}


ITEM_METRICS = controls.ItemMetrics(PAIRS_FILE, lambda record: record["id"], _pair_effects)


def finished(out: Path, results: Results, pairs: list[Pair]) -> bool:
    """Whether ``out`` (its identity checked) holds this ablation finished: every pair measured, its outputs
    there and run.json saying so (a run that failed after its summary, or lost an output, is redone)."""
    try:
        status = json.loads((out / "run.json").read_text()).get("status")
    except (OSError, ValueError, AttributeError):
        return False
    outputs = all((out / name).is_file() for name in ("summary.json", "ablation.csv", FIGURE))
    return (status == "finished" and outputs
            and {record["id"] for record in results.read()} >= {pair.id for pair in pairs})


def stats_feed_size(stats: CornerRun) -> int | None:
    """The square side the stats dir's images were fed at (None where the family fixes it)."""
    feed = stats.meta.get("feed_size")
    return int(feed[0]) if feed else None


def check_stats_model(run: CornerRun, options: ModelOptions) -> None:
    """OptionError when the stats dir was scored by another model than --model / --model-path: its heads were
    found in that model, so ablating them in this one would test nothing.

    Checkpoints count as the same only when the paths are the same text or name the same local folder: a hub
    id and a local folder may or may not hold the same weights, and a silent mismatch costs a whole run.
    """
    meta_path = run.folder / "meta.json"
    family, path = run.meta.get("model"), run.meta.get("model_path")
    if family is None:
        log.warning("%s does not say which model scored it; cannot check that it was --model %s",
                    meta_path, options.family)
        return
    if family != options.family:
        raise OptionError(f"--stats-dir {run.folder}: scored with --model {family}, not {options.family}; ablate "
                          f"its heads in the model they were found in, or score {options.family} first")
    wanted = options.model_path
    if path is not None and checkpoint_name(path) != checkpoint_name(wanted):
        raise OptionError(f"--stats-dir {run.folder}: scored with --model-path {path!r}, not {wanted!r}; ablate "
                          f"in that checkpoint (--model-path {path}), or score this one first")
    scored_seed = (recorded_identity(run.folder) or {}).get(INIT_SEED_KEY)  # a control's heads are its seed's
    if scored_seed != options.random_init_seed:
        said = lambda seed: "the model's own weights" if seed is None else f"random initialisation {seed}"  # noqa: E731
        raise OptionError(f"--stats-dir {run.folder}: scored with {said(scored_seed)}, not "
                          f"{said(options.random_init_seed)}; give the stats dir of the same weights")


def check_images(pairs: list[Pair]) -> None:
    """DataError naming the first image that cannot be read: found now, not hours into the run."""
    for pair in pairs:
        pair.load_images()


def ablation_prompt(prompt: str | None, run: CornerRun, corner: str) -> str:
    """--prompt (else the stats dir's, else the default) with '{corner}' filled in; an empty --prompt is
    refused, not replaced by the stats dir's."""
    if prompt is not None:
        return fill_corner_prompt(prompt, corner)
    return fill_corner_prompt(run.meta.get("prompt") or CORNER_PROMPT, corner, f"{run.folder / 'meta.json'}: prompt")


def write_outputs(out: Path, adapter, pairs: list[Pair], corner: str, prompt: str, heads_spec: str, mode: str,
                  positions: str, seed: int, head_sets: list[list[Head]], base: np.ndarray, ablated: np.ndarray,
                  answer_ids: tuple[list[int], list[int]]) -> dict:
    """ablation.csv, summary.json and the figure; returns the per-metric summary."""
    chosen = head_sets[0]
    metrics = summarize(base, ablated, seed)
    write_atomic(out / "ablation.csv", ablation_csv(pairs, head_sets, base, ablated))
    write_json(out / "summary.json", {
        "corner": corner, "prompt": prompt, "heads_spec": heads_spec, "heads": heads_json(chosen), "mode": mode,
        "positions": positions,
        "n_pairs": len(pairs), "metrics": metrics,
        "primary": {"metric": PRIMARY, "effect": metrics[PRIMARY]["effect"], "p_value": metrics[PRIMARY]["p_drop"],
                    "test": "one-sided: (1 + random sets whose mean change is <= the chosen heads') / (1 + R)"},
        "random_controls": {"count": len(head_sets) - 1, "seed": seed,
                            "head_sets": [heads_json(heads) for heads in head_sets[1:]]},
        "yes_tokens": adapter.tokenizer.convert_ids_to_tokens(answer_ids[0]),
        "no_tokens": adapter.tokenizer.convert_ids_to_tokens(answer_ids[1]),
        "definitions": {"heads": "layer 1-based, head 0-based", "log_odds": "logsumexp(yes logits) - logsumexp(no)",
                        "gap": "log_odds_full - log_odds_control", "accuracy": "yes on full, no on control",
                        "effect": "mean over pairs of (ablated - unablated)", "ci": "95% percentile bootstrap",
                        "mean_mode": "per (layer, head) and position: mean output at that position over every "
                                     "image (full and control), unablated model"}})
    plot_effects(out / FIGURE, metrics,
                 f"{corner}: ablating {' '.join(map(head_name, chosen))} ({mode}, {positions} positions) vs "
                 f"{len(head_sets) - 1} random sets from the same layers")
    return metrics
