"""The Pallas W4A16 (and W8A16) dequant-matmul kernel: interpret mode against the jnp reference,
input validation, the dispatch point, and lowering for CUDA (Triton) at real model shapes."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend.core import ClosedJaxpr, Jaxpr

from pallas_kernels.block_sizes import int4_matmul_blocks
from pallas_kernels.dispatch import use_implementation
from pallas_kernels.int4_matmul import (
    int4_matmul,
    int4_matmul_kernel,
    int4_matmul_reference,
    pack_int4,
    padded_rows,
)

# Kernel and reference dequantize alike and both accumulate in float32; they differ only in the
# order of the float32 sums, then round once to x's dtype. float32: 1e-5 relative, plus 2e-6 of
# the largest output for outputs near zero. bfloat16: one bf16 ulp (2^-7 relative), plus 2e-3 of
# the largest output.
TOLERANCES = {jnp.float32: dict(rtol=1e-5, atol_of_max=2e-6), jnp.bfloat16: dict(rtol=2**-7, atol_of_max=2e-3)}


def make_weight(rng, n_in, n_out, group, dtype, bits):
    """(qweight, scales, biases) of a random ``[n_in, n_out]`` weight: every code, scale and bias
    differs, so that reading a wrong one shows in the output."""
    rows = padded_rows(n_in, group)
    if bits == 4:
        qweight = pack_int4(rng.integers(0, 16, size=(rows, n_out)).astype(np.uint8))
    else:
        qweight = rng.integers(-128, 128, size=(rows, n_out)).astype(np.int8)
    scales = rng.uniform(0.5, 1.5, size=(rows // group, n_out)) * (0.4 if bits == 4 else 0.025)
    biases = rng.normal(0.0, 0.5, size=(rows // group, n_out))
    return jnp.asarray(qweight), jnp.asarray(scales, dtype), jnp.asarray(biases, dtype)


def assert_close(got, want, dtype):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    tol = TOLERANCES[dtype]
    np.testing.assert_allclose(got, want, rtol=tol["rtol"], atol=tol["atol_of_max"] * np.abs(want).max())


def run_kernel(x, qweight, scales, biases, blocks):
    """The kernel in interpret mode with ``blocks`` (an ``Int4MatmulBlocks``)."""
    return int4_matmul_kernel(
        x, qweight, scales, biases, block_m=blocks.block_m, block_n=blocks.block_n, block_k=blocks.block_k,
        num_warps=blocks.num_warps, num_stages=blocks.num_stages, interpret=True,
    )


MS = [1, 5, 16, 33, 256]  # decode, a few rows, one full 16-row tile, just past a tile, a prefill chunk
KS = [576, 256, 1536]  # SmolLM2's hidden (not a multiple of 128: padded codes), a small one, its MLP
NS = [576, 1000, 64]  # not a multiple of 128; not a multiple of any block; narrower than a block
GROUPS = [32, 64, 128]

# Every (M, K) pair once; group and N run along two orthogonal Latin squares over it, so each group
# and each N meets every K, x's dtype alternates, and every fifth case uses 8-bit codes.
GRID = [
    (m, k, NS[(ki + 2 * mi) % 3], GROUPS[(ki + mi) % 3], (jnp.float32, jnp.bfloat16)[i % 2], 8 if i % 5 == 4 else 4)
    for i, ((mi, m), (ki, k)) in enumerate(itertools.product(enumerate(MS), enumerate(KS)))
]


@pytest.mark.parametrize("m,k,n,group,dtype,bits", GRID)
def test_kernel_matches_reference(m, k, n, group, dtype, bits):
    rng = np.random.default_rng(hash((m, k, n, group, bits)) % 2**32)
    qweight, scales, biases = make_weight(rng, k, n, group, dtype, bits)
    x = jnp.asarray(rng.standard_normal((m, k)), dtype)
    blocks = int4_matmul_blocks(m, padded_rows(k, group))
    got = run_kernel(x, qweight, scales, biases, blocks)
    assert got.shape == (m, n) and got.dtype == dtype
    assert_close(got, int4_matmul_reference(x, qweight, scales, biases), dtype)


@pytest.mark.parametrize(
    "block_m,block_n,block_k,group",
    [
        (16, 16, 16, 128),  # the smallest tiles: eight K steps inside one group
        (32, 32, 256, 32),  # a K step spanning eight groups
        (64, 128, 32, 64),  # M and N both a single edge tile
    ],
)
def test_kernel_block_sizes_beyond_the_table(block_m, block_n, block_k, group):
    rng = np.random.default_rng(block_k + group)
    qweight, scales, biases = make_weight(rng, 512, 96, group, jnp.float32, 4)
    x = jnp.asarray(rng.standard_normal((2, 11, 512)), jnp.float32)  # leading dims flatten to 22 rows
    got = int4_matmul_kernel(x, qweight, scales, biases, block_m=block_m, block_n=block_n, block_k=block_k,
                             num_warps=4, num_stages=2, interpret=True)
    assert got.shape == (2, 11, 96)
    assert_close(got, int4_matmul_reference(x, qweight, scales, biases), jnp.float32)


def test_padding_rows_of_the_codes_do_not_leak_into_the_output():
    """Codes past ``in`` (576 -> 640 in groups of 128) may hold anything: the kernel must multiply
    them by zero activations, never by whatever lies past the end of x's row in memory."""
    rng = np.random.default_rng(7)
    qweight, scales, biases = make_weight(rng, 576, 64, 128, jnp.float32, 4)
    x = jnp.asarray(rng.standard_normal((3, 576)), jnp.float32)
    blocks = int4_matmul_blocks(3, 640)
    clean = run_kernel(x, qweight, scales, biases, blocks)
    garbage = qweight.at[576 // 8 :].set(jnp.uint32(0xFFFFFFFF))
    np.testing.assert_array_equal(np.asarray(run_kernel(x, garbage, scales, biases * 1e6, blocks)),
                                  np.asarray(run_kernel(x, qweight, scales, biases * 1e6, blocks)))
    assert_close(clean, int4_matmul_reference(x, qweight, scales, biases), jnp.float32)


def test_bad_inputs_get_clear_errors():
    rng = np.random.default_rng(3)
    qweight, scales, biases = make_weight(rng, 576, 64, 64, jnp.float32, 4)
    x = jnp.ones((2, 576), jnp.float32)
    good = dict(block_m=16, block_n=64, block_k=64, num_warps=4, num_stages=3, interpret=True)
    kernel = functools.partial(int4_matmul_kernel, x, qweight, scales, biases)
    with pytest.raises(ValueError, match="block_n must be a power of two"):
        kernel(**{**good, "block_n": 48})
    with pytest.raises(ValueError, match="block_m must be a power of two >= 16"):
        kernel(**{**good, "block_m": 8})
    with pytest.raises(ValueError, match=r"block_k \(128\) must divide the 576 rows"):
        kernel(**{**good, "block_k": 128})
    with pytest.raises(ValueError, match="input channels"):
        int4_matmul_kernel(x[:, :500], qweight, scales, biases, **good)
    with pytest.raises(ValueError, match="uint32 .4-bit. or int8"):
        int4_matmul_kernel(x, qweight.astype(jnp.int32), scales, biases, **good)
    with pytest.raises(ValueError, match="floating-point"):
        int4_matmul_kernel(x.astype(jnp.int32), qweight, scales, biases, **good)
    six_groups = jnp.ones((6, 64), jnp.float32)  # 576 rows in groups of 96
    with pytest.raises(ValueError, match="power-of-two group size, got 96"):
        int4_matmul_kernel(x, qweight, six_groups, six_groups, **{**good, "block_k": 32})


def pallas_calls(jaxpr):
    """The pallas_call equations anywhere in ``jaxpr`` (inside jit and other nested jaxprs too)."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            yield eqn
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                if isinstance(sub, ClosedJaxpr):
                    yield from pallas_calls(sub.jaxpr)
                elif isinstance(sub, Jaxpr):
                    yield from pallas_calls(sub)


def test_dispatch_point_picks_kernel_or_reference():
    rng = np.random.default_rng(4)
    qweight, scales, biases = make_weight(rng, 576, 1536, 128, jnp.float32, 4)
    x = jnp.asarray(rng.standard_normal((2, 3, 576)), jnp.float32)
    args = (x, qweight, scales, biases)
    want = int4_matmul_reference(*args)
    for name, calls in (("reference", []), ("interpret", [True]), ("kernel", [False])):
        with use_implementation(name):
            # a fresh function per block: JAX reuses the trace of one it has seen with these shapes
            jaxpr = jax.make_jaxpr(lambda *a: int4_matmul(*a))(*args).jaxpr
            assert [eqn.params["interpret"] for eqn in pallas_calls(jaxpr)] == calls, name
            if name != "kernel":  # "kernel" needs a GPU to run
                assert_close(int4_matmul(*args), want, jnp.float32)
    assert jax.default_backend() == "cpu"
    assert not list(pallas_calls(jax.make_jaxpr(lambda *a: int4_matmul(*a))(*args).jaxpr))  # "auto" on CPU


# (in, out) of real layers: SmolLM2's up/gate and down projections, a 7B's up/gate and down.
LAYERS = [(576, 1536), (1536, 576), (4096, 11008), (11008, 4096)]
LOWERING_MS = [1, 16, 32, 64, 100, 256]  # every row of the block table; 100: a partial tile, 256: two


@pytest.mark.parametrize("n_in,n_out", LAYERS)
@pytest.mark.parametrize("group,bits", [(128, 4), (32, 4), (128, 8)])
def test_lowers_for_cuda_with_the_tables_blocks(n_in, n_out, group, bits):
    rows = padded_rows(n_in, group)
    code = jax.ShapeDtypeStruct((rows // 8, n_out), jnp.uint32) if bits == 4 else jax.ShapeDtypeStruct(
        (rows, n_out), jnp.int8)
    groups = jax.ShapeDtypeStruct((rows // group, n_out), jnp.bfloat16)
    with use_implementation("kernel"):
        for m in LOWERING_MS:
            # decode as the engine calls it, [batch, 1, in]; prefill as one row of a chunk
            x = jax.ShapeDtypeStruct((m, 1, n_in) if m <= 16 else (1, m, n_in), jnp.bfloat16)
            lowered = jax.jit(lambda *a: int4_matmul(*a)).trace(x, code, groups, groups).lower(
                lowering_platforms=("cuda",))
            text = lowered.as_text()
            assert "xla.gpu.triton" in text, (m, n_in, n_out)

