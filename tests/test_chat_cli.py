"""`jaxinfer chat`: multi-turn sessions that reuse their KV, interruption, scripted stdin."""

import os
import select
import signal
import subprocess
import sys
import threading
import time

import pytest
from tiny_models import build_tiny

from converters.loader import load_model
from jaxinfer.cli.chat import ChatSession
from jaxinfer.engine import LLMEngine
from jaxinfer.engine_config import EngineConfig
from jaxinfer.sampling_params import SamplingParams

CHAT = [sys.executable, "-m", "jaxinfer.cli.main", "chat"]
ENGINE_FLAGS = ["--max-prefill-tokens", "64", "--cache-block-seq-len", "16", "--session-len", "4096"]


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory, smollm2_tokenizer_dir):
    """A one-layer random model that speaks through SmolLM2's tokenizer and chat template."""
    path = tmp_path_factory.mktemp("chat") / "model"
    build_tiny("llama", str(path), tokenizer_dir=smollm2_tokenizer_dir, num_hidden_layers=1, max_position_embeddings=4096)
    return str(path)


@pytest.fixture(scope="module")
def session_parts(chat_model):
    m = load_model(chat_model)
    engine = LLMEngine(
        m.config, m.params, m.tokenizer,
        EngineConfig(max_batch_size=1, max_prefill_tokens=64, cache_block_seq_len=16,
                     cache_max_entry_count=256, session_len=4096, enable_prefix_caching=True),
        m.dtype, warmup=False,
    )
    return engine, m.tokenizer


def test_second_turn_prefills_only_its_new_tokens(session_parts):
    engine, tokenizer = session_parts
    session = ChatSession(engine, tokenizer, SamplingParams(temperature=0, max_tokens=20), system="Be brief.")
    first = "".join(session.reply("Tell me about the sea."))
    assert first and session.turns[1] == {"role": "assistant", "content": first}
    before = engine.stats.prefill_tokens
    full_prompt = tokenizer.apply_chat_template(session.system + session.turns + [{"role": "user", "content": "More."}])
    "".join(session.reply("More."))
    prefilled = engine.stats.prefill_tokens - before
    assert prefilled < len(full_prompt) / 2, (prefilled, len(full_prompt))
    assert [t["role"] for t in session.turns] == ["user", "assistant", "user", "assistant"]
    engine.block_manager.check_no_leaks()


def test_interrupted_reply_is_aborted_and_kept(session_parts):
    engine, tokenizer = session_parts
    session = ChatSession(engine, tokenizer, SamplingParams(temperature=0, max_tokens=500))
    stream = session.reply("Count to a thousand.")
    said = next(stream) + next(stream)
    with pytest.raises(KeyboardInterrupt):
        stream.throw(KeyboardInterrupt)
    assert not engine.has_unfinished_requests()
    engine.block_manager.check_no_leaks()
    assert session.turns[-1] == {"role": "assistant", "content": said}
    assert "".join(session.reply("Again?"))  # the session goes on


def test_stop_event_ends_the_reply_at_a_step_boundary(session_parts):
    engine, tokenizer = session_parts
    session = ChatSession(engine, tokenizer, SamplingParams(temperature=0, max_tokens=500))
    stop = threading.Event()
    said = ""
    for delta in session.reply("Count to a thousand.", stop):
        said += delta
        stop.set()
    assert said and session.turns[-1] == {"role": "assistant", "content": said}
    assert not engine.has_unfinished_requests()
    engine.block_manager.check_no_leaks()


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
