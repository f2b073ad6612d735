"""What a forward costs on a device, per model family: the calibration the study's plan prices its forwards with
(``cost.py``; ``CALIBRATION=FILE``, written by ``bench/gpu_check.sh``, or measured here for tiny and toy models).

A calibration file (JSON, ``"format": 2``) describes one device: ``device`` (its name), ``device_type`` (cuda,
cpu), ``process_seconds`` (a script's start: Python and the package's imports) and per family ``geometry`` (the
model it was measured on: language-model layers, heads, parameters per layer, the vision encoder's, tokens per
input), ``seconds_per_input`` and ``capture_overhead`` by batch size (a plain forward of one input, and what
capturing attention multiplies it by), ``answer_seconds`` by rows per forward (a row of an answer-position
rerun through the whole language model: ``prefix.answer_logits``), ``build_seconds`` (one model build, with
what else a script does once per model) and, optional, ``reinit_seconds`` (a control's model re-initialised in
place: ``models.base.initialise``; a build where it is missing). A forward's cost is its work, multiply-adds of
the linear layers (tokens x layers x parameters per layer, the vision encoder's where it runs), at the measured
seconds per unit of work of its batch size; an answer-position rerun's, whose one token a row leaves a GPU reading weights and keys
rather than multiplying, is its rows at the measured seconds a row and layer. A family the file lacks is priced
at another family's rate and marked scaled. Optional: ``host_seconds`` (per kind of run, its seconds outside the
forwards per run and per item, as ``bench/host_costs.py`` writes them; kinds it lacks come from that script's
recorded file) and ``estimated`` (figures that were not measured).
"""
from __future__ import annotations

import json
import math
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from spatial_attention.common.errors import OptionError
from spatial_attention.run.cost import Forwards

FORMAT = 2
ANSWER_TIMES = (1, 4, 16)  # copies of a batch per answer-position rerun timed (rows: the batch times these)
GEOMETRY_KEYS = ("layers", "heads", "lm_params", "vision_layers", "vision_params", "vision_tokens", "tokens")
BATCHES = (1, 8)  # the batch sizes a calibration here times, as bench/gpu_check.sh does
SAMPLE_CAPTION = ("red", "square", "blue", "circle", "left")  # one ShapeWorld caption: an input's typical length


@dataclass(frozen=True)
class Geometry:
    """What one input costs a model, in work: its language model's ``layers`` (and ``heads`` a layer) of
    ``lm_params`` parameters, its vision encoder's ``vision_layers`` of ``vision_params`` on ``vision_tokens`` a
    picture, and the tokens of an input with an image and of a text alone (``tokens``)."""
    layers: int
    heads: int
    lm_params: float
    vision_layers: int
    vision_params: float
    vision_tokens: int
    tokens: dict

    def row_tokens(self, forwards: Forwards) -> int:
        """Tokens one input of ``forwards`` runs through its layers."""
        return 1 if forwards.answer_only else self.tokens["image" if forwards.image else "text"]

    def work(self, forwards: Forwards) -> float:
        """Multiply-adds of one input of ``forwards`` in the linear layers (at a few hundred tokens, attention's
        own products add a few per cent)."""
        done = self.row_tokens(forwards) * forwards.layers * self.lm_params
        if forwards.full and forwards.image:
            done += self.vision_tokens * self.vision_layers * self.vision_params
        return done

    @property
    def params(self) -> float:
        return self.layers * self.lm_params + self.vision_layers * self.vision_params


def lm_layer_params(text: dict) -> float:
    """Parameters of one decoder layer from a language-model config: the attention projections (grouped keys and
    values where there are fewer) and a gated MLP."""
    width, heads = text["hidden_size"], text["num_attention_heads"]
    head_dim = text.get("head_dim") or width // heads
    kv = text.get("num_key_value_heads") or heads
    return 2 * width * heads * head_dim + 2 * width * kv * head_dim + 3 * width * text["intermediate_size"]


def vision_shape(vision: dict) -> tuple[int, float]:
    """(layers, parameters a layer) of a vision-encoder config, under either family's names (Qwen2-VL's
    ``embed_dim`` is its width, its ``hidden_size`` the merger's output)."""
    width = vision.get("embed_dim") or vision["hidden_size"]
    inner = vision.get("intermediate_size") or width * vision.get("mlp_ratio", 4)
    return int(vision.get("depth") or vision["num_hidden_layers"]), 4 * width * width + 2 * width * inner


def geometry_of(adapter, text: dict | None = None, vision: dict | None = None) -> Geometry:
    """The geometry of ``adapter``'s model, or of configs ``text`` / ``vision`` fed as ``adapter`` feeds (its
    tokens per input and per picture, from one encoded sample and one forward of it)."""
    import torch
    from PIL import Image

    from spatial_attention.data.shapeworld import format_caption

    config = adapter.model.config
    text = text or config.text_config.to_dict()
    vision = vision or config.vision_config.to_dict()
    caption = format_caption(*SAMPLE_CAPTION)
    batch = adapter.encode([caption], [Image.new("RGB", (256, 256), (200, 200, 200))])
    seen = []

    def count(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        seen.append(hidden.numel() // hidden.shape[-1])

    handle = adapter.vision_attention_modules()[0].register_forward_pre_hook(count, with_kwargs=True)
    try:
        with torch.inference_mode():
            adapter.model(**batch.inputs)
    finally:
        handle.remove()
    layers, per_layer = vision_shape(vision)
    return Geometry(layers=text["num_hidden_layers"], heads=text["num_attention_heads"],
                    lm_params=lm_layer_params(text),
                    vision_layers=layers, vision_params=per_layer, vision_tokens=seen[0],
                    tokens={"image": batch.layouts[0].length,
                            "text": adapter.encode([caption]).layouts[0].length})


def at_batch(table: dict, batch: int) -> float:
    """A per-batch-size figure at ``batch``: linear between the measured sizes, the nearest one beyond them."""
    points = sorted((int(size), float(value)) for size, value in table.items())
    if batch <= points[0][0]:
        return points[0][1]
    for (lo, a), (hi, b) in zip(points, points[1:]):
        if batch <= hi:
            return a + (b - a) * (batch - lo) / (hi - lo)
    return points[-1][1]


def forward_seconds(entry: dict, geometry: Geometry, forwards: Forwards) -> float:
    """Seconds of ``forwards`` on a model of ``geometry``, at the rate family calibration ``entry`` measured."""
    measured = Geometry(**entry["geometry"])
    if forwards.answer_only:  # rows a layer, at the measured model's seconds (scaled by its layers' size)
        per_row_layer = at_batch(entry["answer_seconds"], forwards.batch) / measured.layers
        return forwards.inputs * forwards.layers * per_row_layer * geometry.lm_params / measured.lm_params
    per_work = at_batch(entry["seconds_per_input"], forwards.batch) / measured.work(Forwards(1, 1, measured.layers))
    overhead = at_batch(entry["capture_overhead"], forwards.batch) if forwards.captured else 1.0
    return forwards.inputs * geometry.work(forwards) * per_work * overhead


def read_calibration(path: Path) -> dict:
    """A calibration file, checked (OptionError naming CALIBRATION and what is wrong, in one line)."""
    where = f"CALIBRATION={path}"
    try:
        calibration = json.loads(Path(path).read_text())
    except OSError as err:
        raise OptionError(f"{where}: cannot be read ({err.strerror or err}); give a file bench/gpu_check.sh wrote "
                          "(bench/results/calibration-*.json)") from None
    except ValueError as err:
        raise OptionError(f"{where}: not JSON ({err})") from None
    problem = _problem(calibration)
    if problem:
        raise OptionError(f"{where}: not a calibration file: {problem}")
    return calibration


def _problem(calibration) -> str | None:
    """What makes ``calibration`` unusable; None where nothing does."""
    if not isinstance(calibration, dict) or calibration.get("format") != FORMAT:
        return (f'no "format": {FORMAT} (an older file lacks the answer-position reruns\' seconds: run '
                'bench/gpu_check.sh again on that device)')
    if not _positive(calibration.get("process_seconds"), zero=True):
        return "process_seconds must be a number of 0 or more"
    families = calibration.get("families")
    if not isinstance(families, dict) or not families:
        return "no families"
    for family, entry in families.items():
        geometry = entry.get("geometry") if isinstance(entry, dict) else None
        if not isinstance(geometry, dict) or set(geometry) != set(GEOMETRY_KEYS):
            return f"{family}: geometry must hold {', '.join(GEOMETRY_KEYS)}"
        tokens = geometry["tokens"] if isinstance(geometry["tokens"], dict) else {}
        if not all(_positive(geometry[k]) for k in GEOMETRY_KEYS if k != "tokens") or not all(
                _positive(tokens.get(k)) for k in ("image", "text")):
            return f"{family}: geometry's numbers must be above 0 (tokens: image and text)"
        for table in ("seconds_per_input", "capture_overhead", "answer_seconds"):
            values = entry.get(table)
            if not isinstance(values, dict) or not values or not all(
                    str(k).isdigit() and int(k) >= 1 and _positive(v) for k, v in values.items()):
                return f"{family}: {table} must map batch sizes to numbers above 0"
        if not all(_positive(entry.get(k, 0), zero=True) for k in ("build_seconds", "reinit_seconds")) or \
                "build_seconds" not in entry:
            return f"{family}: build_seconds (and reinit_seconds, where given) must be numbers of 0 or more"
    host = calibration.get("host_seconds", {})
    if not isinstance(host, dict) or not all(isinstance(v, dict) and all(_positive(v.get(k), zero=True) for k in (
            "per_run", "per_item")) for v in host.values()):
        return "host_seconds must map kinds of run to their per_run and per_item seconds, numbers of 0 or more"
    if not all(isinstance(figure, str) for figure in calibration.get("estimated", [])):
        return "estimated must be a list of texts"
    return None


def _positive(value, zero: bool = False) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and (value >= 0 if zero else value > 0))


def device_slug(name: str | None) -> str:
    """A device's name as file names carry it (``NVIDIA H200`` -> ``nvidia-h200``)."""
    return re.sub(r"[^0-9A-Za-z]+", "-", name or "cpu").strip("-").lower()


def _median_seconds(run, repeats: int = 3) -> float:
    run()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_family(family: str, model_path: str, device: str, dtype: str) -> dict:
    """One family's calibration here: its build timed, then a plain and a captured forward of the sample input at
    each of ``BATCHES`` (for tiny and toy models: seconds, not minutes)."""
    import torch
    from PIL import Image

    from models import load_adapter
    from spatial_attention.data.shapeworld import format_caption
    from spatial_attention.engine.capture import CaptureRequest, capture

    start = time.perf_counter()
    adapter = load_adapter(family, model_path, device=device, dtype=dtype)
    build = time.perf_counter() - start
    geometry = geometry_of(adapter)
    plain, captured, answers = {}, {}, {}
    for size in BATCHES:
        batch = adapter.encode([format_caption(*SAMPLE_CAPTION)] * size,
                               [Image.new("RGB", (256, 256), (200, 200, 200))] * size)
        request = CaptureRequest(layers=list(range(geometry.layers)),
                                 last_mass=[layout.image_positions for layout in batch.layouts])
        with torch.inference_mode():
            plain[str(size)] = _median_seconds(lambda: adapter.model(**batch.inputs)) / size
        captured[str(size)] = _median_seconds(lambda: capture(adapter, batch, request)) / size
        answers.update(answer_seconds(adapter, batch))
    return {"model_path": model_path, "geometry": asdict(geometry), "seconds_per_input": plain,
            "capture_overhead": {k: captured[k] / plain[k] for k in plain},
            "answer_seconds": dict(sorted(answers.items(), key=lambda item: int(item[0]))),
            "build_seconds": round(build, 3),
            "reinit_seconds": round(reinit_seconds(adapter), 3)}


def reinit_seconds(adapter) -> float:
    """Seconds of a control's re-initialisation of ``adapter``'s model in place (``models.base.initialise``)."""
    import torch

    from models.base import initialise

    start = time.perf_counter()
    initialise(adapter.model, 0)
    if adapter.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def answer_seconds(adapter, batch) -> dict[str, float]:
    """Seconds a row of an answer-position rerun of ``batch`` (copied ``ANSWER_TIMES`` over) through every
    language-model layer, by rows per forward; ``bench_capture.py`` reports them too."""
    import torch

    from spatial_attention.engine.prefix import answer_logits, run_prefix

    prefix = run_prefix(adapter, batch, [0], keys_values=True)[0][0]
    synchronise = torch.cuda.synchronize if adapter.device.type == "cuda" else (lambda: None)

    def rerun(times):
        answer_logits(adapter, prefix, times)  # its logits come to the CPU: a GPU's work is done
        synchronise()

    return {str(len(batch) * times): _median_seconds(lambda: rerun(times)) / (len(batch) * times)
            for times in ANSWER_TIMES}


SCRIPT_MODULES = ("models", "spatial_attention.experiments.vlm_analysis", "spatial_attention.experiments.text_analysis",
                  "spatial_attention.experiments.relation_heads", "spatial_attention.experiments.corner_stats",
                  "spatial_attention.experiments.ablation")  # what the study's model scripts import


def import_seconds(modules: tuple[str, ...] = SCRIPT_MODULES) -> float:
    """A script's start here: a fresh Python importing ``modules`` (a model script's: torch, transformers,
    matplotlib and the package come with them)."""
    import subprocess

    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", f"import {', '.join(modules)}"],
                   cwd=Path(__file__).resolve().parents[2], check=True, capture_output=True)
    return time.perf_counter() - start


def model_geometry(family: str, model_path: str) -> tuple[Geometry, str | None]:
    """The geometry of a study's model, without loading a checkpoint: tiny and toy models are built (they are
    small); otherwise the layers and widths come from the checkpoint's config (a local folder's, the hub cache's,
    ``random-7b[:N]``'s, else the family's 7B checkpoint's, which is said) and the tokens from the family's
    tiny-random model, which feeds its pictures at the same size. The second value: what was assumed, or None."""
    from models import TINY_RANDOM, TOY, family_adapter, load_adapter
    from models.base import random_7b_depth

    if model_path in (TINY_RANDOM, TOY):
        return geometry_of(load_adapter(family, model_path, device="cpu", dtype="fp32")), None
    cls, assumed = family_adapter(family), None
    depth = random_7b_depth(model_path)
    config = _checkpoint_config(model_path) if depth is None else None
    if config:
        text, vision = config["text_config"], config["vision_config"]
    else:
        shapes = cls.seven_b(depth or 0)
        text, vision = shapes["text"], shapes["vision"]
        if depth is None and model_path != cls.default_model_path:
            assumed = f"{model_path}: no config here; planned at {family}'s 7B checkpoint's geometry"
    return geometry_of(load_adapter(family, TINY_RANDOM, device="cpu", dtype="fp32"), text, vision), assumed


def _checkpoint_config(model_path: str) -> dict | None:
    """A checkpoint's config.json with both sub-configs: a local folder's or the hub cache's; None without."""
    path = Path(model_path) / "config.json"
    if not path.is_file():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(model_path, "config.json")
        except Exception:  # not a hub id either: its own step will say so
            cached = None
        path = Path(cached) if isinstance(cached, str) else None
    try:
        config = json.loads(path.read_text()) if path else None
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict) or not all(isinstance(config.get(k), dict)
                                               for k in ("text_config", "vision_config")):
        return None
    return config


def measure_here(models: dict[str, str], device: str, dtype: str) -> dict:
    """A calibration of this machine for ``models`` (family -> tiny or toy model path)."""
    import torch

    from models.base import pick_device_and_dtype

    dev, _ = pick_device_and_dtype(device, dtype)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "this machine's CPU"
    return {"format": FORMAT, "device": name, "device_type": dev.type, "dtype": dtype,
            "source": "measured here before the study", "process_seconds": round(import_seconds(), 2),
            "families": {family: measure_family(family, path, device, dtype) for family, path in models.items()}}


def from_gpu_check(summary: dict, source: str) -> dict:
    """A calibration from ``bench/gpu_check.sh``'s summary: per family it timed, the plain forward at batch 1
    and 8 (the capture benchmark), the engine's cost over it, and its build: experiment 1's wall time less its
    forwards and a script's start (the quickest data-generation step, an upper bound on a start)."""
    from spatial_attention.experiments.vlm_analysis import planned_forwards

    steps = {s["step"]: s for s in summary["steps"]}
    starts = [s["seconds"] for name, s in steps.items() if name.startswith("generate") and s["ok"]]
    calibration = {"format": FORMAT, "device": summary.get("gpu") or "CPU", "device_type": summary["device"],
                   "dtype": "bf16" if summary["device"] == "cuda" else "fp32", "source": source,
                   "process_seconds": min(starts) if starts else 0.0, "families": {},
                   "notes": ["seconds_per_input: bench_capture.py's plain forward per input; capture_overhead: its "
                             "engine over plain; answer_seconds: its answer-position reruns, per row",
                             "process_seconds: the quickest data-generation step (a start and some generating: an "
                             "upper bound)", "build_seconds: experiment 1's wall time less its forwards, its work "
                             "outside them (run.json's timing) and process_seconds",
                             "geometry: the model timed (random-7b: the 7B checkpoint's), tokens as the family's "
                             "adapter feeds one caption with a picture, and alone"]}
    batch = 8 if summary["device"] == "cuda" else 1  # the scripts' default
    for family in dict.fromkeys(name.split()[0] for name in steps):
        reports = [summary["reports"].get(f"bench-{family}-b{size}") for size in BATCHES]
        exp1 = next((s for name, s in steps.items() if name.startswith(f"{family} experiment 1,") and s["ok"]), None)
        if not all(reports) or exp1 is None:
            continue
        geometry, _ = model_geometry(family, summary["model_path"])
        plain = {str(size): r["seconds_per_sample"]["plain"] for size, r in zip(BATCHES, reports)}
        entry = {"model_path": summary["model_path"], "geometry": asdict(geometry), "seconds_per_input": plain,
                 "capture_overhead": {str(size): r["seconds_per_sample"]["engine"] / r["seconds_per_sample"]["plain"]
                                      for size, r in zip(BATCHES, reports)},
                 "answer_seconds": {rows: s for r in reports for rows, s in r["answer_seconds"].items()},
                 "build_seconds": 0.0, "reinit_seconds": min(r["reinit_seconds"] for r in reports)}
        timing = summary["reports"].get(f"exp1-{family}")
        if timing:  # its run.json: what the script did after the build
            after_build = timing["forward_seconds"] + timing["other_seconds"]
        else:  # a check from before run.json's timing: its forwards as the plan prices them (an upper bound)
            worlds = int(re.search(r"(\d+) worlds", exp1["step"])[1])
            after_build = sum(forward_seconds(entry, geometry, f) for f in planned_forwards(worlds, batch,
                                                                                             geometry.layers))
        entry["build_seconds"] = round(max(0.0, exp1["seconds"] - calibration["process_seconds"] - after_build), 2)
        calibration["families"][family] = entry
    return calibration
