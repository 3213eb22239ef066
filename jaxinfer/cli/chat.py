"""``jaxinfer chat [MODEL]``: a streaming terminal chat with multi-turn history.

With stdin a terminal it prompts for each turn; otherwise it reads one user turn per line and exits
at EOF (``echo hi | jaxinfer chat``). Ctrl-C stops the reply being written, not the program.
Earlier turns stay in the KV cache: the engine runs with prefix caching, so a new turn only
prefills the tokens its full pages do not already hold.
"""

from __future__ import annotations

import contextlib
import itertools
import signal
import sys
import threading
from typing import Iterator

from jaxinfer.engine import LLMEngine
from jaxinfer.engine_config import add_engine_args
from jaxinfer.sampling_params import SamplingParams
from jaxinfer.tokenizer import Tokenizer

PROMPT = "user> "


class ChatSession:
    """A conversation with one engine: ``reply(text)`` streams the answer and records both turns."""

    def __init__(self, engine: LLMEngine, tokenizer: Tokenizer, sampling: SamplingParams, system: str | None = None):
        if not tokenizer.has_chat_template:
            raise ValueError("this model's tokenizer has no chat template")
        self.engine = engine
        self.tokenizer = tokenizer
        self.sampling = sampling
        self.system = [{"role": "system", "content": system}] if system else []
        self.turns: list[dict] = []
        self._ids = itertools.count()

    def _prompt(self, user: str) -> list[int]:
        """The templated history plus the new turn, dropping the oldest turns that do not fit."""
        room = self.engine.session_len - (self.sampling.max_tokens or 1)
        while True:
            ids = self.tokenizer.apply_chat_template(self.system + self.turns + [{"role": "user", "content": user}])
            if len(ids) <= room or not self.turns:
                break
            self.turns = self.turns[2:]
        if len(ids) > room:
            raise ValueError(
                f"the message is too long: {len(ids)} tokens with {self.sampling.max_tokens} to generate "
                f"exceed the session length {self.engine.session_len}"
            )
        return ids

    def reply(self, user: str, stop: threading.Event | None = None) -> Iterator[str]:
        """Stream text deltas of the reply to ``user``; the exchange joins the history when done.

        Setting ``stop`` ends the reply at the next step boundary (what Ctrl-C does).
        """
        request_id = f"chat-{next(self._ids)}"
        self.engine.add_request(request_id, self._prompt(user), self.sampling)
        text = ""
        try:
            while self.engine.has_unfinished_requests() and not (stop and stop.is_set()):
                for out in self.engine.step():
                    new = out.outputs[0].text
                    if len(new) > len(text):
                        delta, text = new[len(text):], new
                        yield delta
        finally:
            self.engine.abort_request(request_id)  # a no-op unless interrupted; what was said stays
            self.turns += [{"role": "user", "content": user}, {"role": "assistant", "content": text}]


def add_parser(commands) -> None:
    p = commands.add_parser(
        "chat", help="chat with a model in the terminal",
        description="Streaming chat. Reads one user turn per line when stdin is not a terminal.",
    )
    p.add_argument("model", nargs="?", default=None,
                   help="HF directory, .gguf file or converted directory (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--temperature", type=float, default=0.7, help="0 for greedy (default: 0.7)")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling (default: 0.9)")
    p.add_argument("--top-k", type=int, default=40, help="0 disables (default: 40)")
    p.add_argument("--max-new-tokens", type=int, default=512, help="longest reply (default: 512)")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    p.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: float32 on CPU, bfloat16 on GPU)")
    add_engine_args(p, max_batch_size=1, enable_prefix_caching=True)
    p.set_defaults(run=run)


def run(args) -> int:
    from converters.convert import embedded_model_path
    from converters.errors import CheckpointError
    from converters.loader import load_model
    from jaxinfer.engine_config import EngineConfig

    try:
        loaded = load_model(args.model or embedded_model_path(), args.dtype)
        if loaded.tokenizer is None:
            raise ValueError(f"{loaded.path} has no tokenizer: chat needs one")
        sampling = SamplingParams(
            temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
            max_tokens=args.max_new_tokens, seed=args.seed,
        )
        engine = LLMEngine(loaded.config, loaded.params, loaded.tokenizer, EngineConfig.from_args(args), loaded.dtype)
        session = ChatSession(engine, loaded.tokenizer, sampling, args.system)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"jaxinfer chat: error: {e}", file=sys.stderr)
        return 1
    interactive = sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401 - line editing for input()
        except ImportError:
            pass
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
        stop = threading.Event()
        try:
            with _sigint_sets(stop):
                for delta in session.reply(user, stop):
                    print(delta, end="", flush=True)
            if stop.is_set():
                print(" [stopped]", end="")
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
        print(flush=True)
    return 0


@contextlib.contextmanager
def _sigint_sets(event: threading.Event):
    """While a reply streams, Ctrl-C sets ``event`` instead of raising: the engine is never
    interrupted in the middle of a step (its cache buffers are donated to each step)."""
    previous = signal.signal(signal.SIGINT, lambda *_: event.set())
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
