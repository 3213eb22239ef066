"""What keeping freed pages in the C heap buys (``jaxinfer.host_memory.keep_freed_memory``, on
by default on CPU): decode steps of SmolLM2-135M with it and with the C library's own policy
(``JAXINFER_KEEP_FREED_MEMORY=0``), side by side.

glibc serves blocks above its mmap threshold (at most 32 MiB) with fresh mappings and unmaps them
on free; a batch-32 step's buffers are that large, and each 4 KiB page they touch then costs a
page fault and its zeroing, every step. The policy is process-wide, so each contender is its own
process holding its own engine; they take turns decoding one batch of requests per round (the
host's memory speed drifts within seconds), and a round's ratio compares their median pure decode
step. Reported per batch size: the median and quartiles of the rounds' ratios, each one's median
step over all rounds, minor page faults per token of a round, and whether the tokens were equal.

    .venv/bin/python benchmarks/heap_policy.py [--dtype bfloat16] [--batches 1,32] [--write-results]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys

from async_scheduling import paired_rounds, ratio_cells
from report import cpu_times, load_average, publish, stolen_since

POLICIES = {"kept": "1", "C library's": "0"}  # name -> JAXINFER_KEEP_FREED_MEMORY


def serve_rounds(args: argparse.Namespace) -> None:
    """The contender: build the engine, then for each batch size read on stdin decode one batch
    and print, as JSON, its pure decode steps' seconds, its requests' tokens and the process's
    minor page faults over the round per token of a request (prefill steps included)."""
    import jax.numpy as jnp

    from converters.convert import embedded_model_path
    from converters.loader import load_model
    from decode import prompt_ids
    from decode_layout import decode_steps
    from jaxinfer.llm import build_engine

    loaded = load_model(embedded_model_path(progress=False), jnp.dtype(args.dtype), progress=False)
    engine = build_engine(loaded, progress=False, max_batch_size=max(args.batch_list),
                          session_len=args.prompt_tokens + args.decode_tokens + 64)
    prompt = prompt_ids(loaded.tokenizer, args.prompt_tokens)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        steps, tokens = decode_steps(engine, prompt, int(line), args.decode_tokens)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
        print(json.dumps({"steps": steps, "tokens": tokens, "faults": faults / args.decode_tokens}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16", help="weight dtype")
    ap.add_argument("--batches", default="1,32", help="decode batch sizes, comma-separated (default 1,32)")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--decode-tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=10, help="rounds per batch size (default 10)")
    ap.add_argument("--contender", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--write-results", action="store_true", help="append a dated section to benchmarks/RESULTS.md")
    args = ap.parse_args()
    args.batch_list = [int(b) for b in args.batches.split(",")]
    if args.contender:
        serve_rounds(args)
        return
    load_before, times_before = load_average(), cpu_times()

    command = [sys.executable, os.path.abspath(__file__), "--contender", "--dtype", args.dtype, "--batches",
               args.batches, "--prompt-tokens", str(args.prompt_tokens), "--decode-tokens", str(args.decode_tokens)]
    procs = {name: subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                    env={**os.environ, "JAXINFER_KEEP_FREED_MEMORY": value})
             for name, value in POLICIES.items()}

    def reply(name: str) -> dict:
        while (line := procs[name].stdout.readline()).strip()[:1] != "{":
            if not line:
                raise RuntimeError(f"the {name} contender exited ({procs[name].wait()})")
        return json.loads(line)

    def contender(name: str, batch: int, faults: dict):
        """paired_rounds' contender ``name``: one batch decoded in its process."""
        def decode_one_batch():
            procs[name].stdin.write(f"{batch}\n")
            procs[name].stdin.flush()
            run = reply(name)
            faults[name].append(run["faults"])
            return run["steps"], run["tokens"]
        return decode_one_batch

    try:
        for name in procs:
            reply(name)  # built and warm
        rows = ["| batch | kept ms/step | C library's ms/step | C library's / kept, median of rounds | quartiles "
                "| faults per token, kept | faults per token, C library's | tokens equal |",
                "|---:|---:|---:|---:|---|---:|---:|---|"]
        kept, other = POLICIES
        for batch in args.batch_list:
            faults = {name: [] for name in POLICIES}
            ms, equal = paired_rounds({name: contender(name, batch, faults) for name in POLICIES}, args.rounds)
            rows.append(f"| {batch} | {statistics.median(ms[kept]):.1f} | {statistics.median(ms[other]):.1f} | "
                        f"{ratio_cells(ms[other], ms[kept])} | {statistics.median(faults[kept]):.0f} | "
                        f"{statistics.median(faults[other]):.0f} | {'yes' if equal else 'NO'} |")
    finally:
        for proc in procs.values():
            proc.stdin.close()
            proc.wait()
    notes = [
        f"- SmolLM2-135M, {args.dtype} weights (embedded GGUF dequantized), {args.prompt_tokens}-token prompt, "
        f"{args.decode_tokens} greedy tokens per request; {args.rounds} rounds per batch size, the two processes "
        "taking turns; ms/step: median over rounds of each round's median pure decode step. faults per token: "
        "the process's minor page faults over a round (its prefill steps included) / tokens per request, "
        "median over rounds.",
        f"- Load: before `{load_before}`; after `{load_average()}`. {stolen_since(times_before)}.",
    ]
    publish(f"Heap policy: freed pages kept vs the C library's, SmolLM2-135M {args.dtype} decode", rows, notes,
            write=args.write_results)


if __name__ == "__main__":
    main()
