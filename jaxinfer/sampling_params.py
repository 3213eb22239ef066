"""Per-request sampling options, named as in vLLM."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

# Most stop token ids a request may carry (they ride in a fixed-width array of the step).
MAX_STOP_TOKEN_IDS = 16
MAX_LOGPROBS = 20
# Most tokens a request's logit_bias and allowed_token_ids may name together (they share a
# fixed-width array of the step, as stop ids do).
MAX_LOGIT_BIAS = 300
# OpenAI's range for a bias: -100 bans a token in practice, 100 all but forces it.
LOGIT_BIAS_RANGE = 100.0


@dataclass(frozen=True)
class GuidedDecodingParams:
    """What a request's output must match (vLLM's ``GuidedDecodingParams``); exactly one field.

    Attributes:
      json: a JSON schema (a dict or its JSON text); the output is JSON that validates.
      json_object: any JSON object (OpenAI's ``response_format: {"type": "json_object"}``).
      regex: a regular expression (Rust ``regex`` syntax) the whole output matches.
      choice: the output is exactly one of these strings.
      grammar: a Lark grammar (llguidance's dialect) whose ``start`` rule the output matches.
    JSON outputs are compact unless the schema says otherwise (``"x-guidance": {"whitespace_flexible":
    true}``): with free whitespace a small model can pad forever.
    """

    json: str | Mapping | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None

    def __post_init__(self):
        if self.choice is not None:
            object.__setattr__(self, "choice", tuple(self.choice))
        given = [name for name in ("json", "regex", "choice", "grammar") if getattr(self, name) is not None]
        given += ["json_object"] if self.json_object else []
        if len(given) != 1:
            raise ValueError(
                f"guided decoding takes exactly one of json, json_object, regex, choice, grammar; got {given}")
        if self.choice is not None and not (self.choice and all(isinstance(c, str) and c for c in self.choice)):
            raise ValueError("guided choice must be a non-empty list of non-empty strings")


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens and when it stops.

    Attributes:
      n: completions to generate for the prompt (they share the prompt's KV pages).
      temperature: 0 means greedy.
      top_k: keep the k most likely tokens; 0 or -1 keeps all.
      top_p: keep the smallest set of tokens whose probability reaches top_p.
      min_p: drop tokens less likely than min_p times the most likely one.
      repetition_penalty: > 1 discourages tokens of the prompt and the output (1: off).
      presence_penalty, frequency_penalty: subtracted from the logits of output tokens, once /
        per occurrence (0: off).
      seed: makes a sampled request reproducible, whatever else shares its batch.
      max_tokens: most tokens to generate (None: until the session is full).
      min_tokens: EOS and stop tokens are impossible before this many tokens.
      stop: strings that end the request (found across token boundaries); not in the text unless
        ``include_stop_str_in_output``.
      stop_token_ids: tokens that end the request (besides EOS), not included in the text.
      ignore_eos: keep generating past EOS.
      logprobs: return the chosen token's logprob and this many top alternatives (0-20).
      prompt_logprobs: return the logprob of every prompt token after the first, given the tokens
        before it, and this many top alternatives (0-20). The prompt is then computed in full:
        the prefix cache does not serve it.
      skip_special_tokens: leave special tokens out of the text.
      logit_bias: ``{token_id: bias}`` added to the raw logits before anything else (OpenAI's
        field; biases in [-100, 100], at most ``MAX_LOGIT_BIAS`` tokens). Kept as sorted
        ``(token_id, bias)`` pairs. Logprobs stay those of the unbiased model.
      allowed_token_ids: when set, only these tokens can be generated (vLLM's field; at most
        ``MAX_LOGIT_BIAS``). Kept sorted, without repeats.
      guided_decoding: constrain the output to a JSON schema, a regex, a choice or a grammar
        (``GuidedDecodingParams``); the request ends when its output is complete.
    """

    n: int = 1
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: tuple[str, ...] = field(default_factory=tuple)
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    logit_bias: Mapping[int, float] | tuple[tuple[int, float], ...] = field(default_factory=tuple)
    allowed_token_ids: tuple[int, ...] | None = None
    guided_decoding: GuidedDecodingParams | None = None

    def __post_init__(self):
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        object.__setattr__(self, "stop", stop)
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids or ()))
        bias = self.logit_bias or ()
        pairs = sorted((int(t), float(b)) for t, b in (bias.items() if isinstance(bias, Mapping) else bias))
        object.__setattr__(self, "logit_bias", tuple(pairs))
        allowed = None if self.allowed_token_ids is None else tuple(sorted({int(t) for t in self.allowed_token_ids}))
        object.__setattr__(self, "allowed_token_ids", allowed)
        if self.top_k == -1:
            object.__setattr__(self, "top_k", 0)
        checks = [
            (self.n >= 1, f"n must be >= 1, got {self.n}"),
            (self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.top_k >= 0, f"top_k must be >= 0 (or -1 to disable), got {self.top_k}"),
            (0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}"),
            (self.repetition_penalty > 0, f"repetition_penalty must be > 0, got {self.repetition_penalty}"),
            (-2 <= self.presence_penalty <= 2, f"presence_penalty must be in [-2, 2], got {self.presence_penalty}"),
            (-2 <= self.frequency_penalty <= 2, f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}"),
            (self.max_tokens is None or self.max_tokens >= 1, f"max_tokens must be >= 1, got {self.max_tokens}"),
            (self.min_tokens >= 0, f"min_tokens must be >= 0, got {self.min_tokens}"),
            (self.max_tokens is None or self.min_tokens <= self.max_tokens,
             f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})"),
            (self.seed is None or 0 <= self.seed < 2**63, f"seed must be a non-negative 64-bit integer, got {self.seed}"),
            (self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS,
             f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}"),
            (self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= MAX_LOGPROBS,
             f"prompt_logprobs must be in [0, {MAX_LOGPROBS}], got {self.prompt_logprobs}"),
            (len(self.stop_token_ids) <= MAX_STOP_TOKEN_IDS, f"at most {MAX_STOP_TOKEN_IDS} stop_token_ids"),
            (all(isinstance(s, str) and s for s in stop), "stop strings must be non-empty strings"),
            (all(t >= 0 for t in self.stop_token_ids), "stop_token_ids must be non-negative"),
            (len(self.listed_tokens) <= MAX_LOGIT_BIAS,
             f"at most {MAX_LOGIT_BIAS} tokens in logit_bias, or in allowed_token_ids when it is set"),
            (allowed is None or len(allowed) > 0, "allowed_token_ids must not be empty"),
            (not allowed or allowed[0] >= 0, "allowed_token_ids must be non-negative"),
            (len({t for t, _ in pairs}) == len(pairs), "logit_bias names a token twice"),
            (all(t >= 0 for t, _ in pairs), "logit_bias token ids must be non-negative"),
            (all(math.isfinite(b) and abs(b) <= LOGIT_BIAS_RANGE for _, b in pairs),
             f"logit_bias values must be in [-{LOGIT_BIAS_RANGE:g}, {LOGIT_BIAS_RANGE:g}]"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def listed_tokens(self) -> tuple[tuple[int, float], ...]:
        """The ``(token_id, bias)`` pairs the step's bias arrays carry, sorted by id: every allowed
        token (with its bias, or 0) when ``allowed_token_ids`` is set, else the ``logit_bias``
        entries. A bias on a token that is not allowed is moot: that token is banned."""
        if self.allowed_token_ids is None:
            return self.logit_bias
        bias = dict(self.logit_bias)
        return tuple((t, bias.get(t, 0.0)) for t in self.allowed_token_ids)

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0
