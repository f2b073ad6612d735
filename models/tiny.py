"""Tokenizers for the ``tiny-random`` models, trained offline in about a second.

The real checkpoints cannot be downloaded here, so the tiny models get small
tokenizers of the same kinds: a SentencePiece-style (Metaspace, byte fallback)
BPE like Llama's for LLaVA-1.5, and a byte-level BPE like Qwen2's, both carrying
the real special tokens. They are trained on the study's own vocabulary except
for a few shape words, so that those split into several sub-tokens as they do
in real tokenizers (exercising multi-token word lookup).
"""
from __future__ import annotations

import string

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

_COLORS = ["red", "green", "blue", "yellow", "magenta", "cyan", "gray"]
_SHAPES_IN_VOCAB = ["square", "rectangle", "triangle", "cross", "circle", "ellipse"]
# "semicircle" and "pentagon" stay out of the training text: they split into pieces.
_CORPUS_LINES = [
    "there are two shapes a {c} {s} and a {c} {s} . what is the spatial relationship from the first shape "
    "to the second shape ? the spatial relation is {r} .",
    "Is there anything in the {r} corner ? Yes No yes no",
    "USER : ASSISTANT : You are a helpful assistant . system user assistant",
]


def _corpus() -> list[str]:
    lines = []
    for c in _COLORS:
        for s in _SHAPES_IN_VOCAB:
            for r in ["left", "right", "above", "below", "top", "bottom"]:
                lines += [line.format(c=c, s=s, r=r) for line in _CORPUS_LINES]
    return lines


def _train(tok: Tokenizer, vocab_size: int, specials: list[str], alphabet: list[str]) -> None:
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet,
                                  show_progress=False)
    tok.train_from_iterator(_corpus(), trainer)


def llama_style_tokenizer(extra_special: list[str]) -> PreTrainedTokenizerFast:
    """A Llama-like tokenizer: Metaspace pre-tokenisation, byte fallback, <s> prefix."""
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=True)
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first", split=True)
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    _train(tok, 600, ["<unk>", "<s>", "</s>"] + byte_tokens, list(string.printable.strip()) + ["\u2581"])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in extra_special])
    from tokenizers import processors

    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>" if "<pad>" in extra_special else None)


def byte_level_tokenizer(specials: list[str], pad_token: str, eos_token: str, chat_template: str,
                         **named_tokens: str) -> PreTrainedTokenizerFast:
    """A Qwen2-like byte-level BPE tokenizer with the given special tokens and chat template; ``named_tokens``
    become attributes (``tokenizer.NAME``, ``tokenizer.NAME_id``) as a checkpoint's ``extra_special_tokens``."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    _train(tok, 600, [], pre_tokenizers.ByteLevel.alphabet())
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=pad_token, eos_token=eos_token,
                                   chat_template=chat_template, extra_special_tokens=named_tokens or None)
