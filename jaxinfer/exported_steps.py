"""Traced and lowered step programs kept on disk, so that a warm start does not trace the model.

XLA's persistent cache (``compilation.enable_persistent_cache``) saves the compile, but every
start still traced each shape bucket's step in Python (~1.3 s for SmolLM2) only to find its cache
entry. Warm-up instead saves each bucket's step as a serialized ``jax.export.Exported`` (StableHLO
plus its input and output trees) under ``$JAXINFER_HOME/exported_steps``; a later start
deserializes it and compiles it, which the persistent cache answers. The key covers everything
the program depends on: the source of ``jaxinfer`` and ``pallas_kernels``, the program's
description (model config...), the shapes, dtypes and shardings of every argument, the kernel
implementation and the CPU kernels in force, JAX, the backend and ``XLA_FLAGS``; any change gives
a new file.

A function swapped in at run time (a test's or benchmark's patch of ``jaxinfer.model``) is not
part of the key: code that patches must not warm up through this directory. Only the jnp
reference implementation is exported: Pallas kernels lower to custom calls that ``jax.export``
does not vouch for, so with kernels in force the runner traces as before. The CPU kernels
(``pallas_kernels.cpu_native``) are the exception: their FFI targets are jaxinfer's own,
registered before any step is loaded.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import pickle
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
from jax import export

import pallas_kernels
from jaxinfer.home import jaxinfer_home
from pallas_kernels import cpu_native, dispatch

logger = logging.getLogger("jaxinfer")
# Bound on the directory (SmolLM2's 21 buckets at the default options take ~5 MB): old entries go first.
MAX_BYTES = 512 * 1024**2


def exported_steps_dir() -> str:
    return os.path.join(jaxinfer_home(), "exported_steps")


def can_export() -> bool:
    """Whether the step runs the jnp references (see the module docstring)."""
    return dispatch.implementation() == "reference"


@functools.lru_cache(maxsize=1)
def source_digest() -> str:
    """sha256 of every Python and C++ file of the packages whose code the step runs."""
    h = hashlib.sha256()
    for root in (Path(__file__).parent, Path(pallas_kernels.__file__).parent):
        for path in sorted([*root.rglob("*.py"), *root.rglob("*.cc"), *root.rglob("*.h")]):
            h.update(str(path.relative_to(root)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def step_key(args: Any, program: str) -> str:
    """The file name of ``program`` traced for ``args``."""
    leaves, treedef = jax.tree.flatten(args)
    device = jax.devices()[0]
    parts = [
        program, str(treedef), *(f"{x.shape}{x.dtype}{getattr(x, 'sharding', '')}" for x in leaves),
        # The CPU kernels in force: a kernel turned off (cpu_native.turned_off) is another program.
        source_digest(), dispatch.implementation(), str(cpu_native.kernels()), jax.__version__, device.platform,
        device.device_kind,
        device.client.platform_version, str(jax.device_count()), os.environ.get("XLA_FLAGS", ""),
        str(jax.config.jax_enable_x64), str(jax.config.jax_default_matmul_precision),
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def lower_saved(fn: Callable, args: tuple, program: str, donate_argnums: tuple[int, ...],
                directory: str) -> jax.stages.Lowered:
    """``fn`` lowered for ``args``' shapes, donating ``donate_argnums``, from the file an earlier
    process saved in ``directory``, else traced now and saved there. Its compiled form takes and
    returns the same trees as ``fn``."""
    leaves, in_tree = jax.tree.flatten(args)
    path = os.path.join(directory, step_key(args, program) + ".bin")
    exported = out_tree = None
    if os.path.exists(path):
        try:
            with open(path, "rb") as f:
                blob, out_tree = pickle.load(f)
            exported = export.deserialize(blob)
            os.utime(path)  # recently used: kept by _prune
        except Exception as e:  # a file from an incompatible version: trace again
            logger.warning("could not load the saved step %s (%s); tracing it again", path, e)
            exported = None
    if exported is None:
        trees = {}

        def flat(*flat_args):
            out_leaves, trees["out"] = jax.tree.flatten(fn(*jax.tree.unflatten(in_tree, flat_args)))
            return out_leaves

        # The CPU kernels' FFI targets are registered before warm-up (ModelRunner) in every process.
        ours = [export.DisabledSafetyCheck.custom_call(t) for t in cpu_native.TARGETS]
        exported = export.export(jax.jit(flat), disabled_checks=ours)(*leaves)
        out_tree = trees["out"]
        try:
            _save(pickle.dumps((exported.serialize(), out_tree)), directory, path)
        except Exception as e:  # the process runs without it; the next start traces again
            logger.warning("could not save the step to %s (%s)", path, e)

    def call(*call_args):
        return jax.tree.unflatten(out_tree, exported.call(*jax.tree.leaves(call_args)))

    return jax.jit(call, donate_argnums=donate_argnums).lower(*args)


def _save(data: bytes, directory: str, path: str) -> None:
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)  # readers never see a half-written file
    except BaseException:
        os.unlink(tmp)
        raise
    _prune(directory, MAX_BYTES)


def _prune(directory: str, max_bytes: int) -> None:
    """Delete the least recently used files until the rest fit in ``max_bytes`` (each code or
    option change leaves the old ones behind)."""
    files = sorted((e.stat().st_mtime, e.stat().st_size, e.path) for e in os.scandir(directory)
                   if e.name.endswith(".bin"))
    total = sum(size for _, size, _ in files)
    for _, size, path in files:
        if total <= max_bytes:
            break
        os.unlink(path)
        total -= size
