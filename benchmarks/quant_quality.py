"""Quality and memory of every weight and KV-cache format on the embedded SmolLM2-135M-Instruct.

Perplexity over the held-out part of ``pydoc_data.topics`` (never used for calibration), computed
as llama.cpp's ``llama-perplexity`` does (``jaxinfer.perplexity``: windows of ``--ctx`` tokens,
BOS first, second halves scored); weight bytes of the whole model and of its decoder linears; KV
bytes per token. Rows: float32, bfloat16, RTN int4 g128, AWQ int4 g128 (``--search-scale``), the
GGUF's Q4_1 imported directly (no dequantize-requantize; also with bfloat16 scales and biases, as a
GPU loads it), KV int8 and KV int4.

Must hold (issue "Quantization"): AWQ perplexity < RTN's; KV int8 within 1% of float32; int4
linear weights at most 30% of the bfloat16 bytes. The script states each plainly.

    .venv/bin/python benchmarks/quant_quality.py                    # print the table
    .venv/bin/python benchmarks/quant_quality.py --write-results    # and append it to RESULTS.md
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import ml_dtypes
import numpy as np
from report import load_average, publish

from converters.awq import LINEARS, awq_scale, quantize_params
from converters.calibration import calibration_tokens, pydoc_text
from converters.checkpoint import atomic_output_dir, is_converted_dir, write_checkpoint
from converters.convert import embedded_model_gguf, embedded_model_path
from converters.loader import load_model
from jaxinfer.config import activation_dtype, kv_cache_dtype
from jaxinfer.home import jaxinfer_home
from jaxinfer.kv_cache import KVCache
from jaxinfer.perplexity import perplexity


def quantized_checkpoint(name: str, base, method: str, group: int, calib: tuple[int, int]) -> str:
    """RTN or AWQ int4 of the float model, written once under $JAXINFER_HOME/bench."""
    out = os.path.join(jaxinfer_home(), "bench", f"SmolLM2-135M-{name}")
    if is_converted_dir(out):
        return out
    params = jax.tree.map(np.asarray, base.params)
    if method == "awq":
        samples, seqlen = calib
        tokens = calibration_tokens(base.tokenizer, None, samples, seqlen)
        params = awq_scale(params, base.config, tokens, 4, group, search_scale=True, batch_size=4)
    params, config = quantize_params(params, base.config, 4, group, method)
    with atomic_output_dir(out, overwrite=True) as tmp:
        write_checkpoint(tmp, config, params, np.float32, base.path)
        base.tokenizer.save(tmp)
    return out


def linear_bytes(params) -> int:
    total = 0
    for name, layer in params.items():
        if name.startswith("layers_"):
            for path in LINEARS:
                module = layer
                for key in path.split("/"):
                    module = module[key]
                total += sum(a.nbytes for a in jax.tree.leaves(module))
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--max-windows", type=int, default=None, help="score at most this many windows (default all)")
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--write-results", action="store_true")
    args = ap.parse_args()
    load_before = load_average()
    t_start = time.perf_counter()

    base_dir = embedded_model_path()
    base = load_model(base_dir, np.float32, progress=False)
    tokens = base.tokenizer.encode(pydoc_text("heldout"), add_special_tokens=False)
    if args.max_windows:
        tokens = tokens[: args.max_windows * args.ctx]
    rtn_dir = quantized_checkpoint("rtn-int4-g128", base, "rtn", 128, (0, 0))
    awq_dir = quantized_checkpoint(f"awq-int4-g128-{args.calib_samples}x{args.calib_seqlen}", base, "awq", 128,
                                   (args.calib_samples, args.calib_seqlen))
    rows = [
        ("float32", base_dir, np.float32, {}, 0),
        ("bfloat16", base_dir, ml_dtypes.bfloat16, {}, 0),
        ("RTN int4 g128", rtn_dir, np.float32, {}, 0),
        (f"AWQ int4 g128 (calib {args.calib_samples}x{args.calib_seqlen}, search)", awq_dir, np.float32, {}, 0),
        ("GGUF Q4_1 direct (int4 g32)", embedded_model_gguf(), np.float32, {"keep_quantized": True}, 0),
        ("GGUF Q4_1 direct, bfloat16 scales and biases", embedded_model_gguf(), ml_dtypes.bfloat16,
         {"keep_quantized": True}, 0),
        ("KV int8 (float32 weights)", base_dir, np.float32, {}, 8),
        ("KV int4 (float32 weights)", base_dir, np.float32, {}, 4),
    ]
    results = []
    bf16_linear = None
    for name, path, dtype, options, policy in rows:
        m = load_model(path, dtype, progress=False, **options)
        t = time.perf_counter()
        ppl = perplexity(m.config, m.params, tokens, args.ctx, policy, dtype=dtype, progress=False)
        seconds = time.perf_counter() - t
        weights = sum(a.nbytes for a in jax.tree.leaves(m.params))
        linears = linear_bytes(m.params)
        if name == "bfloat16":
            bf16_linear = linears
        kv = KVCache.bytes_per_token(m.config, kv_cache_dtype(dtype), policy)
        results.append((name, ppl.value, weights, linears, kv, seconds))
        print(f"{name:55s} ppl {ppl.value:8.4f}  weights {weights / 1e6:7.1f} MB  linears {linears / 1e6:7.1f} MB  "
              f"KV {kv} B/token  ({seconds:.0f} s)", flush=True)

    # The 30% bound compares like with like: the AWQ model loaded in bfloat16 too, so that its scales
    # and biases are stored in bfloat16 as the bfloat16 row's weights are.
    awq_bf16_linear = linear_bytes(load_model(awq_dir, ml_dtypes.bfloat16, progress=False).params)
    by_name = {r[0]: r for r in results}
    f32 = by_name["float32"][1]
    rtn = by_name["RTN int4 g128"][1]
    awq = next(r for r in results if r[0].startswith("AWQ"))
    kv8 = by_name["KV int8 (float32 weights)"][1]
    checks = [
        (f"AWQ perplexity ({awq[1]:.4f}) lower than RTN's ({rtn:.4f})", awq[1] < rtn),
        (f"KV int8 perplexity within 1% of float32: {kv8:.4f} vs {f32:.4f} ({(kv8 / f32 - 1) * 100:+.2f}%)",
         abs(kv8 / f32 - 1) <= 0.01),
        (f"AWQ int4 g128 linear weights at most 30% of bfloat16's (scales and biases in bfloat16): "
         f"{awq_bf16_linear / 1e6:.1f} / {bf16_linear / 1e6:.1f} MB = {awq_bf16_linear / bf16_linear * 100:.1f}% "
         f"(with the float32 scales and biases of CPU: {awq[3] / bf16_linear * 100:.1f}%)",
         awq_bf16_linear <= 0.3 * bf16_linear),
    ]
    n_windows = len(tokens) // args.ctx
    table = [
        "| format | perplexity | vs float32 | weights MB | decoder linears MB | KV bytes/token |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, ppl, weights, linears, kv, _ in results:
        table.append(f"| {name} | {ppl:.4f} | {(ppl / f32 - 1) * 100:+.2f}% | {weights / 1e6:.1f} | "
                     f"{linears / 1e6:.1f} | {kv} |")
    notes = [*(f"- {'**MET**' if ok else '**NOT MET**'}: {text}" for text, ok in checks), (
        f"- Perplexity: held-out `pydoc_data.topics` (the topics after the first 80% in sorted order; calibration "
        f"draws from the first 80%), {n_windows} windows of {args.ctx} tokens, BOS first, second halves scored "
        f"(llama.cpp's method). Weights and scales/biases of quantized layers are counted in their stored dtype "
        f"(float32 scales and biases on CPU, except in the rows that say bfloat16); embeddings, norms and the tied "
        f"LM head are in the row's dtype."), (
        f"- AWQ: `--search-scale`, calibration {args.calib_samples} x {args.calib_seqlen} tokens of the calibration "
        f"part (LMDeploy's defaults are 128 x 2048; this CPU run uses fewer). GGUF Q4_1 direct: the file's own "
        f"codes, scales and minimums (`--keep-quantized`), bit-exact to the `gguf` package's dequantization."),
        f"- bfloat16: every weight rounded to bfloat16; activations are "
        f"{jax.numpy.dtype(activation_dtype(ml_dtypes.bfloat16)).name} on this backend "
        f"({jax.default_backend()}; `jaxinfer.config.activation_dtype`), the KV cache "
        f"{jax.numpy.dtype(kv_cache_dtype(ml_dtypes.bfloat16)).name} (`kv_cache_dtype`'s auto).",
        f"- Load: before `{load_before}`; after `{load_average()}`. Whole run {(time.perf_counter() - t_start) / 60:.1f} min.",
    ]
    publish("Quantization quality and memory, SmolLM2-135M-Instruct", table, notes, write=args.write_results)


if __name__ == "__main__":
    main()
