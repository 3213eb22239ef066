"""Matmuls with weights in jaxinfer's packed integer format, and the format itself.

The format (``W`` is a linear layer's ``[in, out]`` kernel):

* ``qweight``: the integer codes. 4 bits: ``uint32 [in // 8, out]``, eight codes per word along
  ``in``, lowest nibble first (code of row ``8j + i`` in bits ``4i .. 4i+3`` of word ``j``).
  8 bits: ``int8 [in, out]``.
* ``scales``, ``biases``: ``[ceil(in / group_size), out]`` in the activation dtype, one pair per
  group of ``group_size`` consecutive input channels: ``W[k, n] = q[k, n] * scales[g, n] +
  biases[g, n]`` with ``g = k // group_size``.
* When ``group_size`` does not divide ``in`` (SmolLM2's 576 and groups of 128), the codes are
  padded with rows up to a whole number of groups; those rows are never read (the weight is cut
  back to ``in`` rows, which the activations' width gives).

An affine map per group represents exactly AWQ's integer zero points (``bias = -zero * scale``),
GGUF Q4_1's minimums (``bias = m``), Q4_0's offset (``bias = -8 * d``) and Q8_0 (``bias = 0``).

``int4_matmul`` is the engine's dispatch point; everywhere but on GPU it runs the jnp reference,
which dequantizes the weight and calls XLA's dot.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

CODES_PER_WORD = 8
GROUP_SIZES = (32, 64, 128)


def pack_int4(codes: np.ndarray) -> np.ndarray:
    """``uint8 [in, out]`` codes in 0..15 -> ``uint32 [in // 8, out]`` words (numpy)."""
    codes = np.asarray(codes)
    if codes.shape[0] % CODES_PER_WORD:
        raise ValueError(f"input channels ({codes.shape[0]}) must be a multiple of {CODES_PER_WORD}")
    if codes.size and (codes.min() < 0 or codes.max() > 15):
        raise ValueError("4-bit codes must be in 0..15")
    c = codes.astype(np.uint32).reshape(-1, CODES_PER_WORD, *codes.shape[1:])
    shifts = (4 * np.arange(CODES_PER_WORD, dtype=np.uint32)).reshape(1, -1, *([1] * (codes.ndim - 1)))
    return np.bitwise_or.reduce(c << shifts, axis=1)


def unpack_int4(words: jax.Array) -> jax.Array:
    """``uint32 [in // 8, out]`` -> ``uint8 [in, out]`` codes (jnp; works on numpy inputs too)."""
    shifts = (4 * jnp.arange(CODES_PER_WORD, dtype=jnp.uint32)).reshape(1, -1, 1)
    codes = (words[:, None, :] >> shifts) & 0xF
    return codes.reshape(-1, words.shape[-1]).astype(jnp.uint8)


def padded_rows(n_in: int, group_size: int) -> int:
    """Input channels rounded up to a whole number of groups: the rows the codes hold."""
    return -(-n_in // group_size) * group_size


def dequantize(qweight: jax.Array, scales: jax.Array, biases: jax.Array, n_in: int | None = None) -> jax.Array:
    """The ``[n_in, out]`` weight in ``scales``' dtype, from either code width (``n_in``: the real
    input channels; default all rows)."""
    codes = unpack_int4(qweight) if qweight.dtype == jnp.uint32 else qweight
    group = codes.shape[0] // scales.shape[0]
    q = codes.astype(scales.dtype).reshape(scales.shape[0], group, -1)
    w = (q * scales[:, None, :] + biases[:, None, :]).reshape(codes.shape)
    return w if n_in is None else w[:n_in]


def _validate(x, qweight, scales, biases):
    bits = 4 if qweight.dtype == jnp.uint32 else 8 if qweight.dtype == jnp.int8 else None
    if bits is None:
        raise ValueError(f"qweight must be uint32 (4-bit) or int8 (8-bit), got {qweight.dtype}")
    rows = qweight.shape[0] * (CODES_PER_WORD if bits == 4 else 1)
    if scales.shape != biases.shape or scales.shape[1] != qweight.shape[1] or rows % scales.shape[0]:
        raise ValueError(
            f"scales {scales.shape} and biases {biases.shape} must be [groups, out] for qweight {qweight.shape}"
        )
    group = rows // scales.shape[0]
    if padded_rows(x.shape[-1], group) != rows:
        raise ValueError(f"x has {x.shape[-1]} input channels; the weight's codes hold {rows} rows in groups of {group}")


def int4_matmul_reference(x: jax.Array, qweight: jax.Array, scales: jax.Array, biases: jax.Array) -> jax.Array:
    """``x [..., in] @ W`` with ``W`` in the packed format; accumulates in float32, returns x's dtype."""
    _validate(x, qweight, scales, biases)
    w = dequantize(qweight, scales, biases, x.shape[-1])
    y = jnp.einsum("...i,io->...o", x, w.astype(x.dtype), preferred_element_type=jnp.float32)
    return y.astype(x.dtype)


def int4_matmul(x: jax.Array, qweight: jax.Array, scales: jax.Array, biases: jax.Array) -> jax.Array:
    """The engine's dispatch point for quantized linear layers (shapes as in the reference)."""
    return int4_matmul_reference(x, qweight, scales, biases)
