"""GGUF files as HF-named tensors plus an HF-style config rebuilt from the GGUF metadata.

Tensors are dequantized to float32 with the ``gguf`` package. llama.cpp's converter permutes the
rows of Q and K of ``llama``-architecture models for its rotary layout; ``_unpermute`` undoes it so
the weights are in HF's layout again.
"""

from __future__ import annotations

import os
import re

import numpy as np

from converters.errors import CheckpointError

# GGUF general.architecture -> HF model_type.
GGUF_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}

_LAYER_TENSORS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")


def hf_name(gguf_name: str) -> str | None:
    """HF name of a GGUF tensor, or None for tensors the model does not use."""
    m = _LAYER_RE.match(gguf_name)
    if m:
        layer, kind, suffix = m.groups()
        hf = _LAYER_TENSORS.get(kind)
        return f"model.layers.{layer}.{hf}.{suffix}" if hf else None
    stem, _, suffix = gguf_name.rpartition(".")
    hf = _GLOBAL_TENSORS.get(stem)
    return f"{hf}.{suffix}" if hf else None


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class GGUFCheckpoint:
    """Metadata and HF-named, dequantized tensors of one GGUF file."""

    def __init__(self, path: str | os.PathLike):
        import gguf

        self.path = str(path)
        if not os.path.isfile(self.path):
            raise CheckpointError(self.path, "file not found")
        try:
            self._reader = gguf.GGUFReader(self.path)
        except Exception as e:  # the reader fails in many ways on truncated/corrupt files
            raise CheckpointError(self.path, f"truncated or corrupt GGUF file ({type(e).__name__}: {e})") from None
        size = os.path.getsize(self.path)
        self._tensors = {}
        for t in self._reader.tensors:
            if t.data_offset + t.n_bytes > size:
                raise CheckpointError(self.path, f"truncated: tensor {t.name} extends past the end of the file")
            name = hf_name(t.name)
            if name is not None:
                self._tensors[name] = t
        self.architecture = self._field("general.architecture")
        if self.architecture not in GGUF_ARCHITECTURES:
            raise CheckpointError(
                self.path,
                f"unsupported GGUF architecture {self.architecture!r}; supported: "
                + ", ".join(GGUF_ARCHITECTURES),
            )
        if any(t.name == "rope_freqs.weight" for t in self._reader.tensors):
            raise CheckpointError(self.path, "per-frequency rope factors (rope_freqs) are not supported")
        self.hf_config = self._hf_config()

    def _field(self, key: str, default=None):
        field = self._reader.fields.get(key)
        if field is None:
            return default
        return field.contents()

    def _hf_config(self) -> dict:
        a = self.architecture
        get = lambda k, d=None: self._field(f"{a}.{k}", d)  # noqa: E731
        heads = int(get("attention.head_count"))
        hidden = int(get("embedding_length"))
        vocab = get("vocab_size") or len(self._field("tokenizer.ggml.tokens", []))
        hf = {
            "model_type": GGUF_ARCHITECTURES[a],
            "vocab_size": int(vocab),
            "hidden_size": hidden,
            "intermediate_size": int(get("feed_forward_length")),
            "num_hidden_layers": int(get("block_count")),
            "num_attention_heads": heads,
            "num_key_value_heads": int(get("attention.head_count_kv", heads)),
            "head_dim": int(get("attention.key_length", hidden // heads)),
            "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-6)),
            "rope_theta": float(get("rope.freq_base", 10000.0)),
            "max_position_embeddings": int(get("context_length", 4096)),
            "tie_word_embeddings": "lm_head.weight" not in self._tensors,
            "bos_token_id": self._field("tokenizer.ggml.bos_token_id"),
            "eos_token_id": self._field("tokenizer.ggml.eos_token_id"),
        }
        scaling = get("rope.scaling.type")
        if scaling and scaling != "none":
            hf["rope_scaling"] = {"type": scaling, "factor": float(get("rope.scaling.factor", 1.0))}
        return hf

    def names(self) -> list[str]:
        return list(self._tensors)

    def get(self, name: str) -> np.ndarray:
        """The float32 tensor under its HF name, in HF layout (``[out, in]`` for weights)."""
        from gguf.quants import dequantize

        t = self._tensors[name]
        shape = tuple(int(d) for d in reversed(t.shape))
        try:
            w = dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float32, copy=False)
        except (NotImplementedError, ValueError) as e:
            raise CheckpointError(self.path, f"tensor {t.name} ({t.tensor_type.name}): {e}") from None
        if self.architecture == "llama" and ".q_proj." in name:
            w = _unpermute(w, self.hf_config["num_attention_heads"])
        elif self.architecture == "llama" and ".k_proj." in name:
            w = _unpermute(w, self.hf_config["num_key_value_heads"])
        return w

    def hf_tokenizer(self):
        """The HF tokenizer (with its chat template) rebuilt from the GGUF metadata, or None if
        the file carries no tokenizer."""
        from transformers import AutoTokenizer

        if self._field("tokenizer.ggml.model") is None:
            return None

        directory, filename = os.path.split(os.path.abspath(self.path))
        try:
            tok = AutoTokenizer.from_pretrained(directory, gguf_file=filename)
        except Exception as e:
            raise CheckpointError(self.path, f"cannot rebuild the tokenizer from GGUF metadata ({e})") from None
        template = self._field("tokenizer.chat_template")
        if template and not getattr(tok, "chat_template", None):
            tok.chat_template = template
        return tok
