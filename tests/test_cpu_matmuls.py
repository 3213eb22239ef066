"""What every CPU matmul kernel over packed weights promises (``pallas_kernels.bf16_matmul``'s AMX
and AVX512_BF16 kernels, ``pallas_kernels.f32_matmul``): a row's result does not depend on the
batch, a NaN stays in its row, the dispatch point runs the kernel unless an implementation is
forced (or a preferred kernel is on), and weights packed for another shape are refused. Each
kernel's own numerics are tested beside it (``test_bf16_matmul.py``, ``test_f32_matmul.py``)."""

from dataclasses import dataclass
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.config import ModelConfig
from jaxinfer.home import jaxinfer_home
from jaxinfer.model import CPU_MATMULS, init_params, pack_cpu_weights
from pallas_kernels import bf16_matmul, cpu_native, dispatch, f32_matmul


@dataclass(frozen=True)
class Kernel:
    name: str  # the CpuKernels field
    weight_dtype: object
    pack: Callable
    kernel: Callable  # (x, packed, n) -> y, the FFI call
    matmul: Callable  # the dispatch point
    target: str
    runs_here: bool
    preferred: tuple[str, ...] = ()  # kernels the dispatch point picks first when they are on


KERNELS = [
    Kernel("amx_matmul", jnp.bfloat16, bf16_matmul.pack, bf16_matmul.amx_matmul_kernel, bf16_matmul.bf16_matmul,
           cpu_native.AMX_MATMUL, cpu_native.runs_here("amx_matmul")),
    Kernel("avx512bf16_matmul", jnp.bfloat16, bf16_matmul.pack, bf16_matmul.avx512bf16_matmul_kernel,
           bf16_matmul.bf16_matmul, cpu_native.AVX512BF16_MATMUL, cpu_native.runs_here("avx512bf16_matmul"),
           preferred=("amx_matmul",)),
    Kernel("f32_matmul", jnp.float32, f32_matmul.pack, f32_matmul.f32_matmul_kernel, f32_matmul.f32_matmul,
           cpu_native.F32_MATMUL, cpu_native.runs_here("f32_matmul")),
]


@pytest.fixture(params=KERNELS, ids=lambda k: k.name)
def kernel(request):
    k = request.param
    if not k.runs_here:
        pytest.skip(f"this CPU cannot run {k.name}")
    if not getattr(cpu_native.enable(f"{jaxinfer_home()}/native"), k.name):
        pytest.fail(f"the CPU can run {k.name} but it could not be built or enabled (see the log)")
    return k


def operands(k: Kernel, m, kdim, n, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((m, kdim)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((kdim, n)) * 0.1, k.weight_dtype)
    return x, k.pack(w)


def test_rows_do_not_depend_on_the_batch(kernel):
    """Bit for bit, across the kernels' row tiles (16 or 6 rows) and work items (48 rows)."""
    x, packed = operands(kernel, 100, 576, 960, seed=1)
    full = np.asarray(kernel.kernel(x, packed, 960))
    for lo, hi in [(0, 1), (5, 7), (13, 30), (39, 40), (40, 57), (99, 100)]:
        assert np.array_equal(np.asarray(kernel.kernel(x[lo:hi], packed, 960)), full[lo:hi]), (lo, hi)


def test_nan_stays_in_its_row(kernel):
    x, packed = operands(kernel, 3, 64, 32)
    y = np.asarray(kernel.kernel(x.at[1, 5].set(jnp.nan), packed, 32))
    assert np.isnan(y[1]).all() and np.isfinite(y[[0, 2]]).all()


def test_dispatch_runs_the_kernel_unless_an_implementation_is_forced(kernel):
    x, packed = operands(kernel, 4, 64, 48)

    def lowered():  # a new function each time: jit would reuse an earlier trace of the same one
        return jax.jit(lambda a, b: kernel.matmul(a, b, 48)).lower(x, packed).as_text()

    with cpu_native.turned_off(*kernel.preferred):
        assert kernel.target in lowered()
        with dispatch.use_implementation("reference"):
            assert kernel.target not in lowered()


@pytest.mark.parametrize("k", KERNELS, ids=lambda k: k.name)
def test_mismatched_packed_weights_are_refused(k):
    x, packed = operands(k, 2, 64, 48)
    with pytest.raises(ValueError, match=r"do not hold a \[64, 20\] matrix"):
        k.matmul(x, packed, 20)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("name", list(CPU_MATMULS))
def test_packing_replaces_every_linear_and_packs_a_tied_head(name, tied):
    """The engine tests run a tied model through each kernel (``test_bf16_matmul.py``,
    ``test_f32_matmul.py``); an untied LM head is one more linear, packed as the others."""
    config = ModelConfig(architecture="llama", vocab_size=96, hidden_size=64, intermediate_size=128, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=64,
                         tie_word_embeddings=tied)
    dtype, _, _, prefix = CPU_MATMULS[name]
    params = jax.tree.map(lambda w: w.astype(dtype), init_params(config))
    packed = pack_cpu_weights(params, config, name)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(packed)[0]]
    linears = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]
               if jax.tree_util.keystr(p).endswith("['kernel']")]
    assert linears and not any(p.endswith("['kernel']") for p in paths)
    assert sum(p.endswith(f"['{prefix}_kernel']") for p in paths) == len(linears)
    assert any(p.startswith("['lm_head']") for p in paths) == (not tied)
    assert (f"{prefix}_lm_head" in packed) == tied
    assert "embed_tokens" in packed  # kept for the lookups
