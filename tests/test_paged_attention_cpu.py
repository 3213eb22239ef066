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
from pallas_kernels.paged_kv import PagedKV, quantize_kv

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
    """Scattered pages (a shuffled pool) of dtype ``pages`` (or ``"int8"``, ``"int4"``: quantized),
    block tables padded with the trash page 0; each sequence's last ``q_len`` positions queried (a
    decode step, or a prefill chunk)."""
    k = rng.standard_normal((num_pages, kv_heads, page_size, head_dim)).astype(np.float32)
    v = rng.standard_normal((num_pages, kv_heads, page_size, head_dim)).astype(np.float32)
    tables = shuffled_block_tables(rng, lens, page_size, num_pages)
    q = rng.standard_normal((len(lens), q_len, heads, head_dim)).astype(np.float32)
    lens = np.asarray(lens, np.int32)
    q_pos = np.maximum(lens[:, None] - q_len + np.arange(q_len), 0).astype(np.int32)
    if pages in ("int8", "int4"):
        bits = int(pages[3:])
        (k, k_sz), (v, v_sz) = quantize_kv(jnp.asarray(k), bits), quantize_kv(jnp.asarray(v), bits)
        kv = PagedKV(k, v, k_sz, v_sz, bits=bits)
    else:
        kv = PagedKV(jnp.asarray(k, pages), jnp.asarray(v, pages))
    return jnp.asarray(q), kv, jnp.asarray(tables), jnp.asarray(lens), jnp.asarray(q_pos)


# (heads, kv_heads, head_dim, page_size, context lengths (0: a padding row), sliding window)
CASES = [
    (9, 3, 64, 64, [1, 64, 65, 200], None),  # SmolLM2's heads
    (8, 2, 16, 16, [9, 30, 0], None),
    (4, 4, 80, 16, [17, 33, 5], None),  # head_dim off the vector width, no grouping
    (2, 1, 128, 32, [100], None),
    (8, 2, 16, 16, [40, 30, 3], 8),
    # Enough sequences for decode's runs of several (sequence, KV head) pairs, each fetching the
    # next one's rows: runs cross sequences, padding rows and a sequence of one token.
    (4, 2, 32, 16, [0, 1, 5, 17, 33, 40, 2, 16, 31, 0, 9, 25, 12, 3, 48, 7], None),
]


@pytest.mark.parametrize("q_len", [1, 7, 40])  # decode; prefill chunks within and across row blocks
@pytest.mark.parametrize("pages", [jnp.float32, jnp.bfloat16, "int8", "int4"])
@pytest.mark.parametrize("heads,kv_heads,head_dim,page_size,lens,window", CASES)
def test_kernel_matches_reference(heads, kv_heads, head_dim, page_size, lens, window, pages, q_len):
    args = make_case(np.random.default_rng(len(lens) + head_dim), heads, kv_heads, head_dim, page_size, lens,
                     pages=pages, q_len=q_len)
    got = np.asarray(jax.jit(lambda *a: paged_attention_cpu(*a, scale=0.125, sliding_window=window))(*args))
    want = np.asarray(paged_attention_reference(*args, scale=0.125, sliding_window=window))
    assert np.isfinite(got).all()
    # Quantized keys' scores are scale * (q . codes) + zero * sum(q): float32 terms that cancel
    # where the reference sums dequantized values, a few ulps of those terms apart (and far below
    # the quantization error itself).
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 if isinstance(pages, str) else 2e-6)
    assert not got[np.asarray(args[3]) == 0].any()  # padding rows give zeros


@pytest.mark.parametrize("pages", [jnp.float32, "int8", "int4"])
def test_a_sequence_alone_gives_its_rows_in_a_batch(pages):
    # 16 sequences: a decode step's pairs are shared out in runs of several (one alone is one).
    lens = [70, 5, 190, 64, 1, 0, 130, 33, 64, 65, 2, 100, 17, 0, 128, 9]
    q, kv, tables, lens, q_pos = make_case(np.random.default_rng(3), 9, 3, 64, 64, lens, pages=pages)
    full = np.asarray(paged_attention_cpu(q, kv, tables, lens, q_pos, scale=0.125))
    for i in (0, 1, 2, 3, 9, 15):
        alone = paged_attention_cpu(q[i:i + 1], kv, tables[i:i + 1], lens[i:i + 1], q_pos[i:i + 1], scale=0.125)
        assert np.array_equal(np.asarray(alone), full[i:i + 1])


def test_quantized_pages_need_their_scales():
    q, kv, tables, lens, q_pos = make_case(np.random.default_rng(5), 8, 2, 16, 16, [9, 30], pages="int8")
    with pytest.raises(ValueError, match="int8 or int4 pages"):
        paged_attention_cpu(q, PagedKV(kv.k, kv.v, bits=8), tables, lens, q_pos, scale=0.25)


def test_dispatch_point_runs_the_kernel_where_it_applies():
    rng = np.random.default_rng(4)

    def lowered(q_len, pages=jnp.float32):
        q, kv, tables, lens, q_pos = make_case(rng, 8, 2, 16, 16, [9, 30], pages=pages)
        if q_len > 1:
            q = jnp.repeat(q, q_len, axis=1)
            q_pos = jnp.stack([lens - q_len + i for i in range(q_len)], axis=1)
        args = (q, kv, tables, lens, q_pos)
        return jax.jit(lambda *a: paged_attention(*a, scale=0.25)).lower(*args).as_text()

    def target(text):  # which kernel the step calls, if any
        return next((t for t in (cpu_native.PAGED_ATTENTION_QUANTIZED, cpu_native.PAGED_ATTENTION)
                     if f"@{t}(" in text), None)

    assert target(lowered(1)) == cpu_native.PAGED_ATTENTION
    assert target(lowered(1, pages=jnp.bfloat16)) == cpu_native.PAGED_ATTENTION
    assert target(lowered(1, pages=jnp.float16)) is None  # other dtypes: the reference
    assert target(lowered(4)) == cpu_native.PAGED_ATTENTION  # prefill chunks too
    assert target(lowered(1, pages="int8")) == cpu_native.PAGED_ATTENTION_QUANTIZED
    assert target(lowered(4, pages="int4")) == cpu_native.PAGED_ATTENTION_QUANTIZED
    with dispatch.use_implementation("reference"):
        assert target(lowered(1)) is None
    with cpu_native.turned_off("paged_attention"):
        assert target(lowered(1)) is None
        assert target(lowered(1, pages="int8")) == cpu_native.PAGED_ATTENTION_QUANTIZED
    with cpu_native.turned_off("paged_attention_quantized"):
        assert target(lowered(1, pages="int8")) is None
        assert target(lowered(1)) == cpu_native.PAGED_ATTENTION
    with pytest.raises(ValueError, match="unknown CPU kernels"):
        with cpu_native.turned_off("attention"):
            pass


def test_engine_on_quantized_pages_runs_the_kernel_as_the_reference(tmp_path, monkeypatch):
    """An engine on int4 pages gives the same greedy tokens through the kernel as through the
    reference, prefill chunks included, with logprobs to float32 rounding. Int4 only: int8 pages
    take the same path through the engine, and the grid above checks both formats in the kernel."""
    from converters.loader import load_model
    from jaxinfer.llm import LLM
    from jaxinfer.sampling_params import SamplingParams
    from pallas_kernels import paged_attention as paged_attention_module, paged_attention_cpu as module
    from tiny_models import build_tiny

    build_tiny("llama", str(tmp_path))
    loaded = load_model(str(tmp_path), np.float32, progress=False)
    calls = {"kernel": 0, "reference": 0}  # traced calls

    def counting(name, f):
        def counted(*args, **kwargs):
            calls[name] += 1
            return f(*args, **kwargs)
        return counted

    monkeypatch.setattr(module, "paged_attention_cpu", counting("kernel", module.paged_attention_cpu))
    monkeypatch.setattr(paged_attention_module, "paged_attention_reference",
                        counting("reference", paged_attention_module.paged_attention_reference))
    prompts = [list(range(3, 40)), [5, 9, 11], list(range(60, 80))]
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=3)
    results = []
    for off in ((), ("paged_attention_quantized",)):
        calls.update(kernel=0, reference=0)
        with cpu_native.turned_off(*off):
            llm = LLM(loaded, warmup=False, progress=False, max_batch_size=4, max_prefill_tokens=16,
                      cache_block_seq_len=16, quant_policy=4)
            outs = llm.generate(prompts, greedy)
        results.append(([o.outputs[0].token_ids for o in outs],
                        np.array([[e.logprob for e in o.outputs[0].logprobs] for o in outs]), dict(calls)))
    (tokens, logprobs, kernel_calls), (ref_tokens, ref_logprobs, ref_calls) = results
    # Both engines traced their steps (none loaded the other's from $JAXINFER_HOME/exported_steps).
    assert kernel_calls["kernel"] > 0 and kernel_calls["reference"] == 0
    assert ref_calls["kernel"] == 0 and ref_calls["reference"] > 0
    assert tokens == ref_tokens
    np.testing.assert_allclose(logprobs, ref_logprobs, atol=1e-4)
