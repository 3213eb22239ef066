"""Serving benchmark: jaxinfer's OpenAI server vs llama.cpp's ``llama-server``, over HTTP.

The shape of vLLM's ``benchmark_serving`` / LMDeploy's ``profile_restful_api``: for each
concurrency C (``--concurrency``), C client workers in a closed loop send ``--num-prompts``
streaming requests (``POST /v1/completions``, ``stream: true``) to the server under test; each
worker sends its next request as soon as its previous one has finished. Every request's prompt is
a different ``--input-len``-token window of real English text (``pydoc_data.topics``, tokenized
with the model's tokenizer and sent as token ids, so both servers see exactly the same tokens),
and every request generates exactly ``--output-len`` tokens (greedy, ``ignore_eos: true``, which
both servers accept). No prompt is sent twice, so neither server's prefix cache ever hits.

Servers (``--servers``), each started by this script on a free local port and stopped after:
  - ``jaxinfer``: ``jaxinfer serve <the converted embedded SmolLM2-135M-Instruct> --max-batch-size
    <largest C> --session-len <input + output>`` (float32; every shape bucket compiled before it
    listens), started once and kept for every C (it idles without using the CPU while the others
    run). ``jaxinfer-bf16``: the same with ``--dtype bfloat16`` (bfloat16 weights; on CPU float32
    activations and KV cache).
  - ``llama-f32`` / ``llama-bf16`` / ``llama-q4_1``: ``llama-server -m <GGUF> --parallel C --cont-batching -c
    C*(input + output + 16) -t 2 -tb 2``, restarted for every C, built once from the llama.cpp
    vendored in the ``llama-cpp-python`` 0.3.36 sdist (``peers.build_llama_server``). F32: the
    embedded Q4_1 GGUF with every tensor dequantized (``peers.write_dense_gguf``: the same numbers as
    jaxinfer's float32 weights); BF16: the same with the matrices rounded to bfloat16 (what
    ``--dtype bfloat16`` gives jaxinfer: the like-for-like peer of ``jaxinfer-bf16``); Q4_1: the
    embedded file itself. On a CPU with AMX, llama.cpp's AMX
    buffer type crashes on matmuls of 2+ rows (see ``peers.default_buffers_work``); a probe
    request (``--llama-repack auto``) finds out and then runs that file with ``--no-repack``
    (llama.cpp's switch for its extra buffer types: AMX and weight repacking).

At every C the servers run in turn (jaxinfer, jaxinfer-bf16, llama-f32, llama-bf16, llama-q4_1), so a
change in the load of this shared machine hits them all. Each server first gets an untimed warm-up round of C requests
of 4 tokens.

Figures per (server, C), over the requests of the run (vLLM's definitions):
  - request throughput: completed requests / wall time (first request sent to last one done);
  - output tok/s: generated tokens (the server's ``usage.completion_tokens``) / wall time;
  - TTFT: request sent to its first streamed chunk with text;
  - TPOT: (end-to-end latency - TTFT) / (output tokens - 1), per request;
  - ITL: every gap between consecutive chunks with text (one chunk per token on both servers);
  - E2E: request sent to the end of its stream.
  median / p90 / p99 of TTFT, TPOT, ITL; median of E2E.

Goal (issue "Server", item 6): at 16 concurrent requests, jaxinfer's output tok/s at least 1.5x
llama-server's (F32 and Q4_1), measured side by side; reported for both jaxinfer servers.

    .venv/bin/python benchmarks/serving.py --concurrency 1,2 --num-prompts 4 --output-len 16
    .venv/bin/python benchmarks/serving.py --write-results   # full run, plot, RESULTS.md
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from report import REPO, load_average, plot_reference, publish  # noqa: E402

import peers  # noqa: E402

DEFAULT_PLOT = os.path.join(HERE, "serving.png")
SERVERS = ("jaxinfer", "jaxinfer-bf16", "llama-f32", "llama-bf16", "llama-q4_1")
LABELS = {"jaxinfer": "jaxinfer (fp32)", "jaxinfer-bf16": "jaxinfer (bf16 weights)", "llama-f32": "llama-server F32",
          "llama-bf16": "llama-server BF16", "llama-q4_1": "llama-server Q4_1"}
JAXINFER_FLAGS = {"jaxinfer": [], "jaxinfer-bf16": ["--dtype", "bfloat16"]}
GOAL_CONCURRENCY = 16
GOAL_RATIO = 1.5
WARMUP_TOKENS = 4
LLAMA_CTX_MARGIN = 16


# -- prompts ---------------------------------------------------------------------------------------

def english_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def prompt_windows(tokenizer, n: int | None, length: int) -> list[list[int]]:
    """``n`` (None: all) different, non-overlapping ``length``-token windows of English text."""
    ids = tokenizer.encode(english_text(), add_special_tokens=False)
    if n is None:
        n = len(ids) // length
    if len(ids) < n * length:
        raise SystemExit(
            f"the English text has {len(ids)} tokens: not enough for {n} different prompts of {length} tokens; "
            f"lower --num-prompts or --input-len"
        )
    return [ids[i * length: (i + 1) * length] for i in range(n)]


# -- servers ---------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """One server under test: a child process of ours, its log in a file, stopped by its pid."""

    def __init__(self, name: str, cmd: list[str], port: int, log_path: str, env: dict | None = None):
        self.name, self.cmd, self.port, self.log_path, self.env = name, cmd, port, log_path, env
        self.proc: subprocess.Popen | None = None
        self.start_s = float("nan")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float) -> None:
        import urllib.error
        import urllib.request

        os.makedirs(os.path.dirname(self.log_path), exist_ok=True)
        log = open(self.log_path, "w")
        log.write("$ " + " ".join(self.cmd) + "\n")
        log.flush()
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=self.env, start_new_session=True)
        log.close()
        deadline = t0 + timeout
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode} while starting; "
                                   f"log {self.log_path}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        self.start_s = time.perf_counter() - t0
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"{self.name} did not become healthy in {timeout:.0f} s; log {self.log_path}:\n"
                           f"{self.log_tail()}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM to the process we started (its own session: its pid is its group), then SIGKILL."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode

    def log_tail(self, n: int = 25) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""


def jaxinfer_command(model_dir: str, port: int, args, flags: list[str]) -> list[str]:
    exe = os.path.join(os.path.dirname(sys.executable), "jaxinfer")
    base = [exe] if os.path.exists(exe) else [sys.executable, "-m", "jaxinfer.cli.main"]
    return [
        *base, "serve", model_dir, "--port", str(port),
        "--max-batch-size", str(max(args.concurrency_list)),
        "--session-len", str(args.input_len + args.output_len),
        "--max-concurrent-requests", str(max(64, max(args.concurrency_list))),
        *flags, *args.jaxinfer_args.split(),
    ]


def llama_command(binary: str, gguf: str, port: int, parallel: int, args, repack: bool) -> list[str]:
    ctx = parallel * (args.input_len + args.output_len + LLAMA_CTX_MARGIN)
    return [
        binary, "-m", gguf, "--host", "127.0.0.1", "--port", str(port),
        "--parallel", str(parallel), "--cont-batching", "-c", str(ctx),
        "-t", str(args.llama_threads), "-tb", str(args.llama_threads),
        *([] if repack else ["--no-repack"]),
        *args.llama_args.split(),
    ]


# -- the client --------------------------------------------------------------------------------------

@dataclass
class RequestResult:
    ok: bool = False
    status: int = 0
    error: str = ""
    tokens: int = 0  # usage.completion_tokens (or the chunks with text, without usage)
    chunks: int = 0
    ttft: float = float("nan")
    e2e: float = float("nan")
    itl: list[float] = field(default_factory=list)


async def send_request(session, url: str, payload: dict, expect_tokens: int) -> RequestResult:
    import aiohttp

    r = RequestResult()
    t0 = time.perf_counter()
    last = None
    usage_tokens = None
    try:
        async with session.post(url, json=payload) as resp:
            r.status = resp.status
            if resp.status != 200:
                r.error = f"HTTP {resp.status}: {(await resp.text())[:300]}"
                return r
            buffer = b""
            done = False
            async for piece in resp.content.iter_any():
                buffer += piece
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    line = line.strip()
                    if not line.startswith(b"data:"):
                        continue
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        done = True
                        continue
                    now = time.perf_counter()
                    obj = json.loads(data)
                    if "error" in obj:
                        r.error = f"error in stream: {json.dumps(obj['error'])[:300]}"
                        return r
                    if obj.get("usage"):
                        usage_tokens = obj["usage"].get("completion_tokens")
                    if any(c.get("text") for c in obj.get("choices") or ()):
                        r.chunks += 1
                        if last is None:
                            r.ttft = now - t0
                        else:
                            r.itl.append(now - last)
                        last = now
            r.e2e = time.perf_counter() - t0
            if not done:
                r.error = "the stream ended without [DONE]"
                return r
    except (aiohttp.ClientError, asyncio.TimeoutError, json.JSONDecodeError, ConnectionError) as e:
        r.error = f"{type(e).__name__}: {e}"[:300] or type(e).__name__
        return r
    r.tokens = usage_tokens if usage_tokens is not None else r.chunks
    if r.tokens != expect_tokens:
        r.error = f"generated {r.tokens} tokens, expected {expect_tokens}"
        return r
    if last is None:
        r.error = "no chunk with text"
        return r
    r.ok = True
    return r


def payload(prompt: list[int], output_len: int, model: str | None) -> dict:
    body = {
        "prompt": prompt, "max_tokens": output_len, "temperature": 0.0, "ignore_eos": True,
        "stream": True, "stream_options": {"include_usage": True},
    }
    if model:
        body["model"] = model
    return body


async def run_closed_loop(base_url: str, prompts: list[list[int]], concurrency: int, output_len: int,
                          model: str | None, read_timeout: float) -> tuple[list[RequestResult], float]:
    """``concurrency`` workers send ``prompts`` in order, each its next as soon as its last is done."""
    import aiohttp

    url = base_url + "/v1/completions"
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=read_timeout)
    results: list[RequestResult | None] = [None] * len(prompts)
    pending = iter(range(len(prompts)))
    # A new connection per request (force_close): llama-server closes kept-alive connections after a
    # streamed response, and reusing a pooled one then fails ("Server disconnected").
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        async def worker():
            for i in pending:
                results[i] = await send_request(session, url, payload(prompts[i], output_len, model), output_len)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return results, wall


def probe_llama(binary: str, gguf: str, args, log_dir: str, label: str) -> tuple[bool, str]:
    """Whether llama-server with its default buffer types survives a batch of 16-token prompts."""
    port = free_port()
    srv = ServerProcess(f"{label} probe", llama_command(binary, gguf, port, 2, args, repack=True), port,
                        os.path.join(log_dir, f"{label}-probe.log"))
    try:
        srv.start(args.start_timeout)
        prompts = [list(range(1000 + 16 * i, 1016 + 16 * i)) for i in range(2)]
        results, _ = asyncio.run(run_closed_loop(srv.url, prompts, 2, 4, None, 60))
        time.sleep(0.5)
        alive = srv.alive()
        ok = alive and all(r.ok for r in results)
        detail = "" if ok else (
            f"server {'alive' if alive else f'died (exit {srv.proc.returncode})'}; "
            + "; ".join(r.error for r in results if r.error)
        )
        return ok, detail
    except RuntimeError as e:
        rc = srv.proc.returncode if srv.proc is not None else None
        if rc is None:
            return False, str(e).splitlines()[0]
        how = f"signal {signal.Signals(-rc).name}" if rc < 0 and -rc in signal.valid_signals() else f"exit {rc}"
        lines = [x.strip() for x in srv.log_tail(3).splitlines() if x.strip()]
        return False, (f"llama-server died while loading ({how}), before serving a request (its start-up "
                       f"warm-up decode); last log line: `{lines[-1] if lines else ''}`")
    finally:
        srv.stop()


# -- figures -------------------------------------------------------------------------------------------

def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def summarize(results: list[RequestResult], wall: float, output_len: int) -> dict:
    ok = [r for r in results if r.ok]
    ttft = [r.ttft for r in ok]
    tpot = [(r.e2e - r.ttft) / (r.tokens - 1) for r in ok if r.tokens > 1]
    itl = [g for r in ok for g in r.itl]
    tokens = sum(r.tokens for r in ok)
    errors: dict[str, int] = {}
    for r in results:
        if not r.ok:
            key = re.sub(r"\d+ tokens", "N tokens", r.error) if r.error.startswith("generated") else r.error
            errors[key] = errors.get(key, 0) + 1
    out = {
        "requests": len(results), "ok": len(ok), "wall_s": wall,
        "req_s": len(ok) / wall, "out_tok_s": tokens / wall, "tokens": tokens,
        "chunks_per_token": (sum(r.chunks for r in ok) / tokens) if tokens else float("nan"),
        "e2e_med_s": statistics.median(r.e2e for r in ok) if ok else float("nan"),
        "errors": errors,
        "statuses": sorted({r.status for r in results}),
    }
    for name, values, scale in (("ttft", ttft, 1e3), ("tpot", tpot, 1e3), ("itl", itl, 1e3)):
        for q in (50, 90, 99):
            out[f"{name}_p{q}_ms"] = pct(values, q) * scale
        out[f"{name}_mean_ms"] = (statistics.fmean(values) * scale) if values else float("nan")
    return out


def fmt(x: float, spec: str) -> str:
    return "-" if x != x else format(x, spec)


def plot(path: str, rows: list[dict], servers: list[str], concurrency: list[int], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {"jaxinfer": ("tab:blue", "o"), "jaxinfer-bf16": ("tab:cyan", "s"), "llama-f32": ("tab:red", "v"),
              "llama-bf16": ("tab:orange", "D"),
              "llama-q4_1": ("tab:green", "^")}
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    panels = (
        (axes[0][0], "out_tok_s", "output tokens/s (total)", False),
        (axes[0][1], "ttft_p50_ms", "median TTFT (ms)", True),
        (axes[1][0], "tpot_p50_ms", "median TPOT (ms)", False),
    )
    for ax, key, label, logy in panels:
        for name in servers:
            color, marker = styles[name]
            pts = sorted((r["concurrency"], r[key]) for r in rows if r["server"] == name and r[key] == r[key])
            if not pts:
                continue
            xs, ys = zip(*pts)
            ax.plot(xs, ys, color=color, marker=marker, label=LABELS[name])
            if key == "out_tok_s":
                for x, y in pts:
                    ax.annotate(f"{y:.0f}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8, color=color)
        if key == "out_tok_s":
            goal = [r["out_tok_s"] * GOAL_RATIO for r in rows
                    if r["server"] == "llama-f32" and r["concurrency"] == GOAL_CONCURRENCY]
            if goal:
                ax.plot([GOAL_CONCURRENCY], goal, marker="*", color="black", linestyle="none", markersize=12,
                        label=f"goal: {GOAL_RATIO}x llama-server F32 at {GOAL_CONCURRENCY}")
        ax.set_xscale("log", base=2)
        ax.set_xticks(concurrency)
        ax.set_xticklabels([str(c) for c in concurrency])
        ax.set_xlabel("concurrent requests")
        ax.set_ylabel(label)
        if logy:
            ax.set_yscale("log")
        else:
            ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    # The latency/throughput trade-off: each point one concurrency level.
    ax = axes[1][1]
    for name in servers:
        color, marker = styles[name]
        pts = sorted((r["concurrency"], r["tpot_p50_ms"], r["out_tok_s"]) for r in rows if r["server"] == name)
        if not pts:
            continue
        ax.plot([p[1] for p in pts], [p[2] for p in pts], color=color, marker=marker, label=LABELS[name])
        for c, x, y in pts:
            ax.annotate(f"C={c}", (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7, color=color)
    ax.set_xlabel("median TPOT (ms)  [lower is better]")
    ax.set_ylabel("output tokens/s (total)")
    ax.set_ylim(bottom=0)
    ax.set_xlim(left=0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("latency vs throughput", fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {os.path.relpath(path, REPO)}")


def jaxinfer_request_statuses(base_url: str) -> str:
    """The server's own count of requests by endpoint and status, from /metrics."""
    import urllib.request

    try:
        with urllib.request.urlopen(base_url + "/metrics", timeout=10) as r:
            text = r.read().decode()
    except OSError as e:
        return f"(no /metrics: {e})"
    lines = [x for x in text.splitlines() if x.startswith("jaxinfer_requests_total{")]
    return ", ".join(x.replace("jaxinfer_requests_total", "") for x in lines) or "(none)"


class CpuMeter:
    """CPU time used on the whole machine, by the server under test and by this client, over an interval."""

    HZ = os.sysconf("SC_CLK_TCK")

    def __init__(self, server_pid: int):
        self.pid = server_pid
        self.t0, self.busy0, self.server0, self.me0 = time.perf_counter(), self._busy(), self._proc(server_pid), \
            self._proc(os.getpid())

    @staticmethod
    def _busy() -> float:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        # user nice system idle iowait irq softirq steal: all but idle and iowait
        return (sum(v[:8]) - v[3] - v[4]) / CpuMeter.HZ

    @staticmethod
    def _proc(pid: int) -> float:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / CpuMeter.HZ  # utime + stime, all threads
        except (OSError, IndexError, ValueError):
            return float("nan")

    def stop(self) -> dict:
        wall = time.perf_counter() - self.t0
        cores = os.cpu_count() or 1
        busy = self._busy() - self.busy0
        server = self._proc(self.pid) - self.server0
        me = self._proc(os.getpid()) - self.me0
        return {"server_cpu": server / wall, "client_cpu": me / wall,
                "foreign_cpu": max(0.0, busy - server - me) / wall, "cores": cores}


def machine_busy(window: float = 2.0) -> float:
    """Cores busy on the whole machine, except this process, over ``window`` seconds."""
    busy0, me0 = CpuMeter._busy(), CpuMeter._proc(os.getpid())
    time.sleep(window)
    return max(0.0, (CpuMeter._busy() - busy0) - (CpuMeter._proc(os.getpid()) - me0)) / window


def wait_for_quiet(threshold: float, max_wait: float) -> tuple[float, float]:
    """Wait (at most ``max_wait`` s) until other processes use under ``threshold`` cores; (waited s, busy)."""
    t0 = time.perf_counter()
    busy = machine_busy()
    while busy > threshold and time.perf_counter() - t0 < max_wait:
        busy = machine_busy()
    return time.perf_counter() - t0, busy


class PromptPool:
    """Fresh prompts for retried runs: a window is never sent twice (no prefix-cache hits)."""

    def __init__(self, windows: list[list[int]]):
        self.windows, self.next = windows, 0

    def take(self, n: int) -> list[list[int]] | None:
        if self.next + n > len(self.windows):
            return None
        self.next += n
        return self.windows[self.next - n: self.next]


def run_level(srv: ServerProcess, name: str, c: int, rep: int, warm_prompts, prompts, args, anomalies,
              spare: PromptPool) -> dict:
    """Warm-up, then a timed closed-loop run of ``prompts`` at concurrency ``c``.

    Before it, waits for the machine to be quiet (``--quiet-threshold``, at most ``--quiet-wait`` s);
    a run during which other processes used more than ``--quiet-threshold`` cores is disturbed and
    is run again (at most ``--retries`` times, on fresh prompts); the least disturbed attempt counts.
    """
    if not srv.alive():
        raise RuntimeError(f"{name} is not running; log {srv.log_path}:\n{srv.log_tail()}")
    tag = f"{name} C={c} repeat {rep + 1}"
    warm, _ = asyncio.run(run_closed_loop(srv.url, warm_prompts, c, WARMUP_TOKENS, None, args.read_timeout))
    bad_warm = [r.error for r in warm if not r.ok]
    if bad_warm:
        anomalies.append(f"{tag} warm-up: {len(bad_warm)} failed ({bad_warm[0]})")
    attempts = []
    while True:
        waited, busy = wait_for_quiet(args.quiet_threshold, args.quiet_wait)
        load = os.getloadavg()[0]
        meter = CpuMeter(srv.proc.pid)
        results, wall = asyncio.run(run_closed_loop(srv.url, prompts, c, args.output_len, None, args.read_timeout))
        f = summarize(results, wall, args.output_len)
        f.update(meter.stop(), server=name, concurrency=c, repeat=rep + 1, load1=load, waited_s=waited,
                 attempt=len(attempts) + 1)
        attempts.append(f)
        if f["errors"]:
            anomalies.append(f"{tag} attempt {f['attempt']}: {f['requests'] - f['ok']} of {f['requests']} requests "
                             "failed: " + "; ".join(f"{n}x {e}" for e, n in f["errors"].items()))
        if not srv.alive():
            anomalies.append(f"{tag}: the server died (exit {srv.proc.returncode}); log tail: " + srv.log_tail(10))
        print(f"  {name:10s} C={c:3d} r{rep + 1} a{f['attempt']}: {f['ok']}/{f['requests']} ok in {wall:6.1f} s, "
              f"{f['req_s']:5.2f} req/s, {f['out_tok_s']:7.1f} out tok/s, TTFT p50 {f['ttft_p50_ms']:7.0f} ms, TPOT p50 "
              f"{f['tpot_p50_ms']:6.1f} ms, ITL p50/p99 {f['itl_p50_ms']:6.1f}/{f['itl_p99_ms']:6.1f} ms; CPU cores: "
              f"server {f['server_cpu']:.2f}, client {f['client_cpu']:.2f}, others {f['foreign_cpu']:.2f} "
              f"(waited {waited:.0f} s for quiet{'' if busy <= args.quiet_threshold else ', gave up'}; "
              f"load1 {load:.2f})", flush=True)
        if f["foreign_cpu"] <= args.quiet_threshold or len(attempts) > args.retries or not srv.alive():
            break
        prompts = spare.take(len(prompts))
        if prompts is None:
            anomalies.append(f"{tag}: no fresh prompts left for another attempt")
            break
    best = min(attempts, key=lambda a: a["foreign_cpu"])
    best["attempts"] = [(a["out_tok_s"], a["foreign_cpu"]) for a in attempts]
    return best


def median_repeat(fs: list[dict]) -> dict:
    """The repeat with the median output tok/s (of two, the better); every figure from that one repeat."""
    ranked = sorted(fs, key=lambda f: f["out_tok_s"])
    chosen = dict(ranked[len(ranked) // 2])
    chosen["all_out_tok_s"] = [f["out_tok_s"] for f in fs]
    chosen["all_foreign_cpu"] = [f["foreign_cpu"] for f in fs]
    return chosen


# -- main ------------------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--concurrency", default="1,8,16,32", help="comma-separated concurrency levels (default 1,8,16,32)")
    ap.add_argument("--input-len", type=int, default=128, help="prompt tokens per request (default 128)")
    ap.add_argument("--output-len", type=int, default=128, help="generated tokens per request (default 128)")
    ap.add_argument("--num-prompts", type=int, default=None,
                    help="requests per (server, concurrency) (default: max(8, 2 x concurrency))")
    ap.add_argument("--repeats", type=int, default=1,
                    help="timed runs of every (server, concurrency), interleaved; the table shows the repeat with "
                         "the median output tok/s (default 1)")
    ap.add_argument("--quiet-threshold", type=float, default=0.25,
                    help="cores other processes may use during a timed run before it counts as disturbed "
                         "(default 0.25)")
    ap.add_argument("--quiet-wait", type=float, default=120.0,
                    help="seconds to wait before a timed run for other processes to go under --quiet-threshold "
                         "(default 120)")
    ap.add_argument("--retries", type=int, default=2,
                    help="extra attempts of a disturbed run, on fresh prompts; the least disturbed counts (default 2)")
    ap.add_argument("--servers", default=",".join(SERVERS), help=f"comma-separated, of {', '.join(SERVERS)} (default all)")
    ap.add_argument("--llama-threads", type=int, default=2, help="llama-server -t/-tb (default 2)")
    ap.add_argument("--llama-parallel", type=int, default=None,
                    help="llama-server --parallel (default: the concurrency level of the run)")
    ap.add_argument("--llama-repack", choices=("auto", "on", "off"), default="auto",
                    help="llama.cpp extra buffer types (AMX, repacking): auto = probe each file, use them if "
                         "they survive a batch of prompts, else --no-repack (default auto)")
    ap.add_argument("--llama-server", default=None, help="a llama-server binary (default: build it once, "
                    "peers.build_llama_server)")
    ap.add_argument("--llama-args", default="", help="extra llama-server flags")
    ap.add_argument("--jaxinfer-args", default="", help="extra `jaxinfer serve` flags")
    ap.add_argument("--start-timeout", type=float, default=900.0, help="seconds a server gets to become healthy")
    ap.add_argument("--read-timeout", type=float, default=300.0,
                    help="seconds without a byte from a stream before the request counts as stalled")
    ap.add_argument("--plot", default=None, help=f"write the plot here (default with --write-results: "
                    f"{os.path.relpath(DEFAULT_PLOT, REPO)})")
    ap.add_argument("--write-results", action="store_true", help="append a dated section to benchmarks/RESULTS.md")
    args = ap.parse_args()
    try:
        args.concurrency_list = sorted({int(c) for c in args.concurrency.split(",") if c.strip()})
    except ValueError:
        ap.error("--concurrency takes comma-separated integers, e.g. 1,8,16,32")
    servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    if not servers or any(s not in SERVERS for s in servers):
        ap.error(f"--servers takes a comma-separated subset of {', '.join(SERVERS)}")
    servers = [s for s in SERVERS if s in servers]
    if (not args.concurrency_list or min(args.concurrency_list) < 1 or args.input_len < 1 or args.output_len < 2
            or args.repeats < 1):
        ap.error("need concurrency >= 1, --input-len >= 1, --output-len >= 2, --repeats >= 1")
    if args.plot is None and args.write_results:
        args.plot = DEFAULT_PLOT

    def num_prompts(c: int) -> int:
        return args.num_prompts or max(8, 2 * c)

    from jaxinfer.home import jaxinfer_home

    log_dir = os.path.join(jaxinfer_home(), "bench", "serving-logs")
    os.makedirs(log_dir, exist_ok=True)
    load_before = load_average()
    t_start = time.perf_counter()

    # Prompts: a different window for every request of the whole run (and for the warm-ups).
    from converters.convert import embedded_model_gguf, embedded_model_path
    from transformers import AutoTokenizer

    model_dir = embedded_model_path(progress=False)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    total = sum(num_prompts(c) for c in args.concurrency_list) * args.repeats + sum(args.concurrency_list)
    windows = prompt_windows(tokenizer, total, args.input_len)
    level_prompts, warm_prompts = {}, {}
    k = 0
    for rep in range(args.repeats):
        for c in args.concurrency_list:
            level_prompts[(c, rep)] = windows[k: k + num_prompts(c)]
            k += num_prompts(c)
    for c in args.concurrency_list:  # the warm-ups' prompts, the same for every server and repeat
        warm_prompts[c] = windows[k: k + c]
        k += c
    spare = PromptPool(prompt_windows(tokenizer, None, args.input_len)[k:])  # for retried runs
    print(f"{len(windows)} prompts of {args.input_len} tokens from pydoc_data.topics; {args.output_len} output "
          f"tokens each; concurrency {args.concurrency_list}; requests per level "
          f"{[num_prompts(c) for c in args.concurrency_list]}; servers {servers}", flush=True)

    ggufs: dict[str, str] = {}
    repack: dict[str, bool] = {}
    repack_notes: dict[str, str] = {}
    binary = None
    q4_path = embedded_model_gguf()
    if "llama-f32" in servers:
        ggufs["llama-f32"] = peers.write_dense_gguf(q4_path)
    if "llama-bf16" in servers:
        ggufs["llama-bf16"] = peers.write_dense_gguf(q4_path, dtype="BF16")
    if "llama-q4_1" in servers:
        ggufs["llama-q4_1"] = q4_path
    if ggufs:
        binary = args.llama_server or peers.build_llama_server()
        for name, path in ggufs.items():
            if args.llama_repack == "auto":
                ok, detail = probe_llama(binary, path, args, log_dir, name)
                repack[name] = ok
                repack_notes[name] = ("default buffer types (extra buffer types / repacking on) survived the probe"
                                      if ok else f"with its default buffer types the probe failed ({detail}); "
                                                 f"run with `--no-repack`")
            else:
                repack[name] = args.llama_repack == "on"
                repack_notes[name] = "`--no-repack` (forced)" if not repack[name] else "default buffer types (forced)"
            print(f"{name}: {repack_notes[name]}", flush=True)

    runs: dict[tuple[str, int], list[dict]] = {}
    commands: dict[str, str] = {}
    start_times: dict[str, list[float]] = {}
    anomalies: list[str] = []
    jax_servers: dict[str, ServerProcess] = {}
    jax_statuses: dict[str, str] = {}
    current: ServerProcess | None = None

    def on_signal(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        for name in (n for n in servers if n in JAXINFER_FLAGS):
            port = free_port()
            jax_srv = jax_servers[name] = ServerProcess(
                name, jaxinfer_command(model_dir, port, args, JAXINFER_FLAGS[name]), port,
                os.path.join(log_dir, f"{name}.log"))
            print(f"starting {name}: {' '.join(jax_srv.cmd)}", flush=True)
            jax_srv.start(args.start_timeout)
            commands[name] = " ".join(["jaxinfer", *jax_srv.cmd[jax_srv.cmd.index("serve"):]]).replace(
                f"--port {port}", "--port P").replace(jaxinfer_home(), "$JAXINFER_HOME")
            start_times[name] = [jax_srv.start_s]
            print(f"{name} healthy after {jax_srv.start_s:.1f} s (log {jax_srv.log_path})", flush=True)

        for c in args.concurrency_list:
            for rep in range(args.repeats):
                for name in servers:
                    srv = jax_servers.get(name)
                    if srv is None:
                        parallel = args.llama_parallel or c
                        port = free_port()
                        srv = current = ServerProcess(
                            name, llama_command(binary, ggufs[name], port, parallel, args, repack[name]), port,
                            os.path.join(log_dir, f"{name}-c{c}-r{rep + 1}.log"))
                        srv.start(args.start_timeout)
                        start_times.setdefault(name, []).append(srv.start_s)
                        commands[name] = " ".join(["llama-server", *srv.cmd[1:]]).replace(
                            f"--port {port}", "--port P").replace(ggufs[name], os.path.basename(ggufs[name]))
                    f = run_level(srv, name, c, rep, warm_prompts[c], level_prompts[(c, rep)], args, anomalies,
                                  spare)
                    runs.setdefault((name, c), []).append(f)
                    if name not in jax_servers:
                        rc = srv.stop()
                        current = None
                        if rc not in (0, -signal.SIGTERM, None):
                            anomalies.append(f"{name} C={c}: exit status {rc} after SIGTERM")
        for name, jax_srv in jax_servers.items():
            jax_statuses[name] = jaxinfer_request_statuses(jax_srv.url)
    finally:
        if current is not None:
            current.stop()
        for jax_srv in jax_servers.values():
            jax_srv.stop(timeout=60)
    load_after = load_average()
    elapsed = time.perf_counter() - t_start
    rows = [median_repeat(runs[(name, c)]) for c in args.concurrency_list for name in servers if (name, c) in runs]

    # -- report ------------------------------------------------------------------------------------
    by = {(r["server"], r["concurrency"]): r for r in rows}
    table = [
        "| server | C | requests ok | wall s | req/s | output tok/s | TTFT ms p50 / p90 / p99 "
        "| TPOT ms p50 / p90 / p99 | ITL ms p50 / p90 / p99 | E2E s p50 | CPU cores: server / others "
        "| jaxinfer / this (tok/s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in args.concurrency_list:
        for name in servers:
            r = by.get((name, c))
            if r is None:
                continue
            jx = by.get(("jaxinfer", c))
            ratio = "-" if name == "jaxinfer" or jx is None or not r["out_tok_s"] else \
                f"{jx['out_tok_s'] / r['out_tok_s']:.2f}x"
            table.append(
                f"| {LABELS[name]} | {c} | {r['ok']}/{r['requests']} | {r['wall_s']:.1f} | {r['req_s']:.2f} | "
                f"{r['out_tok_s']:.1f} | "
                + " / ".join(fmt(r[f"ttft_p{q}_ms"], ".0f") for q in (50, 90, 99)) + " | "
                + " / ".join(fmt(r[f"tpot_p{q}_ms"], ".1f") for q in (50, 90, 99)) + " | "
                + " / ".join(fmt(r[f"itl_p{q}_ms"], ".1f") for q in (50, 90, 99)) + " | "
                + f"{fmt(r['e2e_med_s'], '.2f')} | {r['server_cpu']:.2f} / {r['foreign_cpu']:.2f} | {ratio} |"
            )

    goals = []
    for ours, peer in ((o, p) for o in JAXINFER_FLAGS for p in ("llama-f32", "llama-bf16", "llama-q4_1")):
        jx, p = by.get((ours, GOAL_CONCURRENCY)), by.get((peer, GOAL_CONCURRENCY))
        if jx is None or p is None:
            continue
        ratio = jx["out_tok_s"] / p["out_tok_s"] if p["out_tok_s"] else float("nan")
        met = ratio >= GOAL_RATIO
        goals.append(
            f"- Goal, C={GOAL_CONCURRENCY} output tok/s >= {GOAL_RATIO}x {LABELS[peer]}: {LABELS[ours]} "
            f"{jx['out_tok_s']:.1f} vs {p['out_tok_s']:.1f} = **{ratio:.2f}x: {'MET' if met else 'NOT MET'}**"
            + ("" if met else f" ({GOAL_RATIO}x would need {GOAL_RATIO * p['out_tok_s']:.1f} tok/s; jaxinfer has "
                              f"{100 * ratio / GOAL_RATIO:.0f}% of that)") + "."
        )
    if not goals:
        goals.append(f"- Goal (C={GOAL_CONCURRENCY}, jaxinfer vs llama-server): not evaluated in this run "
                     f"(needs jaxinfer and a llama-server at concurrency {GOAL_CONCURRENCY}).")

    notes = [
        f"- Workload: closed loop, C workers each sending its next request when its last is done; "
        f"requests per level {', '.join(f'C={c}: {num_prompts(c)}' for c in args.concurrency_list)}; "
        f"prompts of {args.input_len} tokens (a different window of `pydoc_data.topics` English text for every "
        f"request, sent as token ids), exactly {args.output_len} generated tokens each (`temperature: 0`, "
        f"`ignore_eos: true`, `max_tokens: {args.output_len}`), `POST /v1/completions` with `stream: true` and "
        f"`stream_options.include_usage`; at every C the servers in turn ({', '.join(servers)}, in that order), "
        f"each after an untimed warm-up of C requests of {WARMUP_TOKENS} tokens.",
        "- Figures: output tok/s = completion tokens (server's usage) / wall time from the first request sent to "
        "the last one done; req/s likewise; TTFT = request sent to its first streamed chunk with text; TPOT = "
        "(end-to-end - TTFT) / (tokens - 1) per request; ITL = every gap between consecutive chunks with text; "
        "percentiles over the requests (ITL: over all gaps) of the level.",
    ]
    for name in jax_servers:
        notes.append(f"- {LABELS[name]}: `{commands[name]}` (the converted embedded SmolLM2-135M-Instruct, float32 "
                     f"on disk; start to healthy {start_times[name][0]:.0f} s incl. compiling every shape bucket; one "
                     f"server for all levels). Its /metrics request counts at the end: `{jax_statuses.get(name)}`.")
    if binary:
        notes.append(
            f"- llama-server: llama.cpp vendored in the `llama-cpp-python` {peers.LLAMA_CPP_PYTHON_VERSION} sdist, "
            f"built by `peers.build_llama_server` (`cmake {' '.join(peers.LLAMA_SERVER_CMAKE_ARGS)}`, target "
            f"`llama-server`); restarted for every level with `--parallel` = "
            f"{args.llama_parallel or 'C'}: "
            + "; ".join(f"`{cmd}`" for cmd in commands.values() if cmd.startswith("llama-server"))
            + " (the commands of the last level). F32 GGUF: the embedded Q4_1 file with every tensor dequantized "
            "(`peers.write_dense_gguf`, the same values as jaxinfer's float32 weights); BF16 GGUF: the same with its "
            "matrices rounded to bfloat16 (`write_dense_gguf(dtype='BF16')`), norms F32."
        )
        for name in ggufs:
            notes.append(f"- {LABELS[name]}: {repack_notes[name]}.")
    notes.append(
        "- Reference (FACTS.md, an idle AMD EPYC 2-core box, not this machine): `llama-server --parallel 16 "
        "--cont-batching`, 16 concurrent requests of ~104 prompt / 128 output tokens: 155-165 tok/s in F32, "
        "117-128 in Q4_1."
    )
    notes.append("- Errors, 5xx, stalls, server deaths: " + ("; ".join(anomalies) if anomalies else "none (every request "
                 "returned 200 and streamed exactly the requested tokens; no server died)") + ".")
    notes.append("- Streamed chunks with text per generated token (ITL is per chunk): "
                 + ", ".join(f"{r['server']} C={r['concurrency']} {fmt(r['chunks_per_token'], '.3f')}" for r in rows)
                 + ".")
    notes.append(
        "- CPU cores: CPU time / wall time of the timed run, from /proc: the server process (all its threads), and "
        "every other process on the machine except this client (the other engineer's work: a busy neighbour "
        "takes cores from the server; llama.cpp's spinning thread pool suffers most). Client: "
        + ", ".join(f"{r['server']} C={r['concurrency']} {r['client_cpu']:.2f}" for r in rows) + "."
    )
    retried = [r for r in rows if len(r["attempts"]) > 1]
    disturbed = [r for r in rows if r["foreign_cpu"] > args.quiet_threshold]
    notes.append(
        f"- Quiet machine: before every timed run the client waited (at most {args.quiet_wait:.0f} s) for other "
        f"processes to use under {args.quiet_threshold} cores; a run during which they used more was run again "
        f"on fresh prompts (at most {args.retries} more times) and the least disturbed attempt counts. "
        + ("Retried (output tok/s, others' cores per attempt): " + "; ".join(
            f"{r['server']} C={r['concurrency']} r{r['repeat']}: " + ", ".join(f"{t:.1f} ({o:.2f})" for t, o in r["attempts"])
            for r in retried) + ". " if retried else "No run needed a retry. ")
        + ("Still disturbed in the table: " + ", ".join(f"{r['server']} C={r['concurrency']} (others "
                                                        f"{r['foreign_cpu']:.2f} cores)" for r in disturbed) + "."
           if disturbed else "No row of the table is disturbed.")
    )
    if args.repeats > 1:
        notes.append(
            f"- {args.repeats} repeats of every (server, C), interleaved (C, then repeat, then server); the table "
            "shows the repeat with the median output tok/s (of two, the better). Per repeat, output tok/s (others' "
            "CPU cores): " + "; ".join(
                f"{r['server']} C={r['concurrency']} " + ", ".join(
                    f"{t:.1f} ({o:.2f})" for t, o in zip(r["all_out_tok_s"], r["all_foreign_cpu"]))
                for r in rows) + "."
        )
    notes.append("- 1-minute load average when each timed run started (table's repeat): "
                 + ", ".join(f"{r['server']} C={r['concurrency']} {r['load1']:.2f}" for r in rows) + ".")
    notes.append(f"- Load: before `{load_before}`; after `{load_after}`. Whole run {elapsed / 60:.1f} min. Server "
                 f"logs: `{log_dir}`.")

    title = (f"SmolLM2-135M serving, {args.input_len} in / {args.output_len} out, closed loop "
             f"({time.strftime('%Y-%m-%d', time.gmtime())}, 2-core CPU, shared)")
    plot_note = []
    if args.plot and rows:
        plot(args.plot, rows, servers, args.concurrency_list, title)
        plot_note = [f"- Plot: {plot_reference(args.plot)} (output tok/s, median TTFT and median TPOT against "
                     "concurrency; output tok/s against median TPOT, one point per level)."]
    publish("Serving, SmolLM2-135M over HTTP: jaxinfer vs llama-server", table, goals + notes + plot_note,
            write=args.write_results)


if __name__ == "__main__":
    main()
