"""The OpenAI-compatible server, live on 127.0.0.1, driven by the official `openai` client and raw
HTTP: endpoints, streaming, concurrency, disconnects, errors, auth, overload, fuzzed bodies."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import aiohttp
import numpy as np
import openai
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from converters.loader import load_model
from jaxinfer.async_engine import AsyncLLM
from jaxinfer.compilation import compilation_count
from jaxinfer.engine import LLMEngine
from jaxinfer.engine_config import EngineConfig
from jaxinfer.scoring import sequence_logits
from server.app import ADMISSION, ServerConfig, create_app

ENGINE = dict(max_batch_size=8, max_prefill_tokens=64, cache_block_seq_len=16, cache_max_entry_count=512,
              session_len=512)
MODEL = "tiny"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """An app served from a background thread with its own event loop."""

    def __init__(self, llm: AsyncLLM, config: ServerConfig):
        from aiohttp import web

        self.llm = llm
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = create_app(llm, config)
        self.loop = asyncio.new_event_loop()
        started = threading.Event()

        async def main():
            self.runner = web.AppRunner(self.app, handler_cancellation=True, shutdown_timeout=5)
            await self.runner.setup()
            await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
            started.set()

        self.thread = threading.Thread(target=lambda: (self.loop.run_until_complete(main()), self.loop.run_forever()),
                                       daemon=True)
        self.thread.start()
        assert started.wait(30)

    def close(self):
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def settle(engine, timeout=30):
    deadline = time.time() + timeout
    while engine.has_unfinished_requests():
        assert time.time() < deadline, "requests still in the engine"
        time.sleep(0.02)
    engine.block_manager.check_no_leaks()


@pytest.fixture(scope="module")
def engine(tiny_chat_model):
    m = load_model(tiny_chat_model)
    return LLMEngine(m.config, m.params, m.tokenizer, EngineConfig(**ENGINE), m.dtype, progress=False)


@pytest.fixture(scope="module")
def server(engine):
    llm = AsyncLLM(engine)
    live = LiveServer(llm, ServerConfig(model_name=MODEL))
    yield live
    live.close()
    llm.shutdown()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def chat_prompt_len(engine, messages) -> int:
    return len(engine.tokenizer.apply_chat_template(messages))


MESSAGES = [{"role": "user", "content": "Tell me a story about a lighthouse."}]


def test_models_and_health(client, server):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert requests.get(server.url + "/health").json() == {"status": "ok"}


def test_chat_completion_and_usage(client, engine):
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0)
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("length", "stop")
    assert r.usage.prompt_tokens == chat_prompt_len(engine, MESSAGES)
    assert r.usage.completion_tokens <= 12 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    settle(engine)


def test_streaming_chat_equals_the_blocking_reply(client, engine):
    full = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_completion_tokens=20, temperature=0,
                                          extra_body={"ignore_eos": True})
    chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, max_completion_tokens=20,
                                                 temperature=0, stream=True, stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    settle(engine)


def test_completions_text_tokens_n_logprobs_echo(client, engine):
    r = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=5, n=2, temperature=0.9, seed=3,
                                  logprobs=2, echo=False)
    assert sorted(c.index for c in r.choices) == [0, 1]
    for c in r.choices:
        assert len(c.logprobs.tokens) == len(c.logprobs.token_logprobs) <= 5
        assert all(len(top) == 2 for top in c.logprobs.top_logprobs)
        assert all(lp <= 0 for lp in c.logprobs.token_logprobs)
    ids = engine.tokenizer.encode("Once upon a time")
    r2 = client.completions.create(model=MODEL, prompt=[ids, ids], max_tokens=4, temperature=0)
    assert [c.index for c in r2.choices] == [0, 1] and r2.choices[0].text == r2.choices[1].text
    assert r2.usage.prompt_tokens == 2 * len(ids)
    echoed = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=4, temperature=0, echo=True)
    assert echoed.choices[0].text == "Once upon a time" + r2.choices[0].text
    settle(engine)


def test_completions_echo_with_logprobs_scores_the_prompt(client, engine, tiny_chat_model):
    """The legacy API's scoring call (lm-eval's loglikelihood): echo + logprobs gives every prompt
    token's logprob; with max_tokens 0 nothing is generated."""
    text = "The lighthouse keeper climbed the stairs"
    ids = engine.tokenizer.encode(text)
    m = load_model(tiny_chat_model)
    logits = sequence_logits(m.config, m.params, [ids])[0]
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    r = client.completions.create(model=MODEL, prompt=text, max_tokens=3, temperature=0, logprobs=2, echo=True,
                                  extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert r.choices[0].text.startswith(text) and r.usage.completion_tokens == 3
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(ids) + 3
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    np.testing.assert_allclose(lp.token_logprobs[1 : len(ids)], [logp[i - 1, ids[i]] for i in range(1, len(ids))],
                               atol=1e-4)
    assert all(len(top) == 2 for top in lp.top_logprobs[1:])
    assert "".join(lp.tokens[: len(ids)]) == engine.tokenizer.decode(ids, skip_special_tokens=False)

    scored = client.completions.create(model=MODEL, prompt=[ids], max_tokens=0, temperature=0, logprobs=1, echo=True)
    c = scored.choices[0]
    assert c.text == text and c.finish_reason == "length" and scored.usage.completion_tokens == 0
    assert c.logprobs.tokens == lp.tokens[: len(ids)]
    np.testing.assert_allclose(c.logprobs.token_logprobs[1:], lp.token_logprobs[1 : len(ids)], atol=1e-5)

    chunks = list(client.completions.create(model=MODEL, prompt=text, max_tokens=3, temperature=0, logprobs=2,
                                            echo=True, stream=True, extra_body={"ignore_eos": True}))
    assert "".join(ch.choices[0].text for ch in chunks) == r.choices[0].text
    streamed = [x for ch in chunks if ch.choices[0].logprobs for x in ch.choices[0].logprobs.token_logprobs]
    assert streamed[0] is None
    np.testing.assert_allclose(streamed[1:], lp.token_logprobs[1:], atol=1e-5)
    settle(engine)


def test_structured_outputs(client, engine):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "size": {"enum": ["S", "M", "L"]}},
              "required": ["ok", "size"], "additionalProperties": False}
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0.8, seed=2, max_tokens=40,
                                       response_format={"type": "json_schema",
                                                        "json_schema": {"name": "item", "schema": schema}})
    item = json.loads(r.choices[0].message.content)
    assert set(item) == {"ok", "size"} and item["size"] in "SML" and r.choices[0].finish_reason == "stop"
    r = client.completions.create(model=MODEL, prompt="Pick:", max_tokens=10, n=3, temperature=1.0, seed=1,
                                  extra_body={"guided_choice": ["red", "green", "blue sky"]})
    assert all(c.text in ("red", "green", "blue sky") for c in r.choices)
    r = client.completions.create(model=MODEL, prompt="Code:", max_tokens=10, temperature=0,
                                  extra_body={"guided_regex": "[A-Z]{2}[0-9]{2}"})
    assert re.fullmatch("[A-Z]{2}[0-9]{2}", r.choices[0].text)
    r2 = client.completions.create(model=MODEL, prompt="Code:", max_tokens=10, temperature=0,
                                   extra_body={"structured_outputs": {"regex": "[A-Z]{2}[0-9]{2}"}})
    assert r2.choices[0].text == r.choices[0].text
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3, temperature=0,
                                       response_format={"type": "text"})
    assert r.choices[0].message.content
    settle(engine)


def test_chat_logprobs(client, engine):
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, temperature=0, logprobs=True,
                                       top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].logprob >= entry.top_logprobs[-1].logprob
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob, abs=1e-5)  # greedy picks the best
    settle(engine)


def test_logit_bias_bans_and_forces_tokens(client, engine):
    ids = engine.tokenizer.encode("Once upon a time")
    free = client.completions.create(model=MODEL, prompt=ids, max_tokens=3, temperature=0)
    forced_id = engine.tokenizer.encode(" castle")[-1]
    forced = client.completions.create(model=MODEL, prompt=ids, max_tokens=3, temperature=0,
                                       logit_bias={str(forced_id): 100})
    assert forced.choices[0].text == engine.tokenizer.decode([forced_id] * 3) != free.choices[0].text
    chat = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2, temperature=0,
                                          logit_bias={str(forced_id): 100})
    assert chat.choices[0].message.content == engine.tokenizer.decode([forced_id] * 2)
    only = client.completions.create(model=MODEL, prompt=ids, max_tokens=4, temperature=1.0, seed=1,
                                     extra_body={"allowed_token_ids": [forced_id]})
    assert only.choices[0].text == engine.tokenizer.decode([forced_id] * 4)
    settle(engine)


def test_32_concurrent_async_requests_compile_nothing(server, engine):
    before = compilation_count()

    async def go():
        aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=300)
        calls = [aclient.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"Question {i}"}],
                                                 max_tokens=1 + i % 17, temperature=0.7 * (i % 2), seed=i)
                 for i in range(32)]
        return await asyncio.gather(*calls)

    results = asyncio.run(go())
    assert [r.usage.completion_tokens <= 1 + i % 17 for i, r in enumerate(results)] == [True] * 32
    assert compilation_count() == before
    settle(engine)


def test_64_concurrent_streams_complete_and_free_every_page(server, engine):
    async def one(session, i):
        body = {"model": MODEL, "prompt": f"Item {i}:", "max_tokens": 8, "stream": True, "ignore_eos": True}
        tokens = 0
        async with session.post(server.url + "/v1/completions", json=body) as resp:
            assert resp.status == 200
            async for line in resp.content:
                if line.startswith(b"data: ") and line.strip() != b"data: [DONE]":
                    chunk = json.loads(line[6:])
                    assert "error" not in chunk
                    tokens += sum(1 for c in chunk["choices"] if c["text"] or c["finish_reason"])
        return tokens

    async def go():
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
            return await asyncio.gather(*(one(session, i) for i in range(64)))

    assert all(t > 0 for t in asyncio.run(go()))
    settle(engine)


def test_disconnected_stream_is_cancelled(server, engine):
    async def go():
        async with aiohttp.ClientSession() as session:
            body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 400, "stream": True, "ignore_eos": True}
            async with session.post(server.url + "/v1/chat/completions", json=body) as resp:
                seen = 0
                async for line in resp.content:
                    seen += line.startswith(b"data: ")
                    if seen >= 3:
                        break  # leaving the block closes the connection mid-stream

    asyncio.run(go())
    settle(engine, timeout=20)
    assert engine.block_manager.num_used_pages == 0


@pytest.mark.parametrize("path,body,status,param", [
    ("/v1/chat/completions", b"{not json", 400, None),
    ("/v1/chat/completions", b"[1, 2]", 400, None),
    ("/v1/chat/completions", json.dumps({"messages": "hi"}).encode(), 400, "messages"),
    ("/v1/chat/completions", json.dumps({"messages": []}).encode(), 400, "messages"),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": "wizard", "content": "x"}]}).encode(), 400, "messages"),
    ("/v1/chat/completions", json.dumps({"messages": MESSAGES, "temperature": 5}).encode(), 400, "temperature"),
    ("/v1/chat/completions", json.dumps({"messages": MESSAGES, "max_tokens": 0}).encode(), 400, "max_tokens"),
    ("/v1/chat/completions", json.dumps({"messages": MESSAGES, "max_tokens": 10_000}).encode(), 400, "max_tokens"),
    ("/v1/chat/completions", json.dumps({"messages": MESSAGES, "n": "2"}).encode(), 400, "n"),
    ("/v1/chat/completions", json.dumps({"messages": MESSAGES, "top_logprobs": 3}).encode(), 400, "top_logprobs"),
    ("/v1/chat/completions", json.dumps({"messages": MESSAGES, "stop": ["a", "b", "c", "d", "e"]}).encode(), 400, "stop"),
    ("/v1/completions", json.dumps({"prompt": "x", "logprobs": 9}).encode(), 400, "logprobs"),
    ("/v1/completions", json.dumps({"prompt": "x", "max_tokens": 0}).encode(), 400, "max_tokens"),
    ("/v1/completions", json.dumps({"prompt": "x", "response_format": {"type": "xml"}}).encode(), 400,
     "response_format"),
    ("/v1/chat/completions", json.dumps({"messages": MESSAGES, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": "not a schema"}}}).encode(), 400, "response_format"),
    ("/v1/completions", json.dumps({"prompt": "x", "guided_regex": "a", "guided_choice": ["a"]}).encode(), 400,
     "guided_choice"),
    ("/v1/completions", json.dumps({"prompt": "x", "guided_choice": []}).encode(), 400, "guided_choice"),
    ("/v1/completions", json.dumps({"prompt": "x", "structured_outputs": {"regex": "a", "choice": ["a"]}}).encode(),
     400, "structured_outputs"),
    ("/v1/completions", json.dumps({"prompt": "x", "structured_outputs": {"choice": "a"}}).encode(), 400,
     "structured_outputs"),
    ("/v1/completions", json.dumps({"prompt": "x", "guided_regex": "[a-"}).encode(), 400, None),
    ("/v1/completions", json.dumps({"prompt": "x", "guided_json": {"type": "wat"}}).encode(), 400, None),
    ("/v1/completions", json.dumps({"prompt": [1, -5]}).encode(), 400, "prompt"),
    ("/v1/completions", json.dumps({"prompt": ""}).encode(), 400, "prompt"),
    ("/v1/completions", json.dumps({"prompt": "x", "logit_bias": [1, 2]}).encode(), 400, "logit_bias"),
    ("/v1/completions", json.dumps({"prompt": "x", "logit_bias": {"abc": 1}}).encode(), 400, "logit_bias"),
    ("/v1/completions", json.dumps({"prompt": "x", "logit_bias": {"-1": 1}}).encode(), 400, "logit_bias"),
    ("/v1/completions", json.dumps({"prompt": "x", "logit_bias": {"99999999": 1}}).encode(), 400, "logit_bias"),
    ("/v1/chat/completions", json.dumps({"messages": MESSAGES, "logit_bias": {"5": 101}}).encode(), 400, "logit_bias"),
    ("/v1/chat/completions", json.dumps({"messages": MESSAGES, "logit_bias": {"5": "1"}}).encode(), 400, "logit_bias"),
    ("/v1/chat/completions", json.dumps({"messages": MESSAGES, "logit_bias": {str(i): 1 for i in range(301)}}).encode(),
     400, "logit_bias"),
    ("/v1/completions", json.dumps({"prompt": "x", "allowed_token_ids": []}).encode(), 400, "allowed_token_ids"),
    ("/v1/completions", json.dumps({"prompt": "x", "allowed_token_ids": [1, 99999999]}).encode(), 400,
     "allowed_token_ids"),
    ("/v1/completions", json.dumps({"prompt": "x", "allowed_token_ids": "1"}).encode(), 400, "allowed_token_ids"),
    ("/v1/completions", json.dumps({"prompt": "x", "model": "gpt-9"}).encode(), 404, "model"),
    ("/v1/embeddings", json.dumps({"input": "x"}).encode(), 404, None),
])
def test_bad_requests_get_openai_errors(server, engine, path, body, status, param):
    r = requests.post(server.url + path, data=body, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    if "10_000" in path or b"10000" in body:
        assert error["code"] == "context_length_exceeded"
    assert requests.get(server.url + "/health").status_code == 200  # still serving
    settle(engine)


def test_openai_client_sees_the_errors(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=100_000)
    assert err.value.code == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="other", messages=MESSAGES)


def test_tokenize_detokenize_and_metrics(server, engine):
    t = requests.post(server.url + "/tokenize", json={"prompt": "Hello world"}).json()
    assert t["tokens"] == engine.tokenizer.encode("Hello world") and t["count"] == len(t["tokens"])
    assert requests.post(server.url + "/detokenize", json={"tokens": t["tokens"]}).json()["prompt"] == "Hello world"
    chat = requests.post(server.url + "/tokenize", json={"messages": MESSAGES}).json()
    assert chat["count"] == chat_prompt_len(engine, MESSAGES)
    assert requests.post(server.url + "/detokenize", json={"tokens": [10**9]}).status_code == 400
    before = requests.get(server.url + "/metrics").text
    requests.post(server.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 3})
    text = requests.get(server.url + "/metrics").text
    for name in ("jaxinfer_requests_total", "jaxinfer_prompt_tokens_total", "jaxinfer_generation_tokens_total",
                 "jaxinfer_time_to_first_token_seconds_bucket", "jaxinfer_time_per_output_token_seconds_count",
                 "jaxinfer_requests_running", "jaxinfer_requests_waiting", "jaxinfer_kv_cache_pages_used",
                 "jaxinfer_compilations_total"):
        assert name in text, name

    def value(metrics_text, prefix):
        return sum(float(line.rsplit(" ", 1)[1]) for line in metrics_text.splitlines() if line.startswith(prefix))

    assert value(text, 'jaxinfer_requests_total{endpoint="/v1/completions",status="200"}') == \
        value(before, 'jaxinfer_requests_total{endpoint="/v1/completions",status="200"}') + 1
    assert value(text, "jaxinfer_generation_tokens_total") > value(before, "jaxinfer_generation_tokens_total")
    settle(engine)


def test_api_keys(engine):
    llm = AsyncLLM(engine)
    live = LiveServer(llm, ServerConfig(model_name=MODEL, api_keys=("k1", "k2")))
    try:
        body = {"prompt": "x", "max_tokens": 1}
        assert requests.post(live.url + "/v1/completions", json=body).status_code == 401
        bad = requests.post(live.url + "/v1/completions", json=body, headers={"Authorization": "Bearer nope"})
        assert bad.status_code == 401 and bad.json()["error"]["code"] == "invalid_api_key"
        ok = requests.post(live.url + "/v1/completions", json=body, headers={"Authorization": "Bearer k2"})
        assert ok.status_code == 200
        assert requests.get(live.url + "/health").status_code == 200  # open, for load balancers
    finally:
        live.close()
        llm.shutdown()


def test_full_queue_gets_429_with_retry_after(engine):
    llm = AsyncLLM(engine)
    live = LiveServer(llm, ServerConfig(model_name=MODEL, max_concurrent_requests=1, max_queued_requests=1))
    try:
        async def go():
            async with aiohttp.ClientSession() as session:
                async def post(tokens):
                    body = {"prompt": "x", "max_tokens": tokens, "ignore_eos": True}
                    async with session.post(live.url + "/v1/completions", json=body) as r:
                        return r.status, r.headers.get("Retry-After"), await r.json()

                admission = live.app[ADMISSION]
                long_one = asyncio.ensure_future(post(480))
                while admission.active < 1:
                    await asyncio.sleep(0.001)
                queued = asyncio.ensure_future(post(2))
                while admission.waiting < 1:
                    await asyncio.sleep(0.001)
                refused = await post(2)
                assert not long_one.done()  # the refusal came while both places were taken
                return await long_one, await queued, refused

        (s1, _, _), (s2, _, _), (s3, retry, body) = asyncio.run(go())
        assert (s1, s2, s3) == (200, 200, 429)
        assert retry == "1" and body["error"]["type"] == "rate_limit_error"
    finally:
        live.close()
        llm.shutdown()
    settle(engine)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=12,
)
FIELDS = ["model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "n",
          "stream", "stream_options", "stop", "seed", "logprobs", "top_logprobs", "echo", "presence_penalty",
          "frequency_penalty", "repetition_penalty", "min_p", "min_tokens", "stop_token_ids", "ignore_eos", "tokens",
          "best_of", "add_special_tokens", "logit_bias", "allowed_token_ids", "response_format", "structured_outputs", "guided_json",
          "guided_regex", "guided_choice", "guided_grammar"]
BODIES = st.one_of(
    JSON,
    st.dictionaries(st.sampled_from(FIELDS), JSON, max_size=6),
    st.fixed_dictionaries({"messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "x"]),
                                                                       "content": JSON}), max_size=3)},
                          optional={"max_tokens": st.integers(-3, 3), "n": st.integers(-1, 3), "stream": st.booleans(),
                                    "temperature": st.floats(-1, 3), "logprobs": JSON, "top_logprobs": JSON}),
    st.fixed_dictionaries({"prompt": JSON}, optional={"max_tokens": st.integers(-3, 3), "echo": JSON, "logprobs": JSON}),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(["/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize"]), body=BODIES)
def test_fuzzed_bodies_never_get_a_5xx(server, path, body):
    r = requests.post(server.url + path, data=json.dumps(body), headers={"Content-Type": "application/json"}, timeout=120)
    assert r.status_code < 500, (r.status_code, r.text)
    if r.status_code >= 400:
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_fuzzing_left_the_engine_clean(server, engine):
    assert requests.get(server.url + "/health").status_code == 200
    settle(engine)


def test_cli_serves_and_shuts_down_gracefully(tiny_chat_model, tmp_path):
    port = free_port()
    env = {**os.environ, "JAXINFER_HOME": os.environ["JAXINFER_HOME"]}
    proc = subprocess.Popen(
        [sys.executable, "-m", "jaxinfer.cli.main", "serve", tiny_chat_model, "--port", str(port),
         "--served-model-name", "cli-model", "--max-batch-size", "2", "--max-prefill-tokens", "32",
         "--cache-block-seq-len", "16", "--cache-max-entry-count", "64", "--session-len", "512"],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, env=env, text=True,
    )
    try:
        log = []
        for line in proc.stderr:
            log.append(line)
            if "serving cli-model on" in line:
                break
        assert any("KV cache:" in line for line in log), log
        url = f"http://127.0.0.1:{port}"
        assert requests.get(url + "/v1/models").json()["data"][0]["id"] == "cli-model"
        # a long stream is in flight when SIGTERM arrives: it is finished or closed, never left hanging
        stream = requests.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 200, "stream": True,
                                                              "ignore_eos": True}, stream=True, timeout=60)
        lines = stream.iter_lines()
        next(line for line in lines if line.startswith(b"data: "))
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(requests.exceptions.RequestException):
            rest = [line for line in lines if line]
            assert rest[-1] == b"data: [DONE]"
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
