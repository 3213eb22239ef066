"""The Pallas paged decode kernel: against the jnp reference in interpret mode on CPU, its split-K
merge, padding rows, input errors, CUDA lowering with the block sizes the table picks, dispatch."""

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import dispatch
from pallas_kernels.block_sizes import decode_attention_blocks
from pallas_kernels.paged_attention import paged_attention, paged_attention_reference, paged_decode_attention
from pallas_kernels.paged_kv import PagedKV, quantize_kv

# The kernel and the reference both softmax in float32 and merge in a different order; bf16
# outputs (and bf16 p in p @ V, as the reference casts it) differ by a few bf16 ulps (2**-8).
TOLERANCE = {jnp.float32: 2e-5, jnp.bfloat16: 1.5e-2}


def make_case(rng, seq_lens, heads, kv_heads, head_dim, page_size, kind, q_dtype=jnp.float32):
    """Pools with each sequence's pages scattered over them and a spare column of padding in the
    tables, for decode: q ``[batch, 1, heads, head_dim]`` at position seq_len - 1 (0 for padding
    rows). ``kind``: "f32" / "bf16" pools, or 8 / 4 for quantized pools (uint8 codes). Returns the
    positional arguments of the attention functions: [q, kv, block_tables, seq_lens, q_positions]."""
    pages_per_seq = max(-(-s // page_size) for s in seq_lens) + 1
    num_pages = 1 + len(seq_lens) * pages_per_seq  # page 0: the trash page padding points at
    perm = rng.permutation(np.arange(1, num_pages))
    tables = np.zeros((len(seq_lens), pages_per_seq), np.int32)
    for b, s in enumerate(seq_lens):
        n = -(-s // page_size)
        tables[b, :n] = perm[b * pages_per_seq: b * pages_per_seq + n]
    k, v = rng.standard_normal((2, num_pages, kv_heads, page_size, head_dim)).astype(np.float32)
    q = jnp.asarray(rng.standard_normal((len(seq_lens), 1, heads, head_dim)), q_dtype)
    positions = np.maximum(np.array(seq_lens, np.int32) - 1, 0)[:, None]
    if kind in (8, 4):
        (k_codes, k_sz), (v_codes, v_sz) = quantize_kv(k, kind), quantize_kv(v, kind)
        kv = PagedKV(k_codes, v_codes, k_sz, v_sz, kind)
    else:
        pool_dtype = jnp.bfloat16 if kind == "bf16" else jnp.float32
        kv = PagedKV(jnp.asarray(k, pool_dtype), jnp.asarray(v, pool_dtype))
    return [q, kv, tables, np.array(seq_lens, np.int32), positions]


def table_blocks(args):
    q, kv, tables = args[:3]
    blocks = decode_attention_blocks(batch=q.shape[0], kv_heads=kv.kv_heads, group=q.shape[2] // kv.kv_heads,
                                     page_size=kv.page_size, pages_per_seq=tables.shape[1])
    return dataclasses.asdict(blocks)


def run_kernel(args, window, **blocks):
    out = paged_decode_attention(*args, scale=args[0].shape[-1] ** -0.5, sliding_window=window, interpret=True,
                                 **(blocks or table_blocks(args)))
    return np.asarray(out.astype(jnp.float32))


def run_reference(args, window):
    out = paged_attention_reference(*args, scale=args[0].shape[-1] ** -0.5, sliding_window=window)
    return np.asarray(out.astype(jnp.float32))


# Every pool kind meets every page size; group, head dim, sliding window and KV heads cycle across
# them (head dim and window through all four combinations every four cases), and the quantized
# kinds alternate q between float32 and bf16.
GROUPS = [1, 2, 3, 4, 8]
GRID = [
    (kind, page_size, GROUPS[i % 5], (64, 128)[i % 2], (None, 40)[(i // 2) % 2], 1 + (i % 3 > 0),
     jnp.bfloat16 if kind == "bf16" or (kind in (8, 4) and i % 2) else jnp.float32)
    for i, (kind, page_size) in enumerate(itertools.product(["f32", "bf16", 8, 4], [16, 32, 64]))
]


@pytest.mark.parametrize("kind,page_size,group,head_dim,window,kv_heads,q_dtype", GRID)
def test_kernel_matches_reference(kind, page_size, group, head_dim, window, kv_heads, q_dtype):
    rng = np.random.default_rng(hash((str(kind), page_size, group, head_dim, window)) % 2**32)
    # one token; mid-page; a padding row; long enough for several splits at the table's choice
    seq_lens = [1, 2 * page_size + 5, 0, 1100]
    args = make_case(rng, seq_lens, group * kv_heads, kv_heads, head_dim, page_size, kind, q_dtype)
    blocks = table_blocks(args)
    assert -(-args[2].shape[1] // blocks["pages_per_split"]) >= 4  # the long row spans several splits
    got = run_kernel(args, window)
    assert np.isfinite(got).all()
    tol = TOLERANCE[q_dtype]
    np.testing.assert_allclose(got, run_reference(args, window), atol=tol, rtol=tol)


def test_split_k_merge_matches_a_single_split():
    """One split over the whole table and one split per inner step (48 splits) agree. The window
    leaves most of the 48 splits without any key (all of them for short rows): their partials must
    merge as nothing, not NaN, while ~19 splits of the long row merge real partials."""
    rng = np.random.default_rng(7)
    args = make_case(rng, [1500, 37, 700], 8, 2, 64, 16, "f32")
    window = 600
    width = args[2].shape[1]
    base = {"block_h": 16, "pages_per_iteration": 2, "num_warps": 4, "num_stages": 2}
    assert width == 95  # 94 pages + the spare column: 48 steps of 2 pages
    one = run_kernel(args, window, pages_per_split=96, **base)
    many = run_kernel(args, window, pages_per_split=2, **base)
    assert np.isfinite(many).all()
    np.testing.assert_allclose(many, one, atol=2e-6, rtol=2e-6)
    np.testing.assert_allclose(one, run_reference(args, window), atol=2e-5, rtol=2e-5)


def test_rows_that_see_no_key_give_finite_zeros_and_leave_other_rows_alone():
    """Padding rows (seq_len 0), and a query whose window starts past its context (position 24,
    seq_len 10, window 8: the reference sees no key either), give the reference's zeros."""
    rng = np.random.default_rng(3)
    args = make_case(rng, [0, 45, 0, 10], 6, 2, 64, 16, 8)
    args[4][3] = 24
    got = run_kernel(args, 8, block_h=16, pages_per_iteration=2, pages_per_split=2, num_warps=4, num_stages=2)
    np.testing.assert_array_equal(got[[0, 2, 3]], 0.0)  # zeros, not NaN
    alone = [a if i == 1 else a[1:2] for i, a in enumerate(args)]  # row 1 of all but the pools
    np.testing.assert_allclose(got[1:2], run_reference(alone, 8), atol=2e-5, rtol=2e-5)
    np.testing.assert_array_equal(run_reference(args, 8)[3], 0.0)


def test_bad_inputs_get_clear_errors():
    rng = np.random.default_rng(4)
    args = make_case(rng, [9, 30], 8, 2, 64, 16, "f32")
    q, kv, tables, lens, pos = args
    blocks = {"block_h": 16, "pages_per_iteration": 2, "pages_per_split": 2, "num_warps": 4, "num_stages": 2}

    def call(*a, **kw):
        paged_decode_attention(*a, **{"scale": 0.125, **blocks, **kw})

    with pytest.raises(ValueError, match="one query token"):
        call(jnp.concatenate([q, q], axis=1), kv, tables, lens, np.concatenate([pos, pos], axis=1))
    with pytest.raises(ValueError, match="multiple of kv heads"):
        call(q[:, :, :5], kv, tables, lens, pos)
    with pytest.raises(ValueError, match="block_h must be a power of two >= max"):
        call(*args, block_h=8)
    with pytest.raises(ValueError, match="pages_per_split .3. must be a multiple"):
        call(*args, pages_per_split=3)
    with pytest.raises(ValueError, match="pages_per_iteration must be a power of two"):
        call(*args, pages_per_iteration=3)
    with pytest.raises(ValueError, match="head_dim must be a power of two"):
        call(q[..., :48], PagedKV(kv.k[..., :48], kv.v[..., :48]), tables, lens, pos)
    with pytest.raises(ValueError, match="page_size must be a power of two"):
        call(q, PagedKV(kv.k[:, :, :12], kv.v[:, :, :12]), tables, lens, pos)
    with pytest.raises(ValueError, match="seq_lens must be int32"):
        call(q, kv, tables, lens.astype(np.int16), pos)
    with pytest.raises(ValueError, match=r"kv\.bits must be"):
        call(q, dataclasses.replace(kv, bits=3), tables, lens, pos)
    qq, qkv, *qrest = make_case(rng, [9, 30], 8, 2, 64, 16, 4)
    with pytest.raises(ValueError, match="need k_scale_zero float32"):
        call(qq, PagedKV(qkv.k, qkv.v, bits=4), *qrest)
    with pytest.raises(ValueError, match="need v_scale_zero float32"):
        call(qq, dataclasses.replace(qkv, v_scale_zero=qkv.v_scale_zero[..., :1]), *qrest)


def test_table_splits_long_tables_for_small_batches_only():
    one = decode_attention_blocks(batch=1, kv_heads=8, group=4, page_size=16, pages_per_seq=256)
    full = decode_attention_blocks(batch=64, kv_heads=8, group=4, page_size=16, pages_per_seq=256)
    assert 256 // one.pages_per_split >= 8 and full.pages_per_split >= 256
    for b in (one, full):
        assert b.block_h == 16 and b.pages_per_split % b.pages_per_iteration == 0
    assert decode_attention_blocks(batch=1, kv_heads=1, group=3, page_size=64, pages_per_seq=1).pages_per_split == 1


# Every pool kind at every head dim and page size, for a table as wide as 4096 tokens; the group
# cycles through 1..8 and the batch through sizes that give many splits, a few, or one.
LOWERING = [
    (kind, head_dim, page_size, GROUPS[i % 5], (1, 8, 64)[i % 3])
    for i, (kind, head_dim, page_size) in enumerate(itertools.product(["f32", "bf16", 8, 4], [64, 128], [16, 32, 64]))
]


@pytest.mark.parametrize("kind,head_dim,page_size,group,batch", LOWERING)
def test_dispatch_lowers_the_kernel_for_cuda(kind, head_dim, page_size, group, batch):
    kv_heads, pages_per_seq = 2, 4096 // page_size
    num_pages = batch * pages_per_seq + 1
    bits = kind if kind in (8, 4) else 0
    q_dtype = jnp.bfloat16 if kind == "bf16" else jnp.float32
    pool = jax.ShapeDtypeStruct((num_pages, kv_heads, page_size, head_dim * (bits or 8) // 8),
                                jnp.uint8 if bits else q_dtype)
    scale_zero = jax.ShapeDtypeStruct((num_pages, kv_heads, page_size, 2), jnp.float32) if bits else None
    args = [jax.ShapeDtypeStruct((batch, 1, group * kv_heads, head_dim), q_dtype),
            PagedKV(pool, pool, scale_zero, scale_zero, bits),
            jax.ShapeDtypeStruct((batch, pages_per_seq), jnp.int32), jax.ShapeDtypeStruct((batch,), jnp.int32),
            jax.ShapeDtypeStruct((batch, 1), jnp.int32)]

    def f(*a):
        return paged_attention(*a, scale=head_dim**-0.5, sliding_window=(None, 512)[batch % 2])

    with dispatch.use_implementation("kernel"):
        text = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "xla.gpu.triton" in text


def test_dispatch_runs_the_decode_kernel_for_decode_and_the_prefill_kernel_for_chunks():
    rng = np.random.default_rng(5)
    args = make_case(rng, [3, 40], 8, 2, 64, 16, 4)

    def jaxpr(a, impl):
        with dispatch.use_implementation(impl):
            return str(jax.make_jaxpr(lambda *x: paged_attention(*x, scale=0.125))(*a))

    assert "pallas_call" in jaxpr(args, "interpret")
    assert "pallas_call" in jaxpr(args, "kernel")
    assert "pallas_call" not in jaxpr(args, "reference")
    chunk = [jnp.concatenate([args[0]] * 2, axis=1), *args[1:4], np.concatenate([args[4] - 1, args[4]], axis=1)]
    assert "name=paged_decode_attention" in jaxpr(args, "interpret")
    assert "name=prefill_attention" in jaxpr(chunk, "interpret")
    assert "pallas_call" not in jaxpr(chunk, "reference")
    with dispatch.use_implementation("interpret"):
        got = np.asarray(paged_attention(*args, scale=0.125))
    np.testing.assert_allclose(got, run_reference(args, None), atol=2e-5, rtol=2e-5)
