"""The engine loop: scheduler -> jitted model step -> sampled tokens -> stop checks and text.

``LLMEngine`` is single-threaded: ``add_request`` queues, ``step`` runs one continuous-batching
step and returns the requests that advanced. While only decoding goes on, each step sends the next
one to the device before it reads its own tokens (async scheduling), so host and device overlap.
The offline ``LLM`` API drives it to completion; ``AsyncLLM`` drives it from a thread for asyncio
callers.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass
from typing import Any, Sequence as Seq

import numpy as np

from jaxinfer.block_manager import BlockManager
from jaxinfer.buckets import MAX_EOS_IDS, Buckets, StepRow
from jaxinfer.compilation import enable_persistent_cache, install_counter
from jaxinfer.config import ModelConfig, kv_cache_dtype
from jaxinfer.detokenizer import IncrementalDetokenizer
from jaxinfer.engine_config import EngineConfig
from jaxinfer.exported_steps import exported_steps_dir
from jaxinfer.guided_decoding import Grammars, fill_mask
from jaxinfer.kv_cache import plan_cache
from jaxinfer.model_runner import ModelRunner, PendingStep
from jaxinfer.outputs import CompletionOutput, RequestOutput, TokenLogprob
from jaxinfer.sampler import PromptLogprobs, SampleOutput
from jaxinfer.sampling_params import SamplingParams
from jaxinfer.scheduler import Scheduler, SchedulerOutput
from jaxinfer.sequence import FinishReason, Request, Sequence
from jaxinfer.stop_strings import find_stop
from jaxinfer.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

# Odd 64-bit constant (golden ratio) spreading the seeds of a request's n completions apart.
_SEED_STRIDE = 0x9E3779B97F4A7C15


@dataclass(frozen=True)
class _InFlight:
    """A step sent to the device whose tokens the host has not read yet.

    Attributes:
      rows: ``(sequence, tokens it computes, the call computing them, row in that call)``, in the
        scheduler's order.
      decode_only: when the step only decoded: its sequences by batch row (None: padding) and the
        call computing them, which a step sent ahead takes its input tokens from.
    """

    rows: list[tuple[Sequence, int, PendingStep, int]]
    decode_only: tuple[list[Sequence | None], PendingStep] | None


@dataclass
class EngineStats:
    steps: int = 0
    prefill_tokens: int = 0  # prompt (and recomputed) tokens run through the model
    decode_tokens: int = 0  # decode rows run, with those sent ahead for a sequence that then stopped
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
        consume_params: bool = False,
    ):
        self.model_config = model_config
        self.tokenizer = tokenizer
        self.config = engine_config
        max_len = model_config.max_position_embeddings
        self.session_len = engine_config.session_len or max_len
        if self.session_len > max_len:
            raise ValueError(f"session_len {self.session_len} exceeds the model's context length {max_len}")
        self.eos_token_ids = tokenizer.eos_token_ids if tokenizer else frozenset(model_config.eos_token_ids)
        if len(self.eos_token_ids) > MAX_EOS_IDS:
            raise ValueError(f"the model has {len(self.eos_token_ids)} EOS ids; at most {MAX_EOS_IDS} are supported")
        install_counter()
        enable_persistent_cache()
        page_size = engine_config.cache_block_seq_len
        kv_dtype = kv_cache_dtype(dtype, engine_config.kv_cache_dtype)
        self.cache_plan = plan_cache(
            model_config, kv_dtype, page_size, engine_config.cache_max_entry_count,
            self.session_len, engine_config.max_batch_size, engine_config.quant_policy,
        )
        logger.info(self.cache_plan.explanation)
        self.buckets = Buckets.create(
            engine_config.max_batch_size, engine_config.max_prefill_tokens, self.session_len, page_size,
            model_config.vocab_size,
        )
        self.runner = ModelRunner(
            model_config, params, dtype, self.buckets, self.cache_plan.num_pages, engine_config.quant_policy,
            kv_dtype=kv_dtype, exported_steps=exported_steps_dir(), consume_params=consume_params,
        )
        if self.runner.matmul_kernel is not None:
            logger.info("weights packed for the CPU matmul kernel pallas_kernels.%s", self.runner.matmul_kernel)
        self.block_manager = BlockManager(self.cache_plan.num_pages, page_size, engine_config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, engine_config.max_batch_size, engine_config.max_prefill_tokens)
        self.stats = EngineStats()
        self._requests: dict[str, Request] = {}
        self._in_flight: _InFlight | None = None
        self._grammars = Grammars(tokenizer, model_config.vocab_size) if tokenizer else None
        if warmup:
            self.runner.warmup(progress)

    # -- requests ---------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt_token_ids: Seq[int], params: SamplingParams) -> None:
        """Queue a request; a prompt that can never run raises ValueError here, not later."""
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already running")
        prompt = [int(t) for t in prompt_token_ids]
        if not prompt:
            raise ValueError("the prompt is empty")
        vocab = self.model_config.vocab_size
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        if params.logit_bias and params.logit_bias[-1][0] >= vocab:
            raise ValueError(f"logit_bias token ids must be in [0, {vocab})")
        if params.allowed_token_ids and params.allowed_token_ids[-1] >= vocab:
            raise ValueError(f"allowed_token_ids must be in [0, {vocab})")
        if params.prompt_logprobs is not None and self.buckets.prefill_lengths[0] < 2:
            # Only prefill buckets longer than one token return prompt logprobs (decode steps do not).
            raise ValueError("prompt_logprobs needs max_prefill_tokens >= 2")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; this model has none")
        guided = params.guided_decoding
        if guided is not None and self._grammars is None:
            raise ValueError("guided decoding needs a tokenizer; this model has none")
        if guided is not None and params.min_tokens:
            # min_tokens bans EOS where the grammar may allow nothing else
            raise ValueError("min_tokens cannot be combined with guided decoding")
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
        # One matcher per completion, made before anything is queued: a bad grammar raises here.
        matchers = [self._grammars.matcher(guided) if guided is not None else None for _ in range(params.n)]
        base_seed = params.seed if params.seed is not None else secrets.randbits(63)
        request = Request(request_id, prompt, params)
        for i in range(params.n):
            seed = (base_seed + i * _SEED_STRIDE) % 2**63
            detok = IncrementalDetokenizer(self.tokenizer, prompt, params.skip_special_tokens) if self.tokenizer else None
            leader = request.seqs[0] if i else None
            seq = Sequence(request, i, max_tokens, (seed >> 32, seed & 0xFFFFFFFF), detok, leader)
            seq.matcher = matchers[i]
            request.seqs.append(seq)
            self.scheduler.add(seq)
        self._requests[request_id] = request

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and release its pages; None if it is not running."""
        request = self._requests.pop(request_id, None)
        if request is None:
            return None
        for seq in request.seqs:
            if not seq.finished:
                seq.finish_reason = FinishReason.ABORT
                self.scheduler.remove(seq)
        self._forget_finished_flight()
        return self._output(request)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    # -- stepping ----------------------------------------------------------------------------

    def _row(self, seq: Sequence, n: int, ahead: bool = False) -> StepRow:
        """``seq``'s next ``n`` tokens; ``ahead``: the token after the one a step in flight samples
        (its id is fed on device; no history, so no penalties)."""
        start = seq.num_tokens if ahead else seq.num_computed
        p = seq.params
        banned = () if p.ignore_eos else tuple(self.eos_token_ids)
        mask = None
        if seq.matcher is not None and start + n == seq.num_tokens:  # the row samples seq's next token
            mask = np.empty(self.buckets.mask_words, np.int32)
            fill_mask(seq.matcher, mask)
        targets = None
        if seq.request.scores_prompt and not ahead:
            prompt = seq.prompt_token_ids
            targets = [prompt[i + 1] if i + 1 < len(prompt) else None for i in range(start, start + n)]
        return StepRow(
            token_ids=(0,) if ahead else seq.token_ids[start : start + n], start=start, pages=seq.pages,
            sampling=p, seed=seq.seed, num_generated=len(seq.output_token_ids) + ahead,
            history=seq.token_ids if p.penalized and not ahead else None, prompt_len=len(seq.prompt_token_ids),
            banned_ids=banned + p.stop_token_ids, prompt_targets=targets, token_mask=mask,
        )

    def step(self) -> list[RequestOutput]:
        """Run one step; return an output for every request that produced a token or finished.

        With ``async_scheduling``, a decode step whose successor is already known (the same
        sequences, one token further) sends that successor to the device before reading its own
        tokens: the next step's input tokens are fed on device, and the host's work (stop checks,
        text, outputs) overlaps the device's. That step is then still in flight when ``step``
        returns, and the next call completes it."""
        flight, self._in_flight = self._in_flight, None
        if flight is None:
            sched = self.scheduler.schedule()
            self.stats.preemptions += len(sched.preempted)
            if sched.empty:
                return []
            flight = self._dispatch(sched)
        if self.config.async_scheduling:
            self._in_flight = self._dispatch_ahead(flight)
        outputs = self._complete(flight)
        self._forget_finished_flight()
        return outputs

    def _forget_finished_flight(self) -> None:
        """Drop the step in flight if all its sequences have finished: nobody will read it."""
        if self._in_flight is not None and all(seq.finished for seq, *_ in self._in_flight.rows):
            self._in_flight = None

    def _dispatch(self, sched: SchedulerOutput) -> _InFlight:
        self.stats.steps += 1
        rows: list[tuple[Sequence, int, PendingStep, int]] = []
        decode = None
        if sched.decode:
            shape = self.buckets.decode_shape(len(sched.decode))
            decode = self.runner.dispatch([self._row(seq, 1) for seq in sched.decode], shape)
            rows += [(seq, 1, decode, i) for i, seq in enumerate(sched.decode)]
            self.stats.decode_tokens += len(sched.decode)
        prefilled = {}
        for group in self.buckets.prefill_groups([n for _, n in sched.prefill]):
            chunks = [sched.prefill[i] for i in group]
            shape = self.buckets.prefill_shape(max(n for _, n in chunks), len(chunks))
            step = self.runner.dispatch([self._row(seq, n) for seq, n in chunks], shape)
            prefilled.update({i: (seq, n, step, row) for row, (i, (seq, n)) in enumerate(zip(group, chunks))})
            self.stats.prefill_tokens += sum(n for _, n in chunks)
        rows += [prefilled[i] for i in sorted(prefilled)]  # the scheduler's order
        return _InFlight(rows, (list(sched.decode), decode) if decode and not sched.prefill else None)

    def _dispatch_ahead(self, flight: _InFlight) -> _InFlight | None:
        """The decode step after ``flight``, dispatched before ``flight``'s tokens are read, or None
        when the next step is not a plain continuation: ``flight`` prefilled, some running sequence
        was not in it, a waiting sequence could be admitted, a row needs its token history
        (penalties) or its grammar's mask (guided decoding), or pages would have to be preempted.
        Rows whose sequence ends with ``flight``'s token (its length limit) stay in the batch as
        padding, so that every row keeps its place."""
        if flight.decode_only is None:
            return None
        slots, previous = flight.decode_only
        live = [s for s in slots if s is not None and not s.finished]
        if len(live) != len(self.scheduler.running) or any(s.params.penalized or s.matcher for s in live):
            return None
        going = {s for s in live  # those that go on after flight's token
                 if len(s.output_token_ids) + 1 < s.max_tokens and s.num_tokens + 1 < self.session_len}
        room = len(going) < len(live) or len(live) < self.config.max_batch_size
        if not going or self.scheduler.waiting and room:
            return None
        if not self.scheduler.reserve_all([(s, s.num_tokens + 1) for s in going]):
            return None
        ahead = [s if s in going else None for s in slots]
        rows = [self._row(s, 1, ahead=True) if s else None for s in ahead]
        step = self.runner.dispatch(rows, self.buckets.decode_shape(len(slots)), feed=previous)
        self.stats.steps += 1
        self.stats.decode_tokens += len(going)
        return _InFlight([(s, 1, step, i) for i, s in enumerate(ahead) if s], (ahead, step))

    def _complete(self, flight: _InFlight) -> list[RequestOutput]:
        """Read ``flight``'s tokens and apply them; sequences that finished or were aborted since it
        was dispatched are skipped (their rows computed a token nobody reads)."""
        advanced: dict[str, Request] = {}
        for seq, n, step, i in flight.rows:
            if seq.finished:
                continue
            if seq.request.scores_prompt:
                self._append_prompt_logprobs(seq.request, seq.num_computed, n, step.prompt_result(), i)
            seq.num_computed += n
            self.block_manager.register_full_pages(seq.token_ids, seq.pages, seq.block_hashes, seq.num_computed)
            if seq.num_computed == seq.num_tokens:  # the last known token ran: the sample is new
                self._append(seq, step.result(), i)
                advanced[seq.request_id] = seq.request
        outputs = [self._output(r) for r in advanced.values()]
        for r in advanced.values():
            if r.finished:
                del self._requests[r.request_id]
        return outputs

    @staticmethod
    def _append_prompt_logprobs(request: Request, start: int, n: int, out: PromptLogprobs, row: int) -> None:
        """Record the prompt logprobs a prefill row computed for its tokens ``start..start + n``:
        position ``i`` scores prompt token ``i + 1``. A chunk recomputed after a preemption finds
        its entries recorded already."""
        k = request.params.prompt_logprobs
        prompt = request.prompt_token_ids
        for i in range(len(request.prompt_logprobs) - 1, min(start + n, len(prompt) - 1)):
            j = i - start
            top = [(int(t), float(lp)) for t, lp in zip(out.top_ids[row, j, :k], out.top_logprobs[row, j, :k])]
            request.prompt_logprobs.append(TokenLogprob(prompt[i + 1], float(out.logprobs[row, j]), top))

    def _append(self, seq: Sequence, out: SampleOutput, row: int) -> None:
        token = int(out.tokens[row])
        p = seq.params
        seq.output_token_ids.append(token)
        if seq.matcher is not None and not seq.matcher.consume_token(token):
            logger.warning("request %s: the sampled token %d is outside its grammar (%s); stopping it",
                           seq.request_id, token, seq.matcher.get_error())
        if p.logprobs is not None:
            top = [(int(t), float(lp)) for t, lp in zip(out.top_ids[row, : p.logprobs], out.top_logprobs[row, : p.logprobs])]
            seq.output_logprobs.append(TokenLogprob(token, float(out.logprobs[row]), top))
        if token in self.eos_token_ids and not p.ignore_eos or token in p.stop_token_ids:
            seq.finish_reason = FinishReason.STOP
        else:
            detok = seq.detokenizer
            delta = detok.add(token) if detok else ""
            if p.stop and delta and len(seq.output_token_ids) >= p.min_tokens:
                hit = find_stop(detok.text, len(detok.text) - len(delta), p.stop)
                if hit:
                    at, stop = hit
                    seq.final_text = detok.text[: at + (len(stop) if p.include_stop_str_in_output else 0)]
                    seq.finish_reason = FinishReason.STOP
            if not seq.finished and (len(seq.output_token_ids) >= seq.max_tokens or seq.num_tokens >= self.session_len):
                seq.finish_reason = FinishReason.LENGTH
        if not seq.finished and seq.matcher is not None and (seq.matcher.is_stopped() or seq.matcher.is_error()):
            seq.finish_reason = FinishReason.STOP  # the output is complete: the grammar takes no more
        if seq.finished:
            if seq.detokenizer and seq.final_text is None:
                seq.detokenizer.flush()
            self.scheduler.remove(seq)

    def _output(self, request: Request) -> RequestOutput:
        completions = [
            CompletionOutput(
                index=s.index, text=s.text, token_ids=list(s.output_token_ids),
                finish_reason=s.finish_reason.value if s.finish_reason else None,
                logprobs=list(s.output_logprobs) if request.params.logprobs is not None else None,
            )
            for s in request.seqs
        ]
        return RequestOutput(
            request_id=request.request_id,
            prompt_token_ids=request.prompt_token_ids,
            outputs=completions,
            finished=request.finished,
            num_cached_tokens=request.seqs[0].num_cached_tokens,
            prompt_logprobs=None if request.prompt_logprobs is None else list(request.prompt_logprobs),
        )
