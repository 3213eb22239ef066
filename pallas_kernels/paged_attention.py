"""Attention of a chunk of query tokens over a paged KV cache (layout: ``paged_kv``).

One reference covers decode (``q_len == 1``) and chunked prefill (``q_len > 1``, earlier context
in the pages, causal inside the chunk). The keys and values of the query tokens themselves are
already written to the pages when attention runs.

``paged_decode_attention`` is the Pallas (Triton) kernel for decode: split-K over the pages of
each sequence, a float32 online softmax per split, quantized pages dequantized in the kernel, and
the splits merged in jnp. The dispatch point ``paged_attention`` routes ``q_len == 1`` to it, and
prefill chunks to ``prefill_attention.prefill_attention_kernel``, when ``dispatch.implementation()`` asks
for kernels.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import cpu_native, dispatch
from pallas_kernels.block_sizes import decode_attention_blocks, prefill_attention_blocks
from pallas_kernels import paged_attention_cpu
from pallas_kernels.paged_kv import MASK_VALUE, PagedKV, code_parts, dequantize_kv, validate_paged_inputs
from pallas_kernels.prefill_attention import prefill_attention_kernel


def paged_attention_reference(
    q: jax.Array,
    kv: PagedKV,
    block_tables: jax.Array,
    seq_lens: jax.Array,
    q_positions: jax.Array,
    *,
    scale: float,
    sliding_window: int | None = None,
    pages_per_iteration: int = 1,
) -> jax.Array:
    """Pure-jnp paged attention: an online softmax over the pages, a few pages per iteration.

    The loop runs only as far as the longest sequence in the batch, so block tables can be as
    wide as the longest possible sequence without costing time or a recompilation per length.

    Args:
      q: ``[batch, q_len, heads, head_dim]`` queries.
      kv: the page pools, ``[num_pages, kv_heads, page_size, head_dim]`` (or their codes and
        ``[num_pages, kv_heads, page_size, 2]`` scales and zeros when ``kv.bits`` is 8 or 4).
      block_tables: ``[batch, pages_per_seq]`` int32 page ids of each sequence.
      seq_lens: ``[batch]`` int32 tokens in each sequence's context, this chunk included
        (0 for padding rows).
      q_positions: ``[batch, q_len]`` int32 absolute position of each query token.
      scale: softmax scale, usually ``head_dim ** -0.5``.
      sliding_window: if set, a query at position p sees keys in ``(p - window, p]``.
      pages_per_iteration: pages read per loop iteration: fewer iterations, but more than one
        page costs a transpose of what is read.

    Returns:
      ``[batch, q_len, heads, head_dim]`` in q's dtype; softmax is computed in float32.
    """
    validate_paged_inputs(q, kv, block_tables, seq_lens, q_positions)
    if kv.bits and (kv.k_scale_zero is None or kv.v_scale_zero is None):
        raise ValueError("quantized pages need k_scale_zero and v_scale_zero")
    q, kv, block_tables, seq_lens, q_positions = jax.tree.map(jnp.asarray, (q, kv, block_tables, seq_lens, q_positions))
    batch, q_len, heads, head_dim = q.shape
    kv_heads, page_size = kv.kv_heads, kv.page_size
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
        k = kv.k.at[pages].get(mode="promise_in_bounds")  # [batch, per_iter, kv_heads, page_size, head_dim]
        v = kv.v.at[pages].get(mode="promise_in_bounds")
        if kv.bits:
            k = dequantize_kv(k, kv.k_scale_zero.at[pages].get(mode="promise_in_bounds"), kv.bits)
            v = dequantize_kv(v, kv.v_scale_zero.at[pages].get(mode="promise_in_bounds"), kv.bits)
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
        # bfloat16 pages under float32 queries (the CPU's bfloat16 mode) keep p in float32.
        pv = jnp.einsum("bkql,bkld->bkqd", p.astype(jnp.promote_types(q.dtype, v.dtype)), v,
                        preferred_element_type=jnp.float32)
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


def _decode_kernel(
    q_refs, k_ref, v_ref, k_sz_ref, v_sz_ref, tables_ref, lens_ref, pos_ref,  # inputs
    acc_refs, m_ref, l_ref,  # outputs
    *, scale, sliding_window, kv_bits, page_size, pages_per_iteration, iterations_per_split,
    table_keys, value_dtype,
):
    """One (sequence, KV head, split): online softmax over the split's pages.

    q_refs: one or (int4) two ``[block_h, head_dim / parts]`` query blocks (even/odd elements).
    k_ref, v_ref: the head's whole pool ``[num_pages, page_size, stored_head_dim]``.
    k_sz_ref, v_sz_ref: ``[num_pages, page_size, 2]`` scale and zero, or None.
    tables_ref: ``[table_width]`` the sequence's page ids; lens_ref, pos_ref: ``[1]``.
    acc_refs: unnormalized outputs like q_refs; m_ref, l_ref: ``[block_h]`` running max and sum.
    """
    split = pl.program_id(2)
    block_k = pages_per_iteration * page_size
    q_pos = pos_ref[0]
    # Keys [start, end) are visible: inside the context, at or before the query, inside the window.
    # The table's width bounds it too, so a length the table cannot hold never reads past it.
    end = jnp.minimum(jnp.minimum(lens_ref[0], q_pos + 1), table_keys)
    start = 0 if sliding_window is None else jnp.maximum(q_pos - sliding_window + 1, 0)
    first = jnp.maximum(start // block_k, split * iterations_per_split)
    last = jnp.minimum(pl.cdiv(end, block_k), (split + 1) * iterations_per_split)

    qs = [r[...] for r in q_refs]
    block_h = qs[0].shape[0]
    if kv_bits:
        # q.(code * scale + zero) = scale * (q.code) + zero * sum(q), per key.
        q_sum = sum(q.astype(jnp.float32).sum(axis=1) for q in qs)[:, None]

    def scale_zero(sz_ref, pages):
        return (sz_ref[pages, :, i].reshape(1, block_k) for i in (0, 1))

    def body(it, carry):
        m, l, accs = carry
        pages = tables_ref[pl.ds(it * pages_per_iteration, pages_per_iteration)]
        k = k_ref[pages].reshape(block_k, -1)
        v = v_ref[pages].reshape(block_k, -1)
        s = sum(plgpu.dot(q, kp.astype(q.dtype), trans_b=True) for q, kp in zip(qs, code_parts(k, kv_bits)))
        if kv_bits:
            k_scale, k_zero = scale_zero(k_sz_ref, pages)
            s = s * k_scale + q_sum * k_zero
        s = s * scale
        key_pos = it * block_k + jax.lax.broadcasted_iota(jnp.int32, (1, block_k), 1)
        visible = (key_pos >= start) & (key_pos < end)
        s = jnp.where(visible, s, MASK_VALUE)
        m_new = jnp.maximum(m, s.max(axis=1))
        # where(), not exp() alone: a step with no visible key (a window that starts past the
        # context, which the reference allows) would weigh its masked keys exp(0) == 1.
        p = jnp.where(visible, jnp.exp(s - m_new[:, None]), 0.0)
        correction = jnp.exp(m - m_new)
        l = l * correction + p.sum(axis=1)
        zero_term = 0.0
        if kv_bits:
            # p @ (code * scale + zero) = (p * scale) @ code + sum(p * zero), per query row.
            v_scale, v_zero = scale_zero(v_sz_ref, pages)
            zero_term = (p * v_zero).sum(axis=1)[:, None]
            p = p * v_scale
        p = p.astype(value_dtype)
        accs = tuple(
            acc * correction[:, None] + plgpu.dot(p, vp.astype(value_dtype)) + zero_term
            for acc, vp in zip(accs, code_parts(v, kv_bits))
        )
        return m_new, l, accs

    init = (
        jnp.full((block_h,), MASK_VALUE, jnp.float32),
        jnp.zeros((block_h,), jnp.float32),
        tuple(jnp.zeros(q.shape, jnp.float32) for q in qs),
    )
    # An empty range (a padding row, a split past the end or before the window) keeps init:
    # l == 0 and m == MASK_VALUE, which the merge weighs by exp(MASK_VALUE - max) == 0.
    m, l, accs = jax.lax.fori_loop(first, last, body, init)
    for acc_ref, acc in zip(acc_refs, accs):
        acc_ref[...] = acc
    m_ref[...] = m
    l_ref[...] = l


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _validate_decode_inputs(q, kv: PagedKV, block_tables, seq_lens, q_positions, block_h, pages_per_iteration,
                            pages_per_split):
    """The kernel's own limits, beyond ``validate_paged_inputs``."""
    _, q_len, heads, head_dim = q.shape
    num_pages, kv_heads, page_size, _ = kv.k.shape
    if q_len != 1:
        raise ValueError(f"the decode kernel takes one query token per sequence, got q_len={q_len}")
    if kv.bits:
        if kv.k.dtype != jnp.uint8:
            raise ValueError(f"quantized pages must hold uint8 codes, got {kv.k.dtype}")
        want = (num_pages, kv_heads, page_size, 2)
        for name, sz in (("k_scale_zero", kv.k_scale_zero), ("v_scale_zero", kv.v_scale_zero)):
            if sz is None or sz.shape != want or sz.dtype != jnp.float32:
                got = None if sz is None else f"{sz.dtype}{list(sz.shape)}"
                raise ValueError(f"quantized pages need {name} float32{list(want)}, got {got}")
    elif not jnp.issubdtype(kv.k.dtype, jnp.floating):
        raise ValueError(f"float pages (bits 0) must be a float dtype, got {kv.k.dtype}")
    if not jnp.issubdtype(q.dtype, jnp.floating):
        raise ValueError(f"q must be a float dtype, got {q.dtype}")
    # Triton: power-of-two tiles, and dot operands of at least 16 along every axis (int4 splits
    # head_dim into two halves).
    min_head_dim = 32 if kv.bits == 4 else 16
    if not _is_power_of_two(head_dim) or head_dim < min_head_dim:
        raise ValueError(f"head_dim must be a power of two >= {min_head_dim}, got {head_dim}")
    if not _is_power_of_two(page_size):
        raise ValueError(f"page_size must be a power of two, got {page_size}")
    if not _is_power_of_two(pages_per_iteration) or pages_per_iteration * page_size < 16:
        raise ValueError(
            f"pages_per_iteration must be a power of two with at least 16 keys per step, got "
            f"{pages_per_iteration} pages of {page_size}"
        )
    if pages_per_split < 1 or pages_per_split % pages_per_iteration:
        raise ValueError(f"pages_per_split ({pages_per_split}) must be a multiple of pages_per_iteration "
                         f"({pages_per_iteration})")
    group = heads // kv_heads
    if not _is_power_of_two(block_h) or block_h < max(16, group):
        raise ValueError(f"block_h must be a power of two >= max(16, query heads per KV head = {group}), "
                         f"got {block_h}")
    for name, x in (("block_tables", block_tables), ("seq_lens", seq_lens), ("q_positions", q_positions)):
        if x.dtype != jnp.int32:
            raise ValueError(f"{name} must be int32, got {x.dtype}")


@functools.partial(
    jax.jit,
    static_argnames=(
        "scale", "sliding_window", "block_h", "pages_per_iteration", "pages_per_split",
        "num_warps", "num_stages", "interpret",
    ),
)
def paged_decode_attention(
    q: jax.Array,
    kv: PagedKV,
    block_tables: jax.Array,
    seq_lens: jax.Array,
    q_positions: jax.Array,
    *,
    scale: float,
    sliding_window: int | None = None,
    block_h: int,
    pages_per_iteration: int,
    pages_per_split: int,
    num_warps: int,
    num_stages: int,
    interpret: bool = False,
) -> jax.Array:
    """Paged decode attention as a Pallas (Triton) kernel, split-K over each sequence's pages.

    Shapes and semantics as in ``paged_attention_reference`` with ``q_len == 1``: q ``[batch, 1,
    heads, head_dim]``, kv's pools ``[num_pages, kv_heads, page_size, head_dim]`` (bf16/fp32, or
    uint8 codes with ``kv.bits`` 8/4 and float32 ``[num_pages, kv_heads, page_size, 2]`` scale/zero
    pools), block_tables ``[batch, pages_per_seq]``, seq_lens ``[batch]`` (0 = padding row: zeros
    out), q_positions ``[batch, 1]``. Returns ``[batch, 1, heads, head_dim]`` in q's dtype.

    The grid is (batch, kv_heads, splits); each program takes the ``block_h`` query rows of one KV
    head (the group padded to a power of two >= 16 for Triton's dot), walks its split's pages
    ``pages_per_iteration`` at a time, and writes float32 partials (unnormalized output, max, sum)
    that ``_merge_splits`` combines. Take the block sizes from ``block_sizes.decode_attention_blocks``.
    """
    if kv.bits not in (0, 8, 4):
        raise ValueError(f"kv.bits must be 0 (float pages), 8 or 4, got {kv.bits}")
    validate_paged_inputs(q, kv, block_tables, seq_lens, q_positions)
    _validate_decode_inputs(q, kv, block_tables, seq_lens, q_positions, block_h, pages_per_iteration, pages_per_split)
    batch, _, heads, head_dim = q.shape
    num_pages, kv_heads, page_size, stored = kv.k.shape
    group = heads // kv_heads
    width = block_tables.shape[1]
    iterations = pl.cdiv(width, pages_per_iteration)
    iterations_per_split = pages_per_split // pages_per_iteration
    num_splits = pl.cdiv(iterations, iterations_per_split)
    # The last inner step may read up to a whole step past the table: pad it with the trash page.
    block_tables = jnp.pad(block_tables, ((0, 0), (0, iterations * pages_per_iteration - width)))

    if kv.bits:
        # The codes are exact in any float dtype (0..255), so the dots run in q's dtype; the
        # values are float32 after dequantization in the reference, so p @ V runs in float32.
        dot_dtype, value_dtype = q.dtype, jnp.float32
    else:
        dot_dtype, value_dtype = jnp.promote_types(q.dtype, kv.k.dtype), kv.v.dtype
    qg = q.reshape(batch, kv_heads, group, head_dim).astype(dot_dtype)
    qg = jnp.pad(qg, ((0, 0), (0, 0), (0, block_h - group), (0, 0)))
    # int4: q.k = q_even.k_low + q_odd.k_high, with no interleave inside the kernel.
    q_parts = (qg[..., 0::2], qg[..., 1::2]) if kv.bits == 4 else (qg,)
    part_dim = q_parts[0].shape[-1]

    def per_head(block):  # a KV head's whole pool: the kernel gathers its pages by id
        return pl.BlockSpec((num_pages, None, *block), lambda b, h, s: (0, h, 0, 0))

    row = pl.BlockSpec((1,), lambda b, h, s: (b,))
    sz_spec = per_head((page_size, 2)) if kv.bits else None
    part_spec = pl.BlockSpec((None, None, None, block_h, part_dim), lambda b, h, s: (b, h, s, 0, 0))
    stat_spec = pl.BlockSpec((None, None, None, block_h), lambda b, h, s: (b, h, s, 0))
    partial_shape = (batch, kv_heads, num_splits, block_h)
    kernel = functools.partial(
        _decode_kernel, scale=scale, sliding_window=sliding_window, kv_bits=kv.bits, page_size=page_size,
        pages_per_iteration=pages_per_iteration, iterations_per_split=iterations_per_split,
        table_keys=width * page_size, value_dtype=value_dtype,
    )
    accs, m, l = pl.pallas_call(
        kernel,
        grid=(batch, kv_heads, num_splits),
        in_specs=[
            tuple(pl.BlockSpec((None, None, block_h, part_dim), lambda b, h, s: (b, h, 0, 0)) for _ in q_parts),
            per_head((page_size, stored)),
            per_head((page_size, stored)),
            sz_spec,
            sz_spec,
            pl.BlockSpec((None, block_tables.shape[1]), lambda b, h, s: (b, 0)),
            row,
            row,
        ],
        out_specs=(tuple(part_spec for _ in q_parts), stat_spec, stat_spec),
        out_shape=(
            tuple(jax.ShapeDtypeStruct((*partial_shape, part_dim), jnp.float32) for _ in q_parts),
            jax.ShapeDtypeStruct(partial_shape, jnp.float32),
            jax.ShapeDtypeStruct(partial_shape, jnp.float32),
        ),
        interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        name="paged_decode_attention",
    )(q_parts, kv.k, kv.v, kv.k_scale_zero, kv.v_scale_zero, block_tables, seq_lens, q_positions[:, 0])

    o = _merge_splits(accs, m, l)  # [batch, kv_heads, block_h, head_dim]
    return o[:, :, :group].reshape(batch, 1, heads, head_dim).astype(q.dtype)


def _merge_splits(accs: tuple[jax.Array, ...], m: jax.Array, l: jax.Array) -> jax.Array:
    """Merge split-K partials: accs ``[batch, kv_heads, splits, block_h, head_dim / parts]``, m and
    l ``[batch, kv_heads, splits, block_h]`` -> ``[batch, kv_heads, block_h, head_dim]`` float32.

    Splits that saw no key hold m == MASK_VALUE (finite) and l == 0, so their weight is
    exp(MASK_VALUE - max) == 0, or 1 with l == 0 everywhere for a padding row: zeros, no NaN.
    """
    m_max = m.max(axis=2, keepdims=True)
    weight = jnp.exp(m - m_max)
    denom = jnp.maximum((l * weight).sum(axis=2), 1e-30)[..., None]
    outs = [(acc * weight[..., None]).sum(axis=2) / denom for acc in accs]
    if len(outs) == 1:
        return outs[0]
    # int4: the low nibbles held the even head_dim elements, the high nibbles the odd ones.
    return jnp.stack(outs, axis=-1).reshape(*outs[0].shape[:-1], -1)


PAGES_PER_ITERATION = 1


def paged_attention(
    q: jax.Array,
    kv: PagedKV,
    block_tables: jax.Array,
    seq_lens: jax.Array,
    q_positions: jax.Array,
    *,
    scale: float,
    sliding_window: int | None = None,
) -> jax.Array:
    """The engine's dispatch point for paged attention (shapes as in the reference).

    When ``dispatch.implementation()`` is ``"kernel"`` (or ``"interpret"``: on CPU, through Pallas'
    interpreter), decode (``q_len == 1``) runs ``paged_decode_attention`` with the block sizes of
    ``block_sizes.decode_attention_blocks`` and prefill chunks run ``prefill_attention_kernel``
    with those of ``block_sizes.prefill_attention_blocks``. On CPU, float32 queries over float32,
    bfloat16, int8 or int4 pages (decode and prefill) run ``paged_attention_cpu`` once
    ``cpu_native.enable`` has turned it on; otherwise the jnp reference runs.
    """
    implementation = dispatch.implementation()
    if implementation in ("kernel", "interpret"):
        # Clear errors before the block sizes read the shapes.
        validate_paged_inputs(q, kv, block_tables, seq_lens, q_positions)
        batch, q_len, heads, head_dim = q.shape
        common = dict(scale=scale, sliding_window=sliding_window, interpret=implementation == "interpret")
        if q_len > 1:
            kv_bytes = kv.bits / 8 if kv.bits else jnp.dtype(kv.k.dtype).itemsize
            p = prefill_attention_blocks(q_len * heads // kv.kv_heads, head_dim, kv.page_size, kv_bytes)
            return prefill_attention_kernel(
                q, kv, block_tables, seq_lens, q_positions, **common, block_rows=p.block_rows,
                pages_per_iteration=p.pages_per_iteration, num_warps=p.num_warps, num_stages=p.num_stages,
            )
        d = decode_attention_blocks(batch=batch, kv_heads=kv.kv_heads, group=heads // kv.kv_heads,
                                    page_size=kv.page_size, pages_per_seq=block_tables.shape[1])
        return paged_decode_attention(
            q, kv, block_tables, seq_lens, q_positions, **common, block_h=d.block_h,
            pages_per_iteration=d.pages_per_iteration, pages_per_split=d.pages_per_split,
            num_warps=d.num_warps, num_stages=d.num_stages,
        )
    on = cpu_native.kernels()
    if (dispatch.cpu_kernels() and paged_attention_cpu.runs_on(q, kv)
            and (on.paged_attention_quantized if kv.bits else on.paged_attention)):
        validate_paged_inputs(q, kv, block_tables, seq_lens, q_positions)
        return paged_attention_cpu.paged_attention_cpu(q, kv, block_tables, seq_lens, q_positions, scale=scale,
                                   sliding_window=sliding_window)
    return paged_attention_reference(
        q, kv, block_tables, seq_lens, q_positions,
        scale=scale, sliding_window=sliding_window, pages_per_iteration=PAGES_PER_ITERATION,
    )
