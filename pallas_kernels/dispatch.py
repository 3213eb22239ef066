"""Which implementation the dispatch points run: a Pallas kernel or its jnp reference.

``"auto"`` (the default) runs the kernels when JAX's default backend is a GPU and the references
everywhere else. Tests override it: ``"interpret"`` runs the kernels on CPU with Pallas'
interpreter, ``"kernel"`` forces them (what lowering for CUDA from a CPU machine needs),
``"reference"`` forces the jnp path.

The choice is read when a function is traced: a function jitted and traced before a change keeps
the implementation it was traced with (build engines and jit test functions inside the block).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import jax

IMPLEMENTATIONS = ("auto", "reference", "kernel", "interpret")
_implementation = "auto"


def implementation() -> str:
    """The implementation in force: ``"reference"``, ``"kernel"`` or ``"interpret"`` (never auto)."""
    if _implementation != "auto":
        return _implementation
    return "kernel" if jax.default_backend() == "gpu" else "reference"


@contextlib.contextmanager
def use_implementation(name: str) -> Iterator[None]:
    """Run the dispatch points with ``name`` (one of ``IMPLEMENTATIONS``) inside the block."""
    global _implementation
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"unknown implementation {name!r}; choose from {IMPLEMENTATIONS}")
    previous, _implementation = _implementation, name
    try:
        yield
    finally:
        _implementation = previous


def cpu_kernels() -> bool:
    """Whether CPU kernels (``pallas_kernels.bf16_matmul``, ``f32_matmul``, ...) may run: the choice is automatic and
    the backend is a CPU. Forcing any implementation turns them off."""
    return _implementation == "auto" and jax.default_backend() == "cpu"
