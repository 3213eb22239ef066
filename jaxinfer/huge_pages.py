"""The model's weights in transparent huge pages, on CPU.

A decode step at small batch streams every weight from memory once, so it runs at the host's read
bandwidth. XLA:CPU allocates each buffer by itself in 4 KiB pages; read through 2 MiB pages, a
stream misses the TLB 512x less often. On the 2-core Zen 4 a 2-thread read of 540 MB ran
1.02-1.2x faster from huge pages, the most when the shared host's bandwidth was high (46-48 ->
54-56 GB/s; exploratory, side by side), and SmolLM2's batch-1 decode steps 1.04x faster, batch
8-32 unchanged (``benchmarks/step_breakdown.py --variants "4 KiB pages"``, RESULTS.md 19:03).

``parts_to_huge_pages`` copies every array of a tree, which arrives in parts one at a time (so that
a caller building the parts lazily never holds two copies of it), into one private anonymous
mapping, aligned to 2 MiB and advised ``MADV_HUGEPAGE`` before its first touch (so that page faults
take huge pages when the kernel's THP mode is ``madvise`` as well as ``always``), and returns arrays
that alias it: on CPU ``jax.device_put`` of a numpy array aligned to 64 bytes does not copy it. The
mapping lives as long as any of those arrays.
"""

from __future__ import annotations

import logging
import mmap
from collections.abc import Iterable

import jax
import numpy as np

logger = logging.getLogger(__name__)

HUGE_PAGE_BYTES = 2 << 20
ALIGNMENT = 64  # what XLA:CPU needs to take a host buffer without copying it


def parts_to_huge_pages(shapes: dict, parts: Iterable[dict], device: jax.Device) -> dict:
    """The dict whose entries are those of ``parts`` (dicts with disjoint keys, taken one at a
    time), every leaf copied into one huge-page mapping sized by ``shapes`` (the merged dict's
    ``jax.ShapeDtypeStruct`` leaves). Nothing here keeps a part once it is copied. On a device
    that is not a CPU, or without ``MADV_HUGEPAGE``, the merged parts as they are."""
    if not _available(device):
        return {key: value for part in parts for key, value in part.items()}
    total = sum(_aligned(s.size * np.dtype(s.dtype).itemsize) for s in jax.tree.leaves(shapes))
    span = -(-total // HUGE_PAGE_BYTES) * HUGE_PAGE_BYTES
    mapping = mmap.mmap(-1, span + HUGE_PAGE_BYTES, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    memory = np.frombuffer(mapping, np.uint8)
    start = -memory.ctypes.data % HUGE_PAGE_BYTES
    mapping.madvise(mmap.MADV_HUGEPAGE, start, span)
    offset = start
    copied = False

    def copy(leaf):
        nonlocal offset, copied
        nbytes = leaf.size * np.dtype(leaf.dtype).itemsize
        if offset + nbytes > start + total:
            raise ValueError("the parts hold more than their shapes say")
        view = memory[offset : offset + nbytes].view(leaf.dtype).reshape(leaf.shape)
        offset += _aligned(nbytes)
        view[...] = np.asarray(leaf)
        array = jax.device_put(view, device)
        if nbytes and array.unsafe_buffer_pointer() != view.ctypes.data and not copied:
            copied = True
            logger.debug("jax copied a host buffer; some weights stay in XLA's own buffers")
        return array

    out = {}
    for part in parts:
        out.update(jax.tree.map(copy, part))
        del part
    if jax.tree.structure(out) != jax.tree.structure(shapes):
        raise ValueError(f"the parts make {jax.tree.structure(out)}, not {jax.tree.structure(shapes)}")
    return out


def _available(device: jax.Device) -> bool:
    return device.platform == "cpu" and hasattr(mmap, "MADV_HUGEPAGE")


def _aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGNMENT) * ALIGNMENT
