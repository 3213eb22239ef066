"""What sampling options cost a decode step: SmolLM2-135M float32 decode steps with greedy requests
and with sampled ones, side by side in one engine.

- ``greedy``: temperature 0 (the engine skips the sampler's other stages);
- ``chat defaults``: what ``jaxinfer chat`` sends (temperature 0.7, top-k 40, top-p 0.9), seeded;
- ``top-p 0.9``: temperature 0.8 and top-p alone, seeded, as an OpenAI client without top_k sends;
- ``top-p 0.9, T 1``: the same at the OpenAI API's default temperature, whose nuclei are wider;
- ``guided regex``: greedy under guided decoding (the regex ``[^\n]{1,2000}``, which outlasts the
  run): the host fills each row's token mask from its grammar before every step, the sampler
  applies it, and async scheduling drains for guided rows.

Each request of a batch has its own seed (1, 2, ...), so its rows follow different texts and
their nuclei differ as a real batch's do.

Each round, each mode (in rotating order) decodes one batch of requests of the same prompt; a
round's ratio is the mode's median pure decode step (an ``engine.step()`` call that prefilled
nothing) over greedy's. Reported per batch size: each mode's median step over all rounds, and the
median and quartiles of the rounds' ratios. The sampler's cost is the step's excess over greedy.

    .venv/bin/python benchmarks/sampling_cost.py [--batches 1,8,32] [--write-results]
"""

from __future__ import annotations

import argparse
import statistics

from async_scheduling import paired_rounds, ratio_cells
from decode import prompt_ids
from decode_layout import decode_steps
from report import cpu_times, load_average, publish, stolen_since

# ``SamplingParams`` fields of each mode (``profile_step.py --sampling`` takes the same names).
MODES = {
    "greedy": dict(temperature=0),
    "chat defaults": dict(temperature=0.7, top_k=40, top_p=0.9, seed=1),
    "top-p 0.9": dict(temperature=0.8, top_p=0.9, seed=1),
    "top-p 0.9, T 1": dict(temperature=1.0, top_p=0.9, seed=1),
    "guided regex": dict(temperature=0, guided_decoding=dict(regex=r"[^\n]{1,2000}")),
}


def sampling_params(fields: dict):
    """``SamplingParams`` of a mode's fields (``guided_decoding`` as GuidedDecodingParams' fields)."""
    from jaxinfer import SamplingParams
    from jaxinfer.sampling_params import GuidedDecodingParams

    guided = fields.get("guided_decoding")
    return SamplingParams(**{**fields, "guided_decoding": guided and GuidedDecodingParams(**guided)})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,8,32", help="decode batch sizes, comma-separated (default 1,8,32)")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=9, help="rounds per batch size (each mode decodes one batch in each)")
    ap.add_argument("--write-results", action="store_true", help="append a dated section to benchmarks/RESULTS.md")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    load_before, times_before = load_average(), cpu_times()

    import jax.numpy as jnp

    from converters.convert import embedded_model_path
    from converters.loader import load_model
    from jaxinfer.llm import build_engine

    modes = {name: sampling_params(fields) for name, fields in MODES.items()}
    loaded = load_model(embedded_model_path(progress=False), jnp.float32, progress=False)
    prompt = prompt_ids(loaded.tokenizer, args.prompt_tokens)
    engine = build_engine(loaded, progress=False, max_batch_size=max(batches),
                          session_len=args.prompt_tokens + args.decode_tokens + 64)
    rows = ["| batch | mode | ms/step (median) | / greedy, median of rounds | quartiles |", "|---:|---|---:|---:|---|"]
    for batch in batches:
        def run(params):
            return lambda: decode_steps(engine, prompt, batch, args.decode_tokens, params)

        # Sampled tokens differ from greedy ones by design: the rounds' token check is not read.
        steps, _ = paired_rounds({name: run(params) for name, params in modes.items()}, args.rounds)
        for name in modes:
            cells = "- | -" if name == "greedy" else ratio_cells(steps[name], steps["greedy"])
            rows.append(f"| {batch} | {name} | {statistics.median(steps[name]):.2f} | {cells} |")
            print(rows[-1], flush=True)
    notes = [
        (f"- float32 weights, {args.prompt_tokens}-token prompt, {args.decode_tokens} tokens per request (EOS "
         f"ignored), {args.rounds} rounds per batch size, modes in rotating order. Modes: "
         + "; ".join(f"{name}: temperature {p.temperature}, top-k {p.top_k}, top-p {p.top_p}"
                     + (f", guided by {MODES[name]['guided_decoding']}" if p.guided_decoding else "")
                     for name, p in modes.items())
         + "; sampled request i of a batch seeded i + 1. The engine's sampler as of this commit; run at "
         "another commit to compare samplers."),
        f"- Load: before `{load_before}`; after `{load_average()}`. {stolen_since(times_before)}.",
    ]
    publish("Sampling cost: decode steps with greedy and sampled requests", rows, notes, write=args.write_results)


if __name__ == "__main__":
    main()
