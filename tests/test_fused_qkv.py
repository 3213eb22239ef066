"""The engine runs the canonical parameter tree with q/k/v fused (``model.fuse_qkv_params``): it
must compute what the canonical tree computes, for float and packed int4 weights, with and
without projection biases."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from converters.awq import quantize_params
from jaxinfer.config import ModelConfig
from jaxinfer.model import fuse_qkv_params, init_params
from jaxinfer.scoring import sequence_logits

CONFIG = ModelConfig(
    architecture="llama", vocab_size=96, hidden_size=64, intermediate_size=128, num_layers=2,
    num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=64,
)
SEQUENCES = [[5, 17, 3, 90, 41, 8, 8, 60, 2], [1, 2, 3]]


def _float_case(biases: bool):
    config = dataclasses.replace(CONFIG, qkv_bias=biases, o_bias=biases)
    params = jax.tree.map(np.asarray, init_params(config, seed=1))
    if biases:  # init makes biases zero: give them values, so a misplaced column shows
        rng = np.random.default_rng(0)
        params = jax.tree_util.tree_map_with_path(
            lambda path, x: rng.standard_normal(x.shape).astype(x.dtype) if path[-1].key == "bias" else x, params
        )
    return config, params


@pytest.mark.parametrize("weights", ["float", "float+bias", "int4"])
def test_fused_qkv_gives_canonical_logits(weights):
    config, params = _float_case(weights == "float+bias")
    if weights == "int4":
        params, config = quantize_params(params, config, 4, 32, "rtn", progress=False)
    expected = sequence_logits(config, params, SEQUENCES)
    got = sequence_logits(config, params, SEQUENCES, fused_qkv=True)
    for e, g in zip(expected, got):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5)


def test_fuse_qkv_params_concatenates_columns():
    config, params = _float_case(biases=True)
    attn = fuse_qkv_params(params, config)["layers_1"]["attn"]
    canon = params["layers_1"]["attn"]
    assert set(attn) == {"qkv_proj", "o_proj"}
    for leaf in ("kernel", "bias"):
        q, k, v = np.split(attn["qkv_proj"][leaf], [64, 96], axis=-1)
        np.testing.assert_array_equal(q, canon["q_proj"][leaf])
        np.testing.assert_array_equal(k, canon["k_proj"][leaf])
        np.testing.assert_array_equal(v, canon["v_proj"][leaf])
