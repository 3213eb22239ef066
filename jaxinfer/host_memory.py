"""Giving freed host memory back to the OS.

XLA:CPU allocates arrays with the C library's malloc. glibc keeps the pages of freed blocks below
its mmap threshold (which it raises to the size of each large block freed, up to 32 MiB) in its
heap for reuse, so a process that frees a copy of the weights still shows it in its resident
memory, and memory it then maps itself (``jaxinfer.huge_pages``) comes on top. ``malloc_trim``
returns those free pages to the OS. Elsewhere than glibc this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> None:
    """Return the C heap's free pages to the OS (glibc's ``malloc_trim``; a no-op elsewhere)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
