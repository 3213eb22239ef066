"""``AsyncLLM``: the engine for asyncio callers (the server, the chat CLI).

The engine steps on a thread of its own, so the event loop stays free while XLA computes.
Requests and aborts reach that thread through a command queue and are applied between steps;
outputs travel back to each request's ``asyncio.Queue`` as deltas (only the new text, tokens and
logprobs of each completion). A caller that stops iterating (a cancelled task, a dropped client)
aborts its request, and its pages are released before the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import AsyncIterator, Sequence

from jaxinfer.engine import LLMEngine
from jaxinfer.outputs import CompletionOutput, RequestOutput
from jaxinfer.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


@dataclass
class _Stream:
    """Where one request's outputs go, and how much of each completion was already sent."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    sent: dict[int, tuple[int, int, bool]] = field(default_factory=dict)  # index -> (chars, tokens, done)

    def put(self, item) -> None:
        # The caller may be gone (its loop closed after it stopped listening): its abort is on the
        # way; nothing is waiting for this item.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    def delta(self, out: RequestOutput) -> RequestOutput | None:
        """The part of a cumulative output not sent yet (None if there is nothing new); the prompt
        logprobs ride in the first delta."""
        first = not self.sent
        new = []
        for c in out.outputs:
            chars, tokens, done = self.sent.get(c.index, (0, 0, False))
            if done or (len(c.text), len(c.token_ids), c.finish_reason) == (chars, tokens, None):
                continue
            logprobs = c.logprobs[tokens:] if c.logprobs is not None else None
            new.append(CompletionOutput(c.index, c.text[chars:], c.token_ids[tokens:], c.finish_reason, logprobs))
            self.sent[c.index] = (len(c.text), len(c.token_ids), c.finish_reason is not None)
        if not new:
            return None
        return RequestOutput(out.request_id, out.prompt_token_ids, new, out.finished, out.prompt, out.num_cached_tokens,
                             out.prompt_logprobs if first else None)


class AsyncLLM:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._wake = threading.Event()
        self._closed = False
        self._ids = itertools.count()
        self._thread = threading.Thread(target=self._loop, name="jaxinfer-engine", daemon=True)
        self._thread.start()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def alive(self) -> bool:
        """Whether the engine thread is running and accepting requests."""
        return not self._closed and self._thread.is_alive()

    async def generate(
        self, prompt_token_ids: Sequence[int], params: SamplingParams, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Stream the deltas of one request; raises ValueError if the engine refuses it."""
        if self._closed:
            raise RuntimeError("the engine is shut down")
        request_id = request_id or f"async-{next(self._ids)}"
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        self._send(("add", request_id, list(prompt_token_ids), params, stream))
        finished = False
        try:
            while not finished:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Stop a request; its pages are free before the next step."""
        self._send(("abort", request_id))

    def _send(self, command) -> None:
        self._commands.put(command)
        self._wake.set()

    def shutdown(self) -> None:
        """Abort what is running and stop the engine thread."""
        if not self._closed:
            self._closed = True
            self._send(("shutdown",))
            self._thread.join()

    # -- the engine thread -------------------------------------------------------------------

    def _apply(self, command) -> bool:
        kind = command[0]
        if kind == "add":
            _, request_id, prompt, params, stream = command
            try:
                self.engine.add_request(request_id, prompt, params)
            except Exception as e:  # ValueError: the request is refused; anything else: a bug
                stream.put(e)
                return True
            self._streams[request_id] = stream
        elif kind == "abort":
            self._streams.pop(command[1], None)
            self.engine.abort_request(command[1])
        elif kind == "shutdown":
            for request_id in list(self._streams):
                self.engine.abort_request(request_id)
                self._streams.pop(request_id).put(RuntimeError("the engine was shut down"))
            return False
        return True

    def _loop(self) -> None:
        running = True
        while running:
            while True:
                try:
                    command = self._commands.get_nowait()
                except queue.Empty:
                    break
                running = self._apply(command) and running
            if not running:
                break
            if not self.engine.has_unfinished_requests():
                self._wake.wait()
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:  # a bug, not bad input: fail the requests in flight, keep serving
                logger.exception("engine step failed")
                for request_id, stream in list(self._streams.items()):
                    self.engine.abort_request(request_id)
                    stream.put(RuntimeError(f"engine step failed: {e}"))
                self._streams.clear()
                continue
            for out in outputs:
                stream = self._streams.get(out.request_id)
                if stream is None:
                    continue
                delta = stream.delta(out)
                if delta is not None:
                    stream.put(delta)
                if out.finished:
                    del self._streams[out.request_id]
