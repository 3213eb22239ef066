"""The one table of block sizes for the Pallas kernels, keyed by the shapes a kernel is called with.

Triton needs power-of-two block shapes; each entry says why it is what it is. The dispatch points
read their block sizes only from here, and the CUDA-lowering tests lower every kernel with exactly
the choices this table makes, so what is tested is what runs.
"""

from __future__ import annotations

from dataclasses import dataclass

# --- int4_matmul (W4A16 dequant-matmul, pallas_kernels/int4_matmul.py) ---


@dataclass(frozen=True)
class Int4MatmulBlocks:
    """Tiles of ``x [m, in] @ W [in, out]``: output tiles ``[block_m, block_n]``, K in steps of
    ``block_k`` weight rows."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


def int4_matmul_blocks(m: int, rows: int) -> Int4MatmulBlocks:
    """Blocks for ``m`` activation rows against a weight whose codes hold ``rows`` input rows
    (``in`` padded to whole groups). Not tuned on a GPU yet: chosen from the shapes alone."""
    # Triton's dot needs at least 16 rows; above that the next power of two wastes less than half
    # a tile on padding rows, and 128 is where one tile's accumulator fills a CTA's registers.
    block_m = min(max(16, 1 << max(0, m - 1).bit_length()), 128)
    if block_m <= 16:
        # Decode is bound by reading the weight: narrow N tiles give more CTAs over a layer's
        # columns, deep K steps keep more packed words in flight per CTA.
        block_n, block_k, num_warps = 64, 128, 4
    elif block_m <= 64:
        # Small batches: each weight tile now feeds 32-64 rows, so wider N tiles halve how often
        # x is re-read; K steps of 64 keep the dequantized [64, 128] tile within 4 warps' registers.
        block_n, block_k, num_warps = 128, 64, 4
    else:
        # Prefill is bound by the dot: the classic Triton 128x128x64 tile with 8 warps.
        block_n, block_k, num_warps = 128, 64, 8
    # A K step must not straddle the end of the codes: the largest power of two dividing ``rows``
    # (groups are powers of two, so it is at least one group).
    block_k = min(block_k, rows & -rows)
    # Three stages overlap the next K step's loads with this step's unpack and dot, within the
    # shared memory of every GPU since Ampere at these tiles.
    return Int4MatmulBlocks(block_m, block_n, block_k, num_warps, num_stages=3)


# --- paged decode attention (pallas_kernels/paged_attention.py: paged_decode_attention) ---

# Keys read per inner-loop iteration: 64 keys x head_dim 128 x 2 bytes is 16 KB of K and as much
# of V per step (bf16), small enough for a 4-warp program to keep two steps in flight.
DECODE_KEYS_PER_ITERATION = 64
# Programs the grid should offer, about two per SM of an A100/H100 (108/132 SMs), so that batch 1
# with few KV heads still fills the GPU; splits beyond that only add partial results to merge.
DECODE_TARGET_PROGRAMS = 256
# A split shorter than this spends more on writing and merging its float32 partials
# (block_h x head_dim x 4 bytes) than on the keys it reads.
DECODE_MIN_KEYS_PER_SPLIT = 256


@dataclass(frozen=True)
class DecodeAttentionBlocks:
    """Blocks of the paged decode kernel: ``block_h`` query rows (one KV head's group, padded) per
    program, ``pages_per_iteration`` pages per inner step, ``pages_per_split`` pages per program
    along the sequence (split-K)."""

    block_h: int
    pages_per_iteration: int
    pages_per_split: int
    num_warps: int
    num_stages: int


def decode_attention_blocks(
    *, batch: int, kv_heads: int, group: int, page_size: int, pages_per_seq: int
) -> DecodeAttentionBlocks:
    """Blocks for ``batch`` sequences whose block tables hold ``pages_per_seq`` pages of
    ``page_size`` tokens, ``group`` query heads per KV head. Not tuned on a GPU yet: chosen from
    the shapes alone. The split is sized for the table's width (the longest sequence the engine
    allows), not for the lengths at run time: those are traced values."""
    # Triton's dot needs at least 16 rows and power-of-two blocks: a group of 1..8 query heads
    # (3 included) is padded to 16 rows; the padding rows cost compute, not memory traffic.
    block_h = max(16, 1 << (group - 1).bit_length())
    pages_per_iteration = max(1, DECODE_KEYS_PER_ITERATION // page_size)
    max_splits = max(1, pages_per_seq * page_size // DECODE_MIN_KEYS_PER_SPLIT)
    splits = min(max_splits, -(-DECODE_TARGET_PROGRAMS // (batch * kv_heads)))
    pages_per_split = -(-pages_per_seq // splits)
    # A split is whole iterations, so that no inner step straddles two programs.
    pages_per_split = -(-pages_per_split // pages_per_iteration) * pages_per_iteration
    # The per-step tiles are small ([16, 64] scores, [64, head_dim] K and V): four warps, and two
    # stages so the next pages' loads overlap this step's dots.
    return DecodeAttentionBlocks(block_h, pages_per_iteration, pages_per_split, num_warps=4, num_stages=2)


# --- prefill_attention (causal flash attention of a chunk over pages, pallas_kernels/prefill_attention.py) ---


@dataclass(frozen=True)
class PrefillAttentionBlocks:
    """One program attends ``block_rows`` query rows (tokens x query heads of one KV head) over
    ``pages_per_iteration`` pages per loop iteration."""

    block_rows: int
    pages_per_iteration: int
    num_warps: int
    num_stages: int


def prefill_attention_blocks(rows: int, head_dim: int, page_size: int, kv_bytes: float) -> PrefillAttentionBlocks:
    """Blocks for ``rows`` query rows per KV head (``q_len * group``) over pages of ``page_size``
    tokens holding ``kv_bytes`` per value (4, 2, 1 or 0.5 for int4). Not tuned on a GPU yet:
    chosen from the shapes alone."""
    # Triton's dot needs at least 16 rows; 64 rows keep the float32 accumulator ([64, 128]: 32
    # registers per thread at 8 warps) and the query tile in registers, and a q_len-16 chunk of
    # an MHA model does not pay for more than its own 16 rows.
    block_rows = min(max(16, 1 << max(0, rows - 1).bit_length()), 64)
    # 64 keys per iteration (the classic flash-attention N tile), halved when a K tile would
    # pass 16 KB (float32 at head_dim 128), so that K and V double-buffered stay within the
    # ~100 KB of shared memory of consumer GPUs; at least one page per iteration.
    keys = 64 if 64 * head_dim * kv_bytes <= 16384 else 32
    pages_per_iteration = max(1, keys // page_size)
    # 4 warps hold a [64, 64] accumulator comfortably; head_dim 128 doubles it.
    num_warps = 4 if head_dim <= 64 else 8
    # Two stages overlap the next iteration's page loads with this one's dots.
    return PrefillAttentionBlocks(block_rows, pages_per_iteration, num_warps, num_stages=2)
