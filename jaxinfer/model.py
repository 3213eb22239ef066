"""The Llama-family transformer in Flax Linen, over a paged KV cache.

One implementation serves every supported family (llama, mistral, qwen2, qwen3, internlm2): they
differ only in options of ``ModelConfig`` (qkv bias, q/k norms, rope scaling, sliding window, tied
embeddings); converters map each family's weights onto this parameter tree.

Layers are unrolled in Python, each with its own weights and page pool: measured against stacked
weights under ``lax.scan`` this decodes ~2x faster on XLA:CPU (scan copies each layer's weight
slice before its matmuls) for a compile time that is still a few seconds at 30 layers
(docs/ARCHITECTURE.md has the figures).

Every parameter carries logical axis names (``vocab``, ``embed``, ``heads``, ``kv_heads``, ``mlp``,
``head_dim``, ``norm``) so that tensor parallelism can shard it by rules, without touching this file.

Checkpoints hold that canonical tree; the engine runs it with q/k/v fused (``fuse_qkv_params``):
on XLA:CPU a matrix-vector product whose weight is under ~2 MB runs on one core, and small
models' q/k/v projections are under it, while the fused one is not (``benchmarks/decode_layout.py``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.config import ModelConfig, WeightQuant
from jaxinfer.kv_cache import AttentionMetadata, KVCache, write_kv
from jaxinfer.reductions import sum_last_axis
from pallas_kernels import cpu_native, dispatch
from pallas_kernels.bf16_matmul import bf16_matmul, narrow_weight_dot
from pallas_kernels.bf16_matmul import pack as bf16_pack
from pallas_kernels.decoder_layer_cpu import LayerShape, LayerWeights, StepTokens, decoder_layer_cpu
from pallas_kernels.f32_matmul import f32_matmul
from pallas_kernels.f32_matmul import pack as f32_pack
from pallas_kernels.int4_matmul import CODES_PER_WORD, int4_matmul, padded_rows
from pallas_kernels.paged_attention import paged_attention
from pallas_kernels.paged_kv import PagedKV

Dtype = Any

# CPU matmul kernels over packed weights (pack_cpu_weights): kernel name -> (weights' dtype,
# packing, matmul, prefix of the packed leaves' names).
CPU_MATMULS = {
    "bf16_matmul": (jnp.bfloat16, bf16_pack, bf16_matmul, "bf16"),
    "f32_matmul": (jnp.float32, f32_pack, f32_matmul, "f32"),
}


def _param(module: nn.Module, name: str, shape, axes, dtype, init=nn.initializers.lecun_normal()):
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


def _dot(x: jax.Array, w: jax.Array, w_in_axis: int) -> jax.Array:
    """``x [..., in]`` contracted with ``w``'s axis ``w_in_axis`` -> ``[..., out]`` in x's dtype; a
    ``w`` stored in a narrower float than ``x`` (the CPU's bfloat16 mode) takes
    ``narrow_weight_dot``."""
    if w.dtype == x.dtype:
        return jax.lax.dot_general(x, w, (((x.ndim - 1,), (w_in_axis,)), ((), ())))
    y = narrow_weight_dot(x.reshape(-1, x.shape[-1]), w, w_in_axis)
    return y.reshape(*x.shape[:-1], y.shape[-1])


class Linear(nn.Module):
    """``y = x @ W (+ bias)`` with ``W`` ``[in, out]`` named by ``axes``: a float ``kernel``, or with
    ``quant`` set, ``qweight``/``scales``/``biases`` in the packed format of
    ``pallas_kernels.int4_matmul``."""

    features: int
    axes: tuple[str, str]
    use_bias: bool = False
    dtype: Dtype = jnp.float32
    quant: WeightQuant | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        n_in = x.shape[-1]
        packed = _packed_matmul(self, "kernel")
        if self.quant is None and packed is not None:
            matmul, w = packed
            y = matmul(x.reshape(-1, n_in), w, self.features).reshape(*x.shape[:-1], self.features)
        elif self.quant is None:
            kernel = _param(self, "kernel", (n_in, self.features), self.axes, self.dtype)
            y = _dot(x, kernel, 0)
        else:
            q = self.quant
            rows = padded_rows(n_in, q.group_size)
            code_dtype = jnp.uint32 if q.bits == 4 else jnp.int8
            zeros = nn.initializers.zeros
            qweight = _param(self, "qweight", (rows // CODES_PER_WORD if q.bits == 4 else rows, self.features),
                             self.axes, code_dtype, zeros)
            groups = (rows // q.group_size, self.features)
            scales = _param(self, "scales", groups, self.axes, self.dtype, nn.initializers.ones)
            biases = _param(self, "biases", groups, self.axes, self.dtype, zeros)
            y = int4_matmul(x, qweight, scales, biases)
        if self.use_bias:
            y = y + _param(self, "bias", (self.features,), self.axes[1:], self.dtype, nn.initializers.zeros)
        return y


def _packed_matmul(module: nn.Module, leaf: str):
    """(matmul, packed weights) when ``pack_cpu_weights`` packed the module's ``leaf``, else None."""
    for _, _, matmul, prefix in CPU_MATMULS.values():
        if module.has_variable("params", f"{prefix}_{leaf}"):
            return matmul, module.get_variable("params", f"{prefix}_{leaf}")
    return None


class RMSNorm(nn.Module):
    eps: float
    axis_name: str = "norm"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = _param(self, "scale", (x.shape[-1],), (self.axis_name,), self.dtype, nn.initializers.ones)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(sum_last_axis(x32 * x32) / x.shape[-1] + self.eps)
        return y.astype(self.dtype) * scale


def rope_table(config: ModelConfig, length: int) -> np.ndarray:
    """cos then sin of every position below ``length``, ``[length, head_dim]`` float32 (for
    ``LlamaModel``'s ``rope_table``): each correctly rounded for its float32 angle."""
    angles = np.arange(length, dtype=np.float32)[:, None] * config.rope_inv_freq().astype(np.float32)
    angles = angles.astype(np.float64)
    return np.concatenate([np.cos(angles), np.sin(angles)], axis=-1).astype(np.float32)


def rope_rotation(positions: jax.Array, inv_freq: np.ndarray, table: jax.Array | None = None):
    """cos and sin of ``positions`` ``[batch, seq]``, each ``[batch, seq, 1, head_dim / 2]``: rows
    of ``table`` (``rope_table``) when given, else computed here.

    XLA fuses cos and sin into every head's rotation of every layer, where they took ~5% of a
    batch-32 decode step and of a 512-token prefill step on the 2-core EPYC (ARCHITECTURE.md):
    the engine, which runs the model step after step, passes its table instead."""
    if table is None:
        angles = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq, jnp.float32)
        return jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]
    rows = table.at[positions].get(mode="clip")[:, :, None, :]
    return jnp.split(rows, 2, axis=-1)


def apply_rope(x: jax.Array, rotation: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Rotate ``x`` ``[batch, seq, heads, head_dim]`` by ``rope_rotation``'s cos and sin (HF half layout)."""
    cos, sin = rotation
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


class Attention(nn.Module):
    """``fused_qkv``: one ``qkv_proj`` (output columns q's, then k's, then v's) instead of three
    projections; see ``fuse_qkv_params``."""

    config: ModelConfig
    dtype: Dtype = jnp.float32
    fused_qkv: bool = False

    @nn.compact
    def __call__(self, x, cache: PagedKV, meta: AttentionMetadata, rotation: tuple[jax.Array, jax.Array]):
        """x: ``[batch, seq, embed]``, ``rotation``: ``rope_rotation`` of ``meta.positions`` ->
        (``[batch, seq, embed]``, the layer's updated cache)."""
        c = self.config
        batch, seq, _ = x.shape
        wq = c.weight_quant
        q_dim, kv_dim = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        if self.fused_qkv:
            qkv = Linear(q_dim + 2 * kv_dim, ("embed", "heads"), c.qkv_bias, self.dtype, wq, name="qkv_proj")(x)
            q, k, v = jnp.split(qkv, [q_dim, q_dim + kv_dim], axis=-1)
        else:
            q = Linear(q_dim, ("embed", "heads"), c.qkv_bias, self.dtype, wq, name="q_proj")(x)
            k = Linear(kv_dim, ("embed", "kv_heads"), c.qkv_bias, self.dtype, wq, name="k_proj")(x)
            v = Linear(kv_dim, ("embed", "kv_heads"), c.qkv_bias, self.dtype, wq, name="v_proj")(x)
        q = q.reshape(batch, seq, c.num_heads, c.head_dim)
        k = k.reshape(batch, seq, c.num_kv_heads, c.head_dim)
        v = v.reshape(batch, seq, c.num_kv_heads, c.head_dim)
        if c.qk_norm:
            q = RMSNorm(c.rms_norm_eps, "head_dim", self.dtype, name="q_norm")(q)
            k = RMSNorm(c.rms_norm_eps, "head_dim", self.dtype, name="k_norm")(k)
        q = apply_rope(q, rotation)
        k = apply_rope(k, rotation)

        cache = write_kv(cache, meta.slot_mapping, k, v)
        o = paged_attention(
            q, cache, meta.block_tables, meta.seq_lens, meta.positions,
            scale=c.head_dim**-0.5, sliding_window=c.sliding_window,
        )
        o = o.reshape(batch, seq, q_dim)
        o = Linear(c.hidden_size, ("heads", "embed"), c.o_bias, self.dtype, wq, name="o_proj")(o)
        return o, cache


class MLP(nn.Module):
    config: ModelConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = self.config
        wq = c.weight_quant
        gate = Linear(c.intermediate_size, ("embed", "mlp"), c.mlp_bias, self.dtype, wq, name="gate_proj")(x)
        up = Linear(c.intermediate_size, ("embed", "mlp"), c.mlp_bias, self.dtype, wq, name="up_proj")(x)
        return Linear(c.hidden_size, ("mlp", "embed"), c.mlp_bias, self.dtype, wq, name="down_proj")(
            nn.silu(gate) * up
        )


class DecoderLayer(nn.Module):
    """On CPU the layer runs as one kernel call (``pallas_kernels.decoder_layer_cpu``) when it fits
    there; otherwise as the modules below."""

    config: ModelConfig
    dtype: Dtype = jnp.float32
    fused_qkv: bool = False

    @nn.compact
    def __call__(self, x, cache: PagedKV, meta: AttentionMetadata, rotation: tuple[jax.Array, jax.Array]):
        c = self.config
        weights = self._kernel_weights(x, cache)
        if weights is not None:
            rotated = (*x.shape[:2], c.head_dim // 2)
            tokens = StepTokens(slots=meta.slot_mapping, block_tables=meta.block_tables, seq_lens=meta.seq_lens,
                                positions=meta.positions, cos=rotation[0].reshape(rotated),
                                sin=rotation[1].reshape(rotated))
            shape = LayerShape(heads=c.num_heads, eps=c.rms_norm_eps, scale=c.head_dim**-0.5,
                               sliding_window=c.sliding_window)
            return decoder_layer_cpu(x, weights, cache, tokens, shape)
        h = RMSNorm(c.rms_norm_eps, dtype=self.dtype, name="input_norm")(x)
        a, cache = Attention(c, self.dtype, self.fused_qkv, name="attn")(h, cache, meta, rotation)
        x = x + a
        h = RMSNorm(c.rms_norm_eps, dtype=self.dtype, name="post_attention_norm")(x)
        x = x + MLP(c, self.dtype, name="mlp")(h)
        return x, cache

    def _kernel_weights(self, x: jax.Array, cache: PagedKV) -> LayerWeights | None:
        """The layer's weights for ``decoder_layer_cpu`` when the kernel runs it: float32
        activations and pages, q/k/v fused and every projection packed for ``f32_matmul``, no q/k
        norms and no bias but q/k/v's. Else None."""
        c = self.config
        if (x.dtype != jnp.float32 or self.dtype != jnp.float32 or cache.bits or cache.k.dtype != jnp.float32
                or not self.fused_qkv or c.qk_norm or c.o_bias or c.mlp_bias or c.weight_quant is not None
                or not (dispatch.cpu_kernels() and cpu_native.kernels().decoder_layer)):
            return None
        p = self.variables.get("params", {})
        attn, mlp = p.get("attn", {}), p.get("mlp", {})
        packed = [layer.get("f32_kernel") for layer in (attn.get("qkv_proj", {}), attn.get("o_proj", {}),
                                                         mlp.get("gate_proj", {}), mlp.get("up_proj", {}),
                                                         mlp.get("down_proj", {}))]
        if any(w is None for w in packed):
            return None
        qkv, o, gate, up, down = packed
        return LayerWeights(input_norm=p["input_norm"]["scale"], qkv=qkv, qkv_bias=attn["qkv_proj"].get("bias"), o=o,
                            post_norm=p["post_attention_norm"]["scale"], gate=gate, up=up, down=down)


class LlamaModel(nn.Module):
    """Token ids in, hidden states and the updated cache out; ``logits`` maps hidden states to vocab.

    ``dtype`` is the activations' (and the KV cache's). The parameters given to ``apply`` may be
    stored in a narrower float (``config.activation_dtype``): the embedding rows are widened and
    matmuls take ``_dot``'s mixed path."""

    config: ModelConfig
    dtype: Dtype = jnp.float32
    fused_qkv: bool = False

    def setup(self):
        c = self.config
        self.embed_tokens = _embedding(self, c, self.dtype)
        self.layers = [DecoderLayer(c, self.dtype, self.fused_qkv, name=f"layers_{i}") for i in range(c.num_layers)]
        self.norm = RMSNorm(c.rms_norm_eps, dtype=self.dtype)
        if not c.tie_word_embeddings:
            self.lm_head = Linear(c.vocab_size, ("embed", "vocab"), dtype=self.dtype)

    def __call__(self, tokens: jax.Array, meta: AttentionMetadata, cache: KVCache, rope_table: jax.Array | None = None):
        """tokens ``[batch, seq]`` -> (hidden ``[batch, seq, embed]`` after the final norm, cache).
        ``rope_table``: ``rope_table(config, n)`` for positions below n, or None (see ``rope_rotation``)."""
        x = self.embed_tokens.at[tokens].get(mode="promise_in_bounds").astype(self.dtype)  # ids checked on admission
        rotation = rope_rotation(meta.positions, self.config.rope_inv_freq(), rope_table)
        updated = []
        for layer, layer_cache in zip(self.layers, cache.layers):
            x, layer_cache = layer(x, layer_cache, meta, rotation)
            updated.append(layer_cache)
        return self.norm(x), KVCache(layers=tuple(updated))

    def logits(self, hidden: jax.Array) -> jax.Array:
        """hidden ``[..., embed]`` -> float32 logits ``[..., vocab]``."""
        c = self.config
        packed = _packed_matmul(self, "lm_head")
        if c.tie_word_embeddings and packed is not None:
            matmul, w = packed
            out = matmul(hidden.reshape(-1, c.hidden_size), w, c.vocab_size).reshape(*hidden.shape[:-1], c.vocab_size)
        elif c.tie_word_embeddings:
            # Contract against the [vocab, embed] table directly: 2x faster than using its transpose.
            out = _dot(hidden, self.embed_tokens, 1)
        else:
            out = self.lm_head(hidden)
        return out.astype(jnp.float32)


def pack_cpu_weights(params: Any, config: ModelConfig, kernel: str) -> Any:
    """``params`` with every linear ``kernel`` of the dtype that CPU matmul ``kernel`` (a key of
    ``CPU_MATMULS``) takes replaced by the same weight in that kernel's packed format
    (``bf16_kernel``: bfloat16 for ``pallas_kernels.bf16_matmul``; ``f32_kernel``: float32 for
    ``pallas_kernels.f32_matmul``), which ``Linear`` then multiplies with that kernel (float32
    activations only). A tied embedding of that dtype also gets its transpose packed
    (``bf16_lm_head`` / ``f32_lm_head``) for ``logits``; the table stays for lookups. As
    ``fuse_qkv_params``, it takes any subset of the tree's top-level entries."""
    dtype, pack, _, prefix = CPU_MATMULS[kernel]
    out = _pack_linear_kernels(params, dtype, pack, prefix)
    embed = params.get("embed_tokens")
    if config.tie_word_embeddings and embed is not None and embed.dtype == dtype:
        out[f"{prefix}_lm_head"] = pack(embed.T)
    return out


def _pack_linear_kernels(params: Any, dtype, pack, prefix: str) -> Any:
    if not isinstance(params, Mapping):
        return params
    out = {}
    for name, value in params.items():
        if name == "kernel" and getattr(value, "ndim", 0) == 2 and value.dtype == dtype:
            out[f"{prefix}_kernel"] = pack(value)
        else:
            out[name] = _pack_linear_kernels(value, dtype, pack, prefix)
    return out


def fuse_qkv_params(params: Any, config: ModelConfig) -> Any:
    """The canonical tree (as checkpoints hold it) with each layer's q/k/v projections concatenated
    into ``qkv_proj``, for ``LlamaModel(..., fused_qkv=True)``. Float and packed linears alike keep
    their output columns on the last axis of every leaf (kernel, qweight, scales, biases, bias).
    An engine-only layout: tensor-parallel rules (``param_logical_axes``) describe the canonical
    tree, since an even split of the fused columns would mix q, k and v across devices. Any subset
    of the tree's top-level entries may be given (the engine lays its weights out part by part)."""
    out = dict(params)
    for i in range(config.num_layers):
        if f"layers_{i}" not in params:
            continue
        attn = dict(params[f"layers_{i}"]["attn"])
        q, k, v = (attn.pop(name) for name in ("q_proj", "k_proj", "v_proj"))
        attn["qkv_proj"] = {leaf: jnp.concatenate([q[leaf], k[leaf], v[leaf]], axis=-1) for leaf in q}
        out[f"layers_{i}"] = {**params[f"layers_{i}"], "attn": attn}
    return out


def _embedding(module: nn.Module, c: ModelConfig, dtype) -> jax.Array:
    init = nn.initializers.normal(stddev=0.02)
    return _param(module, "embed_tokens", (c.vocab_size, c.hidden_size), ("vocab", "embed"), dtype, init)


def param_logical_axes(config: ModelConfig) -> Any:
    """The parameter tree with a ``PartitionSpec`` of logical axis names at every leaf."""
    model = LlamaModel(config)
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), *_dummy_inputs(config), method=_forward_all)
    )
    return nn.get_partition_spec(shapes)["params"]


def init_params(config: ModelConfig, seed: int = 0, dtype=jnp.float32) -> Any:
    """Random parameters (for tests and benchmarks; real weights come from converters)."""
    model = LlamaModel(config, dtype)
    variables = model.init(jax.random.key(seed), *_dummy_inputs(config, dtype), method=_forward_all)
    return nn.unbox(variables)["params"]


def _forward_all(model: LlamaModel, tokens, meta, cache):
    """Touches every parameter, so that ``init`` creates the LM head too."""
    return model.logits(model(tokens, meta, cache)[0])


def _dummy_inputs(config: ModelConfig, dtype=jnp.float32):
    tokens = jnp.zeros((1, 1), jnp.int32)
    meta = AttentionMetadata(
        positions=jnp.zeros((1, 1), jnp.int32),
        slot_mapping=jnp.zeros((1, 1), jnp.int32),
        block_tables=jnp.zeros((1, 1), jnp.int32),
        seq_lens=jnp.ones((1,), jnp.int32),
    )
    return tokens, meta, KVCache.allocate(config, num_pages=1, page_size=1, dtype=dtype)
