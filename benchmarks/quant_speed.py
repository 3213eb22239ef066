"""Decode speed of the weight formats on this backend: does int4 pay on this machine?

Decides what ``--keep-quantized`` defaults to (``converters.loader.keep_quantized_by_default``):
a GGUF's Q4_1 codes kept as int4 are lossless against the file, but on XLA:CPU every step
dequantizes them before its dots, so the question is purely one of speed.

Engines (each ``LLMEngine`` over the embedded SmolLM2-135M-Instruct, float32 activations):
  - ``float32``: the converted checkpoint's float32 weights;
  - ``GGUF Q4_1 kept``: the embedded GGUF with ``keep_quantized=True`` (int4 g32 codes, float32
    scales and biases), through the ``int4_matmul`` dispatch point;
  - ``AWQ int4 g128``: the checkpoint ``benchmarks/quant_quality.py`` writes (skipped if absent).

For each batch size B (``--batch``): B requests of a 64-token prompt and ``--tokens`` output
tokens (greedy, ignore EOS) added at once; the steps after the prefill are timed with
``engine.step()``; decode tok/s = B x (tokens - 1) / their sum. Engines alternate over
``--repeats``; medians and the ratio to float32 per repeat pair.

    .venv/bin/python benchmarks/quant_speed.py [--write-results]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
from report import load_average, publish

PROMPT_TOKENS = 64


def decode_rate(engine, batch: int, tokens: int, tag: str) -> float:
    from jaxinfer.sampling_params import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"{tag}-{i}", list(range(100 + i, 100 + i + PROMPT_TOKENS)), params)
    scheduler = engine.scheduler
    while scheduler.waiting or any(not s.is_decoding for s in scheduler.running):
        engine.step()  # prefills (and the first decode steps of early rows) are not timed
    before = engine.stats.decode_tokens
    t = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
    elapsed = time.perf_counter() - t
    return (engine.stats.decode_tokens - before) / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", default="1,16", help="comma-separated batch sizes (default 1,16)")
    ap.add_argument("--tokens", type=int, default=48, help="output tokens per request (default 48)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--write-results", action="store_true")
    args = ap.parse_args()
    batches = [int(b) for b in args.batch.split(",")]
    load_before = load_average()

    from converters.convert import embedded_model_gguf, embedded_model_path
    from converters.loader import load_model
    from jaxinfer.home import jaxinfer_home
    from jaxinfer.llm import build_engine

    bench_dir = os.path.join(jaxinfer_home(), "bench")
    awq_dirs = sorted(d for d in os.listdir(bench_dir) if d.startswith("SmolLM2-135M-awq")) if os.path.isdir(
        bench_dir) else []
    models = [
        ("float32", lambda: load_model(embedded_model_path(progress=False), np.float32, progress=False)),
        ("GGUF Q4_1 kept (int4 g32)",
         lambda: load_model(embedded_model_gguf(), np.float32, progress=False, keep_quantized=True)),
    ]
    if awq_dirs:
        path = os.path.join(bench_dir, awq_dirs[-1])
        models.append(("AWQ int4 g128", lambda: load_model(path, np.float32, progress=False)))
    engines = {}
    for name, load in models:
        t = time.perf_counter()
        engines[name] = build_engine(load(), progress=False, max_batch_size=max(batches),
                                     max_prefill_tokens=PROMPT_TOKENS, session_len=PROMPT_TOKENS + args.tokens)
        print(f"{name}: engine ready in {time.perf_counter() - t:.1f} s", flush=True)

    rates = {(name, b): [] for name in engines for b in batches}
    for rep in range(args.repeats):
        for b in batches:
            for name, engine in engines.items():
                rate = decode_rate(engine, b, args.tokens, f"r{rep}-b{b}")
                rates[(name, b)].append(rate)
                print(f"repeat {rep} batch {b:3d} {name:28s} {rate:7.1f} tok/s", flush=True)

    lines = [
        "| weights | batch | decode tok/s (median) | per repeat | vs float32 (median of per-repeat ratios) |",
        "|---|---:|---:|---|---:|",
    ]
    for b in batches:
        base = rates[("float32", b)]
        for name in engines:
            r = rates[(name, b)]
            ratio = statistics.median(x / y for x, y in zip(r, base))
            lines.append(f"| {name} | {b} | {statistics.median(r):.1f} | {' / '.join(f'{x:.1f}' for x in r)} | "
                         f"{ratio:.2f}x |")
    publish("Decode speed of the weight formats, SmolLM2-135M, XLA:CPU", lines, [
        f"- {PROMPT_TOKENS}-token prompts, {args.tokens} output tokens per request (greedy, ignore EOS), B requests "
        f"at once; decode tok/s over the steps after every prefill; engines alternate, {args.repeats} repeats.",
        "- Int4 weights run through the `int4_matmul` dispatch point's jnp reference (dequantize, then XLA's "
        "dot) on CPU: the dequantization is paid on every step, so on this backend the float32 weights are "
        "the default (`--keep-quantized` opts in; on GPU the Pallas kernel dequantizes in registers).",
        f"- Load: before `{load_before}`; after `{load_average()}`.",
    ], write=args.write_results)


if __name__ == "__main__":
    main()
