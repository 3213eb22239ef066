"""A converted model's tokenizer without transformers: ``tokenizer.json`` through the
``tokenizers`` library, the chat template through jinja2 set up as transformers sets it up.

Importing transformers for ``AutoTokenizer`` took 1.5-2.0 s of every start of ``jaxinfer chat``
or ``serve``, and 3.4-3.7 s where torch is installed (transformers then imports it); this module
imports and loads the same tokenizer in ~0.2-0.3 s (SmolLM2, 2-core EPYC, exploratory). It takes only what transformers saved as a plain
``tokenizers`` backend (``FAST_CLASSES``): such a ``tokenizer.json`` holds the whole pipeline
(normalizer, pre-tokenizer, the post-processor that adds any BOS, decoder), so encoding and
decoding are the library's own. Other tokenizer classes, which transformers may rebuild from
their own code, load through ``AutoTokenizer`` (``jaxinfer.tokenizer.Tokenizer.from_dir``).
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Sequence

import jinja2
import jinja2.ext
import jinja2.nodes
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment

FAST_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")
CONFIG_FILE = "tokenizer_config.json"
TOKENIZER_FILE = "tokenizer.json"
TEMPLATE_FILE = "chat_template.jinja"
# The named special tokens transformers passes to every chat template, as strings.
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def load_fast_tokenizer(path: str) -> FastTokenizer | None:
    """The tokenizer saved in directory ``path``, or None when it is not a plain ``tokenizers``
    backend with a ``tokenizer.json``."""
    config_path, tokenizer_path = os.path.join(path, CONFIG_FILE), os.path.join(path, TOKENIZER_FILE)
    if not (os.path.isfile(config_path) and os.path.isfile(tokenizer_path)):
        return None
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    if config.get("tokenizer_class") not in FAST_CLASSES:
        return None
    backend = tokenizers.Tokenizer.from_file(tokenizer_path)
    if config.get("clean_up_tokenization_spaces") and type(backend.model).__name__ != "BPE":
        return None  # transformers' clean-up of spaces before punctuation (which it skips for BPE)
    template = config.get("chat_template")
    template_path = os.path.join(path, TEMPLATE_FILE)
    if os.path.isfile(template_path):
        with open(template_path, encoding="utf-8") as f:
            template = f.read()
    return FastTokenizer(backend, config, template)


class FastTokenizer:
    """The part of a transformers tokenizer that ``jaxinfer.tokenizer.Tokenizer`` uses."""

    def __init__(self, backend: tokenizers.Tokenizer, config: dict, chat_template: str | None):
        """``config``: the ``tokenizer_config.json`` dict (special tokens, ``tokenizer_class``)."""
        self._backend = backend
        self._config = config
        self.special_tokens = {name: _content(config[name]) for name in SPECIAL_TOKEN_NAMES if config.get(name)}
        eos = self.special_tokens.get("eos_token")
        self.eos_token_id = backend.token_to_id(eos) if eos is not None else None
        self.chat_template = chat_template
        self._template = None  # compiled on first use

    @property
    def backend(self) -> tokenizers.Tokenizer:
        return self._backend

    def __len__(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._backend.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, tokenize: bool = False) -> str:
        """The chat template rendered with ``messages``, the named special tokens and
        ``add_generation_prompt``: the text, as transformers' method gives it with ``tokenize=False``."""
        if tokenize:
            raise NotImplementedError("FastTokenizer renders chat templates as text only; encode() tokenizes")
        if self._template is None:
            self._template = _environment().from_string(self.chat_template)
        return self._template.render(messages=[_alias_reasoning(m) for m in messages], tools=None, documents=None,
                                     add_generation_prompt=add_generation_prompt, **self.special_tokens)

    def save_pretrained(self, directory: str) -> None:
        """Writes the files ``load_fast_tokenizer`` reads into ``directory``."""
        os.makedirs(directory, exist_ok=True)
        self._backend.save(os.path.join(directory, TOKENIZER_FILE))
        with open(os.path.join(directory, CONFIG_FILE), "w", encoding="utf-8") as f:
            json.dump({k: v for k, v in self._config.items() if k != "chat_template"}, f, indent=2)
        if self.chat_template:
            with open(os.path.join(directory, TEMPLATE_FILE), "w", encoding="utf-8") as f:
                f.write(self.chat_template)


# Names a message's reasoning goes by; transformers fills each from the others before rendering.
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _alias_reasoning(message: dict) -> dict:
    reasoning = next((message[k] for k in REASONING_FIELDS if message.get(k) is not None), None)
    return message if reasoning is None else {"thinking": reasoning, **message, "reasoning_content": reasoning}


def _content(token) -> str:
    return token["content"] if isinstance(token, dict) else str(token)


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}``, which some templates use to mark assistant
    text for training masks: rendered as its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # jinja2's own tojson escapes HTML characters; templates expect plain JSON.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _environment() -> ImmutableSandboxedEnvironment:
    """A sandbox with the options, filters and globals transformers gives chat templates."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env
