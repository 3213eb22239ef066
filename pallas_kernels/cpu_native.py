"""jaxinfer's CPU kernels in C++ (``*.cc`` beside this file): built, loaded and registered with XLA.

On CPU the engine runs XLA's code except where a small kernel of ours is measurably faster:

* ``amx_matmul.cc``: bfloat16-weight matmuls on Intel AMX (``pallas_kernels.bf16_matmul``);
* ``avx512bf16_matmul.cc``: the same matmuls with AVX512_BF16's pair dot products, for CPUs with
  those but no AMX (AMD Zen 4, Intel Cooper Lake) or whose OS refuses AMX state;
* ``f32_matmul.cc``: float32 matmuls over packed weights (``pallas_kernels.f32_matmul``);
* ``paged_attention_cpu.cc``: decode and prefill attention reading float32, bfloat16, int8 or
  int4 KV pages in place (``pallas_kernels.paged_attention``'s dispatch point);
* ``kv_write_cpu.cc``: new tokens' K/V written into bfloat16 pages in place
  (``pallas_kernels.kv_write_cpu``), where XLA's scatter would widen the whole pool;
* ``decoder_layer_cpu.cc``: a whole float32 decoder layer of a decode step in one call
  (``pallas_kernels.decoder_layer_cpu``), instead of ~20 small XLA ops around its matmuls.

XLA calls them through its FFI (``jax.ffi``), on its own intra-op thread pool. They are compiled
together into one shared library on first use, for the best instruction-set level this CPU runs
(``LEVELS``: AVX-512, with the bfloat16 matmuls, or AVX2 with FMA), with the system's C++ compiler against JAX's
FFI headers, and kept in a directory the caller names (the engine uses ``$JAXINFER_HOME/native``).
Without one of those levels, a compiler or (for the bfloat16 matmuls) AVX512_BF16, or AMX and the
OS's permission to use it, ``enable`` logs why and the engine keeps XLA's code.
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
HEADERS = (HERE / "cpu_bf16.h", HERE / "cpu_matmul_tiles.h", HERE / "cpu_parallel.h", HERE / "cpu_vec16.h",
           HERE / "f32_matmul_tile.h", HERE / "paged_attention_cpu.h")
AMX_MATMUL = "jaxinfer_amx_matmul"
AVX512BF16_MATMUL = "jaxinfer_avx512bf16_matmul"
F32_MATMUL = "jaxinfer_f32_matmul"
PAGED_ATTENTION = "jaxinfer_paged_attention"
PAGED_ATTENTION_QUANTIZED = "jaxinfer_paged_attention_quantized"
KV_WRITE = "jaxinfer_kv_write"
DECODER_LAYER = "jaxinfer_decoder_layer"
TARGETS = (AMX_MATMUL, AVX512BF16_MATMUL, F32_MATMUL, PAGED_ATTENTION, PAGED_ATTENTION_QUANTIZED, KV_WRITE,
           DECODER_LAYER)
# GCC 12's own AVX-512 intrinsic headers trip -W(maybe-)uninitialized: their shuffles start from
# a deliberately undefined vector (a known false positive).
COMMON_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-Wall", "-Wextra", "-Wno-maybe-uninitialized",
                "-Wno-uninitialized")


SOURCES = (HERE / "f32_matmul.cc", HERE / "paged_attention_cpu.cc", HERE / "kv_write_cpu.cc", HERE / "decoder_layer_cpu.cc")
# The bfloat16 matmuls, AVX-512 builds only; each runs only where the CPU (and for AMX, the OS) allows.
BF16_SOURCES = (HERE / "amx_matmul.cc", HERE / "avx512bf16_matmul.cc")
# Every build's FFI targets, by CpuKernels field.
BUILT_TARGETS = (("f32_matmul", F32_MATMUL), ("paged_attention", PAGED_ATTENTION),
                 ("paged_attention_quantized", PAGED_ATTENTION_QUANTIZED), ("kv_write", KV_WRITE),
                 ("decoder_layer", DECODER_LAYER))


@dataclasses.dataclass(frozen=True)
class IsaLevel:
    """One build of the kernels: for CPUs with ``cpu_flags``, compiled with ``compile_flags``;
    ``bf16_matmuls``: whether it holds the bfloat16 matmuls (AMX, AVX512_BF16) too."""

    name: str
    cpu_flags: frozenset[str]
    compile_flags: tuple[str, ...]
    bf16_matmuls: bool

    @property
    def sources(self) -> tuple[Path, ...]:
        return (*SOURCES, *BF16_SOURCES) if self.bf16_matmuls else SOURCES


# Best first. The kernels are written once against cpu_vec16.h's 16-lane vectors; the AVX2 build
# serves AMD EPYCs before Zen 4 and older Intel CPUs.
LEVELS = (
    IsaLevel("avx512", frozenset({"avx512f", "avx512bw", "avx512vl"}),
             ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mamx-tile", "-mamx-bf16"), bf16_matmuls=True),
    IsaLevel("avx2", frozenset({"avx2", "fma"}), ("-mavx2", "-mfma"), bf16_matmuls=False),
)


@dataclasses.dataclass(frozen=True)
class CpuKernels:
    """Which kernels XLA can call in this process."""

    paged_attention: bool = False  # every build
    paged_attention_quantized: bool = False  # every build
    amx_matmul: bool = False  # AMX, granted by the OS
    avx512bf16_matmul: bool = False  # AVX512_BF16
    kv_write: bool = False  # every build
    f32_matmul: bool = False  # every build
    decoder_layer: bool = False  # every build

    @property
    def bf16_matmul(self) -> bool:
        """Whether a bfloat16-weight matmul kernel runs (``pallas_kernels.bf16_matmul``)."""
        return self.amx_matmul or self.avx512bf16_matmul


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


def isa_level(flags: set[str] | None = None) -> IsaLevel | None:
    """The best build this CPU runs (``flags``: its feature flags, by default ``cpu_flags()``)."""
    flags = cpu_flags() if flags is None else flags
    return next((level for level in LEVELS if level.cpu_flags <= flags), None)


def runs_here(kernel: str) -> bool:
    """Whether this CPU can run ``kernel`` (a ``CpuKernels`` field) once it is built; for AMX,
    also once the OS grants its state."""
    level = isa_level()
    if level is None:
        return False
    if kernel == "amx_matmul":
        return level.bf16_matmuls and {"amx_tile", "amx_bf16"} <= cpu_flags()
    if kernel == "avx512bf16_matmul":
        return level.bf16_matmuls and "avx512_bf16" in cpu_flags()
    return kernel in dict(BUILT_TARGETS)


def enable(build_dir: str) -> CpuKernels:
    """Build (or find built) the kernels under ``build_dir``, register those this CPU runs with
    XLA, and turn them on; what is on, with the reason for what is not logged once."""
    global _kernels
    _kernels = _load(build_dir)
    return kernels()


@functools.cache
def _load(build_dir: str) -> CpuKernels:
    level = isa_level()
    if jax.default_backend() != "cpu" or level is None:
        return CpuKernels()
    try:
        library = ctypes.CDLL(build(build_dir, level))
    except (OSError, RuntimeError) as e:
        logger.warning("jaxinfer's CPU kernels are unavailable, XLA's code runs instead: %s", e)
        return CpuKernels()
    for _, target in BUILT_TARGETS:
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, target)), platform="cpu")
    on = {name: True for name, _ in BUILT_TARGETS}
    if runs_here("avx512bf16_matmul"):
        jax.ffi.register_ffi_target(AVX512BF16_MATMUL, jax.ffi.pycapsule(library.jaxinfer_avx512bf16_matmul),
                                    platform="cpu")
        on["avx512bf16_matmul"] = True
    if runs_here("amx_matmul"):
        library.jaxinfer_amx_request.restype = ctypes.c_bool
        if library.jaxinfer_amx_request():
            jax.ffi.register_ffi_target(AMX_MATMUL, jax.ffi.pycapsule(getattr(library, AMX_MATMUL)), platform="cpu")
            on["amx_matmul"] = True
        else:
            logger.warning("the AMX matmul kernel is unavailable: the OS refused AMX state to this process")
    return CpuKernels(**on)


def cxx_compiler() -> str:
    """The C++ compiler builds run: ``$CXX``, else ``g++`` or ``c++`` on the PATH."""
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise RuntimeError("no C++ compiler found (set CXX, or install g++)")
    return compiler


def _check(cmd: list[str], returncode: int, stderr: str) -> None:
    if returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{stderr[-2000:]}")


def build(build_dir: str, level: IsaLevel) -> str:
    """Path of the shared library of ``level`` for these sources and this JAX, compiled if missing
    (atomically: a concurrent or interrupted build never leaves a partial file under the final
    name); a new build removes the level's libraries of earlier sources."""
    include = jax.ffi.include_dir()
    flags = (*COMMON_FLAGS, *level.compile_flags)
    h = hashlib.sha256(" ".join(flags).encode() + include.encode() + jax.__version__.encode())
    for path in (*level.sources, *HEADERS):
        h.update(path.read_bytes())
    path = os.path.join(build_dir, f"jaxinfer_cpu_{level.name}-{h.hexdigest()[:16]}.so")
    if os.path.exists(path):
        return path
    compiler = cxx_compiler()
    os.makedirs(build_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=build_dir)
    os.close(fd)
    try:
        with tempfile.TemporaryDirectory(dir=build_dir) as objects:
            # One compiler per source, all at once: the build is an engine's first start's longest
            # wait, and each source takes seconds (mostly XLA's FFI header).
            compiles = [[compiler, *flags, "-c", "-isystem", include, f"-I{HERE}", str(source),
                         "-o", os.path.join(objects, f"{source.stem}.o")] for source in level.sources]
            running = [subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                       for cmd in compiles]
            errors = [proc.communicate()[1] for proc in running]  # every compiler has exited
            for cmd, proc, stderr in zip(compiles, running, errors):
                _check(cmd, proc.returncode, stderr)
            link = [compiler, *flags, *(cmd[-1] for cmd in compiles), "-o", tmp]
            done = subprocess.run(link, capture_output=True, text=True)
            _check(link, done.returncode, done.stderr)
        os.replace(tmp, path)
        for old in Path(build_dir).glob(f"jaxinfer_cpu_{level.name}-*.so"):  # earlier sources' builds
            if str(old) != path:
                old.unlink(missing_ok=True)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
