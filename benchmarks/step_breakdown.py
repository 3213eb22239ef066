"""What parts of a decode step cost, measured by taking them out: SmolLM2-135M decode steps
of the engine as shipped, side by side with what-if variants of it (``--variants`` picks them).

- ``XLA layer ops``: jaxinfer's decoder-layer kernel (``pallas_kernels/decoder_layer_cpu.cc``) off,
  so a decode step's layers run as separate ops: XLA's norms, rope, K/V scatters, residual adds
  and activation around the matmul and attention kernels. Its tokens should equal the engine's
  (the two agree to float32 rounding, so they may part after many tokens).
- ``no attention``: paged attention replaced by a copy of the queries (KV writes, projections,
  MLP and LM head unchanged), with the layers as separate ops (the swap reaches only those). Its
  step time is ``XLA layer ops``' minus what attention costs, so ``XLA layer ops - no attention``
  is attention's share, measured rather than inferred by subtraction from matmul benchmarks. Its
  tokens are meaningless and not compared.
- ``XLA attention``: jaxinfer's CPU attention kernel (``pallas_kernels/paged_attention_cpu.cc``)
  off, so decode attention runs the jnp reference through XLA. Its tokens must equal the engine's.
- ``XLA matmuls``: jaxinfer's CPU matmul kernels (``pallas_kernels/f32_matmul.cc``,
  ``amx_matmul.cc``, ``avx512bf16_matmul.cc``) off, so the weights stay unpacked and XLA's dots
  run. With bfloat16 weights on AMX its tokens must equal the engine's (the AMX kernel repeats
  XLA's sums); the float32 and AVX512_BF16 kernels sum in another order, so there they may part
  after many tokens.
- ``4 KiB pages``: the weights left in XLA's own buffers instead of the engine's huge-page mapping
  (``jaxinfer.huge_pages``). Its tokens must equal the engine's.

The variants are built by swapping ``jaxinfer.model``'s attention function or turning kernels off while
their runner traces its shape buckets (``warmup``) (``jaxinfer.model_runner``'s ``parts_to_huge_pages`` for
the pages), so they run the engine's own scheduler,
buckets and sampler. Engines alternate within each repeat; per batch size: median step time over
all pure decode steps (no prefill in them) of all repeats.

    .venv/bin/python benchmarks/step_breakdown.py --batches 1,16,32 [--variants "4 KiB pages"] [--write-results]
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator

from decode import prompt_ids
from decode_layout import alternate
from report import cpu_times, load_average, publish, stolen_since


@contextlib.contextmanager
def no_attention() -> Iterator[None]:
    """Attention as a copy of the queries, in layers run as separate ops."""
    from jaxinfer import model
    from pallas_kernels import cpu_native

    original = model.paged_attention
    model.paged_attention = lambda q, kv, *args, **kwargs: q
    try:
        with cpu_native.turned_off("decoder_layer"):
            yield
    finally:
        model.paged_attention = original


@contextlib.contextmanager
def small_pages() -> Iterator[None]:
    from jaxinfer import model_runner

    original = model_runner.parts_to_huge_pages
    model_runner.parts_to_huge_pages = lambda shapes, parts, device: {k: v for part in parts for k, v in part.items()}
    try:
        yield
    finally:
        model_runner.parts_to_huge_pages = original


def huge_page_state() -> str:
    """The kernel's THP mode and how much of this process sits in huge pages (Linux)."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            mode = f.read().strip()
        with open("/proc/self/smaps_rollup") as f:
            held = next(line.split(":")[1].strip() for line in f if line.startswith("AnonHugePages"))
    except (OSError, StopIteration):
        return "unknown (no /sys/kernel/mm/transparent_hugepage or /proc/self/smaps_rollup)"
    return f"mode `{mode}`; this process held {held} of anonymous memory in huge pages at the end"


# Variant -> how its column compares: "share" (what taking it out saves from its baseline), "slower"
# (variant / engine).
VARIANTS = {"XLA layer ops": "slower", "no attention": "share", "XLA attention": "slower", "XLA matmuls": "slower",
            "4 KiB pages": "slower"}
# What a variant is compared with, when not the engine (chosen with it when it is not).
BASELINES = {"no attention": "XLA layer ops"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,16,32", help="decode batch sizes, comma-separated (default 1,16,32)")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--decode-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3, help="runs of each engine per batch size, alternating")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                    help="weights (bfloat16: the CPU's bfloat16 mode, AMX kernel where available)")
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help=f"what-if variants run beside the engine, comma-separated (default: all of {', '.join(VARIANTS)})")
    ap.add_argument("--write-results", action="store_true", help="append a dated section to benchmarks/RESULTS.md")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    chosen = [v.strip() for v in args.variants.split(",") if v.strip()]
    if unknown := set(chosen) - set(VARIANTS):
        raise SystemExit(f"unknown variants {sorted(unknown)}; choose from {list(VARIANTS)}")
    chosen = [v for v in VARIANTS if v in chosen or v in {BASELINES.get(c) for c in chosen}]
    load_before, times_before = load_average(), cpu_times()

    import jax.numpy as jnp

    from converters.convert import embedded_model_path
    from converters.loader import load_model
    from jaxinfer.llm import build_engine
    from jaxinfer.model_runner import ModelRunner
    from pallas_kernels import cpu_native

    loaded = load_model(embedded_model_path(progress=False), jnp.dtype(args.dtype), progress=False)
    prompt = prompt_ids(loaded.tokenizer, args.prompt_tokens)
    options = {"max_batch_size": max(batches), "session_len": args.prompt_tokens + args.decode_tokens + 64}
    same_params = lambda: loaded.params  # noqa: E731
    swaps = {  # variant -> (its parameters, the swap it runs under)
        "XLA layer ops": (same_params, lambda: cpu_native.turned_off("decoder_layer")),
        "no attention": (same_params, no_attention),
        "XLA attention": (same_params, lambda: cpu_native.turned_off("paged_attention")),
        "XLA matmuls": (same_params, lambda: cpu_native.turned_off("f32_matmul", "amx_matmul", "avx512bf16_matmul")),
        "4 KiB pages": (same_params, small_pages),
    }
    engines = {"engine": build_engine(loaded, progress=False, **options)}
    for name in chosen:
        params, swap = swaps[name][0](), swaps[name][1]
        engine = build_engine(loaded, warmup=False, progress=False, **options)
        r = engine.runner  # same buckets and pages, the variant's model
        with swap():
            engine.runner = ModelRunner(loaded.config, params, loaded.dtype, r.buckets, r.cache.num_pages, 0)
            engine.runner.warmup(progress=False)
        engines[name] = engine

    header, align = ["batch", "engine ms/step"], ["---:", "---:"]
    for name in chosen:
        kind = VARIANTS[name]
        header += [f"{name} ms/step", f"attention's share of {BASELINES[name]}" if kind == "share" else
                   f"{name} / engine"]
        align += ["---:", "---:"]
        if kind != "share":
            header.append(f"{name} tokens equal")
            align.append("---")
    rows = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    for batch in batches:
        med, tokens = alternate(engines, prompt, batch, args.decode_tokens, args.repeats)
        cells = [str(batch), f"{med['engine']:.1f}"]
        for name in chosen:
            kind, ms = VARIANTS[name], med[name]
            cells.append(f"{ms:.1f}")
            if kind == "share":
                base = med[BASELINES[name]]
                cells.append(f"{(base - ms) / base:.0%}")
            else:
                cells.append(f"{ms / med['engine']:.2f}x")
                cells.append("yes" if tokens["engine"] == tokens[name] else "**no**")
        rows.append("| " + " | ".join(cells) + " |")
        print(rows[-1], flush=True)
    notes = [
        (f"- SmolLM2-135M {args.dtype} weights (embedded GGUF dequantized; matmul kernel: "
         f"{engines['engine'].runner.matmul_kernel}), {args.prompt_tokens}-token prompt, "
         f"{args.decode_tokens} greedy tokens per request (context {args.prompt_tokens}-"
         f"{args.prompt_tokens + args.decode_tokens}), {args.repeats} repeats per engine alternating; median over "
         "all pure decode steps. attention's share = (XLA layer ops - no attention) / XLA layer ops; a ratio "
         "above 1 means the engine is faster."),
        f"- Load: before `{load_before}`; after `{load_average()}`. {stolen_since(times_before)}.",
    ]
    if "4 KiB pages" in chosen:
        notes.append(f"- Transparent huge pages: {huge_page_state()}.")
    publish(f"Decode step breakdown: the engine vs {', '.join(chosen)}, SmolLM2-135M {args.dtype} weights",
            rows, notes,
            write=args.write_results)


if __name__ == "__main__":
    main()
