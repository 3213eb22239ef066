"""Runs padded steps of the model on device: owns the params, the page pools and the jitted step.

The step is one pure function ``(params, cache, inputs) -> (logits, cache)``: embed, all layers
over the paged cache, logits of each row's last token. Prefill steps also return the logprobs of
the prompt tokens their positions predict, computed only when a row asks. The cache is donated,
so XLA updates the page pools in place. Sampling (``jaxinfer.sampler.sample``) is a second
program the step's logits go to on device: its compile depends only on the batch size, and
compiled into every shape bucket's step it was most of the step's compile (SmolLM2-135M, 1.26 of
1.42 s at batch 1; exploratory). Warm-up compiles the step for every shape bucket and the sampler
for every batch size, from the traced programs an earlier start saved when it can
(``jaxinfer.exported_steps``); a shape not warmed up is traced and compiled by ``jax.jit`` when
first run.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxinfer.buckets import Buckets, StepArrays, StepRow
from jaxinfer.config import ModelConfig, activation_dtype, kv_cache_dtype
from jaxinfer.exported_steps import can_export, lower_saved
from jaxinfer.kv_cache import AttentionMetadata, KVCache
from jaxinfer.home import jaxinfer_home
from jaxinfer.host_memory import keep_freed_memory, release_freed_memory
from jaxinfer.huge_pages import parts_to_huge_pages
from jaxinfer.model import CPU_MATMULS, LlamaModel, fuse_qkv_params, pack_cpu_weights, rope_table
from jaxinfer.sampler import PromptLogprobs, SampleOutput, SamplingTensors, sample, token_logprobs
from jaxinfer.sampling_params import MAX_LOGPROBS
from pallas_kernels import cpu_native, dispatch

# Positions whose prompt logprobs one pass computes: its logits ``[PROMPT_SCORE_ROWS, vocab]``
# are the largest temporary (SmolLM2: 50 MB in float32).
PROMPT_SCORE_ROWS = 256


def _feed_tokens(previous, tokens, fed):
    """Decode-step input tokens ``[batch, 1]``: the previous step's sampled tokens ``[batch]`` on
    the rows where ``fed`` is set, the host's ``tokens`` elsewhere (padding)."""
    return jnp.where(fed[:, None], previous[:, None], tokens)


class PendingStep:
    """A dispatched step: its outputs stay on device until ``result`` (or ``prompt_result``)
    first reads them."""

    def __init__(self, out: SampleOutput, prompt: PromptLogprobs | None, num_rows: int):
        self.device_out = out
        self._device_prompt = prompt
        self._num_rows = num_rows
        self._host: SampleOutput | None = None
        self._host_prompt: PromptLogprobs | None = None

    def result(self) -> SampleOutput:
        """Host arrays with one entry per row; waits for the step to finish."""
        if self._host is None:
            self._host = jax.tree.map(lambda x: x[: self._num_rows], jax.device_get(self.device_out))
        return self._host

    def prompt_result(self) -> PromptLogprobs:
        """The prompt logprobs of a prefill step, as host arrays with one entry per row."""
        if self._host_prompt is None:
            self._host_prompt = jax.tree.map(lambda x: x[: self._num_rows], jax.device_get(self._device_prompt))
        return self._host_prompt


def _score_prompt(model: LlamaModel, params, hidden, targets) -> PromptLogprobs:
    """hidden ``[batch, q_len, embed]`` -> the logprob of ``targets[b, i]`` (``[batch, q_len]``
    token ids; ``vocab_size`` where there is none) at each position, and the top alternatives;
    the logits are computed only when some position has a target, ``PROMPT_SCORE_ROWS`` positions
    at a time."""
    batch, q_len, embed = hidden.shape
    vocab = model.config.vocab_size
    rows = batch * q_len
    block = min(rows, PROMPT_SCORE_ROWS)
    blocks = -(-rows // block)

    def score():
        h = jnp.pad(hidden.reshape(rows, embed), ((0, blocks * block - rows), (0, 0))).reshape(blocks, block, embed)
        t = jnp.pad(jnp.minimum(targets.reshape(rows), vocab - 1), (0, blocks * block - rows)).reshape(blocks, block)

        def one(block_args):
            h, t = block_args
            return token_logprobs(model.apply({"params": params}, h, method=LlamaModel.logits), t)

        return PromptLogprobs(*(x.reshape(blocks * block, *x.shape[2:])[:rows].reshape(batch, q_len, *x.shape[2:])
                                for x in jax.lax.map(one, (h, t))))

    def none():
        top = jnp.zeros((batch, q_len, MAX_LOGPROBS), jnp.float32)
        return PromptLogprobs(jnp.zeros((batch, q_len), jnp.float32), top.astype(jnp.int32), top)

    return jax.lax.cond(jnp.any(targets < vocab), score, none)


def _model_step(model: LlamaModel, param_def, param_leaves, cache: KVCache, rope_table, tokens, meta: AttentionMetadata,
                logits_indices, prompt_targets):
    """tokens ``[batch, q_len]`` -> logits ``[batch, vocab]`` of each row's token at
    ``logits_indices``, the prompt logprobs of ``prompt_targets`` when ``q_len > 1`` (else None:
    decode steps compute none), updated cache.
    The params come as the leaves of the tree ``param_def`` describes: a call flattens a tuple
    faster than nested dicts (SmolLM2 on the Zen 4, exploratory: 0.27-0.31 ms less host CPU per
    batch-1 step, ~13%; the steps themselves 1.00-1.03x, within noise)."""
    params = jax.tree.unflatten(param_def, param_leaves)
    hidden, cache = model.apply({"params": params}, tokens, meta, cache, rope_table)
    last = jnp.take_along_axis(hidden, logits_indices[:, None, None], axis=1)[:, 0]  # [batch, embed]
    logits = model.apply({"params": params}, last, method=LlamaModel.logits)
    prompt = _score_prompt(model, params, hidden, prompt_targets) if tokens.shape[1] > 1 else None
    return logits, prompt, cache


# Every runner's sampler: it depends on the batch size and the sampling tensors' shapes only, so
# runners of one process with the same vocabulary (a test session's) share its traced programs.
_sample = jax.jit(sample)


class ModelRunner:
    def __init__(self, config: ModelConfig, params: Any, dtype, buckets: Buckets, num_pages: int, quant_policy: int = 0,
                 fused_qkv: bool = True, exported_steps: str | None = None, kv_dtype=None, consume_params: bool = False):
        """``params``: the canonical tree. The runner keeps it with q/k/v fused (one larger matmul
        instead of three small ones) unless ``fused_qkv`` is False. ``exported_steps``: a directory
        where warm-up loads and saves each bucket's traced step; None traces them in process.
        ``dtype``: the weights' (``activation_dtype`` gives the activations'); ``kv_dtype``: the
        unquantized cache's, by default ``kv_cache_dtype(dtype)``.
        On CPU it turns on jaxinfer's CPU kernels (``pallas_kernels.cpu_native``), and weights
        under float32 activations are packed for the matmul kernel of their dtype when it can run
        (``self.matmul_kernel`` names it: ``bf16_matmul`` for bfloat16, ``f32_matmul`` for float32).
        On CPU the weights are then copied into huge pages (``jaxinfer.huge_pages``): the runner holds
        its own copy, and a caller that keeps ``params`` alive keeps a second one. With
        ``consume_params`` the runner empties the ``params`` dict as it lays the weights out, entry by
        entry, so that each source array is freed once copied (for callers that own the tree). On
        CPU the C heap then keeps freed pages for the next step's buffers
        (``host_memory.keep_freed_memory``)."""
        self.config = config
        self.buckets = buckets
        act = activation_dtype(dtype)
        self.kernels = (cpu_native.enable(os.path.join(jaxinfer_home(), "native")) if dispatch.cpu_kernels()
                        else cpu_native.CpuKernels())
        self.matmul_kernel = next(
            (name for name, (w_dtype, *_) in CPU_MATMULS.items()
             if jnp.dtype(dtype) == w_dtype and jnp.dtype(act) == jnp.float32 and getattr(self.kernels, name)),
            None)
        def layout(part):
            part = fuse_qkv_params(part, config) if fused_qkv else part
            return part if self.matmul_kernel is None else pack_cpu_weights(part, config, self.matmul_kernel)

        def parts():
            # Part by part (a layer, the embedding...), so that start-up holds the source, the laid
            # out copy and one part in flight, not the source and two whole copies; the pages of
            # each consumed part go back to the OS before the next part is laid out.
            for key in list(params):
                yield layout({key: params.pop(key) if consume_params else params[key]})
                if consume_params:
                    release_freed_memory()

        shapes = jax.eval_shape(layout, params)
        leaves, self._param_def = jax.tree.flatten(parts_to_huge_pages(shapes, parts(), jax.devices()[0]))
        self._param_leaves = tuple(leaves)
        self.model = LlamaModel(config, act, fused_qkv)
        kv_dtype = jnp.dtype(kv_dtype or kv_cache_dtype(dtype))
        # Committed to its device, as every step's output cache is: the first step then runs the
        # program warm-up prepared for it instead of tracing one for an uncommitted cache.
        self.cache = jax.device_put(KVCache.allocate(config, num_pages, buckets.page_size, kv_dtype, quant_policy),
                                    jax.devices()[0])
        self.rope_table = jax.device_put(rope_table(config, buckets.history_len), jax.devices()[0])
        self._step_fn = functools.partial(_model_step, self.model, self._param_def)
        self._step = jax.jit(self._step_fn, donate_argnums=(1,))
        self._program = (f"model step: {config!r}, {jnp.dtype(dtype)} weights, {jnp.dtype(act)} activations, "
                         f"{kv_dtype} KV cache, fused_qkv={fused_qkv}, quant_policy={quant_policy}, "
                         f"matmul_kernel={self.matmul_kernel}, {self.kernels}, params {self._param_def}")
        self._exported_steps = exported_steps
        self._warm_steps: dict[tuple[int, int], jax.stages.Compiled] = {}  # bucket shape -> compiled by warm-up
        self._warm_samplers: dict[int, jax.stages.Compiled] = {}  # batch size -> compiled by warm-up
        self._no_history: dict[int, jax.Array] = {}  # per batch size: the all-padding history
        self._no_mask: dict[int, jax.Array] = {}  # per batch size: a token mask allowing every token
        self._feed = jax.jit(_feed_tokens)
        self._warm_feeds: dict[int, jax.stages.Compiled] = {}  # decode batch size -> compiled by warm-up
        if jax.devices()[0].platform == "cpu":
            keep_freed_memory()  # steps reuse the pages of the steps before (jaxinfer.host_memory)

    @property
    def params(self) -> Any:
        """The params the step runs on (fused, packed, in huge pages), as a tree."""
        return jax.tree.unflatten(self._param_def, self._param_leaves)

    def execute(self, rows: Sequence[StepRow], shape: tuple[int, int]) -> SampleOutput:
        """Run ``rows`` padded to ``shape``; returns host arrays with one entry per row."""
        return self.dispatch(rows, shape).result()

    def dispatch(self, rows: Sequence[StepRow | None], shape: tuple[int, int],
                 feed: PendingStep | None = None) -> PendingStep:
        """Start a step of ``rows`` (None: a padding row) padded to ``shape``, without waiting for
        it. ``feed``: a decode step of the same shape still in flight; the rows that are not None
        take their input token from its sampled tokens, on device, instead of from ``token_ids``."""
        a = self.buckets.pad(rows, shape)
        if feed is not None:
            fed = np.array([r is not None for r in rows] + [False] * (shape[0] - len(rows)))
            feed_tokens = self._warm_feeds.get(shape[0], self._feed)
            a = dataclasses.replace(a, tokens=feed_tokens(feed.device_out.tokens, a.tokens, fed))
        return PendingStep(*self._run(shape, a), len(rows))

    def _run(self, shape: tuple[int, int], a: StepArrays) -> tuple[SampleOutput, PromptLogprobs | None]:
        inputs, sampling = self._device_inputs(a)
        logits, prompt, self.cache = self._warm_steps.get(shape, self._step)(self._param_leaves, self.cache,
                                                                             self.rope_table, *inputs)
        return self._warm_samplers.get(shape[0], _sample)(logits, sampling), prompt

    def _device_inputs(self, a: StepArrays) -> tuple[tuple, SamplingTensors]:
        """The step's inputs after the params, cache and rope table; the sampler's tensors."""
        meta = AttentionMetadata(
            positions=a.positions, slot_mapping=a.slot_mapping, block_tables=a.block_tables, seq_lens=a.seq_lens
        )
        batch = a.tokens.shape[0]
        history, token_mask = a.history, a.token_mask
        if history is None:
            if batch not in self._no_history:
                self._no_history[batch] = jnp.full((batch, self.buckets.history_len), self.buckets.vocab_size, jnp.int32)
            history = self._no_history[batch]
        if token_mask is None:
            if batch not in self._no_mask:
                self._no_mask[batch] = jnp.full((batch, self.buckets.mask_words), -1, jnp.int32)
            token_mask = self._no_mask[batch]
        sampling = SamplingTensors(history=history, token_mask=token_mask, **a.sampling)
        return (a.tokens, meta, a.logits_indices, a.prompt_targets), sampling

    def warmup(self, progress: bool = True) -> None:
        """Compile every bucket shape, the sampler for each of their batch sizes and each decode
        bucket's token feed ahead of time, running none. This thread lowers each program (traces
        it, or loads the program an earlier start saved) while a pool compiles those lowered
        before: XLA compiles without the GIL, so compiles overlap each other and the tracing. A
        compiled program refuses arguments of other shapes or types instead of compiling again."""
        shapes = self.buckets.all_shapes()
        batches = self.buckets.batch_sizes
        device = jax.devices()[0]
        with (ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool,
              tqdm(total=len(shapes) + len(batches), desc="compiling shape buckets and samplers", unit="program",
                   disable=not progress) as bar):
            compiling, samplers = {}, {}
            for batch in batches:
                samplers[batch] = pool.submit(self._lower_sampler(batch).compile)
                samplers[batch].add_done_callback(lambda _: bar.update())
            for shape in shapes:
                compiling[shape] = pool.submit(self._lower(shape).compile)
                compiling[shape].add_done_callback(lambda _: bar.update())
            feeds = {}
            for batch in self.buckets.decode_batch_sizes:
                previous = jax.device_put(np.zeros(batch, np.int32), device)  # as a step's output: committed
                lowered = self._feed.lower(previous, np.zeros((batch, 1), np.int32), np.zeros(batch, bool))
                feeds[batch] = pool.submit(lowered.compile)
            for shape, compiled in compiling.items():
                self._warm_steps[shape] = compiled.result()
            self._warm_samplers = {batch: compiled.result() for batch, compiled in samplers.items()}
            self._warm_feeds = {batch: compiled.result() for batch, compiled in feeds.items()}
        release_freed_memory()  # what tracing and compiling used

    def _lower(self, shape: tuple[int, int]) -> jax.stages.Lowered:
        inputs, _ = self._device_inputs(self.buckets.pad([], shape))
        args = (self._param_leaves, self.cache, self.rope_table, *inputs)
        if self._exported_steps is not None and can_export():
            return lower_saved(self._step_fn, args, self._program, (1,), self._exported_steps)
        return self._step.lower(*args)

    def _lower_sampler(self, batch: int) -> jax.stages.Lowered:
        # The logits as a step leaves them: float32, committed to the device.
        logits = jax.ShapeDtypeStruct((batch, self.config.vocab_size), jnp.float32,
                                      sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))
        _, sampling = self._device_inputs(self.buckets.pad([], (batch, 1)))
        if self._exported_steps is not None and can_export():
            return lower_saved(sample, (logits, sampling), "sampler", (), self._exported_steps)
        return _sample.lower(logits, sampling)
