"""A pytest plugin (``-p avx2_build``): ``pallas_kernels.cpu_native`` builds and loads its AVX2
library whatever the CPU has beyond it. ``test_cpu_native.py`` runs the kernels' tests under it in
a subprocess, so that a machine with AVX-512 also tests the code CPUs without it run."""

from pallas_kernels import cpu_native

AVX2 = next(level for level in cpu_native.LEVELS if level.name == "avx2")


def _avx2_level(flags=None):
    flags = cpu_native.cpu_flags() if flags is None else flags
    return AVX2 if AVX2.cpu_flags <= flags else None


cpu_native.isa_level = _avx2_level
