"""Our Flax model against HuggingFace ``transformers`` (torch, CPU) on the same tiny random weights.

For every family of ``tiny_models.FAMILIES`` (and InternLM2, which transformers lacks: a Llama
checkpoint repacked into InternLM2's layout must reproduce the Llama results), built at test time:

* fp32 logits of 4 prompts of different lengths agree within 1e-4, each prompt run alone and all
  4 run as one padded batch (``jaxinfer.scoring.sequence_logits``);
* greedy 32-token continuations equal HF ``generate``'s, each prompt alone and all 4 prompts in
  one ``LLM.generate`` call (continuous batching). The engine options force chunked prefill that
  starts mid-page, decode steps crossing page boundaries and padded decode batches.
"""

from __future__ import annotations

import contextlib
import copy
import json
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from converters.hf_config import UnsupportedModelError
from converters.loader import LoadedModel, load_model
from jaxinfer.llm import LLM
from jaxinfer.sampling_params import SamplingParams
from jaxinfer.scoring import sequence_logits
from tiny_models import BASE, FAMILIES, build_tiny, pack_as_internlm2

ALL_FAMILIES = [*FAMILIES, "internlm2"]  # internlm2: Llama weights repacked, checked against HF Llama
VOCAB = BASE["vocab_size"]
PROMPT_LENS = (3, 17, 40, 70)
MAX_NEW = 32
ATOL = 1e-4
# Small pages and a prefill budget that is not a multiple of the page size: the 40- and 70-token
# prompts are prefilled in 24-token chunks, so chunks start mid-page; decoding crosses pages too.
ENGINE = dict(
    max_batch_size=4, max_prefill_tokens=24, cache_block_seq_len=16, cache_max_entry_count=64, session_len=128,
)
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)

assert max(PROMPT_LENS) > ENGINE["max_prefill_tokens"]  # chunked prefill
assert max(PROMPT_LENS) + MAX_NEW <= ENGINE["session_len"]
assert min(PROMPT_LENS) + MAX_NEW > ENGINE["cache_block_seq_len"]  # every sequence crosses pages


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    rng = np.random.default_rng(20240611)
    return [rng.integers(0, VOCAB, n).tolist() for n in PROMPT_LENS]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """``tiny(family)`` -> (directory, torch model): each tiny HF model built once per module."""
    built: dict[str, tuple[str, torch.nn.Module]] = {}

    def get(family: str):
        if family not in built:
            directory = str(tmp_path_factory.mktemp(family))
            seed = list(FAMILIES).index(family)
            built[family] = (directory, build_tiny(family, directory, seed=seed))
        return built[family]

    return get


@pytest.fixture(scope="module")
def internlm2_dir(tiny, tmp_path_factory) -> str:
    llama_dir, _ = tiny("llama")
    out = str(tmp_path_factory.mktemp("internlm2"))
    pack_as_internlm2(llama_dir, out)
    return out


@contextlib.contextmanager
def torch_one_thread():
    """Tiny models run far faster on one torch thread than on two fighting XLA for 2 cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def hf_logits(model, ids: list[int]) -> np.ndarray:
    with torch_one_thread(), torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def hf_greedy(model, ids: list[int]) -> list[int]:
    """HF greedy continuation; ``eos_token_id=None`` (as a keyword) keeps it from stopping early."""
    x = torch.tensor([ids])
    with torch_one_thread(), torch.no_grad():
        out = model.generate(
            x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=MAX_NEW,
            eos_token_id=None, pad_token_id=0,
        )
    new = out[0, len(ids):].tolist()
    assert len(new) == MAX_NEW, f"HF stopped after {len(new)} tokens"
    return new


@pytest.fixture(scope="module")
def reference(tiny, prompts):
    """``reference(family)`` -> (HF logits, HF greedy continuations) of the prompts, computed once."""
    done: dict[str, tuple[list[np.ndarray], list[list[int]]]] = {}

    def get(family: str):
        if family not in done:
            model = tiny(family)[1]
            done[family] = ([hf_logits(model, p) for p in prompts], [hf_greedy(model, p) for p in prompts])
        return done[family]

    return get


@dataclass
class Case:
    family: str
    loaded: LoadedModel  # ours
    hf_logits: list[np.ndarray]
    hf_greedy: list[list[int]]


@pytest.fixture(scope="module", params=ALL_FAMILIES)
def case(request, tiny, reference) -> Case:
    family = request.param
    if family == "internlm2":  # the reference is HF Llama on the weights that were packed
        path, ref = request.getfixturevalue("internlm2_dir"), reference("llama")
    else:
        path, ref = tiny(family)[0], reference(family)
    loaded = load_model(path, dtype=np.float32, progress=False)
    assert loaded.config.architecture == ("llama" if family.startswith("llama") else family)
    return Case(family, loaded, *ref)


@pytest.fixture(scope="module")
def llm(case) -> LLM:
    return LLM(case.loaded, warmup=False, progress=False, **ENGINE)


def _check_logits(ours: list[np.ndarray], ref: list[np.ndarray], what: str) -> None:
    for n, (a, b) in enumerate(zip(ours, ref)):
        assert a.shape == b.shape == (PROMPT_LENS[n], VOCAB), what
        diff = float(np.abs(a - b).max())
        assert diff <= ATOL, f"{what}: prompt of {PROMPT_LENS[n]} tokens: max |ours - HF| = {diff:.3g}"


def test_logits_each_prompt_alone(case, prompts):
    c = case
    ours = [sequence_logits(c.loaded.config, c.loaded.params, [p])[0] for p in prompts]
    _check_logits(ours, c.hf_logits, f"{c.family}, alone")


def test_logits_one_padded_batch(case, prompts):
    c = case
    ours = sequence_logits(c.loaded.config, c.loaded.params, prompts)
    _check_logits(ours, c.hf_logits, f"{c.family}, padded batch")


def _check_greedy(outputs, ref: list[list[int]], what: str) -> None:
    for n, (out, expected) in enumerate(zip(outputs, ref)):
        got = list(out.outputs[0].token_ids)
        assert got == expected, f"{what}: prompt of {PROMPT_LENS[n]} tokens:\n ours {got}\n HF   {expected}"


@contextlib.contextmanager
def recorded_steps(llm: LLM):
    """Record every model call of the engine: ([(start, num_tokens) per row], padded shape)."""
    runner = llm.engine.runner
    steps: list[tuple[list[tuple[int, int]], tuple[int, int]]] = []
    dispatch = runner.dispatch

    def recording(rows, shape, feed=None):
        steps.append(([(r.start, len(r.token_ids)) for r in rows if r is not None], shape))
        return dispatch(rows, shape, feed)

    runner.dispatch = recording
    try:
        yield steps
    finally:
        del runner.dispatch


def test_greedy_each_prompt_alone(case, llm, prompts):
    with recorded_steps(llm) as steps:
        outputs = [llm.generate([p], GREEDY)[0] for p in prompts]
    _check_greedy(outputs, case.hf_greedy, f"{case.family}, alone")
    # The 70-token prompt was prefilled in chunks, some starting mid-page.
    page = ENGINE["cache_block_seq_len"]
    chunks = [rows[0] for rows, (_, q_len) in steps if q_len > 1]
    assert any(start > 0 and start % page for start, _ in chunks), chunks
    assert all(len(rows) == 1 for rows, _ in steps)


def test_greedy_continuous_batch(case, llm, prompts):
    with recorded_steps(llm) as steps:
        outputs = llm.generate(prompts, GREEDY)
    assert [o.prompt_token_ids for o in outputs] == prompts
    _check_greedy(outputs, case.hf_greedy, f"{case.family}, batched")
    # The prompts really shared decode steps, some of them padded.
    decode = [(len(rows), batch) for rows, (batch, q_len) in steps if q_len == 1]
    assert max(n for n, _ in decode) == len(prompts), decode
    assert any(n < batch for n, batch in decode), decode


def test_mistral_sliding_window_matters(tiny, reference, prompts):
    """Without the window the HF reference itself changes, so a model ignoring it fails above."""
    import transformers

    _, model = tiny("mistral")
    window = model.config.sliding_window
    assert window == 24
    assert any(n > window for n in PROMPT_LENS)
    no_window_config = copy.deepcopy(model.config)
    no_window_config.sliding_window = None
    no_window = transformers.MistralForCausalLM(no_window_config).eval()
    no_window.load_state_dict(model.state_dict())
    for p in prompts:
        a, b = hf_logits(model, p), hf_logits(no_window, p)
        assert np.abs(a[:window] - b[:window]).max() <= 1e-5  # identical inside the window
        if len(p) > window:  # and far apart beyond it
            assert np.abs(a[window:] - b[window:]).max() > 100 * ATOL
    # The greedy continuations change too (each prompt + continuation is longer than the window).
    assert any(n + MAX_NEW > window for n in PROMPT_LENS)
    assert reference("mistral")[1] != [hf_greedy(no_window, p) for p in prompts]


def test_internlm2_repacked_llama_matches_llama(tiny, reference, internlm2_dir, prompts):
    """The packed checkpoint loads to Llama's weights and logits (its greedy continuations are
    checked against HF Llama's by the ``[internlm2]`` cases above)."""
    llama = load_model(tiny("llama")[0], dtype=np.float32, progress=False)
    packed = load_model(internlm2_dir, dtype=np.float32, progress=False)
    c = packed.config
    assert c.architecture == "internlm2"
    assert c.num_kv_heads == BASE["num_key_value_heads"] < c.num_heads  # GQA: wqkv groups queries per kv head
    # The packed wqkv really is regrouped (a plain q|k|v split of it would give other weights)...
    wqkv = np.concatenate([np.asarray(packed.params["layers_0"]["attn"][f"{x}_proj"]["kernel"]) for x in "qkv"], 1)
    llama_qkv = np.concatenate([np.asarray(llama.params["layers_0"]["attn"][f"{x}_proj"]["kernel"]) for x in "qkv"], 1)
    np.testing.assert_array_equal(wqkv, llama_qkv)
    from safetensors.numpy import load_file

    raw = load_file(f"{internlm2_dir}/model.safetensors")["model.layers.0.attention.wqkv.weight"]
    assert not np.array_equal(raw.T, llama_qkv)
    # ...and the whole network computes the same logits as ours on Llama, and as HF Llama.
    ours_packed = sequence_logits(c, packed.params, prompts)
    ours_llama = sequence_logits(llama.config, llama.params, prompts)
    hf = reference("llama")[0]
    for a, b, h in zip(ours_packed, ours_llama, hf):
        assert np.abs(a - b).max() <= ATOL
        assert np.abs(a - h).max() <= ATOL


@pytest.mark.parametrize("hf_config", [
    {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]},
    {"architectures": ["GPT2LMHeadModel"]},
])
def test_unsupported_architecture_lists_supported(tmp_path, hf_config):
    (tmp_path / "config.json").write_text(json.dumps({**hf_config, "vocab_size": VOCAB, "n_embd": 64}))
    save_file({"wte.weight": np.zeros((VOCAB, 64), np.float32)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(UnsupportedModelError) as e:
        load_model(str(tmp_path), progress=False)
    message = str(e.value)
    assert "gpt2" in message.lower()
    for model_type in ("llama", "mistral", "qwen2", "qwen3", "internlm2"):
        assert model_type in message
