"""``jaxinfer serve [MODEL]``: the OpenAI-compatible REST server."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import sys

from jaxinfer.cli.model_args import add_model_args, loader_options
from jaxinfer.engine_config import EngineConfig, add_engine_args

DEFAULT_PORT = 23333


def add_parser(commands) -> None:
    p = commands.add_parser(
        "serve", help="serve a model over an OpenAI-compatible REST API",
        description="OpenAI-compatible server (chat completions, completions, streaming, metrics). "
        "Every shape bucket is compiled before it listens.",
    )
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument("--api-keys", nargs="*", default=[], help="accepted Bearer keys (default: no authentication)")
    p.add_argument("--max-concurrent-requests", type=int, default=64, help="requests in the engine at once")
    p.add_argument("--max-queued-requests", type=int, default=256,
                   help="requests waiting for admission; more are refused with 429")
    p.add_argument("--served-model-name", default=None, help="the model id clients use (default: from MODEL)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds in-flight requests get to finish on SIGINT/SIGTERM before they are cancelled")
    add_engine_args(p, enable_prefix_caching=True)
    p.set_defaults(run=run)


def model_name(model: str | None) -> str:
    from converters.convert import EMBEDDED_MODEL_NAME

    if model is None:
        return EMBEDDED_MODEL_NAME
    base = os.path.basename(os.path.normpath(model))
    return base[: -len(".gguf")] if base.endswith(".gguf") else base


async def serve(app, host: str, port: int, shutdown_timeout: float) -> None:
    from aiohttp import web

    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=shutdown_timeout)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    from server.app import MODEL_NAME

    print(f"serving {app[MODEL_NAME]} on http://{host}:{port}/v1 (Ctrl-C to stop)", file=sys.stderr, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    print("shutting down: finishing in-flight requests", file=sys.stderr, flush=True)
    await runner.cleanup()  # stops listening, lets handlers finish, cancels them after the timeout


def run(args) -> int:
    from converters.errors import CheckpointError
    from jaxinfer.async_engine import AsyncLLM
    from jaxinfer.llm import build_engine
    from server.app import ServerConfig, create_app

    try:
        engine = build_engine(args.model, **loader_options(args), **dataclasses.asdict(EngineConfig.from_args(args)))
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"jaxinfer serve: error: {e}", file=sys.stderr)
        return 1
    llm = AsyncLLM(engine)
    config = ServerConfig(
        model_name=args.served_model_name or model_name(args.model),
        api_keys=tuple(args.api_keys),
        max_concurrent_requests=args.max_concurrent_requests,
        max_queued_requests=args.max_queued_requests,
    )
    app = create_app(llm, config)
    try:
        asyncio.run(serve(app, args.host, args.port, args.shutdown_timeout))
    except OSError as e:
        print(f"jaxinfer serve: error: cannot listen on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 1
    finally:
        llm.shutdown()
    return 0
