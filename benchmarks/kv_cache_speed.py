"""KV cache formats on CPU, side by side: SmolLM2-135M decode and prefill step times over
bfloat16 (or float32) pages, int8 pages and int4 pages (``--quant-policy 8`` / ``4``).

Quantized pages hold 2-4x the tokens of bfloat16 ones in the same memory; this measures what they
cost or save in the engine's own steps. Engines on the same weights (``--dtype``, default
bfloat16) in one process, taking turns (``decode_layout.alternate``), chosen by ``--pages``
(the first is the one the others are compared with):

- ``auto``: the KV cache in the weights' dtype (``--kv-cache-dtype auto``);
- ``int8``, ``int4``: quantized pages, read by the CPU attention kernel
  (``pallas_kernels/paged_attention_cpu.cc``, target ``paged_attention_quantized``);
- ``int8-reference``: int8 pages read by the jnp reference (the kernel turned off), what every
  quantized cache ran on CPU before the kernel read them.

Each warm engine holds ~10,000-18,000 memory mappings (XLA:CPU's compiled code), so four in one
process pass Linux's default ``vm.max_map_count`` (65,530) and LLVM fails to allocate: the
default runs three.

Decode: per batch size, the median of all pure decode steps of ``--repeats`` rounds per engine;
every request decodes the same prompt, so each engine's requests must all produce the tokens its
batch-1 request produced (batch invariance). Prefill: the step that prefills one request's whole
prompt, median of ``--repeats`` per engine, taking turns. Also: how many greedy tokens each
engine shares with the first at batch 1 (quantized keys and values move the logits a little).

    .venv/bin/python benchmarks/kv_cache_speed.py [--batches 1,8,32] [--write-results]
"""

from __future__ import annotations

import argparse

from decode import prompt_ids
from decode_layout import alternate
from report import common_prefix, load_average, publish
from weight_dtype import prefill_medians

# --pages choice -> (quant_policy, CPU kernels turned off)
PAGES = {"auto": (0, ()), "int8": (8, ()), "int4": (4, ()), "int8-reference": (8, ("paged_attention_quantized",))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16", help="weight dtype")
    ap.add_argument("--pages", default="auto,int8,int8-reference",
                    help=f"the engines' KV pages, comma-separated, from {', '.join(PAGES)} "
                    "(default auto,int8,int8-reference)")
    ap.add_argument("--batches", default="1,8,32", help="decode batch sizes (default 1,8,32)")
    ap.add_argument("--prefill-lengths", default="512", help="prompt lengths prefilled in one step")
    ap.add_argument("--prompt-tokens", type=int, default=256, help="prompt of the decode runs")
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3, help="rounds per engine, taking turns")
    ap.add_argument("--write-results", action="store_true", help="append a dated section to benchmarks/RESULTS.md")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    chosen = [p.strip() for p in args.pages.split(",")]
    if unknown := set(chosen) - set(PAGES):
        raise SystemExit(f"unknown --pages {sorted(unknown)}; choose from {list(PAGES)}")
    lengths = [int(n) for n in args.prefill_lengths.split(",")]
    load_before = load_average()

    import jax.numpy as jnp

    from converters.convert import embedded_model_path
    from converters.loader import load_model
    from jaxinfer.kv_cache import KVCache
    from jaxinfer.llm import build_engine
    from pallas_kernels import cpu_native

    m = load_model(embedded_model_path(progress=False), jnp.dtype(args.dtype), progress=False)
    options = {"max_batch_size": max(batches), "max_prefill_tokens": max(512, *lengths),
               "session_len": max(args.prompt_tokens + args.decode_tokens, *lengths) + 64}
    contenders = {name: PAGES[name] for name in chosen}
    engines = {}
    for name, (policy, off) in contenders.items():
        with cpu_native.turned_off(*off):
            engines[name] = build_engine(m, progress=False, quant_policy=policy, **options)
    names = list(engines)
    base = names[0]
    ratio_heads = " | ".join(f"{n} / {base}" for n in names[1:])
    decode_rows = [f"| batch | {' | '.join(f'{n} ms/step' for n in names)} | {ratio_heads} | "
                   f"batch-invariant ({', '.join(names)}) |",
                   "|---:|" + "---:|" * (2 * len(names) - 1) + "---|"]
    prompt = prompt_ids(m.tokenizer, args.prompt_tokens)
    first: dict[str, list[int]] = {}
    for batch in batches:
        med, tokens = alternate(engines, prompt, batch, args.decode_tokens, args.repeats)
        for name in engines:
            first.setdefault(name, tokens[name][0])
        invariant = ", ".join("yes" if all(t == first[n] for t in tokens[n]) else "**no**" for n in names)
        decode_rows.append(f"| {batch} | {' | '.join(f'{med[n]:.1f}' for n in names)} | "
                           + " | ".join(f"{med[n] / med[base]:.2f}x" for n in names[1:]) + f" | {invariant} |")
        print(decode_rows[-1], flush=True)

    prefill_rows = [f"| prompt tokens | {' | '.join(f'{n} ms' for n in names)} | {ratio_heads} |",
                    "|---:|" + "---:|" * (2 * len(names) - 1)]
    long_prompt = prompt_ids(m.tokenizer, max(lengths))
    for n in lengths:
        ms = prefill_medians(engines, long_prompt[:n], args.repeats)
        prefill_rows.append(f"| {n} | {' | '.join(f'{ms[k]:.1f}' for k in names)} | "
                            + " | ".join(f"{ms[k] / ms[base]:.2f}x" for k in names[1:]) + " |")
        print(prefill_rows[-1], flush=True)

    auto_dtype = engines[base].runner.cache.layers[0].k.dtype
    per_token = {name: KVCache.bytes_per_token(m.config, auto_dtype, policy)
                 for name, (policy, _) in contenders.items()}
    notes = [
        (f"- SmolLM2-135M, {args.dtype} weights (float32 activations), engine options {options}. Decode: "
         f"{args.prompt_tokens}-token prompt, {args.decode_tokens} greedy tokens per request, {args.repeats} rounds "
         f"per engine taking turns, median over all pure decode steps. Prefill: median of {args.repeats} "
         "single-request prefill steps per engine, taking turns, after one untimed."),
        ("- Bytes per token of KV cache (all layers; quantized pages include their float32 scales and zeros): "
         + ", ".join(f"{n} {b}" for n, b in per_token.items()) + f" (auto: {auto_dtype})."),
        ("- CPU kernels: " + ", ".join(
            f"{n}: float pages {e.runner.kernels.paged_attention}, quantized pages "
            f"{e.runner.kernels.paged_attention_quantized}" for n, e in engines.items()) + "."),
        (f"- Greedy tokens at batch 1 shared with {base} (common prefix): "
         + ", ".join(f"{n} {common_prefix(first[base], first[n])}/{args.decode_tokens}" for n in names[1:])
         + (f"; int8 kernel vs int8-reference identical: {first['int8'] == first['int8-reference']}"
            if {"int8", "int8-reference"} <= set(names) else "") + "."),
        f"- Load: before `{load_before}`; after `{load_average()}`.",
    ]
    publish(f"KV cache formats on CPU: {args.dtype} weights over {', '.join(names)} pages, SmolLM2-135M",
            decode_rows, prefill_rows, notes, write=args.write_results)


if __name__ == "__main__":
    main()
