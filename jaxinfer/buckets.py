"""Shape buckets and padding: the only module that decides the shapes the jitted step sees.

A step is a batch of rows ``[batch, q_len]``: decode steps have ``q_len == 1`` and one row per
running sequence; prefill steps have one row per prompt chunk, up to ``MAX_PREFILL_ROWS`` chunks
together while their padded tokens fit the prefill budget (one call instead of one per chunk:
the weights are read once and the per-call cost of 30 layers is paid once). Batch sizes and
chunk lengths are rounded up to powers of two, so the set of compiled shapes is small and known
in advance (``all_shapes``); block tables are always as wide as the longest session, which costs
nothing because attention loops only over pages in use.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from jaxinfer.kv_cache import TRASH_PAGE
from jaxinfer.sampling_params import MAX_LOGIT_BIAS, MAX_STOP_TOKEN_IDS, SamplingParams

MIN_PREFILL_BUCKET = 16
MAX_PREFILL_ROWS = 4  # prompt chunks per prefill call; each size doubles the prefill buckets it can fill
# Width of the per-row list of ids banned before min_tokens: stop token ids plus the model's EOS ids.
MAX_EOS_IDS = 4
STOP_IDS_WIDTH = MAX_STOP_TOKEN_IDS + MAX_EOS_IDS


def _powers_of_two(lo: int, hi: int) -> tuple[int, ...]:
    sizes, n = [], lo
    while n < hi:
        sizes.append(n)
        n *= 2
    sizes.append(hi)
    return tuple(sizes)


def _round_up(n: int, sizes: Sequence[int]) -> int:
    for s in sizes:
        if n <= s:
            return s
    raise ValueError(f"{n} exceeds the largest bucket {sizes[-1]}")


@dataclass(frozen=True)
class StepRow:
    """One sequence's part of a step.

    Attributes:
      token_ids: tokens computed this step (a prompt chunk, or the last token when decoding).
      start: position of ``token_ids[0]`` in the sequence.
      pages: the sequence's pages, covering at least ``start + len(token_ids)`` tokens.
      sampling: the request's sampling options.
      seed: ``(hi, lo)`` 32-bit words of the sequence's seed.
      num_generated: tokens the sequence has generated so far.
      history: all its tokens so far (prompt first) when the request has penalties, else None.
      prompt_len: its prompt length.
      banned_ids: token ids impossible while ``num_generated < sampling.min_tokens``.
      prompt_targets: when the request wants prompt logprobs, the token each of ``token_ids``
        predicts (the next prompt token), or None where that is not a prompt token.
      token_mask: with guided decoding, the tokens the row may sample (``[mask_words]`` int32
        bitmask: bit ``t % 32`` of word ``t // 32`` for token ``t``).
    """

    token_ids: Sequence[int]
    start: int
    pages: Sequence[int]
    sampling: SamplingParams
    seed: tuple[int, int]
    num_generated: int
    history: Sequence[int] | None = None
    prompt_len: int = 0
    banned_ids: Sequence[int] = ()
    prompt_targets: Sequence[int | None] | None = None
    token_mask: np.ndarray | None = None


@dataclass(frozen=True)
class StepArrays:
    """Host arrays of one padded step; ``history`` is None when no row has penalties, and
    ``token_mask`` when no row is guided (the runner then passes constant arrays of their shapes)."""

    tokens: np.ndarray  # [batch, q_len] int32 (a device array when fed from the step before)
    positions: np.ndarray  # [batch, q_len] int32
    slot_mapping: np.ndarray  # [batch, q_len] int32
    block_tables: np.ndarray  # [batch, pages_per_seq] int32
    seq_lens: np.ndarray  # [batch] int32
    logits_indices: np.ndarray  # [batch] int32: the row's last real token
    sampling: dict[str, np.ndarray]  # the fields of jaxinfer.sampler.SamplingTensors
    history: np.ndarray | None  # [batch, history_len] int32
    prompt_targets: np.ndarray  # [batch, q_len] int32: the prompt token each position predicts, vocab_size: none
    token_mask: np.ndarray | None  # [batch, mask_words] int32 bitmask of the tokens each row may sample


@dataclass(frozen=True)
class Buckets:
    decode_batch_sizes: tuple[int, ...]
    prefill_lengths: tuple[int, ...]
    prefill_batch_sizes: tuple[int, ...]
    pages_per_seq: int
    page_size: int
    vocab_size: int

    @classmethod
    def create(
        cls, max_batch_size: int, max_prefill_tokens: int, session_len: int, page_size: int, vocab_size: int
    ) -> "Buckets":
        return cls(
            decode_batch_sizes=_powers_of_two(1, max_batch_size),
            prefill_lengths=_powers_of_two(min(MIN_PREFILL_BUCKET, max_prefill_tokens), max_prefill_tokens),
            prefill_batch_sizes=_powers_of_two(1, min(MAX_PREFILL_ROWS, max_batch_size)),
            pages_per_seq=math.ceil(session_len / page_size),
            page_size=page_size,
            vocab_size=vocab_size,
        )

    @property
    def history_len(self) -> int:
        return self.pages_per_seq * self.page_size

    @property
    def mask_words(self) -> int:
        """int32 words of a row's token bitmask."""
        return -(-self.vocab_size // 32)

    def all_shapes(self) -> list[tuple[int, int]]:
        """Every ``(batch, q_len)`` the engine can run: what warm-up compiles."""
        budget = self.prefill_lengths[-1]
        prefill = [(b, n) for b in self.prefill_batch_sizes for n in self.prefill_lengths if b * n <= budget]
        return [(b, 1) for b in self.decode_batch_sizes] + prefill

    @property
    def batch_sizes(self) -> list[int]:
        """Every batch size of ``all_shapes``: what the sampler is compiled for."""
        return sorted({batch for batch, _ in self.all_shapes()})

    def decode_shape(self, num_rows: int) -> tuple[int, int]:
        return _round_up(num_rows, self.decode_batch_sizes), 1

    def prefill_shape(self, num_tokens: int, num_rows: int = 1) -> tuple[int, int]:
        """The bucket of ``num_rows`` prompt chunks of at most ``num_tokens`` tokens each."""
        shape = _round_up(num_rows, self.prefill_batch_sizes), _round_up(num_tokens, self.prefill_lengths)
        if shape[0] * shape[1] > self.prefill_lengths[-1]:
            raise ValueError(f"{num_rows} chunks of {num_tokens} tokens exceed the prefill bucket {shape}")
        return shape

    def prefill_groups(self, chunk_lens: Sequence[int]) -> list[list[int]]:
        """Indices of ``chunk_lens`` grouped into prefill calls: longest first, each chunk joining
        the current group while the group's bucket stays within the prefill budget."""
        groups: list[list[int]] = []
        for i in sorted(range(len(chunk_lens)), key=lambda i: -chunk_lens[i]):
            if groups and len(groups[-1]) < self.prefill_batch_sizes[-1]:
                rows = _round_up(len(groups[-1]) + 1, self.prefill_batch_sizes)
                if rows * _round_up(chunk_lens[groups[-1][0]], self.prefill_lengths) <= self.prefill_lengths[-1]:
                    groups[-1].append(i)
                    continue
            groups.append([i])
        return groups

    def pad(self, rows: Sequence[StepRow | None], shape: tuple[int, int]) -> StepArrays:
        """The arrays of ``rows`` padded to ``shape``; padding tokens (and rows that are None)
        write to the trash page."""
        batch, q_len = shape
        if len(rows) > batch or any(r is not None and len(r.token_ids) > q_len for r in rows):
            raise ValueError(f"rows do not fit the bucket {shape}")
        vocab = self.vocab_size
        tokens = np.zeros((batch, q_len), np.int32)
        positions = np.zeros((batch, q_len), np.int32)
        slots = np.full((batch, q_len), TRASH_PAGE * self.page_size, np.int32)
        tables = np.full((batch, self.pages_per_seq), TRASH_PAGE, np.int32)
        seq_lens = np.zeros(batch, np.int32)
        last = np.zeros(batch, np.int32)
        targets = np.full((batch, q_len), vocab, np.int32)
        f = {
            "temperature": np.zeros(batch, np.float32),
            "top_k": np.zeros(batch, np.int32),
            "top_p": np.ones(batch, np.float32),
            "min_p": np.zeros(batch, np.float32),
            "repetition_penalty": np.ones(batch, np.float32),
            "presence_penalty": np.zeros(batch, np.float32),
            "frequency_penalty": np.zeros(batch, np.float32),
            "seed": np.zeros((batch, 2), np.uint32),
            "step": np.zeros(batch, np.int32),
            "prompt_len": np.zeros(batch, np.int32),
            "min_tokens": np.zeros(batch, np.int32),
            "stop_ids": np.full((batch, STOP_IDS_WIDTH), vocab, np.int32),
            "num_logprobs": np.full(batch, -1, np.int32),
            "bias_ids": np.full((batch, MAX_LOGIT_BIAS), vocab, np.int32),
            "bias_values": np.zeros((batch, MAX_LOGIT_BIAS), np.float32),
            "only_listed": np.zeros(batch, bool),
            "guided": np.zeros(batch, bool),
        }
        history = None
        if any(r is not None and r.history is not None for r in rows):
            history = np.full((batch, self.history_len), vocab, np.int32)
        token_mask = None
        if any(r is not None and r.token_mask is not None for r in rows):
            token_mask = np.full((batch, self.mask_words), -1, np.int32)
        for i, r in enumerate(rows):
            if r is None:
                continue
            n = len(r.token_ids)
            pos = np.arange(r.start, r.start + n, dtype=np.int32)
            pages = np.asarray(r.pages, np.int32)
            tokens[i, :n] = r.token_ids
            positions[i, :n] = pos
            slots[i, :n] = pages[pos // self.page_size] * self.page_size + pos % self.page_size
            tables[i, : len(pages)] = pages
            seq_lens[i] = r.start + n
            last[i] = n - 1
            p = r.sampling
            f["temperature"][i] = p.temperature
            f["top_k"][i] = p.top_k
            f["top_p"][i] = p.top_p
            f["min_p"][i] = p.min_p
            f["repetition_penalty"][i] = p.repetition_penalty
            f["presence_penalty"][i] = p.presence_penalty
            f["frequency_penalty"][i] = p.frequency_penalty
            f["seed"][i] = r.seed
            f["step"][i] = r.num_generated
            f["prompt_len"][i] = r.prompt_len
            f["min_tokens"][i] = p.min_tokens
            f["stop_ids"][i, : len(r.banned_ids)] = r.banned_ids
            f["num_logprobs"][i] = -1 if p.logprobs is None else p.logprobs
            if p.listed_tokens:
                ids, values = zip(*p.listed_tokens)
                f["bias_ids"][i, : len(ids)] = ids
                f["bias_values"][i, : len(ids)] = values
                f["only_listed"][i] = p.allowed_token_ids is not None
            if r.history is not None:
                history[i, : len(r.history)] = r.history
            if r.prompt_targets is not None:
                targets[i, :n] = [vocab if t is None else t for t in r.prompt_targets]
            if r.token_mask is not None:
                token_mask[i] = r.token_mask
                f["guided"][i] = True
        return StepArrays(tokens, positions, slots, tables, seq_lens, last, f, history, targets, token_mask)
