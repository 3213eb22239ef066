"""Where each HF tensor goes in jaxinfer's parameter tree, per family.

HF linear weights are ``[out, in]``; ours are ``[in, out]`` kernels (``jaxinfer.model.Linear``).
InternLM2 packs q, k and v into one ``wqkv`` whose rows are grouped per KV head:
``[kv_heads, queries_per_kv + 2, head_dim]`` (the queries of the group, then its key, then its value).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from jaxinfer.config import ModelConfig

ParamPath = tuple[str, ...]


@dataclass(frozen=True)
class TensorRule:
    """Build one parameter from the named HF tensors."""

    sources: tuple[str, ...]
    build: Callable[..., np.ndarray]


def _same(x: np.ndarray) -> np.ndarray:
    return x


def _kernel(w: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(w.T)


def _llama_names(i: int) -> dict[str, str]:
    p = f"model.layers.{i}."
    return {
        "q": p + "self_attn.q_proj", "k": p + "self_attn.k_proj", "v": p + "self_attn.v_proj",
        "o": p + "self_attn.o_proj", "gate": p + "mlp.gate_proj", "up": p + "mlp.up_proj",
        "down": p + "mlp.down_proj", "input_norm": p + "input_layernorm",
        "post_norm": p + "post_attention_layernorm", "q_norm": p + "self_attn.q_norm",
        "k_norm": p + "self_attn.k_norm",
    }


def _internlm2_names(i: int) -> dict[str, str]:
    p = f"model.layers.{i}."
    return {
        "o": p + "attention.wo", "gate": p + "feed_forward.w1", "up": p + "feed_forward.w3",
        "down": p + "feed_forward.w2", "input_norm": p + "attention_norm", "post_norm": p + "ffn_norm",
    }


def _wqkv_part(c: ModelConfig, part: str) -> Callable[[np.ndarray], np.ndarray]:
    """Slice q, k or v (weight ``[rows, in]`` or bias ``[rows]``) out of InternLM2's packed wqkv."""
    g = c.queries_per_kv

    def build(w: np.ndarray) -> np.ndarray:
        grouped = w.reshape(c.num_kv_heads, g + 2, c.head_dim, *w.shape[1:])
        sel = {"q": grouped[:, :g], "k": grouped[:, g], "v": grouped[:, g + 1]}[part]
        rows = sel.reshape(-1, *w.shape[1:])
        return _kernel(rows) if w.ndim == 2 else np.ascontiguousarray(rows)

    return build


def weight_plan(config: ModelConfig) -> dict[ParamPath, TensorRule]:
    """Every parameter of ``config``'s model and the HF tensors it is built from."""
    c = config
    internlm2 = c.architecture == "internlm2"
    plan: dict[ParamPath, TensorRule] = {}

    def linear(path: ParamPath, hf: str, bias: bool):
        plan[path + ("kernel",)] = TensorRule((hf + ".weight",), _kernel)
        if bias:
            plan[path + ("bias",)] = TensorRule((hf + ".bias",), _same)

    embed = "model.tok_embeddings.weight" if internlm2 else "model.embed_tokens.weight"
    plan[("embed_tokens",)] = TensorRule((embed,), _same)
    for i in range(c.num_layers):
        layer = f"layers_{i}"
        names = _internlm2_names(i) if internlm2 else _llama_names(i)
        if internlm2:
            wqkv = f"model.layers.{i}.attention.wqkv"
            for part in ("q", "k", "v"):
                plan[(layer, "attn", f"{part}_proj", "kernel")] = TensorRule((wqkv + ".weight",), _wqkv_part(c, part))
                if c.qkv_bias:
                    plan[(layer, "attn", f"{part}_proj", "bias")] = TensorRule((wqkv + ".bias",), _wqkv_part(c, part))
        else:
            for part in ("q", "k", "v"):
                linear((layer, "attn", f"{part}_proj"), names[part], c.qkv_bias)
        linear((layer, "attn", "o_proj"), names["o"], c.o_bias)
        if c.qk_norm:
            plan[(layer, "attn", "q_norm", "scale")] = TensorRule((names["q_norm"] + ".weight",), _same)
            plan[(layer, "attn", "k_norm", "scale")] = TensorRule((names["k_norm"] + ".weight",), _same)
        for part in ("gate", "up", "down"):
            linear((layer, "mlp", f"{part}_proj"), names[part], c.mlp_bias)
        plan[(layer, "input_norm", "scale")] = TensorRule((names["input_norm"] + ".weight",), _same)
        plan[(layer, "post_attention_norm", "scale")] = TensorRule((names["post_norm"] + ".weight",), _same)
    plan[("norm", "scale")] = TensorRule(("model.norm.weight",), _same)
    if not c.tie_word_embeddings:
        plan[("lm_head", "kernel")] = TensorRule(("output.weight" if internlm2 else "lm_head.weight",), _kernel)
    return plan


def set_path(tree: dict, path: ParamPath, value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value
