"""``jaxinfer chat [MODEL]``: a streaming terminal chat with multi-turn history.

With stdin a terminal it prompts for each turn; otherwise it reads one user turn per line and exits
at EOF (``echo hi | jaxinfer chat``). Replies stream from ``AsyncLLM``, whose engine steps on its
own thread: Ctrl-C cancels the reply being written (the engine aborts it between two steps), not
the program. Earlier turns stay in the KV cache: the engine runs with prefix caching, so a new turn
only prefills the tokens its full pages do not already hold.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib
import signal
import sys
from typing import AsyncIterator

from jaxinfer.async_engine import AsyncLLM
from jaxinfer.cli.model_args import add_model_args, loader_options
from jaxinfer.engine_config import EngineConfig, add_engine_args
from jaxinfer.sampling_params import SamplingParams

PROMPT = "user> "


class ChatSession:
    """A conversation: ``reply(text)`` streams the answer and records both turns."""

    def __init__(self, llm: AsyncLLM, sampling: SamplingParams, system: str | None = None):
        tokenizer = llm.tokenizer
        if tokenizer is None or not tokenizer.has_chat_template:
            raise ValueError("chat needs a tokenizer with a chat template")
        self.llm = llm
        self.tokenizer = tokenizer
        self.sampling = sampling
        self.system = [{"role": "system", "content": system}] if system else []
        self.turns: list[dict] = []

    def _prompt(self, user: str) -> list[int]:
        """The templated history plus the new turn, dropping the oldest turns that do not fit."""
        session_len = self.llm.engine.session_len
        room = session_len - (self.sampling.max_tokens or 1)
        while True:
            ids = self.tokenizer.apply_chat_template(self.system + self.turns + [{"role": "user", "content": user}])
            if len(ids) <= room or not self.turns:
                break
            self.turns = self.turns[2:]
        if len(ids) > room:
            raise ValueError(
                f"the message is too long: {len(ids)} tokens with {self.sampling.max_tokens} to generate "
                f"exceed the session length {session_len}"
            )
        return ids

    async def reply(self, user: str) -> AsyncIterator[str]:
        """Stream text deltas of the reply to ``user``; the exchange joins the history when the
        reply ends, also when it is cut short (what was said stays said)."""
        prompt = self._prompt(user)
        text = ""
        try:
            async for out in self.llm.generate(prompt, self.sampling):
                delta = out.outputs[0].text if out.outputs else ""
                if delta:
                    text += delta
                    yield delta
        finally:
            self.turns += [{"role": "user", "content": user}, {"role": "assistant", "content": text}]


async def stream_reply(session: ChatSession, user: str) -> bool:
    """Print the reply as it comes; Ctrl-C cancels it (the engine aborts it between steps).
    Returns whether it was stopped."""
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, asyncio.current_task().cancel)
    try:
        async for delta in session.reply(user):
            print(delta, end="", flush=True)
        return False
    except asyncio.CancelledError:
        return True
    finally:
        loop.remove_signal_handler(signal.SIGINT)


def add_parser(commands) -> None:
    p = commands.add_parser(
        "chat", help="chat with a model in the terminal",
        description="Streaming chat. Reads one user turn per line when stdin is not a terminal.",
    )
    add_model_args(p)
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--temperature", type=float, default=0.7, help="0 for greedy (default: 0.7)")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling (default: 0.9)")
    p.add_argument("--top-k", type=int, default=40, help="0 disables (default: 40)")
    p.add_argument("--max-new-tokens", type=int, default=512, help="longest reply (default: 512)")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    add_engine_args(p, max_batch_size=1, enable_prefix_caching=True)
    p.set_defaults(run=run)


def run(args) -> int:
    from converters.errors import CheckpointError
    from jaxinfer.llm import build_engine

    try:
        sampling = SamplingParams(
            temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
            max_tokens=args.max_new_tokens, seed=args.seed,
        )
        engine = build_engine(args.model, **loader_options(args), **dataclasses.asdict(EngineConfig.from_args(args)))
        session = ChatSession(AsyncLLM(engine), sampling, args.system)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"jaxinfer chat: error: {e}", file=sys.stderr)
        return 1
    interactive = sys.stdin.isatty()
    if interactive:
        with contextlib.suppress(ImportError):
            importlib.import_module("readline")  # gives input() line editing and history
        print("Type a message; Ctrl-C stops a reply, Ctrl-D quits.", file=sys.stderr)
    while True:
        try:
            user = input(PROMPT) if interactive else sys.stdin.readline()
        except KeyboardInterrupt:
            print(file=sys.stderr)
            continue
        except EOFError:
            break
        if not interactive and user == "":
            break
        user = user.strip()
        if not user:
            continue
        try:
            if asyncio.run(stream_reply(session, user)):
                print(" [stopped]", end="")
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
        print(flush=True)
    session.llm.shutdown()
    return 0
