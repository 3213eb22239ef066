"""Where a decode step's time goes: an XLA profile of ``engine.step()``, grouped by op kind.

Runs the embedded SmolLM2-135M-Instruct (float32 weights, or ``--dtype bfloat16``) with ``--batch`` requests of a
``--prompt-len``-token prompt decoded together, traces ``--steps`` decode steps with
``jax.profiler`` (the trace, viewable in Perfetto or TensorBoard, is kept under
``$JAXINFER_HOME/bench/profiles``) and sums the XLA ops' durations per kind: op names without
their numeric suffix (``dot.481`` -> ``dot``; XLA:CPU runs some dots as YNNPACK library
fusions, ``ynn_fusion``); for plain dots, weight GB/s = all weight bytes / their time. Ops nested
in a loop (the attention's page loop) are counted both inside their loop and on their own line,
so the kinds do not add up to the step.

    .venv/bin/python benchmarks/profile_step.py --batch 1 [--write-results]
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import statistics
import time

from report import load_average, publish
from sampling_cost import MODES, sampling_params

# Host-side and runtime events in the trace (Python frames start with "$"): not XLA ops.
NOT_OPS = ("$", "ThunkExecutor", "PjitFunction", "Common", "Parse", "np.", "Handle", "end:", "DevicePut",
           "ArrayImpl")


def op_events(trace_dir: str) -> list[dict]:
    (path,) = glob.glob(os.path.join(trace_dir, "plugins", "profile", "*", "*.trace.json.gz"))
    with gzip.open(path) as f:
        events = json.load(f)["traceEvents"]
    return [e for e in events if e.get("ph") == "X" and not e["name"].startswith(NOT_OPS)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10, help="decode steps traced (default 10)")
    ap.add_argument("--top", type=int, default=12, help="op kinds listed (default 12)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="weight dtype")
    ap.add_argument("--sampling", choices=tuple(MODES), default="greedy",
                    help="the requests' sampling, a mode of sampling_cost.py (request i seeded seed + i): "
                    + "; ".join(f"{k!r}: {v}" for k, v in MODES.items()))
    ap.add_argument("--write-results", action="store_true")
    args = ap.parse_args()
    load_before = load_average()

    import jax
    import jax.numpy as jnp

    from converters.convert import embedded_model_path
    from converters.loader import load_model
    from jaxinfer.home import jaxinfer_home
    from jaxinfer.llm import build_engine

    m = load_model(embedded_model_path(progress=False), jnp.dtype(args.dtype), progress=False)
    # One prompt is admitted per step: the first requests decode while the others wait, so each
    # must have tokens left for all of those steps and the traced ones.
    max_tokens = args.batch + args.steps + 8
    engine = build_engine(m, progress=False, max_batch_size=args.batch, max_prefill_tokens=args.prompt_len,
                          session_len=args.prompt_len + max_tokens)
    for i in range(args.batch):
        fields = dict(MODES[args.sampling], max_tokens=max_tokens, ignore_eos=True)
        if "seed" in fields:
            fields["seed"] += i
        params = sampling_params(fields)
        engine.add_request(f"p{i}", list(range(100 + i, 100 + i + args.prompt_len)), params)
    scheduler = engine.scheduler
    while scheduler.waiting or any(not s.is_decoding for s in scheduler.running):
        engine.step()
    for _ in range(3):  # warm: the decode bucket's first calls
        engine.step()
    assert len(scheduler.running) == args.batch, "every request must be decoding in the traced steps"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    trace_dir = os.path.join(jaxinfer_home(), "bench", "profiles", f"decode-b{args.batch}-{stamp}")
    step_s = []
    jax.profiler.start_trace(trace_dir)
    for _ in range(args.steps):
        t = time.perf_counter()
        engine.step()
        step_s.append(time.perf_counter() - t)
    jax.profiler.stop_trace()

    events = op_events(trace_dir)
    per_kind, calls = collections.Counter(), collections.Counter()
    for e in events:
        kind = re.sub(r"\.\d+$", "", e["name"])
        per_kind[kind] += e["dur"]
        calls[kind] += 1
    n = args.steps
    weight_bytes = sum(a.nbytes for a in jax.tree.leaves(m.params))  # the tied embedding is the LM head
    # The slowest single op of the whole trace, and its kind: at SmolLM2's shapes, the LM head.
    slowest = max(events, key=lambda e: e["dur"])
    rows = ["| op kind | ms per step | calls per step | note |", "|---|---:|---:|---|"]
    for kind, us in per_kind.most_common(args.top):
        note = ""
        if kind == "dot":
            note = f"all weights ({weight_bytes / 1e6:.0f} MB) at {weight_bytes / (us / n) / 1e3:.1f} GB/s"
        rows.append(f"| {kind} | {us / n / 1e3:.2f} | {calls[kind] / n:.0f} | {note} |")
    notes = [
        f"- Batch {args.batch}, {args.prompt_len}-token prompts, `{args.sampling}` sampling "
        f"({MODES[args.sampling]}), {n} decode steps traced; median `engine.step()` "
        f"{statistics.median(step_s) * 1e3:.2f} ms (under the profiler). Trace: `{trace_dir}`.",
        f"- Slowest single op: `{slowest['name']}`, {slowest['dur'] / 1e3:.2f} ms.",
        f"- Load: before `{load_before}`; after `{load_average()}`.",
    ]
    precision = "fp32" if args.dtype == "float32" else "bf16 weights"
    publish(f"Decode step profile, SmolLM2-135M {precision}, batch {args.batch}", rows, notes,
            write=args.write_results)


if __name__ == "__main__":
    main()
