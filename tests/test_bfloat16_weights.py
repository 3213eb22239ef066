"""bfloat16 weights under float32 activations, the CPU's bfloat16 mode (``config.activation_dtype``).

* ``model._dot``: a 1- or 2-row product gives bitwise the rows a larger one gives (XLA:CPU's
  bfloat16 dot rounds differently below 3 rows unless padded), and matches float32 math on the
  rounded operands;
* the model against HF ``transformers`` whose weights are rounded to bfloat16 the same way;
* the engine: a float32 KV cache, the same greedy tokens alone and in a mixed batch, nothing
  compiled after warm-up.
"""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from tiny_models import build_tiny

from converters.loader import load_model
from jaxinfer import LLM, SamplingParams
from jaxinfer import model as model_module
from jaxinfer.compilation import compilation_count
from jaxinfer.scoring import sequence_logits
from pallas_kernels import bf16_matmul

ROWS = 16


@pytest.fixture(scope="module")
def operands():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((ROWS, 96)).astype(np.float32)
    w = jnp.asarray(rng.standard_normal((96, 160)) * 0.1, jnp.bfloat16)
    return x, w


def narrow_dot(x, w):
    # Op by op, not jitted: jit's trace cache would keep the padding a monkeypatched test removes.
    return np.asarray(model_module._dot(jnp.asarray(x), w, 0))


@pytest.mark.parametrize("rows", [1, 2, 3, 5])
def test_few_rows_give_the_rows_of_a_larger_product(operands, rows):
    x, w = operands
    assert np.array_equal(narrow_dot(x[:rows], w), narrow_dot(x, w)[:rows])


def test_unpadded_one_row_products_differ(operands, monkeypatch):
    """Why the padding exists: without it, a single row takes XLA:CPU's other path."""
    x, w = operands
    monkeypatch.setattr(bf16_matmul, "MIN_NARROW_DOT_ROWS", 1)
    full = narrow_dot(x, w)
    assert any(not np.array_equal(narrow_dot(x[i:i + 1], w), full[i:i + 1]) for i in range(ROWS))


def test_matches_float32_math_on_rounded_operands(operands):
    x, w = operands
    y = narrow_dot(x[:3, None, :], w)  # leading axes are kept
    assert y.shape == (3, 1, 160) and y.dtype == np.float32
    rounded = np.asarray(jnp.asarray(x[:3], jnp.bfloat16).astype(jnp.float32)) @ np.asarray(w.astype(jnp.float32))
    np.testing.assert_allclose(y[:, 0], rounded, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tiny_llama_bf16"))
    hf = build_tiny("llama", path, seed=3)
    return path, hf


def test_logits_match_transformers_with_rounded_weights(tiny):
    path, hf = tiny
    rounded = copy.deepcopy(hf)
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.to(torch.bfloat16).to(torch.float32))
    ours = load_model(path, jnp.bfloat16, progress=False)
    assert {a.dtype for a in jax.tree.leaves(ours.params)} == {jnp.dtype(jnp.bfloat16)}
    prompts = [list(range(5, 22)), list(range(40, 43))]
    logits = sequence_logits(ours.config, ours.params, prompts, ours.dtype)
    for ids, got in zip(prompts, logits):
        with torch.no_grad():
            want = rounded(torch.tensor([ids])).logits[0].numpy()
            exact = hf(torch.tensor([ids])).logits[0].numpy()
        assert got.dtype == np.float32
        # Activations are rounded to bfloat16 inside each matmul, so agreement is to bfloat16's
        # precision, and closer to the rounded weights' model than to the float32 one.
        err = np.abs(got - want).max()
        assert err < 2e-2 * np.abs(want).max(), err
        assert err < np.abs(got - exact).max()


def test_engine_batch_invariance_and_no_compiles(tiny):
    path, _ = tiny
    llm = LLM(load_model(path, jnp.bfloat16, progress=False), progress=False, max_batch_size=4,
              max_prefill_tokens=32, cache_block_seq_len=16, cache_max_entry_count=64)
    assert {a.dtype for a in jax.tree.leaves(llm.engine.runner.cache)} == {jnp.dtype(jnp.bfloat16)}  # auto
    greedy = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    rng = np.random.default_rng(5)
    prompts = [rng.integers(3, 256, size=int(n)).tolist() for n in (2, 9, 37, 60)]
    before = compilation_count()
    batched = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy)]
    alone = [llm.generate([p], greedy)[0].outputs[0].token_ids for p in prompts]
    assert batched == alone
    assert compilation_count() == before
