"""The one place that looks at a model path and decides what it holds.

``load_model(path)`` takes an HF directory (converted in memory), a ``.gguf`` file (dequantized in
memory) or a jaxinfer-converted directory (read with orbax), and returns config, params on device
and tokenizer. ``open_source`` does the same guessing for ``jaxinfer convert``.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from converters import autoawq, checkpoint
from converters.autoawq import awq_config
from converters.errors import CheckpointError
from converters.gguf import BLOCK, DIRECT_TYPES, GGUFCheckpoint
from converters.hf_checkpoint import HFCheckpoint
from converters.hf_config import model_config_from_hf
from converters.weight_layout import set_path, weight_plan
from jaxinfer.config import ModelConfig, WeightQuant, default_dtype
from jaxinfer.host_memory import release_freed_memory
from jaxinfer.tokenizer import Tokenizer

Source = HFCheckpoint | GGUFCheckpoint


@dataclass
class LoadedModel:
    config: ModelConfig
    params: Any  # the LlamaModel parameter tree, jax arrays in `dtype`
    tokenizer: Tokenizer | None
    dtype: np.dtype
    path: str


def open_source(path: str) -> Source:
    """An HF directory or a GGUF file, checked; anything else is a CheckpointError."""
    if path.endswith(".gguf") or (os.path.isfile(path) and _has_gguf_magic(path)):
        return GGUFCheckpoint(path)
    if os.path.isdir(path):
        if checkpoint.is_converted_dir(path):
            raise CheckpointError(path, "already a converted jaxinfer checkpoint")
        return HFCheckpoint(path)
    if not os.path.exists(path):
        raise CheckpointError(path, "no such file or directory")
    raise CheckpointError(path, "not a model: expected an HF directory, a .gguf file or a converted directory")


def _has_gguf_magic(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def _is_decoder_linear(path: tuple[str, ...]) -> bool:
    return path[0].startswith("layers_") and path[-1] == "kernel"


def direct_quantization(source: Source, config: ModelConfig) -> WeightQuant | None:
    """The packed format the source's decoder linears map onto exactly, if any: AutoAWQ 4-bit,
    or GGUF Q4_0/Q4_1 (4-bit codes) and Q8_0 (8-bit: also holds 4-bit blocks exactly)."""
    if isinstance(source, HFCheckpoint):
        awq = awq_config(source.hf_config)
        return WeightQuant(awq[0], awq[1], "autoawq") if awq else None
    sources = [rule.sources[0] for path, rule in weight_plan(config).items() if _is_decoder_linear(path)]
    kinds = {source.tensor_type(n) for n in sources if n in set(source.names())}
    if not kinds or not kinds <= set(DIRECT_TYPES):
        return None
    return WeightQuant(max(DIRECT_TYPES[k] for k in kinds), BLOCK, "gguf")


def build_params(source: Source, config: ModelConfig, dtype, progress: bool = True) -> dict:
    """The parameter tree as numpy arrays, built tensor by tensor: floats in ``dtype``; with
    ``config.weight_quant`` set, decoder linears taken in the packed format straight from the
    source's integer codes."""
    dtype = np.dtype(dtype)
    available = set(source.names())
    params: dict = {}
    plan = weight_plan(config)
    wq = config.weight_quant
    if wq is not None and wq.method == "autoawq" and config.architecture == "internlm2":
        raise CheckpointError(source.path, "AutoAWQ InternLM2 checkpoints (packed wqkv) are not supported")
    for path, rule in tqdm(plan.items(), desc="converting weights", unit="tensor", disable=not progress):
        if wq is not None and _is_decoder_linear(path):
            prefix = rule.sources[0][: -len(".weight")]
            if wq.method == "autoawq":
                packed = autoawq.linear(source, prefix)
            else:
                packed = source.get_quantized(rule.sources[0], wq.bits)
            for name, value in packed.items():
                set_path(params, path[:-1] + (name,), value if name == "qweight" else value.astype(dtype))
            continue
        missing = [n for n in rule.sources if n not in available]
        if missing:
            raise CheckpointError(source.path, f"missing tensor {missing[0]!r} (needed for {'/'.join(path)})")
        value = rule.build(*(source.get(n) for n in rule.sources))
        set_path(params, path, np.asarray(value, dtype=dtype))
    return params


def keep_quantized_by_default() -> bool:
    """Whether GGUF integer weights stay packed: only where a kernel reads them in place (GPU).
    On CPU the jnp path dequantizes every weight on every step: SmolLM2 Q4_1 decoded 4x slower
    at batch 1 and 2.4x at batch 16 than with float weights (benchmarks/quant_speed.py, figures in
    benchmarks/RESULTS.md), so float is the default there."""
    return default_dtype() == jnp.bfloat16


def source_config(source: Source, model_format: str | None, keep_quantized: bool | None) -> ModelConfig:
    """The model config of a source, with the packed weight format it will be loaded in."""
    config = model_config_from_hf(source.hf_config)
    if model_format is not None and model_format not in MODEL_FORMATS:
        raise ValueError(f"model_format must be one of {', '.join(MODEL_FORMATS)}, got {model_format!r}")
    direct = direct_quantization(source, config)
    is_gguf = isinstance(source, GGUFCheckpoint)
    is_awq = direct is not None and direct.method == "autoawq"
    if model_format == "gguf" and not is_gguf:
        raise CheckpointError(source.path, "--model-format gguf, but this is not a GGUF file")
    if is_awq and model_format != "awq":
        raise CheckpointError(source.path, "an AutoAWQ checkpoint (quant_method awq): load it with --model-format awq")
    if model_format == "awq" and not is_awq:
        raise CheckpointError(source.path, "--model-format awq, but config.json has no AutoAWQ quantization_config")
    if is_gguf:
        keep = keep_quantized_by_default() if keep_quantized is None else keep_quantized
        if keep and direct is None:
            raise CheckpointError(source.path, "its linear layers are not all Q4_0/Q4_1/Q8_0: they cannot stay quantized")
        direct = direct if keep else None
    return dataclasses.replace(config, weight_quant=direct)


def _is_float(a) -> bool:
    """Float parameters take the runtime dtype; integer codes of quantized layers keep theirs."""
    return np.dtype(a.dtype).kind == "f" or np.dtype(a.dtype).name == "bfloat16"


def _to_device(host: dict, dtype) -> dict:
    """``host`` (nested dicts of numpy arrays) as device arrays, floats in ``dtype``. Each host
    array leaves ``host`` as it is copied, so loading holds one copy of the weights and one array
    more, not two copies."""
    out = {}
    for key in list(host):
        value = host.pop(key)
        out[key] = (_to_device(value, dtype) if isinstance(value, dict)
                    else jnp.asarray(value, dtype=dtype if _is_float(value) else None))
        del value
    return out


def source_dtype(source: Source) -> np.dtype:
    return source.source_dtype() if isinstance(source, HFCheckpoint) else np.dtype(np.float32)


MODEL_FORMATS = ("hf", "awq", "gguf")


def load_model(path: str, dtype=None, progress: bool = True, model_format: str | None = None,
               keep_quantized: bool | None = None) -> LoadedModel:
    """Load any supported model path for the engine; ``dtype`` defaults to the backend's default.

    ``model_format`` ("hf", "awq", "gguf"), when given, must match what the path holds (LMDeploy's
    ``--model-format``; AutoAWQ checkpoints are loaded only when it says "awq"). A GGUF whose
    decoder linears are Q4_0/Q4_1/Q8_0 can stay in those integer codes (``keep_quantized``); the
    default is ``keep_quantized_by_default()``. AutoAWQ weights always stay quantized.
    """
    dtype = np.dtype(dtype or default_dtype())
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.isdir(path) and checkpoint.is_converted_dir(path):
        config, _ = checkpoint.read_config(path)
        host_params = checkpoint.read_params(path)
        tokenizer = Tokenizer.from_dir(path, config.eos_token_ids)
    else:
        source = open_source(path)
        config = source_config(source, model_format, keep_quantized)
        host_params = build_params(source, config, dtype, progress)
        tokenizer_backend = source.tokenizer_backend()
        tokenizer = Tokenizer(tokenizer_backend, config.eos_token_ids) if tokenizer_backend is not None else None
    params = _to_device(host_params, dtype)
    release_freed_memory()  # the host arrays' pages, and what the readers used
    return LoadedModel(config=config, params=params, tokenizer=tokenizer, dtype=dtype, path=path)

