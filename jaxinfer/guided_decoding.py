"""Guided decoding: each step, the tokens a request's output may continue with, as a bitmask.

A request's ``GuidedDecodingParams`` become an llguidance grammar; every sequence of the request
follows it with a matcher of its own (``Grammars.matcher``). Before a step that samples a
sequence's next token, the host fills that row's bitmask from the matcher (tens of microseconds;
bit ``t % 32`` of word ``t // 32`` set: token ``t`` is allowed); the sampler bans the others. Each
token the sequence then takes is fed to its matcher, and the sequence ends once the grammar can
take no more. EOS is allowed exactly where the output is complete.
"""

from __future__ import annotations

import json

import llguidance
import numpy as np

from jaxinfer.sampling_params import GuidedDecodingParams
from jaxinfer.tokenizer import Tokenizer


def grammar_text(params: GuidedDecodingParams) -> str:
    """The llguidance grammar of ``params``."""
    if params.json is not None or params.json_object:
        schema = {"type": "object"} if params.json_object else params.json
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise ValueError(f"the guided JSON schema is not valid JSON: {e}") from None
        if not isinstance(schema, dict):
            raise ValueError("the guided JSON schema must be a JSON object")
        return llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema),
                                                             defaults={"whitespace_flexible": False})
    if params.regex is not None:
        return llguidance.LLMatcher.grammar_from_regex(params.regex)
    if params.choice is not None:
        return llguidance.LLMatcher.grammar_from_lark(
            "start: " + " | ".join(json.dumps(c, ensure_ascii=False) for c in params.choice))
    return llguidance.LLMatcher.grammar_from_lark(params.grammar)


class Grammars:
    """Matchers for one tokenizer and vocabulary; its llguidance tokenizer is built on first use
    (~0.2 s for SmolLM2's 49152 tokens)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int):
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._ll_tokenizer: llguidance.LLTokenizer | None = None

    def _ll(self) -> llguidance.LLTokenizer:
        if self._ll_tokenizer is None:
            spec = self._tokenizer.backend_json()
            if spec is None:
                raise ValueError("guided decoding needs a fast (tokenizers) tokenizer; this model's is not one")
            self._ll_tokenizer = llguidance.LLTokenizer(
                spec, n_vocab=self._vocab_size, eos_token=sorted(self._tokenizer.eos_token_ids))
        return self._ll_tokenizer

    def matcher(self, params: GuidedDecodingParams) -> llguidance.LLMatcher:
        """A fresh matcher of ``params``' grammar; ValueError names what is wrong with it."""
        tokenizer = self._ll()
        try:
            grammar = grammar_text(params)
            error = llguidance.LLMatcher.validate_grammar(grammar, tokenizer)
            matcher = None if error else llguidance.LLMatcher(tokenizer, grammar)
        except ValueError:
            raise
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # a panic in llguidance's Rust surfaces as pyo3's PanicException
            raise ValueError(f"invalid guided decoding grammar: {e}") from None
        if matcher is None or matcher.is_error():
            raise ValueError(f"invalid guided decoding grammar: {error or matcher.get_error()}")
        return matcher


def fill_mask(matcher: llguidance.LLMatcher, row: np.ndarray) -> None:
    """Write the tokens ``matcher`` allows next into ``row`` (``[Buckets.mask_words]`` int32,
    contiguous)."""
    matcher.unsafe_compute_mask_ptr(row.ctypes.data, row.nbytes)
