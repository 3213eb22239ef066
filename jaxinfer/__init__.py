"""jaxinfer: LLM inference and serving on JAX/XLA.

``from jaxinfer import LLM, AsyncLLM, SamplingParams, build_engine``. These are imported lazily:
``LLM`` and ``build_engine`` sit above the converters in the import graph, while the engine
modules of this package (``AsyncLLM`` among them) sit below them.
"""

import logging

from jaxinfer.sampling_params import SamplingParams

__all__ = ["LLM", "AsyncLLM", "SamplingParams", "build_engine"]
__version__ = "0.1.0"

_log = logging.getLogger("jaxinfer")
if not _log.handlers:
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("%(levelname)s jaxinfer: %(message)s"))
    _log.addHandler(_handler)
    _log.setLevel(logging.INFO)
    _log.propagate = False


def __getattr__(name):
    if name in ("LLM", "build_engine"):
        from jaxinfer import llm

        return getattr(llm, name)
    if name == "AsyncLLM":
        from jaxinfer.async_engine import AsyncLLM

        return AsyncLLM
    raise AttributeError(f"module 'jaxinfer' has no attribute {name!r}")
