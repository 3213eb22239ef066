"""What scoring a prompt costs: SmolLM2-135M float32, the time to the first token of a request with
``prompt_logprobs`` (every prompt token's logprob and top alternatives, as lm-eval's
loglikelihood asks through echo + logprobs) against the same request without.

Each round runs the two in turn (alternating which goes first) on the same prompt of real English
text (``pydoc_data.topics``), one request at a time, ``max_tokens=1``. Reported per prompt
length: each one's median time over the rounds, the median and quartiles of the rounds' ratios,
and the scored prompt tokens per second. Scoring adds the LM head over every prompt position
(vocab x hidden multiply-adds per token) and a log-softmax and top-k over the vocabulary per
position.

    .venv/bin/python benchmarks/prompt_scoring.py [--prompt-tokens 128,512] [--write-results]
"""

from __future__ import annotations

import argparse
import statistics
import time

from async_scheduling import ratio_cells
from decode import prompt_ids
from report import cpu_times, load_average, publish, stolen_since


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt-tokens", default="128,512", help="prompt lengths, comma-separated (default 128,512)")
    ap.add_argument("--top", type=int, default=1, help="top alternatives per prompt token (default 1, as lm-eval)")
    ap.add_argument("--rounds", type=int, default=9, help="rounds per prompt length (default 9)")
    ap.add_argument("--write-results", action="store_true", help="append a dated section to benchmarks/RESULTS.md")
    args = ap.parse_args()
    lengths = [int(n) for n in args.prompt_tokens.split(",")]
    load_before, times_before = load_average(), cpu_times()

    import jax.numpy as jnp

    from converters.convert import embedded_model_path
    from converters.loader import load_model
    from jaxinfer import LLM, SamplingParams

    loaded = load_model(embedded_model_path(progress=False), jnp.float32, progress=False)
    tokenizer = loaded.tokenizer
    llm = LLM(loaded, progress=False, max_batch_size=1, session_len=max(lengths) + 64)
    kinds = {
        "plain": SamplingParams(temperature=0, max_tokens=1, ignore_eos=True),
        "scored": SamplingParams(temperature=0, max_tokens=1, ignore_eos=True, prompt_logprobs=args.top),
    }
    rows = ["| prompt tokens | plain ms (median) | scored ms (median) | scored / plain, median of rounds | quartiles "
            "| scored prompt tokens/s |", "|---:|---:|---:|---:|---|---:|"]
    for n in lengths:
        prompt = prompt_ids(tokenizer, n)
        times = {kind: [] for kind in kinds}
        for kind, params in kinds.items():  # untimed: first runs of this length
            llm.generate([prompt], params)
        for r in range(args.rounds):
            for kind in (list(kinds) if r % 2 == 0 else list(kinds)[::-1]):
                t = time.perf_counter()
                (out,) = llm.generate([prompt], kinds[kind])
                times[kind].append((time.perf_counter() - t) * 1e3)
                assert (out.prompt_logprobs is not None) == (kind == "scored")
                assert kind == "plain" or len(out.prompt_logprobs) == n
        plain, scored = (statistics.median(times[k]) for k in kinds)
        rows.append(f"| {n} | {plain:.0f} | {scored:.0f} | {ratio_cells(times['scored'], times['plain'])} "
                    f"| {n / scored * 1e3:.0f} |")
        print(rows[-1], flush=True)
    notes = [
        (f"- SmolLM2-135M float32 weights (embedded GGUF dequantized), one request at a time, max_tokens 1 "
         f"(time = submission to the first token: the prefill), `prompt_logprobs={args.top}` for the scored one; "
         f"{args.rounds} rounds per length, the two in alternating order; engine with max_batch_size 1 and "
         f"the default max_prefill_tokens (512), buckets compiled before timing."),
        f"- Load: before `{load_before}`; after `{load_average()}`. {stolen_since(times_before)}.",
    ]
    publish("Prompt scoring: prefill with and without prompt logprobs, SmolLM2-135M float32", rows, notes,
            write=args.write_results)


if __name__ == "__main__":
    main()
