"""The CPU's float32 matmul over packed weights (``pallas_kernels.f32_matmul``) against its XLA
reference and against float64, and the engine with float32 weights packed for it.

The kernel tests need a CPU with AVX-512 or AVX2 and a C++ compiler (this project's machines have
them) and are skipped elsewhere; the packing tests run anywhere. What both
matmul kernels promise (batch independence, NaNs, dispatch, refusals) is in ``test_cpu_matmuls.py``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_models import build_tiny

from converters.loader import load_model
from jaxinfer import LLM, SamplingParams
from jaxinfer.home import jaxinfer_home
from pallas_kernels import cpu_native, dispatch, f32_matmul

needs_kernel = pytest.mark.skipif(not cpu_native.runs_here("f32_matmul"), reason="the CPU has neither AVX-512 nor AVX2")

# (M, K, N): decode rows, SmolLM2's projections, prefill chunks past a work item's 48 rows;
# N off the 16-column blocks and the 4-block panels, M off the 6-row register tiles.
SHAPES = [(1, 576, 960), (2, 64, 64), (7, 576, 1536), (16, 1536, 576), (17, 96, 200), (100, 33, 100),
          (3, 7, 5), (1, 1, 1)]


def operands(m, k, n, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((k, n)) * 0.1, jnp.float32)
    return x, w


@pytest.fixture(scope="module")
def enabled():
    if not cpu_native.enable(f"{jaxinfer_home()}/native").f32_matmul:
        pytest.fail("the CPU runs the kernel but it could not be built or enabled (see the log)")


@pytest.mark.parametrize("k,n", [(576, 960), (33, 100), (7, 5), (1, 1)])
def test_pack_round_trip(k, n):
    _, w = operands(1, k, n)
    packed = f32_matmul.pack(w)
    assert packed.shape == (-(-n // 16), k, 16) and packed.dtype == jnp.float32
    assert np.array_equal(np.asarray(f32_matmul.unpack(packed, n)), np.asarray(w))
    assert not np.asarray(packed).transpose(1, 0, 2).reshape(k, -1)[:, n:].any()  # zero padded columns


@needs_kernel
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_kernel_matches_reference_and_float64(enabled, m, k, n):
    x, w = operands(m, k, n)
    packed = f32_matmul.pack(w)
    got = np.asarray(jax.jit(f32_matmul.f32_matmul_kernel, static_argnums=2)(x, packed, n))
    want = np.asarray(jax.jit(f32_matmul.f32_matmul_reference, static_argnums=2)(x, packed, n))
    exact = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
    # A chain of k float32 FMAs is off the exact sum by at most ~k ulps of the terms' magnitude.
    bound = k * np.finfo(np.float32).eps * (np.abs(np.asarray(x, np.float64)) @ np.abs(np.asarray(w, np.float64)))
    assert np.all(np.abs(got - exact) <= bound + 1e-30)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_engine_packs_weights_and_gives_the_xla_dots_tokens(tmp_path):
    # Tied: the LM head is the packed transpose of the embedding; an untied head is one more linear
    # (test_cpu_matmuls.py checks it is packed as the others).
    path = str(tmp_path / "tiny")
    build_tiny("llama_tied", path, seed=5)
    # warmup=False: only the shapes these prompts need are compiled, for both engines alike.
    options = dict(progress=False, warmup=False, max_batch_size=4, max_prefill_tokens=32, cache_block_seq_len=16,
                   cache_max_entry_count=64)
    greedy = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=0)
    prompts = [list(range(3, 40)), [5, 6, 7], list(range(100, 120))]

    def run(llm):
        outs = [o.outputs[0] for o in llm.generate(prompts, greedy)]
        return [o.token_ids for o in outs], np.array([[lp.logprob for lp in o.logprobs] for o in outs])

    with dispatch.use_implementation("reference"):
        xla = LLM(load_model(path, jnp.float32, progress=False), **options)
        want, want_lp = run(xla)
    assert xla.engine.runner.matmul_kernel is None
    packed = LLM(load_model(path, jnp.float32, progress=False), **options)
    assert packed.engine.runner.matmul_kernel == "f32_matmul"
    leaves = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(packed.engine.runner.params)[0]]
    assert any("f32_kernel" in p for p in leaves) and not any("'kernel'" in p for p in leaves)
    assert "f32_lm_head" in packed.engine.runner.params
    got, got_lp = run(packed)
    assert got == want
    np.testing.assert_allclose(got_lp, want_lp, atol=1e-4)
