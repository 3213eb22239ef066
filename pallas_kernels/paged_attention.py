"""Attention of a chunk of query tokens over a paged KV cache.

The cache is a pool of pages per layer, ``[num_pages, kv_heads, page_size, head_dim]``; a sequence
owns the pages listed in its row of ``block_tables`` and its token ``t`` lives at page
``block_tables[b, t // page_size]``, row ``t % page_size`` of each head's block. The keys and values of the query tokens
themselves are already written to the pages when attention runs.

One function covers decode (``q_len == 1``) and chunked prefill (``q_len > 1``, earlier context in
the pages, causal inside the chunk).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# Finite, so that fully masked (padding) rows give a finite garbage row instead of NaNs.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


def _validate(q, k_pages, v_pages, block_tables, seq_lens, q_positions):
    if q.ndim != 4:
        raise ValueError(f"q must be [batch, q_len, heads, head_dim], got shape {q.shape}")
    if k_pages.ndim != 4 or k_pages.shape != v_pages.shape:
        raise ValueError(
            "k_pages and v_pages must both be [num_pages, kv_heads, page_size, head_dim], "
            f"got {k_pages.shape} and {v_pages.shape}"
        )
    batch, q_len, heads, head_dim = q.shape
    kv_heads = k_pages.shape[1]
    if k_pages.shape[3] != head_dim:
        raise ValueError(f"head_dim of q ({head_dim}) and pages ({k_pages.shape[3]}) differ")
    if heads % kv_heads:
        raise ValueError(f"query heads ({heads}) must be a multiple of kv heads ({kv_heads})")
    if block_tables.ndim != 2 or block_tables.shape[0] != batch:
        raise ValueError(f"block_tables must be [batch={batch}, pages], got {block_tables.shape}")
    if seq_lens.shape != (batch,):
        raise ValueError(f"seq_lens must be [batch={batch}], got {seq_lens.shape}")
    if q_positions.shape != (batch, q_len):
        raise ValueError(f"q_positions must be [batch={batch}, q_len={q_len}], got {q_positions.shape}")


def paged_attention_reference(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    block_tables: jax.Array,
    seq_lens: jax.Array,
    q_positions: jax.Array,
    *,
    scale: float,
    sliding_window: int | None = None,
) -> jax.Array:
    """Pure-jnp paged attention: an online softmax over the pages, one page per iteration.

    The loop runs only as far as the longest sequence in the batch, so block tables can be as
    wide as the longest possible sequence without costing time or a recompilation per length.

    Args:
      q: ``[batch, q_len, heads, head_dim]`` queries.
      k_pages, v_pages: ``[num_pages, kv_heads, page_size, head_dim]`` page pools.
      block_tables: ``[batch, pages_per_seq]`` int32 page ids of each sequence.
      seq_lens: ``[batch]`` int32 tokens in each sequence's context, this chunk included
        (0 for padding rows).
      q_positions: ``[batch, q_len]`` int32 absolute position of each query token.
      scale: softmax scale, usually ``head_dim ** -0.5``.
      sliding_window: if set, a query at position p sees keys in ``(p - window, p]``.

    Returns:
      ``[batch, q_len, heads, head_dim]`` in q's dtype; softmax is computed in float32.
    """
    _validate(q, k_pages, v_pages, block_tables, seq_lens, q_positions)
    q, k_pages, v_pages, block_tables, seq_lens, q_positions = map(
        jnp.asarray, (q, k_pages, v_pages, block_tables, seq_lens, q_positions)
    )
    batch, q_len, heads, head_dim = q.shape
    kv_heads, page_size = k_pages.shape[1], k_pages.shape[2]
    group = heads // kv_heads

    # Queries of one KV group side by side, [batch, kv_heads, q_len * group, head_dim]: both
    # products are then plain batched matmuls, which XLA:CPU runs far faster than 5-d einsums.
    qg = q.reshape(batch, q_len, kv_heads, group, head_dim).transpose(0, 2, 1, 3, 4)
    qg = qg.reshape(batch, kv_heads, q_len * group, head_dim)
    q_pos = jnp.repeat(q_positions, group, axis=1)[:, None, :, None]  # [batch, 1, q_len*group, 1]
    lens = seq_lens[:, None, None, None]

    def step(i, carry):
        m, l, acc = carry  # [b, k, q], [b, k, q], [b, k, q, d]
        pages = jax.lax.dynamic_index_in_dim(block_tables, i, 1, keepdims=False)
        # Block tables only hold valid page ids (padding points at the trash page); without the
        # bounds checks of the default mode this gather runs 6x faster on XLA:CPU.
        k = k_pages.at[pages].get(mode="promise_in_bounds")  # [batch, kv_heads, page_size, head_dim]
        v = v_pages.at[pages].get(mode="promise_in_bounds")
        s = jnp.einsum("bkqd,bkld->bkql", qg, k, preferred_element_type=jnp.float32) * scale
        key_pos = i * page_size + jnp.arange(page_size, dtype=jnp.int32)
        visible = (key_pos <= q_pos) & (key_pos < lens)
        if sliding_window is not None:
            visible &= key_pos > q_pos - sliding_window
        s = jnp.where(visible, s, MASK_VALUE)
        m_new = jnp.maximum(m, s.max(-1))
        p = jnp.where(visible, jnp.exp(s - m_new[..., None]), 0.0)
        correction = jnp.exp(m - m_new)
        l = l * correction + p.sum(-1)
        pv = jnp.einsum("bkql,bkld->bkqd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return m_new, l, acc * correction[..., None] + pv

    rows = q_len * group
    init = (
        jnp.full((batch, kv_heads, rows), MASK_VALUE, jnp.float32),
        jnp.zeros((batch, kv_heads, rows), jnp.float32),
        jnp.zeros((batch, kv_heads, rows, head_dim), jnp.float32),
    )
    num_iters = (jnp.max(seq_lens) + page_size - 1) // page_size
    _, l, acc = jax.lax.fori_loop(0, num_iters, step, init)
    o = acc / jnp.maximum(l, 1e-30)[..., None]  # padding rows saw no key: l == 0
    o = o.reshape(batch, kv_heads, q_len, group, head_dim).transpose(0, 2, 1, 3, 4)
    return o.reshape(batch, q_len, heads, head_dim).astype(q.dtype)


def paged_attention(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    block_tables: jax.Array,
    seq_lens: jax.Array,
    q_positions: jax.Array,
    *,
    scale: float,
    sliding_window: int | None = None,
) -> jax.Array:
    """The engine's dispatch point for paged attention (shapes as in the reference).

    Every backend runs the jnp reference until a Pallas kernel is registered here for GPUs.
    """
    return paged_attention_reference(
        q, k_pages, v_pages, block_tables, seq_lens, q_positions,
        scale=scale, sliding_window=sliding_window,
    )
