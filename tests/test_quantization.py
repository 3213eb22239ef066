"""Weight and KV quantization: the packed format, RTN bounds, AWQ against RTN, exact GGUF and
AutoAWQ imports, quantized KV pages, perplexity the llama.cpp way, and the lite/eval commands."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from tiny_models import build_tiny

from converters.autoawq import AWQ_ORDER, unpack_awq
from converters.awq import awq_scale, quantize_params
from converters.loader import load_model
from converters.rtn import dequantize_kernel, quantize_kernel
from jaxinfer import LLM, SamplingParams
from jaxinfer.config import kv_cache_dtype
from jaxinfer.engine_config import EngineConfig
from jaxinfer.cli.main import main
from jaxinfer.kv_cache import KVCache
from jaxinfer.perplexity import perplexity
from jaxinfer.scoring import sequence_logits
from pallas_kernels.int4_matmul import dequantize, int4_matmul, pack_int4, unpack_int4
from pallas_kernels.paged_kv import dequantize_kv, quantize_kv



def test_int4_pack_unpack_round_trip():
    codes = np.random.default_rng(0).integers(0, 16, size=(64, 24)).astype(np.uint8)
    words = pack_int4(codes)
    assert words.shape == (8, 24) and words.dtype == np.uint32
    np.testing.assert_array_equal(np.asarray(unpack_int4(words)), codes)
    # low nibble first: row 0 of word 0 sits in bits 0-3, row 1 in bits 4-7
    assert words[0, 0] & 0xF == codes[0, 0] and (words[0, 0] >> 4) & 0xF == codes[1, 0]
    with pytest.raises(ValueError, match="0..15"):
        pack_int4(codes + 16)


@pytest.mark.parametrize("bits,group", [(4, 32), (4, 128), (8, 64)])
def test_rtn_error_is_within_half_a_step(bits, group):
    w = np.random.default_rng(1).standard_normal((576, 40)).astype(np.float32)  # 576: groups of 128 pad
    q = quantize_kernel(w, bits, group)
    back = dequantize_kernel(q, 576)
    step = np.repeat(q["scales"], group, axis=0)[:576]
    assert np.all(np.abs(back - w) <= step / 2 + 1e-6)
    x = np.random.default_rng(2).standard_normal((3, 576)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(int4_matmul(x, q["qweight"], q["scales"], q["biases"])), x @ back, rtol=1e-5,
                               atol=1e-4)


def test_kv_quantization_round_trip_bounds():
    x = jax.random.normal(jax.random.key(0), (5, 3, 64)) * 3
    for bits in (8, 4):
        codes, sz = quantize_kv(x, bits)
        assert codes.shape == (5, 3, 64 * bits // 8) and codes.dtype == np.uint8
        back = dequantize_kv(codes, sz, bits)
        assert np.all(np.abs(np.asarray(back - x)) <= np.asarray(sz[..., :1]) / 2 + 1e-5)


def outlier_model(tmp_path, seed=0):
    """A tiny Llama whose norms amplify a few channels, as trained LLMs' activations do."""
    model = build_tiny("llama", str(tmp_path / "float"), seed=seed, hidden_size=128, intermediate_size=256)
    with torch.no_grad():
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight[:6] *= 25.0
    model.save_pretrained(str(tmp_path / "float"))
    return load_model(str(tmp_path / "float"), np.float32)


def test_awq_beats_rtn_on_held_out_tokens(tmp_path):
    m = outlier_model(tmp_path)
    host = jax.tree.map(np.asarray, m.params)
    rng = np.random.default_rng(3)
    calib = rng.integers(0, m.config.vocab_size, size=(8, 64)).astype(np.int32)
    held_out = [rng.integers(0, m.config.vocab_size, size=96).tolist() for _ in range(4)]
    reference = sequence_logits(m.config, m.params, held_out)

    def error(params, config):
        params = jax.tree.map(lambda a: jax.numpy.asarray(a), params)
        return np.mean([np.mean((a - b) ** 2) for a, b in zip(sequence_logits(config, params, held_out), reference)])

    rtn = error(*quantize_params(host, m.config, 4, 32, "rtn", progress=False))
    scaled = awq_scale(host, m.config, calib, 4, 32, search_scale=True, batch_size=4, progress=False)
    awq = error(*quantize_params(scaled, m.config, 4, 32, "awq", progress=False))
    assert awq < 0.8 * rtn, (awq, rtn)
    # AWQ's scaling alone changes nothing: the float model is the same function
    unchanged = sequence_logits(m.config, jax.tree.map(jax.numpy.asarray, scaled), held_out)
    for a, b in zip(unchanged, reference):
        np.testing.assert_allclose(a, b, atol=1e-3)


def test_gguf_q4_1_and_q8_0_import_exactly(tmp_path):
    import gguf
    from test_gguf import write_gguf

    model = build_tiny("llama", str(tmp_path / "hf"))
    for qtype, bits in ((gguf.GGMLQuantizationType.Q4_1, 4), (gguf.GGMLQuantizationType.Q8_0, 8)):
        path = str(tmp_path / f"m.{qtype.name}.gguf")
        expected = write_gguf(path, model, qtype)  # HF-named weights the file holds, dequantized by gguf
        packed = load_model(path, np.float32, progress=False, keep_quantized=True)
        assert packed.config.weight_quant.bits == bits and packed.config.weight_quant.group_size == 32
        q = packed.params["layers_1"]["mlp"]["down_proj"]
        np.testing.assert_array_equal(np.asarray(dequantize(q["qweight"], q["scales"], q["biases"])),
                                      expected["model.layers.1.mlp.down_proj.weight"].T)
        q = packed.params["layers_0"]["attn"]["q_proj"]  # rows un-permuted like the float path
        np.testing.assert_array_equal(np.asarray(dequantize(q["qweight"], q["scales"], q["biases"])),
                                      expected["model.layers.0.self_attn.q_proj.weight"].T)
        floats = load_model(path, np.float32, progress=False, keep_quantized=False)
        assert floats.config.weight_quant is None
        seqs = [[1, 5, 9, 200, 3], list(range(10, 40))]
        for a, b in zip(sequence_logits(packed.config, packed.params, seqs), sequence_logits(floats.config, floats.params, seqs)):
            np.testing.assert_allclose(a, b, atol=1e-4)


def awq_pack(codes: np.ndarray) -> np.ndarray:
    """uint8 [rows, cols] -> int32 [rows, cols // 8] in AutoAWQ's nibble order (written here,
    independently of converters.autoawq)."""
    rows, cols = codes.shape
    packed = np.zeros((rows, cols // 8), np.uint32)
    for nibble, column in enumerate(AWQ_ORDER):
        packed |= codes[:, column::8].astype(np.uint32) << np.uint32(4 * nibble)
    return packed.view(np.int32)


def test_autoawq_checkpoint_loads_and_matches_its_dequantized_weights(tmp_path):
    group = 32
    model = build_tiny("llama", str(tmp_path / "float"))
    tensors, expected = {}, {}
    for name, p in model.state_dict().items():
        stem = name[: -len(".weight")]
        if name.endswith("_proj.weight") and ".layers." in name:
            w = p.numpy().T.astype(np.float32)  # [in, out]
            g = w.reshape(-1, group, w.shape[1])
            lo, hi = g.min(1), g.max(1)
            scales = ((hi - lo) / 15).astype(np.float16)
            zeros = np.clip(np.round(-lo / scales.astype(np.float32)), 0, 15).astype(np.uint8)
            s32 = np.repeat(scales.astype(np.float32), group, 0)
            z32 = np.repeat(zeros, group, 0)
            codes = np.clip(np.round(w / s32) + z32, 0, 15).astype(np.uint8)
            tensors[stem + ".qweight"] = torch.from_numpy(np.ascontiguousarray(awq_pack(codes)))
            tensors[stem + ".qzeros"] = torch.from_numpy(np.ascontiguousarray(awq_pack(zeros)))
            tensors[stem + ".scales"] = torch.from_numpy(np.ascontiguousarray(scales))
            expected[stem] = (codes.astype(np.float32) - z32) * s32
        else:
            tensors[name] = p.contiguous()
    out = tmp_path / "awq"
    out.mkdir()
    save_file(tensors, str(out / "model.safetensors"))
    config = json.loads((tmp_path / "float" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True,
                                     "version": "gemm"}
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="--model-format awq"):
        load_model(str(out), np.float32, progress=False)
    m = load_model(str(out), np.float32, progress=False, model_format="awq")
    assert m.config.weight_quant.method == "autoawq"
    for stem, w in expected.items():
        i = int(stem.split(".")[2])
        part = stem.split(".")[-1]
        module = m.params[f"layers_{i}"]["attn" if "self_attn" in stem else "mlp"][part]
        np.testing.assert_allclose(np.asarray(dequantize(module["qweight"], module["scales"], module["biases"])), w,
                                   rtol=0, atol=1e-6)
    np.testing.assert_array_equal(unpack_awq(awq_pack(np.arange(16, dtype=np.uint8).reshape(2, 8))),
                                  np.arange(16).reshape(2, 8))
    out_tokens = LLM(m, warmup=False, cache_max_entry_count=32, cache_block_seq_len=16, max_batch_size=2,
                     max_prefill_tokens=32).generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=4))
    assert len(out_tokens[0].outputs[0].token_ids) == 4


def test_kv_quantization_grows_capacity_and_keeps_greedy_close(tmp_path):
    build_tiny("llama", str(tmp_path / "m"))
    m = load_model(str(tmp_path / "m"), np.float32)
    f32, int8, int4 = (KVCache.bytes_per_token(m.config, np.float32, p) for p in (0, 8, 4))
    assert (f32, int8, int4) == (2 * 2 * 2 * 16 * 4, 2 * 2 * 2 * (16 + 8), 2 * 2 * 2 * (8 + 8))
    # the engine runs on int8 pages; its first step (the prefill) matches the float engine's
    prompts = [list(range(3, 60)), [7, 7, 9]]
    greedy = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, logprobs=3)
    options = dict(warmup=False, max_batch_size=2, max_prefill_tokens=32, cache_block_seq_len=16, cache_max_entry_count=0.01)
    tops = {}
    for policy in (0, 8):
        llm = LLM(m, quant_policy=policy, **options)
        outs = llm.generate(prompts, greedy)
        assert all(len(o.outputs[0].token_ids) == 20 for o in outs)
        tops[policy] = [[lp for _, lp in o.outputs[0].logprobs[0].top] for o in outs]
        if policy:
            assert "int8 K/V" in llm.engine.cache_plan.explanation
    np.testing.assert_allclose(tops[8], tops[0], atol=0.01)
    seqs = [list(range(3, 90))]
    base = sequence_logits(m.config, m.params, seqs)[0]
    err8 = np.abs(sequence_logits(m.config, m.params, seqs, quant_policy=8)[0] - base).max()
    err4 = np.abs(sequence_logits(m.config, m.params, seqs, quant_policy=4)[0] - base).max()
    assert 0 < err8 < err4 < 1.0


def test_kv_cache_dtype_choice():
    assert kv_cache_dtype(jnp.float32) == jnp.float32
    assert kv_cache_dtype(jnp.bfloat16) == jnp.bfloat16  # the weights', even under float32 activations
    assert kv_cache_dtype(jnp.float32, "bfloat16") == jnp.bfloat16
    assert kv_cache_dtype(jnp.bfloat16, "float32") == jnp.float32
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        kv_cache_dtype(jnp.float32, "int8")
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        EngineConfig(kv_cache_dtype="float16")


def test_bfloat16_kv_cache_halves_token_bytes_and_keeps_greedy_close(tmp_path):
    build_tiny("llama", str(tmp_path / "m"))
    m = load_model(str(tmp_path / "m"), np.float32)
    assert KVCache.bytes_per_token(m.config, jnp.bfloat16) * 2 == KVCache.bytes_per_token(m.config, jnp.float32)
    prompts = [list(range(3, 60)), [7, 7, 9]]
    greedy = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, logprobs=3)
    options = dict(warmup=False, max_batch_size=2, max_prefill_tokens=32, cache_block_seq_len=16,
                   cache_max_entry_count=16)
    tops = {}
    for choice in ("auto", "bfloat16"):
        llm = LLM(m, kv_cache_dtype=choice, **options)
        want = jnp.dtype("float32" if choice == "auto" else choice)  # auto: the weights', float32 here
        assert {a.dtype for a in jax.tree.leaves(llm.engine.runner.cache)} == {want}
        outs = llm.generate(prompts, greedy)
        tops[choice] = [[lp for _, lp in o.outputs[0].logprobs[0].top] for o in outs]
    assert "bfloat16 K/V" in llm.engine.cache_plan.explanation
    np.testing.assert_allclose(tops["bfloat16"], tops["auto"], atol=0.01)


def test_perplexity_is_llama_cpp_windows_scored_on_their_second_half(tmp_path):
    model = build_tiny("llama", str(tmp_path / "m"), bos_token_id=1)
    m = load_model(str(tmp_path / "m"), np.float32)
    tokens = np.random.default_rng(4).integers(3, 256, size=70).tolist()
    got = perplexity(m.config, m.params, tokens, ctx=32, progress=False)
    assert got.windows == 2 and got.scored_tokens == 2 * 15
    nll = []
    with torch.no_grad():
        for i in range(2):
            window = [1] + tokens[i * 32 + 1 : (i + 1) * 32]
            logp = torch.log_softmax(model(torch.tensor([window])).logits[0].double(), -1)
            nll += [-float(logp[j, window[j + 1]]) for j in range(16, 31)]
    assert got.value == pytest.approx(float(np.exp(np.mean(nll))), rel=1e-5)


def test_lite_and_eval_commands(tmp_path, tiny_chat_model, capsys):
    """The commands run in this process (``main(argv)``, what the console script calls): a
    subprocess per command cost ~10 s of imports and compilation each."""

    def jaxinfer(*argv: str) -> tuple[int, str, str]:
        rc = main(list(argv))
        out, err = capsys.readouterr()
        return rc, out, err

    rtn = tmp_path / "rtn"
    rc, _, err = jaxinfer("lite", "rtn", tiny_chat_model, "--work-dir", str(rtn), "--w-group-size", "32")
    assert rc == 0, err
    awq = tmp_path / "awq"
    rc, _, err = jaxinfer("lite", "auto_awq", tiny_chat_model, "--work-dir", str(awq), "--w-group-size", "64",
                          "--calib-samples", "4", "--calib-seqlen", "64", "--batch-size", "2", "--search-scale")
    assert rc == 0, err
    assert load_model(str(awq)).config.weight_quant.method == "awq"
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    values = {}
    for name, path, extra in (("float", tiny_chat_model, []), ("rtn", str(rtn), []),
                              ("kv8", tiny_chat_model, ["--quant-policy", "8"])):
        rc, out, err = jaxinfer("eval", "ppl", path, "--text", str(text), "--ctx", "64", *extra)
        assert rc == 0, err
        last = out.strip().splitlines()[-1]
        assert last.startswith("perplexity: ")
        values[name] = float(last.split()[1])
    assert values["rtn"] != values["float"] and abs(values["kv8"] / values["float"] - 1) < 0.05
    rc, _, err = jaxinfer("lite", "rtn", str(rtn), "--work-dir", str(tmp_path / "again"))
    assert rc == 1 and "already quantized" in err
    assert not os.path.exists(tmp_path / "again")
