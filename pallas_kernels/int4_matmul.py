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

``int4_matmul`` is the engine's dispatch point (``pallas_kernels.dispatch``): on GPU it runs
``int4_matmul_kernel``, a Pallas (Triton) kernel that dequantizes tiles of the weight in registers
and accumulates in float32; elsewhere the jnp reference, which dequantizes the whole weight and
calls XLA's dot.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import dispatch
from pallas_kernels.block_sizes import int4_matmul_blocks

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


# Triton's dot takes operands of at least 16 along every axis.
MIN_DOT_BLOCK = 16


def _code_rows(qweight: jax.Array) -> int:
    """Input rows the codes hold: ``in`` padded to whole groups."""
    return qweight.shape[0] * (CODES_PER_WORD if qweight.dtype == jnp.uint32 else 1)


def _dequant_matmul_kernel(x_ref, w_ref, s_ref, b_ref, o_ref, *, m, n_in, n_out, group_size, block_k, num_steps):
    """One ``[block_m, block_n]`` tile of the output, K in ``num_steps`` steps of ``block_k`` rows.

    Refs: ``x_ref [block_m, in]``; ``w_ref [rows // 8, block_n]`` uint32 or ``[rows, block_n]`` int8;
    ``s_ref``, ``b_ref [groups, block_n]``; ``o_ref [block_m, block_n]``. Edge tiles reach past
    ``m``, ``in`` and ``out``: those loads read zeros and those stores are dropped, so neither x
    nor the weight is ever padded in memory.
    """
    block_m, block_n = o_ref.shape
    packed = w_ref.dtype == jnp.uint32
    words = block_k // CODES_PER_WORD if packed else block_k
    scale_rows = max(1, block_k // group_size)  # groups one K step spans (1 when it is inside one)
    row_ok = (pl.program_id(0) * block_m + jnp.arange(block_m) < m)[:, None]
    col_ok = (pl.program_id(1) * block_n + jnp.arange(block_n) < n_out)[None, :]

    def step(k, acc):
        start = k * block_k
        # Rows of the codes past ``in`` (padding up to a whole group) meet zero activations.
        in_ok = (start + jnp.arange(block_k) < n_in)[None, :]
        x = plgpu.load(x_ref.at[:, pl.ds(start, block_k)], mask=row_ok & in_ok, other=0)
        codes = plgpu.load(w_ref.at[pl.ds(k * words, words), :], mask=col_ok, other=0)
        if packed:
            # Code i of word j is weight row 8j + i: shifting a copy of each word by 4i along a new
            # middle axis and merging the axes yields the rows in order, without an interleave
            # (Triton has none) or strided loads of x (the interpreter has none).
            shifts = 4 * jnp.arange(CODES_PER_WORD, dtype=jnp.uint32)
            codes = ((codes[:, None, :] >> shifts[None, :, None]) & 0xF).reshape(block_k, block_n)
        groups = pl.ds(start // group_size, scale_rows)
        scale = plgpu.load(s_ref.at[groups, :], mask=col_ok, other=0)
        bias = plgpu.load(b_ref.at[groups, :], mask=col_ok, other=0)
        # Each group's row repeated over its weight rows: a broadcast, not a gather.
        per_row = (scale_rows, block_k // scale_rows, block_n)
        scale = jnp.broadcast_to(scale[:, None, :], per_row).reshape(block_k, block_n)
        bias = jnp.broadcast_to(bias[:, None, :], per_row).reshape(block_k, block_n)
        # Dequantized in the scales' dtype as the reference does, then cast to x's dtype so that a
        # bf16 model's dot runs on bf16 tensor cores.
        w = (codes.astype(scale.dtype) * scale + bias).astype(x.dtype)
        return acc + jnp.dot(x, w, preferred_element_type=jnp.float32)

    acc = jax.lax.fori_loop(0, num_steps, step, jnp.zeros((block_m, block_n), jnp.float32))
    plgpu.store(o_ref.at[:, :], acc.astype(o_ref.dtype), mask=row_ok & col_ok)


@functools.partial(
    jax.jit, static_argnames=("block_m", "block_n", "block_k", "num_warps", "num_stages", "interpret")
)
def int4_matmul_kernel(
    x: jax.Array,
    qweight: jax.Array,
    scales: jax.Array,
    biases: jax.Array,
    *,
    block_m: int,
    block_n: int,
    block_k: int,
    num_warps: int,
    num_stages: int,
    interpret: bool = False,
) -> jax.Array:
    """``x [..., in] @ W`` as a Pallas (Triton) kernel: W4A16 (or W8A16), dequantized per tile.

    The grid runs over ``[block_m, block_n]`` output tiles; each loops over K in steps of
    ``block_k`` weight rows, unpacks the codes in registers, applies each group's scale and bias
    and accumulates ``x @ w`` in float32.

    Args:
      x: ``[..., in]`` activations (any leading dims, flattened to ``m`` rows).
      qweight: ``uint32 [rows // 8, out]`` (4 bits) or ``int8 [rows, out]`` (8 bits) codes;
        ``rows`` is ``in`` rounded up to whole groups.
      scales, biases: ``[groups, out]``, ``group_size = rows // groups`` a power of two.
      block_m, block_n: output tile, powers of two >= 16 (any ``m`` and ``out``: edges are masked).
      block_k: weight rows per K step, a power of two >= 16 dividing ``rows``; it may be smaller
        than a group or span several.
      num_warps, num_stages: Triton launch and software-pipelining depth.
      interpret: run with Pallas' interpreter (on CPU).

    Returns:
      ``[..., out]`` in x's dtype.
    """
    _validate(x, qweight, scales, biases)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"x must be a floating-point array, got {x.dtype}")
    for name, size in (("block_m", block_m), ("block_n", block_n), ("block_k", block_k)):
        if size < MIN_DOT_BLOCK or size & (size - 1):
            raise ValueError(f"{name} must be a power of two >= {MIN_DOT_BLOCK} (Triton), got {size}")
    rows, n_out = _code_rows(qweight), qweight.shape[1]
    group_size = rows // scales.shape[0]
    if group_size & (group_size - 1):
        raise ValueError(f"the kernel needs a power-of-two group size, got {group_size}")
    if rows % block_k:
        raise ValueError(f"block_k ({block_k}) must divide the {rows} rows the codes hold")
    *lead, n_in = x.shape
    m = math.prod(lead)
    kernel = functools.partial(
        _dequant_matmul_kernel, m=m, n_in=n_in, n_out=n_out, group_size=group_size, block_k=block_k,
        num_steps=rows // block_k,
    )
    out = pl.pallas_call(
        kernel,
        grid=(pl.cdiv(m, block_m), pl.cdiv(n_out, block_n)),
        in_specs=[
            pl.BlockSpec((block_m, n_in), lambda i, j: (i, 0)),
            pl.BlockSpec((qweight.shape[0], block_n), lambda i, j: (0, j)),
            pl.BlockSpec((scales.shape[0], block_n), lambda i, j: (0, j)),
            pl.BlockSpec((scales.shape[0], block_n), lambda i, j: (0, j)),
        ],
        out_specs=pl.BlockSpec((block_m, block_n), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((m, n_out), x.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="int4_matmul",
    )(x.reshape(m, n_in), qweight, scales, biases)
    return out.reshape(*lead, n_out)


def int4_matmul(x: jax.Array, qweight: jax.Array, scales: jax.Array, biases: jax.Array) -> jax.Array:
    """The engine's dispatch point for quantized linear layers (shapes as in the reference): the
    kernel with the blocks ``block_sizes.int4_matmul_blocks`` picks, or the jnp reference."""
    implementation = dispatch.implementation()
    if implementation == "reference":
        return int4_matmul_reference(x, qweight, scales, biases)
    blocks = int4_matmul_blocks(math.prod(x.shape[:-1]), _code_rows(qweight))
    return int4_matmul_kernel(
        x, qweight, scales, biases, block_m=blocks.block_m, block_n=blocks.block_n, block_k=blocks.block_k,
        num_warps=blocks.num_warps, num_stages=blocks.num_stages, interpret=implementation == "interpret",
    )
