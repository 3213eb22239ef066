"""Writing new tokens' K/V into bfloat16 page pools on CPU: the kernel of ``kv_write_cpu.cc``.

XLA:CPU runs a scatter into a bfloat16 array by widening the whole array to float32 and back, so
each layer's write would copy its pool twice on every step (a SmolLM2 decode step at batch 32
took 3-4x longer in an exploratory run). The kernel copies only the new rows, into the pool XLA
hands it aliased to the result: with the cache donated, an update in place.
``jaxinfer.kv_cache.write_kv`` calls it for bfloat16 pools once ``cpu_native.enable`` has turned
it on; XLA's scatter is the reference.
"""

from __future__ import annotations

import jax

from pallas_kernels import cpu_native


def kv_write_cpu(pool: jax.Array, slots: jax.Array, values: jax.Array) -> jax.Array:
    """``pool [num_pages, kv_heads, page_size, head_dim]`` with ``values [tokens, kv_heads,
    head_dim]`` written at the flat ``slots [tokens]`` (``page * page_size + offset``)."""
    if values.shape != (slots.shape[0], pool.shape[1], pool.shape[3]):
        raise ValueError(f"values {values.shape} do not fit slots {slots.shape} and pool {pool.shape}")
    return jax.ffi.ffi_call(cpu_native.KV_WRITE, jax.ShapeDtypeStruct(pool.shape, pool.dtype),
                            input_output_aliases={0: 0})(pool, slots.astype("int32"), values.astype(pool.dtype))
