"""The CPU decoder-layer kernel (``pallas_kernels/decoder_layer_cpu.cc``) against its jnp reference
over a grid of shapes. Needs AVX-512 or AVX2 (this project's machines have one); skipped elsewhere."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_paged_attention_cpu import shuffled_block_tables

from jaxinfer.home import jaxinfer_home
from pallas_kernels import cpu_native
from pallas_kernels.decoder_layer_cpu import (LayerShape, LayerWeights, StepTokens, decoder_layer_cpu,
                                              decoder_layer_reference)
from pallas_kernels.f32_matmul import pack
from pallas_kernels.paged_kv import PagedKV

pytestmark = pytest.mark.skipif(not cpu_native.runs_here("decoder_layer"), reason="no build of the kernels for this CPU")


@pytest.fixture(scope="module", autouse=True)
def enabled():
    if not cpu_native.enable(f"{jaxinfer_home()}/native").decoder_layer:
        pytest.fail("the CPU runs the kernel but it could not be built (see the log)")


def make_case(rng, heads, kv_heads, head_dim, embed, inter, page_size, lens, bias, num_pages=48, q_len=1):
    """Random weights, a shuffled pool, each row's ``q_len`` new tokens at the last positions below
    ``lens`` (a decode step, or a prefill chunk; a padding row, length 0, writes to the trash page 0,
    as do a short row's padding tokens)."""
    q_dim, kv_dim = heads * head_dim, kv_heads * head_dim

    def weight(k, n):
        return pack(jnp.asarray(rng.standard_normal((k, n)).astype(np.float32) / np.sqrt(k)))

    w = LayerWeights(
        input_norm=jnp.asarray(1 + 0.1 * rng.standard_normal(embed), jnp.float32),
        qkv=weight(embed, q_dim + 2 * kv_dim),
        qkv_bias=jnp.asarray(rng.standard_normal(q_dim + 2 * kv_dim), jnp.float32) if bias else None,
        o=weight(q_dim, embed),
        post_norm=jnp.asarray(1 + 0.1 * rng.standard_normal(embed), jnp.float32),
        gate=weight(embed, inter), up=weight(embed, inter), down=weight(inter, embed),
    )
    shape = (num_pages, kv_heads, page_size, head_dim)
    kv = PagedKV(jnp.asarray(rng.standard_normal(shape), jnp.float32), jnp.asarray(rng.standard_normal(shape), jnp.float32))
    tables = shuffled_block_tables(rng, lens, page_size, num_pages)
    slots = np.zeros((len(lens), q_len), np.int32)
    positions = np.zeros((len(lens), q_len), np.int32)
    for row, n in enumerate(lens):
        for i, t in enumerate(range(max(n - q_len, 0), n)):
            slots[row, i] = tables[row, t // page_size] * page_size + t % page_size
            positions[row, i] = t
    angles = positions[..., None] * (10000.0 ** (-np.arange(0, head_dim, 2) / head_dim))
    tokens = StepTokens(slots=jnp.asarray(slots), block_tables=jnp.asarray(tables),
                        seq_lens=jnp.asarray(lens, jnp.int32), positions=jnp.asarray(positions),
                        cos=jnp.asarray(np.cos(angles), jnp.float32), sin=jnp.asarray(np.sin(angles), jnp.float32))
    x = jnp.asarray(rng.standard_normal((len(lens), q_len, embed)), jnp.float32)
    return x, w, kv, tokens


# (heads, kv_heads, head_dim, embed, intermediate, page_size, context lengths (0: a padding row),
# sliding window, q/k/v bias)
CASES = [
    (9, 3, 64, 576, 1536, 64, [200], None, False),  # SmolLM2's layer at batch 1
    (9, 3, 64, 576, 1536, 64, [1, 64, 65, 0, 300], None, False),
    (4, 2, 16, 72, 100, 16, [9, 30, 0], None, True),  # widths off the vector and the panels
    (4, 4, 80, 40, 24, 16, [17, 33, 5, 1, 2, 3, 4, 8, 9], None, False),  # more rows than one register tile
    (8, 2, 16, 64, 96, 16, [40, 30, 3], 8, False),
    (4, 2, 32, 64, 96, 16, [300, 20], 150, False),  # a window of 150 keys in a longer context
]


@pytest.mark.parametrize("q_len", [1, 7])  # a decode step; prefill chunks (a 3-token row has padding)
@pytest.mark.parametrize("heads,kv_heads,head_dim,embed,inter,page_size,lens,window,bias", CASES)
def test_kernel_matches_reference(heads, kv_heads, head_dim, embed, inter, page_size, lens, window, bias, q_len):
    x, w, kv, rows = make_case(np.random.default_rng(embed + len(lens)), heads, kv_heads, head_dim, embed, inter,
                               page_size, lens, bias, q_len=q_len)
    shape = LayerShape(heads=heads, eps=1e-5, scale=head_dim**-0.5, sliding_window=window)
    want_x, want_kv = jax.jit(decoder_layer_reference, static_argnums=4)(x, w, kv, rows, shape)
    got_x, got_kv = jax.jit(decoder_layer_cpu, static_argnums=4)(x, w, kv, rows, shape)
    np.testing.assert_allclose(np.asarray(got_x), np.asarray(want_x), rtol=2e-5, atol=2e-5)
    written = np.zeros(kv.k.shape[0] * kv.k.shape[2], bool)
    written[np.asarray(rows.slots).reshape(-1)] = True
    written = written.reshape(kv.k.shape[0], 1, kv.k.shape[2], 1)
    for got, want, before in ((got_kv.k, want_kv.k, kv.k), (got_kv.v, want_kv.v, kv.v)):
        got, want, before = (np.asarray(a)[1:] for a in (got, want, before))  # the trash page 0 holds garbage
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        # Nothing but the new tokens' rows changed.
        np.testing.assert_array_equal(np.where(written[1:], 0, got), np.where(written[1:], 0, before))


def test_rows_do_not_depend_on_the_batch():
    """A row's result is the same bits alone as in a batch of five (batch invariance)."""
    x, w, kv, rows = make_case(np.random.default_rng(0), 9, 3, 64, 576, 1536, 64, [1, 64, 65, 0, 300], False)
    shape = LayerShape(heads=9, eps=1e-5, scale=0.125)
    layer = jax.jit(decoder_layer_cpu, static_argnums=4)
    batch_x, _ = layer(x, w, kv, rows, shape)
    for row in (0, 2, 4):
        alone = StepTokens(*(a[row:row + 1] for a in dataclasses.astuple(rows)))
        one_x, _ = layer(x[row:row + 1], w, kv, alone, shape)
        np.testing.assert_array_equal(np.asarray(one_x)[0], np.asarray(batch_x)[row])


def test_a_token_computes_alike_in_a_prefill_chunk_and_a_decode_step():
    """The last token of a 7-token chunk is the same bits as that token decoded alone after the
    chunk's K/V were written: what a preempted sequence's recomputation relies on."""
    x, w, kv, rows = make_case(np.random.default_rng(2), 9, 3, 64, 576, 1536, 64, [100, 70], False, q_len=7)
    shape = LayerShape(heads=9, eps=1e-5, scale=0.125)
    layer = jax.jit(decoder_layer_cpu, static_argnums=4)
    chunk_x, chunk_kv = layer(x, w, kv, rows, shape)
    last = dataclasses.replace(rows, slots=rows.slots[:, -1:], positions=rows.positions[:, -1:],
                               cos=rows.cos[:, -1:], sin=rows.sin[:, -1:])
    decoded_x, _ = layer(x[:, -1:], w, chunk_kv, last, shape)
    np.testing.assert_array_equal(np.asarray(decoded_x)[:, 0], np.asarray(chunk_x)[:, -1])


def test_pools_are_updated_in_place_when_donated():
    x, w, kv, rows = make_case(np.random.default_rng(1), 4, 2, 16, 72, 100, 16, [9, 30], False)
    shape = LayerShape(heads=4, eps=1e-5, scale=0.25)
    layer = jax.jit(decoder_layer_cpu, static_argnums=4, donate_argnums=2)
    pointer = kv.k.unsafe_buffer_pointer()
    _, kv = layer(x, w, kv, rows, shape)
    assert kv.k.unsafe_buffer_pointer() == pointer


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """family -> a tiny HF model's directory: llama, qwen2 (q/k/v bias) and qwen3 (q/k norms)."""
    from tiny_models import build_tiny

    out = {}
    for family in ("llama", "qwen2", "qwen3"):
        out[family] = str(tmp_path_factory.mktemp(family))
        build_tiny(family, out[family])
    return out


def run_engine(path, monkeypatch, off=()):
    """Greedy tokens and logprobs of a batch of prompts through an engine built (and traced) with
    the CPU kernels ``off`` turned off, and how many layers of the steps it traced called the kernel."""
    from converters.loader import load_model
    from jaxinfer import model
    from jaxinfer.llm import LLM
    from jaxinfer.sampling_params import SamplingParams

    calls = [0]

    def counted(*args, _f=decoder_layer_cpu, **kwargs):
        calls[0] += 1
        return _f(*args, **kwargs)

    monkeypatch.setattr(model, "decoder_layer_cpu", counted)
    prompts = [list(range(3, 40)), [5, 9, 11], list(range(60, 80))]
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=3)
    with cpu_native.turned_off(*off):
        llm = LLM(load_model(path, np.float32, progress=False), warmup=False, progress=False, max_batch_size=4,
                  max_prefill_tokens=16, cache_block_seq_len=16)
        outputs = llm.generate(prompts, greedy)
    tokens = [o.outputs[0].token_ids for o in outputs]
    logprobs = [[entry.logprob for entry in o.outputs[0].logprobs] for o in outputs]
    return tokens, np.array(logprobs), calls[0]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_engine_runs_through_the_kernel_as_through_separate_ops(tiny_dirs, family, monkeypatch):
    tokens, logprobs, calls = run_engine(tiny_dirs[family], monkeypatch)
    assert calls > 0
    separate_tokens, separate_logprobs, separate_calls = run_engine(tiny_dirs[family], monkeypatch, ("decoder_layer",))
    assert separate_calls == 0
    assert tokens == separate_tokens
    np.testing.assert_allclose(logprobs, separate_logprobs, atol=2e-4)


def test_layers_the_kernel_does_not_cover_run_as_separate_ops(tiny_dirs, monkeypatch):
    tokens, _, calls = run_engine(tiny_dirs["qwen3"], monkeypatch)  # q/k norms
    assert calls == 0 and len(tokens[0]) == 12
