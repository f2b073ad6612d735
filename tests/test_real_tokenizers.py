"""The checkpoints' real tokenizers (../shared/fixtures/tokenizers: vocabularies only) wrapped as the checkpoints
wrap them, held to the reference ids of the fixture's README, and every prompt of every experiment laid out right
with them: the adapter's prompt, the image block and its framing tokens, the caption words of all 8 shapes x 7
colours and 4 relations (also in experiment 2's swapped captions, without an image), the corner words and the answer
position of experiment 3, and the ablation's yes / no tokens. The model behind each is tiny and random (the layout
needs no weights) with the checkpoint's vocabulary size and special-token ids."""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
from conftest import random_images

from models import ADAPTERS
from models.internvl3 import NAMED_TOKENS
from spatial_attention.data.counterfactual import CORNER_WORDS, CORNERS, corner_prompt
from spatial_attention.data.shapeworld import (COLORS, RELATIONS, SHAPES, counterfactual_caption, format_caption,
                                               parse_caption)
from spatial_attention.experiments.ablation_measure import yes_no_ids

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "tokenizers"
pytestmark = pytest.mark.skipif(not FIXTURES.is_dir(),
                                reason=f"the real tokenizers are not here ({FIXTURES}, shared/fixtures/tokenizers)")

LLAMA_SPECIAL = dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>")
QWEN_SPECIAL = dict(eos_token="<|im_end|>", pad_token="<|endoftext|>")
# The fixture README's settings and special ids: folder, the tokenizer's special tokens, the model's vocabulary
# (the 7B config's), and the ids of the image token, pad, eos and the tokens either side of the image block (LLaVA's
# and Mistral's lone "▁", Qwen's vision_start / vision_end, InternVL's <img> / </img>).
SETTINGS = {
    "llava": ("llava-1.5-7b-hf", LLAMA_SPECIAL, 32064,
              {"image": 32000, "pad": 32001, "eos": 2, "start": 29871, "end": 29871}),
    "qwen2": ("qwen2-vl-7b-instruct", QWEN_SPECIAL, 152064,
              {"image": 151655, "pad": 151643, "eos": 151645, "start": 151652, "end": 151653}),
    "llava_next": ("llava-v1.6-mistral-7b-hf", LLAMA_SPECIAL, 32064,
                   {"image": 32000, "pad": 32001, "eos": 2, "start": 28705, "end": 28705}),
    "internvl3": ("internvl3-8b-hf", {**QWEN_SPECIAL, "extra_special_tokens": NAMED_TOKENS}, 151674,
                  {"image": 151667, "pad": 151643, "eos": 151645, "start": 151665, "end": 151666}),
    "qwen3vl": ("qwen3-vl-8b-instruct", QWEN_SPECIAL, 151936,
                {"image": 151655, "pad": 151643, "eos": 151645, "start": 151652, "end": 151653}),
}
FAMILIES = list(SETTINGS)
# The README's reference encodings: (family, text, ids); a "..." stands for any ids.
REFERENCE_IDS = [
    ("llava", "Hello world!", [1, 15043, 3186, 29991]),
    ("llava", "USER: <image>\n", [1, 3148, 1001, 29901, 29871, 32000, 29871, 13]),
    ("llava", "USER: <image>\nhi ASSISTANT:", [..., 319, 1799, 9047, 13566, 29901]),
    ("qwen2", "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n",
     [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198, 151644, 872, 198]),
    ("qwen2", "<|im_start|>assistant\n", [151644, 77091, 198]),
    ("llava_next", "Hello world!", [1, 22557, 1526, 28808]),
    *[(family, "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
               "<|vision_start|><|image_pad|><|image_pad|>",
       [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198, 151644, 872, 198, 151652, 151655, 151655])
      for family in ("qwen3vl", "internvl3")],
    ("internvl3", "<img><IMG_CONTEXT><IMG_CONTEXT></img>", [151665, 151667, 151667, 151666]),
]
# The shape words that split into several tokens (README)
SPLITS = {"llava": ("semicircle pentagon", ["▁sem", "ic", "irc", "le", "▁pent", "agon"]),
          "qwen2": (" semicircle pentagon", ["Ġsem", "ic", "ircle", "Ġpent", "agon"]),
          "llava_next": ("semicircle pentagon", ["▁sem", "ic", "ir", "cle", "▁pent", "agon"])}
SPLITS["internvl3"] = SPLITS["qwen3vl"] = SPLITS["qwen2"]  # the same BPE
# The adapter's image prompt of a text, tokenised: the README's ids around it ("...": the text's own ids). Qwen3-VL
# and InternVL3 open no system turn; "<|im_end|>\n" and "<|im_start|>assistant\n" are the README's Qwen ids.
PROMPT_IDS = {
    "llava": ("hi", [1, 3148, 1001, 29901, 29871, 32000, 29871, 13, ..., 319, 1799, 9047, 13566, 29901]),
    "qwen2": ("hi", [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198, 151644, 872, 198, 151652,
                     151655, 151653, ..., 151645, 198, 151644, 77091, 198]),
    "llava_next": ("What is shown in this image?", [1, 733, 16289, 28793, 28705, 32000, 28705, 13, 3195, 349, 4894,
                                                    297, 456, 3469, 28804, 733, 28748, 16289, 28793]),
    "internvl3": ("hi", [151644, 872, 198, 151667, 198, ..., 151645, 198, 151644, 77091, 198]),
    "qwen3vl": ("hi", [151644, 872, 198, 151652, 151655, 151653, ..., 151645, 198, 151644, 77091, 198]),
}
# How each prompt ends, the assistant's turn opened (its last token is the answer position's)
OPENING = {"llava": ("ASSISTANT:", 29901), "qwen2": ("assistant\n", 198), "llava_next": ("[/INST]", 28793),
           "internvl3": ("assistant\n", 198), "qwen3vl": ("assistant\n", 198)}
GRID_SIDE = {"internvl3": 16}  # InternVL3's one 448-px tile; the others 24 x 24
# Every single token of the real vocabularies that decodes to yes / no (any case, leading whitespace).
QWEN_YES_NO = ({"yes", "Ġyes", "Yes", "ĠYes", "YES", "ĠYES"}, {"no", "Ġno", "No", "ĠNo", "NO", "ĠNO", "ĉno"})  # ĉ: tab
YES_NO = {
    "llava": ({"yes", "▁yes", "Yes", "▁Yes", "YES", "▁YES"}, {"no", "▁no", "No", "▁No", "NO", "▁NO"}),
    "qwen2": QWEN_YES_NO,
    "llava_next": ({"yes", "▁yes", "Yes", "▁Yes"}, {"no", "▁no", "No", "▁No", "NO", "▁NO"}),
    "internvl3": QWEN_YES_NO,
    "qwen3vl": QWEN_YES_NO,
}


@functools.lru_cache(maxsize=None)
def real_tokenizer(family: str):
    from transformers import PreTrainedTokenizerFast

    folder, special, _, _ = SETTINGS[family]
    return PreTrainedTokenizerFast(tokenizer_file=str(FIXTURES / folder / "tokenizer.json"), **special)


def matches(ids: list[int], pattern: list) -> bool:
    """Whether ``ids`` is ``pattern``, where one ``...`` in it stands for any ids."""
    if ... not in pattern:
        return ids == pattern
    cut = pattern.index(...)
    head, tail = pattern[:cut], pattern[cut + 1:]
    return len(ids) >= len(head) + len(tail) and ids[:cut] == head and ids[len(ids) - len(tail):] == tail


@pytest.fixture(scope="module", params=FAMILIES)
def real(request):
    """An adapter of ``family`` around the real tokenizer: a tiny random model with the checkpoint's vocabulary."""
    family = request.param
    cls = ADAPTERS[family]
    vocab = SETTINGS[family][2]
    model, processor = cls.build_random(text={"vocab_size": vocab}, tokenizer=real_tokenizer(family))
    return cls(model, processor, "tiny-random with the real tokenizer")


@pytest.mark.parametrize("family, text, ids", REFERENCE_IDS)
def test_reference_ids(family, text, ids):
    assert matches(real_tokenizer(family)(text).input_ids, ids)


@pytest.mark.parametrize("family", FAMILIES)
def test_shape_words_split(family):
    text, tokens = SPLITS[family]
    assert real_tokenizer(family).tokenize(text) == tokens


def test_the_adapter_uses_the_checkpoint_s_ids(real):
    _, _, vocab, ids = SETTINGS[real.family]
    config = real.model.config
    assert config.image_token_id == ids["image"] and real.tokenizer.pad_token_id == ids["pad"]
    assert real.tokenizer.eos_token_id == config.text_config.eos_token_id == ids["eos"]
    assert real.model.get_input_embeddings().weight.shape[0] == vocab
    if real.family in ("qwen2", "qwen3vl"):
        assert (config.vision_start_token_id, config.vision_end_token_id) == (ids["start"], ids["end"])
    if real.family == "internvl3":
        assert (real.processor.start_image_token_id, real.processor.end_image_token_id) == (ids["start"], ids["end"])


def test_the_adapter_s_prompt_gives_the_reference_ids(real):
    """The prompt the adapter builds (the family's chat template, or LLaVA-1.5's fixed format), tokenised by the
    real vocabulary, before the processor expands its image placeholder."""
    text, ids = PROMPT_IDS[real.family]
    prompt = real.image_prompt(text)
    assert matches(real.tokenizer(prompt).input_ids, ids), prompt
    if real.family == "llava_next":  # as the published conversion asserts of the decoded prompt
        assert real.tokenizer.decode(real.tokenizer(prompt).input_ids, skip_special_tokens=True) == (
            "[INST]  \nWhat is shown in this image? [/INST]")


def _word(real, layout, positions) -> str:
    """The text of tokens ``positions``, their word-start markers dropped."""
    tokens = real.tokenizer.convert_ids_to_tokens([int(i) for i in layout.input_ids[positions]])
    return "".join(tokens).replace("▁", "").replace("Ġ", "")


def _captions() -> list[str]:
    """Every shape in every colour as mention 1 and, shifted, as mention 2, with every relation."""
    shapes, colours = list(SHAPES), list(COLORS)
    out = []
    for i, (shape, colour) in enumerate((s, c) for s in shapes for c in colours):
        other_shape, other_colour = shapes[(i + 3) % len(shapes)], colours[(i + 2) % len(colours)]
        out.append(format_caption(colour, shape, other_colour, other_shape, RELATIONS[i % len(RELATIONS)]))
    return out


def test_image_block_and_every_caption_word(real):
    """Experiment 1's prompts: the analysed grid's image tokens (24 x 24; InternVL3's 16 x 16) in one run, the first
    image tokens; all the image tokens (LLaVA-NeXT's crops after its base view) in one run between the
    checkpoint's framing tokens; and the span of every shape, colour and relation word covers exactly that word,
    after the image."""
    _, _, _, ids = SETTINGS[real.family]
    side = GRID_SIDE.get(real.family, 24)
    captions = _captions()
    assert len(captions) == len(SHAPES) * len(COLORS)
    for start in range(0, len(captions), 14):
        chunk = captions[start:start + 14]
        batch = real.encode(chunk, random_images(len(chunk), seed=start))
        for text, layout in zip(chunk, batch.layouts):
            image = layout.image_positions
            assert layout.grid == (side, side) and np.array_equal(image, np.arange(image[0], image[0] + side * side))
            every = np.flatnonzero(layout.input_ids == ids["image"])
            assert every[0] == image[0] and np.array_equal(every, np.arange(every[0], every[-1] + 1))
            before, after = int(layout.input_ids[every[0] - 1]), int(layout.input_ids[every[-1] + 1])
            assert (before, after) == (ids["start"], ids["end"])
            caption = parse_caption(text)
            for key, span in caption.spans().items():
                if key.startswith("phrase"):
                    continue
                positions = layout.span_positions(*span)
                assert positions.min() > every[-1]
                assert _word(real, layout, positions) == text[span[0]:span[1]], (key, text)
                if text[span[0]:span[1]] in ("semicircle", "pentagon"):
                    assert len(positions) > 1  # a word of several tokens, all of them


def test_swapped_captions_without_an_image(real):
    """Experiment 2: the relation word and both shape words in every original and entity-swapped caption, text
    only."""
    captions = [parse_caption(t) for t in _captions()]
    sentences = captions + [counterfactual_caption(c) for c in captions]
    batch = real.encode([s.text for s in sentences])
    for sentence, layout in zip(sentences, batch.layouts):
        assert len(layout.image_positions) == 0
        spans = sentence.spans()
        for key in ("relation", "shape1", "shape2"):
            assert _word(real, layout, layout.span_positions(*spans[key])) == sentence.text[slice(*spans[key])]


def test_corner_prompts_and_the_answer_position(real):
    """Experiment 3: each corner's words are found, and the answer position is the prompt's last token, the end of
    the assistant turn's opening ("ASSISTANT:", "[/INST]", "<|im_start|>assistant\\n")."""
    opening, last = OPENING[real.family]
    prompts = [corner_prompt(corner) for corner in CORNERS]
    batch = real.encode(prompts, random_images(len(prompts), seed=9))
    for corner, layout in zip(CORNERS, batch.layouts):
        for word in CORNER_WORDS[corner].split():
            assert _word(real, layout, layout.word_positions(word)) == word
        assert int(layout.input_ids[layout.last_position]) == last
        assert layout.last_position == layout.length - 1 and layout.last_position > layout.image_positions[-1]
        assert real.tokenizer.decode(layout.input_ids[-5:]).replace(" ", "").endswith(opening)


def test_yes_no_tokens_of_the_real_vocabulary(real):
    yes, no = yes_no_ids(real.tokenizer)
    tokens = real.tokenizer.convert_ids_to_tokens
    assert set(tokens(yes)) == YES_NO[real.family][0]
    assert set(tokens(no)) == YES_NO[real.family][1]
