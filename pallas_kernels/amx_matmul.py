"""bfloat16-weight matmuls on Intel AMX (CPU), with weights packed once for the tiles.

The CPU's bfloat16 mode (``--dtype bfloat16``) multiplies float32 activations by bfloat16 weights:
``x`` rounded to bfloat16, products summed in float32. XLA:CPU runs that dot on AMX but
rearranges the whole weight into the tiles' layout on every call; at decode's few rows that costs
more than the product (a SmolLM2 chain of 30 layers: ~21-35 ms in XLA, ~9-12 ms with weights
packed in advance; ``benchmarks/weight_dtype.py``). This module packs each weight once and
multiplies with a small C++ kernel that XLA calls through its FFI.

Packed format (``pack``): ``W [K, N]`` becomes ``[ceil(N / 16), kpad / 2, 32]`` bfloat16 with
``kpad = K`` rounded up to 32, zero padded: column block ``b``, pair row ``j`` holds
``W[2j, c], W[2j + 1, c]`` for each of the block's 16 columns ``c``.

``amx_matmul`` is the dispatch point: the kernel once ``enable`` has built and registered it and
the choice of implementation is automatic (``dispatch.cpu_kernels``); otherwise ``amx_matmul_
reference``, which unpacks and calls XLA's dot (bit for bit the kernel's result at K >= 32).

The kernel is compiled on first use with the system's C++ compiler against JAX's FFI headers and
kept in a directory the caller names (the engine uses ``$JAXINFER_HOME/native``). No compiler, no
AMX on the CPU, or a kernel the OS refuses AMX to: ``enable`` says why in the log and returns
False, and everything runs the reference.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp

from pallas_kernels import dispatch

logger = logging.getLogger("jaxinfer")

TARGET = "jaxinfer_amx_matmul"
SOURCE = Path(__file__).with_suffix(".cc")
BLOCK_COLS = 16  # output columns of one B tile
TILE_K = 32  # values of K in one tile product
# XLA:CPU runs a bfloat16 dot with float32 accumulation fast from 3 rows up (1.5-2.2x float32's
# speed at 4-32 rows); on 1-2 rows it takes another path, ~4x slower than float32, whose results
# differ from the same rows' inside a larger dot (benchmarks/cpu_limits.py). Padding to 4 rows
# keeps both speed and batch invariance.
MIN_NARROW_DOT_ROWS = 4
CPU_FLAGS = ("amx_tile", "amx_bf16", "avx512f", "avx512bw")
_enabled = False


def pack(w: jax.Array) -> jax.Array:
    """``w [K, N]`` bfloat16 -> packed ``[ceil(N / 16), kpad / 2, 32]`` (module docstring)."""
    k, n = w.shape
    kpad = -(-k // TILE_K) * TILE_K
    npad = -(-n // BLOCK_COLS) * BLOCK_COLS
    w = jnp.pad(w, ((0, kpad - k), (0, npad - n)))
    return w.reshape(kpad // 2, 2, npad // BLOCK_COLS, BLOCK_COLS).transpose(2, 0, 3, 1).reshape(
        npad // BLOCK_COLS, kpad // 2, 2 * BLOCK_COLS)


def unpack(packed: jax.Array, k: int, n: int) -> jax.Array:
    """Inverse of ``pack``: ``[K, N]``."""
    blocks, pairs, _ = packed.shape
    w = packed.reshape(blocks, pairs, BLOCK_COLS, 2).transpose(1, 3, 0, 2).reshape(2 * pairs, blocks * BLOCK_COLS)
    return w[:k, :n]


def narrow_weight_dot(x: jax.Array, w: jax.Array, w_in_axis: int) -> jax.Array:
    """``x [M, K]`` contracted with ``w``'s axis ``w_in_axis``, ``w`` in a narrower float than ``x``
    -> ``[M, N]`` in x's dtype, as llama.cpp multiplies its BF16 tensors: ``x`` rounded to ``w``'s
    dtype, products summed in x's dtype, by XLA's dot."""
    m = x.shape[0]
    xn = x.astype(w.dtype)
    if m < MIN_NARROW_DOT_ROWS:
        xn = jnp.pad(xn, ((0, MIN_NARROW_DOT_ROWS - m), (0, 0)))
    return jax.lax.dot_general(xn, w, (((1,), (w_in_axis,)), ((), ())), preferred_element_type=x.dtype)[:m]


def amx_matmul_reference(x: jax.Array, packed: jax.Array, n: int) -> jax.Array:
    """``x [M, K]`` float32 times packed bfloat16 weights -> ``[M, N]`` float32, through XLA."""
    return narrow_weight_dot(x, unpack(packed, x.shape[1], n), 0)


def amx_matmul_kernel(x: jax.Array, packed: jax.Array, n: int) -> jax.Array:
    """The AMX kernel (``enable`` must have returned True); shapes as in the reference."""
    _validate(x, packed, n)
    return jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((x.shape[0], n), jnp.float32))(x, packed)


def amx_matmul(x: jax.Array, packed: jax.Array, n: int) -> jax.Array:
    """The engine's dispatch point for float32 activations times packed bfloat16 weights."""
    if _enabled and dispatch.cpu_kernels():
        return amx_matmul_kernel(x, packed, n)
    _validate(x, packed, n)
    return amx_matmul_reference(x, packed, n)


def _validate(x: jax.Array, packed: jax.Array, n: int) -> None:
    if x.ndim != 2 or x.dtype != jnp.float32 or packed.ndim != 3 or packed.dtype != jnp.bfloat16:
        raise ValueError(f"expected float32 x [M, K] and packed bfloat16 [N/16, K/2, 32], got "
                         f"{x.dtype}{list(x.shape)} and {packed.dtype}{list(packed.shape)}")
    if packed.shape != (-(-n // BLOCK_COLS), -(-x.shape[1] // TILE_K) * TILE_K // 2, 2 * BLOCK_COLS):
        raise ValueError(f"packed weights {list(packed.shape)} do not hold a [{x.shape[1]}, {n}] matrix")


def cpu_supports_amx() -> bool:
    """Whether the CPU advertises what the kernel uses (Linux's /proc/cpuinfo)."""
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        return False
    return set(CPU_FLAGS) <= set(flags.split())


def enable(build_dir: str) -> bool:
    """Build (or find built) the kernel under ``build_dir``, register it with XLA and turn it on
    for ``amx_matmul``. False, with the reason logged once, when it cannot run here."""
    global _enabled
    if not _enabled:
        _enabled = _load(build_dir)
    return _enabled


@functools.cache
def _load(build_dir: str) -> bool:
    if jax.default_backend() != "cpu" or not cpu_supports_amx():
        return False
    try:
        library = ctypes.CDLL(_build(build_dir))
    except (OSError, RuntimeError) as e:
        logger.warning("AMX matmul kernel unavailable, bfloat16 weights use XLA's dot: %s", e)
        return False
    library.jaxinfer_amx_request.restype = ctypes.c_bool
    if not library.jaxinfer_amx_request():
        logger.warning("AMX matmul kernel unavailable: the OS refused AMX state to this process")
        return False
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(getattr(library, TARGET)), platform="cpu")
    return True


def _build(build_dir: str) -> str:
    """Path of the shared library for this source and JAX, compiled if missing (atomically: a
    concurrent or interrupted build never leaves a partial file under the final name)."""
    include = jax.ffi.include_dir()
    source = SOURCE.read_bytes()
    digest = hashlib.sha256(source + include.encode() + jax.__version__.encode()).hexdigest()[:16]
    path = os.path.join(build_dir, f"amx_matmul-{digest}.so")
    if os.path.exists(path):
        return path
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise RuntimeError("no C++ compiler found (set CXX, or install g++)")
    os.makedirs(build_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=build_dir)
    os.close(fd)
    cmd = [compiler, "-O3", "-std=c++17", "-shared", "-fPIC", "-mavx512f", "-mavx512bw", "-mamx-tile",
           "-mamx-bf16", "-w", f"-I{include}", str(SOURCE), "-o", tmp]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
