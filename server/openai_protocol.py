"""The OpenAI wire format: request validation into engine terms, and response bodies.

Every field is checked here, before anything reaches the engine: a wrong type or an out-of-range
value is an ``ApiError`` (400, OpenAI's error envelope, naming the parameter). Unknown fields are
ignored, as vLLM does, so clients that send extra options keep working.
"""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass
from typing import Any

from jaxinfer.outputs import TokenLogprob
from jaxinfer.sampling_params import (LOGIT_BIAS_RANGE, MAX_LOGIT_BIAS, MAX_LOGPROBS, MAX_STOP_TOKEN_IDS,
                                      GuidedDecodingParams, SamplingParams)

MAX_N = 16
MAX_STOP_STRINGS = 4
MAX_COMPLETION_LOGPROBS = 5  # the legacy completions API allows 0-5


class ApiError(Exception):
    """An error the client caused or must handle, rendered as OpenAI's error envelope."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param, code)


# -- field readers --------------------------------------------------------------------------------

_MISSING = object()


def get_field(body: dict, name: str, kind, default=_MISSING, *, lo=None, hi=None, lo_open=False):
    """``body[name]`` checked to be of ``kind`` (and within [lo, hi]); ``default`` when absent/null."""
    value = body.get(name, None)
    if value is None:
        if default is _MISSING:
            raise bad(f"'{name}' is required", name)
        return default
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind)
    if not ok:
        names = {float: "a number", int: "an integer", bool: "a boolean", str: "a string", list: "an array", dict: "an object"}
        raise bad(f"'{name}' must be {names.get(kind, kind.__name__)}", name)
    if lo is not None and (value < lo or (lo_open and value == lo)):
        raise bad(f"'{name}' must be {'>' if lo_open else '>='} {lo}, got {value}", name)
    if hi is not None and value > hi:
        raise bad(f"'{name}' must be <= {hi}, got {value}", name)
    return value


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise bad("'stop' must be a non-empty string or an array of non-empty strings", "stop")
    if len(stop) > MAX_STOP_STRINGS:
        raise bad(f"'stop' takes at most {MAX_STOP_STRINGS} strings", "stop")
    return tuple(stop)


def token_ids_field(value, name: str, vocab: int) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise bad(f"'{name}' must be an array of integers", name)
    if any(t < 0 or t >= vocab for t in value):
        raise bad(f"'{name}' holds token ids outside [0, {vocab})", name)
    return value


def _logit_bias(body: dict, vocab: int) -> dict[int, float]:
    """OpenAI's ``logit_bias``: an object from token ids (JSON keys, so strings) to biases."""
    bias = get_field(body, "logit_bias", dict, {})
    if len(bias) > MAX_LOGIT_BIAS:
        raise bad(f"'logit_bias' takes at most {MAX_LOGIT_BIAS} tokens", "logit_bias")
    out = {}
    for key, value in bias.items():
        if not re.fullmatch(r"0|[1-9][0-9]*", key) or int(key) >= vocab:
            raise bad(f"'logit_bias' keys must be token ids in [0, {vocab}), got {key!r}", "logit_bias")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not abs(value) <= LOGIT_BIAS_RANGE:
            raise bad(f"'logit_bias' values must be numbers in [-{LOGIT_BIAS_RANGE:g}, {LOGIT_BIAS_RANGE:g}], "
                      f"got {value!r} for token {key}", "logit_bias")
        out[int(key)] = float(value)
    return out


def _allowed_token_ids(body: dict, vocab: int) -> list[int] | None:
    """vLLM's ``allowed_token_ids``: only these tokens may be generated."""
    allowed = body.get("allowed_token_ids")
    if allowed is None:
        return None
    token_ids_field(allowed, "allowed_token_ids", vocab)
    if not 0 < len(set(allowed)) <= MAX_LOGIT_BIAS:
        raise bad(f"'allowed_token_ids' must hold 1 to {MAX_LOGIT_BIAS} token ids", "allowed_token_ids")
    return allowed


# vLLM's extra fields for guided decoding -> GuidedDecodingParams' field and the JSON type it takes.
GUIDED_FIELDS = {"guided_json": ("json", (dict, str)), "guided_regex": ("regex", str),
                 "guided_choice": ("choice", list), "guided_grammar": ("grammar", str)}


def _guided_decoding(body: dict) -> GuidedDecodingParams | None:
    """OpenAI's ``response_format`` (``json_object``, ``json_schema``), vLLM's
    ``structured_outputs`` (``{"json" | "regex" | "choice" | "grammar" | "json_object": ...}``) or
    one of its older ``guided_json``, ``guided_regex``, ``guided_choice``, ``guided_grammar``."""
    given = [name for name in ("response_format", "structured_outputs", *GUIDED_FIELDS) if body.get(name) is not None]
    if len(given) > 1:
        raise bad(f"give at most one of {', '.join(given)}", given[1])
    if not given:
        return None
    name = given[0]
    value = body[name]
    if name == "response_format":
        if not isinstance(value, dict) or value.get("type") not in ("text", "json_object", "json_schema"):
            raise bad("'response_format' must be {\"type\": \"text\"}, {\"type\": \"json_object\"} or "
                      "{\"type\": \"json_schema\", \"json_schema\": {\"name\": ..., \"schema\": {...}}}", name)
        if value["type"] == "text":
            return None
        if value["type"] == "json_object":
            return GuidedDecodingParams(json_object=True)
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise bad("'response_format.json_schema' must be an object whose 'schema' is a JSON schema object", name)
        schema = spec.get("schema")
        return GuidedDecodingParams(json=schema) if schema is not None else GuidedDecodingParams(json_object=True)
    if name == "structured_outputs":
        keys = {"json", "regex", "choice", "grammar", "json_object"}
        if not isinstance(value, dict) or len(set(value) & keys) != 1 or set(value) - keys:
            raise bad("'structured_outputs' must hold exactly one of json, regex, choice, grammar, json_object", name)
        (key,) = value
        if key == "json_object":
            if value[key] is not True:
                raise bad("'structured_outputs.json_object' must be true", name)
            return GuidedDecodingParams(json_object=True)
        return _guided_field(f"{name}.{key}", name, "guided_" + key, value[key])
    return _guided_field(name, name, name, value)


def _guided_field(label: str, param: str, name: str, value) -> GuidedDecodingParams:
    """vLLM's ``guided_*`` field ``name`` (sent as ``label``, reported as ``param``)."""
    field_name, kind = GUIDED_FIELDS[name]
    if not isinstance(value, kind) or name == "guided_choice" and not (
            value and all(isinstance(c, str) and c for c in value)):
        what = {"guided_json": "a JSON schema (an object or its text)", "guided_regex": "a string",
                "guided_choice": "a non-empty array of non-empty strings", "guided_grammar": "a string"}[name]
        raise bad(f"'{label}' must be {what}", param)
    return GuidedDecodingParams(**{field_name: value})


@dataclass
class Limits:
    """What the served engine can take."""

    session_len: int
    vocab_size: int


@dataclass
class ParsedRequest:
    """A validated request: the prompts to run and how."""

    prompts: list[list[int]]  # one per prompt (completions may carry several)
    prompt_texts: list[str | None]
    params: SamplingParams
    stream: bool
    include_usage: bool
    top_logprobs: int | None  # chat: None unless `logprobs: true`
    echo: bool = False
    echo_only: bool = False  # echo with max_tokens 0: the prompt is scored, nothing is generated


def _sampling(body: dict, limits: Limits, prompt_len: int, max_tokens: int | None, logprobs: int | None,
              prompt_logprobs: int | None = None) -> SamplingParams:
    n = get_field(body, "n", int, 1, lo=1, hi=MAX_N)
    best_of = get_field(body, "best_of", int, n, lo=1)
    if best_of != n:
        raise bad("'best_of' different from 'n' is not supported", "best_of")
    room = limits.session_len - prompt_len
    if room < 1:
        raise bad(
            f"This model's maximum context length is {limits.session_len} tokens. However, your prompt has "
            f"{prompt_len} tokens.", "messages", "context_length_exceeded",
        )
    if max_tokens is not None and max_tokens > room:
        raise bad(
            f"This model's maximum context length is {limits.session_len} tokens. However, you requested "
            f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} for the completion).",
            "max_tokens", "context_length_exceeded",
        )
    stop_ids = get_field(body, "stop_token_ids", list, [])
    token_ids_field(stop_ids, "stop_token_ids", limits.vocab_size)
    if len(stop_ids) > MAX_STOP_TOKEN_IDS:
        raise bad(f"'stop_token_ids' takes at most {MAX_STOP_TOKEN_IDS} ids", "stop_token_ids")
    min_tokens = get_field(body, "min_tokens", int, 0, lo=0)
    if max_tokens is not None and min_tokens > max_tokens:
        raise bad("'min_tokens' must not exceed 'max_tokens'", "min_tokens")
    return SamplingParams(
        n=n,
        temperature=get_field(body, "temperature", float, 1.0, lo=0, hi=2),
        top_p=get_field(body, "top_p", float, 1.0, lo=0, hi=1, lo_open=True),
        top_k=get_field(body, "top_k", int, 0, lo=-1),
        min_p=get_field(body, "min_p", float, 0.0, lo=0, hi=1),
        repetition_penalty=get_field(body, "repetition_penalty", float, 1.0, lo=0, lo_open=True),
        presence_penalty=get_field(body, "presence_penalty", float, 0.0, lo=-2, hi=2),
        frequency_penalty=get_field(body, "frequency_penalty", float, 0.0, lo=-2, hi=2),
        seed=get_field(body, "seed", int, None, lo=0, hi=2**63 - 1),
        max_tokens=max_tokens,
        min_tokens=min_tokens,
        stop=_stop(body),
        stop_token_ids=tuple(stop_ids),
        include_stop_str_in_output=get_field(body, "include_stop_str_in_output", bool, False),
        ignore_eos=get_field(body, "ignore_eos", bool, False),
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        skip_special_tokens=get_field(body, "skip_special_tokens", bool, True),
        logit_bias=_logit_bias(body, limits.vocab_size),
        allowed_token_ids=_allowed_token_ids(body, limits.vocab_size),
        guided_decoding=_guided_decoding(body),
    )


def _stream_options(body: dict, stream: bool) -> bool:
    options = get_field(body, "stream_options", dict, {})
    if options and not stream:
        raise bad("'stream_options' is only allowed with 'stream': true", "stream_options")
    return get_field(options, "include_usage", bool, False)


def _unsupported(body: dict, names: tuple[str, ...]) -> None:
    for name in names:
        if body.get(name) not in (None, [], {}):
            raise bad(f"'{name}' is not supported by this server", name)


def parse_message(message: Any, i: int) -> dict:
    if not isinstance(message, dict):
        raise bad(f"messages[{i}] must be an object", "messages")
    role = message.get("role")
    if role not in ("system", "user", "assistant", "developer"):
        raise bad(f"messages[{i}].role must be one of system, user, assistant, developer", "messages")
    content = message.get("content")
    if content is None and role == "assistant":
        content = ""
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad(f"messages[{i}].content: only text parts are supported", "messages")
            parts.append(part["text"])
        content = "".join(parts)
    if not isinstance(content, str):
        raise bad(f"messages[{i}].content must be a string or an array of text parts", "messages")
    return {"role": "system" if role == "developer" else role, "content": content}


def parse_chat(body: Any, tokenizer, limits: Limits) -> ParsedRequest:
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    _unsupported(body, ("tools", "functions", "audio", "prediction"))
    messages = get_field(body, "messages", list)
    if not messages:
        raise bad("'messages' must not be empty", "messages")
    chat = [parse_message(m, i) for i, m in enumerate(messages)]
    if tokenizer is None or not tokenizer.has_chat_template:
        raise bad("this model has no chat template; use /v1/completions", "messages")
    try:
        prompt = tokenizer.apply_chat_template(chat)
    except Exception as e:  # templates raise on conversations they do not accept
        raise bad(f"the chat template rejected the messages: {e}", "messages") from None
    max_tokens = get_field(body, "max_completion_tokens", int, None, lo=1)
    if max_tokens is None:
        max_tokens = get_field(body, "max_tokens", int, None, lo=1)
    logprobs = get_field(body, "logprobs", bool, False)
    top_logprobs = get_field(body, "top_logprobs", int, None, lo=0, hi=MAX_LOGPROBS)
    if top_logprobs is not None and not logprobs:
        raise bad("'top_logprobs' requires 'logprobs': true", "top_logprobs")
    stream = get_field(body, "stream", bool, False)
    n_logprobs = (top_logprobs or 0) if logprobs else None
    return ParsedRequest(
        prompts=[prompt], prompt_texts=[None],
        params=_sampling(body, limits, len(prompt), max_tokens, n_logprobs),
        stream=stream, include_usage=_stream_options(body, stream), top_logprobs=n_logprobs,
    )


def parse_completion(body: Any, tokenizer, limits: Limits) -> ParsedRequest:
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    _unsupported(body, ("suffix",))
    prompt = body.get("prompt")
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise bad("'prompt' must be a string, an array of strings, an array of token ids or an array of those", "prompt")
    prompts, texts = [], []
    for p in prompt:
        if isinstance(p, str):
            if tokenizer is None:
                raise bad("this model has no tokenizer: send token ids", "prompt")
            ids = tokenizer.encode(p)
            texts.append(p)
        else:
            ids = token_ids_field(p, "prompt", limits.vocab_size)
            texts.append(None)
        if not ids:
            raise bad("the prompt is empty", "prompt")
        prompts.append(ids)
    echo = get_field(body, "echo", bool, False)
    # echo with max_tokens 0 is the legacy API's way to score a text (lm-eval's loglikelihood):
    # the engine still generates one token (it always does), which the response leaves out, as vLLM does.
    max_tokens = get_field(body, "max_tokens", int, 16, lo=0 if echo else 1)
    logprobs = get_field(body, "logprobs", int, None, lo=0, hi=MAX_COMPLETION_LOGPROBS)
    if echo:
        texts = [t if t is not None else tokenizer.decode(ids, skip_special_tokens=False) if tokenizer else ""
                 for t, ids in zip(texts, prompts)]
    stream = get_field(body, "stream", bool, False)
    params = _sampling(body, limits, max(len(p) for p in prompts), max(max_tokens, 1), logprobs,
                       prompt_logprobs=logprobs if echo else None)
    return ParsedRequest(
        prompts=prompts, prompt_texts=texts, params=params, stream=stream,
        include_usage=_stream_options(body, stream), top_logprobs=logprobs, echo=echo, echo_only=max_tokens == 0,
    )


def parse_tokenize(body: Any, tokenizer) -> list[int]:
    """``{"prompt": str, "add_special_tokens"?}`` or ``{"messages": [...], "add_generation_prompt"?}``."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    if tokenizer is None:
        raise bad("this model has no tokenizer")
    if "messages" in body:
        chat = [parse_message(m, i) for i, m in enumerate(get_field(body, "messages", list))]
        try:
            return tokenizer.apply_chat_template(chat, get_field(body, "add_generation_prompt", bool, True))
        except Exception as e:
            raise bad(f"the chat template rejected the messages: {e}", "messages") from None
    text = get_field(body, "prompt", str)
    return tokenizer.encode(text, add_special_tokens=get_field(body, "add_special_tokens", bool, True))


def parse_detokenize(body: Any, tokenizer, vocab: int) -> list[int]:
    """``{"tokens": [int, ...]}``."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    if tokenizer is None:
        raise bad("this model has no tokenizer")
    return token_ids_field(get_field(body, "tokens", list), "tokens", vocab)


# -- responses ------------------------------------------------------------------------------------

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _token_text(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False) if tokenizer else str(token_id)


def chat_logprobs(tokenizer, entries: list[TokenLogprob]) -> dict:
    def one(token_id, logprob):
        text = _token_text(tokenizer, token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [
        {**one(e.token_id, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top]} for e in entries
    ]}


def completion_logprobs(tokenizer, entries: list[TokenLogprob], offset: int, first_token: int | None = None) -> dict:
    """The legacy API's logprobs of ``entries`` whose text starts at ``offset``; ``first_token``:
    an echoed prompt's first token, which has no logprob, put before them."""
    tokens, token_logprobs, top, offsets = [], [], [], []
    if first_token is not None:
        text = _token_text(tokenizer, first_token)
        tokens.append(text)
        token_logprobs.append(None)
        top.append(None)
        offsets.append(offset)
        offset += len(text)
    for e in entries:
        text = _token_text(tokenizer, e.token_id)
        tokens.append(text)
        token_logprobs.append(e.logprob)
        top.append({_token_text(tokenizer, t): lp for t, lp in e.top})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}
