"""The tokenizer the engine and the APIs use: a HuggingFace tokenizer plus the model's stop ids."""

from __future__ import annotations

import os
from typing import Sequence

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


class Tokenizer:
    def __init__(self, hf_tokenizer, eos_token_ids: Sequence[int] = ()):
        self.hf = hf_tokenizer
        ids = set(eos_token_ids)
        if hf_tokenizer.eos_token_id is not None:
            ids.add(hf_tokenizer.eos_token_id)
        self.eos_token_ids = frozenset(ids)

    @classmethod
    def from_dir(cls, path: str, eos_token_ids: Sequence[int] = ()) -> "Tokenizer | None":
        """The tokenizer saved in ``path``, or None if the directory has none."""
        if not any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES):
            return None
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(path), eos_token_ids)

    def __len__(self) -> int:
        return len(self.hf)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of ``messages`` (``[{"role", "content"}]``) rendered by the model's chat template."""
        if not self.has_chat_template:
            raise ValueError("this model's tokenizer has no chat template")
        return list(
            self.hf.apply_chat_template(
                messages, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=False
            )
        )
