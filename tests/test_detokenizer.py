"""Incremental detokenization with the real SmolLM2 (byte-level BPE) tokenizer."""

import pytest

from jaxinfer.detokenizer import IncrementalDetokenizer
from jaxinfer.tokenizer import Tokenizer

TEXTS = [
    "你好，世界！今天的天气很好，我们去公园散步吧。",
    "Hello world, how are you?  Fine:\n\tindented — “quotes” café 🎉🎉 done.",
    "数学: ∑ x² = 42 and 日本語のテキスト",
]


@pytest.fixture(scope="module")
def tokenizer(smollm2_tokenizer_dir):
    return Tokenizer.from_dir(smollm2_tokenizer_dir)


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_never_split_a_character_and_add_up(tokenizer, text):
    prompt = tokenizer.encode("Reply:")
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, prompt)
    deltas = [detok.add(t) for t in ids]
    deltas.append(detok.flush())
    assert not any("\ufffd" in d for d in deltas)
    assert "".join(deltas) == tokenizer.decode(ids) == text
    assert detok.text == text
    if text.startswith("你"):
        # some tokens hold only part of a character: their delta waits for the next token
        assert "" in deltas[:-1]


def test_special_tokens_are_skipped_or_kept(tokenizer):
    ids = tokenizer.encode("Hi", add_special_tokens=False) + [2] + tokenizer.encode(" there", add_special_tokens=False)
    skip = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=True)
    keep = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=False)
    for t in ids:
        skip.add(t)
        keep.add(t)
    assert skip.text == "Hi there"
    assert keep.text == "Hi<|im_end|> there"


def test_flush_emits_an_incomplete_character(tokenizer):
    ids = tokenizer.encode("你", add_special_tokens=False)
    assert len(ids) > 1  # a multi-token character in this vocabulary
    detok = IncrementalDetokenizer(tokenizer, [])
    assert detok.add(ids[0]) == ""
    assert detok.flush() == "\ufffd"  # the stream ended mid-character: say so once, at the end
