"""How much memory starting an engine takes: peak and settled resident memory of a process that
loads the embedded SmolLM2-135M-Instruct (the converted float32 checkpoint) and builds an engine on
it, against the bytes of the weights it ends up holding.

Each stage runs in a fresh process (``--child``), which reports its resident memory after its
imports (the baseline) and, above that baseline, its peak (``ru_maxrss``) and what it still holds
at the end. Stages:

- ``load``: ``load_model`` alone; the weights are the loaded tree.
- ``engine``: ``build_engine`` without warm-up (load, then the engine's own copy: q/k/v fused,
  packed for the CPU matmul kernel, in huge pages); the weights are the engine's.
- ``engine + warm-up, batch B``: the same with every shape bucket compiled for ``max_batch_size``
  B, and its KV cache.

``--compare DIR`` runs every stage on the checkout in DIR too (an older commit, say, in a ``git
worktree``), alternating with this one, so the two are measured side by side.

    .venv/bin/python benchmarks/startup_memory.py [--compare /tmp/before] [--write-results]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

from report import load_average, publish

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
STAGES = {"load": None, "engine": 1, "engine + warm-up, batch 1": 1, "engine + warm-up, batch 32": 32}
SESSION_LEN = 256


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def child(stage: str) -> None:
    import gc
    import resource

    import jax

    from converters.convert import embedded_model_path
    from converters.loader import load_model
    from jaxinfer.llm import build_engine

    path = embedded_model_path(progress=False)
    gc.collect()
    baseline = rss_mb()
    if stage == "load":
        held = load_model(path, progress=False).params
    else:
        engine = build_engine(path, warmup="warm-up" in stage, progress=False, max_batch_size=STAGES[stage],
                              session_len=SESSION_LEN)
        held = engine.runner.params
    weights = sum(leaf.nbytes for leaf in jax.tree.leaves(held)) / 1e6
    kv = 0.0 if stage == "load" else sum(leaf.nbytes for leaf in jax.tree.leaves(engine.runner.cache)) / 1e6
    buckets = len(engine.buckets.all_shapes()) if "warm-up" in stage else 0
    gc.collect()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3  # kB on Linux
    print(json.dumps({"baseline": baseline, "peak": peak - baseline, "settled": rss_mb() - baseline,
                      "weights": weights, "kv": kv, "buckets": buckets}))


def run_child(code_dir: str, stage: str) -> dict:
    env = {**os.environ, "PYTHONPATH": code_dir, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", stage], env=env, cwd=code_dir,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def git_rev(code_dir: str) -> str:
    out = subprocess.run(["git", "-C", code_dir, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() or "?"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--compare", help="another checkout to measure side by side (e.g. an older commit's worktree)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--write-results", action="store_true")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child)
        return
    load_before = load_average()
    trees = {f"this checkout ({git_rev(REPO)})": REPO}
    if args.compare:
        trees[f"{os.path.abspath(args.compare)} ({git_rev(args.compare)})"] = os.path.abspath(args.compare)
    results = {(name, stage): [] for name in trees for stage in STAGES}
    for _ in range(args.repeats):
        for stage in STAGES:
            for name, code_dir in trees.items():
                results[name, stage].append(run_child(code_dir, stage))
                print(f"{stage} [{name}]: {results[name, stage][-1]}", file=sys.stderr, flush=True)

    rows = ["| code | stage | weights held MB | KV cache MB | buckets compiled | peak above baseline MB "
            "| peak / weights | settled above baseline MB | settled / weights |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for stage in STAGES:
        for name in trees:
            runs = results[name, stage]
            weights = statistics.median(r["weights"] for r in runs)
            peak = statistics.median(r["peak"] for r in runs)
            settled = statistics.median(r["settled"] for r in runs)
            kv, buckets = runs[0]["kv"], runs[0]["buckets"]
            rows.append(f"| {name} | {stage} | {weights:.0f} | {kv:.0f} | {buckets} | {peak:.0f} | {peak / weights:.2f}x "
                        f"| {settled:.0f} | {settled / weights:.2f}x |")
    baselines = sorted(r["baseline"] for runs in results.values() for r in runs)
    notes = [
        f"- SmolLM2-135M-Instruct, the converted float32 checkpoint (`$JAXINFER_HOME/models`); engines with "
        f"`session_len={SESSION_LEN}`; each stage in a fresh process, {args.repeats} runs each, medians; stages "
        f"and checkouts alternate.",
        "- weights held: the bytes of the tree the process ends up holding (the loaded tree for `load`, the "
        "engine's own laid-out copy otherwise: with a tied embedding it holds the table and its packed "
        "transpose). Baseline: resident memory after the imports, before loading "
        f"({baselines[0]:.0f}-{baselines[-1]:.0f} MB). peak: `ru_maxrss` - baseline; settled: resident memory "
        "at the end - baseline.",
        f"- Load: before `{load_before}`; after `{load_average()}`.",
    ]
    publish("Start-up memory: load and engine, SmolLM2-135M float32", rows, notes, write=args.write_results)


if __name__ == "__main__":
    main()
