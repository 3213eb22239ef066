"""The engine's execution layout of the attention projections (``model.ProjectionLayout``: fused
q/k/v, o_proj in column blocks) computes what the canonical tree computes, for float and
packed int4 weights, with and without projection biases."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from converters.awq import quantize_params
from jaxinfer.config import ModelConfig
from jaxinfer.model import CANONICAL, ProjectionLayout, execution_params, init_params
from jaxinfer.scoring import sequence_logits

CONFIG = ModelConfig(
    architecture="llama", vocab_size=96, hidden_size=64, intermediate_size=128, num_layers=2,
    num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=64,
)
SEQUENCES = [[5, 17, 3, 90, 41, 8, 8, 60, 2], [1, 2, 3]]
LAYOUTS = [ProjectionLayout(fuse_qkv=True), ProjectionLayout(o_proj_parts=2),
           ProjectionLayout(fuse_qkv=True, o_proj_parts=3)]


def _float_case(biases: bool):
    config = dataclasses.replace(CONFIG, qkv_bias=biases, o_bias=biases)
    params = jax.tree.map(np.asarray, init_params(config, seed=1))
    if biases:  # init makes biases zero: give them values, so a misplaced column shows
        rng = np.random.default_rng(0)
        params = jax.tree_util.tree_map_with_path(
            lambda path, x: rng.standard_normal(x.shape).astype(x.dtype) if path[-1].key == "bias" else x, params
        )
    return config, params


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
@pytest.mark.parametrize("weights", ["float", "float+bias", "int4"])
def test_layout_gives_canonical_logits(weights, layout):
    config, params = _float_case(weights == "float+bias")
    if weights == "int4":
        params, config = quantize_params(params, config, 4, 32, "rtn", progress=False)
    expected = sequence_logits(config, params, SEQUENCES)
    got = sequence_logits(config, params, SEQUENCES, layout=layout)
    for e, g in zip(expected, got):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5)


def test_execution_params_rearranges_columns():
    config, params = _float_case(biases=True)
    layout = ProjectionLayout(fuse_qkv=True, o_proj_parts=2)
    attn = execution_params(params, config, layout)["layers_0"]["attn"]
    canon = params["layers_0"]["attn"]
    assert set(attn) == {"qkv_proj", "o_proj_0", "o_proj_1"}
    q, k, v = np.split(attn["qkv_proj"]["kernel"], [64, 96], axis=1)
    np.testing.assert_array_equal(q, canon["q_proj"]["kernel"])
    np.testing.assert_array_equal(k, canon["k_proj"]["kernel"])
    np.testing.assert_array_equal(v, canon["v_proj"]["kernel"])
    np.testing.assert_array_equal(attn["o_proj_1"]["bias"], canon["o_proj"]["bias"][32:])
    assert execution_params(params, config, CANONICAL) is params
