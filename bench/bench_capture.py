"""Benchmark: the capture engine against the paper's extraction path and the plain forward.

    python bench/bench_capture.py --model llava --size small
    python bench/bench_capture.py --model qwen2 --size 7b --device cuda --batch-size 8

Random-weight models are built from configs (no download), so any size runs
anywhere it fits; ``7b`` has the full 7B shapes and is meant for a GPU. The
modes run on the same inputs (generated ShapeWorld scenes with real captions):

- ``plain``:  the model's ordinary forward (sdpa), nothing recorded: the floor;
- ``paper``:  eager attention + ``output_attentions=True``, every layer's tensor
              ``.float().cpu()`` and averaged on the CPU, batch size 1, as the
              paper's scripts did;
- ``engine``: this project's capture of what experiment 1 reads (the caption
              words' rows onto the image; the seed cells' rows of the image
              block and of the vision encoder), at --batch-size.

Reported per mode: seconds per sample (median over --repeats after a warm-up,
the three modes' passes interleaved in one process, so that they share the
machine's state) and peak memory (each mode in a fresh process; GPU:
max_memory_allocated; CPU: the process's peak RSS during one pass after a
warm-up); the attention rows the engine computes per recorded layer (``rows``);
for ``engine``, the largest absolute difference from ``paper`` on every
reduction, and of its next-token logits from ``plain``'s. Also ``answer_seconds``:
the seconds a row of an answer-position rerun through the whole language model
takes (``prefix.answer_logits``: patching, and ablation at the answer position),
the first batch copied 1, 4 and 16 times over, by rows per forward (the study's
cost plan prices those reruns with it), and ``reinit_seconds``: a control's model
re-initialised in place (``models.base.initialise``). One JSON object is
printed and written to bench/results/{model}-{size}-{device}[-L{layers}].json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from models import ADAPTERS, FAMILIES  # noqa: E402  (after the path)

# Language-model / vision-encoder shapes per size (``7b``: the checkpoints' own, as random-7b builds them).
SIZES = {
    "tiny": {name: ({}, {}) for name in ADAPTERS},
    "small": {  # >= 8 layers, 8 heads, 576 image tokens: depth-dependent costs show
        "llava": (dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                       num_key_value_heads=8),
                  dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8)),
        "qwen2": (dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                       num_key_value_heads=8),
                  dict(depth=4, embed_dim=256, mlp_ratio=4, num_heads=8)),
        "qwen2_5vl": (dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                           num_key_value_heads=8),
                      dict(depth=4, hidden_size=256, intermediate_size=1024, num_heads=8, fullatt_block_indexes=[1, 3])),
        "llava_onevision": (dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                                 num_key_value_heads=8),
                            dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8)),
        "llava_next": (dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                            num_key_value_heads=8),
                       dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8)),
        "internvl3": (dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                           num_key_value_heads=8),
                      dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8)),
        "qwen3vl": (dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                         num_key_value_heads=8),
                    dict(depth=4, hidden_size=256, intermediate_size=1024, num_heads=8, deepstack_visual_indexes=[1, 2])),
    },
}
SIZES["7b"] = {name: (cls.SEVEN_B_TEXT, cls.SEVEN_B_VISION) for name, cls in ADAPTERS.items()}  # models.md
MODES = ("plain", "paper", "engine")


def build_adapter(args):
    cls = ADAPTERS[args.model]
    text, vision = (dict(d) for d in SIZES[args.size][args.model])
    if args.text_layers:
        text["num_hidden_layers"] = args.text_layers
    torch.manual_seed(0)
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    with device:  # in its dtype: a 7B model is not built in fp32 first
        model, processor = cls.build_random(text=text, vision=vision, dtype=dtype)
    return cls(model.to(device=device, dtype=dtype), processor, f"random-{args.size}")  # at the family's feed size


def scenes(n: int):
    from spatial_attention.data.generate import generate_shapeworld
    from spatial_attention.data.shapeworld import World, iter_worlds

    root = Path(tempfile.mkdtemp(prefix="bench_scenes_"))
    generate_shapeworld(root, shards=1, worlds_per_shard=n, seed=0)
    return [w for w in iter_worlds(root) if isinstance(w, World)][:n]


def request_for(adapter, batch, worlds, layers):
    """Experiment 1's request (vlm_analysis.world_request): caption words x image, seed and shape cells' rows."""
    from spatial_attention.experiments import vlm_analysis as VA

    regions = [VA.world_regions(w, lay.grid) for w, lay in zip(worlds, batch.layouts)]
    cells = [VA.seed_cells_of(VA.world_seeds(w, r, seed=0), r) for w, r in zip(worlds, regions)]
    word_rows = [VA.word_rows_of(lay, w) for lay, w in zip(batch.layouts, worlds)]
    return VA.world_request(layers, batch.layouts, word_rows, cells)


def paper_reductions(adapter, batch, request) -> dict:
    """The paper's path for one sample: eager, every layer's full map to the CPU in fp32, mean there; the
    request's rows read off the full maps."""
    from spatial_attention.engine.reference import eager_model

    with eager_model(adapter) as kept, torch.inference_mode():
        out = adapter.model(**batch.inputs, output_attentions=True, use_cache=False)
        per_layer = [a.float().cpu()[0].mean(0) for a in out.attentions]  # (T, T) per layer, on the CPU
        vision_layers = [torch.cat([c.float().cpu() for c in kept[id(m)]]) for m in adapter.vision_attention_modules()]
    mean = torch.stack(per_layer).mean(0)
    blocks = {name: mean[torch.as_tensor(pairs[0][0])][:, torch.as_tensor(pairs[0][1])].numpy()
              for name, pairs in request.blocks.items()}
    rows = torch.as_tensor(adapter.vision_query_rows(request.vision_cells[0]))
    vision = torch.stack([adapter.vision_to_grid(vision_layers[i][0].mean(0)[rows])
                          for i in adapter.vision_map_layers()]).mean(0)
    return {**blocks, "vision": vision.numpy()}


def mode_pass(args, mode: str, adapter, worlds):
    """(one pass of ``mode`` over the worlds -> (reductions, logits), the requests, the batches)."""
    from spatial_attention.engine.capture import capture, plain_logits

    layers = list(range(adapter.num_layers))
    batch_size = 1 if mode == "paper" else args.batch_size
    chunks = [worlds[i:i + batch_size] for i in range(0, len(worlds), batch_size)]
    batches = [adapter.encode([w.caption.text for w in chunk], [w.load_image() for w in chunk]) for chunk in chunks]
    requests = [request_for(adapter, b, chunk, layers) for b, chunk in zip(batches, chunks)]

    def one_pass():
        results, logits = [], []
        for batch, request in zip(batches, requests):
            if mode == "plain":
                logits.append(plain_logits(adapter, batch))
            elif mode == "paper":
                results.append(paper_reductions(adapter, batch, request))
            else:
                recorded, captured = capture(adapter, batch, request)
                results += recorded
                logits.append(captured)
        if args.device == "cuda":
            torch.cuda.synchronize()
        return results, logits

    return one_pass, requests, batches


def run_timing(args) -> dict:
    """Worker: every mode's seconds per sample, the modes' passes interleaved in this one process, so that they
    share its memory layout and the machine's state (separate processes differ by 10-20% on this CPU); then the
    seconds a row of an answer-position rerun of the first batch takes (``answer_seconds``, by rows)."""
    from spatial_attention.study.calibration import answer_seconds, reinit_seconds

    adapter = build_adapter(args)
    worlds = scenes(args.samples)
    passes = {mode: mode_pass(args, mode, adapter, worlds) for mode in MODES}
    batch = passes["plain"][2][0]
    passes = {mode: one_pass for mode, (one_pass, _, _) in passes.items()}
    for one_pass in passes.values():
        one_pass()  # warm-up
    runs = {mode: [] for mode in MODES}
    for _ in range(args.repeats):
        for mode, one_pass in passes.items():
            start = time.perf_counter()
            one_pass()
            runs[mode].append((time.perf_counter() - start) / args.samples)
    return {"modes": {mode: {"seconds_per_sample": statistics.median(r), "runs": r} for mode, r in runs.items()},
            "answer_seconds": answer_seconds(adapter, batch), "reinit_seconds": reinit_seconds(adapter)}


def run_mode(args) -> dict:
    """Worker: the peak memory of one mode's pass in this (fresh) process; reductions and logits go to --dump."""
    adapter = build_adapter(args)
    one_pass, requests, batches = mode_pass(args, args.mode, adapter, scenes(args.samples))
    reductions, logits = one_pass()  # warm-up, and the numbers to compare
    _reset_peak(args.device)
    one_pass()
    if args.dump:
        arrays = {f"{i}_{k}": v for i, r in enumerate(reductions) for k, v in r.items()}
        if logits:
            arrays["logits"] = torch.cat(logits).numpy()
        np.savez(args.dump, **arrays)
    return {"mode": args.mode, "peak_memory_mb": _peak_mb(args.device), "batch_size": len(batches[0]),
            "num_layers": adapter.num_layers, "num_heads": adapter.num_heads,
            "image_tokens": int(len(batches[0].layouts[0].image_positions)),
            "sequence_length": int(batches[0].layouts[0].length), "threads": torch.get_num_threads(),
            "rows": _rows_per_layer(adapter, requests, batches)}


def _rows_per_layer(adapter, requests, batches) -> dict:
    """The attention rows the engine computes per sample in each recorded layer (mean over the samples)."""
    from spatial_attention.engine.capture import sample_rows

    lm, vision = [], []
    for request, batch in zip(requests, batches):
        for b, (cells, layout) in enumerate(zip(request.vision_cells, batch.layouts)):
            lm.append(len(sample_rows(request, b, layout.last_position)))
            vision.append(len(adapter.vision_query_rows(cells)))
    return {"language_model": float(np.mean(lm)), "vision": float(np.mean(vision))}


def _reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM, the peak RSS
            f.write("5")


def _peak_mb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=FAMILIES, required=True)
    parser.add_argument("--size", choices=list(SIZES), default="small")
    parser.add_argument("--batch-size", type=int, default=None, help="engine batch size (default 8 on cuda, 1 on cpu)")
    parser.add_argument("--samples", type=int, default=4, help="scenes per timed pass")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes after the warm-up (median reported)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                        help="default: bf16 on cuda, fp32 on cpu")
    parser.add_argument("--text-layers", type=int, default=None, help="override the language model's depth")
    parser.add_argument("--out", type=Path, default=None, help="default bench/results/{model}-{size}-{device}.json")
    parser.add_argument("--mode", choices=[*MODES, "timing"], help=argparse.SUPPRESS)  # worker process
    parser.add_argument("--dump", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    args.batch_size = args.batch_size or (8 if args.device == "cuda" else 1)
    if args.mode:
        print(json.dumps(run_timing(args) if args.mode == "timing" else run_mode(args)))
        return

    tmp = Path(tempfile.mkdtemp(prefix="bench_"))
    modes = {}
    for mode in (*MODES, "timing"):
        cmd = [sys.executable, __file__, *_forwarded(args), "--mode", mode, "--dump", str(tmp / f"{mode}.npz")]
        done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        if done.returncode != 0:
            sys.exit(f"{mode} run failed:\n{done.stderr[-3000:]}")
        modes[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    timed = modes.pop("timing")
    for mode, timing in timed["modes"].items():
        modes[mode].update(timing)
        print(f"{mode}: {timing['seconds_per_sample']:.4f} s/sample, peak {modes[mode]['peak_memory_mb']:.0f} MB",
              file=sys.stderr)
    paper, engine = np.load(tmp / "paper.npz"), np.load(tmp / "engine.npz")
    logits_diff = float(np.abs(engine["logits"] - np.load(tmp / "plain.npz")["logits"]).max())
    max_abs_diff = {}
    for key in paper.files:
        name = key.split("_", 1)[1]
        max_abs_diff[name] = max(max_abs_diff.get(name, 0.0), float(np.abs(paper[key] - engine[key]).max()))
    plain_peak = modes["plain"]["peak_memory_mb"]
    extra_paper = modes["paper"]["peak_memory_mb"] - plain_peak
    extra_engine = modes["engine"]["peak_memory_mb"] - plain_peak
    result = {
        "model": args.model, "size": args.size, "device": args.device, "dtype": args.dtype,
        "batch_size": args.batch_size, "samples": args.samples, "repeats": args.repeats,
        "machine": _machine(args.device), "modes": modes, "answer_seconds": timed["answer_seconds"],
        "reinit_seconds": timed["reinit_seconds"],
        "speedup_vs_paper": modes["paper"]["seconds_per_sample"] / modes["engine"]["seconds_per_sample"],
        "overhead_vs_plain": modes["engine"]["seconds_per_sample"] / modes["plain"]["seconds_per_sample"],
        "extra_peak_mb": {"paper": extra_paper, "engine": extra_engine},
        "memory_saving_vs_paper": extra_paper / extra_engine if extra_engine > 0 else None,
        "max_abs_diff": max_abs_diff,
        "logits_max_abs_diff_vs_plain": logits_diff,
    }
    out = args.out or REPO / "bench" / "results" / (
        f"{args.model}-{args.size}-{args.device}" + (f"-L{args.text_layers}" if args.text_layers else "") + ".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


def _forwarded(args) -> list[str]:
    flags = ["--model", args.model, "--size", args.size, "--batch-size", str(args.batch_size), "--samples",
             str(args.samples), "--repeats", str(args.repeats), "--device", args.device, "--dtype", args.dtype]
    return flags + (["--text-layers", str(args.text_layers)] if args.text_layers else [])


def _machine(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{os.cpu_count()} CPU cores, torch {torch.__version__}"


if __name__ == "__main__":
    main()
