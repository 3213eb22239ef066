"""Shared fixtures: tiny HF models built at run time, the embedded SmolLM2, a test-only home dir."""

from __future__ import annotations

import os
import pathlib

# Before jax is imported anywhere: keep the suite's caches out of the user's home, but stable
# across runs, so reruns reuse the converted SmolLM2 and the XLA compilation cache.
REPO = pathlib.Path(__file__).resolve().parents[1]
os.environ.setdefault("JAXINFER_HOME", str(REPO / ".test-home"))

import weakref  # noqa: E402

import pytest  # noqa: E402

from jaxinfer.engine import LLMEngine  # noqa: E402

_ENGINES: "weakref.WeakSet[LLMEngine]" = weakref.WeakSet()
_engine_init = LLMEngine.__init__


def _tracked_init(self, *args, **kwargs):
    _engine_init(self, *args, **kwargs)
    _ENGINES.add(self)


LLMEngine.__init__ = _tracked_init


@pytest.fixture(autouse=True)
def no_leaked_pages():
    """After every test, every engine still alive is idle and each of its pages is free or held
    only by the prefix cache."""
    yield
    problems = []
    for engine in list(_ENGINES):
        try:
            assert not engine.has_unfinished_requests(), "an engine still has requests after the test"
            engine.block_manager.check_no_leaks()
        except AssertionError as e:
            _ENGINES.discard(engine)  # report it once, not again after every later test
            problems.append(str(e))
    assert not problems, problems


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
