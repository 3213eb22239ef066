"""The one table of block sizes for the Pallas kernels, keyed by the shapes a kernel is called with.

Triton needs power-of-two block shapes; each entry says why it is what it is. The dispatch points
read their block sizes only from here, and the CUDA-lowering tests lower every kernel with exactly
the choices this table makes, so what is tested is what runs.
"""

from __future__ import annotations
