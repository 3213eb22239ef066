"""Decode step time of SmolLM2-135M fp32 with separate q/k/v projections (the canonical tree)
vs fused into one matmul (what the engine runs: ``jaxinfer.model.fuse_qkv_params``).

Why it exists: on XLA:CPU a matrix-vector product whose weight is under ~2 MB runs on one core.
SmolLM2's q/k/v projections are 0.4-1.3 MB each, so at batch 1 they stream at about half the
machine's bandwidth; the fused [576, 960] one is large enough for both cores. The first table
shows that threshold on single matmuls (a chain of distinct weights, ~300 MB in all so that they
stream from memory, not from cache).

Then two engines on the same weights (one process, one shared machine) decode the same prompt;
repeats alternate between them. Both run a decode layer as separate ops (the decoder-layer kernel,
``pallas_kernels/decoder_layer_cpu.cc``, off: it takes fused q/k/v only). Per batch size: median step time over all decode steps of all
repeats, and the ratio side by side.

    .venv/bin/python benchmarks/decode_layout.py                   # print the tables
    .venv/bin/python benchmarks/decode_layout.py --write-results   # and append them to RESULTS.md
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from decode import prompt_ids
from report import load_average, publish

STREAMED_BYTES = 300e6


def matmul_table(runs: int) -> list[str]:
    """GB/s of a chain of [1, K] x [K, N] matmuls over distinct weights, by weight shape."""
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    rows = ["| weight [K, N] | MB | GB/s (median of chain runs) |", "|---|---:|---:|"]
    for k, n in [(576, 192), (576, 576), (576, 960), (576, 1536), (1536, 576)]:
        count = int(STREAMED_BYTES / (k * n * 4))
        weights = [jnp.asarray(rng.standard_normal((k, n), dtype=np.float32)) for _ in range(count)]

        @jax.jit
        def chain(ws, x):
            acc = jnp.zeros((), jnp.float32)
            for w in ws:  # each matmul depends on the last, so none overlap
                acc = acc + (x @ w)[0, 0]
                x = x + acc * 1e-9
            return acc

        x = jnp.ones((1, k), jnp.float32)
        chain(weights, x).block_until_ready()
        times = []
        for _ in range(runs):
            t = time.perf_counter()
            chain(weights, x).block_until_ready()
            times.append(time.perf_counter() - t)
        rows.append(f"| [{k}, {n}] | {k * n * 4 / 1e6:.2f} | {count * k * n * 4 / statistics.median(times) / 1e9:.1f} |")
        print(rows[-1], flush=True)
    return rows


def decode_steps(engine, prompt: list[int], batch: int, tokens: int, params=None
                 ) -> tuple[list[float], list[list[int]]]:
    """Seconds of each pure decode step (no prefill in it) while ``batch`` requests of ``prompt``
    generate ``tokens`` tokens each (``params``: their ``SamplingParams``, greedy by default, with
    ``max_tokens`` and ``ignore_eos`` set here; seeded ``params`` seed request ``i`` with
    ``seed + i``, so that sampled rows follow different texts as a real batch's do), and the tokens
    of each request."""
    import dataclasses

    from jaxinfer.sampling_params import SamplingParams

    params = dataclasses.replace(params or SamplingParams(temperature=0), max_tokens=tokens, ignore_eos=True)
    for i in range(batch):
        seed = None if params.seed is None else params.seed + i
        engine.add_request(f"r{time.perf_counter_ns()}-{i}", prompt, dataclasses.replace(params, seed=seed))
    steps, finished = [], []
    while engine.has_unfinished_requests():
        prefilled = engine.stats.prefill_tokens
        t = time.perf_counter()
        outputs = engine.step()
        elapsed = time.perf_counter() - t
        if engine.stats.prefill_tokens == prefilled:
            steps.append(elapsed)
        finished += [list(o.outputs[0].token_ids) for o in outputs if o.finished]
    return steps, finished


def alternate(engines: dict, prompt: list[int], batch: int, tokens: int, repeats: int
              ) -> tuple[dict[str, float], dict[str, list[list[int]]]]:
    """Per engine: median ms per pure decode step and the tokens of every finished request, over
    ``repeats`` rounds in which the engines take turns (so a noisy machine hits them alike)."""
    steps = {name: [] for name in engines}
    finished = {name: [] for name in engines}
    for _ in range(repeats):
        for name, engine in engines.items():
            s, t = decode_steps(engine, prompt, batch, tokens)
            steps[name] += s
            finished[name] += t
    return {name: statistics.median(s) * 1e3 for name, s in steps.items()}, finished


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,16", help="decode batch sizes, comma-separated (default 1,16)")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="runs of each engine per batch size, alternating")
    ap.add_argument("--write-results", action="store_true", help="append a dated section to benchmarks/RESULTS.md")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    load_before = load_average()

    import jax.numpy as jnp

    from converters.convert import embedded_model_path
    from converters.loader import load_model
    from jaxinfer.llm import build_engine
    from jaxinfer.model_runner import ModelRunner
    from pallas_kernels import cpu_native

    matmuls = matmul_table(runs=7)
    loaded = load_model(embedded_model_path(progress=False), jnp.float32, progress=False)
    prompt = prompt_ids(loaded.tokenizer, args.prompt_tokens)
    options = {"max_batch_size": max(batches), "session_len": args.prompt_tokens + args.decode_tokens + 64}
    engines = {}
    for name, fused in (("separate", False), ("fused", True)):
        with cpu_native.turned_off("decoder_layer"):
            engine = build_engine(loaded, warmup=False, progress=False, **options)
            r = engine.runner  # same buckets and pages, the chosen projections
            engine.runner = ModelRunner(loaded.config, loaded.params, loaded.dtype, r.buckets, r.cache.num_pages, 0,
                                        fused)
            engine.runner.warmup(progress=False)
        engines[name] = engine
    rows = ["| batch | separate q/k/v ms/step | fused ms/step | separate / fused | tokens equal |",
            "|---:|---:|---:|---:|---|"]
    for batch in batches:
        med, tokens = alternate(engines, prompt, batch, args.decode_tokens, args.repeats)
        same = "yes" if tokens["separate"] == tokens["fused"] else "**no**"
        rows.append(f"| {batch} | {med['separate']:.2f} | {med['fused']:.2f} | "
                    f"{med['separate'] / med['fused']:.2f}x | {same} |")
        print(rows[-1], flush=True)
    notes = [
        (f"- SmolLM2-135M fp32 (embedded GGUF dequantized), {args.prompt_tokens}-token prompt, "
         f"{args.decode_tokens} greedy tokens per request, {args.repeats} repeats per engine alternating; "
         f"median over all pure decode steps."),
        f"- Load: before `{load_before}`; after `{load_average()}`.",
    ]
    publish("Decode layout: separate vs fused q/k/v projections, SmolLM2-135M fp32",
            ["Single matmuls [1, K] x [K, N], streamed:", "", *matmuls], rows, notes,
            write=args.write_results)


if __name__ == "__main__":
    main()
