"""Paged attention on CPU: the AVX-512 or AVX2 kernel of ``paged_attention_cpu.cc``.

XLA runs ``paged_attention_reference`` as a loop over pages that gathers each page of every
sequence into a copy before its two products; the kernel reads each visible key and value in
place, per sequence, KV head and block of query rows. ``paged_attention``, the dispatch point,
runs it for decode steps and prefill chunks of float32 queries over float32 or bfloat16 pages
once ``cpu_native.enable`` has turned it on and the choice of implementation is automatic; the
reference is ``paged_attention_reference``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import cpu_native
from pallas_kernels.paged_kv import PagedKV


def paged_attention_cpu(q: jax.Array, kv: PagedKV, block_tables: jax.Array, seq_lens: jax.Array,
                        q_positions: jax.Array, *, scale: float, sliding_window: int | None = None) -> jax.Array:
    """``paged_attention_reference`` for float32 ``q [batch, q_len, heads, head_dim]`` over float32
    or bfloat16 pages (shapes as there), by the kernel."""
    if kv.bits or q.dtype != jnp.float32 or kv.k.dtype not in (jnp.float32, jnp.bfloat16):
        raise ValueError("the CPU attention kernel takes float32 queries over float32 or bfloat16 pages")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be positive, got {sliding_window}")
    return jax.ffi.ffi_call(cpu_native.PAGED_ATTENTION, jax.ShapeDtypeStruct(q.shape, jnp.float32))(
        q, kv.k, kv.v, block_tables.astype(jnp.int32), seq_lens.astype(jnp.int32), q_positions.astype(jnp.int32),
        scale=np.float32(scale), window=np.int64(sliding_window or 0),
    )
