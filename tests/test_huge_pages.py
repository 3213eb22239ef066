"""Weights moved into one huge-page mapping keep their values and are what the engine runs on."""

import sys
import types
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.huge_pages import HUGE_PAGE_BYTES, parts_to_huge_pages

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")


def _vm_flags(address: int) -> list[str]:
    """The VmFlags of the mapping that holds ``address``."""
    in_mapping = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            first = line.split()[0]
            if "-" in first and ":" not in first:
                lo, hi = (int(x, 16) for x in first.split("-"))
                in_mapping = lo <= address < hi
            elif in_mapping and first == "VmFlags:":
                return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


def _tree():
    rng = np.random.default_rng(0)
    return {
        "w": jnp.asarray(rng.standard_normal((300, 97), np.float32)),
        "bf16": jnp.asarray(rng.standard_normal((5, 33), np.float32), jnp.bfloat16),
        "layers": [{"ids": jnp.arange(13, dtype=jnp.int32), "scalar": jnp.float32(2.5)},
                   {"codes": jnp.asarray(rng.integers(0, 2**32, (7, 3), np.uint32)), "empty": jnp.zeros((0, 4))}],
    }


def _shapes(tree):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)


def test_values_shapes_and_dtypes_are_kept_in_one_aligned_mapping():
    tree = _tree()
    moved = parts_to_huge_pages(_shapes(tree), [tree], jax.devices()[0])
    assert jax.tree.structure(moved) == jax.tree.structure(tree)
    pointers = []
    for before, after in zip(jax.tree.leaves(tree), jax.tree.leaves(moved)):
        assert after.dtype == before.dtype and after.shape == before.shape
        np.testing.assert_array_equal(np.asarray(after), np.asarray(before))
        if after.size:
            pointers.append(after.unsafe_buffer_pointer())
            assert pointers[-1] != before.unsafe_buffer_pointer()
    assert pointers[0] % HUGE_PAGE_BYTES == 0
    assert all(p % 64 == 0 for p in pointers)
    assert max(pointers) - min(pointers) < HUGE_PAGE_BYTES  # one mapping, packed together


def test_parts_are_copied_one_at_a_time_into_one_mapping():
    rng = np.random.default_rng(1)
    values = {f"layer_{i}": {"w": rng.standard_normal((64, 48), np.float32), "b": np.arange(i + 1, dtype=np.int32)}
              for i in range(4)}
    shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), values)
    copied = []

    def on_device(part):
        arrays = jax.tree.map(jnp.asarray, part)
        copied.append(weakref.ref(arrays["w"]))
        return arrays

    def parts():
        for name, part in values.items():
            if copied:  # the part before was copied and dropped by now
                assert copied[-1]() is None
            yield {name: on_device(part)}

    out = parts_to_huge_pages(shapes, parts(), jax.devices()[0])
    assert jax.tree.structure(out) == jax.tree.structure(values)
    for got, want in zip(jax.tree.leaves(out), jax.tree.leaves(values)):
        np.testing.assert_array_equal(np.asarray(got), want)
    pointers = [leaf.unsafe_buffer_pointer() for leaf in jax.tree.leaves(out)]
    assert min(pointers) % HUGE_PAGE_BYTES == 0 and max(pointers) - min(pointers) < HUGE_PAGE_BYTES
    with pytest.raises(ValueError, match="not"):  # a part missing
        parts_to_huge_pages(shapes, [{"layer_0": values["layer_0"]}], jax.devices()[0])
    with pytest.raises(ValueError, match="more than their shapes"):
        big = {"layer_0": {"w": np.zeros((64, 4096), np.float32), "b": values["layer_0"]["b"]}}
        parts_to_huge_pages({"layer_0": shapes["layer_0"]}, [big], jax.devices()[0])


@linux_only
def test_the_mapping_is_advised_for_huge_pages():
    tree = {"w": jnp.ones((1024, 1024))}
    moved = parts_to_huge_pages(_shapes(tree), [tree], jax.devices()[0])
    assert "hg" in _vm_flags(moved["w"].unsafe_buffer_pointer())


def test_other_devices_keep_the_tree():
    tree = _tree()
    kept = parts_to_huge_pages(_shapes(tree), [{"w": tree["w"]}, {"bf16": tree["bf16"], "layers": tree["layers"]}],
                               types.SimpleNamespace(platform="gpu"))
    assert kept == tree and all(a is b for a, b in zip(jax.tree.leaves(kept), jax.tree.leaves(tree)))


@linux_only
def test_the_engine_runs_on_weights_in_huge_pages():
    from jaxinfer.buckets import Buckets
    from jaxinfer.config import ModelConfig
    from jaxinfer.model import init_params
    from jaxinfer.model_runner import ModelRunner

    config = ModelConfig(
        architecture="llama", vocab_size=96, hidden_size=64, intermediate_size=128, num_layers=2,
        num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=64,
    )
    buckets = Buckets.create(2, 32, 64, 16, config.vocab_size)
    runner = ModelRunner(config, init_params(config), jnp.float32, buckets, num_pages=8)
    for leaf in jax.tree.leaves(runner.params):
        assert "hg" in _vm_flags(leaf.unsafe_buffer_pointer())
