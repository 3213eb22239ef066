"""jaxinfer: LLM inference and serving on JAX/XLA.

``from jaxinfer import LLM, SamplingParams``. ``LLM`` is imported lazily: it sits above the
converters in the import graph, while the engine modules of this package sit below them.
"""

import logging

from jaxinfer.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams"]
__version__ = "0.1.0"

_log = logging.getLogger("jaxinfer")
if not _log.handlers:
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("%(levelname)s jaxinfer: %(message)s"))
    _log.addHandler(_handler)
    _log.setLevel(logging.INFO)
    _log.propagate = False


def __getattr__(name):
    if name == "LLM":
        from jaxinfer.llm import LLM

        return LLM
    raise AttributeError(f"module 'jaxinfer' has no attribute {name!r}")
