"""The CPU's bfloat16-weight matmuls (``pallas_kernels.bf16_matmul``: the AMX kernel and the
AVX512_BF16 one) against their XLA reference, and the engine with weights packed for them.

Each kernel's tests need a CPU that runs it (AMX; AVX512_BF16) and a C++ compiler and are skipped
elsewhere; the packing tests run anywhere. What all CPU matmul kernels promise (batch
independence, NaNs, dispatch, refusals) is in ``test_cpu_matmuls.py``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_models import build_tiny

from converters.loader import load_model
from jaxinfer import LLM, SamplingParams
from jaxinfer.home import jaxinfer_home
from pallas_kernels import bf16_matmul, cpu_native, dispatch

needs_amx = pytest.mark.skipif(not cpu_native.runs_here("amx_matmul"), reason="the CPU has no AMX")
needs_avx512bf16 = pytest.mark.skipif(not cpu_native.runs_here("avx512bf16_matmul"),
                                      reason="the CPU has no AVX512_BF16")

# (M, K, N): decode rows, SmolLM2's projections, prefill chunks; K and N off the tile sizes.
SHAPES = [(1, 576, 960), (4, 64, 64), (16, 576, 1536), (17, 96, 200), (32, 1536, 576), (70, 33, 100),
          (3, 7, 5)]


def operands(m, k, n, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((k, n)) * 0.1, jnp.bfloat16)
    return x, w


def enabled(kernel: str):
    if not getattr(cpu_native.enable(f"{jaxinfer_home()}/native"), kernel):
        pytest.fail(f"the CPU runs {kernel} but it could not be built or enabled (see the log)")


@pytest.mark.parametrize("k,n", [(576, 960), (33, 100), (7, 5), (1, 1)])
def test_pack_round_trip(k, n):
    _, w = operands(1, k, n)
    packed = bf16_matmul.pack(w)
    assert packed.shape == (-(-n // 16), -(-k // 32) * 16, 32) and packed.dtype == jnp.bfloat16
    assert np.array_equal(np.asarray(bf16_matmul.unpack(packed, k, n)), np.asarray(w))


@needs_amx
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_amx_kernel_matches_reference(m, k, n):
    enabled("amx_matmul")
    x, w = operands(m, k, n)
    packed = bf16_matmul.pack(w)
    got = np.asarray(jax.jit(bf16_matmul.amx_matmul_kernel, static_argnums=2)(x, packed, n))
    want = np.asarray(jax.jit(bf16_matmul.bf16_matmul_reference, static_argnums=2)(x, packed, n))
    if k >= bf16_matmul.TILE_K:  # the same products summed in the same order as XLA's AMX dot
        assert np.array_equal(got, want)
    else:  # XLA takes another path for tiny dots
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@needs_avx512bf16
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_avx512bf16_kernel_matches_reference_and_float64(m, k, n):
    """Its products are exact (bfloat16 x bfloat16 fits float32) and summed in one chain over K,
    so it is within ~K float32 ulps of the exact sum of the rounded operands, as XLA's dot is."""
    enabled("avx512bf16_matmul")
    x, w = operands(m, k, n)
    packed = bf16_matmul.pack(w)
    got = np.asarray(jax.jit(bf16_matmul.avx512bf16_matmul_kernel, static_argnums=2)(x, packed, n))
    want = np.asarray(jax.jit(bf16_matmul.bf16_matmul_reference, static_argnums=2)(x, packed, n))
    xr = np.asarray(x.astype(jnp.bfloat16), np.float64)
    wr = np.asarray(w, np.float64)
    exact = xr @ wr
    bound = k * np.finfo(np.float32).eps * (np.abs(xr) @ np.abs(wr))
    assert np.all(np.abs(got - exact) <= bound + 1e-30)
    assert np.all(np.abs(got - want) <= 2 * bound + 1e-30)


def rounding_cases(m, k, seed=0):
    """x whose rounding to bfloat16 is delicate: exact ties (to even, both ways), values just off
    them, subnormals, magnitudes near float32's limits; random signs."""
    rng = np.random.default_rng(seed)
    base = rng.choice(np.array([1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-8 + 2**-20, 1 + 2**-9, 1.5, 1e-39, 3e-41,
                                3.3e38, 1.2e-38, 7.0], np.float32), size=(m, k))
    return jnp.asarray(base * rng.choice(np.array([-1, 1], np.float32), size=(m, k)))


@pytest.mark.parametrize("kernel", [pytest.param("amx_matmul", marks=needs_amx),
                                    pytest.param("avx512bf16_matmul", marks=needs_avx512bf16)])
def test_input_rounding_is_xlas(kernel):
    """The kernels round x to bfloat16 themselves, 16 values at a time; through an identity weight
    any difference from XLA's convert (ties, the tail of a row) shows in the products."""
    enabled(kernel)
    m, k = 5, 67  # 67: a masked tail of 3 values after four full vectors, and an odd pair
    x = rounding_cases(m, k)
    eye = jnp.eye(k, 96, dtype=jnp.bfloat16)
    got = np.asarray(getattr(bf16_matmul, f"{kernel}_kernel")(x, bf16_matmul.pack(eye), 96))
    want = np.asarray(bf16_matmul.bf16_matmul_reference(x, bf16_matmul.pack(eye), 96))
    normal = np.abs(np.asarray(x)) >= np.finfo(np.float32).tiny  # both flush subnormal products
    assert np.array_equal(got[:, :k][normal], want[:, :k][normal])
    rounded = np.asarray(x.astype(jnp.bfloat16).astype(jnp.float32))
    assert np.array_equal(got[:, :k][normal], rounded[normal])


@pytest.mark.skipif(not (cpu_native.runs_here("amx_matmul") or cpu_native.runs_here("avx512bf16_matmul")),
                    reason="the CPU has neither AMX nor AVX512_BF16")
def test_engine_packs_weights_and_gives_the_xla_dots_tokens(tmp_path):
    # Tied: the LM head is the packed transpose of the embedding; an untied head is one more linear
    # (test_cpu_matmuls.py checks it is packed as the others).
    path = str(tmp_path / "tiny")
    build_tiny("llama_tied", path, seed=4)
    options = dict(progress=False, max_batch_size=4, max_prefill_tokens=32, cache_block_seq_len=16,
                   cache_max_entry_count=64)
    greedy = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    prompts = [list(range(3, 40)), [5, 6, 7], list(range(100, 120))]

    def tokens(llm):
        return [o.outputs[0].token_ids for o in llm.generate(prompts, greedy)]

    with dispatch.use_implementation("reference"):  # compiling only the shapes these prompts need
        xla = LLM(load_model(path, jnp.bfloat16, progress=False), **options, warmup=False)
        want = tokens(xla)
    assert xla.engine.runner.matmul_kernel is None
    packed = LLM(load_model(path, jnp.bfloat16, progress=False), **options)
    assert packed.engine.runner.matmul_kernel == "bf16_matmul"
    kernels = jax.tree_util.tree_flatten_with_path(packed.engine.runner.params)[0]
    assert any("bf16_kernel" in jax.tree_util.keystr(p) for p, _ in kernels)
    assert not any("'kernel'" in jax.tree_util.keystr(p) for p, _ in kernels)
    assert "bf16_lm_head" in packed.engine.runner.params
    assert tokens(packed) == want
    again = LLM(load_model(path, jnp.bfloat16, progress=False), **options)  # steps saved by the first
    assert tokens(again) == want
