"""The engine runs the canonical parameter tree in an execution layout (``model.to_layout``: q/k/v
fused, float kernels ``[out, in]``): every layout must compute what the canonical tree computes,
for float and packed int4 weights, with and without projection biases and a separate LM head."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from converters.awq import quantize_params
from jaxinfer.config import ModelConfig
from jaxinfer.model import CANONICAL, EXECUTION, ParamLayout, init_params, to_layout
from jaxinfer.scoring import sequence_logits

CONFIG = ModelConfig(
    architecture="llama", vocab_size=96, hidden_size=64, intermediate_size=128, num_layers=2,
    num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=64,
)
SEQUENCES = [[5, 17, 3, 90, 41, 8, 8, 60, 2], [1, 2, 3]]
LAYOUTS = [ParamLayout(fuse_qkv=True), ParamLayout(out_in_kernels=True), EXECUTION]


def _float_case(biases: bool, tied: bool = False):
    config = dataclasses.replace(CONFIG, qkv_bias=biases, o_bias=biases, tie_word_embeddings=tied)
    params = jax.tree.map(np.asarray, init_params(config, seed=1))
    if biases:  # init makes biases zero: give them values, so a misplaced column shows
        rng = np.random.default_rng(0)
        params = jax.tree_util.tree_map_with_path(
            lambda path, x: rng.standard_normal(x.shape).astype(x.dtype) if path[-1].key == "bias" else x, params
        )
    return config, params


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda lay: f"fuse{int(lay.fuse_qkv)}-outin{int(lay.out_in_kernels)}")
@pytest.mark.parametrize("weights", ["float", "float+bias+tied", "int4"])
def test_layout_gives_canonical_logits(weights, layout):
    config, params = _float_case(biases="bias" in weights, tied="tied" in weights)
    if weights == "int4":
        params, config = quantize_params(params, config, 4, 32, "rtn", progress=False)
    expected = sequence_logits(config, params, SEQUENCES)
    got = sequence_logits(config, params, SEQUENCES, layout=layout)
    for e, g in zip(expected, got):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5)


def test_to_layout_places_columns():
    config, params = _float_case(biases=True)
    out = to_layout(params, config, EXECUTION)
    attn, canon = out["layers_1"]["attn"], params["layers_1"]["attn"]
    assert set(attn) == {"qkv_proj", "o_proj"}
    q, k, v = np.split(attn["qkv_proj"]["kernel"], [64, 96], axis=0)  # [out, in]: columns became rows
    for got, name in ((q, "q_proj"), (k, "k_proj"), (v, "v_proj")):
        np.testing.assert_array_equal(got, canon[name]["kernel"].T)
    q, k, v = np.split(attn["qkv_proj"]["bias"], [64, 96])
    for got, name in ((q, "q_proj"), (k, "k_proj"), (v, "v_proj")):
        np.testing.assert_array_equal(got, canon[name]["bias"])
    np.testing.assert_array_equal(out["lm_head"]["kernel"], params["lm_head"]["kernel"].T)
    np.testing.assert_array_equal(out["embed_tokens"], params["embed_tokens"])  # [vocab, embed] either way
    assert to_layout(params, config, CANONICAL) == params
