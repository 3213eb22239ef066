"""The paged-attention reference against plain dense attention on contiguous K/V (numpy)."""

import itertools

import jax
import numpy as np
import pytest

from pallas_kernels import dispatch
from pallas_kernels.paged_attention import paged_attention, paged_attention_reference
from pallas_kernels.paged_kv import PagedKV


def dense_attention(q, k, v, q_pos, seq_len, window):
    """q [q_len, heads, d]; k, v [seq_len, kv_heads, d] contiguous -> [q_len, heads, d] (float64)."""
    heads, kv_heads = q.shape[1], k.shape[1]
    k = np.repeat(k, heads // kv_heads, axis=1).astype(np.float64)
    v = np.repeat(v, heads // kv_heads, axis=1).astype(np.float64)
    s = np.einsum("qhd,khd->hqk", q.astype(np.float64), k) / np.sqrt(q.shape[-1])
    key = np.arange(seq_len)[None, :]
    visible = key <= q_pos[:, None]
    if window is not None:
        visible &= key > q_pos[:, None] - window
    s = np.where(visible[None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("hqk,khd->qhd", p, v)


def make_case(rng, batch, q_len, heads, kv_heads, head_dim, page_size, seq_lens):
    pages_per_seq = max(-(-s // page_size) for s in seq_lens) + 1  # one spare column of padding
    num_pages = 1 + batch * pages_per_seq
    perm = rng.permutation(np.arange(1, num_pages))  # pages scattered over the pool
    tables = np.zeros((batch, pages_per_seq), np.int32)
    k_pages = rng.standard_normal((num_pages, kv_heads, page_size, head_dim)).astype(np.float32)
    v_pages = rng.standard_normal((num_pages, kv_heads, page_size, head_dim)).astype(np.float32)
    for b, s in enumerate(seq_lens):
        n = -(-s // page_size)
        tables[b, :n] = perm[b * pages_per_seq : b * pages_per_seq + n]
    q = rng.standard_normal((batch, q_len, heads, head_dim)).astype(np.float32)
    q_pos = np.stack([np.arange(s - q_len, s) for s in seq_lens]).astype(np.int32)
    return q, k_pages, v_pages, tables, np.array(seq_lens, np.int32), q_pos


def contiguous(pages, table, seq_len):
    """[seq_len, kv_heads, head_dim] of one sequence, from its pages [pages, kv_heads, page_size, head_dim]."""
    return pages[table].transpose(0, 2, 1, 3).reshape(-1, *pages.shape[1::2])[:seq_len]


# Every (heads, page size, q_len) combination; head dim and sliding window alternate across them
# so that each value meets every other axis at least once without the full product's cost.
GRID = [
    (heads_kv, (16, 64)[i % 2], page_size, q_len, (None, 10)[(i // 2) % 2])
    for i, (heads_kv, page_size, q_len) in enumerate(itertools.product(
        [(4, 4), (8, 2), (9, 3), (8, 1)],  # (heads, kv_heads): MHA, GQA 4, GQA 3, MQA
        [16, 32, 64],  # page_size
        [1, 7],  # q_len: decode, and a prefill chunk
    ))
]


@pytest.mark.parametrize("heads_kv,head_dim,page_size,q_len,window", GRID)
def test_reference_matches_dense_attention(heads_kv, head_dim, page_size, q_len, window):
    heads, kv_heads = heads_kv
    rng = np.random.default_rng(hash((heads, head_dim, page_size, q_len, window)) % 2**32)
    # lengths that end mid-page, exactly on a page boundary, and span several pages
    seq_lens = [q_len + 3, page_size, 2 * page_size + 5]
    q, kp, vp, tables, lens, q_pos = make_case(rng, 3, q_len, heads, kv_heads, head_dim, page_size, seq_lens)
    for per_iter in (1, 2):  # one page per loop iteration, or two read together (transposed)
        out = np.asarray(paged_attention_reference(q, PagedKV(kp, vp), tables, lens, q_pos, scale=head_dim**-0.5,
                                                   sliding_window=window, pages_per_iteration=per_iter))
        for b, s in enumerate(seq_lens):
            want = dense_attention(q[b], contiguous(kp, tables[b], s), contiguous(vp, tables[b], s), q_pos[b], s, window)
            np.testing.assert_allclose(out[b], want, atol=2e-5, rtol=2e-5)


def test_padding_rows_are_finite_and_do_not_disturb_others():
    rng = np.random.default_rng(0)
    q, kp, vp, tables, lens, q_pos = make_case(rng, 2, 1, 4, 2, 16, 16, [5, 20])
    lens_padded = lens.copy()
    lens_padded[1] = 0  # row 1 becomes a padding row
    kv = PagedKV(kp, vp)
    out = np.asarray(paged_attention_reference(q, kv, tables, lens_padded, q_pos, scale=0.25))
    assert np.isfinite(out).all()
    alone = np.asarray(paged_attention_reference(q[:1], kv, tables[:1], lens[:1], q_pos[:1], scale=0.25))
    np.testing.assert_allclose(out[0], alone[0], atol=1e-6)


def test_dispatch_point_runs_the_reference_on_cpu():
    """Unless jaxinfer's CPU kernels are on (tests/test_paged_attention_cpu.py)."""
    rng = np.random.default_rng(1)
    q, kp, vp, *rest = make_case(rng, 2, 1, 8, 2, 16, 16, [9, 30])
    args = (q, PagedKV(kp, vp), *rest)
    assert jax.default_backend() == "cpu"
    with dispatch.use_implementation("reference"):
        got = paged_attention(*args, scale=0.25)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(paged_attention_reference(*args, scale=0.25)))


def test_bad_shapes_get_clear_errors():
    rng = np.random.default_rng(2)
    q, kp, vp, tables, lens, q_pos = make_case(rng, 2, 1, 8, 2, 16, 16, [9, 30])
    kv = PagedKV(kp, vp)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        paged_attention_reference(q[:, :, :5], kv, tables, lens, q_pos, scale=1.0)
    with pytest.raises(ValueError, match="block_tables"):
        paged_attention_reference(q, kv, tables[:1], lens, q_pos, scale=1.0)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_pages_attend_like_their_dequantized_values(bits):
    from pallas_kernels.paged_kv import dequantize_kv, quantize_kv

    rng = np.random.default_rng(5)
    q, kp, vp, tables, lens, q_pos = make_case(rng, 2, 3, 8, 2, 16, 16, [7, 35])
    k_codes, k_sz = quantize_kv(kp, bits)
    v_codes, v_sz = quantize_kv(vp, bits)
    got = paged_attention_reference(q, PagedKV(k_codes, v_codes, k_sz, v_sz, bits), tables, lens, q_pos, scale=0.25)
    dequantized = PagedKV(dequantize_kv(k_codes, k_sz, bits), dequantize_kv(v_codes, v_sz, bits))
    want = paged_attention_reference(q, dequantized, tables, lens, q_pos, scale=0.25)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
    with pytest.raises(ValueError, match="k_scale_zero"):
        paged_attention_reference(q, PagedKV(k_codes, v_codes, bits=bits), tables, lens, q_pos, scale=0.25)
