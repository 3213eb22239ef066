"""The paged KV cache: one page pool per layer, and the metadata that addresses it in a step.

Layout of a pool: ``[num_pages, kv_heads, page_size, head_dim]`` (a layer's pools are a
``pallas_kernels.paged_kv.PagedKV``, which describes the quantized layout): each page holds one
contiguous ``[page_size, head_dim]`` block per KV head, so attention reads a page straight into the
``[batch, kv_heads, keys, head_dim]`` operand of its matmuls (the token-major layout cost a
transpose of every gathered page: 40% of a batch-32 decode step on XLA:CPU), and a GPU kernel
loads one block per head. Page ``TRASH_PAGE`` is never handed out by the block manager: padding
tokens of a bucketed batch write their K/V there, so the jitted step needs no masks on its writes.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from jaxinfer.config import ModelConfig
from pallas_kernels import cpu_native, dispatch
from pallas_kernels.kv_write_cpu import kv_write_cpu
from pallas_kernels.paged_kv import PagedKV, quantize_kv

TRASH_PAGE = 0
QUANT_POLICIES = (0, 8, 4)


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class KVCache:
    """One ``PagedKV`` per layer; ``allocate``'s ``quant_policy`` (``--quant-policy``) is their ``bits``."""

    layers: tuple[PagedKV, ...]

    @property
    def num_pages(self) -> int:
        return self.layers[0].num_pages

    @property
    def page_size(self) -> int:
        return self.layers[0].page_size

    @staticmethod
    def bytes_per_token(config: ModelConfig, dtype, quant_policy: int = 0) -> int:
        """K and V bytes one token takes over all layers (codes plus scales and zeros if quantized)."""
        per_head = (
            config.head_dim * jnp.dtype(dtype).itemsize if quant_policy == 0
            else config.head_dim * quant_policy // 8 + 2 * 4
        )
        return 2 * config.num_layers * config.num_kv_heads * per_head

    @classmethod
    def allocate(cls, config: ModelConfig, num_pages: int, page_size: int, dtype, quant_policy: int = 0) -> "KVCache":
        if quant_policy not in QUANT_POLICIES:
            raise ValueError(f"quant_policy must be one of {QUANT_POLICIES}, got {quant_policy}")
        heads = (num_pages, config.num_kv_heads, page_size)

        def layer() -> PagedKV:  # fresh buffers per layer: the step donates and updates each
            if quant_policy == 0:
                return PagedKV(jnp.zeros((*heads, config.head_dim), dtype), jnp.zeros((*heads, config.head_dim), dtype))
            width = config.head_dim * quant_policy // 8
            return PagedKV(
                jnp.zeros((*heads, width), jnp.uint8), jnp.zeros((*heads, width), jnp.uint8),
                jnp.zeros((*heads, 2), jnp.float32), jnp.zeros((*heads, 2), jnp.float32), quant_policy,
            )

        return cls(layers=tuple(layer() for _ in range(config.num_layers)))


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


def _scatter(pool: jax.Array, slots: jax.Array, values: jax.Array) -> jax.Array:
    """``pool[page, :, offset] = values`` for each flat slot; ``values`` ``[tokens, kv_heads, ...]``."""
    page_size = pool.shape[2]
    if pool.dtype == jnp.bfloat16 and dispatch.cpu_kernels() and cpu_native.kernels().kv_write:
        return kv_write_cpu(pool, slots, values)
    return pool.at[slots // page_size, :, slots % page_size].set(values, mode="promise_in_bounds")


def write_kv(cache: PagedKV, slot_mapping: jax.Array, k: jax.Array, v: jax.Array) -> PagedKV:
    """Write new tokens into a layer's pools (quantizing them if the cache is), in place when the
    pools are donated.

    Args:
      slot_mapping: ``[batch, q_len]`` flat slots ``page * page_size + offset``.
      k, v: ``[batch, q_len, kv_heads, head_dim]``.
    """
    slots = slot_mapping.reshape(-1)
    k = k.reshape(-1, *k.shape[2:])  # [tokens, kv_heads, head_dim]
    v = v.reshape(-1, *v.shape[2:])
    if slots.shape[0] == 1:
        # XLA rewrites a one-row scatter into a dynamic-update-slice that copies the whole pool
        # on every step (measured: 5x slower batch-1 decode); a second write to the trash page
        # keeps it a scatter, which updates in place.
        slots = jnp.concatenate([slots, jnp.full_like(slots, TRASH_PAGE * cache.page_size)])
        k, v = jnp.concatenate([k, k]), jnp.concatenate([v, v])
    if cache.bits == 0:
        return dataclasses.replace(
            cache, k=_scatter(cache.k, slots, k.astype(cache.k.dtype)), v=_scatter(cache.v, slots, v.astype(cache.v.dtype))
        )
    k_codes, k_sz = quantize_kv(k, cache.bits)
    v_codes, v_sz = quantize_kv(v, cache.bits)
    return dataclasses.replace(
        cache,
        k=_scatter(cache.k, slots, k_codes), v=_scatter(cache.v, slots, v_codes),
        k_scale_zero=_scatter(cache.k_scale_zero, slots, k_sz), v_scale_zero=_scatter(cache.v_scale_zero, slots, v_sz),
    )


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
    config: ModelConfig, dtype, page_size: int, max_entry_count: float | int, session_len: int, max_batch_size: int,
    quant_policy: int = 0,
) -> CachePlan:
    """Size the page pools: an int is a page count; a float is a fraction of the free memory
    (measured now, after the weights are loaded), capped at what ``max_batch_size`` full sessions
    can use."""
    token_bytes = KVCache.bytes_per_token(config, dtype, quant_policy)
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
    kind = f"int{quant_policy} K/V" if quant_policy else f"{jnp.dtype(dtype).name} K/V"
    explanation = (
        f"KV cache: {pages * page_size} tokens = {pages} pages x {page_size} tokens "
        f"({kind}, {token_bytes} bytes/token, {pages * page_bytes / 2**30:.2f} GiB); {why}"
    )
    return CachePlan(num_pages=num_pages, page_size=page_size, explanation=explanation)
