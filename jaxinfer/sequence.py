"""The state of one request as the scheduler and engine see it."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from jaxinfer.detokenizer import IncrementalDetokenizer
from jaxinfer.sampling_params import SamplingParams


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS or a stop token
    LENGTH = "length"  # max_tokens or the session length
    ABORT = "abort"


@dataclass(eq=False)
class Sequence:
    """Tokens are ``prompt_token_ids + output_token_ids``; the first ``num_computed`` of them have
    their K/V in ``pages``. While decoding, exactly the last token is not computed yet.

    Attributes:
      max_tokens: this request's output limit (its own, capped by the session length).
      seed: ``(hi, lo)`` words of the request's seed.
      admitted: order in which sequences first ran (preemption evicts the latest).
      block_hashes: prefix-cache hashes of the leading full pages.
      num_cached_tokens: prompt tokens found in the prefix cache at admission.
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int
    seed: tuple[int, int]
    detokenizer: IncrementalDetokenizer | None = None
    output_token_ids: list[int] = field(default_factory=list)
    num_computed: int = 0
    pages: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)
    admitted: int = -1
    num_cached_tokens: int = 0
    finish_reason: FinishReason | None = None

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
    def text(self) -> str:
        return self.detokenizer.text if self.detokenizer else ""
