"""The converted-checkpoint directory: model config, tokenizer files and params saved with orbax.

Layout::

    OUT/jaxinfer_config.json   {"format_version", "dtype", "source", "model": ModelConfig}
    OUT/params/                orbax StandardCheckpointer tree (the LlamaModel parameter tree)
    OUT/tokenizer.json ...     tokenizer files, as written by transformers' save_pretrained

Writing goes to a hidden sibling directory renamed into place at the very end, so an interrupted
conversion never leaves a directory that looks like a checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import Any, Iterator

import numpy as np

from converters.errors import CheckpointError
from jaxinfer.config import ModelConfig

CONFIG_FILE = "jaxinfer_config.json"
PARAMS_DIR = "params"
FORMAT_VERSION = 1


def is_converted_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, CONFIG_FILE))


@contextlib.contextmanager
def atomic_output_dir(out: str, overwrite: bool = False) -> Iterator[str]:
    """Yield a temporary directory that becomes ``out`` only if the block completes."""
    out = os.path.abspath(out)
    if os.path.exists(out) and not overwrite:
        raise FileExistsError(f"{out} already exists (pass --force to replace it)")
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.partial-", dir=parent)
    try:
        yield tmp
        if os.path.exists(out):
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_checkpoint(directory: str, config: ModelConfig, params: Any, dtype: np.dtype, source: str) -> None:
    """Write config and params into ``directory`` (normally the one ``atomic_output_dir`` yields)."""
    import orbax.checkpoint as ocp

    meta = {
        "format_version": FORMAT_VERSION,
        "dtype": np.dtype(dtype).name,
        "source": source,
        "model": config.to_dict(),
    }
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        json.dump(meta, f, indent=2)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(directory, PARAMS_DIR), params)
    checkpointer.wait_until_finished()


def read_config(directory: str) -> tuple[ModelConfig, dict]:
    path = os.path.join(directory, CONFIG_FILE)
    try:
        with open(path) as f:
            meta = json.load(f)
        if meta.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(path, f"unknown format_version {meta.get('format_version')!r}")
        return ModelConfig.from_dict(meta["model"]), meta
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, UnicodeDecodeError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(path, f"not a valid jaxinfer config ({e})") from None


def read_params(directory: str) -> Any:
    """The parameter tree as numpy arrays, in the dtype it was saved in."""
    import orbax.checkpoint as ocp

    path = os.path.join(directory, PARAMS_DIR)
    if not os.path.isdir(path):
        raise CheckpointError(path, "missing params directory")
    try:
        return ocp.StandardCheckpointer().restore(path)
    except Exception as e:  # orbax/tensorstore raise many types on damaged files
        raise CheckpointError(path, f"cannot restore params ({type(e).__name__}: {e})") from None
