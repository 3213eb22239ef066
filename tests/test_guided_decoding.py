"""Guided decoding through the engine: outputs that match a regex, a choice or a JSON schema,
greedy choices equal to a host replay of the grammar, neighbours left alone, async scheduling,
compilation and bad grammars."""

import dataclasses
import json
import re

import llguidance
import numpy as np
import pytest
from tiny_models import build_tiny

from converters.loader import load_model
from jaxinfer import LLM, SamplingParams
from jaxinfer.compilation import compilation_count
from jaxinfer.guided_decoding import grammar_text
from jaxinfer.sampling_params import GuidedDecodingParams as Guided
from jaxinfer.scoring import sequence_logits

SMALL = dict(max_batch_size=8, max_prefill_tokens=32, cache_block_seq_len=16, cache_max_entry_count=256)
SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "size": {"enum": ["S", "M", "L"]}},
          "required": ["ok", "size"], "additionalProperties": False}
REGEX = r"[0-9]{3}-[a-z]{2}"
CHOICES = ["yes", "no", "maybe not"]


@pytest.fixture(scope="module")
def model(tiny_chat_model):
    return load_model(tiny_chat_model)


@pytest.fixture(scope="module")
def llm(model):
    return LLM(model, warmup=False, **SMALL)


def prompt(llm, text="Answer:"):
    return llm.get_tokenizer().encode(text)


@pytest.mark.parametrize("guided, valid", [
    (Guided(regex=REGEX), lambda text: re.fullmatch(REGEX, text)),
    (Guided(choice=CHOICES), lambda text: text in CHOICES),
    (Guided(json=SCHEMA), lambda text: set(json.loads(text)) == {"ok", "size"} and json.loads(text)["size"] in "SML"),
])
def test_sampled_outputs_match_their_grammar(llm, guided, valid):
    params = SamplingParams(n=6, temperature=1.0, seed=4, max_tokens=40, guided_decoding=guided)
    out = llm.generate([prompt(llm)], params)[0]
    for c in out.outputs:
        assert valid(c.text) and c.finish_reason == "stop", c.text
    assert len({c.text for c in out.outputs}) > 1  # 6 draws of a random model: the grammar does not fix them
    llm.engine.block_manager.check_no_leaks()


def test_greedy_choices_are_the_best_tokens_the_grammar_allows(llm, model):
    """Replays each output on the host: the scoring path's logits, llguidance's mask after the
    tokens so far, the argmax of the allowed tokens."""
    tokenizer = llm.get_tokenizer()
    ll_tokenizer = llguidance.LLTokenizer(tokenizer.backend_json(), n_vocab=model.config.vocab_size,
                                          eos_token=sorted(tokenizer.eos_token_ids))
    ids = prompt(llm, "The parcel number is")
    for guided in (Guided(regex=REGEX), Guided(json=SCHEMA)):
        out = llm.generate([ids], SamplingParams(temperature=0, max_tokens=40, guided_decoding=guided))[0].outputs[0]
        matcher = llguidance.LLMatcher(ll_tokenizer, grammar_text(guided))
        mask = np.zeros(-(-model.config.vocab_size // 32), np.int32)
        for k, token in enumerate(out.token_ids):
            logits = sequence_logits(model.config, model.params, [ids + out.token_ids[:k]])[0][-1]
            matcher.unsafe_compute_mask_ptr(mask.ctypes.data, mask.nbytes)
            allowed = np.nonzero(np.unpackbits(mask.view(np.uint8), bitorder="little")[: len(logits)])[0]
            assert token == allowed[np.argmax(logits[allowed])], (k, out.text)
            assert matcher.consume_token(token)
        assert matcher.is_stopped() and out.finish_reason == "stop"


def test_unguided_neighbours_and_async_scheduling_are_unaffected(model):
    ids = [list(range(40, 40 + n)) for n in (5, 9, 13, 17)]
    plain = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    params = [plain, SamplingParams(temperature=0.9, seed=1, max_tokens=30, guided_decoding=Guided(json=SCHEMA)),
              dataclasses.replace(plain, max_tokens=20), SamplingParams(temperature=0, guided_decoding=Guided(regex=REGEX))]
    sync = LLM(model, warmup=False, async_scheduling=False, **SMALL)
    alone = [sync.generate([ids[i]], params[i])[0].outputs[0].token_ids for i in (0, 2)]
    together = sync.generate(ids, params)
    assert [together[i].outputs[0].token_ids for i in (0, 2)] == alone
    asynchronous = LLM(model, warmup=False, **SMALL).generate(ids, params)
    assert [o.outputs[0].token_ids for o in asynchronous] == [o.outputs[0].token_ids for o in together]


def test_preempted_guided_sequences_resume_their_grammar(model, llm):
    ids = [list(range(100 + 7 * i, 130 + 7 * i)) for i in range(4)]
    params = SamplingParams(temperature=0, max_tokens=60, guided_decoding=Guided(regex="[a-z]{30,40}"))
    roomy = llm.generate(ids, params)
    # 4 sequences of up to ~70 tokens in 10 pages of 16 tokens: they cannot all stay resident.
    tight = LLM(model, warmup=False, **{**SMALL, "cache_max_entry_count": 10})
    got = tight.generate(ids, params)
    assert tight.engine.stats.preemptions > 0
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in roomy]
    assert all(re.fullmatch("[a-z]{30,40}", o.outputs[0].text) for o in got)
    tight.engine.block_manager.check_no_leaks()


def test_guided_requests_compile_nothing_after_warmup(model):
    warm = LLM(model, progress=False, **SMALL)
    before = compilation_count()
    outs = warm.generate([prompt(warm), prompt(warm, "Pick one:")],
                         [SamplingParams(temperature=0.5, seed=3, max_tokens=30, guided_decoding=Guided(json=SCHEMA)),
                          SamplingParams(temperature=0, max_tokens=8, guided_decoding=Guided(choice=CHOICES))])
    assert json.loads(outs[0].outputs[0].text) and outs[1].outputs[0].text in CHOICES
    assert compilation_count() == before


def test_bad_grammars_and_combinations_are_refused(llm):
    for guided, message in [(Guided(regex="[a-"), "invalid guided decoding grammar"),
                            (Guided(json={"type": "wat"}), "invalid guided decoding grammar"),
                            (Guided(json="{not json"), "not valid JSON"),
                            (Guided(grammar="start: undefined_rule"), "invalid guided decoding grammar")]:
        with pytest.raises(ValueError, match=message):
            llm.engine.add_request("bad", prompt(llm), SamplingParams(guided_decoding=guided))
    with pytest.raises(ValueError, match="min_tokens"):
        llm.engine.add_request("bad", prompt(llm), SamplingParams(min_tokens=2, guided_decoding=Guided(regex=REGEX)))
    with pytest.raises(ValueError, match="exactly one"):
        Guided()
    with pytest.raises(ValueError, match="exactly one"):
        Guided(regex=REGEX, choice=CHOICES)
    with pytest.raises(ValueError, match="non-empty"):
        Guided(choice=[])
    assert not llm.engine.has_unfinished_requests()


def test_a_model_without_a_tokenizer_refuses_guided_requests(tmp_path):
    build_tiny("llama", str(tmp_path))
    engine = LLM(load_model(str(tmp_path)), warmup=False, **SMALL).engine
    with pytest.raises(ValueError, match="needs a tokenizer"):
        engine.add_request("r", [5, 6, 7], SamplingParams(guided_decoding=Guided(regex=REGEX)))
    assert not engine.has_unfinished_requests()
