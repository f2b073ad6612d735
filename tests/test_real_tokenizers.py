"""The paper checkpoints' real tokenizers (../shared/fixtures/tokenizers: vocabularies only) wrapped as the
checkpoints wrap them, held to the reference ids of the fixture's README, and every prompt of every experiment
laid out right with them: the image block, the caption words of all 8 shapes x 7 colours and 4 relations (also in
experiment 2's swapped captions, without an image), the corner words and the answer position of experiment 3, and
the ablation's yes / no tokens. The model behind each is tiny and random (the layout needs no weights) with the
checkpoint's vocabulary size and special-token ids."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import random_images

from models import ADAPTERS
from spatial_attention.data.counterfactual import CORNER_WORDS, CORNERS, corner_prompt
from spatial_attention.data.shapeworld import (COLORS, RELATIONS, SHAPES, counterfactual_caption, format_caption,
                                               parse_caption)
from spatial_attention.experiments.ablation_measure import yes_no_ids

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "tokenizers"
pytestmark = pytest.mark.skipif(not FIXTURES.is_dir(),
                                reason=f"the real tokenizers are not here ({FIXTURES}, shared/fixtures/tokenizers)")

# The fixture README's settings and reference ids.
SETTINGS = {
    "llava": ("llava-1.5-7b-hf", dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"),
              32064, {"image": 32000, "pad": 32001}),
    "qwen2": ("qwen2-vl-7b-instruct", dict(eos_token="<|im_end|>", pad_token="<|endoftext|>"),
              152064, {"image": 151655, "pad": 151643, "vision_start": 151652, "vision_end": 151653}),
}
LONE_SPACE = 29871  # LLaVA's "▁" on both sides of the image token
# Every single token of the real vocabularies that decodes to yes / no (any case, leading whitespace).
YES_NO = {
    "llava": ({"yes", "▁yes", "Yes", "▁Yes", "YES", "▁YES"}, {"no", "▁no", "No", "▁No", "NO", "▁NO"}),
    "qwen2": ({"yes", "Ġyes", "Yes", "ĠYes", "YES", "ĠYES"}, {"no", "Ġno", "No", "ĠNo", "NO", "ĠNO", "ĉno"}),  # ĉ: tab
}


def real_tokenizer(family: str):
    from transformers import PreTrainedTokenizerFast

    folder, special, _, _ = SETTINGS[family]
    return PreTrainedTokenizerFast(tokenizer_file=str(FIXTURES / folder / "tokenizer.json"), **special)


@pytest.fixture(scope="module", params=["llava", "qwen2"])
def real(request):
    """An adapter of ``family`` around the real tokenizer: a tiny random model with the checkpoint's vocabulary."""
    family = request.param
    cls = ADAPTERS[family]
    vocab = SETTINGS[family][2]
    model, processor = cls.build_random(text={"vocab_size": vocab}, tokenizer=real_tokenizer(family))
    return cls(model, processor, "tiny-random with the real tokenizer")


def test_reference_ids():
    llava, qwen2 = real_tokenizer("llava"), real_tokenizer("qwen2")
    assert llava("Hello world!").input_ids == [1, 15043, 3186, 29991]
    assert llava("USER: <image>\n").input_ids == [1, 3148, 1001, 29901, 29871, 32000, 29871, 13]
    assert llava("USER: <image>\nhi ASSISTANT:").input_ids[-5:] == [319, 1799, 9047, 13566, 29901]
    assert qwen2("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n").input_ids == [
        151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198, 151644, 872, 198]
    assert qwen2("<|im_start|>assistant\n").input_ids == [151644, 77091, 198]
    assert llava.tokenize("semicircle pentagon") == ["▁sem", "ic", "irc", "le", "▁pent", "agon"]
    assert qwen2.tokenize(" semicircle pentagon") == ["Ġsem", "ic", "ircle", "Ġpent", "agon"]


def test_the_adapter_uses_the_checkpoint_s_ids(real):
    _, _, vocab, ids = SETTINGS[real.family]
    config = real.model.config
    assert config.image_token_id == ids["image"] and real.tokenizer.pad_token_id == ids["pad"]
    assert real.model.get_input_embeddings().weight.shape[0] == vocab
    if real.family == "qwen2":
        assert config.vision_start_token_id == ids["vision_start"]


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
    """Experiment 1's prompts: 576 image tokens in one run on the 24 x 24 grid (LLaVA's lone "▁" on both sides;
    Qwen2-VL's between vision_start and vision_end), and the span of every shape, colour and relation word
    covers exactly that word, after the image."""
    _, _, _, ids = SETTINGS[real.family]
    captions = _captions()
    assert len(captions) == len(SHAPES) * len(COLORS)
    for start in range(0, len(captions), 14):
        chunk = captions[start:start + 14]
        batch = real.encode(chunk, random_images(len(chunk), seed=start))
        for text, layout in zip(chunk, batch.layouts):
            image = layout.image_positions
            assert layout.grid == (24, 24) and len(image) == 576
            assert np.array_equal(image, np.arange(image[0], image[0] + 576))
            before, after = int(layout.input_ids[image[0] - 1]), int(layout.input_ids[image[-1] + 1])
            if real.family == "llava":
                assert before == after == LONE_SPACE
            else:
                assert (before, after) == (ids["vision_start"], ids["vision_end"])
            caption = parse_caption(text)
            for key, span in caption.spans().items():
                if key.startswith("phrase"):
                    continue
                positions = layout.span_positions(*span)
                assert positions.min() > image[-1]
                assert _word(real, layout, positions) == text[span[0]:span[1]], (key, text)


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
    the assistant turn's opening ("ASSISTANT:" / "<|im_start|>assistant\\n")."""
    prompts = [corner_prompt(corner) for corner in CORNERS]
    batch = real.encode(prompts, random_images(len(prompts), seed=9))
    for corner, layout in zip(CORNERS, batch.layouts):
        for word in CORNER_WORDS[corner].split():
            assert _word(real, layout, layout.word_positions(word)) == word
        last = int(layout.input_ids[layout.last_position])
        assert last == (29901 if real.family == "llava" else 198)  # ":" / "\n"
        assert layout.last_position == layout.length - 1 and layout.last_position > layout.image_positions[-1]
        assert real.tokenizer.decode(layout.input_ids[-5:]).replace(" ", "").endswith(
            "ASSISTANT:" if real.family == "llava" else "assistant\n")


def test_yes_no_tokens_of_the_real_vocabulary(real):
    yes, no = yes_no_ids(real.tokenizer)
    tokens = real.tokenizer.convert_ids_to_tokens
    assert set(tokens(yes)) == YES_NO[real.family][0]
    assert set(tokens(no)) == YES_NO[real.family][1]
