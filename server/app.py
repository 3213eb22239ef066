"""The OpenAI-compatible REST server (aiohttp) over ``AsyncLLM``.

Routes: ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions`` (both
streaming over SSE or not), ``POST /tokenize``, ``POST /detokenize``, ``GET /health``,
``GET /metrics``. Every error, bad input or not, leaves as OpenAI's error envelope with its proper
status; the server keeps serving. A client that disconnects cancels its handler (aiohttp's handler
cancellation), which aborts its engine request.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field

from aiohttp import web

from jaxinfer.async_engine import AsyncLLM
from jaxinfer.compilation import compilation_count
from jaxinfer.outputs import RequestOutput
from server import openai_protocol as proto
from server.metrics import Counter, Gauge, Histogram, Registry
from server.openai_protocol import ApiError, ParsedRequest

logger = logging.getLogger(__name__)

# Sent with 429/503 when the queue is full: the usual time for queued work to drain a slot.
RETRY_AFTER_SECONDS = 1
OPEN_PATHS = ("/health", "/metrics")


@dataclass(frozen=True)
class ServerConfig:
    model_name: str
    api_keys: tuple[str, ...] = ()
    max_concurrent_requests: int = 64
    max_queued_requests: int = 256


class Admission:
    """At most ``max_concurrent`` requests in the engine and ``max_queued`` waiting for a place;
    beyond that a request is refused at once with 429 and Retry-After."""

    def __init__(self, max_concurrent: int, max_queued: int):
        self._slots = asyncio.Semaphore(max_concurrent)
        self._max_queued = max_queued
        self.waiting = 0
        self.active = 0

    @contextlib.asynccontextmanager
    async def slot(self):
        if self._slots.locked():
            if self.waiting >= self._max_queued:
                raise ApiError(429, "the server is at capacity; retry later", code="too_many_requests",
                               type="rate_limit_error", headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
        self.waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1
            self._slots.release()


class Metrics:
    def __init__(self, llm: AsyncLLM, admission: Admission):
        engine = llm.engine
        r = self.registry = Registry()
        self.requests = r.add(Counter("jaxinfer_requests_total", "HTTP requests by endpoint and status"))
        self.prompt_tokens = r.add(Counter("jaxinfer_prompt_tokens_total", "prompt tokens of finished requests"))
        self.generation_tokens = r.add(Counter("jaxinfer_generation_tokens_total", "generated tokens"))
        self.ttft = r.add(Histogram("jaxinfer_time_to_first_token_seconds", "time from request to first token"))
        self.tpot = r.add(Histogram("jaxinfer_time_per_output_token_seconds", "mean time between later tokens"))
        r.add(Gauge("jaxinfer_requests_running", "sequences in the engine's running batch", lambda: engine.num_running))
        r.add(Gauge("jaxinfer_requests_waiting", "sequences queued in the engine plus requests waiting for admission",
                    lambda: engine.num_waiting + admission.waiting))
        r.add(Gauge("jaxinfer_kv_cache_pages_used", "KV cache pages in use", lambda: engine.block_manager.num_used_pages))
        r.add(Gauge("jaxinfer_kv_cache_pages_total", "KV cache pages", lambda: engine.block_manager.usable_pages))
        r.add(Gauge("jaxinfer_compilations_total", "XLA compilations in this process", compilation_count))


class _Timing:
    """Per-request token timing, for the TTFT/TPOT histograms."""

    def __init__(self):
        self.start = time.perf_counter()
        self.first = None
        self.last = None
        self.tokens = 0

    def saw(self, n: int) -> None:
        if n:
            t = time.perf_counter()
            self.first = self.first or t
            self.last = t
            self.tokens += n

    def record(self, metrics: Metrics) -> None:
        if self.first is not None:
            metrics.ttft.observe(self.first - self.start)
            if self.tokens > 1:
                metrics.tpot.observe((self.last - self.first) / (self.tokens - 1))


METRICS = web.AppKey("metrics", Metrics)
ADMISSION = web.AppKey("admission", Admission)
MODEL_NAME = web.AppKey("model_name", str)


@dataclass
class _Choice:
    """One completion's text, tokens and logprobs, gathered from its deltas."""

    text: str = ""
    token_ids: list = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    finish_reason: str | None = None

    def add(self, c) -> None:
        self.text += c.text
        self.token_ids += c.token_ids
        self.logprobs += c.logprobs or []
        self.finish_reason = c.finish_reason or self.finish_reason


def create_app(llm: AsyncLLM, config: ServerConfig) -> web.Application:
    engine = llm.engine
    tokenizer = llm.tokenizer
    limits = proto.Limits(session_len=engine.session_len, vocab_size=engine.model_config.vocab_size)
    admission = Admission(config.max_concurrent_requests, config.max_queued_requests)
    metrics = Metrics(llm, admission)
    created = proto.now()
    app = web.Application()

    async def read_json(request: web.Request):
        try:
            return await request.json(loads=json.loads)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise proto.bad("the request body is not valid JSON") from None

    def check_model(body) -> None:
        if isinstance(body, dict):
            model = body.get("model")
            if model is not None and model != config.model_name:
                raise ApiError(404, f"the model '{model}' does not exist; this server serves '{config.model_name}'",
                               "model", "model_not_found")

    async def deltas(parsed: ParsedRequest):
        """(prompt index, delta output) of every prompt of the request, as they come.

        The first delta of every prompt is awaited before anything is yielded, so that an engine
        refusal (ValueError) surfaces as a 400 before any byte of a stream is sent."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, prompt: list[int]):
            timing = _Timing()
            try:
                async with contextlib.aclosing(llm.generate(prompt, parsed.params)) as stream:
                    async for out in stream:
                        timing.saw(sum(len(c.token_ids) for c in out.outputs))
                        await queue.put((i, out))
            except ValueError as e:
                await queue.put((i, proto.bad(str(e))))
                return
            timing.record(metrics)
            metrics.prompt_tokens.inc(len(prompt))
            metrics.generation_tokens.inc(timing.tokens)

        tasks = [asyncio.ensure_future(pump(i, p)) for i, p in enumerate(parsed.prompts)]
        try:
            unfinished = len(parsed.prompts)
            while unfinished:
                i, item = await queue.get()
                if isinstance(item, ApiError):
                    raise item
                unfinished -= item.finished
                yield i, _without_generation(item) if parsed.echo_only else item
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def completion(request: web.Request, chat: bool) -> web.StreamResponse:
        body = await read_json(request)
        check_model(body)
        parsed = (proto.parse_chat if chat else proto.parse_completion)(body, tokenizer, limits)
        async with admission.slot():
            stream = deltas(parsed)
            async with contextlib.aclosing(stream):
                first = await anext(stream, None)  # engine refusals raise here, before any output
                if parsed.stream:
                    return await stream_response(request, parsed, chat, first, stream)
                n = parsed.params.n
                choices: dict[int, _Choice] = {}
                scored: dict[int, list] = {}  # prompt index -> its prompt logprobs (echo with logprobs)
                async for i, out in _prepend(first, stream):
                    if out.prompt_logprobs is not None:
                        scored[i] = out.prompt_logprobs
                    for c in out.outputs:
                        choices.setdefault(i * n + c.index, _Choice()).add(c)
        return web.json_response({
            "id": proto.new_id("chatcmpl" if chat else "cmpl"),
            "object": "chat.completion" if chat else "text_completion",
            "created": proto.now(), "model": config.model_name,
            "choices": [choice_body(parsed, chat, index, choices[index], scored) for index in sorted(choices)],
            "usage": proto.usage(sum(len(p) for p in parsed.prompts), sum(len(c.token_ids) for c in choices.values())),
        })

    def choice_body(parsed: ParsedRequest, chat: bool, index: int, c: _Choice, scored: dict[int, list]) -> dict:
        wants_logprobs = parsed.top_logprobs is not None
        if chat:
            return {"index": index, "message": {"role": "assistant", "content": c.text},
                    "logprobs": proto.chat_logprobs(tokenizer, c.logprobs) if wants_logprobs else None,
                    "finish_reason": c.finish_reason}
        text, lp = completion_part(parsed, index // parsed.params.n, c.text, c.logprobs, 0, True, scored)
        return {"index": index, "text": text, "logprobs": lp, "finish_reason": c.finish_reason}

    def completion_part(parsed: ParsedRequest, i: int, text: str, entries: list, offset: int, first: bool,
                        scored: dict[int, list]) -> tuple[str, dict | None]:
        """A completion's text and logprobs (from ``offset`` in its text), with prompt ``i``'s text
        and prompt logprobs before them when the request echoes and this is the ``first`` part."""
        first_token = None
        if parsed.echo and first:
            text = parsed.prompt_texts[i] + text
            if parsed.top_logprobs is not None:
                entries, first_token = scored[i][1:] + entries, parsed.prompts[i][0]
        if parsed.top_logprobs is None or not entries and first_token is None:
            return text, None
        return text, proto.completion_logprobs(tokenizer, entries, offset, first_token)

    async def stream_response(request, parsed: ParsedRequest, chat: bool, first, stream) -> web.StreamResponse:
        n = parsed.params.n
        rid = proto.new_id("chatcmpl" if chat else "cmpl")
        kind = "chat.completion.chunk" if chat else "text_completion"
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)

        async def send(obj) -> None:
            await resp.write(b"data: " + json.dumps(obj).encode() + b"\n\n")

        def chunk(choices, usage=None) -> dict:
            obj = {"id": rid, "object": kind, "created": proto.now(), "model": config.model_name, "choices": choices}
            if parsed.include_usage:
                obj["usage"] = usage
            return obj

        if chat:
            await send(chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                               "finish_reason": None} for i in range(n * len(parsed.prompts))]))
        offsets: dict[int, int] = {}
        scored: dict[int, list] = {}
        tokens = 0
        try:
            async for i, out in _prepend(first, stream):
                if out.prompt_logprobs is not None:
                    scored[i] = out.prompt_logprobs
                choices = []
                for c in out.outputs:
                    index = i * n + c.index
                    tokens += len(c.token_ids)
                    lp = None
                    if chat:
                        if parsed.top_logprobs is not None and c.logprobs:
                            lp = proto.chat_logprobs(tokenizer, c.logprobs)
                        choices.append({"index": index, "delta": {"content": c.text} if c.text else {},
                                        "logprobs": lp, "finish_reason": c.finish_reason})
                    else:
                        offset = offsets.get(index, 0)
                        text, lp = completion_part(parsed, i, c.text, c.logprobs or [], offset, index not in offsets, scored)
                        offsets[index] = offset + len(text)
                        choices.append({"index": index, "text": text, "logprobs": lp, "finish_reason": c.finish_reason})
                await send(chunk(choices))
        except ApiError as e:  # a later prompt of a multi-prompt request was refused mid-stream
            await send(e.body())
        if parsed.include_usage:
            await send(chunk([], proto.usage(sum(len(p) for p in parsed.prompts), tokens)))
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def chat_completions(request):
        return await completion(request, chat=True)

    async def completions(request):
        return await completion(request, chat=False)

    async def models(request):
        return web.json_response({"object": "list", "data": [{
            "id": config.model_name, "object": "model", "created": created, "owned_by": "jaxinfer",
            "max_model_len": engine.session_len,
        }]})

    async def tokenize(request):
        body = await read_json(request)
        check_model(body)
        tokens = proto.parse_tokenize(body, tokenizer)
        return web.json_response({"tokens": tokens, "count": len(tokens), "max_model_len": engine.session_len})

    async def detokenize(request):
        body = await read_json(request)
        check_model(body)
        tokens = proto.parse_detokenize(body, tokenizer, limits.vocab_size)
        return web.json_response({"prompt": tokenizer.decode(tokens, skip_special_tokens=False)})

    async def health(request):
        if not llm.alive:
            raise ApiError(503, "the engine has stopped", type="server_error", code="engine_stopped")
        return web.json_response({"status": "ok"})

    async def metrics_handler(request):
        return web.Response(text=metrics.registry.render(), content_type="text/plain", charset="utf-8")

    routes = [
        web.get("/v1/models", models),
        web.post("/v1/chat/completions", chat_completions),
        web.post("/v1/completions", completions),
        web.post("/tokenize", tokenize),
        web.post("/detokenize", detokenize),
        web.get("/health", health),
        web.get("/metrics", metrics_handler),
    ]
    known_paths = {r.path for r in routes}

    @web.middleware
    async def errors_and_auth(request: web.Request, handler):
        status = 500
        try:
            if config.api_keys and request.path not in OPEN_PATHS:
                header = request.headers.get("Authorization", "")
                if not header.startswith("Bearer ") or header[len("Bearer "):] not in config.api_keys:
                    raise ApiError(401, "invalid or missing API key", code="invalid_api_key")
            response = await handler(request)
            status = response.status
            return response
        except ApiError as e:
            status = e.status
            return web.json_response(e.body(), status=e.status, headers=e.headers)
        except web.HTTPException as e:
            status = e.status
            code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(e.status)
            return web.json_response(ApiError(e.status, e.reason, code=code).body(), status=e.status)
        except (asyncio.CancelledError, ConnectionResetError):
            status = 499  # the client went away
            raise
        except Exception:
            logger.exception("unhandled error on %s", request.path)
            return web.json_response(ApiError(500, "internal server error", type="server_error").body(), status=500)
        finally:
            metrics.requests.inc(endpoint=request.path if request.path in known_paths else "other", status=status)

    app.middlewares.append(errors_and_auth)
    app.add_routes(routes)
    app[METRICS] = metrics
    app[ADMISSION] = admission
    app[MODEL_NAME] = config.model_name
    return app


def _without_generation(out: RequestOutput) -> RequestOutput:
    """An echo-only request's output: the one token the engine generated is not part of the answer."""
    return dataclasses.replace(out, outputs=[
        dataclasses.replace(c, text="", token_ids=[], logprobs=None if c.logprobs is None else [],
                            finish_reason=c.finish_reason and "length")
        for c in out.outputs
    ])


async def _prepend(first, stream):
    if first is not None:
        yield first
    async for item in stream:
        yield item
