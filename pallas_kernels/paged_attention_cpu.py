"""Paged attention on CPU: the AVX-512 or AVX2 kernel of ``paged_attention_cpu.cc``.

XLA runs ``paged_attention_reference`` as a loop over pages that gathers each page of every
sequence into a copy before its two products (and, for int8/int4 pages, dequantizes the copy);
the kernel reads each visible key and value in place, per sequence, KV head and block of query
rows, widening quantized codes as it reads them. ``paged_attention``, the dispatch point, runs it
for decode steps and prefill chunks of float32 queries over float32, bfloat16, int8 or int4 pages
once ``cpu_native.enable`` has turned it on and the choice of implementation is automatic; the
reference is ``paged_attention_reference``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import cpu_native
from pallas_kernels.paged_kv import PagedKV


def runs_on(q: jax.Array, kv: PagedKV) -> bool:
    """Whether the kernel takes these operands: float32 queries over float32 or bfloat16 pages, or
    over int8/int4 codes (uint8) with float32 scales and zeros."""
    if q.dtype != jnp.float32:
        return False
    if kv.bits:
        return kv.bits in (8, 4) and kv.k.dtype == jnp.uint8 and kv.k_scale_zero is not None
    return kv.k.dtype in (jnp.float32, jnp.bfloat16)


def paged_attention_cpu(q: jax.Array, kv: PagedKV, block_tables: jax.Array, seq_lens: jax.Array,
                        q_positions: jax.Array, *, scale: float, sliding_window: int | None = None) -> jax.Array:
    """``paged_attention_reference`` for float32 ``q [batch, q_len, heads, head_dim]`` over float32,
    bfloat16, int8 or int4 pages (shapes as there), by the kernel."""
    if not runs_on(q, kv):
        raise ValueError("the CPU attention kernel takes float32 queries over float32, bfloat16, int8 or int4 pages")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be positive, got {sliding_window}")
    out = jax.ShapeDtypeStruct(q.shape, jnp.float32)
    indices = (block_tables.astype(jnp.int32), seq_lens.astype(jnp.int32), q_positions.astype(jnp.int32))
    attrs = dict(scale=np.float32(scale), window=np.int64(sliding_window or 0))
    if kv.bits:
        return jax.ffi.ffi_call(cpu_native.PAGED_ATTENTION_QUANTIZED, out)(
            q, kv.k, kv.v, kv.k_scale_zero, kv.v_scale_zero, *indices, **attrs, bits=np.int64(kv.bits))
    return jax.ffi.ffi_call(cpu_native.PAGED_ATTENTION, out)(q, kv.k, kv.v, *indices, **attrs)
