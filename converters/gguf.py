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
# Block types that map exactly onto jaxinfer's packed format (pallas_kernels.int4_matmul), with
# their code width; every one has blocks of 32 values.
DIRECT_TYPES = {"Q4_0": 4, "Q4_1": 4, "Q8_0": 8}
BLOCK = 32

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

    def tensor_type(self, name: str) -> str:
        return self._tensors[name].tensor_type.name

    def get_quantized(self, name: str, bits: int) -> dict[str, np.ndarray]:
        """A ``DIRECT_TYPES`` weight (HF ``[out, in]``) as the packed ``[in, out]`` format with groups
        of 32 and ``bits``-bit codes, exactly: no dequantize-requantize."""
        from pallas_kernels.int4_matmul import pack_int4

        t = self._tensors[name]
        kind = t.tensor_type.name
        out_rows = int(t.shape[1])
        blocks = np.asarray(t.data).reshape(out_rows, -1, {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}[kind])
        d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)  # [out, n_blocks]
        if kind == "Q8_0":
            codes = blocks[..., 2:34].copy().view(np.int8).reshape(out_rows, -1)
            biases = np.zeros_like(d)
        else:
            nibbles = blocks[..., 4:20] if kind == "Q4_1" else blocks[..., 2:18]
            codes = np.concatenate([nibbles & 0xF, nibbles >> 4], axis=-1).reshape(out_rows, -1)
            biases = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32) if kind == "Q4_1" else -8 * d
        if self.architecture == "llama" and (".q_proj." in name or ".k_proj." in name):
            n_head = self.hf_config["num_attention_heads" if ".q_proj." in name else "num_key_value_heads"]
            codes, d, biases = (_unpermute(a, n_head) for a in (codes, d, biases))
        if bits == 4:
            if kind == "Q8_0":
                raise ValueError(f"{name} is Q8_0: it does not fit 4-bit codes")
            qweight = pack_int4(np.ascontiguousarray(codes.T).astype(np.uint8))
        else:
            qweight = np.ascontiguousarray(codes.T).astype(np.int8)
        return {"qweight": qweight, "scales": np.ascontiguousarray(d.T), "biases": np.ascontiguousarray(biases.T)}

    def tokenizer_backend(self):
        """The tokenizer (with its chat template) rebuilt from the GGUF metadata, or None if the
        file carries no tokenizer: byte-level BPE ones built here with ``tokenizers``; the
        sentencepiece ones of Llama-architecture files by transformers' builders from metadata
        read here; others by transformers from the file (its GGUF reader needs torch)."""
        model = self._field("tokenizer.ggml.model")
        if model is None:
            return None
        if self._builds_byte_level_bpe():
            return self._byte_level_bpe_tokenizer()
        try:
            if model == "llama" and self.architecture == "llama":  # the case tested against transformers
                tok = self._sentencepiece_tokenizer()
            else:
                from transformers import AutoTokenizer

                directory, filename = os.path.split(os.path.abspath(self.path))
                tok = AutoTokenizer.from_pretrained(directory, gguf_file=filename)
        except Exception as e:
            raise CheckpointError(self.path, f"cannot rebuild the tokenizer from GGUF metadata ({e})") from None
        template = self._field("tokenizer.chat_template")
        if template and not getattr(tok, "chat_template", None):
            tok.chat_template = template
        return tok

    def _sentencepiece_tokenizer(self):
        """What ``AutoTokenizer.from_pretrained(gguf_file=...)`` makes of a sentencepiece (``llama``)
        vocabulary, without its GGUF reader: the metadata it would read, under its names, handed to
        the same builder (``convert_gguf_tokenizer``) and tokenizer class."""
        from transformers.integrations.gguf.gguf_tokenizer_mapping import (
            GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer)
        from transformers.tokenization_utils_tokenizers import TokenizersBackend

        def present(renames: dict) -> dict:
            values = {name: self._field(f"tokenizer.{key}") for key, name in renames.items()}
            return {name: value for name, value in values.items() if value is not None}

        tokenizer_dict = present(GGUF_TOKENIZER_MAPPING["tokenizer"])
        config = present(GGUF_TOKENIZER_MAPPING["tokenizer_config"])
        config.setdefault("add_bos_token", True)  # llama.cpp adds BOS to a sentencepiece vocabulary unless told not to
        config.update(self._special_tokens(tokenizer_dict["tokens"]))
        backend, extra = convert_gguf_tokenizer(self.architecture, tokenizer_dict)
        return TokenizersBackend(tokenizer_object=backend, **config, **extra)

    def _builds_byte_level_bpe(self) -> bool:
        # The case built here and checked against transformers' conversion (tests/test_gguf.py):
        # GPT-2-style BPE, no BOS added, only normal (1) and control (3) tokens.
        types = set(self._field("tokenizer.ggml.token_type", []))
        return (self._field("tokenizer.ggml.model") == "gpt2" and not self._field("tokenizer.ggml.add_bos_token")
                and types <= {1, 3})

    def _byte_level_bpe_tokenizer(self):
        """The tokenizer transformers' GGUF conversion makes of a GPT-2-style BPE vocabulary,
        built without transformers."""
        import tokenizers
        from tokenizers import decoders, models, pre_tokenizers, processors

        from jaxinfer.fast_tokenizer import FastTokenizer

        tokens, types = self._field("tokenizer.ggml.tokens"), self._field("tokenizer.ggml.token_type")
        merges = [tuple(m.split(" ", 1)) for m in self._field("tokenizer.ggml.merges", [])]
        bpe = models.BPE({t: i for i, t in enumerate(tokens)}, merges, dropout=None, unk_token=None,
                         continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False, byte_fallback=False)
        tok = tokenizers.Tokenizer(bpe)
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
        tok.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
        tok.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B:1", special_tokens=[])
        tok.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False)
                                for t, kind in zip(tokens, types) if kind == 3])
        named = {name: token for name, token in self._special_tokens(tokens).items() if token is not None}
        config = {"backend": "tokenizers", "tokenizer_class": "TokenizersBackend", **named}
        return FastTokenizer(tok, config, self._field("tokenizer.chat_template"))

    def _special_tokens(self, tokens: list[str]) -> dict[str, str | None]:
        """``bos_token``, ``eos_token``, ``unk_token`` and ``pad_token``: the strings of the ids the
        metadata names, None where it names none."""
        ids = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "unk_token": "unknown_token_id",
               "pad_token": "padding_token_id"}
        return {name: None if (i := self._field(f"tokenizer.ggml.{key}")) is None else tokens[int(i)]
                for name, key in ids.items()}
