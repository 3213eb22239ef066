"""Shared fixtures: tiny HF models built at run time, the embedded SmolLM2, a test-only home dir."""

from __future__ import annotations

import os
import pathlib

# Before jax is imported anywhere: keep the suite's caches out of the user's home, but stable
# across runs, so reruns reuse the converted SmolLM2 and the XLA compilation cache.
REPO = pathlib.Path(__file__).resolve().parents[1]
os.environ.setdefault("JAXINFER_HOME", str(REPO / ".test-home"))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smollm2_gguf() -> str:
    from converters.convert import embedded_model_gguf

    return embedded_model_gguf()  # raises with the install command if the package is missing


@pytest.fixture(scope="session")
def smollm2_dir() -> str:
    """The embedded SmolLM2, converted once into $JAXINFER_HOME."""
    from converters.convert import embedded_model_path

    return embedded_model_path(progress=False)


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir(smollm2_dir) -> str:
    """A directory holding only SmolLM2's tokenizer files (with its chat template)."""
    return smollm2_dir


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory, smollm2_tokenizer_dir) -> str:
    """A one-layer random Llama that speaks through SmolLM2's tokenizer and chat template."""
    from tiny_models import build_tiny

    path = tmp_path_factory.mktemp("tiny_chat") / "model"
    build_tiny("llama", str(path), tokenizer_dir=smollm2_tokenizer_dir, num_hidden_layers=1, max_position_embeddings=4096)
    return str(path)
