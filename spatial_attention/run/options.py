"""The options every command shares, checked before anything loads: numbers,
devices, the ``--layers`` and ``--shards`` forms, and the model options as one
frozen ``ModelOptions``. A bad option costs seconds, not a 7B model load."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from spatial_attention.common.console import check_at_least
from spatial_attention.common.errors import OptionError

LAYER_MODES = "all, first_third, mid_third, last_third, last_K (e.g. last_4), or 1-based numbers such as '1,5,30'"


def check_device(device: str) -> None:
    """OptionError for a --device that torch cannot use here."""
    import torch

    if device == "auto":
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise OptionError(f"--device {device!r}: not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise OptionError(f"--device {device}: torch sees no CUDA GPU on this machine (a CPU-only torch build, "
                              f"or no driver); use --device cpu, or install the CUDA build (docs/environments.md)")
        if dev.index is not None and dev.index >= count:
            raise OptionError(f"--device {device}: there are {count} GPUs here, numbered 0..{count - 1}")
    elif dev.type != "cpu":
        raise OptionError(f"--device {device!r}: this tool runs on cpu or cuda devices")


def layer_indices(mode: str, num_layers: int | None) -> list[int]:
    """0-based language-model layers selected by ``mode`` (the ``--layers`` option).

    all = [0, L); with t = L // 3: first_third = [0, t), mid_third = [t, 2t),
    last_third = [2t, L); last_K = the last K layers; '1,5,30' = those 1-based layers
    (returned 0-based, in the order given). An empty, out-of-range, repeated or
    unparsable selection raises OptionError. With ``num_layers`` None (no model
    loaded yet) only the form is checked, and the result is the listed layers
    ([] for a mode, whose layers depend on the model's depth).
    """
    def bad(why: str) -> OptionError:
        depth = "" if num_layers is None else f" (the model has {num_layers} layers)"
        return OptionError(f"--layers {mode!r}: {why}; use {LAYER_MODES}{depth}")

    text = str(mode).strip()
    limit = num_layers if num_layers is not None else float("inf")
    if text in ("all", "first_third", "mid_third", "last_third"):
        if num_layers is None:
            return []
        t = num_layers // 3
        selected = list(range(*{"all": (0, num_layers), "first_third": (0, t), "mid_third": (t, 2 * t),
                                "last_third": (2 * t, num_layers)}[text]))
    elif match := re.fullmatch(r"last_(\d+)", text):
        k = int(match.group(1))
        if not 1 <= k <= limit:
            raise bad(f"K must lie in 1..{num_layers}" if num_layers is not None else "K must be at least 1")
        selected = list(range(num_layers - k, num_layers)) if num_layers is not None else []
    elif re.fullmatch(r"\d+(\s*,\s*\d+)*", text):
        numbers = [int(part) for part in text.split(",")]
        if any(not 1 <= n <= limit for n in numbers):
            raise bad("layer numbers are 1-based and must lie in 1.." + (str(num_layers) if num_layers else "L"))
        if len(set(numbers)) != len(numbers):
            raise bad("a layer is listed twice")
        selected = [n - 1 for n in numbers]
    else:
        raise bad("not a known form")
    if not selected and num_layers is not None:
        raise bad("selects no layer")
    return selected


def _numbers(option: str, text: str, expected: str, twice: str) -> list[int]:
    """A comma-separated list of numbers >= 0 given to ``option``, each at most once."""
    try:
        numbers = [int(n) for n in text.split(",") if n.strip()]
    except ValueError:
        numbers = []
    if not numbers or min(numbers) < 0:
        raise OptionError(f"{option} {text!r}: expected comma-separated {expected}")
    if len(set(numbers)) < len(numbers):
        raise OptionError(f"{option} {text!r}: {twice}")
    return numbers


def parse_shards(text: str | None) -> list[int] | None:
    if text is None:
        return None
    return _numbers("--shards", text, "shard numbers such as 0,1,2", "a shard is listed twice; its worlds would "
                    "count twice")


def parse_heads(text: str | None) -> list[int] | None:
    """The ``--heads`` option: 0-based heads of a layer, sorted (None: every head); its range is checked once the
    model's head count is known."""
    if text is None:
        return None
    return sorted(_numbers("--heads", text, "0-based head numbers such as 0 or 1,2,3", "a head is listed twice"))


def checkpoint_name(model_path: str) -> str:
    """A --model-path as identities record it: a local folder by its absolute path (so that './ckpt' and
    '/home/me/ckpt' are one checkpoint), a hub id or 'tiny-random' as it is."""
    path = Path(model_path)
    return str(path.resolve()) if path.exists() else model_path


def dtype_name(dtype) -> str:
    """A torch dtype as identities and meta.json record it ('bfloat16'): bf16 and fp32 results are not pooled."""
    return str(dtype).replace("torch.", "")


INIT_SEED_KEY = "initialisation seed"  # the identity's record of a random-weights control's weights


@dataclass(frozen=True)
class ModelOptions:
    """The model options of one command (``cli.add_model_args``), checked, with the family's defaults
    filled in; ``layers`` and ``feed_size`` stay None where the option was not given."""
    family: str
    model_path: str
    revision: str | None
    device: str
    dtype: str
    device_map: str | None
    batch_size: int | None
    seed: int
    layers: str | None
    feed_size: int | None
    random_init_seed: int | None = None  # the random-weights control: weights drawn with this seed (controls.py)

    @classmethod
    def from_args(cls, family: str, args) -> "ModelOptions":
        """Check every model option of ``args`` that can be judged before a model loads (``--layers`` for its
        form; its range once the model's depth is known)."""
        from models import family_adapter
        from models.base import random_7b_depth

        adapter = family_adapter(family)
        check_at_least(0, seed=args.seed)  # numpy's generators take no negative seeds
        check_at_least(1, batch_size=args.batch_size)
        check_device(args.device)
        if args.layers is not None:
            layer_indices(args.layers, None)
        feed_size = getattr(args, "feed_size", None)
        if feed_size is not None:
            adapter.check_feed_size(feed_size)  # the family's own rule first: it says what would work
            check_at_least(1, feed_size=feed_size)
        model_path = adapter.resolve_model_path(args.model_path)
        random_7b_depth(model_path)  # a malformed random-7b:N is refused here
        if model_path.startswith(("/", "./", "../")) and not Path(model_path).exists():
            raise OptionError(f"--model-path {model_path}: no such folder (a hub id has the form owner/name); "
                              "give a downloaded checkpoint folder, a hub id, tiny-random or random-7b[:N]")
        return cls(family=family, model_path=model_path, revision=args.revision,
                   device=args.device, dtype=args.dtype, device_map=args.device_map, batch_size=args.batch_size,
                   seed=args.seed, layers=args.layers, feed_size=feed_size)

    def identity(self, default_layers: str | None = None) -> dict:
        """The model's part of a results folder's identity, as far as it is known before the model loads:
        the layers only when --layers lists numbers (a mode such as 'all' needs the model's depth)."""
        from models import family_adapter
        from models.base import CONTROL_INITIALISATION, is_random, pick_device_and_dtype, random_7b_depth

        adapter = family_adapter(self.family)
        default_feed = adapter.checkpoint_feed_size(self.model_path)
        feed = (self.feed_size or default_feed) if default_feed else None  # else fixed by the family
        identity = {"--model": self.family, "--model-path": checkpoint_name(self.model_path),
                    "--revision": self.revision,
                    "--dtype": dtype_name(pick_device_and_dtype(self.device, self.dtype)[1]),
                    "--feed-size": [feed, feed] if feed else None}
        listed = layer_indices(self.layers or default_layers or adapter.paper_layers, None)
        if listed:
            identity["--layers"] = [layer + 1 for layer in listed]
        if is_random(self.model_path):  # its weights are drawn with the seed
            identity["--seed"] = self.seed
            if random_7b_depth(self.model_path) is not None:  # drawn on its device: other numbers on a GPU
                identity["initialisation device"] = pick_device_and_dtype(self.device, self.dtype)[0].type
        if self.random_init_seed is not None:
            identity["--control"] = "random-weights"
            identity[INIT_SEED_KEY] = self.random_init_seed
            identity["initialisation"] = CONTROL_INITIALISATION  # (controls drawn otherwise before 2026-12-07)
            # weights are drawn where the model runs, and one seed draws other numbers on a GPU than on a CPU
            identity["initialisation device"] = pick_device_and_dtype(self.device, self.dtype)[0].type
        return identity
