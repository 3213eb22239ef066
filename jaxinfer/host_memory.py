"""The C heap's policy for host memory: giving freed memory back to the OS, and keeping it.

XLA:CPU allocates arrays with the C library's malloc. glibc keeps the pages of freed blocks below
its mmap threshold (which it raises to the size of each large block freed, up to 32 MiB) in its
heap for reuse, so a process that frees a copy of the weights still shows it in its resident
memory, and memory it then maps itself (``jaxinfer.huge_pages``) comes on top. ``malloc_trim``
returns those free pages to the OS (``release_freed_memory``, after loading and after warm-up).

Serving wants the opposite. Each execution of a step allocates its temporaries (one block) and
outputs anew; SmolLM2's batch-32 decode step needs a 38 MB block, above the largest mmap threshold
glibc adopts, so glibc maps it fresh and unmaps it on free, and the step takes a page fault, and
the zeroing of a page, for each 4 KiB it writes: ~2,900 faults per step (exploratory,
``getrusage``). ``keep_freed_memory`` has every block come from the heap and freed pages stay
there, so a step reuses the pages of the step before: batch-32 steps 1.06x faster in bfloat16 and
1.04x in float32, batch 1 unchanged (``benchmarks/heap_policy.py``), and the same resident memory.
A program that embeds jaxinfer and wants its C library's own policy sets
``JAXINFER_KEEP_FREED_MEMORY=0``. Elsewhere than glibc both do nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os


# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
KEPT_FREE_BYTES = 1 << 30  # free bytes at the heap's top that glibc keeps instead of trimming them


@functools.cache
def _glibc_function(name: str):
    library = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(library), name) if library else None
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> None:
    """Return the C heap's free pages to the OS (glibc's ``malloc_trim``; a no-op elsewhere)."""
    trim = _glibc_function("malloc_trim")
    if trim is not None:
        trim(0)


def keep_freed_memory() -> None:
    """From now on, serve every block from the C heap and keep freed pages for reuse (glibc's
    ``mallopt``: no mmap'd blocks, trim only past ``KEPT_FREE_BYTES``; a no-op elsewhere, and
    with ``JAXINFER_KEEP_FREED_MEMORY=0``). ``release_freed_memory`` still returns free pages
    when called."""
    mallopt = _glibc_function("mallopt")
    if mallopt is not None and os.environ.get("JAXINFER_KEEP_FREED_MEMORY") != "0":
        mallopt(M_MMAP_MAX, 0)
        mallopt(M_TRIM_THRESHOLD, KEPT_FREE_BYTES)
