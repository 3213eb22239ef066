"""The paged KV cache: one page pool per layer, and the metadata that addresses it in a step.

Layout of a pool: ``[num_pages, kv_heads, page_size, head_dim]``: each page holds one contiguous
``[page_size, head_dim]`` block per KV head, so attention reads a page straight into the
``[batch, kv_heads, keys, head_dim]`` operand of its matmuls (the token-major layout cost a
transpose of every gathered page: 40% of a batch-32 decode step on XLA:CPU), and a GPU kernel
loads one block per head. Page ``TRASH_PAGE`` is never handed out by the block manager: padding
tokens of a bucketed batch write their K/V there, so the jitted step needs no masks on its writes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from jaxinfer.config import ModelConfig

TRASH_PAGE = 0


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class KVCache:
    """Per-layer page pools; ``k[i]`` and ``v[i]`` are ``[num_pages, kv_heads, page_size, head_dim]``."""

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]

    @property
    def num_pages(self) -> int:
        return self.k[0].shape[0]

    @property
    def page_size(self) -> int:
        return self.k[0].shape[2]

    @staticmethod
    def bytes_per_token(config: ModelConfig, dtype) -> int:
        """K and V bytes one token takes over all layers."""
        return 2 * config.num_layers * config.num_kv_heads * config.head_dim * jnp.dtype(dtype).itemsize

    @classmethod
    def allocate(cls, config: ModelConfig, num_pages: int, page_size: int, dtype) -> "KVCache":
        shape = (num_pages, config.num_kv_heads, page_size, config.head_dim)
        zeros = lambda: jnp.zeros(shape, dtype)  # noqa: E731 - one buffer per layer, never shared
        return cls(
            k=tuple(zeros() for _ in range(config.num_layers)),
            v=tuple(zeros() for _ in range(config.num_layers)),
        )


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class AttentionMetadata:
    """Where the tokens of one step sit in the cache.

    Attributes:
      positions: ``[batch, q_len]`` int32 absolute position of each new token.
      slot_mapping: ``[batch, q_len]`` int32 flat slot ``page * page_size + offset`` each new
        token's K/V is written to (a slot of ``TRASH_PAGE`` for padding).
      block_tables: ``[batch, pages_per_seq]`` int32 pages of each sequence (``TRASH_PAGE`` pads).
      seq_lens: ``[batch]`` int32 context length after this step (0 for padding rows).
    """

    positions: jax.Array
    slot_mapping: jax.Array
    block_tables: jax.Array
    seq_lens: jax.Array


def write_kv(pages: jax.Array, slot_mapping: jax.Array, values: jax.Array) -> jax.Array:
    """Write new tokens into a page pool, in place when the pool is donated.

    Args:
      pages: ``[num_pages, kv_heads, page_size, head_dim]``.
      slot_mapping: ``[batch, q_len]`` flat slots ``page * page_size + offset``.
      values: ``[batch, q_len, kv_heads, head_dim]``.
    """
    page_size = pages.shape[2]
    slots = slot_mapping.reshape(-1)
    values = values.reshape(-1, *values.shape[2:]).astype(pages.dtype)  # [tokens, kv_heads, head_dim]
    if slots.shape[0] == 1:
        # XLA rewrites a one-row scatter into a dynamic-update-slice that copies the whole pool
        # on every step (measured: 5x slower batch-1 decode); a second write to the trash page
        # keeps it a scatter, which updates in place.
        slots = jnp.concatenate([slots, jnp.full_like(slots, TRASH_PAGE * page_size)])
        values = jnp.concatenate([values, values])
    return pages.at[slots // page_size, :, slots % page_size, :].set(values, mode="promise_in_bounds")


def available_memory_bytes() -> int:
    """Free memory of the default device now (device stats on GPU; MemAvailable on the host)."""
    stats = jax.devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    if os.path.exists("/proc/meminfo"):
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


@dataclass(frozen=True)
class CachePlan:
    """How many pages the pools get, and why (printed at start-up)."""

    num_pages: int  # including TRASH_PAGE
    page_size: int
    explanation: str

    @property
    def capacity_tokens(self) -> int:
        return (self.num_pages - 1) * self.page_size


def plan_cache(
    config: ModelConfig, dtype, page_size: int, max_entry_count: float | int, session_len: int, max_batch_size: int
) -> CachePlan:
    """Size the page pools: an int is a page count; a float is a fraction of the free memory
    (measured now, after the weights are loaded), capped at what ``max_batch_size`` full sessions
    can use."""
    token_bytes = KVCache.bytes_per_token(config, dtype)
    page_bytes = token_bytes * page_size
    if isinstance(max_entry_count, int):
        pages = max_entry_count
        why = f"--cache-max-entry-count {pages} pages"
    else:
        free = available_memory_bytes()
        by_memory = int(free * max_entry_count) // page_bytes
        per_session = -(-session_len // page_size)
        by_batch = max_batch_size * per_session
        pages = max(1, min(by_memory, by_batch))
        why = (
            f"min({max_entry_count} x {free / 2**30:.1f} GiB free after weights = {by_memory} pages, "
            f"max_batch_size {max_batch_size} x {per_session} pages per {session_len}-token session = {by_batch} pages)"
        )
    num_pages = pages + 1  # + TRASH_PAGE
    explanation = (
        f"KV cache: {pages * page_size} tokens = {pages} pages x {page_size} tokens "
        f"({token_bytes} bytes/token, {pages * page_bytes / 2**30:.2f} GiB); {why}"
    )
    return CachePlan(num_pages=num_pages, page_size=page_size, explanation=explanation)
