"""The CPU KV write kernel (``pallas_kernels/kv_write_cpu.cc``) against XLA's scatter, and
``write_kv``'s choice of it for bfloat16 pools. Needs a CPU with AVX-512 or AVX2 (a build of the
kernels' library; this project's machines have one); skipped elsewhere."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.home import jaxinfer_home
from jaxinfer.kv_cache import write_kv
from pallas_kernels import cpu_native, dispatch
from pallas_kernels.kv_write_cpu import kv_write_cpu
from pallas_kernels.paged_kv import PagedKV

pytestmark = pytest.mark.skipif(not cpu_native.runs_here("kv_write"), reason="no build of the kernels for this CPU")


@pytest.fixture(scope="module", autouse=True)
def enabled():
    if not cpu_native.enable(f"{jaxinfer_home()}/native").kv_write:
        pytest.fail("the CPU runs the kernel but it could not be built (see the log)")


def scatter(pool, slots, values):
    page_size = pool.shape[2]
    return pool.at[slots // page_size, :, slots % page_size].set(values.astype(pool.dtype))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("page_size,head_dim,slots",
                         [(16, 64, [0, 17, 18, 63]), (64, 80, [5]), (4, 16, list(range(40)))])
def test_kernel_writes_what_xlas_scatter_writes(dtype, page_size, head_dim, slots):
    rng = np.random.default_rng(len(slots))
    pool = jnp.asarray(rng.standard_normal((12, 3, page_size, head_dim)), dtype)
    slots = jnp.asarray(slots, jnp.int32)
    values = jnp.asarray(rng.standard_normal((slots.shape[0], 3, head_dim)), dtype)
    want = np.asarray(scatter(pool, slots, values))
    got = np.asarray(jax.jit(kv_write_cpu, donate_argnums=0)(pool, slots, values))
    assert np.array_equal(got, want)


def test_write_kv_takes_the_kernel_for_bfloat16_pools():
    def lowered(dtype):
        cache = PagedKV(jnp.zeros((4, 2, 8, 16), dtype), jnp.zeros((4, 2, 8, 16), dtype))
        k = jnp.ones((2, 3, 2, 16), jnp.float32)
        slots = jnp.arange(6, dtype=jnp.int32).reshape(2, 3)
        # A new function each time: jit would reuse an earlier trace of the same one.
        return jax.jit(lambda *a: write_kv(*a)).lower(cache, slots, k, k).as_text()

    assert cpu_native.KV_WRITE in lowered(jnp.bfloat16)
    assert cpu_native.KV_WRITE not in lowered(jnp.float32)  # XLA's scatter updates float32 pools in place
    with dispatch.use_implementation("reference"):
        assert cpu_native.KV_WRITE not in lowered(jnp.bfloat16)
    with cpu_native.turned_off("kv_write"):
        assert cpu_native.KV_WRITE not in lowered(jnp.bfloat16)


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="do not fit"):
        kv_write_cpu(jnp.zeros((4, 2, 8, 16)), jnp.zeros((3,), jnp.int32), jnp.zeros((3, 2, 8)))
