"""HuggingFace ``config.json`` -> ``ModelConfig``, for every supported family."""

from __future__ import annotations

from jaxinfer.config import ROPE_TYPES, ModelConfig, RopeScaling

# model_type -> the HF architecture class name users see in config.json.
SUPPORTED_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "internlm2": "InternLM2ForCausalLM",
}


class UnsupportedModelError(ValueError):
    pass


def supported_list() -> str:
    return ", ".join(f"{t} ({a})" for t, a in SUPPORTED_ARCHITECTURES.items())


def model_family(hf: dict) -> str:
    """The family key of an HF config, or an error listing the supported ones."""
    model_type = hf.get("model_type")
    if model_type in SUPPORTED_ARCHITECTURES:
        return model_type
    for family, arch in SUPPORTED_ARCHITECTURES.items():
        if arch in (hf.get("architectures") or []):
            return family
    found = model_type or ", ".join(hf.get("architectures") or []) or "nothing"
    raise UnsupportedModelError(
        f"unsupported model architecture {found!r}; supported: {supported_list()}"
    )


def _rope(hf: dict) -> tuple[float, RopeScaling]:
    # transformers >= 5 writes `rope_parameters` (theta inside); older configs `rope_theta` +
    # `rope_scaling` (type under `type` or `rope_type`).
    params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    merged = {**scaling, **params}
    rope_type = merged.get("rope_type", merged.get("type", "default")) or "default"
    if rope_type == "dynamic":
        # Dynamic NTK changes nothing within max_position_embeddings, which bounds our context.
        rope_type = "default"
    if rope_type not in ROPE_TYPES:
        raise UnsupportedModelError(
            f"unsupported rope scaling {rope_type!r}; supported: {', '.join(ROPE_TYPES)}, dynamic"
        )
    if rope_type == "default":
        return theta, RopeScaling()
    kwargs = {"rope_type": rope_type, "factor": float(merged.get("factor", 1.0))}
    if rope_type == "llama3":
        kwargs.update(
            low_freq_factor=float(merged["low_freq_factor"]),
            high_freq_factor=float(merged["high_freq_factor"]),
            original_max_position_embeddings=int(merged["original_max_position_embeddings"]),
        )
    return theta, RopeScaling(**kwargs)


def _ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(int(v) for v in (value if isinstance(value, (list, tuple)) else [value]))


def model_config_from_hf(hf: dict) -> ModelConfig:
    family = model_family(hf)
    heads = int(hf["num_attention_heads"])
    hidden = int(hf["hidden_size"])
    theta, scaling = _rope(hf)
    attention_bias = bool(hf.get("attention_bias", False))
    qkv_bias, o_bias = attention_bias, attention_bias
    sliding_window = None
    if family == "qwen2":
        qkv_bias, o_bias = True, False
    if family == "internlm2":
        qkv_bias = o_bias = bool(hf.get("bias", False))
    if family == "mistral":
        sliding_window = hf.get("sliding_window")
    if family in ("qwen2", "qwen3") and hf.get("use_sliding_window"):
        raise UnsupportedModelError(f"{family} with use_sliding_window=true is not supported")
    return ModelConfig(
        architecture=family,
        vocab_size=int(hf["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(hf["intermediate_size"]),
        num_layers=int(hf["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(hf.get("head_dim") or hidden // heads),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        mlp_bias=bool(hf.get("mlp_bias", False)),
        qk_norm=family == "qwen3",
        sliding_window=int(sliding_window) if sliding_window else None,
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=_ids(hf.get("eos_token_id")),
    )
