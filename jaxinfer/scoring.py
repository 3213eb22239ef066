"""Whole sequences through the model at once: logits at every position (for perplexity and for
checks against HF), and the cache layout that such one-shot runs use."""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.config import ModelConfig, activation_dtype, kv_cache_dtype
from jaxinfer.kv_cache import TRASH_PAGE, AttentionMetadata, KVCache
from jaxinfer.model import LlamaModel, fuse_qkv_params


def contiguous_metadata(lengths: Sequence[int], length: int) -> AttentionMetadata:
    """Metadata for running sequences of ``lengths`` from position 0, padded to ``length``: row
    ``i`` owns page ``i + 1`` of a cache whose pages are ``length`` tokens long."""
    batch = len(lengths)
    slots = np.full((batch, length), TRASH_PAGE * length, np.int32)
    for i, n in enumerate(lengths):
        slots[i, :n] = (i + 1) * length + np.arange(n)
    return AttentionMetadata(
        positions=np.tile(np.arange(length, dtype=np.int32), (batch, 1)),
        slot_mapping=slots,
        block_tables=np.arange(1, batch + 1, dtype=np.int32)[:, None],
        seq_lens=np.asarray(lengths, np.int32),
    )


@functools.partial(jax.jit, static_argnums=(0,))
def _all_logits(model: LlamaModel, params, tokens, meta, cache):
    hidden, _ = model.apply({"params": params}, tokens, meta, cache)
    return model.apply({"params": params}, hidden, method=LlamaModel.logits)


def sequence_logits(config: ModelConfig, params: Any, sequences: Sequence[Sequence[int]], dtype=jnp.float32,
                    quant_policy: int = 0, fused_qkv: bool = False) -> list[np.ndarray]:
    """Float32 logits ``[len_i, vocab]`` of each sequence, all run as one padded batch in a
    throwaway cache (one page per row, as long as the longest sequence; K/V quantized as
    ``quant_policy`` says, else in ``kv_cache_dtype(dtype)``, as the engine keeps them by default,
    so their effect is in the logits). ``params`` is the canonical tree; with
    ``fused_qkv`` the model runs it as the engine does, q/k/v fused."""
    length = max(len(s) for s in sequences)
    tokens = np.zeros((len(sequences), length), np.int32)
    for i, s in enumerate(sequences):
        tokens[i, : len(s)] = s
    meta = contiguous_metadata([len(s) for s in sequences], length)
    act = activation_dtype(dtype)
    cache = KVCache.allocate(config, len(sequences) + 1, length, kv_cache_dtype(dtype), quant_policy)
    if fused_qkv:
        params = fuse_qkv_params(params, config)
    logits = np.asarray(_all_logits(LlamaModel(config, act, fused_qkv), params, tokens, meta, cache))
    return [logits[i, : len(s)] for i, s in enumerate(sequences)]
