"""Runs padded steps of the model on device: owns the params, the page pools and the jitted step.

The step is one pure function ``(params, cache, inputs) -> (next tokens, cache)``: embed, all
layers over the paged cache, logits of each row's last token, sampling. The cache is donated, so
XLA updates the page pools in place.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from tqdm.auto import tqdm

from jaxinfer.buckets import Buckets, StepArrays, StepRow
from jaxinfer.config import ModelConfig
from jaxinfer.kv_cache import AttentionMetadata, KVCache
from jaxinfer.model import LlamaModel, fuse_qkv_params
from jaxinfer.sampler import SampleOutput, SamplingTensors, sample


def _model_step(model: LlamaModel, params, cache: KVCache, tokens, meta: AttentionMetadata, logits_indices, sampling):
    """tokens ``[batch, q_len]`` -> sampled next tokens (and logprobs) of each row, updated cache."""
    hidden, cache = model.apply({"params": params}, tokens, meta, cache)
    last = jnp.take_along_axis(hidden, logits_indices[:, None, None], axis=1)[:, 0]  # [batch, embed]
    logits = model.apply({"params": params}, last, method=LlamaModel.logits)
    return sample(logits, sampling), cache


class ModelRunner:
    def __init__(self, config: ModelConfig, params: Any, dtype, buckets: Buckets, num_pages: int, quant_policy: int = 0,
                 fused_qkv: bool = True):
        """``params``: the canonical tree. The runner keeps it with q/k/v fused (one larger matmul
        instead of three small ones) unless ``fused_qkv`` is False."""
        self.config = config
        self.params = fuse_qkv_params(params, config) if fused_qkv else params
        self.buckets = buckets
        self.model = LlamaModel(config, dtype, fused_qkv)
        self.cache = KVCache.allocate(config, num_pages, buckets.page_size, dtype, quant_policy)
        self._step = jax.jit(functools.partial(_model_step, self.model), donate_argnums=(1,))
        self._no_history: dict[int, jax.Array] = {}  # per batch size: the all-padding history

    def execute(self, rows: Sequence[StepRow], shape: tuple[int, int]) -> SampleOutput:
        """Run ``rows`` padded to ``shape``; returns host arrays with one entry per row."""
        a = self.buckets.pad(rows, shape)
        out, self.cache = self._step(self.params, self.cache, *self._device_inputs(a))
        return jax.tree.map(lambda x: x[: len(rows)], jax.device_get(out))

    def _device_inputs(self, a: StepArrays):
        meta = AttentionMetadata(
            positions=a.positions, slot_mapping=a.slot_mapping, block_tables=a.block_tables, seq_lens=a.seq_lens
        )
        history = a.history
        if history is None:
            batch = a.tokens.shape[0]
            if batch not in self._no_history:
                self._no_history[batch] = jnp.full((batch, self.buckets.history_len), self.buckets.vocab_size, jnp.int32)
            history = self._no_history[batch]
        return a.tokens, meta, a.logits_indices, SamplingTensors(history=history, **a.sampling)

    def warmup(self, progress: bool = True) -> None:
        """Compile every bucket shape (all-padding rows, which only touch the trash page)."""
        shapes = self.buckets.all_shapes()
        for shape in tqdm(shapes, desc="compiling shape buckets", unit="shape", disable=not progress):
            out, self.cache = self._step(self.params, self.cache, *self._device_inputs(self.buckets.pad([], shape)))
            jax.block_until_ready(out)
