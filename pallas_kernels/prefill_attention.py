"""Causal flash attention of a prefill chunk over a paged KV cache (Pallas, Triton backend).

Chunked prefill and prefix caching attend a chunk of ``q_len`` new tokens to their whole context:
the earlier tokens' K/V live in the pages (layout: ``paged_kv``) and the chunk's own K/V are
already written there too, so one loop over the sequence's pages covers both, causal inside the
chunk. A chunk's real tokens occupy positions ``seq_len - n .. seq_len - 1``; the rows after them
are padding with position 0, whose outputs are ignored but finite.

The grid is ``(batch, kv_heads, row blocks)``: a KV head's query heads are flattened with the
chunk's tokens into rows (``row = token * group + head``), so one page read serves every query
head of the group, and any group size fills power-of-two blocks with padding only at the end.

Quantized pages (``PagedKV.bits`` 8 or 4) are dequantized algebraically: with ``k = c * s + z`` per
key, ``q . k = s * (q . c) + z * sum(q)``, and ``p . v = (p * s) . c + (p . z)``, so the dots run
on the raw codes. For 4 bits, ``q`` is split into its even and odd head_dim elements, which meet
the low and high nibbles of each byte; the output's two halves are interleaved back in jnp.
"""

from __future__ import annotations

import functools
import operator

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.paged_kv import MASK_VALUE, PagedKV, code_parts, dequantize_kv, validate_paged_inputs

HEAD_DIMS = (64, 128)
PAGE_SIZES = (16, 32, 64)
_INT32_MAX = int(np.iinfo(np.int32).max)


def _prefill_kernel(
    tables_ref,  # [pages_per_seq] page ids of this sequence
    seq_len_ref,  # [1]
    q_pos_ref,  # [block_rows] absolute position of each row's token
    q_ref,  # [parts, block_rows, head_dim // parts]
    k_ref,  # [num_pages, page_size, stored] this KV head's pool
    v_ref,
    *refs,  # quantized: k_scale_zero, v_scale_zero [num_pages, page_size, 2]; then the output
    scale: float,
    sliding_window: int | None,
    group: int,
    pages_per_iteration: int,
    kv_bits: int,
):
    if kv_bits:
        k_sz_ref, v_sz_ref, o_ref = refs
    else:
        (o_ref,) = refs
    parts, block_rows, _ = q_ref.shape
    page_size = k_ref.shape[1]
    keys = pages_per_iteration * page_size
    dtype = q_ref.dtype
    q = [q_ref[i] for i in range(parts)]
    pos = q_pos_ref[...]
    seq_len = seq_len_ref[0]
    if kv_bits:
        q_sum = functools.reduce(operator.add, [x.astype(jnp.float32).sum(axis=-1) for x in q])

    # Causal: no row sees past its own position, and a real token's position is below seq_len, so
    # the causal mask alone hides the keys past the sequence that the last iteration reads. Padding
    # rows (seq_len 0) stop the loop before it starts.
    end = (jnp.minimum(pos.max() + 1, seq_len) + keys - 1) // keys
    start = 0
    if sliding_window is not None:
        # Padding rows (position 0, after the real tokens) must not pull the window's start back
        # to page 0: a position-0 row counts only as the chunk's first token. A padding row may
        # then see only masked keys: its output is garbage, ignored, but finite.
        row = pl.program_id(2) * block_rows + jnp.arange(block_rows)
        counted = (pos > 0) | (row < group)
        first_key = jnp.where(counted, pos, _INT32_MAX).min() - sliding_window + 1
        start = jnp.maximum(first_key, 0) // keys

    def body(i, carry):
        m, l, accs = carry  # [block_rows], [block_rows], parts x [block_rows, head_dim // parts]
        pages = tables_ref[pl.ds(i * pages_per_iteration, pages_per_iteration)]
        k = k_ref[pages].reshape(keys, k_ref.shape[-1])
        v = v_ref[pages].reshape(keys, v_ref.shape[-1])
        k_parts = [c.astype(dtype) for c in code_parts(k, kv_bits)] if kv_bits else [k]
        s = functools.reduce(operator.add, [
            jnp.dot(qp, kp.T, preferred_element_type=jnp.float32) for qp, kp in zip(q, k_parts, strict=True)
        ])
        if kv_bits:
            k_scale = k_sz_ref[pages, :, 0].reshape(keys)
            k_zero = k_sz_ref[pages, :, 1].reshape(keys)
            s = s * k_scale[None, :] + q_sum[:, None] * k_zero[None, :]
        s = s * scale
        key = i * keys + jnp.arange(keys)
        visible = key[None, :] <= pos[:, None]
        if sliding_window is not None:
            visible &= key[None, :] > pos[:, None] - sliding_window
        s = jnp.where(visible, s, MASK_VALUE)
        m_new = jnp.maximum(m, s.max(axis=-1))
        correction = jnp.exp(m - m_new)
        # No select on `visible` here: a row's masked keys before its first visible one weigh
        # exp(MASK_VALUE - MASK_VALUE) = 1, but its first visible key brings a correction of
        # exp(MASK_VALUE - m_new) = 0 that wipes them out; padding rows that never see a key end
        # with a finite average of what they read.
        p = jnp.exp(s - m_new[:, None])
        l = l * correction + p.sum(axis=-1)
        if kv_bits:
            v_scale = v_sz_ref[pages, :, 0].reshape(keys)
            v_zero = v_sz_ref[pages, :, 1].reshape(keys)
            pz = (p * v_zero[None, :]).sum(axis=-1)[:, None]
            pv = [jnp.dot((p * v_scale[None, :]).astype(dtype), vp, preferred_element_type=jnp.float32) + pz
                  for vp in (c.astype(dtype) for c in code_parts(v, kv_bits))]
        else:
            pv = [jnp.dot(p.astype(dtype), v, preferred_element_type=jnp.float32)]
        accs = tuple(a * correction[:, None] + x for a, x in zip(accs, pv, strict=True))
        return m_new, l, accs

    init = (
        jnp.full((block_rows,), MASK_VALUE, jnp.float32),
        jnp.zeros((block_rows,), jnp.float32),
        tuple(jnp.zeros(x.shape, jnp.float32) for x in q),
    )
    _, l, accs = lax.fori_loop(start, end, body, init)
    l = jnp.maximum(l, 1e-30)  # rows of a padding sequence ran no iteration: l == 0, acc == 0
    for i, acc in enumerate(accs):
        o_ref[i] = (acc / l[:, None]).astype(o_ref.dtype)


def _validate(q, kv: PagedKV, block_tables, seq_lens, q_positions, sliding_window):
    """The reference's checks plus what the kernel supports."""
    if kv.bits not in (0, 8, 4):
        raise ValueError(f"kv.bits must be 0 (float pages), 8 or 4, got {kv.bits}")
    validate_paged_inputs(q, kv, block_tables, seq_lens, q_positions)
    head_dim, page_size = q.shape[3], kv.page_size
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"head_dim must be one of {HEAD_DIMS}, got {head_dim}")
    if page_size not in PAGE_SIZES:
        raise ValueError(f"page_size must be one of {PAGE_SIZES}, got {page_size}")
    if q.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
        raise ValueError(f"q must be float32, bfloat16 or float16, got {q.dtype}")
    if kv.bits:
        if kv.k.dtype != jnp.uint8 or kv.v.dtype != jnp.uint8:
            raise ValueError(f"quantized pages must hold uint8 codes, got {kv.k.dtype} and {kv.v.dtype}")
        want = (*kv.k.shape[:3], 2)
        for name, sz in (("k_scale_zero", kv.k_scale_zero), ("v_scale_zero", kv.v_scale_zero)):
            if sz is None:
                raise ValueError(f"quantized pages need k_scale_zero and v_scale_zero; {name} is missing")
            if sz.shape != want or sz.dtype != jnp.float32:
                raise ValueError(f"{name} must be float32 {list(want)}, got {sz.dtype} {list(sz.shape)}")
    else:
        if kv.k_scale_zero is not None or kv.v_scale_zero is not None:
            raise ValueError("k_scale_zero / v_scale_zero are only for quantized pages (bits 8 or 4)")
        if kv.k.dtype != q.dtype or kv.v.dtype != q.dtype:
            raise ValueError(f"float pages must have q's dtype {q.dtype}, got {kv.k.dtype} and {kv.v.dtype}")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be a positive number of tokens, got {sliding_window}")


def _validate_blocks(block_rows, pages_per_iteration):
    if block_rows < 16 or block_rows & (block_rows - 1):
        raise ValueError(f"block_rows must be a power of two >= 16 (Triton's dot), got {block_rows}")
    if pages_per_iteration < 1 or pages_per_iteration & (pages_per_iteration - 1):
        raise ValueError(f"pages_per_iteration must be a power of two, got {pages_per_iteration}")


@functools.partial(
    jax.jit,
    static_argnames=("scale", "sliding_window", "block_rows", "pages_per_iteration", "num_warps", "num_stages",
                     "interpret"),
)
def prefill_attention_kernel(
    q: jax.Array,
    kv: PagedKV,
    block_tables: jax.Array,
    seq_lens: jax.Array,
    q_positions: jax.Array,
    *,
    scale: float,
    sliding_window: int | None = None,
    block_rows: int,
    pages_per_iteration: int,
    num_warps: int,
    num_stages: int,
    interpret: bool = False,
) -> jax.Array:
    """The Pallas kernel; the dispatch point ``paged_attention`` passes the block sizes of
    ``block_sizes.prefill_attention_blocks``.

    Args:
      q: ``[batch, q_len, heads, head_dim]`` float32, bfloat16 or float16 queries; head_dim 64 or 128.
      kv: pools ``[num_pages, kv_heads, page_size, head_dim]`` in q's dtype, or uint8
        ``[..., head_dim * kv.bits // 8]`` codes with float32 ``[num_pages, kv_heads, page_size, 2]``
        scales and zeros; page_size 16, 32 or 64.
      block_tables: ``[batch, pages_per_seq]`` int32 page ids (wide enough for every seq_len).
      seq_lens: ``[batch]`` int32 tokens of context, this chunk included (0 for padding rows).
      q_positions: ``[batch, q_len]`` int32 absolute positions; padding tokens after the real
        ones have position 0.
      scale, sliding_window: as in the reference.
      block_rows: query rows (token x query head of one KV head) per program, a power of two >= 16.
      pages_per_iteration: pages read per loop iteration, a power of two.
      num_warps, num_stages: Triton's.
      interpret: run with Pallas' interpreter (CPU).

    Returns:
      ``[batch, q_len, heads, head_dim]`` in q's dtype.
    """
    _validate(q, kv, block_tables, seq_lens, q_positions, sliding_window)
    _validate_blocks(block_rows, pages_per_iteration)
    batch, q_len, heads, head_dim = q.shape
    num_pages, kv_heads, page_size, stored = kv.k.shape
    group = heads // kv_heads
    rows = q_len * group
    padded_rows = -(-rows // block_rows) * block_rows
    parts = 2 if kv.bits == 4 else 1
    # [batch, kv_heads, parts, rows, head_dim // parts]: part e holds head_dim elements e, e + parts, ...
    qg = q.reshape(batch, q_len, kv_heads, group, head_dim).transpose(0, 2, 1, 3, 4)
    qg = jnp.pad(qg.reshape(batch, kv_heads, rows, head_dim), ((0, 0), (0, 0), (0, padded_rows - rows), (0, 0)))
    qg = qg.reshape(batch, kv_heads, padded_rows, head_dim // parts, parts).transpose(0, 1, 4, 2, 3)
    q_pos = jnp.repeat(q_positions.astype(jnp.int32), group, axis=1)
    q_pos = jnp.pad(q_pos, ((0, 0), (0, padded_rows - rows)))  # position 0: padding rows
    tables = block_tables.astype(jnp.int32)
    tables = jnp.pad(tables, ((0, 0), (0, -tables.shape[1] % pages_per_iteration)))  # trash page 0
    width = tables.shape[1]

    pool = pl.BlockSpec((num_pages, None, page_size, stored), lambda b, h, r: (0, h, 0, 0))
    rows_spec = pl.BlockSpec((None, None, parts, block_rows, head_dim // parts), lambda b, h, r: (b, h, 0, r, 0))
    in_specs = [
        pl.BlockSpec((None, width), lambda b, h, r: (b, 0)),
        pl.BlockSpec((1,), lambda b, h, r: (b,)),
        pl.BlockSpec((None, block_rows), lambda b, h, r: (b, r)),
        rows_spec,
        pool,
        pool,
    ]
    args = [tables, seq_lens.astype(jnp.int32), q_pos, qg, kv.k, kv.v]
    if kv.bits:
        in_specs += [pl.BlockSpec((num_pages, None, page_size, 2), lambda b, h, r: (0, h, 0, 0))] * 2
        args += [kv.k_scale_zero, kv.v_scale_zero]
    kernel = functools.partial(
        _prefill_kernel, scale=scale, sliding_window=sliding_window, group=group,
        pages_per_iteration=pages_per_iteration, kv_bits=kv.bits,
    )
    o = pl.pallas_call(
        kernel,
        grid=(batch, kv_heads, padded_rows // block_rows),
        in_specs=in_specs,
        out_specs=rows_spec,
        out_shape=jax.ShapeDtypeStruct(qg.shape, q.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="prefill_attention",
    )(*args)
    o = o.transpose(0, 1, 3, 4, 2).reshape(batch, kv_heads, padded_rows, head_dim)[:, :, :rows]
    o = o.reshape(batch, kv_heads, q_len, group, head_dim).transpose(0, 2, 1, 3, 4)
    return o.reshape(batch, q_len, heads, head_dim)


def prefill_attention_reference(
    q: jax.Array,
    kv: PagedKV,
    block_tables: jax.Array,
    seq_lens: jax.Array,
    q_positions: jax.Array,
    *,
    scale: float,
    sliding_window: int | None = None,
) -> jax.Array:
    """The kernel's oracle in plain jnp: gather each sequence's pages into contiguous K/V over the
    whole block table and take one dense masked softmax, all in float32.

    Shapes and arguments as in ``prefill_attention_kernel``; rows that see no key (padding) get
    zeros. Memory grows with the block table's width: meant for tests, not for serving.
    """
    validate_paged_inputs(q, kv, block_tables, seq_lens, q_positions)
    if kv.bits and (kv.k_scale_zero is None or kv.v_scale_zero is None):
        raise ValueError("quantized pages need k_scale_zero and v_scale_zero")
    batch, q_len, heads, head_dim = q.shape
    kv_heads = kv.kv_heads
    group = heads // kv_heads

    def contiguous(pages, scale_zero):
        x = pages[block_tables]  # [batch, pages_per_seq, kv_heads, page_size, stored]
        x = dequantize_kv(x, scale_zero[block_tables], kv.bits) if kv.bits else x.astype(jnp.float32)
        return x.transpose(0, 2, 1, 3, 4).reshape(batch, kv_heads, -1, head_dim)  # [b, kv_heads, keys, d]

    k, v = contiguous(kv.k, kv.k_scale_zero), contiguous(kv.v, kv.v_scale_zero)
    qg = q.astype(jnp.float32).reshape(batch, q_len, kv_heads, group, head_dim)
    s = jnp.einsum("btkgd,bksd->bkgts", qg, k, precision="highest") * scale
    key = jnp.arange(k.shape[2])[None, None, None, None, :]
    pos = q_positions[:, None, None, :, None]
    visible = (key <= pos) & (key < seq_lens[:, None, None, None, None])
    if sliding_window is not None:
        visible &= key > pos - sliding_window
    s = jnp.where(visible, s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.where(visible, jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
    denom = p.sum(-1, keepdims=True)
    p = p / jnp.where(denom > 0, denom, 1.0)
    o = jnp.einsum("bkgts,bksd->btkgd", p, v, precision="highest")
    return o.reshape(batch, q_len, heads, head_dim).astype(q.dtype)
