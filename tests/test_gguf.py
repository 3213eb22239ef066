"""GGUF import: tiny GGUF files written at test time (F32, Q8_0, Q4_1) against the HF torch model,
error handling of damaged files, and the real embedded SmolLM2 GGUF against ``transformers``."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize, quantize

from converters.errors import CheckpointError
from converters.gguf import GGUFCheckpoint
from converters.hf_config import model_config_from_hf
from converters.loader import build_params, load_model, open_source
from jaxinfer.scoring import sequence_logits
from tiny_models import build_tiny

JAXINFER = os.path.join(os.path.dirname(sys.executable), "jaxinfer")

ROPE_THETA = 1000.0  # the tiny models' rope_theta (not the 10000 a reader would fall back to)
# Token sequences of different lengths (sequence_logits pads them into one batch).
SEQUENCES = [[1, 17, 200, 3, 99, 42, 255, 0, 128, 64, 5], [7, 8, 9, 250, 31, 2, 77]]


# ----------------------------------------------------------------------------------------------
# Writing a GGUF the way llama.cpp's convert_hf_to_gguf.py does for arch "llama"
# ----------------------------------------------------------------------------------------------

def permute_like_llama_cpp(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rows -> GGUF rows (convert_hf_to_gguf.py LlamaModel.permute)."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_reference(w: np.ndarray, n_head: int) -> np.ndarray:
    """GGUF rows -> HF rows, written independently of converters.gguf._unpermute."""
    rows, cols = w.shape
    return w.reshape(n_head, rows // n_head // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


_LAYER_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
_GLOBAL_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def gguf_name(hf: str) -> str:
    stem, suffix = hf.rsplit(".", 1)
    if stem in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[stem]}.{suffix}"
    _, _, layer, rest = stem.split(".", 3)
    return f"blk.{layer}.{_LAYER_NAMES[rest]}.{suffix}"


def write_gguf(path, model, qtype=QT.F32) -> dict[str, np.ndarray]:
    """Write ``model`` (a tiny HF Llama) to ``path`` as a llama.cpp-style GGUF.

    2-D weights are stored as ``qtype``; 1-D norms stay F32 (as llama.cpp keeps them). Returns
    the HF-named float32 weights the file holds, in HF layout: what an importer must produce.
    """
    cfg = model.config
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    state = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # llama.cpp writes no `output` tensor for tied models

    w = gguf.GGUFWriter(str(path), "llama")  # writes general.architecture
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    expected = {}
    for name, value in state.items():
        if ".q_proj." in name:
            value = permute_like_llama_cpp(value, heads)
        elif ".k_proj." in name:
            value = permute_like_llama_cpp(value, kv_heads)
        if value.ndim == 2 and qtype != QT.F32:
            data = quantize(value, qtype)
            w.add_tensor(gguf_name(name), data, raw_dtype=qtype)
            stored = dequantize(data, qtype).reshape(value.shape)
        else:
            w.add_tensor(gguf_name(name), value)
            stored = value
        if ".q_proj." in name:
            stored = unpermute_reference(stored, heads)
        elif ".k_proj." in name:
            stored = unpermute_reference(stored, kv_heads)
        expected[name] = stored.astype(np.float32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


def hf_logits(model, sequences) -> list[np.ndarray]:
    with torch.no_grad():
        return [model(torch.tensor([s])).logits[0].float().numpy() for s in sequences]


def our_logits(path) -> list[np.ndarray]:
    """GGUFCheckpoint + build_params + sequence_logits: the import path without the engine."""
    ckpt = GGUFCheckpoint(path)
    config = model_config_from_hf(ckpt.hf_config)
    params = build_params(ckpt, config, np.float32, progress=False)
    return sequence_logits(config, params, SEQUENCES)


def assert_logits_close(ours, theirs, atol=1e-4):
    for a, b in zip(ours, theirs, strict=True):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, atol=atol, rtol=0)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """family -> tiny random HF torch model (eval mode)."""
    root = tmp_path_factory.mktemp("tiny_hf")
    return {f: build_tiny(f, str(root / f), rope_theta=ROPE_THETA) for f in ("llama", "llama_tied")}


@pytest.fixture(scope="module")
def tiny_gguf(tiny_models, tmp_path_factory):
    """An F32 tiny Llama GGUF (untied, with an `output` tensor) and the weights it holds."""
    path = tmp_path_factory.mktemp("tiny_gguf") / "tiny-llama-f32.gguf"
    expected = write_gguf(path, tiny_models["llama"])
    return str(path), expected


# ----------------------------------------------------------------------------------------------
# 1. Tiny GGUFs against HF
# ----------------------------------------------------------------------------------------------

def test_writer_permutation_is_llama_cpps_and_not_trivial():
    """The test's own permute/un-permute are inverses and actually move rows (else test (c) is void)."""
    w = np.arange(64 * 8, dtype=np.float32).reshape(64, 8)
    p = permute_like_llama_cpp(w, 4)
    assert not np.array_equal(p, w)
    np.testing.assert_array_equal(unpermute_reference(p, 4), w)
    # Within each head, llama.cpp interleaves the two rotary halves: rows 0, 8, 1, 9, ...
    np.testing.assert_array_equal(p[:4, 0], w[[0, 8, 1, 9], 0])


def test_config_rebuilt_from_metadata(tiny_gguf, tiny_models):
    path, _ = tiny_gguf
    hf = tiny_models["llama"].config
    config = model_config_from_hf(GGUFCheckpoint(path).hf_config)
    assert config.architecture == "llama"
    assert (config.vocab_size, config.hidden_size, config.intermediate_size) == (256, 64, 128)
    assert (config.num_layers, config.num_heads, config.num_kv_heads, config.head_dim) == (2, 4, 2, 16)
    assert config.rope_theta == hf.rope_parameters["rope_theta"] == ROPE_THETA
    assert config.rms_norm_eps == pytest.approx(hf.rms_norm_eps, rel=1e-6)
    assert config.max_position_embeddings == hf.max_position_embeddings
    assert config.tie_word_embeddings is False


@pytest.mark.parametrize("family", ["llama", "llama_tied"])
def test_f32_gguf_logits_match_hf(family, tiny_models, tiny_gguf, tmp_path):
    model = tiny_models[family]
    if family == "llama":
        path, expected = tiny_gguf
    else:
        path = tmp_path / "tied.gguf"
        expected = write_gguf(path, model)
    ckpt = GGUFCheckpoint(path)
    assert ckpt.hf_config["tie_word_embeddings"] is model.config.tie_word_embeddings
    assert sorted(ckpt.names()) == sorted(expected)
    # (c) the un-permuted Q/K weights are HF's weights exactly: catches a missing or wrong
    # un-permute (e.g. K un-permuted with the query head count).
    state = model.state_dict()
    for name in ckpt.names():
        np.testing.assert_array_equal(ckpt.get(name), state[name].numpy(), err_msg=name)
    assert_logits_close(our_logits(path), hf_logits(model, SEQUENCES))


@pytest.mark.parametrize("qtype", [QT.Q8_0, QT.Q4_1], ids=lambda q: q.name)
def test_quantized_gguf_matches_gguf_dequantize_and_hf(qtype, tiny_models, tmp_path):
    model = tiny_models["llama"]
    path = tmp_path / f"tiny-{qtype.name}.gguf"
    expected = write_gguf(path, model, qtype)
    ckpt = GGUFCheckpoint(path)
    # The file really is quantized (so the comparison below is not an F32 one in disguise).
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(str(path)).tensors}
    assert types["blk.0.attn_q.weight"] == qtype and types["token_embd.weight"] == qtype
    assert types["blk.0.attn_norm.weight"] == QT.F32
    state = model.state_dict()
    assert not np.array_equal(expected["model.layers.0.mlp.up_proj.weight"], state["model.layers.0.mlp.up_proj.weight"].numpy())
    # (b) our dequantized weights are gguf's dequantize of the same bytes, exactly, in HF layout.
    assert sorted(ckpt.names()) == sorted(expected)
    for name in ckpt.names():
        np.testing.assert_array_equal(ckpt.get(name), expected[name], err_msg=name)
    # Logits equal HF's on the dequantized weights.
    dequantized = copy.deepcopy(model)
    dequantized.load_state_dict({k: torch.from_numpy(v) for k, v in expected.items()}, strict=True)
    assert_logits_close(our_logits(path), hf_logits(dequantized, SEQUENCES))


def test_skipping_unpermute_is_caught(tiny_gguf, tiny_models, monkeypatch):
    """(c) Without the un-permute, both the weight check and the logits check fail."""
    import converters.gguf

    path, _ = tiny_gguf
    model = tiny_models["llama"]
    monkeypatch.setattr(converters.gguf, "_unpermute", lambda w, n_head: w)
    q = GGUFCheckpoint(path).get("model.layers.0.self_attn.q_proj.weight")
    assert not np.array_equal(q, model.state_dict()["model.layers.0.self_attn.q_proj.weight"].numpy())
    with pytest.raises(AssertionError):
        assert_logits_close(our_logits(path), hf_logits(model, SEQUENCES))


def test_load_model_without_tokenizer_metadata(tiny_gguf, tiny_models):
    path, _ = tiny_gguf
    loaded = load_model(path, dtype=np.float32, progress=False)
    assert loaded.tokenizer is None
    logits = sequence_logits(loaded.config, loaded.params, SEQUENCES)
    assert_logits_close(logits, hf_logits(tiny_models["llama"], SEQUENCES))


# ----------------------------------------------------------------------------------------------
# 2. Damaged files
# ----------------------------------------------------------------------------------------------

def _tensor_data_span(path) -> tuple[int, int]:
    reader = gguf.GGUFReader(str(path))
    start = min(int(t.data_offset) for t in reader.tensors)
    return start, os.path.getsize(path)


@pytest.fixture(params=["truncated_tensor_data", "truncated_header", "garbage", "garbage_with_magic"])
def bad_gguf(request, tiny_gguf, tmp_path):
    src, _ = tiny_gguf
    data = open(src, "rb").read()
    rng = np.random.default_rng(0)
    if request.param == "truncated_tensor_data":
        start, end = _tensor_data_span(src)
        assert start < (start + end) // 2 < end
        path, content = tmp_path / "truncated.gguf", data[: (start + end) // 2]
    elif request.param == "truncated_header":
        path, content = tmp_path / "truncated.gguf", data[:200]
    elif request.param == "garbage":
        path, content = tmp_path / "x.gguf", rng.integers(0, 256, 4096, dtype=np.uint8).tobytes()
    else:
        path, content = tmp_path / "x.gguf", b"GGUF" + rng.integers(0, 256, 4096, dtype=np.uint8).tobytes()
    path.write_bytes(content)
    return str(path)


def test_damaged_gguf_raises_checkpoint_error_naming_the_file(bad_gguf):
    with pytest.raises(CheckpointError) as err:
        GGUFCheckpoint(bad_gguf)
    assert bad_gguf in str(err.value) and err.value.path == bad_gguf
    with pytest.raises(CheckpointError, match=bad_gguf):
        open_source(bad_gguf)
    with pytest.raises(CheckpointError, match=bad_gguf):
        load_model(bad_gguf, progress=False)


def _cli_convert(src, out, tmp_path):
    env = {**os.environ, "JAXINFER_HOME": str(tmp_path / "home"), "JAX_PLATFORMS": "cpu"}
    return subprocess.run([JAXINFER, "convert", src, out], capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.parametrize("kind", ["truncated_tensor_data", "garbage"])
def test_cli_convert_of_damaged_gguf_fails_cleanly(kind, tiny_gguf, tmp_path):
    src, _ = tiny_gguf
    if kind == "truncated_tensor_data":
        start, end = _tensor_data_span(src)
        bad = tmp_path / "truncated.gguf"
        bad.write_bytes(open(src, "rb").read()[: (start + end) // 2])
    else:
        bad = tmp_path / "x.gguf"
        bad.write_bytes(b"this is not a model\n" * 200)
    out_parent = tmp_path / "models"
    out_parent.mkdir()
    out = out_parent / "OUT"
    proc = _cli_convert(str(bad), str(out), tmp_path)
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert str(bad) in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()
    assert os.listdir(out_parent) == []  # no hidden .OUT.partial-* left behind


def test_cli_convert_of_good_tiny_gguf_is_not_refused_for_a_missing_tokenizer(tiny_gguf, tmp_path):
    """The control for the test above: a sound file converts."""
    src, _ = tiny_gguf
    out = tmp_path / "OUT"
    proc = _cli_convert(src, str(out), tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert os.path.isfile(out / "jaxinfer_config.json")


# ----------------------------------------------------------------------------------------------
# 3. The real model: SmolLM2-135M-Instruct Q4_1 GGUF, jaxinfer against transformers
# ----------------------------------------------------------------------------------------------

CHAT_PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "List three prime numbers."]
MAX_TOKENS = 32


@pytest.fixture(scope="module")
def hf_smollm2(smollm2_gguf):
    """transformers' own GGUF import of the same file: (model, tokenizer), loaded once (~20 s).

    Torch runs on one thread meanwhile: on this 2-core machine, shared with other jobs, torch's
    2-thread OpenMP decode measured ~1.5 s/token against ~0.07 s/token on one thread.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, name = os.path.split(smollm2_gguf)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32).eval()
        yield model, tokenizer
    finally:
        torch.set_num_threads(threads)


def test_smollm2_greedy_matches_transformers(smollm2_dir, hf_smollm2):
    from jaxinfer.llm import LLM
    from jaxinfer.sampling_params import SamplingParams

    model, tokenizer = hf_smollm2
    conversations = [[{"role": "user", "content": p}] for p in CHAT_PROMPTS]

    expected_prompts, expected_outputs = [], []
    for conv in conversations:
        ids = tokenizer.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=False)
        ids = list(ids)
        with torch.no_grad():
            out = model.generate(
                torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                # eos_token_id=None: no stop at EOS, like ignore_eos (min_new_tokens would instead
                # mask EOS out of the argmax and change the tokens).
                do_sample=False, max_new_tokens=MAX_TOKENS, eos_token_id=None, pad_token_id=tokenizer.pad_token_id,
            )
        expected_prompts.append(ids)
        expected_outputs.append(out[0, len(ids):].tolist())

    llm = LLM(smollm2_dir, warmup=False, progress=False, max_batch_size=4, max_prefill_tokens=128, session_len=256)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    results = llm.chat(conversations, params)

    assert len(results) == len(CHAT_PROMPTS)
    for prompt, result, want_prompt, want in zip(CHAT_PROMPTS, results, expected_prompts, expected_outputs):
        assert result.prompt_token_ids == want_prompt, prompt
        got = result.outputs[0].token_ids
        assert len(got) == MAX_TOKENS and len(want) == MAX_TOKENS
        assert got == want, (
            f"{prompt!r}:\n jaxinfer: {tokenizer.decode(got)!r}\n transformers: {tokenizer.decode(want)!r}"
        )
    france = results[0].outputs[0].text
    assert "Paris" in france, france


def test_smollm2_tokenizer_is_built_as_transformers_converts_it(smollm2_gguf, tmp_path):
    """The byte-level BPE tokenizer built from the GGUF metadata without transformers (whose GGUF
    reader needs torch, absent from `make chat`'s environment) writes the files transformers'
    conversion writes, and building it imports neither transformers nor torch."""
    import json

    from transformers import AutoTokenizer

    directory, filename = os.path.split(smollm2_gguf)
    GGUFCheckpoint(smollm2_gguf).tokenizer_backend().save_pretrained(str(tmp_path / "ours"))
    AutoTokenizer.from_pretrained(directory, gguf_file=filename).save_pretrained(str(tmp_path / "hf"))
    read = lambda side, name: (tmp_path / side / name).read_text()  # noqa: E731
    assert json.loads(read("ours", "tokenizer.json")) == json.loads(read("hf", "tokenizer.json"))
    assert read("ours", "chat_template.jinja") == read("hf", "chat_template.jinja")
    hf_config = json.loads(read("hf", "tokenizer_config.json"))
    for key, value in json.loads(read("ours", "tokenizer_config.json")).items():
        assert hf_config[key] == value, key
    code = ("import sys; from converters.gguf import GGUFCheckpoint; "
            f"assert GGUFCheckpoint({smollm2_gguf!r}).tokenizer_backend().encode('hi there') == [6004, 665]; "
            "print(sorted(m for m in ('transformers', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def write_sentencepiece_gguf(path) -> None:
    """A GGUF carrying only a small sentencepiece (``llama``) vocabulary, as llama.cpp writes one
    for Llama 2 or Mistral: unknown, BOS and EOS first, byte-fallback tokens, then pieces whose
    scores give the merge order."""
    pieces = ["▁the", "▁a", "th", "he", "▁t", "▁", "e", "t", "h", "a", "s", "▁is", "is", "i", "n", "▁in", "o",
              "r", "▁or", "d", "▁and", "an", "nd"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * 259 + [-float(i) for i in range(len(pieces))])
    w.add_token_types([2, 3, 3] + [6] * 256 + [1] * len(pieces))  # unknown, control, byte, normal
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_chat_template("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{{ eos_token }}{% endfor %}")
    w.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_sentencepiece_tokenizer_is_built_as_transformers_converts_it_without_torch(tmp_path):
    """A sentencepiece vocabulary (Llama 2, Mistral) is built by transformers' own builder from
    metadata read here, not by its GGUF reader (which imports torch, absent from `make chat`'s
    environment): the same tokenizer as ``AutoTokenizer.from_pretrained(gguf_file=...)``."""
    import json

    from transformers import AutoTokenizer

    path = tmp_path / "spm.gguf"
    write_sentencepiece_gguf(path)
    ours = GGUFCheckpoint(str(path)).tokenizer_backend()
    hf = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    for text in ["the thing is in and or", "Hello wörld\n  x", "", " leading space", "</s> <s>"]:
        assert ours(text)["input_ids"] == hf(text)["input_ids"], text
        assert ours.decode(hf(text)["input_ids"]) == hf.decode(hf(text)["input_ids"])
    assert ours("the")["input_ids"][0] == 1  # llama.cpp's default for sentencepiece: BOS added
    ours.save_pretrained(str(tmp_path / "ours"))
    hf.save_pretrained(str(tmp_path / "hf"))
    read = lambda side, name: (tmp_path / side / name).read_text()  # noqa: E731
    assert json.loads(read("ours", "tokenizer.json")) == json.loads(read("hf", "tokenizer.json"))
    assert read("ours", "chat_template.jinja") == read("hf", "chat_template.jinja")
    hf_config = json.loads(read("hf", "tokenizer_config.json"))
    for key, value in json.loads(read("ours", "tokenizer_config.json")).items():
        assert hf_config.get(key) == value, key
    code = ("import sys; from converters.gguf import GGUFCheckpoint; "
            f"assert GGUFCheckpoint({str(path)!r}).tokenizer_backend()('the a')['input_ids'] == {hf('the a')['input_ids']}; "
            "print(sorted(m for m in ('torch', 'transformers.integrations.gguf.reader') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
