"""float32 matmuls on CPU with AVX-512 or AVX2, over weights packed once into column blocks.

At decode's few rows a linear layer is one pass over its weights, and XLA:CPU's float32 dot
reads them at ~14 GB/s there on the 2-core Xeon, half of what two cores read
(``benchmarks/cpu_limits.py``); at 16-32 rows it reaches under 90 GFLOP/s. On the 2-core EPYC
the kernel was 1.15x XLA's dot at 1 row and ~1.8-2.1x at 8-32 rows (exploratory). This module packs each weight once and multiplies with a
small C++ kernel that XLA calls through its FFI (``f32_matmul.cc``).

Packed format (``pack``): ``W [K, N]`` becomes ``[ceil(N / 16), K, 16]`` float32, zero padded:
column block ``b``, row ``k`` holds ``W[k, 16b .. 16b + 15]``.

``f32_matmul`` is the dispatch point: the kernel once ``cpu_native.enable`` has turned it on and
the choice of implementation is automatic (``dispatch.cpu_kernels``); otherwise
``f32_matmul_reference``, which unpacks and calls XLA's dot. The two sum in different orders, so
they agree to float32 rounding, not bit for bit; the kernel's sum for a row does not depend on
the other rows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import cpu_native, dispatch

BLOCK_COLS = 16  # output columns of one packed block (one AVX-512 register, two AVX2 ones)


@jax.jit
def pack(w: jax.Array) -> jax.Array:
    """``w [K, N]`` float32 -> packed ``[ceil(N / 16), K, 16]`` (module docstring)."""
    k, n = w.shape
    npad = -(-n // BLOCK_COLS) * BLOCK_COLS
    w = jnp.pad(w, ((0, 0), (0, npad - n)))
    return w.reshape(k, npad // BLOCK_COLS, BLOCK_COLS).transpose(1, 0, 2)


def unpack(packed: jax.Array, n: int) -> jax.Array:
    """Inverse of ``pack``: ``[K, N]``."""
    blocks, k, _ = packed.shape
    return packed.transpose(1, 0, 2).reshape(k, blocks * BLOCK_COLS)[:, :n]


def f32_matmul_reference(x: jax.Array, packed: jax.Array, n: int) -> jax.Array:
    """``x [M, K]`` times packed float32 weights -> ``[M, N]``, through XLA's dot."""
    return x @ unpack(packed, n)


def f32_matmul_kernel(x: jax.Array, packed: jax.Array, n: int) -> jax.Array:
    """The kernel (``cpu_native.enable`` must have turned it on); shapes as in the reference."""
    _validate(x, packed, n)
    return jax.ffi.ffi_call(cpu_native.F32_MATMUL, jax.ShapeDtypeStruct((x.shape[0], n), jnp.float32))(x, packed)


def f32_matmul(x: jax.Array, packed: jax.Array, n: int) -> jax.Array:
    """The engine's dispatch point for float32 activations times packed float32 weights."""
    if cpu_native.kernels().f32_matmul and dispatch.cpu_kernels():
        return f32_matmul_kernel(x, packed, n)
    _validate(x, packed, n)
    return f32_matmul_reference(x, packed, n)


def _validate(x: jax.Array, packed: jax.Array, n: int) -> None:
    if x.ndim != 2 or x.dtype != jnp.float32 or packed.ndim != 3 or packed.dtype != jnp.float32:
        raise ValueError(f"expected float32 x [M, K] and packed float32 [N/16, K, 16], got "
                         f"{x.dtype}{list(x.shape)} and {packed.dtype}{list(packed.shape)}")
    if packed.shape != (-(-n // BLOCK_COLS), x.shape[1], BLOCK_COLS):
        raise ValueError(f"packed weights {list(packed.shape)} do not hold a [{x.shape[1]}, {n}] matrix")
