"""Tiny random-weight HuggingFace models, built at test time (no weights are ever committed)."""

from __future__ import annotations

import json
import os
import shutil

import torch
from safetensors.torch import save_file

BASE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=256,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
)

# family -> (transformers classes, config overrides). The variants cover every option of
# jaxinfer.config.ModelConfig that a family sets.
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "llama_tied": ("LlamaConfig", "LlamaForCausalLM", {"tie_word_embeddings": True}),
    "llama3_rope": (
        "LlamaConfig", "LlamaForCausalLM",
        {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 32}},
    ),
    "llama_linear_rope": ("LlamaConfig", "LlamaForCausalLM", {"rope_scaling": {"rope_type": "linear", "factor": 4.0}}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 24}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"tie_word_embeddings": True}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 32}),
}


def build_tiny(family: str, out_dir: str, seed: int = 0, tokenizer_dir: str | None = None, **overrides):
    """Save a tiny random ``family`` model to ``out_dir``; returns the torch model (eval mode).

    With ``tokenizer_dir``, its tokenizer files are copied in and the vocab is sized to match.
    """
    import transformers

    config_cls, model_cls, family_overrides = FAMILIES[family]
    kwargs = {**BASE, **family_overrides, **overrides}
    if tokenizer_dir:
        kwargs["vocab_size"] = len(transformers.AutoTokenizer.from_pretrained(tokenizer_dir))
    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(**kwargs)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():  # HF initializes norms to ones and biases to zeros: randomize both so
        for name, p in model.named_parameters():  # that a wrong norm or a dropped bias shows
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
    model.save_pretrained(out_dir)
    if tokenizer_dir:
        for f in os.listdir(tokenizer_dir):
            if f.startswith("tokenizer") or f.endswith(".jinja") or f == "special_tokens_map.json":
                shutil.copy(os.path.join(tokenizer_dir, f), out_dir)
    return model


def pack_as_internlm2(llama_dir: str, out_dir: str) -> None:
    """Rewrite a saved Llama checkpoint in InternLM2's names and packed, head-grouped ``wqkv``."""
    from safetensors import safe_open

    with open(os.path.join(llama_dir, "config.json")) as f:
        cfg = json.load(f)
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    group = heads // kv
    with safe_open(os.path.join(llama_dir, "model.safetensors"), "pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
    out = {"model.tok_embeddings.weight": sd["model.embed_tokens.weight"], "model.norm.weight": sd["model.norm.weight"]}
    out["output.weight"] = sd.get("lm_head.weight", sd["model.embed_tokens.weight"])
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        wq = sd[p + "self_attn.q_proj.weight"].reshape(kv, group, head_dim, -1)
        wk = sd[p + "self_attn.k_proj.weight"].reshape(kv, 1, head_dim, -1)
        wv = sd[p + "self_attn.v_proj.weight"].reshape(kv, 1, head_dim, -1)
        out[p + "attention.wqkv.weight"] = torch.cat([wq, wk, wv], dim=1).reshape(-1, wq.shape[-1]).contiguous()
        out[p + "attention.wo.weight"] = sd[p + "self_attn.o_proj.weight"]
        out[p + "feed_forward.w1.weight"] = sd[p + "mlp.gate_proj.weight"]
        out[p + "feed_forward.w3.weight"] = sd[p + "mlp.up_proj.weight"]
        out[p + "feed_forward.w2.weight"] = sd[p + "mlp.down_proj.weight"]
        out[p + "attention_norm.weight"] = sd[p + "input_layernorm.weight"]
        out[p + "ffn_norm.weight"] = sd[p + "post_attention_layernorm.weight"]
    os.makedirs(out_dir, exist_ok=True)
    save_file({k: v.contiguous() for k, v in out.items()}, os.path.join(out_dir, "model.safetensors"))
    internlm2 = {
        "architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2",
        "hidden_size": cfg["hidden_size"], "intermediate_size": cfg["intermediate_size"],
        "num_hidden_layers": cfg["num_hidden_layers"], "num_attention_heads": heads,
        "num_key_value_heads": kv, "vocab_size": cfg["vocab_size"], "rms_norm_eps": cfg["rms_norm_eps"],
        "max_position_embeddings": cfg["max_position_embeddings"],
        "rope_theta": (cfg.get("rope_parameters") or {}).get("rope_theta", cfg.get("rope_theta", 10000.0)),
        "rope_scaling": None, "bias": False, "tie_word_embeddings": False,
        "bos_token_id": cfg.get("bos_token_id"), "eos_token_id": cfg.get("eos_token_id"),
    }
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(internlm2, f)
