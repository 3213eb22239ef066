"""The engine on a tiny random Llama: buckets and compilation, donation, stops, preemption,
prefix caching, batching, and the page-leak invariant after every test."""

import dataclasses

import jax

import numpy as np
import pytest
from tiny_models import build_tiny

from converters.loader import load_model
from jaxinfer import LLM, SamplingParams
from jaxinfer.compilation import compilation_count
from jaxinfer.engine import LLMEngine

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
SMALL = dict(max_batch_size=4, max_prefill_tokens=32, cache_block_seq_len=16, cache_max_entry_count=128)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama")
    build_tiny("llama", str(path))
    return load_model(str(path))


@pytest.fixture(scope="module")
def llm(tiny):
    return LLM(tiny, progress=False, **SMALL)


def prompts(n, seed=0, lo=1, hi=70):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 256, size=int(rng.integers(lo, hi))).tolist() for _ in range(n)]


def texts(outs):
    return [o.outputs[0].token_ids for o in outs]


def test_serving_after_warmup_compiles_nothing(llm):
    before = compilation_count()
    rng = np.random.default_rng(1)
    params = [
        SamplingParams(temperature=float(rng.choice([0, 0.7, 1.2])), top_k=int(rng.choice([0, 5])),
                       top_p=float(rng.choice([1.0, 0.9])), max_tokens=int(rng.integers(1, 30)), ignore_eos=True,
                       logit_bias={int(rng.integers(0, 256)): 2.0} if rng.random() < 0.5 else None,
                       allowed_token_ids=rng.integers(0, 256, 5).tolist() if rng.random() < 0.3 else None,
                       prompt_logprobs=int(rng.integers(0, 4)) if rng.random() < 0.4 else None)
        for _ in range(12)
    ]
    outs = llm.generate(prompts(12, seed=1), params)
    assert [len(o.outputs[0].token_ids) for o in outs] == [p.max_tokens for p in params]
    assert [o.prompt_logprobs and len(o.prompt_logprobs) for o in outs] == \
        [p.prompt_logprobs is not None and len(o.prompt_token_ids) or None for p, o in zip(params, outs)]
    assert compilation_count() == before


def test_warmup_compiles_every_bucket_without_running_it(tiny):
    engine = LLM(tiny, progress=False, warmup=False, **SMALL).engine
    runner = engine.runner
    pools = jax.tree.leaves(runner.cache)
    before = compilation_count()
    runner.warmup(progress=False)
    assert sorted(runner._warm_steps) == sorted(engine.buckets.all_shapes())
    assert sorted(runner._warm_feeds) == list(engine.buckets.decode_batch_sizes)
    assert sorted(runner._warm_samplers) == engine.buckets.batch_sizes == [1, 2, 4]  # max_batch_size 4
    assert compilation_count() > before
    assert jax.tree.leaves(runner.cache)[0] is pools[0] and not any(a.is_deleted() for a in pools)  # nothing ran
    decode = engine.buckets.decode_shape(1)
    two = engine.buckets.pad([], engine.buckets.decode_shape(2))
    wrong, sampling = jax.tree.map(np.asarray, runner._device_inputs(two))
    with pytest.raises(TypeError):  # a compiled step refuses other shapes rather than compiling them
        runner._warm_steps[decode](runner._param_leaves, runner.cache, runner.rope_table, *wrong)
    with pytest.raises(TypeError):
        runner._warm_samplers[1](np.zeros((2, engine.buckets.vocab_size), np.float32), sampling)


def test_cache_buffers_are_donated(llm):
    old = llm.engine.runner.cache
    llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=2))
    assert all(a.is_deleted() for a in jax.tree.leaves(old))
    assert not any(a.is_deleted() for a in jax.tree.leaves(llm.engine.runner.cache))


def test_batch_of_mixed_requests_equals_each_alone(llm):
    ps = prompts(6, seed=2)
    batched = texts(llm.generate(ps, GREEDY))
    alone = [texts(llm.generate([p], GREEDY))[0] for p in ps]
    assert batched == alone


def test_prompt_chunks_share_prefill_calls(llm, monkeypatch):
    buckets = llm.engine.buckets  # budget 32 tokens, at most 4 sequences
    assert (2, 16) in buckets.all_shapes() and (2, 32) not in buckets.all_shapes()
    assert buckets.prefill_groups([10, 5, 16, 30]) == [[3], [2, 0], [1]]
    with pytest.raises(ValueError, match="exceed"):
        buckets.prefill_shape(32, 2)
    shapes = []
    dispatch = llm.engine.runner.dispatch
    monkeypatch.setattr(llm.engine.runner, "dispatch",
                        lambda rows, shape, feed=None: shapes.append(shape) or dispatch(rows, shape, feed))
    ps = [[5, 6, 7], list(range(10, 22))]
    together = texts(llm.generate(ps, GREEDY))
    assert shapes[0] == (2, 16)  # both prompts in one call
    assert together == [texts(llm.generate([p], GREEDY))[0] for p in ps]


def test_seeded_sampling_is_reproducible_in_any_batch(llm):
    p = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=16, ignore_eos=True)
    alone = texts(llm.generate([[9, 8, 7, 6]], p))[0]
    mixed = texts(llm.generate([[1, 2, 3], [9, 8, 7, 6], [4] * 40], [GREEDY, p, GREEDY]))[1]
    assert alone == mixed
    unseeded = [texts(llm.generate([[9, 8, 7, 6]], dataclasses.replace(p, seed=None)))[0] for _ in range(3)]
    assert any(u != alone for u in unseeded)


def test_max_tokens_and_stop_token_ids(llm):
    free = texts(llm.generate([[10, 11, 12]], GREEDY))[0]
    out = llm.generate([[10, 11, 12]], dataclasses.replace(GREEDY, max_tokens=5))[0].outputs[0]
    assert out.token_ids == free[:5] and out.finish_reason == "length"
    stop = free[6]
    out = llm.generate([[10, 11, 12]], dataclasses.replace(GREEDY, stop_token_ids=[stop]))[0].outputs[0]
    first = free.index(stop)
    assert out.token_ids == free[: first + 1] and out.finish_reason == "stop"


def test_eos_stops_unless_ignored(tiny):
    probe = LLM(tiny, warmup=False, **SMALL)
    free = texts(probe.generate([[10, 11, 12]], GREEDY))[0]
    eos = free[4]
    with_eos = dataclasses.replace(tiny, config=dataclasses.replace(tiny.config, eos_token_ids=(eos,)))
    llm = LLM(with_eos, warmup=False, **SMALL)
    out = llm.generate([[10, 11, 12]], dataclasses.replace(GREEDY, ignore_eos=False))[0].outputs[0]
    assert out.token_ids == free[: free.index(eos) + 1] and out.finish_reason == "stop"
    out = llm.generate([[10, 11, 12]], GREEDY)[0].outputs[0]
    assert out.token_ids == free and out.finish_reason == "length"
    llm.engine.block_manager.check_no_leaks()


def test_requests_that_can_never_run_are_refused(tiny):
    llm = LLM(tiny, warmup=False, session_len=64, **{**SMALL, "cache_max_entry_count": 3})
    with pytest.raises(ValueError, match="exceeds the session length"):
        llm.generate([[1] * 60], SamplingParams(max_tokens=10))
    with pytest.raises(ValueError, match="can never fit in the KV cache"):
        llm.generate([[1] * 40], SamplingParams(max_tokens=20))
    with pytest.raises(ValueError, match="empty"):
        llm.generate([[]])
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 256\)"):
        llm.generate([[1, 999]])
    with pytest.raises(ValueError, match=r"logit_bias token ids must be in \[0, 256\)"):
        llm.generate([[1, 2]], SamplingParams(logit_bias={3: 1.0, 256: -1.0}))
    with pytest.raises(ValueError, match=r"allowed_token_ids must be in \[0, 256\)"):
        llm.generate([[1, 2]], SamplingParams(allowed_token_ids=[3, 300]))
    assert not llm.engine.has_unfinished_requests()
    llm.engine.block_manager.check_no_leaks()


def test_logit_bias_and_allowed_token_ids_are_normalized_and_checked():
    assert SamplingParams(logit_bias={5: -100, 2: 1}).logit_bias == ((2, 1.0), (5, -100.0))
    assert SamplingParams(logit_bias=[(3, 0.5)]).logit_bias == ((3, 0.5),) and SamplingParams().logit_bias == ()
    for bias, message in [({1: 100.5}, r"values must be in \[-100, 100\]"), ({1: float("nan")}, "values must be"),
                          ({-2: 1}, "non-negative"), ([(1, 1), (1, 2)], "twice"),
                          ({i: 1 for i in range(301)}, "at most 300")]:
        with pytest.raises(ValueError, match=message):
            SamplingParams(logit_bias=bias)
    p = SamplingParams(allowed_token_ids=[9, 4, 9], logit_bias={4: 2.0, 7: 1.0})
    assert p.allowed_token_ids == (4, 9) and p.listed_tokens == ((4, 2.0), (9, 0.0))
    for allowed, message in [([], "empty"), ([-1, 2], "non-negative"), (range(301), "at most 300")]:
        with pytest.raises(ValueError, match=message):
            SamplingParams(allowed_token_ids=allowed)


def test_an_engine_empties_only_the_params_it_loaded(tiny, llm, monkeypatch):
    from converters import loader

    leaves = len(jax.tree.leaves(tiny.params))
    assert leaves and len(jax.tree.leaves(llm.engine.runner.params)) > 0  # built from `tiny`...
    assert len(jax.tree.leaves(tiny.params)) == leaves  # ...which the engine left whole
    handed_out = []

    def load(*args, **kwargs):
        handed_out.append(loader.LoadedModel(tiny.config, jax.tree.map(lambda a: a + 0, tiny.params), tiny.tokenizer,
                                             tiny.dtype, tiny.path))
        return handed_out[-1]

    monkeypatch.setattr(loader, "load_model", load)
    owned = LLM("any/path", warmup=False, **SMALL)
    assert handed_out[0].params == {}  # laid out entry by entry, each source array dropped once copied
    assert texts(owned.generate(prompts(3, seed=4), GREEDY)) == texts(llm.generate(prompts(3, seed=4), GREEDY))


def test_preemption_recomputes_and_changes_nothing(tiny, llm):
    ps = prompts(4, seed=3, lo=20, hi=40)
    params = [GREEDY, SamplingParams(temperature=0.9, seed=7, max_tokens=24, ignore_eos=True), GREEDY, GREEDY]
    roomy = texts(llm.generate(ps, params))
    # 4 sequences of up to ~64 tokens in 10 pages of 16 tokens: they cannot all stay resident.
    tight = LLM(tiny, warmup=False, **{**SMALL, "cache_max_entry_count": 10})
    got = texts(tight.generate(ps, params))
    assert tight.engine.stats.preemptions > 0
    assert got == roomy
    tight.engine.block_manager.check_no_leaks()


def test_a_prompt_preempted_midway_records_its_logprobs_once(tiny, llm, monkeypatch):
    # 10 pages of 16 tokens: the scored 120-token prompt, prefilled 16 tokens a step, holds 7 of
    # them when the decoding request needs another page, and is preempted midway, twice.
    ps = [list(range(3, 33)), prompts(1, seed=9, lo=120, hi=121)[0]]
    params = [dataclasses.replace(GREEDY, max_tokens=40), dataclasses.replace(GREEDY, max_tokens=4, prompt_logprobs=1)]
    recorded = []
    append = LLMEngine._append_prompt_logprobs
    monkeypatch.setattr(LLMEngine, "_append_prompt_logprobs", staticmethod(
        lambda request, start, *a: recorded.append((len(request.prompt_logprobs), start)) or append(request, start, *a)))
    tight = LLM(tiny, warmup=False, **{**SMALL, "cache_max_entry_count": 10, "max_prefill_tokens": 16})
    got = tight.generate(ps, params)[1]
    assert any(known > start + 1 for known, start in recorded)  # a chunk recomputed after a preemption
    want = llm.generate(ps, params)[1]
    assert got.outputs[0].token_ids == want.outputs[0].token_ids
    assert [e and (e.token_id, e.top[0][0]) for e in got.prompt_logprobs] == \
        [e and (e.token_id, e.top[0][0]) for e in want.prompt_logprobs]
    np.testing.assert_allclose([e.logprob for e in got.prompt_logprobs[1:]], [e.logprob for e in want.prompt_logprobs[1:]],
                               atol=1e-5)
    tight.engine.block_manager.check_no_leaks()


def test_prefix_caching_prefills_only_new_tokens(tiny):
    llm = LLM(tiny, warmup=False, enable_prefix_caching=True, **SMALL)
    first = prompts(1, seed=4, lo=50, hi=51)[0]
    reply = texts(llm.generate([first], GREEDY))[0]
    follow_up = first + reply + [17, 18, 19, 20, 21]
    before = llm.engine.stats.prefill_tokens
    out = llm.generate([follow_up], GREEDY)[0]
    prefilled = llm.engine.stats.prefill_tokens - before
    page = SMALL["cache_block_seq_len"]
    assert out.num_cached_tokens == (len(first) + len(reply) - 1) // page * page
    assert prefilled == len(follow_up) - out.num_cached_tokens
    assert prefilled < page + 5 + page  # at most the partial pages of the old turn + the new tokens
    plain = LLM(tiny, warmup=False, **SMALL)
    assert texts(plain.generate([follow_up], GREEDY)) == [out.outputs[0].token_ids]
    llm.engine.block_manager.check_no_leaks()
    plain.engine.block_manager.check_no_leaks()


def test_abort_frees_pages(llm):
    engine = llm.engine
    engine.add_request("a", list(range(3, 40)), SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()
    assert engine.block_manager.num_used_pages > 0
    out = engine.abort_request("a")
    assert out.finished and out.outputs[0].finish_reason == "abort"
    assert engine.block_manager.num_used_pages == 0


def test_generate_api_shapes(llm):
    one = llm.generate([5, 6, 7], SamplingParams(temperature=0, max_tokens=3))
    assert len(one) == 1 and len(one[0].outputs[0].token_ids) == 3
    with pytest.raises(ValueError, match="2 sampling params for 3 prompts"):
        llm.generate([[1], [2], [3]], [GREEDY, GREEDY])
    with pytest.raises(ValueError, match="no tokenizer"):
        llm.generate("hello")
