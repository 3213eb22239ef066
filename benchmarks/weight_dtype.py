"""float32 vs bfloat16 weights on CPU, side by side: SmolLM2-135M decode and prefill step times.

``--dtype bfloat16`` on CPU keeps activations in float32 and rounds each matmul's input rows to
bfloat16, summing in float32; the KV cache takes the weights' dtype (``--kv-cache-dtype auto``). On a CPU with
AMX or AVX512_BF16 the engine packs the weights once for ``pallas_kernels.bf16_matmul``'s kernels
("bfloat16 kernel"); elsewhere, or with the kernels turned off, XLA's own bfloat16 dots run ("bfloat16 XLA":
they rearrange the weights on every call). This measures what each buys in the engine's own
steps: four engines on the same weights (float32, and the same rounded to bfloat16 three times,
the third with a float32 KV cache) in one process, taking turns (``decode_layout.alternate``).

- decode: per batch size, the median time of all pure decode steps (no prefill in them) of
  ``--repeats`` rounds per engine; every request decodes the same prompt, so each engine's
  requests must all produce the tokens its batch-1 request produced (batch invariance);
- prefill: the step that prefills one request's whole prompt of N tokens, median of
  ``--repeats`` per engine, taking turns;
- how many of bfloat16's greedy tokens agree with float32's (common prefix, batch 1), whether
  the XLA and kernel bfloat16 engines' tokens are identical (with AMX they compute the same sums;
  AVX512_BF16's sums differ in order), and how
  many agree with a fourth engine, bfloat16 kernel with a float32 KV cache (``--kv-cache-dtype
  float32``; the other bfloat16 engines have bfloat16 pages, the float32 one float32 pages).

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


def prefill_medians(engines: dict, prompt: list[int], repeats: int) -> dict[str, float]:
    """Per engine, the median ms of ``repeats`` steps prefilling ``prompt``, the engines taking
    turns, after one untimed run each (the first run of a shape pays one-time costs)."""
    times: dict[str, list[float]] = {name: [] for name in engines}
    for engine in engines.values():
        prefill_step(engine, prompt)
    for _ in range(repeats):
        for name, engine in engines.items():
            times[name].append(prefill_step(engine, prompt))
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


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

    from pallas_kernels import cpu_native

    path = embedded_model_path(progress=False)
    loaded = {"float32": load_model(path, jnp.float32, progress=False),
              "bfloat16 XLA": load_model(path, jnp.bfloat16, progress=False),
              "bfloat16 kernel": load_model(path, jnp.bfloat16, progress=False),
              "bfloat16 kernel, float32 KV": load_model(path, jnp.bfloat16, progress=False)}
    tokenizer = loaded["float32"].tokenizer
    max_prefill = max(lengths)
    options = {"max_batch_size": max(batches), "max_prefill_tokens": max(512, max_prefill),
               "session_len": max(args.prompt_tokens + args.decode_tokens, max_prefill) + 64}
    engines = {}
    for name, m in loaded.items():
        if name == "bfloat16 XLA":  # the bfloat16 kernels off: the weights stay unpacked, XLA's dots run
            with cpu_native.turned_off("amx_matmul", "avx512bf16_matmul"):
                engines[name] = build_engine(m, progress=False, **options)
        elif name == "bfloat16 kernel, float32 KV":  # twice the bytes per token
            engines[name] = build_engine(m, progress=False, kv_cache_dtype="float32", **options)
        else:
            engines[name] = build_engine(m, progress=False, **options)
    bf16_kernel = ("AMX" if engines["bfloat16 kernel"].runner.kernels.amx_matmul
                   else "AVX512_BF16" if engines["bfloat16 kernel"].runner.kernels.avx512bf16_matmul else None)
    if engines["bfloat16 kernel"].runner.matmul_kernel != "bf16_matmul":
        print("note: no bfloat16 matmul kernel is available here; 'bfloat16 kernel' runs XLA's dots too")
    names = list(engines)
    f32, xla, bf16, bf16_f32kv = names

    decode_rows = [f"| batch | {' | '.join(f'{n} ms/step' for n in names)} | {f32} / {bf16} | {xla} / {bf16} | "
                   f"{bf16_f32kv} / {bf16} | batch-invariant ({', '.join(names)}) |",
                   "|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    prompt = prompt_ids(tokenizer, args.prompt_tokens)
    first: dict[str, list[int]] = {}
    for batch in batches:
        med, tokens = alternate(engines, prompt, batch, args.decode_tokens, args.repeats)
        for name in engines:
            first.setdefault(name, tokens[name][0])
        invariant = ", ".join("yes" if all(t == first[n] for t in tokens[n]) else "**no**" for n in engines)
        decode_rows.append(f"| {batch} | {' | '.join(f'{med[n]:.1f}' for n in names)} | "
                           f"{med[f32] / med[bf16]:.2f}x | {med[xla] / med[bf16]:.2f}x | "
                           f"{med[bf16_f32kv] / med[bf16]:.2f}x | {invariant} |")
        print(decode_rows[-1], flush=True)

    prefill_rows = [f"| prompt tokens | {' | '.join(f'{n} ms' for n in names)} | {f32} / {bf16} | {xla} / {bf16} | "
                    f"{bf16_f32kv} / {bf16} |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    long_prompt = prompt_ids(tokenizer, max_prefill)
    for n in lengths:
        ms = prefill_medians(engines, long_prompt[:n], args.repeats)
        prefill_rows.append(f"| {n} | {' | '.join(f'{ms[k]:.1f}' for k in names)} | {ms[f32] / ms[bf16]:.2f}x | "
                            f"{ms[xla] / ms[bf16]:.2f}x | {ms[bf16_f32kv] / ms[bf16]:.2f}x |")
        print(prefill_rows[-1], flush=True)

    agree = common_prefix(first[f32], first[bf16])
    notes = [
        (f"- SmolLM2-135M (embedded GGUF dequantized to float32; bfloat16: the same weights rounded), engine "
         f"options {options}. Decode: {args.prompt_tokens}-token prompt, {args.decode_tokens} greedy tokens per "
         f"request, {args.repeats} rounds per engine taking turns, median over all pure decode steps. Prefill: "
         f"median of {args.repeats} single-request prefill steps per engine, taking turns, after one untimed."),
        (f"- bfloat16 kernel: weights packed for `pallas_kernels.bf16_matmul` (in use: "
         f"{engines[bf16].runner.matmul_kernel == 'bf16_matmul'}, the {bf16_kernel} kernel); float32: matmul kernel "
         f"{engines[f32].runner.matmul_kernel}; bfloat16 XLA: built with "
         "`cpu_native.turned_off('amx_matmul', 'avx512bf16_matmul')`. "
         "KV cache: "
         + ", ".join(f"{n} {e.runner.cache.layers[0].k.dtype}" for n, e in engines.items())
         + f" (`--kv-cache-dtype auto`: the weights' dtype). CPU attention kernel in all: "
         f"{engines[f32].runner.kernels.paged_attention}."),
        (f"- Greedy tokens at batch 1: bfloat16 kernel vs float32 common prefix {agree}/{args.decode_tokens}; "
         f"bfloat16 kernel vs bfloat16 XLA identical: {first[bf16] == first[xla]}; bfloat16 kernel vs its float32-KV twin "
         f"common prefix {common_prefix(first[bf16], first[bf16_f32kv])}/{args.decode_tokens}."),
        f"- Load: before `{load_before}`; after `{load_average()}`.",
    ]
    publish("Weight dtype on CPU: float32 vs bfloat16 weights (float32 activations; XLA dots vs bfloat16 kernel; "
            "bfloat16 vs float32 KV cache), SmolLM2-135M", decode_rows, prefill_rows, notes, write=args.write_results)


if __name__ == "__main__":
    main()
