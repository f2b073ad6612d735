"""Command-line pieces every experiment script shares: model options, data
options, the default data folder (generated with a notice when absent), and
turning user-facing errors into one line and exit status 2."""
from __future__ import annotations

import argparse
import functools
import logging
import signal
import threading
import sys
from pathlib import Path

from tqdm import tqdm

from spatial_attention.errors import DataError, OptionError

log = logging.getLogger("spatial_attention")

DEFAULT_SHAPEWORLD = Path("data/spatial_twoshapes/agreement/relational")
PAPER_CHECKPOINTS = {"llava": "llava-hf/llava-1.5-7b-hf", "qwen2": "Qwen/Qwen2-VL-7B-Instruct"}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Show defaults and keep the description's line breaks."""


def add_model_args(parser: argparse.ArgumentParser, family: str | None) -> None:
    group = parser.add_argument_group("model")
    default = PAPER_CHECKPOINTS.get(family)
    group.add_argument("--model-path", default=default,
                       help="hub id or local checkpoint folder; 'tiny-random' builds a random-weight model of the "
                            "same architecture offline (smoke runs: its numbers mean nothing)"
                            + ("" if default else "; default: the paper's checkpoint of --model"))
    group.add_argument("--revision", default=None, help="hub revision (branch, tag or commit) to load")
    group.add_argument("--device", default="auto", help="'auto' (cuda when available, else cpu), 'cpu', 'cuda', 'cuda:1'")
    group.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                       help="'auto': bf16 on a GPU, fp32 on the CPU")
    group.add_argument("--device-map", default=None,
                       help="passed to from_pretrained (e.g. 'auto' shards the model over several GPUs)")
    group.add_argument("--batch-size", type=int, default=None,
                       help="worlds, caption pairs or image pairs per forward pass (each brings two inputs: "
                            "real + shuffled, sentence + counterfactual, full + control); default 8 on a GPU, "
                            "1 on the CPU")
    group.add_argument("--seed", type=int, default=0, help="seed for every random choice (shuffles, background seeds)")
    group.add_argument("--layers", default=None,
                       help="language-model layers to average: all, first_third, mid_third, last_third, last_K "
                            "(e.g. last_4), or 1-based numbers '1,5,30'")
    group.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def add_shapeworld_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data")
    group.add_argument("--data", type=Path, default=DEFAULT_SHAPEWORLD,
                       help="ShapeWorld agreement/relational folder with shard0..shardK; the default folder is "
                            "generated offline (5 x 100 worlds) with a notice when it does not exist")
    group.add_argument("--shards", default=None, help="comma-separated shard numbers to read (default: all present)")
    group.add_argument("--limit", type=int, default=None, help="read at most this many worlds (after filtering)")


def check_at_least(minimum: int, **options: int | None) -> None:
    """OptionError for the first option (given as name=value; None = not given) below ``minimum``."""
    for name, value in options.items():
        if value is not None and value < minimum:
            need = "at least 1" if minimum == 1 else f"{minimum} or more"
            raise OptionError(f"--{name.replace('_', '-')} {value}: must be {need}")


def check_device(device: str) -> None:
    """OptionError for a --device that torch cannot use here, found before any model loads."""
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
                              f"or no driver); use --device cpu, or install the CUDA build (README, Environments)")
        if dev.index is not None and dev.index >= count:
            raise OptionError(f"--device {device}: there are {count} GPUs here, numbered 0..{count - 1}")
    elif dev.type != "cpu":
        raise OptionError(f"--device {device!r}: this tool runs on cpu or cuda devices")


def check_model_options(args) -> None:
    """The options of ``add_model_args`` that can be judged before a model loads."""
    check_at_least(0, seed=args.seed)  # numpy's generators take no negative seeds
    check_at_least(1, batch_size=args.batch_size)
    check_device(args.device)
    if args.layers is not None:
        from spatial_attention.metrics import layer_indices

        layer_indices(args.layers, None)  # the form now; the range once the model's depth is known


def default_batch_size(args, device) -> int:
    if args.batch_size is not None:  # checked by check_model_options
        return args.batch_size
    return 8 if device.type == "cuda" else 1


def parse_shards(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        shards = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        shards = []
    if not shards or min(shards) < 0:
        raise OptionError(f"--shards {text!r}: expected comma-separated shard numbers such as 0,1,2")
    if len(set(shards)) < len(shards):
        raise OptionError(f"--shards {text!r}: a shard is listed twice; its worlds would count twice")
    return shards


def ensure_shapeworld(path: Path, seed: int = 0) -> Path:
    """``path`` itself; the default folder is generated first when it is missing.
    ``DataError`` when ``path`` is a file: said now, before a model loads."""
    if path.exists():
        from spatial_attention.shapeworld import list_shards

        list_shards(path)  # the reader's own check: a file is not a ShapeWorld folder
        return path
    if Path(path) != DEFAULT_SHAPEWORLD:
        raise DataError(f"--data {path}: folder does not exist (point it at a ShapeWorld agreement/relational "
                        f"folder, or generate one with: python generate_data.py shapeworld --out {path})")
    from spatial_attention.generate import generate_shapeworld

    log.warning("NOTICE: %s does not exist; generating 5 x 100 ShapeWorld-format worlds there (seed %d). "
                "For the paper's data, put real ShapeWorld output in that folder.", path, seed)
    generate_shapeworld(path, seed=seed)
    return path


def prepare_run(family: str, args):
    """What every experiment over ShapeWorld does before its model loads: check the
    options and the output folder (``args.out``), take this process's share of the
    work, and find the data folder (the default one generated once, by the main
    process). Returns (share, data). A bad option costs seconds, not a model load."""
    from models import ADAPTERS
    from spatial_attention.runio import ProcessShare, check_output_dir

    check_model_options(args)
    check_at_least(1, limit=args.limit)
    if getattr(args, "feed_size", None) is not None:
        ADAPTERS[family].check_feed_size(args.feed_size)
    check_output_dir(args.out, "--out")
    share = ProcessShare(args.device)
    data = ensure_shapeworld(args.data, args.seed) if share.is_main else args.data
    share.wait()
    return share, data


def load_model(family: str, args, share, default_layers: str | None = None):
    """The model, its selected layers (0-based) and the batch size. ``--layers``
    defaults to ``default_layers``, else to the layers the paper used with this
    family (``adapter.paper_layers``)."""
    from models import load_adapter
    from spatial_attention.metrics import layer_indices

    device = str(share.device) if share.size > 1 and args.device == "auto" else args.device
    adapter = load_adapter(family, args.model_path, device=device, dtype=args.dtype, device_map=args.device_map,
                           revision=args.revision, seed=args.seed)
    if getattr(args, "feed_size", None):
        adapter.set_feed_size(args.feed_size)
    args.layers = args.layers or default_layers or adapter.paper_layers
    layers = layer_indices(args.layers, adapter.num_layers)
    return adapter, layers, default_batch_size(args, adapter.device)


def user_errors_exit(main):
    """Decorator: how a script ends when it cannot go on, always in one line on stderr.

    - OptionError / DataError: the message, exit status 2;
    - OSError (a disk that is full or turned read-only, a file that vanished):
      the file and the reason, exit status 1;
    - Ctrl-C or SIGTERM: what was kept and how to resume, exit status 130.

    A run.json still saying "running" is rewritten "interrupted" or "failed"
    (``runio.mark_unfinished``); every finished result line stays on disk, and
    rerunning the same command resumes after them.
    """

    def say(line: str) -> None:
        tqdm.write(line, file=sys.stderr)  # on a line of its own, below any progress bar

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        from spatial_attention.runio import mark_unfinished

        # SIGTERM (kill, timeout, a cluster's time limit) ends a run like Ctrl-C does
        in_main_thread = threading.current_thread() is threading.main_thread()  # where handlers can be set
        previous = signal.signal(signal.SIGTERM, signal.default_int_handler) if in_main_thread else None
        try:
            return main(*args, **kwargs)
        except (OptionError, DataError) as err:
            mark_unfinished("failed", str(err))
            say(f"error: {err}")
            raise SystemExit(2) from None
        except KeyboardInterrupt:
            say(f"interrupted: {mark_unfinished('interrupted', 'Ctrl-C')}")
            raise SystemExit(130) from None
        except OSError as err:
            where = f"{err.filename}: " if err.filename else ""
            line = f"{where}{err.strerror or err}"
            say(f"error: cannot go on: {line} (fix the disk or permissions); {mark_unfinished('failed', line)}")
            raise SystemExit(1) from None
        except Exception as err:  # a bug or, say, GPU memory: the traceback stays, run.json says how it ended
            mark_unfinished("failed", f"{type(err).__name__}: {str(err)[:200]}")
            raise
        finally:
            if in_main_thread:
                signal.signal(signal.SIGTERM, previous)

    return wrapper
