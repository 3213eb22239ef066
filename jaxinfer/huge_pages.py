"""The model's weights in transparent huge pages, on CPU.

A decode step at small batch streams every weight from memory once, so it runs at the host's read
bandwidth. XLA:CPU allocates each buffer by itself in 4 KiB pages; read through 2 MiB pages, a
stream misses the TLB 512x less often. On the 2-core Zen 4 a 2-thread read of 540 MB ran
1.02-1.2x faster from huge pages, the most when the shared host's bandwidth was high (46-48 ->
54-56 GB/s; exploratory, side by side), and SmolLM2's batch-1 decode steps 1.04x faster, batch
8-32 unchanged (``benchmarks/step_breakdown.py --variants "4 KiB pages"``, RESULTS.md 19:03).

``to_huge_pages`` copies every array of a tree into one private anonymous mapping, aligned to
2 MiB and advised ``MADV_HUGEPAGE`` before its first touch (so that page faults take huge pages
when the kernel's THP mode is ``madvise`` as well as ``always``), and returns arrays that alias it:
on CPU ``jax.device_put`` of a numpy array aligned to 64 bytes does not copy it. The mapping lives
as long as any of those arrays.
"""

from __future__ import annotations

import logging
import mmap
from typing import Any

import jax
import numpy as np

logger = logging.getLogger(__name__)

HUGE_PAGE_BYTES = 2 << 20
ALIGNMENT = 64  # what XLA:CPU needs to take a host buffer without copying it


def to_huge_pages(tree: Any, device: jax.Device) -> Any:
    """``tree`` with every leaf (a jax or numpy array) copied into one huge-page mapping and put on
    ``device`` without a further copy; the same values, dtypes and shapes. ``tree`` itself when
    ``device`` is not a CPU, the platform has no ``MADV_HUGEPAGE``, or jax copied a leaf anyway."""
    if device.platform != "cpu" or not hasattr(mmap, "MADV_HUGEPAGE"):
        return tree
    leaves, treedef = jax.tree.flatten(tree)
    offsets, total = [], 0
    for leaf in leaves:
        offsets.append(total)
        total += -(-leaf.nbytes // ALIGNMENT) * ALIGNMENT
    span = -(-total // HUGE_PAGE_BYTES) * HUGE_PAGE_BYTES
    mapping = mmap.mmap(-1, span + HUGE_PAGE_BYTES, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    memory = np.frombuffer(mapping, np.uint8)
    start = -memory.ctypes.data % HUGE_PAGE_BYTES
    mapping.madvise(mmap.MADV_HUGEPAGE, start, span)
    out = []
    for leaf, offset in zip(leaves, offsets):
        view = memory[start + offset : start + offset + leaf.nbytes].view(leaf.dtype).reshape(leaf.shape)
        view[...] = np.asarray(leaf)
        array = jax.device_put(view, device)
        if leaf.nbytes and array.unsafe_buffer_pointer() != view.ctypes.data:
            logger.debug("jax copied a host buffer; weights stay in XLA's own buffers")
            return tree
        out.append(array)
    return jax.tree.unflatten(treedef, out)
