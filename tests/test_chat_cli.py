"""`jaxinfer chat`: multi-turn sessions that reuse their KV, interruption, scripted stdin."""

import asyncio
import os
import select
import signal
import subprocess
import sys
import time

import pytest

from converters.loader import load_model
from jaxinfer.async_engine import AsyncLLM
from jaxinfer.cli.chat import ChatSession
from jaxinfer.engine import LLMEngine
from jaxinfer.engine_config import EngineConfig
from jaxinfer.sampling_params import SamplingParams

CHAT = [sys.executable, "-m", "jaxinfer.cli.main", "chat"]
ENGINE_FLAGS = ["--max-prefill-tokens", "64", "--cache-block-seq-len", "16", "--session-len", "4096"]


@pytest.fixture(scope="module")
def chat_model(tiny_chat_model):
    return tiny_chat_model


@pytest.fixture(scope="module")
def llm(chat_model):
    m = load_model(chat_model)
    engine = LLMEngine(
        m.config, m.params, m.tokenizer,
        EngineConfig(max_batch_size=1, max_prefill_tokens=64, cache_block_seq_len=16,
                     cache_max_entry_count=256, session_len=4096, enable_prefix_caching=True),
        m.dtype, warmup=False,
    )
    llm = AsyncLLM(engine)
    yield llm
    llm.shutdown()


def settled(engine, timeout=30):
    """Wait until the engine thread has nothing left to do (aborts are applied between steps)."""
    deadline = time.time() + timeout
    while engine.has_unfinished_requests():
        assert time.time() < deadline
        time.sleep(0.01)
    engine.block_manager.check_no_leaks()


async def collect(stream, limit=None):
    text = ""
    async for delta in stream:
        text += delta
        if limit is not None and len(text) >= limit:
            break
    return text


def test_second_turn_prefills_only_its_new_tokens(llm):
    engine = llm.engine
    session = ChatSession(llm, SamplingParams(temperature=0, max_tokens=20), system="Be brief.")
    first = asyncio.run(collect(session.reply("Tell me about the sea.")))
    assert first and session.turns[1] == {"role": "assistant", "content": first}
    settled(engine)
    before = engine.stats.prefill_tokens
    full_prompt = session.tokenizer.apply_chat_template(session.system + session.turns + [{"role": "user", "content": "More."}])
    asyncio.run(collect(session.reply("More.")))
    prefilled = engine.stats.prefill_tokens - before
    assert prefilled < len(full_prompt) / 2, (prefilled, len(full_prompt))
    assert [t["role"] for t in session.turns] == ["user", "assistant", "user", "assistant"]
    settled(engine)


def test_cancelled_reply_is_aborted_and_kept(llm):
    session = ChatSession(llm, SamplingParams(temperature=0, max_tokens=500))

    async def cancel_after_some_text():
        task = asyncio.create_task(collect(session.reply("Count to a thousand.")))
        while not (session.turns or task.done()):
            await asyncio.sleep(0.005)
            if llm.engine.stats.decode_tokens and not task.done():
                task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancel_after_some_text())
    settled(llm.engine)
    assert session.turns[-2]["content"] == "Count to a thousand."
    said = session.turns[-1]["content"]
    assert len(llm.engine.tokenizer.encode(said)) < 500  # cut short
    assert asyncio.run(collect(session.reply("Again?")))  # the session goes on
    settled(llm.engine)


def test_scripted_stdin_one_turn_per_line(chat_model):
    result = subprocess.run(
        CHAT + [chat_model, "--temperature", "0", "--max-new-tokens", "6", *ENGINE_FLAGS],
        input="hello\n\nsecond question\n", capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2 and all(lines), result.stdout
    assert "KV cache:" in result.stderr  # capacity in tokens, printed at start-up


def test_ctrl_c_stops_the_reply_not_the_program(chat_model):
    proc = subprocess.Popen(
        CHAT + [chat_model, "--temperature", "0", "--max-new-tokens", "3000", *ENGINE_FLAGS],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )
    try:
        proc.stdin.write(b"Write a very long story.\n")
        proc.stdin.flush()
        deadline = time.time() + 240
        while not select.select([proc.stdout], [], [], 1)[0]:  # the reply has started streaming
            assert time.time() < deadline and proc.poll() is None
        os.kill(proc.pid, signal.SIGINT)
        time.sleep(0.5)
        proc.stdin.write(b"Short one.\n")
        proc.stdin.close()
        out = proc.stdout.read().decode()
        assert proc.wait(timeout=240) == 0
    finally:
        proc.kill()
    first, _, rest = out.partition(" [stopped]\n")
    assert first and rest.strip(), out
