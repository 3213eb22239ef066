"""Decode step time of SmolLM2-135M fp32 in each parameter layout the engine could run
(``jaxinfer.model.ParamLayout``): the canonical tree, q/k/v fused, and the engine's ``EXECUTION``
layout (q/k/v fused, float kernels stored ``[out, in]``).

Why it exists: XLA:CPU's matmul speed depends on the weight's shape and layout. The first table
measures that on single matmuls over a chain of distinct weights (~300 MB in all, so that they
stream from memory, not from cache), at batch 1 and 16, with each weight stored ``[in, out]`` and
``[out, in]``, the two called in turn:

- at batch 1 a weight under ~2 MB runs on one core: SmolLM2's q/k/v projections (0.4-1.3 MB each)
  stream at about half the machine's bandwidth; the fused [576, 960] one is large enough for both;
- at decode batch sizes ``[out, in]`` weights run faster than ``[in, out]`` ones.

Then one engine per layout on the same weights (one process, one shared machine) decodes the same
prompt; repeats alternate between them. Per batch size: median step time over all decode steps of
all repeats, each layout's speed-up over the canonical tree side by side, and whether all layouts
produced the same tokens.

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
    """Microseconds per matmul ``[M, K] x W`` in a chain of distinct weights, by weight shape, M and
    the weight's layout (``[K, N]`` or ``[N, K]``); the layouts are called in turn."""
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    rows = ["| weight [K, N] | MB | M | [in, out] us | GB/s | [out, in] us | GB/s | speed-up |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for k, n in [(576, 192), (576, 576), (576, 960), (576, 1536), (1536, 576)]:
        count = int(STREAMED_BYTES / (k * n * 4))
        weights = [rng.standard_normal((k, n), dtype=np.float32) for _ in range(count)]
        layouts = {"in_out": [jnp.asarray(w) for w in weights], "out_in": [jnp.asarray(w.T) for w in weights]}
        del weights

        def chain(ws, x, contract):
            acc = jnp.zeros((), jnp.float32)
            for w in ws:  # each matmul depends on the last, so none overlap
                acc = acc + jax.lax.dot_general(x, w, (((1,), (contract,)), ((), ())))[0, 0]
                x = x + acc * 1e-9
            return acc

        fns = {"in_out": jax.jit(lambda ws, x: chain(ws, x, 0)), "out_in": jax.jit(lambda ws, x: chain(ws, x, 1))}
        for m in (1, 16):
            x = jnp.ones((m, k), jnp.float32)
            times = {name: [] for name in fns}
            for name, fn in fns.items():
                fn(layouts[name], x).block_until_ready()
            for _ in range(runs):
                for name, fn in fns.items():
                    t = time.perf_counter()
                    fn(layouts[name], x).block_until_ready()
                    times[name].append(time.perf_counter() - t)
            med = {name: statistics.median(ts) / count for name, ts in times.items()}
            gbs = {name: k * n * 4 / t / 1e9 for name, t in med.items()}
            rows.append(f"| [{k}, {n}] | {k * n * 4 / 1e6:.2f} | {m} | {med['in_out'] * 1e6:.0f} | {gbs['in_out']:.1f} | "
                        f"{med['out_in'] * 1e6:.0f} | {gbs['out_in']:.1f} | {med['in_out'] / med['out_in']:.2f}x |")
            print(rows[-1], flush=True)
    return rows


def decode_steps(engine, prompt: list[int], batch: int, tokens: int) -> tuple[list[float], list[list[int]]]:
    """Seconds of each pure decode step (no prefill in it) while ``batch`` requests of ``prompt``
    generate ``tokens`` tokens each, and the tokens of each request."""
    from jaxinfer.sampling_params import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"r{time.perf_counter_ns()}-{i}", prompt, params)
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
    from jaxinfer.model import CANONICAL, EXECUTION, ParamLayout
    from jaxinfer.model_runner import ModelRunner

    matmuls = matmul_table(runs=7)
    loaded = load_model(embedded_model_path(progress=False), jnp.float32, progress=False)
    prompt = prompt_ids(loaded.tokenizer, args.prompt_tokens)
    options = {"max_batch_size": max(batches), "session_len": args.prompt_tokens + args.decode_tokens + 64}
    layouts = {"canonical": CANONICAL, "fused q/k/v": ParamLayout(fuse_qkv=True), "execution": EXECUTION}
    engines = {}
    for name, layout in layouts.items():
        engine = build_engine(loaded, warmup=False, progress=False, **options)
        r = engine.runner  # same buckets and pages, the chosen layout
        engine.runner = ModelRunner(loaded.config, loaded.params, loaded.dtype, r.buckets, r.cache.num_pages, 0, layout)
        engine.runner.warmup(progress=False)
        engines[name] = engine
    rows = ["| batch | " + " | ".join(f"{name} ms/step" for name in layouts) + " | "
            + " | ".join(f"{name} speed-up" for name in list(layouts)[1:]) + " | tokens equal |",
            "|---:|" + "---:|" * (2 * len(layouts) - 1) + "---|"]
    for batch in batches:
        steps = {name: [] for name in engines}
        tokens = {name: [] for name in engines}
        for _ in range(args.repeats):
            for name, engine in engines.items():
                s, t = decode_steps(engine, prompt, batch, args.decode_tokens)
                steps[name] += s
                tokens[name] += t
        med = {name: statistics.median(s) * 1e3 for name, s in steps.items()}
        same = "yes" if all(t == tokens["canonical"] for t in tokens.values()) else "**no**"
        rows.append(f"| {batch} | " + " | ".join(f"{med[name]:.2f}" for name in layouts) + " | "
                    + " | ".join(f"{med['canonical'] / med[name]:.2f}x" for name in list(layouts)[1:]) + f" | {same} |")
        print(rows[-1], flush=True)
    notes = [
        (f"- SmolLM2-135M fp32 (embedded GGUF dequantized), {args.prompt_tokens}-token prompt, "
         f"{args.decode_tokens} greedy tokens per request, {args.repeats} repeats per engine alternating; "
         f"median over all pure decode steps."),
        f"- Load: before `{load_before}`; after `{load_average()}`.",
    ]
    publish("Decode layout: parameter layouts side by side, SmolLM2-135M fp32",
            ["Single matmuls [M, K] x W, streamed, W stored [in, out] or [out, in]:", "", *matmuls], rows, notes,
            write=args.write_results)


if __name__ == "__main__":
    main()
