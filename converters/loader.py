"""The one place that looks at a model path and decides what it holds.

``load_model(path)`` takes an HF directory (converted in memory), a ``.gguf`` file (dequantized in
memory) or a jaxinfer-converted directory (read with orbax), and returns config, params on device
and tokenizer. ``open_source`` does the same guessing for ``jaxinfer convert``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from converters import checkpoint
from converters.errors import CheckpointError
from converters.gguf import GGUFCheckpoint
from converters.hf_checkpoint import HFCheckpoint
from converters.hf_config import model_config_from_hf
from converters.weight_layout import set_path, weight_plan
from jaxinfer.config import ModelConfig, default_dtype
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


def build_params(source: Source, config: ModelConfig, dtype, progress: bool = True) -> dict:
    """The parameter tree as numpy arrays of ``dtype``, built tensor by tensor."""
    dtype = np.dtype(dtype)
    available = set(source.names())
    params: dict = {}
    plan = weight_plan(config)
    for path, rule in tqdm(plan.items(), desc="converting weights", unit="tensor", disable=not progress):
        missing = [n for n in rule.sources if n not in available]
        if missing:
            raise CheckpointError(source.path, f"missing tensor {missing[0]!r} (needed for {'/'.join(path)})")
        value = rule.build(*(source.get(n) for n in rule.sources))
        set_path(params, path, np.asarray(value, dtype=dtype))
    return params


def source_dtype(source: Source) -> np.dtype:
    return source.source_dtype() if isinstance(source, HFCheckpoint) else np.dtype(np.float32)


def load_model(path: str, dtype=None, progress: bool = True) -> LoadedModel:
    """Load any supported model path for the engine; ``dtype`` defaults to the backend's default."""
    dtype = np.dtype(dtype or default_dtype())
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.isdir(path) and checkpoint.is_converted_dir(path):
        config, _ = checkpoint.read_config(path)
        host_params = checkpoint.read_params(path)
        tokenizer = Tokenizer.from_dir(path, config.eos_token_ids)
    else:
        source = open_source(path)
        config = model_config_from_hf(source.hf_config)
        host_params = build_params(source, config, dtype, progress)
        hf_tokenizer = source.hf_tokenizer()
        tokenizer = Tokenizer(hf_tokenizer, config.eos_token_ids) if hf_tokenizer is not None else None
    params = jax.tree.map(lambda a: jnp.asarray(a, dtype=dtype), host_params)
    return LoadedModel(config=config, params=params, tokenizer=tokenizer, dtype=dtype, path=path)

