"""Logits at every position of whole sequences (for perplexity and for checks against HF)."""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.config import ModelConfig
from jaxinfer.kv_cache import TRASH_PAGE, AttentionMetadata, KVCache
from jaxinfer.model import LlamaModel


@functools.partial(jax.jit, static_argnums=(0,))
def _all_logits(model: LlamaModel, params, tokens, meta, cache):
    hidden, _ = model.apply({"params": params}, tokens, meta, cache)
    return model.apply({"params": params}, hidden, method=LlamaModel.logits)


def sequence_logits(config: ModelConfig, params: Any, sequences: Sequence[Sequence[int]], dtype=jnp.float32) -> list[np.ndarray]:
    """Float32 logits ``[len_i, vocab]`` of each sequence, all run as one padded batch.

    Each row gets one page as long as the longest sequence in a throwaway cache.
    """
    batch, length = len(sequences), max(len(s) for s in sequences)
    tokens = np.zeros((batch, length), np.int32)
    slots = np.full((batch, length), TRASH_PAGE * length, np.int32)
    for i, s in enumerate(sequences):
        tokens[i, : len(s)] = s
        slots[i, : len(s)] = (i + 1) * length + np.arange(len(s))
    meta = AttentionMetadata(
        positions=np.tile(np.arange(length, dtype=np.int32), (batch, 1)),
        slot_mapping=slots,
        block_tables=np.arange(1, batch + 1, dtype=np.int32)[:, None],
        seq_lens=np.array([len(s) for s in sequences], np.int32),
    )
    cache = KVCache.allocate(config, batch + 1, length, dtype)
    logits = np.asarray(_all_logits(LlamaModel(config, dtype), params, tokens, meta, cache))
    return [logits[i, : len(s)] for i, s in enumerate(sequences)]
