"""A whole float32 Llama decoder layer of a step (decode or prefill chunk) in one call on CPU: the
kernel of ``decoder_layer_cpu.cc`` and its jnp reference.

At batch 1 a SmolLM2 layer's matmuls stream its weights in ~0.4 ms, and around them XLA ran ~20
small ops (two RMSNorms, rope, two K/V scatters, residual adds, the activation) with a hand-off
between its threads at each: ~1.6 ms of a 14.6 ms step (``benchmarks/profile_step.py``). The
kernel runs the layer's phases back to back on the same threads. Its projections sum exactly as
``f32_matmul``'s kernel does and its attention is ``paged_attention_cpu``'s code; the norms, rope
and activation agree with the reference to float32 rounding. Prefill chunks run it too, so that a
token computes to the same bits in a decode step and in a prefill chunk: a preempted sequence,
recomputed by prefill, resumes exactly where it was.

``jaxinfer.model.DecoderLayer`` calls ``decoder_layer_cpu`` for the layers it fits (float32
activations and pages, q/k/v fused, weights packed by ``f32_matmul.pack``, no q/k norms and no
bias but q/k/v's) once ``cpu_native.enable`` has turned it on; other layers run as its Flax
modules. ``decoder_layer_reference`` restates that math over the kernel's operands, since this
package sits below the model and cannot call it.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import cpu_native
from pallas_kernels.f32_matmul import f32_matmul_reference
from pallas_kernels.paged_attention import paged_attention_reference
from pallas_kernels.paged_kv import PagedKV


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["input_norm", "qkv", "qkv_bias", "o", "post_norm", "gate", "up", "down"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class LayerWeights:
    """One layer's weights: norms' scales ``[embed]``; projections packed by ``f32_matmul.pack``
    (``qkv``: q's, k's then v's output columns; ``qkv_bias`` ``[q + 2 kv columns]`` or None)."""

    input_norm: jax.Array
    qkv: jax.Array
    qkv_bias: jax.Array | None
    o: jax.Array
    post_norm: jax.Array
    gate: jax.Array
    up: jax.Array
    down: jax.Array


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["slots", "block_tables", "seq_lens", "positions", "cos", "sin"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class StepTokens:
    """Where the step's new tokens go and what they see, as ``AttentionMetadata`` says: ``slots``,
    ``positions`` ``[batch, q_len]``, ``seq_lens`` ``[batch]``, ``block_tables`` ``[batch,
    pages_per_seq]``, all int32; rope's ``cos`` and ``sin`` of the positions ``[batch, q_len,
    head_dim / 2]``."""

    slots: jax.Array
    block_tables: jax.Array
    seq_lens: jax.Array
    positions: jax.Array
    cos: jax.Array
    sin: jax.Array


@dataclasses.dataclass(frozen=True)
class LayerShape:
    """What the weights' shapes leave open: query heads, the norms' epsilon, the attention scale and
    sliding window (None: none)."""

    heads: int
    eps: float
    scale: float
    sliding_window: int | None = None


def decoder_layer_reference(x: jax.Array, w: LayerWeights, kv: PagedKV, rows: StepTokens,
                            shape: LayerShape) -> tuple[jax.Array, PagedKV]:
    """``x [batch, q_len, embed]`` float32 -> (``x`` after the layer, the pools with each new
    token's K/V written at its slot), through XLA."""
    batch, q_len, embed = x.shape
    kv_heads, head_dim = kv.k.shape[1], kv.k.shape[3]
    q_dim, kv_dim = shape.heads * head_dim, kv_heads * head_dim

    def norm(v, scale):
        return v * jax.lax.rsqrt(jnp.mean(v * v, axis=-1, keepdims=True) + shape.eps) * scale

    def rope(v):  # [batch, q_len, heads, head_dim]
        v1, v2 = jnp.split(v, 2, axis=-1)
        c, s = rows.cos[:, :, None], rows.sin[:, :, None]
        return jnp.concatenate([v1 * c - v2 * s, v2 * c + v1 * s], axis=-1)

    qkv = f32_matmul_reference(norm(x, w.input_norm), w.qkv, q_dim + 2 * kv_dim)
    if w.qkv_bias is not None:
        qkv = qkv + w.qkv_bias
    q = rope(qkv[..., :q_dim].reshape(batch, q_len, shape.heads, head_dim))
    k = rope(qkv[..., q_dim:q_dim + kv_dim].reshape(batch, q_len, kv_heads, head_dim))
    v = qkv[..., q_dim + kv_dim:].reshape(batch, q_len, kv_heads, head_dim)
    page_size = kv.k.shape[2]
    slots = rows.slots.reshape(-1)
    pages, offsets = slots // page_size, slots % page_size
    kv = dataclasses.replace(kv, k=kv.k.at[pages, :, offsets].set(k.reshape(-1, kv_heads, head_dim)),
                             v=kv.v.at[pages, :, offsets].set(v.reshape(-1, kv_heads, head_dim)))
    o = paged_attention_reference(q, kv, rows.block_tables, rows.seq_lens, rows.positions, scale=shape.scale,
                                  sliding_window=shape.sliding_window)
    x = x + f32_matmul_reference(o.reshape(batch, q_len, q_dim), w.o, embed)
    h = norm(x, w.post_norm)
    inter = w.down.shape[1]
    mlp = jax.nn.silu(f32_matmul_reference(h, w.gate, inter)) * f32_matmul_reference(h, w.up, inter)
    return x + f32_matmul_reference(mlp, w.down, embed), kv


def decoder_layer_cpu(x: jax.Array, w: LayerWeights, kv: PagedKV, rows: StepTokens,
                      shape: LayerShape) -> tuple[jax.Array, PagedKV]:
    """The kernel (``cpu_native.enable`` must have turned it on); as ``decoder_layer_reference``.
    With the pools donated, the K/V writes update them in place."""
    if x.dtype != jnp.float32 or kv.bits or kv.k.dtype != jnp.float32 or x.ndim != 3:
        raise ValueError("the decoder layer kernel takes float32 x [batch, q_len, embed] over float32 pages")
    bias = w.qkv_bias if w.qkv_bias is not None else jnp.zeros((0,), jnp.float32)
    out, k, v = jax.ffi.ffi_call(
        cpu_native.DECODER_LAYER,
        (jax.ShapeDtypeStruct(x.shape, jnp.float32), jax.ShapeDtypeStruct(kv.k.shape, jnp.float32),
         jax.ShapeDtypeStruct(kv.v.shape, jnp.float32)),
        input_output_aliases={6: 1, 7: 2},
    )(x, w.input_norm, w.qkv, bias, rows.cos, rows.sin, kv.k, kv.v, *(a.astype(jnp.int32) for a in (
        rows.slots, rows.block_tables, rows.seq_lens, rows.positions)), w.o, w.post_norm, w.gate, w.up, w.down,
      eps=np.float32(shape.eps), scale=np.float32(shape.scale), window=np.int64(shape.sliding_window or 0),
      heads=np.int64(shape.heads))
    return out, dataclasses.replace(kv, k=k, v=v)
