"""What async scheduling buys: decode steps with ``async_scheduling`` on (the engine's default)
and off, side by side, on two models; and what host work is left to hide after it.

- SmolLM2-135M (float32, the embedded GGUF dequantized): a step streams 538 MB of weights, so on
  this CPU the host's work per step (reading tokens, stop checks, text, outputs, padding the next
  step) is a few percent of it.
- A small random Llama (hidden 256, 4 layers, vocab 2048, built with ``transformers``): its step is
  short enough that the host's share is large, as it is for any model on a GPU.

With async scheduling the engine sends decode step N+1, its input tokens fed on device from step
N, before reading step N's tokens; the host's work then overlaps the device's. The third
contender, ``device chain``, is the async engine's own runner with no host work at all between
steps: the same rows decode the same prompt, every step fed from the one before and none read
until a chunk of 8 has run (its time is the chunk's wall time / 8). async / chain is what the
host still costs a step: the most that decoding several tokens per device call (multi-step
decoding) could save.

This host's memory speed drifts within seconds, so the three take turns often: each round, each
(in rotating order) decodes one batch of requests, and a round's ratio compares their median pure
decode step (for the engines, an ``engine.step()`` call that prefilled nothing). Reported per batch
size: the median and quartiles of the rounds' ratios, and each one's median step over all rounds.
Tokens must be equal.

    .venv/bin/python benchmarks/async_scheduling.py [--batches 1,8,32] [--write-results]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

from decode import prompt_ids
from decode_layout import decode_steps
from report import cpu_times, load_average, publish, stolen_since

SMALL_LLAMA = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=2048, max_position_embeddings=2048)


def small_llama(out_dir: str) -> None:
    import torch
    import transformers

    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL_LLAMA)).save_pretrained(out_dir)


CHAIN_CHUNK = 8  # device-chain steps between reads


def device_chain(engine, prompt: list[int], batch: int, tokens: int) -> tuple[list[float], list[list[int]]]:
    """Seconds per decode step of ``batch`` greedy rows of ``prompt`` run by ``engine``'s runner
    with no host work between steps (one entry per chunk of ``CHAIN_CHUNK`` steps), and each row's
    ``tokens`` tokens. Pages come from the engine's block manager and go back to it."""
    import jax

    from jaxinfer.buckets import StepRow
    from jaxinfer.sampling_params import SamplingParams

    runner, pages_of = engine.runner, engine.block_manager
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    pages = [pages_of.allocate(-(-(len(prompt) + tokens) // pages_of.page_size)) for _ in range(batch)]

    def row(i: int, start: int, token_ids) -> StepRow:
        return StepRow(token_ids=token_ids, start=start, pages=pages[i], sampling=params, seed=(0, i),
                       num_generated=start - len(prompt) + 1 if start >= len(prompt) else 0,
                       prompt_len=len(prompt))

    try:
        first = [int(runner.execute([row(i, 0, prompt)], engine.buckets.prefill_shape(len(prompt))).tokens[0])
                 for i in range(batch)]
        shape = engine.buckets.decode_shape(batch)
        steps = [runner.dispatch([row(i, len(prompt), (first[i],)) for i in range(batch)], shape)]
        jax.block_until_ready(steps[0].device_out)
        times = []
        while len(steps) < tokens - 1:
            chunk = min(CHAIN_CHUNK, tokens - 1 - len(steps))
            t = time.perf_counter()
            for _ in range(chunk):
                start = len(prompt) + len(steps)
                steps.append(runner.dispatch([row(i, start, (0,)) for i in range(batch)], shape, feed=steps[-1]))
            jax.block_until_ready(steps[-1].device_out)
            times.append((time.perf_counter() - t) / chunk)
        outs = [s.result().tokens for s in steps]
        return times, [[first[i]] + [int(o[i]) for o in outs] for i in range(batch)]
    finally:
        for p in pages:
            pages_of.release(p)


def paired_rounds(contenders: dict, rounds: int) -> tuple[dict[str, list[float]], bool]:
    """Per round, each contender's median decode step (ms), in rotating order; and whether every
    finished request's tokens were equal between them. ``contenders``: name -> a function that
    decodes one batch and returns (seconds per step, each request's tokens)."""
    steps = {name: [] for name in contenders}
    finished = {name: [] for name in contenders}
    names = list(contenders)
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            s, done = contenders[name]()
            steps[name].append(statistics.median(s) * 1e3)
            finished[name] += done
    first, *others = (sorted(f) for f in finished.values())
    return steps, all(first == other for other in others)


def ratio_cells(numerator: list[float], denominator: list[float]) -> str:
    """``median | q1-q3`` of the rounds' ratios."""
    ratios = [n / d for n, d in zip(numerator, denominator)]
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    return f"{statistics.median(ratios):.2f}x | {q1:.2f}-{q3:.2f}x"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,8,32", help="decode batch sizes, comma-separated (default 1,8,32)")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=15,
                    help="rounds per batch size (each contender decodes one batch in each)")
    ap.add_argument("--write-results", action="store_true", help="append a dated section to benchmarks/RESULTS.md")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    load_before, times_before = load_average(), cpu_times()

    import jax.numpy as jnp
    import numpy as np

    from converters.convert import embedded_model_path
    from converters.loader import load_model
    from jaxinfer.llm import build_engine

    options = {"max_batch_size": max(batches), "session_len": args.prompt_tokens + args.decode_tokens + 64}
    rows = ["| model | batch | sync ms/step | async ms/step | device chain ms/step | sync / async, median of rounds "
            "| quartiles | async / device chain, median of rounds | quartiles | tokens equal |",
            "|---|---:|---:|---:|---:|---:|---|---:|---|---|"]
    with tempfile.TemporaryDirectory() as small_dir:
        small_llama(small_dir)
        models = {"SmolLM2-135M": embedded_model_path(progress=False), "small random Llama": small_dir}
        for name, path in models.items():
            loaded = load_model(path, jnp.float32, progress=False)
            if loaded.tokenizer is not None:
                prompt = prompt_ids(loaded.tokenizer, args.prompt_tokens)
            else:
                prompt = np.random.default_rng(0).integers(3, loaded.config.vocab_size, args.prompt_tokens).tolist()
            engines = {mode: build_engine(loaded, progress=False, async_scheduling=mode == "async", **options)
                       for mode in ("sync", "async")}
            for batch in batches:
                def run(engine):
                    return lambda: decode_steps(engine, prompt, batch, args.decode_tokens)

                steps, equal = paired_rounds(
                    {"sync": run(engines["sync"]), "async": run(engines["async"]),
                     "chain": lambda: device_chain(engines["async"], prompt, batch, args.decode_tokens)},
                    args.rounds)
                med = {n: statistics.median(s) for n, s in steps.items()}
                rows.append(f"| {name} | {batch} | {med['sync']:.2f} | {med['async']:.2f} | {med['chain']:.2f} | "
                            f"{ratio_cells(steps['sync'], steps['async'])} | "
                            f"{ratio_cells(steps['async'], steps['chain'])} | {'yes' if equal else '**no**'} |")
                print(rows[-1], flush=True)
            del engines, loaded
    notes = [
        (f"- float32 weights, {args.prompt_tokens}-token prompt, {args.decode_tokens} greedy tokens per request, "
         f"{args.rounds} rounds per batch size, the three in rotating order. Small random Llama: "
         f"{SMALL_LLAMA}. sync / async above 1: async scheduling is faster. async / device chain above 1: "
         f"the host's work still costs the async engine that much per step; device chain steps are timed "
         f"per chunk of {CHAIN_CHUNK} (chunk wall time / {CHAIN_CHUNK})."),
        f"- Load: before `{load_before}`; after `{load_average()}`. {stolen_since(times_before)}.",
    ]
    publish("Async scheduling: decode steps with it on and off, and with no host work", rows, notes,
            write=args.write_results)


if __name__ == "__main__":
    main()
