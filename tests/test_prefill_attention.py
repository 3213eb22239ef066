"""The prefill-attention kernel: its jnp oracle against ``paged_attention_reference`` (two
independent formulations), the kernel in Pallas' interpreter against the oracle, input
validation, and lowering for CUDA (no GPU needed) with the block sizes the table chooses."""

import dataclasses
import itertools
import re
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.block_sizes import prefill_attention_blocks
from pallas_kernels.dispatch import use_implementation
from pallas_kernels.paged_attention import paged_attention, paged_attention_reference
from pallas_kernels.paged_kv import PagedKV, quantize_kv
from pallas_kernels.prefill_attention import prefill_attention_kernel, prefill_attention_reference

# Compiling, not running, is what these tests spend their time on: every function runs jitted as a
# whole (op-by-op dispatch compiles each op) and, without LLVM's optimizations, XLA:CPU compiles
# interpret-mode programs (big while loops) ~4x faster.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}

# (q dtype, kv_bits): float pages hold q's dtype, quantized ones uint8 codes.
KV_FORMATS = [("float32", 0), ("bfloat16", 0), ("float32", 8), ("bfloat16", 8), ("float32", 4), ("bfloat16", 4)]
# Kernel vs oracle (atol = rtol), by q's dtype. float32: rounding order only (seen: 2.4e-6).
# bfloat16 / float16: both round their outputs (magnitude up to ~4) to it, and the kernel feeds its
# dots probabilities in it: one step apart at most (seen at magnitude 2-4: 1.6e-2 and 2.0e-3).
TOLERANCE = {"float32": 2e-5, "bfloat16": 1e-2, "float16": 2e-3}
Q_LEN = 16  # the smallest prefill bucket: interpret runs stay fast

quantize = jax.jit(quantize_kv, static_argnums=1)


def rng_for(*params):
    """A generator seeded by a test's parameters, the same in every run (unlike ``hash``)."""
    return np.random.default_rng(zlib.crc32(repr(params).encode()))


def make_chunk_case(rng, *, group, kv_heads, head_dim, page_size, q_len, q_dtype, kv_bits, first_tokens=None):
    """A batch of five rows: a first chunk (positions from 0, then 3 padding tokens); chunks after
    earlier context in pages that end mid-page, at the end of a page, and one token into a page
    (256 is a multiple of every loop iteration's keys); a padding row (seq_len 0).

    Returns (args, kwargs, real): the positional arguments (q, kv, block_tables, seq_lens, q_positions)
    and keyword arguments of the attention functions, ``real[b, t]`` true for the tokens whose
    outputs count.
    """
    first = q_len - 3 if first_tokens is None else first_tokens
    seq_lens = [first, 6 * page_size + page_size // 2 + 3, 256, 257, 0]
    batch = len(seq_lens)
    pages_per_seq = -(-max(seq_lens) // page_size) + 1  # a spare column, pointing at the trash page
    num_pages = 1 + (batch - 1) * pages_per_seq
    perm = rng.permutation(np.arange(1, num_pages))  # pages scattered over the pool
    tables = np.zeros((batch, pages_per_seq), np.int32)
    for b, s in enumerate(seq_lens):
        n = -(-s // page_size)
        tables[b, :n] = perm[b * pages_per_seq: b * pages_per_seq + n]
    shape = (num_pages, kv_heads, page_size, head_dim)
    # Every page holds data, the trash page 0 too: a key read but not masked would show.
    k_pages = rng.standard_normal(shape).astype(np.float32)
    v_pages = rng.standard_normal(shape).astype(np.float32)
    q = rng.standard_normal((batch, q_len, group * kv_heads, head_dim)).astype(np.float32)
    q_pos = np.zeros((batch, q_len), np.int32)
    real = np.zeros((batch, q_len), bool)
    q_pos[0, :first] = np.arange(first)
    real[0, :first] = True
    for b in (1, 2, 3):
        q_pos[b] = np.arange(seq_lens[b] - q_len, seq_lens[b])
        real[b] = True
    q = q.astype(q_dtype)
    if kv_bits:
        (k_codes, k_sz), (v_codes, v_sz) = quantize(k_pages, kv_bits), quantize(v_pages, kv_bits)
        kv = PagedKV(k_codes, v_codes, k_sz, v_sz, kv_bits)
    else:
        kv = PagedKV(k_pages.astype(q_dtype), v_pages.astype(q_dtype))
    return (q, kv, tables, np.array(seq_lens, np.int32), q_pos), {"scale": head_dim**-0.5}, real


def dispatched(*args, interpret: bool, **kwargs):
    """The engine's dispatch point running this kernel, with the block sizes of the table."""
    with use_implementation("interpret" if interpret else "kernel"):
        return paged_attention(*args, **kwargs)


def run(fn, args, kwargs):
    """``fn(*args, **kwargs)`` as float32 numpy, jitted with the arrays as arguments and compiled with
    FAST_COMPILE."""
    arrays = (*args, {k: v for k, v in kwargs.items() if not isinstance(v, (int, float))})
    static = {k: v for k, v in kwargs.items() if isinstance(v, (int, float))}

    def call(*a):
        *positional, array_kwargs = a
        return fn(*positional, **array_kwargs, **static)

    compiled = jax.jit(call).lower(*arrays).compile(FAST_COMPILE)
    return np.asarray(compiled(*arrays).astype(jnp.float32))


def oracle(args, kwargs):
    return run(prefill_attention_reference, args, kwargs)


def check_real_rows(got, want, real, q_dtype):
    assert np.isfinite(got).all(), "padding rows and padding tokens must stay finite"
    tol = TOLERANCE[q_dtype]
    np.testing.assert_allclose(got[real], want[real], atol=tol, rtol=tol)


# Every (group, page size) pair; the KV format, head dim and sliding window alternate across them
# so that each format meets both head dims and both window settings, without the full product.
# float16 (models converted with --dtype float16) gets two cases of its own.
GRID = [
    (group, page_size, *KV_FORMATS[i % 6], (64, 128)[(i // 6) % 2], (None, 8)[(i + i // 6) % 2])
    for i, (group, page_size) in enumerate(itertools.product([1, 2, 3, 4, 8], [16, 32, 64]))
] + [(2, 16, "float16", 0, 64, 8), (8, 64, "float16", 4, 128, None)]


@pytest.mark.parametrize("group,page_size,q_dtype,kv_bits,head_dim,window", GRID)
def test_kernel_matches_reference(group, page_size, q_dtype, kv_bits, head_dim, window):
    rng = rng_for(group, page_size, q_dtype, kv_bits, head_dim, window)
    args, kwargs, real = make_chunk_case(rng, group=group, kv_heads=2, head_dim=head_dim, page_size=page_size,
                                         q_len=Q_LEN, q_dtype=q_dtype, kv_bits=kv_bits)
    kwargs["sliding_window"] = window
    got = run(dispatched, args, {**kwargs, "interpret": True})
    check_real_rows(got, oracle(args, kwargs), real, q_dtype)


@pytest.mark.parametrize("block_rows,pages_per_iteration", [(16, 1), (32, 2), (64, 4)])
def test_block_sizes_do_not_change_the_result(block_rows, pages_per_iteration):
    # group 3: row blocks of 16 and 32 start in the middle of a token's heads; with one page per
    # iteration the window's first page lies well inside the context; a first chunk of 5 tokens
    # leaves the last blocks of its row nothing but padding.
    rng = np.random.default_rng(7)
    args, kwargs, real = make_chunk_case(rng, group=3, kv_heads=1, head_dim=64, page_size=16, q_len=Q_LEN,
                                         q_dtype="float32", kv_bits=0, first_tokens=5)
    kwargs["sliding_window"] = 24
    got = run(prefill_attention_kernel, args, {
        **kwargs, "block_rows": block_rows, "pages_per_iteration": pages_per_iteration, "num_warps": 4,
        "num_stages": 2, "interpret": True,
    })
    check_real_rows(got, oracle(args, kwargs), real, "float32")


def test_first_chunk_of_one_token_with_a_sliding_window():
    # The token at position 0 shares its block only with padding rows (also position 0): the
    # window's start must still include page 0 for it.
    rng = np.random.default_rng(8)
    args, kwargs, real = make_chunk_case(rng, group=1, kv_heads=1, head_dim=64, page_size=16, q_len=Q_LEN,
                                         q_dtype="float32", kv_bits=0, first_tokens=1)
    kwargs["sliding_window"] = 4
    got = run(dispatched, args, {**kwargs, "interpret": True})
    check_real_rows(got, oracle(args, kwargs), real, "float32")
    kv, tables = args[1], args[2]
    np.testing.assert_allclose(got[0, 0, 0], kv.v[tables[0, 0], 0, 0], atol=1e-6)  # it sees key 0 alone


@pytest.mark.parametrize("group,page_size,q_dtype,kv_bits,head_dim,window", GRID[::2])
@pytest.mark.parametrize("q_len", [7, Q_LEN])
def test_reference_matches_paged_attention_reference(group, page_size, q_dtype, kv_bits, head_dim, window, q_len):
    # The oracle (dense softmax over gathered pages) and the engine's reference (online softmax,
    # a page per iteration) agree on every row, padding included.
    rng = rng_for(group, page_size, q_dtype, kv_bits, head_dim, window, q_len)
    args, kwargs, _ = make_chunk_case(rng, group=group, kv_heads=2, head_dim=head_dim, page_size=page_size,
                                      q_len=q_len, q_dtype=q_dtype, kv_bits=kv_bits)
    kwargs["sliding_window"] = window
    want = run(paged_attention_reference, args, kwargs)
    tol = TOLERANCE[q_dtype]
    np.testing.assert_allclose(oracle(args, kwargs), want, atol=tol, rtol=tol)


def test_bad_inputs_get_clear_errors():
    rng = np.random.default_rng(9)
    args, kwargs, _ = make_chunk_case(rng, group=2, kv_heads=2, head_dim=64, page_size=16, q_len=Q_LEN,
                                      q_dtype="float32", kv_bits=0)
    q, kv, tables, lens, q_pos = args
    qargs, qkwargs, _ = make_chunk_case(rng, group=2, kv_heads=2, head_dim=64, page_size=16, q_len=Q_LEN,
                                        q_dtype="float32", kv_bits=4)
    qkv = qargs[1]
    knobs = {"block_rows": 64, "pages_per_iteration": 1, "num_warps": 4, "num_stages": 2}

    def with_kv(a, **fields):
        """``a`` with fields of its pools replaced."""
        return (a[0], dataclasses.replace(a[1], **fields), *a[2:])

    cases = [
        ("multiple of kv heads", (q[:, :, :3], *args[1:]), kwargs),
        ("block_tables", (q, kv, tables[:1], lens, q_pos), kwargs),
        ("head_dim must be one of", (q[..., :32], PagedKV(kv.k[..., :32], kv.v[..., :32]), *args[2:]), kwargs),
        ("page_size must be one of", with_kv(args, k=kv.k[:, :, :8], v=kv.v[:, :, :8]), kwargs),
        ("float pages must have q's dtype", (q.astype(jnp.bfloat16), *args[1:]), kwargs),
        ("q must be float32, bfloat16 or float16", (q.astype(jnp.int32), *args[1:]), kwargs),
        ("sliding_window", args, {**kwargs, "sliding_window": 0}),
        ("kv.bits must be", with_kv(args, bits=2), kwargs),
        ("only for quantized pages", with_kv(args, k_scale_zero=qkv.k_scale_zero), kwargs),
        ("v_scale_zero is missing", with_kv(qargs, v_scale_zero=None), qkwargs),
        ("k_scale_zero must be float32", with_kv(qargs, k_scale_zero=qkv.k_scale_zero[..., :1]), qkwargs),
        ("uint8 codes", with_kv(qargs, k=qkv.k.astype(jnp.int8)), qkwargs),
    ]
    for message, a, kw in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            prefill_attention_kernel(*a, **kw, **knobs)
    for message, bad in [("block_rows", {"block_rows": 24}), ("pages_per_iteration", {"pages_per_iteration": 3})]:
        with pytest.raises(ValueError, match=message):
            prefill_attention_kernel(*args, **kwargs, **{**knobs, **bad})


# Lowering for CUDA, at serving shapes: a 512-token chunk over a 4096-token context (and 16-token
# chunks, whose row blocks are smaller), every KV format, head dim and page size; the group and
# the sliding window alternate.
LOWERING_GRID = [
    (512, (1, 2, 3, 4, 8)[i % 5], page_size, q_dtype, kv_bits, head_dim, (None, 1024)[i % 2])
    for i, ((q_dtype, kv_bits), head_dim, page_size) in enumerate(itertools.product(
        [("float32", 0), ("bfloat16", 0), ("bfloat16", 8), ("bfloat16", 4)], [64, 128], [16, 32, 64]))
] + [(16, 1, 16, "bfloat16", 0, 128, None), (16, 2, 32, "float32", 4, 64, 1024), (512, 4, 16, "float16", 0, 128, 1024),
       (512, 8, 32, "float16", 8, 64, None)]


@pytest.mark.parametrize("q_len,group,page_size,q_dtype,kv_bits,head_dim,window", LOWERING_GRID)
def test_lowers_to_triton_for_cuda(q_len, group, page_size, q_dtype, kv_bits, head_dim, window):
    batch, kv_heads, context = 1, 8, 4096
    pages_per_seq = context // page_size + 3  # block tables need not be a power of two wide
    num_pages = 1 + 4 * pages_per_seq
    stored = head_dim * kv_bits // 8 if kv_bits else head_dim
    pool = jax.ShapeDtypeStruct((num_pages, kv_heads, page_size, stored), jnp.uint8 if kv_bits else q_dtype)
    scale_zero = jax.ShapeDtypeStruct((num_pages, kv_heads, page_size, 2), jnp.float32) if kv_bits else None
    args = (
        jax.ShapeDtypeStruct((batch, q_len, group * kv_heads, head_dim), q_dtype),
        PagedKV(pool, pool, scale_zero, scale_zero, kv_bits),
        jax.ShapeDtypeStruct((batch, pages_per_seq), jnp.int32), jax.ShapeDtypeStruct((batch,), jnp.int32),
        jax.ShapeDtypeStruct((batch, q_len), jnp.int32),
    )

    def f(q, kv, tables, lens, pos):
        return dispatched(q, kv, tables, lens, pos, scale=head_dim**-0.5, sliding_window=window, interpret=False)

    text = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "xla.gpu.triton" in text
    # The grid shows the table's row block: (batch, kv heads, query rows / block_rows).
    blocks = prefill_attention_blocks(q_len * group, head_dim, page_size, kv_bits / 8 if kv_bits else
                                      jnp.dtype(q_dtype).itemsize)
    grid = tuple(int(g) for g in re.search(r"grid_x = (\d+).*?grid_y = (\d+).*?grid_z = (\d+)", text).groups())
    assert grid == (batch, kv_heads, -(-q_len * group // blocks.block_rows))
