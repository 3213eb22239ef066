"""What bounds a decode step on XLA:CPU: the speed of its two kinds of work at SmolLM2 shapes.

1. Matmuls. A chain of 30 decoder layers' projections (fused q/k/v [576, 960], o_proj [576, 576],
   gate and up [576, 1536], down [1536, 576]; 425 MB in float32, so they stream from memory) on
   activations of M rows, as the engine's decode step runs them at batch M. Reported as weight
   GB/s (what bounds batch 1) and GFLOP/s (what bounds larger batches), for float32 weights and
   for bfloat16 weights (float32 activations cast per matmul, float32 accumulation); the two are
   called in turn.
2. Page gathers. Attention reads each sequence's pages through its block table: per page
   iteration a gather of one ``[kv_heads, page_size, head_dim]`` page per row. Timed against a
   contiguous slice of the same bytes, for float32 pages and uint8 (int8 KV cache) pages; each
   read feeds the q.k product, as in attention, so XLA cannot skip it.

Compare with the machine's roofline (read bandwidth, fp32 matmul peak: FACTS.md or your own
measurement). XLA's choice of matmul library can be changed with XLA_FLAGS, e.g.
``XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type= .venv/bin/python benchmarks/cpu_limits.py``.

    .venv/bin/python benchmarks/cpu_limits.py                   # print the tables
    .venv/bin/python benchmarks/cpu_limits.py --write-results   # and append them to RESULTS.md
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
from report import load_average, publish

LAYERS = 30
SHAPES = {"qkv": (576, 960), "o": (576, 576), "gate": (576, 1536), "up": (576, 1536), "down": (1536, 576)}
KV_HEADS, GROUP, PAGE, HEAD_DIM = 3, 3, 64, 64


def _alternate(fns: dict, args: dict, runs: int) -> dict[str, float]:
    """Median seconds of each ``fns[name](*args[name])``, the functions called in turn."""
    for name, fn in fns.items():
        fn(*args[name]).block_until_ready()
    times = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn(*args[name]).block_until_ready()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def matmul_table(batches: list[int], runs: int) -> list[str]:
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    floats = [{k: rng.standard_normal(s, dtype=np.float32) * 0.02 for k, s in SHAPES.items()} for _ in range(LAYERS)]
    weights = {"float32": jax.tree.map(jnp.asarray, floats),
               "bfloat16": jax.tree.map(lambda w: jnp.asarray(w, jnp.bfloat16), floats)}
    del floats
    n_weights = LAYERS * sum(k * n for k, n in SHAPES.values())

    def chain(x, layers):
        def mm(a, w):
            return jax.lax.dot_general(a.astype(w.dtype), w, (((1,), (0,)), ((), ())),
                                       preferred_element_type=jnp.float32)

        for w in layers:  # the decoder's dependency chain: q/k/v -> o -> gate, up -> down
            x = x + mm(mm(x, w["qkv"])[:, :576], w["o"])
            x = x + mm(jax.nn.silu(mm(x, w["gate"])) * mm(x, w["up"]), w["down"])
        return x

    fns = {name: jax.jit(chain) for name in weights}
    rows = ["| batch M | weights | ms per chain | weight GB/s | GFLOP/s | bfloat16 vs float32 |",
            "|---:|---|---:|---:|---:|---:|"]
    for m in batches:
        x = jnp.full((m, 576), 0.01, jnp.float32)
        med = _alternate(fns, {name: (x, w) for name, w in weights.items()}, runs)
        for name, s in med.items():
            nbytes = n_weights * jnp.dtype(weights[name][0]["o"].dtype).itemsize
            speed = f"{med['float32'] / s:.2f}x" if name == "bfloat16" else "-"
            rows.append(f"| {m} | {name} | {s * 1e3:.1f} | {nbytes / s / 1e9:.1f} | {2 * m * n_weights / s / 1e9:.0f} "
                        f"| {speed} |")
            print(rows[-1], flush=True)
    return rows


def gather_table(batch: int, runs: int) -> list[str]:
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(1)
    num_pages, reads = 4 * batch + 1, 40
    q = jnp.asarray(rng.standard_normal((batch, KV_HEADS, GROUP, HEAD_DIM), dtype=np.float32))
    pages = jnp.asarray(rng.permutation(np.arange(1, num_pages))[:batch].astype(np.int32))

    def reader(gathered: bool):
        def f(pool, pages):
            acc = jnp.zeros((), jnp.float32)
            for i in range(reads):  # distinct pages each time, so no read is shared
                if gathered:
                    k = pool.at[(pages + i) % num_pages].get(mode="promise_in_bounds")
                else:
                    k = jax.lax.dynamic_slice_in_dim(pool, (i * batch) % (num_pages - batch), batch, 0)
                acc = acc + jnp.einsum("bkgd,bkld->bkgl", q, k.astype(jnp.float32))[0, 0, 0, 0]
            return acc

        return jax.jit(f)

    rows = ["| pages | bytes per read | gather us | gather GB/s | contiguous slice us | slice GB/s | gather / slice |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for dtype in ("float32", "uint8"):
        pool = rng.standard_normal((num_pages, KV_HEADS, PAGE, HEAD_DIM), dtype=np.float32)
        pool = jnp.asarray(pool if dtype == "float32" else (pool * 30 + 128).clip(0, 255).astype(np.uint8))
        fns = {"gather": reader(True), "slice": reader(False)}
        med = _alternate(fns, {name: (pool, pages) for name in fns}, runs)
        nbytes = batch * KV_HEADS * PAGE * HEAD_DIM * pool.dtype.itemsize
        us = {name: s / reads * 1e6 for name, s in med.items()}
        rows.append(f"| {batch} x [{KV_HEADS}, {PAGE}, {HEAD_DIM}] {dtype} | {nbytes / 1e3:.0f} KB | {us['gather']:.0f} "
                    f"| {nbytes / us['gather'] / 1e3:.1f} | {us['slice']:.0f} | {nbytes / us['slice'] / 1e3:.1f} "
                    f"| {us['gather'] / us['slice']:.1f}x |")
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,2,4,8,16,32", help="matmul rows M, comma-separated (default 1,2,4,8,16,32)")
    ap.add_argument("--gather-batch", type=int, default=16, help="sequences whose pages one gather reads (default 16)")
    ap.add_argument("--runs", type=int, default=15, help="timed calls of each variant, alternating (default 15)")
    ap.add_argument("--write-results", action="store_true", help="append a dated section to benchmarks/RESULTS.md")
    args = ap.parse_args()
    load_before = load_average()
    matmuls = matmul_table([int(b) for b in args.batches.split(",")], args.runs)
    gathers = gather_table(args.gather_batch, args.runs)
    notes = [
        f"- Matmuls: {LAYERS} layers of SmolLM2-135M's projections (fused q/k/v), median of {args.runs} chains "
        "per weight type, types alternating; GB/s = weight bytes / time, GFLOP/s = 2 x M x weights / time.",
        f"- Gathers: per read, one page per sequence ({args.gather_batch} sequences) feeding a q.k product; "
        f"median of {args.runs} runs of 40 reads; us per read includes the product.",
        f"- XLA_FLAGS: `{os.environ.get('XLA_FLAGS') or '(none)'}`.",
        f"- Load: before `{load_before}`; after `{load_average()}`.",
    ]
    publish("CPU limits: XLA:CPU matmuls and page gathers at SmolLM2 shapes", matmuls, gathers, notes,
            write=args.write_results)


if __name__ == "__main__":
    main()
