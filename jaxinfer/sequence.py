"""The state of requests and of their sequences, as the scheduler and engine see them."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from jaxinfer.detokenizer import IncrementalDetokenizer
from jaxinfer.outputs import TokenLogprob
from jaxinfer.sampling_params import SamplingParams
from jaxinfer.stop_strings import held_back


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop token or a stop string
    LENGTH = "length"  # max_tokens or the session length
    ABORT = "abort"


@dataclass(eq=False)
class Request:
    """One prompt and its ``n`` sequences (completions).

    Attributes:
      prompt_logprobs: with ``params.prompt_logprobs``, the entries known so far, in prompt order
        (None for the first token); complete once as long as the prompt.
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list["Sequence"] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None

    def __post_init__(self):
        if self.params.prompt_logprobs is not None:
            self.prompt_logprobs = [None]

    @property
    def scores_prompt(self) -> bool:
        """Whether prompt logprobs are still missing: the prompt must be computed, not cached."""
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < len(self.prompt_token_ids)

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.seqs)


@dataclass(eq=False)
class Sequence:
    """Tokens are ``prompt_token_ids + output_token_ids``; the first ``num_computed`` of them have
    their K/V in ``pages``. While decoding, exactly the last token is not computed yet.

    Attributes:
      index: which of the request's ``n`` completions this is.
      max_tokens: this sequence's output limit (the request's, capped by the session length).
      seed: ``(hi, lo)`` words of the sequence's seed.
      leader: for the 2nd..nth completion, the first one: this sequence waits until the leader has
        computed the prompt, then shares its full pages.
      admitted: order in which sequences first ran (preemption evicts the latest).
      block_hashes: prefix-cache hashes of the leading full pages.
      num_cached_tokens: prompt tokens found in the cache at first admission.
      final_text: the text, cut at a stop string, once one is found.
      matcher: with guided decoding, the llguidance matcher that has taken the output so far.
    """

    request: Request
    index: int
    max_tokens: int
    seed: tuple[int, int]
    detokenizer: IncrementalDetokenizer | None = None
    leader: "Sequence | None" = None
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[TokenLogprob] = field(default_factory=list)
    num_computed: int = 0
    pages: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)
    admitted: int = -1
    num_cached_tokens: int = 0
    finish_reason: FinishReason | None = None
    final_text: str | None = None
    matcher: Any = None

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.request.prompt_token_ids

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed

    @property
    def is_decoding(self) -> bool:
        """One token left to compute: it rides in the decode batch."""
        return self.num_uncomputed == 1

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def ready(self) -> bool:
        """Whether it may be admitted: a follower waits for its leader's prompt pages."""
        leader = self.leader
        return leader is None or leader.finished or bool(leader.output_token_ids)

    @property
    def text(self) -> str:
        """The text so far; while running, minus a tail that may still turn into a stop string."""
        if self.final_text is not None:
            return self.final_text
        if self.detokenizer is None:
            return ""
        text = self.detokenizer.text
        if self.params.stop and not self.finished:
            return text[: len(text) - held_back(text, self.params.stop)]
        return text
