"""The tokenizer the engine and the APIs use: a HuggingFace tokenizer plus the model's stop ids."""

from __future__ import annotations

import os
from typing import Sequence

from jaxinfer.fast_tokenizer import FastTokenizer, load_fast_tokenizer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


class Tokenizer:
    def __init__(self, backend, eos_token_ids: Sequence[int] = ()):
        """``backend``: a transformers tokenizer, or a ``jaxinfer.fast_tokenizer.FastTokenizer``."""
        self.backend = backend
        ids = set(eos_token_ids)
        if backend.eos_token_id is not None:
            ids.add(backend.eos_token_id)
        self.eos_token_ids = frozenset(ids)

    @classmethod
    def from_dir(cls, path: str, eos_token_ids: Sequence[int] = ()) -> "Tokenizer | None":
        """The tokenizer saved in ``path``, or None if the directory has none."""
        if not any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES):
            return None
        backend = load_fast_tokenizer(path)
        if backend is None:
            from transformers import AutoTokenizer

            backend = AutoTokenizer.from_pretrained(path)
        return cls(backend, eos_token_ids)

    def __len__(self) -> int:
        return len(self.backend)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.backend.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def backend_json(self) -> str | None:
        """The ``tokenizers`` library's JSON of the tokenizer (guided decoding builds on it), or
        None for a tokenizer that is not a fast one."""
        backend = getattr(self.backend, "backend_tokenizer", None)  # transformers' fast tokenizers
        if backend is None and isinstance(self.backend, FastTokenizer):
            backend = self.backend.backend
        return None if backend is None else backend.to_str()

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.backend, "chat_template", None))

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of ``messages`` (``[{"role", "content"}]``) rendered by the model's chat
        template; the text is tokenized without added special tokens, as transformers does."""
        if not self.has_chat_template:
            raise ValueError("this model's tokenizer has no chat template")
        text = self.backend.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
        return self.encode(text, add_special_tokens=False)

    def save(self, directory: str) -> None:
        """Writes the tokenizer's files into ``directory`` (as ``from_dir`` reads them)."""
        self.backend.save_pretrained(directory)
