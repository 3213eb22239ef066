"""What async scheduling buys: decode steps with ``async_scheduling`` on (the engine's default)
and off, side by side, on two models.

- SmolLM2-135M (float32, the embedded GGUF dequantized): a step streams 538 MB of weights, so on
  this CPU the host's work per step (reading tokens, stop checks, text, outputs, padding the next
  step) is a few percent of it.
- A small random Llama (hidden 256, 4 layers, vocab 2048, built with ``transformers``): its step is
  short enough that the host's share is large, as it is for any model on a GPU.

With async scheduling the engine sends decode step N+1, its input tokens fed on device from step
N, before reading step N's tokens; the host's work then overlaps the device's. This host's memory
speed drifts within seconds, so the engines take turns often: each round, each engine (in turns
first) decodes one batch of requests, and the round's ratio is sync / async of their median pure
decode step (an ``engine.step()`` call that prefilled nothing). Reported per batch size: the median
and quartiles of the rounds' ratios, and each engine's median step over all rounds. Tokens must be
equal.

    .venv/bin/python benchmarks/async_scheduling.py [--batches 1,8,32] [--write-results]
"""

from __future__ import annotations

import argparse
import tempfile

import statistics

from decode import prompt_ids
from decode_layout import alternate
from report import cpu_times, load_average, publish, stolen_since

SMALL_LLAMA = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=2048, max_position_embeddings=2048)


def small_llama(out_dir: str) -> None:
    import torch
    import transformers

    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL_LLAMA)).save_pretrained(out_dir)


def paired_rounds(engines: dict, prompt: list[int], batch: int, tokens: int, rounds: int):
    """Per round, each engine's median pure decode step (ms), the engines in turns first; and
    whether every finished request's tokens were equal between them."""
    steps = {name: [] for name in engines}
    finished = {name: [] for name in engines}
    for r in range(rounds):
        order = list(engines) if r % 2 == 0 else list(engines)[::-1]
        med, done = alternate({name: engines[name] for name in order}, prompt, batch, tokens, 1)
        for name in engines:
            steps[name].append(med[name])
            finished[name] += done[name]
    first, second = engines
    return steps, sorted(finished[first]) == sorted(finished[second])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,8,32", help="decode batch sizes, comma-separated (default 1,8,32)")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=15, help="rounds per batch size (each engine decodes once in each)")
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
    rows = ["| model | batch | sync ms/step | async ms/step | sync / async, median of rounds | quartiles | tokens equal |",
            "|---|---:|---:|---:|---:|---|---|"]
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
                steps, equal = paired_rounds(engines, prompt, batch, args.decode_tokens, args.rounds)
                ratios = [s / a for s, a in zip(steps["sync"], steps["async"])]
                q1, _, q3 = statistics.quantiles(ratios, n=4)
                rows.append(f"| {name} | {batch} | {statistics.median(steps['sync']):.2f} | "
                            f"{statistics.median(steps['async']):.2f} | {statistics.median(ratios):.2f}x | "
                            f"{q1:.2f}-{q3:.2f}x | {'yes' if equal else '**no**'} |")
                print(rows[-1], flush=True)
            del engines, loaded
    notes = [
        (f"- float32 weights, {args.prompt_tokens}-token prompt, {args.decode_tokens} greedy tokens per request, "
         f"{args.rounds} rounds per batch size, the engines in turns first. Small random Llama: "
         f"{SMALL_LLAMA}. A ratio above 1 means async scheduling is faster."),
        f"- Load: before `{load_before}`; after `{load_average()}`. {stolen_since(times_before)}.",
    ]
    publish("Async scheduling: decode steps with it on and off", rows, notes, write=args.write_results)


if __name__ == "__main__":
    main()
