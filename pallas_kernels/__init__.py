"""GPU hot spots as Pallas kernels, each beside the pure-jnp reference it must match.

This package sits at the bottom of jaxinfer's import graph: it imports nothing from the project.
Each module exposes one dispatch function that the engine calls; it picks the kernel or the
reference by backend.
"""
