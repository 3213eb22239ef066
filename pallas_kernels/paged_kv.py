"""The paged KV layout shared by the attention kernels: a layer's pools (``PagedKV``), quantized
pages and input validation.

A layer's cache is a pool of pages ``[num_pages, kv_heads, page_size, head_dim]``; a sequence
owns the pages listed in its row of ``block_tables`` and its token ``t`` lives at page
``block_tables[b, t // page_size]``, row ``t % page_size`` of each head's block.

Quantized KV (``PagedKV.bits`` 8 or 4): pages hold uint8 codes (4 bits: two per byte along
head_dim, the even element in the low nibble) and a parallel float32 pool ``[num_pages, kv_heads,
page_size, 2]`` holds each token's and head's scale and zero: ``value = code * scale + zero``,
asymmetric over the head's ``head_dim`` values (``quantize_kv`` / ``dequantize_kv``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

# Finite, so that fully masked (padding) rows give a finite garbage row instead of NaNs.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["k", "v", "k_scale_zero", "v_scale_zero"],
                   meta_fields=["bits"])
@dataclass(frozen=True)
class PagedKV:
    """One layer's K and V page pools, the operand every paged-attention function takes.

    ``bits`` 0: ``k``, ``v`` are ``[num_pages, kv_heads, page_size, head_dim]`` in a float dtype
    and the scale/zero pools are None. ``bits`` 8 or 4: ``k``, ``v`` hold uint8 codes
    ``[num_pages, kv_heads, page_size, head_dim * bits // 8]`` (4 bits: two per byte along
    head_dim) and ``k_scale_zero``, ``v_scale_zero`` are float32 ``[num_pages, kv_heads,
    page_size, 2]``: each token's and head's scale and zero (``value = code * scale + zero``).
    ``bits`` is pytree metadata: static under ``jax.jit``.
    """

    k: jax.Array
    v: jax.Array
    k_scale_zero: jax.Array | None = None
    v_scale_zero: jax.Array | None = None
    bits: int = 0

    @property
    def num_pages(self) -> int:
        return self.k.shape[0]

    @property
    def kv_heads(self) -> int:
        return self.k.shape[1]

    @property
    def page_size(self) -> int:
        return self.k.shape[2]


def quantize_kv(x: jax.Array, bits: int) -> tuple[jax.Array, jax.Array]:
    """``x`` ``[..., head_dim]`` -> (uint8 codes ``[..., head_dim * bits // 8]``, float32 ``[..., 2]``
    scale and zero), asymmetric over the last axis."""
    levels = 2**bits - 1
    x = x.astype(jnp.float32)
    lo, hi = x.min(axis=-1, keepdims=True), x.max(axis=-1, keepdims=True)
    scale = jnp.where(hi > lo, (hi - lo) / levels, 1.0)
    codes = jnp.clip(jnp.round((x - lo) / scale), 0, levels).astype(jnp.uint8)
    if bits == 4:
        codes = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return codes, jnp.concatenate([scale, lo], axis=-1)


def dequantize_kv(codes: jax.Array, scale_zero: jax.Array, bits: int) -> jax.Array:
    """Inverse of ``quantize_kv`` (up to rounding): float32 ``[..., head_dim]``."""
    if bits == 4:
        codes = jnp.stack([codes & 0xF, codes >> 4], axis=-1).reshape(*codes.shape[:-1], -1)
    return codes.astype(jnp.float32) * scale_zero[..., :1] + scale_zero[..., 1:]


def validate_paged_inputs(q, kv: PagedKV, block_tables, seq_lens, q_positions):
    """Clear errors for the shapes every paged-attention implementation takes (see the reference)."""
    if q.ndim != 4:
        raise ValueError(f"q must be [batch, q_len, heads, head_dim], got shape {q.shape}")
    if kv.k.ndim != 4 or kv.k.shape != kv.v.shape:
        raise ValueError(
            "kv.k and kv.v must both be [num_pages, kv_heads, page_size, head_dim], "
            f"got {kv.k.shape} and {kv.v.shape}"
        )
    batch, q_len, heads, head_dim = q.shape
    stored = head_dim * kv.bits // 8 if kv.bits else head_dim
    if kv.k.shape[3] != stored:
        raise ValueError(f"pages hold {kv.k.shape[3]} values per head; q's head_dim {head_dim} needs {stored}")
    if heads % kv.kv_heads:
        raise ValueError(f"query heads ({heads}) must be a multiple of kv heads ({kv.kv_heads})")
    if block_tables.ndim != 2 or block_tables.shape[0] != batch:
        raise ValueError(f"block_tables must be [batch={batch}, pages], got {block_tables.shape}")
    if seq_lens.shape != (batch,):
        raise ValueError(f"seq_lens must be [batch={batch}], got {seq_lens.shape}")
    if q_positions.shape != (batch, q_len):
        raise ValueError(f"q_positions must be [batch={batch}, q_len={q_len}], got {q_positions.shape}")


def code_parts(codes: jax.Array, kv_bits: int) -> tuple[jax.Array, ...]:
    """Inside a kernel: a tile of quantized pages ``[keys, stored]`` as dot operands, with no
    interleave (Triton has none): int4 bytes split into their low nibbles (the even head_dim
    elements) and high nibbles (the odd ones), which meet q's even and odd elements; int8 codes
    as they are."""
    if kv_bits == 4:
        return codes & 0xF, codes >> 4
    return (codes,)
