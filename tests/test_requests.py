"""Per-request options through the whole engine: stop strings, n > 1, logprobs, min_tokens,
penalties, batch invariance, and the asyncio engine (deltas, cancellation)."""

import asyncio
import dataclasses
import time

import numpy as np
import pytest
import torch
from tiny_models import build_tiny

from converters.loader import load_model
from jaxinfer import LLM, AsyncLLM, SamplingParams
from jaxinfer.scoring import sequence_logits

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
SMALL = dict(max_batch_size=4, max_prefill_tokens=32, cache_block_seq_len=16, cache_max_entry_count=128)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama (vocab 256, no tokenizer) and its torch twin."""
    path = tmp_path_factory.mktemp("tiny")
    torch_model = build_tiny("llama", str(path), seed=3)
    return load_model(str(path)), torch_model


@pytest.fixture(scope="module")
def llm(tiny):
    return LLM(tiny[0], warmup=False, **SMALL)


@pytest.fixture(scope="module")
def talker(tiny_chat_model):
    """A tiny model with a real tokenizer, for text-level options."""
    return LLM(tiny_chat_model, warmup=False, **SMALL)


def tokens(out, i=0):
    return out.outputs[i].token_ids


def test_stop_strings_across_token_boundaries(talker):
    prompt = talker.get_tokenizer().encode("Once upon a time")
    free = talker.generate([prompt], dataclasses.replace(GREEDY, max_tokens=40))[0].outputs[0]
    detok = talker.get_tokenizer()
    pieces = [detok.decode(free.token_ids[: i + 1]) for i in range(len(free.token_ids))]
    # a stop string that starts inside one token's text and ends inside a later one
    k = next(i for i in range(3, len(pieces)) if len(pieces[i]) - len(pieces[i - 2]) >= 4)
    start = len(pieces[k - 2]) - 2
    stop = free.text[start : len(pieces[k - 1]) + 1]
    assert len(stop) >= 3 and free.text.find(stop) == start
    out = talker.generate([prompt], dataclasses.replace(GREEDY, max_tokens=40, stop=[stop, "never appears"]))[0]
    assert out.outputs[0].text == free.text[:start] and out.outputs[0].finish_reason == "stop"
    out = talker.generate([prompt], dataclasses.replace(GREEDY, max_tokens=40, stop=stop, include_stop_str_in_output=True))[0]
    assert out.outputs[0].text == free.text[: start + len(stop)]


def test_streamed_text_never_shows_a_stop_string(talker):
    prompt = talker.get_tokenizer().encode("Once upon a time")
    free = talker.generate([prompt], dataclasses.replace(GREEDY, max_tokens=40))[0].outputs[0]
    stop = free.text[10:16]
    engine = talker.engine
    engine.add_request("s", prompt, dataclasses.replace(GREEDY, max_tokens=40, stop=[stop]))
    seen = []
    while engine.has_unfinished_requests():
        seen += [o.outputs[0].text for o in engine.step()]
    assert seen[-1] == free.text[: free.text.find(stop)]
    assert all(stop not in t and seen[-1].startswith(t) for t in seen)  # only ever grows to the final text


def test_n_completions_share_the_prompt_pages(llm):
    prompt = list(range(3, 103))  # 100 tokens: 6 full pages of 16
    before = llm.engine.stats.prefill_tokens
    out = llm.generate([prompt], SamplingParams(n=4, temperature=1.0, seed=5, max_tokens=12, ignore_eos=True))[0]
    prefilled = llm.engine.stats.prefill_tokens - before
    assert [c.index for c in out.outputs] == [0, 1, 2, 3]
    assert len({tuple(c.token_ids) for c in out.outputs}) == 4  # different seeds per completion
    assert prefilled == 100 + 3 * (100 - 96)  # the others recompute only the partial last page
    again = llm.generate([prompt], SamplingParams(n=4, temperature=1.0, seed=5, max_tokens=12, ignore_eos=True))[0]
    assert [c.token_ids for c in again.outputs] == [c.token_ids for c in out.outputs]
    greedy = llm.generate([prompt], dataclasses.replace(GREEDY, n=3))[0]
    assert tokens(greedy, 0) == tokens(greedy, 1) == tokens(greedy, 2) == tokens(llm.generate([prompt], GREEDY)[0])


def test_logprobs_are_those_of_the_model(llm, tiny):
    loaded, _ = tiny
    prompt = [5, 9, 17, 33, 65]
    out = llm.generate([prompt], dataclasses.replace(GREEDY, max_tokens=6, logprobs=3))[0].outputs[0]
    seq = prompt + out.token_ids
    logits = sequence_logits(loaded.config, loaded.params, [seq])[0]
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    for i, lp in enumerate(out.logprobs):
        row = logp[len(prompt) - 1 + i]
        assert lp.token_id == out.token_ids[i]
        np.testing.assert_allclose(lp.logprob, row[lp.token_id], atol=1e-4)
        assert [t for t, _ in lp.top] == list(np.argsort(-row)[:3])
    assert llm.generate([prompt], GREEDY)[0].outputs[0].logprobs is None


def test_prompt_logprobs_are_those_of_the_model_even_when_the_prompt_is_cached(tiny):
    loaded, torch_model = tiny
    llm = LLM(loaded, warmup=False, enable_prefix_caching=True, **SMALL)
    prompt = np.random.default_rng(8).integers(3, 256, 70).tolist()  # 3 prefill chunks of <= 32
    llm.generate([prompt], GREEDY)  # its 4 full pages are now cached
    short, other = list(range(60, 69)), list(range(40, 60))  # short shares a prefill call with other rows
    before = llm.engine.stats.prefill_tokens
    scored, scored_short, plain = llm.generate(
        [prompt, short, other],
        [dataclasses.replace(GREEDY, n=2, prompt_logprobs=3), dataclasses.replace(GREEDY, prompt_logprobs=3), GREEDY])
    # scored whole (its cached pages unused); its 2nd completion shares its full pages
    assert llm.engine.stats.prefill_tokens - before == 70 + (70 - 64) + 9 + 20
    assert plain.prompt_logprobs is None and scored.outputs[0].token_ids == scored.outputs[1].token_ids
    for ids, out in ((prompt, scored), (short, scored_short)):
        with torch.no_grad():
            logp = torch.log_softmax(torch_model(torch.tensor([ids])).logits[0].double(), -1).numpy()
        entries = out.prompt_logprobs
        assert len(entries) == len(ids) and entries[0] is None
        for i, e in enumerate(entries[1:], 1):
            assert e.token_id == ids[i]
            np.testing.assert_allclose(e.logprob, logp[i - 1, ids[i]], atol=1e-4)
            assert [t for t, _ in e.top] == list(np.argsort(-logp[i - 1])[:3])
            np.testing.assert_allclose([lp for _, lp in e.top], np.sort(logp[i - 1])[::-1][:3], atol=1e-4)
    llm.engine.block_manager.check_no_leaks()


def test_min_tokens_defers_eos(tiny):
    loaded, _ = tiny
    probe = LLM(loaded, warmup=False, **SMALL)
    free = tokens(probe.generate([[7, 8, 9]], GREEDY)[0])
    eos = free[2]
    llm = LLM(dataclasses.replace(loaded, config=dataclasses.replace(loaded.config, eos_token_ids=(eos,))), warmup=False, **SMALL)
    out = llm.generate([[7, 8, 9]], dataclasses.replace(GREEDY, ignore_eos=False, min_tokens=8))[0].outputs[0]
    assert len(out.token_ids) >= 8 and eos not in out.token_ids[:7] and out.token_ids[:2] == free[:2]
    llm.engine.block_manager.check_no_leaks()


def test_penalties_follow_the_reference_greedy_decode(llm, tiny):
    _, torch_model = tiny
    prompt = [11, 12, 13, 11, 12, 40]
    p = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, repetition_penalty=1.4,
                       presence_penalty=0.6, frequency_penalty=0.3)
    got = tokens(llm.generate([prompt], p)[0])
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(12):
            x = torch_model(torch.tensor([seq])).logits[0, -1].double().numpy()
            counts = np.bincount(seq[len(prompt):], minlength=len(x))
            for t in set(seq):
                x[t] = x[t] / 1.4 if x[t] > 0 else x[t] * 1.4
            x = x - 0.6 * (counts > 0) - 0.3 * counts
            seq.append(int(np.argmax(x)))
    assert got == seq[len(prompt):]
    assert got != tokens(llm.generate([prompt], dataclasses.replace(p, repetition_penalty=1.0, presence_penalty=0,
                                                                      frequency_penalty=0))[0])


def test_logit_bias_follows_the_reference_greedy_decode(llm, tiny):
    _, torch_model = tiny
    prompt = [21, 22, 23, 24]
    free = tokens(llm.generate([prompt], GREEDY)[0])
    bias = {free[0]: -100.0, free[1]: -2.5, 77: 1.5}
    got = tokens(llm.generate([prompt], dataclasses.replace(GREEDY, max_tokens=12, logit_bias=bias))[0])
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(12):
            x = torch_model(torch.tensor([seq])).logits[0, -1].double().numpy()
            for t, b in bias.items():
                x[t] += b
            seq.append(int(np.argmax(x)))
    assert got == seq[len(prompt):] and got[0] != free[0]
    # +100 all but forces a token, sampled or not
    forced = SamplingParams(temperature=1.0, seed=0, max_tokens=6, ignore_eos=True, logit_bias={99: 100})
    assert tokens(llm.generate([prompt], forced)[0]) == [99] * 6
    llm.engine.block_manager.check_no_leaks()


def test_allowed_token_ids_follow_the_reference_greedy_decode(llm, tiny):
    _, torch_model = tiny
    prompt = [31, 32, 33]
    allowed = [5, 17, 64, 65, 200]
    p = dataclasses.replace(GREEDY, max_tokens=8, allowed_token_ids=allowed, logit_bias={17: 0.5, 90: 50.0})
    sampled = dataclasses.replace(p, temperature=1.0, seed=3)
    got, drawn = (tokens(o) for o in llm.generate([prompt, prompt], [p, sampled]))
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(8):
            x = torch_model(torch.tensor([seq])).logits[0, -1].double().numpy()
            x[17] += 0.5  # the bias on 90 is moot: 90 is not allowed
            seq.append(allowed[int(np.argmax(x[allowed]))])
    assert got == seq[len(prompt):] and set(drawn) <= set(allowed)
    llm.engine.block_manager.check_no_leaks()


def test_greedy_request_is_batch_invariant_among_16_mixed(tiny):
    llm = LLM(tiny[0], warmup=False, **{**SMALL, "max_batch_size": 16, "cache_max_entry_count": 256})
    rng = np.random.default_rng(9)
    prompts = [rng.integers(3, 256, int(rng.integers(2, 60))).tolist() for _ in range(16)]
    params = [
        SamplingParams(temperature=float(rng.choice([0.0, 0.8])), top_p=float(rng.choice([1.0, 0.9])),
                       top_k=int(rng.choice([0, 20])), seed=int(i), max_tokens=int(rng.integers(4, 24)),
                       repetition_penalty=float(rng.choice([1.0, 1.2])), ignore_eos=True,
                       logit_bias={int(t): -5.0 for t in rng.integers(3, 256, 4)} if rng.random() < 0.5 else None)
        for i in range(16)
    ]
    params[0] = GREEDY
    batch = llm.generate(prompts, params)
    assert tokens(batch[0]) == tokens(llm.generate([prompts[0]], GREEDY)[0])
    seeded = 1 + next(i for i, p in enumerate(params[1:]) if p.temperature > 0)
    assert tokens(batch[seeded]) == tokens(llm.generate([prompts[seeded]], params[seeded])[0])
    llm.engine.block_manager.check_no_leaks()


def test_async_deltas_add_up_to_the_offline_result(tiny):
    loaded, _ = tiny
    offline = LLM(loaded, warmup=False, **SMALL)
    prompts = [[4, 5, 6], list(range(10, 50))]
    p = dataclasses.replace(GREEDY, n=2, logprobs=1, prompt_logprobs=2)
    want = offline.generate(prompts, p)
    engine = LLM(loaded, warmup=False, **SMALL).engine
    llm = AsyncLLM(engine)

    async def run(prompt):
        got = {0: [], 1: []}
        reasons = {}
        async for delta in llm.generate(prompt, p):
            got.setdefault("prompt", []).append(delta.prompt_logprobs)
            for c in delta.outputs:
                got[c.index] += c.token_ids
                assert len(c.logprobs) == len(c.token_ids)
                reasons[c.index] = c.finish_reason
        return got, reasons

    async def both():
        return await asyncio.gather(*(run(q) for q in prompts))

    try:
        results = asyncio.run(both())
    finally:
        llm.shutdown()
    for (got, reasons), w in zip(results, want):
        assert [got[0], got[1]] == [w.outputs[0].token_ids, w.outputs[1].token_ids]
        assert reasons == {0: "length", 1: "length"}
        first, *rest = got["prompt"]  # the prompt logprobs come once, with the first delta
        assert first == w.prompt_logprobs and len(first) == len(w.prompt_token_ids) and not any(rest)
    engine.block_manager.check_no_leaks()


def test_async_cancellation_frees_pages_and_refusals_raise(tiny):
    engine = LLM(tiny[0], warmup=False, **SMALL).engine
    llm = AsyncLLM(engine)

    async def scenario():
        stream = llm.generate(list(range(3, 40)), SamplingParams(max_tokens=80, ignore_eos=True))
        async for _ in stream:
            break  # the client goes away after the first delta
        await stream.aclose()
        with pytest.raises(ValueError, match="session length"):
            async for _ in llm.generate([1] * 10, SamplingParams(max_tokens=10_000)):
                pass

    try:
        asyncio.run(scenario())
        deadline = time.time() + 10
        while engine.has_unfinished_requests():
            assert time.time() < deadline, "the aborted request still runs"
            time.sleep(0.01)
        engine.block_manager.check_no_leaks()
    finally:
        llm.shutdown()
