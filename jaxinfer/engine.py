"""The engine loop: scheduler -> jitted model step -> sampled tokens -> stop checks and text.

``LLMEngine`` is synchronous and single-threaded: ``add_request`` queues, ``step`` runs one
continuous-batching step and returns the requests that advanced. The offline ``LLM`` API drives it
to completion.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass
from typing import Any, Sequence as Seq

from jaxinfer.block_manager import BlockManager
from jaxinfer.buckets import Buckets, StepRow
from jaxinfer.compilation import enable_persistent_cache, install_counter
from jaxinfer.config import ModelConfig
from jaxinfer.detokenizer import IncrementalDetokenizer
from jaxinfer.engine_config import EngineConfig
from jaxinfer.kv_cache import plan_cache
from jaxinfer.model_runner import ModelRunner
from jaxinfer.outputs import CompletionOutput, RequestOutput
from jaxinfer.sampling_params import SamplingParams
from jaxinfer.scheduler import Scheduler
from jaxinfer.sequence import FinishReason, Sequence
from jaxinfer.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


@dataclass
class EngineStats:
    steps: int = 0
    prefill_tokens: int = 0  # prompt (and recomputed) tokens run through the model
    decode_tokens: int = 0
    preemptions: int = 0


class LLMEngine:
    def __init__(
        self,
        model_config: ModelConfig,
        params: Any,
        tokenizer: Tokenizer | None,
        engine_config: EngineConfig,
        dtype,
        warmup: bool = True,
        progress: bool = True,
    ):
        self.model_config = model_config
        self.tokenizer = tokenizer
        self.config = engine_config
        max_len = model_config.max_position_embeddings
        self.session_len = engine_config.session_len or max_len
        if self.session_len > max_len:
            raise ValueError(f"session_len {self.session_len} exceeds the model's context length {max_len}")
        install_counter()
        enable_persistent_cache()
        page_size = engine_config.cache_block_seq_len
        self.cache_plan = plan_cache(
            model_config, dtype, page_size, engine_config.cache_max_entry_count,
            self.session_len, engine_config.max_batch_size,
        )
        logger.info(self.cache_plan.explanation)
        self.buckets = Buckets.create(
            engine_config.max_batch_size, engine_config.max_prefill_tokens, self.session_len, page_size
        )
        self.runner = ModelRunner(model_config, params, dtype, self.buckets, self.cache_plan.num_pages)
        self.block_manager = BlockManager(self.cache_plan.num_pages, page_size, engine_config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, engine_config.max_batch_size, engine_config.max_prefill_tokens)
        self.eos_token_ids = tokenizer.eos_token_ids if tokenizer else frozenset(model_config.eos_token_ids)
        self.stats = EngineStats()
        self._seqs: dict[str, Sequence] = {}
        if warmup:
            self.runner.warmup(progress)

    # -- requests ---------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt_token_ids: Seq[int], params: SamplingParams) -> None:
        """Queue a request; a prompt that can never run raises ValueError here, not later."""
        if request_id in self._seqs:
            raise ValueError(f"request id {request_id!r} is already running")
        prompt = [int(t) for t in prompt_token_ids]
        if not prompt:
            raise ValueError("the prompt is empty")
        vocab = self.model_config.vocab_size
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        room = self.session_len - len(prompt)
        if room < 1:
            raise ValueError(f"the prompt has {len(prompt)} tokens; the session length is {self.session_len}")
        max_tokens = room if params.max_tokens is None else params.max_tokens
        if max_tokens > room:
            raise ValueError(
                f"prompt ({len(prompt)} tokens) + max_tokens ({max_tokens}) exceeds the session length "
                f"({self.session_len})"
            )
        total = len(prompt) + max_tokens
        if -(-total // self.block_manager.page_size) > self.block_manager.usable_pages:
            raise ValueError(
                f"prompt + max_tokens = {total} tokens can never fit in the KV cache "
                f"({self.cache_plan.capacity_tokens} tokens)"
            )
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        detok = (
            IncrementalDetokenizer(self.tokenizer, prompt, params.skip_special_tokens) if self.tokenizer else None
        )
        seq = Sequence(request_id, prompt, params, max_tokens, (seed >> 32, seed & 0xFFFFFFFF), detok)
        self._seqs[request_id] = seq
        self.scheduler.add(seq)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        seq = self._seqs.pop(request_id, None)
        if seq is None:
            return None
        seq.finish_reason = FinishReason.ABORT
        self.scheduler.remove(seq)
        return self._output(seq)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    # -- stepping ----------------------------------------------------------------------------

    def _row(self, seq: Sequence, n: int) -> StepRow:
        start = seq.num_computed
        return StepRow(
            token_ids=seq.token_ids[start : start + n], start=start, pages=seq.pages,
            sampling=seq.params, seed=seq.seed, num_generated=len(seq.output_token_ids),
        )

    def step(self) -> list[RequestOutput]:
        """Run one step; return an output for every request that produced a token or finished."""
        sched = self.scheduler.schedule()
        self.stats.preemptions += len(sched.preempted)
        if sched.empty:
            return []
        self.stats.steps += 1
        results: list[tuple[Sequence, int, int]] = []
        if sched.decode:
            rows = [self._row(seq, 1) for seq in sched.decode]
            tokens = self.runner.execute(rows, self.buckets.decode_shape(len(rows)))
            results += [(seq, 1, int(t)) for seq, t in zip(sched.decode, tokens)]
            self.stats.decode_tokens += len(rows)
        for seq, n in sched.prefill:
            (token,) = self.runner.execute([self._row(seq, n)], self.buckets.prefill_shape(n))
            results.append((seq, n, int(token)))
            self.stats.prefill_tokens += n

        outputs = []
        for seq, n, token in results:
            seq.num_computed += n
            self.block_manager.register_full_pages(seq.token_ids, seq.pages, seq.block_hashes, seq.num_computed)
            if seq.num_computed == seq.num_tokens:  # the last known token ran: `token` is new
                self._append(seq, token)
                outputs.append(self._output(seq))
        return outputs

    def _append(self, seq: Sequence, token: int) -> None:
        seq.output_token_ids.append(token)
        p = seq.params
        if token in self.eos_token_ids and not p.ignore_eos or token in p.stop_token_ids:
            seq.finish_reason = FinishReason.STOP
        else:
            if seq.detokenizer:
                seq.detokenizer.add(token)
            if len(seq.output_token_ids) >= seq.max_tokens or seq.num_tokens >= self.session_len:
                seq.finish_reason = FinishReason.LENGTH
        if seq.finished:
            if seq.detokenizer:
                seq.detokenizer.flush()
            self.scheduler.remove(seq)
            del self._seqs[seq.request_id]

    def _output(self, seq: Sequence) -> RequestOutput:
        reason = seq.finish_reason.value if seq.finish_reason else None
        return RequestOutput(
            request_id=seq.request_id,
            prompt_token_ids=seq.prompt_token_ids,
            outputs=[CompletionOutput(0, seq.text, list(seq.output_token_ids), reason)],
            finished=seq.finished,
            num_cached_tokens=seq.num_cached_tokens,
        )
