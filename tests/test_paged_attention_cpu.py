"""The CPU paged attention kernel (``pallas_kernels/paged_attention_cpu.cc``) against the jnp
reference over a grid of shapes, and the dispatch point's choice. Needs AVX-512 or AVX2 (this
project's machines have one); skipped elsewhere."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.home import jaxinfer_home
from pallas_kernels import cpu_native, dispatch
from pallas_kernels.paged_attention_cpu import paged_attention_cpu
from pallas_kernels.paged_attention import paged_attention, paged_attention_reference
from pallas_kernels.paged_kv import PagedKV

pytestmark = pytest.mark.skipif(not cpu_native.runs_here("paged_attention"), reason="no build of the kernels for this CPU")


@pytest.fixture(scope="module", autouse=True)
def enabled():
    if not cpu_native.enable(f"{jaxinfer_home()}/native").paged_attention:
        pytest.fail("the CPU runs the kernel but it could not be built (see the log)")


def shuffled_block_tables(rng, lens, page_size: int, num_pages: int) -> np.ndarray:
    """``[len(lens), pages]`` block tables over a shuffled pool: each sequence's pages drawn from
    pages 1 .. num_pages - 1 in random order, padded with the trash page 0 (one column more than
    the longest sequence needs)."""
    pages_per_seq = max(1, max(-(-n // page_size) for n in lens)) + 1
    ids = rng.permutation(np.arange(1, num_pages))
    tables = np.zeros((len(lens), pages_per_seq), np.int32)
    used = 0
    for row, n in enumerate(lens):
        count = -(-n // page_size)
        tables[row, :count] = ids[used:used + count]
        used += count
    return tables


def make_case(rng, heads, kv_heads, head_dim, page_size, lens, num_pages=64, pages=jnp.float32, q_len=1):
    """Scattered pages (a shuffled pool) of dtype ``pages``, block tables padded with the trash page
    0; each sequence's last ``q_len`` positions queried (a decode step, or a prefill chunk)."""
    k = rng.standard_normal((num_pages, kv_heads, page_size, head_dim)).astype(np.float32)
    v = rng.standard_normal((num_pages, kv_heads, page_size, head_dim)).astype(np.float32)
    tables = shuffled_block_tables(rng, lens, page_size, num_pages)
    q = rng.standard_normal((len(lens), q_len, heads, head_dim)).astype(np.float32)
    lens = np.asarray(lens, np.int32)
    q_pos = np.maximum(lens[:, None] - q_len + np.arange(q_len), 0).astype(np.int32)
    kv = PagedKV(jnp.asarray(k, pages), jnp.asarray(v, pages))
    return jnp.asarray(q), kv, jnp.asarray(tables), jnp.asarray(lens), jnp.asarray(q_pos)


# (heads, kv_heads, head_dim, page_size, context lengths (0: a padding row), sliding window)
CASES = [
    (9, 3, 64, 64, [1, 64, 65, 200], None),  # SmolLM2's heads
    (8, 2, 16, 16, [9, 30, 0], None),
    (4, 4, 80, 16, [17, 33, 5], None),  # head_dim off the vector width, no grouping
    (2, 1, 128, 32, [100], None),
    (8, 2, 16, 16, [40, 30, 3], 8),
]


@pytest.mark.parametrize("q_len", [1, 7, 40])  # decode; prefill chunks within and across row blocks
@pytest.mark.parametrize("pages", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,head_dim,page_size,lens,window", CASES)
def test_kernel_matches_reference(heads, kv_heads, head_dim, page_size, lens, window, pages, q_len):
    args = make_case(np.random.default_rng(len(lens) + head_dim), heads, kv_heads, head_dim, page_size, lens,
                     pages=pages, q_len=q_len)
    got = np.asarray(jax.jit(lambda *a: paged_attention_cpu(*a, scale=0.125, sliding_window=window))(*args))
    want = np.asarray(paged_attention_reference(*args, scale=0.125, sliding_window=window))
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-6)
    assert not got[np.asarray(args[3]) == 0].any()  # padding rows give zeros


def test_a_sequence_alone_gives_its_rows_in_a_batch():
    q, kv, tables, lens, q_pos = make_case(np.random.default_rng(3), 9, 3, 64, 64, [70, 5, 190, 64])
    full = np.asarray(paged_attention_cpu(q, kv, tables, lens, q_pos, scale=0.125))
    for i in range(4):
        alone = paged_attention_cpu(q[i:i + 1], kv, tables[i:i + 1], lens[i:i + 1], q_pos[i:i + 1], scale=0.125)
        assert np.array_equal(np.asarray(alone), full[i:i + 1])


def test_dispatch_point_runs_the_kernel_for_float_pages_only():
    rng = np.random.default_rng(4)

    def lowered(q_len, bits=0, pages=jnp.float32):
        q, kv, tables, lens, q_pos = make_case(rng, 8, 2, 16, 16, [9, 30], pages=pages)
        if q_len > 1:
            q = jnp.repeat(q, q_len, axis=1)
            q_pos = jnp.stack([lens - q_len + i for i in range(q_len)], axis=1)
        if bits:
            codes = jnp.zeros(kv.k.shape, jnp.uint8)
            sz = jnp.ones((*kv.k.shape[:3], 2), jnp.float32)
            kv = PagedKV(codes, codes, bits=8, k_scale_zero=sz, v_scale_zero=sz)
        args = (q, kv, tables, lens, q_pos)
        return jax.jit(lambda *a: paged_attention(*a, scale=0.25)).lower(*args).as_text()

    assert cpu_native.PAGED_ATTENTION in lowered(1)
    assert cpu_native.PAGED_ATTENTION in lowered(1, pages=jnp.bfloat16)
    assert cpu_native.PAGED_ATTENTION not in lowered(1, pages=jnp.float16)  # other dtypes: the reference
    assert cpu_native.PAGED_ATTENTION in lowered(4)  # prefill chunks too
    assert cpu_native.PAGED_ATTENTION not in lowered(1, bits=8)  # quantized pages: the reference
    with dispatch.use_implementation("reference"):
        assert cpu_native.PAGED_ATTENTION not in lowered(1)
    with cpu_native.turned_off("paged_attention"):
        assert cpu_native.PAGED_ATTENTION not in lowered(1)
    assert cpu_native.PAGED_ATTENTION in lowered(1)
    with pytest.raises(ValueError, match="unknown CPU kernels"):
        with cpu_native.turned_off("attention"):
            pass
