"""XLA compilation: the persistent cache under ``$JAXINFER_HOME`` and a process-wide counter.

The counter counts lowerings of jitted functions, which happen for every new shape whether or not
the persistent cache then supplies the executable: "serving compiles nothing new" means the count
stays put after warm-up.
"""

from __future__ import annotations

import os
import threading

import jax

from jaxinfer.home import jaxinfer_home

_LOWERING_EVENT = "/jax/core/compile/jaxpr_to_mlir_module_duration"
_lock = threading.Lock()
_count = 0
_listening = False


def _on_event(name: str, duration: float, **_) -> None:
    global _count
    if name == _LOWERING_EVENT:
        with _lock:
            _count += 1


def compilation_count() -> int:
    """Jitted-function lowerings in this process since the counter was installed."""
    install_counter()
    return _count


def install_counter() -> None:
    global _listening
    with _lock:
        if not _listening:
            jax.monitoring.register_event_duration_secs_listener(_on_event)
            _listening = True


def enable_persistent_cache() -> str:
    """Cache compiled executables on disk, so a second start with the same model and options
    loads them instead of compiling."""
    path = os.path.join(jaxinfer_home(), "xla_cache")
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    return path
