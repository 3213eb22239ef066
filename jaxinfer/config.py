"""Model configuration: the one description of a Llama-family network that the model code reads.

Converters build it from a HuggingFace ``config.json`` or GGUF metadata; converted checkpoints store
it as ``jaxinfer_config.json`` (see ``to_dict`` / ``from_dict``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

ROPE_TYPES = ("default", "linear", "llama3")


def default_dtype():
    """The default weight dtype: bfloat16 on GPU; float32 elsewhere, for exact parity with float32
    peers (``activation_dtype`` says what bfloat16 weights mean on CPU)."""
    return jnp.bfloat16 if jax.default_backend() == "gpu" else jnp.float32


def activation_dtype(weight_dtype):
    """The dtype of activations for weights stored in ``weight_dtype``: the same on GPU; float32
    on CPU, where XLA's elementwise bfloat16 runs several times slower than float32 but its
    bfloat16 dots run faster: bfloat16 weights there meet float32 activations only inside
    matmuls, as llama.cpp's BF16 tensors do."""
    return jnp.float32 if jax.default_backend() == "cpu" else jnp.dtype(weight_dtype)


KV_CACHE_DTYPES = ("auto", "float32", "bfloat16")


def kv_cache_dtype(weight_dtype, choice: str = "auto"):
    """The dtype of unquantized K/V pages: ``choice``, or for ``"auto"`` the weights' (as vLLM's
    and LMDeploy's default). bfloat16 pages under the CPU's float32 activations halve the bytes
    per token: attention widens each value as it reads it (docs/ARCHITECTURE.md)."""
    if choice not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {choice!r}")
    return jnp.dtype(weight_dtype if choice == "auto" else choice)


@dataclass(frozen=True)
class RopeScaling:
    """Rotary-embedding frequency scaling, as HF's ``rope_scaling`` / ``rope_parameters``."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(
                f"unsupported rope scaling type {self.rope_type!r}; supported: {', '.join(ROPE_TYPES)}"
            )


@dataclass(frozen=True)
class WeightQuant:
    """Decoder linear layers stored as integer codes (``pallas_kernels.int4_matmul`` format).

    ``method`` records where the codes came from: ``rtn``, ``awq``, ``gguf`` or ``autoawq``.
    """

    bits: int
    group_size: int
    method: str

    def __post_init__(self):
        if self.bits not in (4, 8):
            raise ValueError(f"weight bits must be 4 or 8, got {self.bits}")
        if self.group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {self.group_size}")


@dataclass(frozen=True)
class ModelConfig:
    """Shapes and options of one Llama-family model.

    ``architecture`` records where the weights came from (``llama``, ``mistral``, ``qwen2``,
    ``qwen3``, ``internlm2``); the network itself is fully described by the other fields.
    ``weight_quant`` set means every decoder linear layer is stored quantized (embeddings, norms
    and the LM head stay in the activation dtype).
    """

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = RopeScaling()
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    weight_quant: WeightQuant | None = None

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")

    @property
    def queries_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    def num_params(self) -> int:
        e, f, d = self.hidden_size, self.intermediate_size, self.head_dim
        attn = e * d * (self.num_heads * 2 + self.num_kv_heads * 2)
        layer = attn + 3 * e * f + 2 * e
        head = 0 if self.tie_word_embeddings else self.vocab_size * e
        return self.vocab_size * e + self.num_layers * layer + e + head

    def rope_inv_freq(self) -> np.ndarray:
        """Rotary inverse frequencies ``[head_dim // 2]`` (float64), scaling applied."""
        d = self.head_dim
        inv_freq = 1.0 / (self.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
        s = self.rope_scaling
        if s.rope_type == "linear":
            return inv_freq / s.factor
        if s.rope_type == "llama3":
            # Llama 3.1: keep high frequencies, divide low ones by `factor`, blend in between.
            low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
            high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
            wavelen = 2 * math.pi / inv_freq
            scaled = np.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
            smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
                s.high_freq_factor - s.low_freq_factor
            )
            blended = (1 - smooth) * scaled / s.factor + smooth * scaled
            medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
            return np.where(medium, blended, scaled)
        return inv_freq

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        d = dict(d)
        d["rope_scaling"] = RopeScaling(**d.get("rope_scaling") or {})
        d["weight_quant"] = WeightQuant(**d["weight_quant"]) if d.get("weight_quant") else None
        d["eos_token_ids"] = tuple(d.get("eos_token_ids") or ())
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model config fields: {sorted(unknown)}")
        return cls(**d)
