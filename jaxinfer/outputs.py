"""What generation returns, in the shape of vLLM's ``RequestOutput``."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TokenLogprob:
    """The raw logprob of a token (generated, or of the prompt) and the most likely alternatives
    at its position, best first."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop", "length", "abort"; None while running
    logprobs: list[TokenLogprob] | None = None  # one per token, when the request asked for them


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    prompt: str | None = None
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    # With SamplingParams.prompt_logprobs: one entry per prompt token, None for the first (vLLM's shape).
    prompt_logprobs: list[TokenLogprob | None] | None = None
