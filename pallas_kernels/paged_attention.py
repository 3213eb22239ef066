"""Attention of a chunk of query tokens over a paged KV cache (layout: ``paged_kv``).

One reference covers decode (``q_len == 1``) and chunked prefill (``q_len > 1``, earlier context
in the pages, causal inside the chunk). The keys and values of the query tokens themselves are
already written to the pages when attention runs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.paged_kv import MASK_VALUE, dequantize_kv, validate_paged_inputs

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
    pages_per_iteration: int = 1,
    k_scale_zero: jax.Array | None = None,
    v_scale_zero: jax.Array | None = None,
    kv_bits: int = 0,
) -> jax.Array:
    """Pure-jnp paged attention: an online softmax over the pages, a few pages per iteration.

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
      pages_per_iteration: pages read per loop iteration: fewer iterations, but more than one
        page costs a transpose of what is read.
      k_scale_zero, v_scale_zero: ``[num_pages, kv_heads, page_size, 2]`` when ``kv_bits`` is 8
        or 4 (quantized pages, see the module docstring).

    Returns:
      ``[batch, q_len, heads, head_dim]`` in q's dtype; softmax is computed in float32.
    """
    validate_paged_inputs(q, k_pages, v_pages, block_tables, seq_lens, q_positions, kv_bits)
    if kv_bits and (k_scale_zero is None or v_scale_zero is None):
        raise ValueError("quantized pages need k_scale_zero and v_scale_zero")
    q, k_pages, v_pages, block_tables, seq_lens, q_positions = map(
        jnp.asarray, (q, k_pages, v_pages, block_tables, seq_lens, q_positions)
    )
    batch, q_len, heads, head_dim = q.shape
    kv_heads, page_size = k_pages.shape[1], k_pages.shape[2]
    group = heads // kv_heads
    per_iter = max(1, min(pages_per_iteration, block_tables.shape[1]))
    keys_per_iter = per_iter * page_size
    block_tables = jnp.pad(block_tables, ((0, 0), (0, -block_tables.shape[1] % per_iter)))  # TRASH pads

    # Queries of one KV group side by side, [batch, kv_heads, q_len * group, head_dim]: both
    # products are then plain batched matmuls, which XLA:CPU runs far faster than 5-d einsums.
    qg = q.reshape(batch, q_len, kv_heads, group, head_dim).transpose(0, 2, 1, 3, 4)
    qg = qg.reshape(batch, kv_heads, q_len * group, head_dim)
    q_pos = jnp.repeat(q_positions, group, axis=1)[:, None, :, None]  # [batch, 1, q_len*group, 1]
    lens = seq_lens[:, None, None, None]

    def step(i, carry):
        m, l, acc = carry  # [b, k, q], [b, k, q], [b, k, q, d]
        pages = jax.lax.dynamic_slice_in_dim(block_tables, i * per_iter, per_iter, 1)
        # Block tables only hold valid page ids (padding points at the trash page); without the
        # bounds checks of the default mode this gather runs 6x faster on XLA:CPU.
        k = k_pages.at[pages].get(mode="promise_in_bounds")  # [batch, per_iter, kv_heads, page_size, head_dim]
        v = v_pages.at[pages].get(mode="promise_in_bounds")
        if kv_bits:
            k = dequantize_kv(k, k_scale_zero.at[pages].get(mode="promise_in_bounds"), kv_bits)
            v = dequantize_kv(v, v_scale_zero.at[pages].get(mode="promise_in_bounds"), kv_bits)
        if per_iter == 1:
            k, v = k[:, 0], v[:, 0]
        else:
            k = k.transpose(0, 2, 1, 3, 4).reshape(batch, kv_heads, keys_per_iter, head_dim)
            v = v.transpose(0, 2, 1, 3, 4).reshape(batch, kv_heads, keys_per_iter, head_dim)
        s = jnp.einsum("bkqd,bkld->bkql", qg, k, preferred_element_type=jnp.float32) * scale
        key_pos = i * keys_per_iter + jnp.arange(keys_per_iter, dtype=jnp.int32)
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
    num_iters = (jnp.max(seq_lens) + keys_per_iter - 1) // keys_per_iter
    _, l, acc = jax.lax.fori_loop(0, num_iters, step, init)
    o = acc / jnp.maximum(l, 1e-30)[..., None]  # padding rows saw no key: l == 0
    o = o.reshape(batch, kv_heads, q_len, group, head_dim).transpose(0, 2, 1, 3, 4)
    return o.reshape(batch, q_len, heads, head_dim).astype(q.dtype)


PAGES_PER_ITERATION = 1


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
    k_scale_zero: jax.Array | None = None,
    v_scale_zero: jax.Array | None = None,
    kv_bits: int = 0,
) -> jax.Array:
    """The engine's dispatch point for paged attention (shapes as in the reference).

    Every backend runs the jnp reference until a Pallas kernel is registered here for GPUs.
    """
    return paged_attention_reference(
        q, k_pages, v_pages, block_tables, seq_lens, q_positions,
        scale=scale, sliding_window=sliding_window, pages_per_iteration=PAGES_PER_ITERATION,
        k_scale_zero=k_scale_zero, v_scale_zero=v_scale_zero, kv_bits=kv_bits,
    )
