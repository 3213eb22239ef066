"""The engine reaches the Pallas kernels only through the dispatch points, and they agree with it.

The whole engine (chunked prefill with earlier context in pages, batched decode, int4 linears,
int8/int4 KV pages) runs once with the jnp references and once with every kernel under Pallas'
interpreter: the same greedy tokens, close logprobs.
"""

import dataclasses

import jax
import numpy as np
import pytest
from tiny_models import build_tiny

from converters.awq import quantize_params
from converters.loader import load_model
from jaxinfer.llm import LLM
from jaxinfer.sampling_params import SamplingParams
from pallas_kernels import dispatch, int4_matmul, paged_attention

# (module whose dispatch point calls it, kernel entry)
KERNELS = [(int4_matmul, "int4_matmul_kernel"), (paged_attention, "paged_decode_attention"),
           (paged_attention, "prefill_attention_kernel")]

# head_dim 64 and two query heads per KV head: shapes the kernels are built for.
TINY = dict(hidden_size=128, intermediate_size=256, num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=2)


@pytest.fixture(scope="module")
def int4_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("kernels") / "m"
    build_tiny("llama", str(path), **TINY)
    m = load_model(str(path), np.float32)
    params, config = quantize_params(jax.tree.map(np.asarray, m.params), m.config, 4, 32, "rtn", progress=False)
    return dataclasses.replace(m, config=config, params=jax.tree.map(jax.numpy.asarray, params))


def count_kernel_calls(monkeypatch) -> dict[str, int]:
    """Wrap each kernel entry where its dispatch point looks it up; counts calls while tracing."""
    calls = {}
    for module, name in KERNELS:
        calls[name] = 0

        def counted(*args, _f=getattr(module, name), _name=name, **kwargs):
            calls[_name] += 1
            return _f(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)
    return calls


@pytest.mark.parametrize("quant_policy", [0, 4])
def test_engine_with_interpreted_kernels_matches_the_references(int4_model, quant_policy, monkeypatch):
    # A 40-token prompt in chunks of 16 (the later chunks attend to pages written by earlier
    # steps) beside a short one, decoded together in one batch.
    prompts = [list(range(3, 43)), [7, 7, 9, 11]]
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=2)
    options = dict(warmup=False, progress=False, max_batch_size=2, max_prefill_tokens=16, cache_block_seq_len=16,
                   cache_max_entry_count=16, quant_policy=quant_policy)
    calls = count_kernel_calls(monkeypatch)
    runs = {}
    for impl in ("reference", "interpret"):
        with dispatch.use_implementation(impl):
            # The engine is built, and so its step traced, inside the block.
            outs = LLM(int4_model, **options).generate(prompts, greedy)
        if impl == "reference":
            assert not any(calls.values()), calls
        runs[impl] = [(o.outputs[0].token_ids, [lp for step in o.outputs[0].logprobs for _, lp in step.top])
                      for o in outs]
    for (ref_tokens, ref_lps), (k_tokens, k_lps) in zip(runs["reference"], runs["interpret"]):
        assert k_tokens == ref_tokens
        np.testing.assert_allclose(k_lps, ref_lps, atol=2e-3)
    assert all(calls.values()), f"kernels never traced: {calls}"
