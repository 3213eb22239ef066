"""jaxinfer's CPU kernels in C++ (``*.cc`` beside this file): built, loaded and registered with XLA.

On CPU the engine runs XLA's code except where a small kernel of ours is measurably faster:

* ``amx_matmul.cc``: bfloat16-weight matmuls on Intel AMX (``pallas_kernels.amx_matmul``);
* ``f32_matmul.cc``: float32 matmuls over packed weights with AVX-512 (``pallas_kernels.f32_matmul``);
* ``paged_attention_cpu.cc``: decode and prefill attention reading float32 or bfloat16 KV pages
  in place, with AVX-512 (``pallas_kernels.paged_attention``'s dispatch point);
* ``kv_write_cpu.cc``: new tokens' K/V written into bfloat16 pages in place
  (``pallas_kernels.kv_write_cpu``), where XLA's scatter would widen the whole pool.

XLA calls them through its FFI (``jax.ffi``), on its own intra-op thread pool. They are compiled
together into one shared library on first use, with the system's C++ compiler against JAX's FFI
headers, and kept in a directory the caller names (the engine uses ``$JAXINFER_HOME/native``).
Without AVX-512, a compiler or (for the matmul) AMX and the OS's permission to use it, ``enable``
logs why and the engine keeps XLA's code.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import jax

logger = logging.getLogger("jaxinfer")

HERE = Path(__file__).parent
SOURCES = (HERE / "amx_matmul.cc", HERE / "f32_matmul.cc", HERE / "paged_attention_cpu.cc", HERE / "kv_write_cpu.cc")
HEADERS = (HERE / "cpu_parallel.h",)
AMX_MATMUL = "jaxinfer_amx_matmul"
F32_MATMUL = "jaxinfer_f32_matmul"
PAGED_ATTENTION = "jaxinfer_paged_attention"
KV_WRITE = "jaxinfer_kv_write"
TARGETS = (AMX_MATMUL, F32_MATMUL, PAGED_ATTENTION, KV_WRITE)
# GCC 12's own AVX-512 intrinsic headers trip -W(maybe-)uninitialized: their shuffles start from
# a deliberately undefined vector (a known false positive).
FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mamx-tile", "-mamx-bf16",
         "-Wall", "-Wextra", "-Wno-maybe-uninitialized", "-Wno-uninitialized")


@dataclasses.dataclass(frozen=True)
class CpuKernels:
    """Which kernels XLA can call in this process."""

    paged_attention: bool = False  # AVX-512
    amx_matmul: bool = False  # AMX, granted by the OS
    kv_write: bool = False  # built with the others
    f32_matmul: bool = False  # AVX-512


_kernels = CpuKernels()
_off: frozenset[str] = frozenset()


def kernels() -> CpuKernels:
    """The kernels ``enable`` turned on (none before it ran), less those ``turned_off``."""
    return dataclasses.replace(_kernels, **{name: False for name in _off})


@contextlib.contextmanager
def turned_off(*names: str) -> Iterator[None]:
    """Inside the block the named kernels (``CpuKernels`` fields) are off: engines built and steps
    traced there run XLA's code instead, for side-by-side comparisons."""
    global _off
    unknown = set(names) - {f.name for f in dataclasses.fields(CpuKernels)}
    if unknown:
        raise ValueError(f"unknown CPU kernels {sorted(unknown)}")
    previous, _off = _off, _off | set(names)
    try:
        yield
    finally:
        _off = previous


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux's /proc/cpuinfo; empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return set(next((line for line in text.splitlines() if line.startswith("flags")), "").split())


def enable(build_dir: str) -> CpuKernels:
    """Build (or find built) the kernels under ``build_dir``, register those this CPU runs with
    XLA, and turn them on; what is on, with the reason for what is not logged once."""
    global _kernels
    _kernels = _load(build_dir)
    return kernels()


@functools.cache
def _load(build_dir: str) -> CpuKernels:
    flags = cpu_flags()
    if jax.default_backend() != "cpu" or not {"avx512f", "avx512bw", "avx512vl"} <= flags:
        return CpuKernels()
    try:
        library = ctypes.CDLL(build(build_dir))
    except (OSError, RuntimeError) as e:
        logger.warning("jaxinfer's CPU kernels are unavailable, XLA's code runs instead: %s", e)
        return CpuKernels()
    for target in (F32_MATMUL, PAGED_ATTENTION, KV_WRITE):
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, target)), platform="cpu")
    amx = False
    if {"amx_tile", "amx_bf16"} <= flags:
        library.jaxinfer_amx_request.restype = ctypes.c_bool
        amx = library.jaxinfer_amx_request()
        if amx:
            jax.ffi.register_ffi_target(AMX_MATMUL, jax.ffi.pycapsule(getattr(library, AMX_MATMUL)), platform="cpu")
        else:
            logger.warning("the AMX matmul kernel is unavailable: the OS refused AMX state to this process")
    return CpuKernels(paged_attention=True, amx_matmul=amx, kv_write=True, f32_matmul=True)


def build(build_dir: str) -> str:
    """Path of the shared library for these sources and this JAX, compiled if missing (atomically:
    a concurrent or interrupted build never leaves a partial file under the final name); a new
    build removes the libraries of earlier sources."""
    include = jax.ffi.include_dir()
    h = hashlib.sha256(" ".join(FLAGS).encode() + include.encode() + jax.__version__.encode())
    for path in (*SOURCES, *HEADERS):
        h.update(path.read_bytes())
    path = os.path.join(build_dir, f"jaxinfer_cpu-{h.hexdigest()[:16]}.so")
    if os.path.exists(path):
        return path
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise RuntimeError("no C++ compiler found (set CXX, or install g++)")
    os.makedirs(build_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=build_dir)
    os.close(fd)
    cmd = [compiler, *FLAGS, "-isystem", include, f"-I{HERE}", *map(str, SOURCES), "-o", tmp]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
        os.replace(tmp, path)
        for old in Path(build_dir).glob("jaxinfer_cpu-*.so"):  # earlier sources' builds
            if str(old) != path:
                old.unlink(missing_ok=True)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
