"""Continuous batching: which sequences run in the next step, and how many tokens each computes.

Every step decodes all running sequences that have one token left, and adds prompt chunks (new
requests, or the rest of long prompts) under a token budget, ``max_prefill_tokens``. When pages
run out for a decoding sequence, the most recently admitted running sequence is preempted: its
pages are released and it returns to the head of the queue, to be recomputed later.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field

from jaxinfer.block_manager import BlockManager
from jaxinfer.sequence import Sequence


@dataclass
class SchedulerOutput:
    decode: list[Sequence] = field(default_factory=list)
    prefill: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, tokens to compute)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.decode and not self.prefill


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_batch_size: int, max_prefill_tokens: int):
        self.block_manager = block_manager
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order
        self._admissions = itertools.count()

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, seq: Sequence) -> None:
        """Take a finished or aborted sequence out and release its pages."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.release(seq.pages)
        seq.pages = []

    def _reserve(self, seq: Sequence, num_tokens: int) -> bool:
        """Give ``seq`` enough pages for ``num_tokens`` tokens, if there are enough free pages."""
        return self.reserve_all([(seq, num_tokens)])

    def reserve_all(self, demands: list[tuple[Sequence, int]]) -> bool:
        """Give each ``(sequence, num_tokens)`` pages for that many tokens, or, when the free pages
        do not cover them all, give none and return False."""
        page_size = self.block_manager.page_size
        needs = [max(0, -(-n // page_size) - len(seq.pages)) for seq, n in demands]
        if sum(needs) > self.block_manager.num_free_pages:
            return False
        for (seq, _), need in zip(demands, needs):
            if need:
                seq.pages += self.block_manager.allocate(need)
        return True

    def _preempt(self, seq: Sequence) -> None:
        """Release a running sequence's pages and queue it first, to be recomputed."""
        self.running.remove(seq)
        self.block_manager.release(seq.pages)
        seq.pages, seq.block_hashes, seq.num_computed = [], [], 0
        self.waiting.appendleft(seq)

    def _admit(self, seq: Sequence) -> None:
        if seq.request.scores_prompt:
            pages, hashes = [], []
        else:
            pages, hashes = self.block_manager.match_prefix(seq.token_ids, force=seq.leader is not None)
        seq.pages, seq.block_hashes = pages, hashes
        seq.num_computed = len(pages) * self.block_manager.page_size
        if seq.admitted < 0:
            seq.num_cached_tokens = seq.num_computed
        seq.admitted = next(self._admissions)
        self.waiting.remove(seq)
        self.running.append(seq)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        for seq in list(self.running):
            if seq not in self.running or not seq.is_decoding:
                continue
            while not self._reserve(seq, seq.num_tokens):
                victim = self.running[-1]
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            else:
                out.decode.append(seq)

        budget = self.max_prefill_tokens
        candidates = [s for s in self.running if not s.is_decoding] + list(self.waiting)
        for seq in candidates:
            if budget == 0:
                break
            newly_admitted = seq not in self.running
            if newly_admitted:
                if out.preempted or len(self.running) >= self.max_batch_size:
                    break  # pages are short, or the batch is full: admit nobody this step
                if not seq.ready:
                    continue
                self._admit(seq)
            n = min(seq.num_uncomputed, budget)
            if not self._reserve(seq, seq.num_computed + n):
                if newly_admitted:
                    self._preempt(seq)
                break
            out.prefill.append((seq, n))
            budget -= n
        return out
