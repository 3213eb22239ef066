"""GPU hot spots as Pallas kernels, each beside the pure-jnp reference it must match.

This package sits at the bottom of jaxinfer's import graph: it imports nothing from the project.
The engine calls two dispatch points, ``paged_attention.paged_attention`` (decode and prefill
chunks) and ``int4_matmul.int4_matmul``; ``dispatch`` decides whether they run the kernels (on
GPU) or the references, and ``block_sizes`` holds every kernel's block sizes.
"""
