"""Rotary embeddings: the engine's precomputed table gives the rotation the model computes itself."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.config import ModelConfig, RopeScaling
from jaxinfer.model import apply_rope, rope_rotation, rope_table


@pytest.mark.parametrize("scaling", [RopeScaling(), RopeScaling(rope_type="linear", factor=4.0)])
def test_table_rows_match_the_computed_rotation(scaling):
    config = ModelConfig("llama", 256, 576, 1536, 1, 9, 3, 64, rope_theta=100000.0, rope_scaling=scaling)
    length = 8192
    positions = jnp.asarray([[0, 1, 63, 64], [4000, 8191, 5, 2]], jnp.int32)
    table = jnp.asarray(rope_table(config, length))
    assert table.shape == (length, 64)
    got = jax.jit(lambda p, t: rope_rotation(p, config.rope_inv_freq(), t))(positions, table)
    want = jax.jit(lambda p: rope_rotation(p, config.rope_inv_freq()))(positions)
    for g, w in zip(got, want):
        assert g.shape == w.shape == (2, 4, 1, 32)
        np.testing.assert_allclose(g, w, atol=2e-6)
    # The rotation a row of the table gives: position 0 leaves x unchanged, any other turns it.
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 4, 9, 64)), jnp.float32)
    y = apply_rope(x, got)
    np.testing.assert_allclose(y[0, 0], x[0, 0], atol=1e-6)
    assert not np.allclose(y[0, 1], x[0, 1], atol=1e-3)
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)
