"""float32 vs bfloat16 weights on CPU, side by side: SmolLM2-135M decode and prefill step times.

``--dtype bfloat16`` on CPU keeps activations and the KV cache in float32 and feeds bfloat16 rows
to XLA's bfloat16 dots (AMX), padded to at least 4 rows (``jaxinfer.model._dot``). This measures
what that buys in the engine's own steps: two engines on the same weights (float32, and the same
rounded to bfloat16) in one process, taking turns (``decode_layout.alternate``).

- decode: per batch size, the median time of all pure decode steps (no prefill in them) of
  ``--repeats`` rounds per engine; every request decodes the same prompt, so each engine's
  requests must all produce the tokens its batch-1 request produced (batch invariance);
- prefill: the step that prefills one request's whole prompt of N tokens, median of
  ``--repeats`` per engine, taking turns;
- how many of bfloat16's greedy tokens agree with float32's (common prefix, batch 1).

    .venv/bin/python benchmarks/weight_dtype.py [--batches 1,4,8,16,32] [--write-results]
"""

from __future__ import annotations

import argparse
import statistics
import time

from decode import prompt_ids
from decode_layout import alternate
from report import common_prefix, load_average, publish


def prefill_step(engine, prompt: list[int]) -> float:
    """Seconds of the step that prefills ``prompt`` as one new request (then drained)."""
    from jaxinfer.sampling_params import SamplingParams

    engine.add_request(f"p{time.perf_counter_ns()}", prompt, SamplingParams(temperature=0, max_tokens=1))
    t = time.perf_counter()
    engine.step()
    elapsed = time.perf_counter() - t
    while engine.has_unfinished_requests():
        engine.step()
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,4,8,16,32", help="decode batch sizes (default 1,4,8,16,32)")
    ap.add_argument("--prefill-lengths", default="128,512", help="prompt lengths prefilled in one step")
    ap.add_argument("--prompt-tokens", type=int, default=128, help="prompt of the decode runs")
    ap.add_argument("--decode-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3, help="rounds per engine, taking turns")
    ap.add_argument("--write-results", action="store_true", help="append a dated section to benchmarks/RESULTS.md")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    lengths = [int(n) for n in args.prefill_lengths.split(",")]
    load_before = load_average()

    import jax.numpy as jnp

    from converters.convert import embedded_model_path
    from converters.loader import load_model
    from jaxinfer.llm import build_engine

    path = embedded_model_path(progress=False)
    loaded = {"float32": load_model(path, jnp.float32, progress=False),
              "bfloat16": load_model(path, jnp.bfloat16, progress=False)}
    tokenizer = loaded["float32"].tokenizer
    max_prefill = max(lengths)
    options = {"max_batch_size": max(batches), "max_prefill_tokens": max(512, max_prefill),
               "session_len": max(args.prompt_tokens + args.decode_tokens, max_prefill) + 64}
    engines = {name: build_engine(m, progress=False, **options) for name, m in loaded.items()}

    decode_rows = ["| batch | float32 ms/step | bfloat16 ms/step | float32 / bfloat16 | batch-invariant (f32, bf16) |",
                   "|---:|---:|---:|---:|---|"]
    prompt = prompt_ids(tokenizer, args.prompt_tokens)
    first: dict[str, list[int]] = {}
    for batch in batches:
        med, tokens = alternate(engines, prompt, batch, args.decode_tokens, args.repeats)
        for name in engines:
            first.setdefault(name, tokens[name][0])
        invariant = ", ".join("yes" if all(t == first[n] for t in tokens[n]) else "**no**" for n in engines)
        decode_rows.append(f"| {batch} | {med['float32']:.1f} | {med['bfloat16']:.1f} | "
                           f"{med['float32'] / med['bfloat16']:.2f}x | {invariant} |")
        print(decode_rows[-1], flush=True)

    prefill_rows = ["| prompt tokens | float32 ms | bfloat16 ms | float32 / bfloat16 |", "|---:|---:|---:|---:|"]
    long_prompt = prompt_ids(tokenizer, max_prefill)
    for n in lengths:
        times: dict[str, list[float]] = {name: [] for name in engines}
        for name, engine in engines.items():  # untimed: the first run of a shape pays one-time costs
            prefill_step(engine, long_prompt[:n])
        for _ in range(args.repeats):
            for name, engine in engines.items():
                times[name].append(prefill_step(engine, long_prompt[:n]))
        f32, bf16 = (statistics.median(times[k]) * 1e3 for k in ("float32", "bfloat16"))
        prefill_rows.append(f"| {n} | {f32:.1f} | {bf16:.1f} | {f32 / bf16:.2f}x |")
        print(prefill_rows[-1], flush=True)

    agree = common_prefix(first["float32"], first["bfloat16"])
    notes = [
        (f"- SmolLM2-135M (embedded GGUF dequantized to float32; bfloat16: the same weights rounded), engine "
         f"options {options}. Decode: {args.prompt_tokens}-token prompt, {args.decode_tokens} greedy tokens per "
         f"request, {args.repeats} rounds per engine taking turns, median over all pure decode steps. Prefill: "
         f"median of {args.repeats} single-request prefill steps per engine, taking turns, after one untimed."),
        f"- Greedy tokens, bfloat16 vs float32 at batch 1: common prefix {agree}/{args.decode_tokens}.",
        f"- Load: before `{load_before}`; after `{load_average()}`.",
    ]
    publish("Weight dtype on CPU: float32 vs bfloat16 weights (float32 activations), SmolLM2-135M",
            decode_rows, prefill_rows, notes, write=args.write_results)


if __name__ == "__main__":
    main()
