"""Bit-level batch invariance of the model's own reductions, and of the engine where it is most
fragile: bfloat16 weights over bfloat16 KV pages, where a last-bit difference in a hidden state can
round a stored key or value the other way and change later tokens."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_models import build_tiny

from converters.loader import load_model
from jaxinfer import LLM, SamplingParams
from jaxinfer.model import RMSNorm


@pytest.mark.parametrize("hidden", [576, 64, 100])
def test_rms_norm_rows_do_not_depend_on_the_batch(hidden):
    """Each row normalized alone equals the same row inside decode batches and prefill chunks."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((64, 1, hidden)) * 3, jnp.float32)
    norm = RMSNorm(1e-5)
    params = norm.init(jax.random.key(0), x[:1])
    params = jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape), s.dtype), params)
    apply = jax.jit(norm.apply)
    alone = np.concatenate([np.asarray(apply(params, x[i:i + 1])) for i in range(64)])  # [64, 1, hidden]
    for batch in (2, 8, 16, 32, 64):  # decode buckets
        assert np.array_equal(np.asarray(apply(params, x[:batch])), alone[:batch]), batch
    for rows, length in ((1, 64), (4, 16), (2, 32)):  # prefill chunks [rows, length]
        got = np.asarray(apply(params, x.reshape(rows, length, hidden)))
        assert np.array_equal(got.reshape(64, 1, hidden), alone), (rows, length)


def test_bfloat16_pages_keep_greedy_tokens_batch_invariant(tmp_path):
    path = str(tmp_path / "tiny")
    build_tiny("llama", path, seed=6)
    llm = LLM(load_model(path, jnp.bfloat16, progress=False), warmup=False, progress=False, max_batch_size=8,
              max_prefill_tokens=64, cache_block_seq_len=16, cache_max_entry_count=128, kv_cache_dtype="bfloat16")
    assert {a.dtype for a in jax.tree.leaves(llm.engine.runner.cache)} == {jnp.dtype(jnp.bfloat16)}
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    rng = np.random.default_rng(7)
    prompts = [rng.integers(3, 256, size=int(n)).tolist() for n in (3, 17, 40, 9, 25, 60, 5, 33)]
    batched = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy)]
    alone = [llm.generate([p], greedy)[0].outputs[0].token_ids for p in prompts[:3]]
    assert batched[:3] == alone


def test_seeded_top_p_tokens_do_not_depend_on_the_batch(tmp_path):
    """A seeded top-p request (n=2, min_tokens banning a stop id) alone, in a decode batch of 2
    rows, and beside two greedy requests, in a batch of 4. At SmolLM2's vocabulary size XLA's own
    row sums in the sampler rounded differently in the two, which moved the top-p threshold across a
    token at the 6th token (found by a differential fuzz of async against synchronous scheduling)."""
    path = str(tmp_path / "tiny")
    build_tiny("llama", path, seed=5, num_hidden_layers=1, vocab_size=49152)
    llm = LLM(load_model(path, progress=False), warmup=False, progress=False, max_batch_size=4,
              max_prefill_tokens=32, cache_block_seq_len=8, cache_max_entry_count=20, session_len=96)
    prompt = [8218, 42353, 21030, 37854, 16474, 13588, 1130, 2292, 45306, 11628, 35933, 19315, 46852, 27241, 29493,
              26089, 6844, 19590, 30891, 32779, 33466, 10813, 29068, 32827, 33913, 14855]
    seeded = SamplingParams(temperature=0.8, top_p=0.5, seed=7635914116623244866, n=2, min_tokens=6, max_tokens=16)
    greedy = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    alone = llm.generate([prompt], seeded)[0].outputs
    crowd = llm.generate([prompt, [5, 6, 7], [8, 9, 10]], [seeded, greedy, greedy])[0].outputs
    assert [c.token_ids for c in crowd] == [c.token_ids for c in alone]
