"""The interface every model adapter offers, and the token layout of one input.

An adapter hides what differs between model families: how a checkpoint is
loaded, how a prompt is built, where the image tokens sit and how they map to an
image grid, and where the attention modules live. Everything downstream (the
capture engine, the experiments, the metrics) talks only to this interface.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from models.hub import hub_unreachable, is_cached
from spatial_attention.common.errors import OptionError, quote

log = logging.getLogger(__name__)

TINY_RANDOM = "tiny-random"
# --model-path random-7b[:N]: the family's 7B checkpoint's config (SEVEN_B_TEXT / SEVEN_B_VISION) with random weights,
# built offline; with :N only the first N language-model layers and N vision layers
RANDOM_7B = "random-7b"


def random_7b_depth(model_path: str) -> int | None:
    """N of ``random-7b:N`` (0 for the full depth of ``random-7b``); None for any other --model-path; OptionError
    for a malformed N."""
    name, colon, depth = str(model_path).partition(":")
    if name != RANDOM_7B:
        return None
    if not colon:
        return 0
    if not depth.isdigit() or int(depth) < 1:
        raise OptionError(f"--model-path {model_path}: random-7b:N needs a whole number of layers N >= 1 "
                          "(e.g. random-7b:2), or random-7b for the full depth")
    return int(depth)


def is_random(model_path: str) -> bool:
    """Whether ``model_path`` names a random-weight model built offline (tiny-random, random-7b[:N]): its
    weights are drawn with --seed."""
    return model_path == TINY_RANDOM or random_7b_depth(model_path) is not None
TOY = "toy"  # --model-path toy: the family's committed toy (models/toy/{family}, train_toy_vlm.py)
TOY_ROOT = Path(__file__).parent / "toy"


@dataclass
class TokenLayout:
    """Where things are in one (unpadded) input sequence.

    Positions index the padded batch row; the batch is right-padded, so position
    0 is the first real token and ``length - 1`` the last one.
    """

    input_ids: np.ndarray  # (length,) the real tokens only
    offsets: np.ndarray  # (length, 2) character span of each token in ``prompt`` (expanded)
    prompt: str  # the prompt string as tokenised (image placeholders expanded)
    text_start: int  # character offset of the user text inside ``prompt``
    text: str  # the user text
    image_positions: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    grid: tuple[int, int] | None = None  # image-token grid (gh, gw), raster order

    @property
    def length(self) -> int:
        return int(len(self.input_ids))

    @property
    def last_position(self) -> int:
        """The position whose output predicts the answer's first token."""
        return self.length - 1

    def text_positions(self) -> np.ndarray:
        """Token positions covering the user text (the caption)."""
        return self.span_positions(0, len(self.text))

    def span_positions(self, start: int, end: int) -> np.ndarray:
        """Token positions overlapping characters [start, end) of the user text.

        Works from the tokenizer's character offsets, so a word split into
        several sub-tokens yields all of them, for SentencePiece and byte-level
        BPE alike. Raises if no token covers the span.
        """
        lo, hi = self.text_start + start, self.text_start + end
        tok_lo, tok_hi = self.offsets[:, 0], self.offsets[:, 1]
        hit = (tok_hi > lo) & (tok_lo < hi) & (tok_hi > tok_lo)
        positions = np.flatnonzero(hit)
        if positions.size == 0:
            raise ValueError(f"no token covers characters {start}:{end} ({quote(self.text[start:end])}) of "
                             f"{quote(self.text)}")
        return positions

    def word_positions(self, word: str, occurrence: int = 0) -> np.ndarray:
        """Token positions of the ``occurrence``-th whole-word match of ``word`` in the user text."""
        start = -1
        for _ in range(occurrence + 1):
            start = _find_word(self.text, word, start + 1)
            if start < 0:
                raise ValueError(f"word {quote(word)} (occurrence {occurrence}) not in {quote(self.text)}")
        return self.span_positions(start, start + len(word))


def _find_word(text: str, word: str, begin: int) -> int:
    """Index of the next whole-word occurrence of ``word`` at or after ``begin``, or -1."""
    i = text.find(word, begin)
    while i >= 0:
        before = text[i - 1] if i > 0 else " "
        after = text[i + len(word)] if i + len(word) < len(text) else " "
        if not before.isalnum() and not after.isalnum():
            return i
        i = text.find(word, i + 1)
    return -1


@dataclass
class Batch:
    """Model inputs for several samples (right-padded) and each sample's layout."""

    inputs: dict  # processor output, tensors on the model's device
    layouts: list[TokenLayout]

    def __len__(self) -> int:
        return len(self.layouts)


def centre_square(image: Image.Image, side: int) -> Image.Image:
    """The shortest edge resized to ``side`` and the centre ``side`` x ``side`` cropped, as CLIP-style processors
    do, so that what is fed (and patch-shuffled) is exactly this image."""
    image = image.convert("RGB")
    w, h = image.size
    scale = side / min(w, h)
    image = image.resize((max(side, round(w * scale)), max(side, round(h * scale))), Image.BICUBIC)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    return image.crop((left, top, left + side, top + side))


CONTROL_INITIALISATION = "transformers' init_weights, seeded, where the model runs"  # the identity's record


def initialise(model, seed: int) -> None:
    """Draw every weight of ``model`` anew, where it is, with transformers' own initialisation (each module's
    ``_init_weights``, in module order) from torch seed ``seed``: the random-weights control's weights, the same
    whether the model was just built or is re-initialised in place."""
    for item in [*model.modules(), *model.parameters(), *model.buffers()]:
        if getattr(item, "_is_hf_initialized", False):
            item._is_hf_initialized = False  # else init_weights leaves it as it is
    torch.manual_seed(seed)
    model.init_weights()


def pick_device_and_dtype(device: str | None, dtype: str | None) -> tuple[torch.device, torch.dtype]:
    """Default: the GPU in bf16 when there is one, else the CPU in fp32."""
    if device is None or device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dtype is None or dtype == "auto":
        return dev, (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    names = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
             "fp32": torch.float32, "float32": torch.float32}
    if dtype not in names:
        raise OptionError(f"--dtype {dtype!r} is not one of auto, bf16, fp16, fp32")
    return dev, names[dtype]


def model_load_error(model_path: str, family: str, why: Exception | str) -> OptionError:
    """One line that says the model could not be loaded and what to do."""
    where = "local folder" if Path(model_path).exists() else "hub id (not in the local cache and the hub not reachable?)"
    if isinstance(why, Exception):
        why = f"{type(why).__name__}: {str(why).splitlines()[0] if str(why) else ''}"
    return OptionError(
        f"--model-path {model_path!r}: cannot load a {family} checkpoint from this {where}: {why} -- pass a "
        f"downloaded checkpoint folder with --model-path, or --model-path {TINY_RANDOM} for a random-weight smoke run")


class VLMAdapter:
    """One model family behind one small interface (see the module docstring).

    Subclasses set ``family``, ``default_model_path`` and implement the methods
    that raise ``NotImplementedError``.
    """

    family: str = ""
    default_model_path: str = ""
    # the layers the paper averaged for experiment 1 (a --layers mode)
    paper_layers: str = "all"
    # the (height, width) images are fed at, where the family lets it be chosen
    feed_size: tuple[int, int] | None = None
    # the square side --feed-size defaults to; None where the family fixes the input size
    default_feed_size: int | None = None
    # vision_feature_layer-style index of the last vision layer whose output the
    # language model sees (-1: all layers; LLaVA-1.5 uses -2).
    vision_select_layer: int = -1

    def __init__(self, model, processor, model_path: str, revision: str | None = None):
        self.model = model.eval()
        self.processor = processor
        self.model_path = model_path
        self.revision = revision
        self.tokenizer = processor.tokenizer
        self.tokenizer.padding_side = "right"

    # -- loading -----------------------------------------------------------
    @classmethod
    def resolve_model_path(cls, model_path: str | None) -> str:
        """``model_path``, the family's default checkpoint for None, the toy's folder for ``toy``
        (OptionError where it has not been trained)."""
        model_path = model_path or cls.default_model_path
        if model_path != TOY:
            return model_path
        folder = TOY_ROOT / cls.family
        if not (folder / "config.json").is_file():
            raise OptionError(f"--model-path toy: no toy {cls.family} model in {folder}; train it with "
                              f"python train_toy_vlm.py --model {cls.family}")
        return str(folder)

    @classmethod
    def checkpoint_feed_size(cls, model_path: str) -> int | None:
        """The square side images are fed at when --feed-size is not given (None: fixed by the family),
        known before the model loads."""
        return cls.default_feed_size

    _control: tuple | None = None  # (what it is, model, processor): the last control's model, kept for the next

    @classmethod
    def load(cls, model_path: str | None = None, device: str | None = None, dtype: str | None = None,
             device_map: str | None = None, revision: str | None = None, seed: int = 0,
             random_init_seed: int | None = None) -> "VLMAdapter":
        """Load from a hub id or local folder, or build ``tiny-random`` or ``random-7b[:N]`` offline.

        ``random_init_seed``: the random-weights control: the checkpoint's architecture (its config), processor
        and tokenizer, but weights initialised with this seed instead of loaded (no weight file is read), by
        ``initialise``. The process keeps that model: the next control load of the same checkpoint, device and
        dtype re-initialises it in place instead of building another (the same weights either way)."""
        model_path = cls.resolve_model_path(model_path)
        dev, torch_dtype = pick_device_and_dtype(device, dtype)
        if random_init_seed is None:
            VLMAdapter._control = None  # no control's model kept beside another model
            return cls._build(model_path, dev, torch_dtype, device_map, revision, seed)
        what = (cls, model_path, dev, torch_dtype, revision)
        if VLMAdapter._control is None or VLMAdapter._control[0] != what:
            VLMAdapter._control = None  # freed before the next is built
            adapter = cls._build(model_path, dev, torch_dtype, None, revision, random_init_seed, control=True)
            VLMAdapter._control = (what, adapter.model, adapter.processor)
        _, model, processor = VLMAdapter._control
        initialise(model, random_init_seed)
        return cls(model, processor, model_path, revision)

    @classmethod
    def _build(cls, model_path: str, dev: torch.device, torch_dtype: torch.dtype, device_map: str | None,
               revision: str | None, seed: int, control: bool = False) -> "VLMAdapter":
        """``load``'s model: built (random models, with ``seed``; a control, from the checkpoint's config) or read."""
        if is_random(model_path):
            torch.manual_seed(seed)
            depth = random_7b_depth(model_path)
            if depth is None:  # tiny-random: drawn on the CPU, the same weights on every device (not a control's)
                model, processor = cls.build_random()
            else:  # drawn where it runs and in its dtype: a 7B model is not built on the CPU, nor in fp32, first
                with torch.device(dev):
                    model, processor = cls.build_random(**cls.seven_b(depth), dtype=torch_dtype)
            model = model.to(device=dev, dtype=torch_dtype)
            return cls(model, processor, model_path)
        from transformers import AutoModelForImageTextToText, AutoProcessor

        offline = False  # a cached checkpoint loads without the hub's retries when the hub is unreachable
        if not Path(model_path).exists():
            unreachable = hub_unreachable()
            if unreachable and not is_cached(model_path, revision):
                raise model_load_error(model_path, cls.family, f"the hub cannot be reached: {unreachable}")
            offline = bool(unreachable)
        kwargs = dict(dtype=torch_dtype, attn_implementation=_registered_attention(), revision=revision,
                      local_files_only=offline)
        try:
            processor = AutoProcessor.from_pretrained(model_path, revision=revision, local_files_only=offline)
            if control:
                from transformers import AutoConfig

                config = AutoConfig.from_pretrained(model_path, revision=revision, local_files_only=offline)
                with torch.device(dev):  # initialised where it runs: a 7B model is not built on the CPU first
                    model = AutoModelForImageTextToText.from_config(
                        config, dtype=torch_dtype, attn_implementation=_registered_attention())
            elif device_map:
                model = AutoModelForImageTextToText.from_pretrained(model_path, device_map=device_map, **kwargs)
            else:
                model = AutoModelForImageTextToText.from_pretrained(model_path, **kwargs).to(dev)
        except (OSError, ValueError) as exc:
            raise model_load_error(model_path, cls.family, exc) from None
        return cls(model, processor, model_path, revision)

    # The 7B checkpoint's language-model and vision-encoder configs (models.md), for random-7b and the benchmark.
    SEVEN_B_TEXT: dict = {}
    SEVEN_B_VISION: dict = {}
    VISION_DEPTH_KEY = "num_hidden_layers"  # the vision config's name for its number of layers

    @classmethod
    def seven_b(cls, depth: int = 0) -> dict:
        """``build_random``'s arguments for the 7B checkpoint's geometry, its first ``depth`` language-model and
        vision layers (0: all)."""
        text, vision = dict(cls.SEVEN_B_TEXT), dict(cls.SEVEN_B_VISION)
        if depth:
            text["num_hidden_layers"] = min(depth, text["num_hidden_layers"])
            vision[cls.VISION_DEPTH_KEY] = min(depth, vision[cls.VISION_DEPTH_KEY])
        return {"text": text, "vision": vision}

    @classmethod
    def build_random(cls, text: dict | None = None, vision: dict | None = None, image_side: int | None = None,
                     tokenizer=None, dtype: torch.dtype | None = None):
        """A random-weight model of the real architecture and its processor, built offline (in ``dtype``; default
        fp32).

        With no arguments: the ``tiny-random`` shapes. ``text`` / ``vision``
        override entries of the language-model / vision-encoder configs;
        ``image_side``: the largest square side images are fed at (the family's own by default);
        ``tokenizer``: the one to use (the checkpoint's, with its special tokens) instead of the tiny one
        trained here.
        """
        raise NotImplementedError

    # -- structure ---------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype

    def language_model(self) -> torch.nn.Module:
        """The decoder: its layers, final norm, and the forward that runs them."""
        return self.model.model.language_model

    def lm_layers(self) -> torch.nn.ModuleList:
        """The language model's decoder layers, in order."""
        return self.language_model().layers

    def after_layer(self, index: int, hidden: torch.Tensor, lm_inputs: dict, times: int) -> torch.Tensor:
        """What the language model's forward adds to layer ``index``'s output before the next layer reads it, for a
        rerun of the layers alone (``engine/prefix.py``): ``lm_inputs`` are the keyword arguments the language model
        was called with, ``hidden`` holds that batch ``times`` over. Here nothing: the layers follow each other."""
        return hidden

    def lm_attention_modules(self) -> list[torch.nn.Module]:
        return [layer.self_attn for layer in self.lm_layers()]

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits of the last decoder layer's output ``hidden`` (..., D): final norm, then the LM head."""
        return self.model.lm_head(self.language_model().norm(hidden))

    def vision_attention_modules(self) -> list[torch.nn.Module]:
        raise NotImplementedError

    @property
    def num_layers(self) -> int:
        return len(self.lm_attention_modules())

    @property
    def num_heads(self) -> int:
        return self.model.config.text_config.num_attention_heads

    def vision_map_layers(self) -> list[int]:
        """Vision layers averaged into the encoder's self-attention map: 0 .. L + select_layer."""
        n = len(self.vision_attention_modules())
        return list(range(n + self.vision_select_layer + 1))

    # -- inputs ------------------------------------------------------------
    def image_prompt(self, text: str) -> str:
        """The model's prompt for one image followed by ``text`` (one image placeholder): the processor's chat
        template, unless the family has a fixed format (LLaVA-1.5)."""
        return self.chat_prompt(text, image=True)

    def text_prompt(self, text: str) -> str:
        """The model's prompt for ``text`` alone, no image."""
        return self.chat_prompt(text, image=False)

    def prepare_image(self, image: Image.Image) -> Image.Image:
        """The image as the model will be fed it (Qwen2-VL resizes to the feed size)."""
        return image.convert("RGB")

    def feed_image(self, prepared: Image.Image) -> Image.Image:
        """What the processor is given for a prepared image: the image itself, unless the family's encoder needs
        it framed (LLaVA-OneVision)."""
        return prepared

    def chat_prompt(self, text: str, image: bool) -> str:
        """The prompt of the processor's chat template for one user turn: ``text``, after one image if
        ``image``, and the assistant's turn opened."""
        content = [{"type": "image"}] * image + [{"type": "text", "text": text}]
        return self.processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                  add_generation_prompt=True)

    @classmethod
    def check_feed_size(cls, size: int) -> None:
        """OptionError for a --feed-size this family cannot use as given (checked before loading);
        families whose size is fixed (LLaVA-1.5: 336) ignore the option."""

    def set_feed_size(self, feed_size: int | tuple[int, int]) -> None:
        """Choose the input image size; families whose size is fixed (LLaVA-1.5: 336) ignore it."""

    def image_grid(self, inputs: dict, index: int) -> tuple[int, int]:
        """The image-token grid (gh, gw) of sample ``index`` of processor output ``inputs``."""
        raise NotImplementedError

    def token_grid(self, prepared: Image.Image) -> tuple[int, int]:
        """The image-token grid (gh, gw) an image from ``prepare_image`` will get."""
        raise NotImplementedError

    def encode(self, texts: list[str], images: list[Image.Image] | None = None) -> Batch:
        """Tokenise a batch (right padding) and work out each sample's layout."""
        if images is not None and len(images) != len(texts):
            raise ValueError("encode: one image per text")
        prompts = [self.image_prompt(t) if images is not None else self.text_prompt(t) for t in texts]
        # right padding said at each call: a processor's own default (InternVL's: left) would override the tokenizer's
        kwargs = dict(text=prompts, return_tensors="pt", padding=True, padding_side="right",
                      return_offsets_mapping=True)
        prepared = [self.prepare_image(im) for im in images] if images is not None else None
        if images is not None:
            kwargs["images"] = [self.feed_image(picture) for picture in prepared]
            inputs = self.processor(**kwargs)
        else:
            inputs = self.tokenizer(**kwargs)
            inputs.pop("token_type_ids", None)
        offsets = inputs.pop("offset_mapping").numpy()
        image_token_id = self.model.config.image_token_id
        layouts = []
        for b, (prompt, text) in enumerate(zip(prompts, texts)):
            length = int(inputs["attention_mask"][b].sum())
            ids = inputs["input_ids"][b, :length].numpy()
            if int(inputs["attention_mask"][b, :length].min()) != 1:
                raise RuntimeError("encode expects right padding")
            image_tokens = np.flatnonzero(ids == image_token_id)
            expanded = self._expanded_prompt(prompt, len(image_tokens))
            text_start = expanded.rindex(text)
            grid = self.image_grid(inputs, b) if images is not None else None
            image_positions = self.grid_positions(image_tokens, grid) if grid is not None else image_tokens
            if grid is not None and (grid[0] * grid[1] != len(image_positions) or grid != self.token_grid(prepared[b])):
                raise RuntimeError(f"image grid {grid} does not match {len(image_positions)} image tokens or the "
                                   f"{self.token_grid(prepared[b])} of its prepared picture (resized by the processor?)")
            layouts.append(TokenLayout(ids, offsets[b, :length], expanded, text_start, text, image_positions, grid))
        inputs = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        return Batch(inputs, layouts)

    def _expanded_prompt(self, prompt: str, n_image_tokens: int) -> str:
        """The prompt with its image placeholder repeated as the processor expands it."""
        token = getattr(self.processor, "image_token", None)
        if n_image_tokens == 0 or token is None:
            return prompt
        return prompt.replace(token, token * n_image_tokens, 1)

    def grid_positions(self, image_positions: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
        """The positions of the analysed image-token grid (raster order) among an input's image tokens: all of
        them, unless the family writes other image tokens too (LLaVA-OneVision's crops and newlines)."""
        return image_positions

    # -- vision encoder maps -----------------------------------------------
    def vision_views(self, inputs: dict) -> list[int]:
        """For each image the vision encoder runs on a batch (in the order it runs them, across its calls), the
        sample whose analysed view it is, or -1 for another view (LLaVA-OneVision's crops): one view per
        sample unless a family feeds more."""
        return list(range(len(inputs["input_ids"])))

    def vision_query_rows(self, cells: np.ndarray) -> np.ndarray:
        """The vision-encoder token rows (within one image's call) of image-token grid ``cells`` (raster), in the
        order ``vision_to_grid`` reads them."""
        raise NotImplementedError

    def vision_to_grid(self, rows: torch.Tensor) -> torch.Tensor:
        """One image's head-mean vision self-attention rows ``vision_query_rows(cells)`` (R, N) -> (len(cells),
        gh*gw) on the image-token grid, raster order, rows renormalised: CLS dropped (LLaVA) or a merged cell's
        patches pooled (Qwen2-VL)."""
        raise NotImplementedError

    # -- bookkeeping ---------------------------------------------------------
    def describe(self) -> dict:
        """What run.json records about the model."""
        cfg = self.model.config
        return {"family": self.family, "model_path": self.model_path, "revision": self.revision,
                "commit_hash": getattr(cfg, "_commit_hash", None), "dtype": str(self.dtype).replace("torch.", ""),
                "device": str(self.device), "num_layers": self.num_layers, "num_heads": self.num_heads,
                "vision_layers": len(self.vision_attention_modules())}


def _registered_attention() -> str:
    """The attention implementation name under which the capture engine runs."""
    from spatial_attention.engine.capture import ATTENTION_NAME, register

    register()
    return ATTENTION_NAME
