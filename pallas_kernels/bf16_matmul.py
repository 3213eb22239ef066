"""bfloat16-weight matmuls on CPU, with weights packed once for the CPU's bfloat16 dot products.

The CPU's bfloat16 mode (``--dtype bfloat16``) multiplies float32 activations by bfloat16 weights:
``x`` rounded to bfloat16, products summed in float32. XLA:CPU runs that dot on AMX but
rearranges the whole weight into the tiles' layout on every call, which at decode's few rows costs
more than the product; without AMX its speed depends on the CPU (5-15x slower than float32 on the
AVX2 EPYC; on the Zen 4 decode steps 1.3-1.8x slower than with our kernel). This module packs each
weight once and multiplies with a small C++ kernel that XLA calls through its FFI: on Intel AMX
tiles (``amx_matmul.cc``; SmolLM2's decode steps 1.4-2x faster than XLA's bfloat16 dots at batch
1-16, ``benchmarks/weight_dtype.py``), or with AVX512_BF16's pair dot products
(``avx512bf16_matmul.cc``) on CPUs that have those but no AMX, such as AMD Zen 4.

Packed format (``pack``): ``W [K, N]`` becomes ``[ceil(N / 16), kpad / 2, 32]`` bfloat16 with
``kpad = K`` rounded up to 32, zero padded: column block ``b``, pair row ``j`` holds
``W[2j, c], W[2j + 1, c]`` for each of the block's 16 columns ``c``: what an AMX B tile loads, and
one 512-bit register of what ``vdpbf16ps`` multiplies.

``bf16_matmul`` is the dispatch point: the AMX kernel, else the AVX512_BF16 one, once
``cpu_native.enable`` has turned it on and the choice of implementation is automatic
(``dispatch.cpu_kernels``); otherwise ``bf16_matmul_reference``, which unpacks and calls XLA's dot.
The AMX kernel's sums are the reference's bit for bit at K >= 32; the AVX512_BF16 kernel sums each
output over K's pairs in order, so it agrees with them to float32 rounding. Both give a row the
same result in any batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import cpu_native, dispatch

BLOCK_COLS = 16  # output columns of one AMX B tile, or of one vdpbf16ps register
TILE_K = 32  # values of K in one tile product
# XLA:CPU runs a bfloat16 dot with float32 accumulation fast from 3 rows up (1.5-2.2x float32's
# speed at 4-32 rows); on 1-2 rows it takes another path, ~4x slower than float32, whose results
# differ from the same rows' inside a larger dot (benchmarks/cpu_limits.py). Padding to 4 rows
# keeps both speed and batch invariance.
MIN_NARROW_DOT_ROWS = 4


@jax.jit
def pack(w: jax.Array) -> jax.Array:
    """``w [K, N]`` bfloat16 -> packed ``[ceil(N / 16), kpad / 2, 32]`` (module docstring)."""
    k, n = w.shape
    kpad = -(-k // TILE_K) * TILE_K
    npad = -(-n // BLOCK_COLS) * BLOCK_COLS
    w = jnp.pad(w, ((0, kpad - k), (0, npad - n)))
    return w.reshape(kpad // 2, 2, npad // BLOCK_COLS, BLOCK_COLS).transpose(2, 0, 3, 1).reshape(
        npad // BLOCK_COLS, kpad // 2, 2 * BLOCK_COLS)


def unpack(packed: jax.Array, k: int, n: int) -> jax.Array:
    """Inverse of ``pack``: ``[K, N]``."""
    blocks, pairs, _ = packed.shape
    w = packed.reshape(blocks, pairs, BLOCK_COLS, 2).transpose(1, 3, 0, 2).reshape(2 * pairs, blocks * BLOCK_COLS)
    return w[:k, :n]


def narrow_weight_dot(x: jax.Array, w: jax.Array, w_in_axis: int) -> jax.Array:
    """``x [M, K]`` contracted with ``w``'s axis ``w_in_axis``, ``w`` in a narrower float than ``x``
    -> ``[M, N]`` in x's dtype, as llama.cpp multiplies its BF16 tensors: ``x`` rounded to ``w``'s
    dtype, products summed in x's dtype, by XLA's dot."""
    m = x.shape[0]
    xn = x.astype(w.dtype)
    if m < MIN_NARROW_DOT_ROWS:
        xn = jnp.pad(xn, ((0, MIN_NARROW_DOT_ROWS - m), (0, 0)))
    return jax.lax.dot_general(xn, w, (((1,), (w_in_axis,)), ((), ())), preferred_element_type=x.dtype)[:m]


def bf16_matmul_reference(x: jax.Array, packed: jax.Array, n: int) -> jax.Array:
    """``x [M, K]`` float32 times packed bfloat16 weights -> ``[M, N]`` float32, through XLA."""
    return narrow_weight_dot(x, unpack(packed, x.shape[1], n), 0)


def amx_matmul_kernel(x: jax.Array, packed: jax.Array, n: int) -> jax.Array:
    """The AMX kernel (``cpu_native.enable`` must have turned it on); shapes as in the reference."""
    _validate(x, packed, n)
    return jax.ffi.ffi_call(cpu_native.AMX_MATMUL, jax.ShapeDtypeStruct((x.shape[0], n), jnp.float32))(x, packed)


def avx512bf16_matmul_kernel(x: jax.Array, packed: jax.Array, n: int) -> jax.Array:
    """The AVX512_BF16 kernel (``cpu_native.enable`` must have turned it on); shapes as in the
    reference."""
    _validate(x, packed, n)
    return jax.ffi.ffi_call(cpu_native.AVX512BF16_MATMUL,
                            jax.ShapeDtypeStruct((x.shape[0], n), jnp.float32))(x, packed)


def bf16_matmul(x: jax.Array, packed: jax.Array, n: int) -> jax.Array:
    """The engine's dispatch point for float32 activations times packed bfloat16 weights."""
    kernels = cpu_native.kernels()
    if kernels.amx_matmul and dispatch.cpu_kernels():
        return amx_matmul_kernel(x, packed, n)
    if kernels.avx512bf16_matmul and dispatch.cpu_kernels():
        return avx512bf16_matmul_kernel(x, packed, n)
    _validate(x, packed, n)
    return bf16_matmul_reference(x, packed, n)


def _validate(x: jax.Array, packed: jax.Array, n: int) -> None:
    if x.ndim != 2 or x.dtype != jnp.float32 or packed.ndim != 3 or packed.dtype != jnp.bfloat16:
        raise ValueError(f"expected float32 x [M, K] and packed bfloat16 [N/16, K/2, 32], got "
                         f"{x.dtype}{list(x.shape)} and {packed.dtype}{list(packed.shape)}")
    if packed.shape != (-(-n // BLOCK_COLS), -(-x.shape[1] // TILE_K) * TILE_K // 2, 2 * BLOCK_COLS):
        raise ValueError(f"packed weights {list(packed.shape)} do not hold a [{x.shape[1]}, {n}] matrix")
