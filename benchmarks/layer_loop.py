"""Unrolled layers vs ``lax.scan`` over stacked weights: compile time and step time on XLA:CPU.

The measurement behind the model's layer loop (jaxinfer/model.py unrolls the layers in Python,
each with its own weights and page pool). A SmolLM2-shaped decoder (hidden 576, intermediate 1536,
9 heads / 3 KV heads, head_dim 64, tied 49152-token embedding, random float32 weights) runs its
attention through ``pallas_kernels.paged_attention.paged_attention_reference`` and its cache writes
through ``jaxinfer.kv_cache.write_kv``, the engine's own code, in three variants:

  unrolled    per-layer weights and per-layer page pools, a Python loop over the layers;
  scan-xs     weights stacked ``[L, ...]`` under ``lax.scan``; the stacked cache ``[L, pages, ...]``
              goes in as scan ``xs`` and comes back as ``ys``;
  scan-carry  weights stacked under ``lax.scan``; the stacked cache rides in the carry, each layer
              reading its slice with ``dynamic_index_in_dim`` and writing it back with
              ``dynamic_update_index_in_dim``.

Every variant is jitted with the cache donated; the embedding is an argument (closed-over arrays
become HLO constants). Shapes: decode at batch 1 and 16 with a 256-token context, and a 128-token
prefill, page size 64. Compile time is ``lower()`` + ``compile()`` (persistent compilation cache
off); step time is the median of ``--runs`` calls of the compiled step, the variants taking turns
call by call so that load changes on the shared machine hit all three alike.

    .venv/bin/python benchmarks/layer_loop.py                       # 8 and 30 layers, print a table
    .venv/bin/python benchmarks/layer_loop.py --write-results       # and append it to RESULTS.md
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from report import load_average, publish

from jaxinfer.kv_cache import TRASH_PAGE, AttentionMetadata, write_kv
from jaxinfer.sampler import greedy
from pallas_kernels.paged_attention import paged_attention_reference
from pallas_kernels.paged_kv import PagedKV

# SmolLM2-135M shapes.
HIDDEN = 576
INTERMEDIATE = 1536
HEADS = 9
KV_HEADS = 3
HEAD_DIM = 64
VOCAB = 49152
EPS = 1e-5
ROPE_THETA = 1e5
INV_FREQ = 1.0 / (ROPE_THETA ** (np.arange(0, HEAD_DIM, 2, dtype=np.float64) / HEAD_DIM))

VARIANTS = ("unrolled", "scan-xs", "scan-carry")


# -- the decoder ----------------------------------------------------------------------------------

def layer_shapes() -> dict[str, tuple[int, ...]]:
    return {
        "input_norm": (HIDDEN,),
        "q": (HIDDEN, HEADS * HEAD_DIM),
        "k": (HIDDEN, KV_HEADS * HEAD_DIM),
        "v": (HIDDEN, KV_HEADS * HEAD_DIM),
        "o": (HEADS * HEAD_DIM, HIDDEN),
        "post_norm": (HIDDEN,),
        "gate": (HIDDEN, INTERMEDIATE),
        "up": (HIDDEN, INTERMEDIATE),
        "down": (INTERMEDIATE, HIDDEN),
    }


def random_layer(key) -> dict[str, jax.Array]:
    out = {}
    for (name, shape), k in zip(layer_shapes().items(), jax.random.split(key, len(layer_shapes()))):
        if name.endswith("norm"):
            out[name] = 1.0 + 0.1 * jax.random.normal(k, shape, jnp.float32)
        else:
            out[name] = jax.random.normal(k, shape, jnp.float32) * shape[0] ** -0.5
    return out


def rms_norm(x, scale):
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + EPS) * scale


def rope(x, positions):
    angles = positions[..., None].astype(jnp.float32) * jnp.asarray(INV_FREQ, jnp.float32)
    cos, sin = jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def linear(x, w):
    return jnp.einsum("...i,io->...o", x, w)


def decoder_layer(w, x, k_pages, v_pages, meta: AttentionMetadata):
    """As jaxinfer.model.DecoderLayer: x ``[batch, seq, hidden]``; pages ``[pages, kv, page_size, d]``."""
    batch, seq, _ = x.shape
    h = rms_norm(x, w["input_norm"])
    q = rope(linear(h, w["q"]).reshape(batch, seq, HEADS, HEAD_DIM), meta.positions)
    k = rope(linear(h, w["k"]).reshape(batch, seq, KV_HEADS, HEAD_DIM), meta.positions)
    v = linear(h, w["v"]).reshape(batch, seq, KV_HEADS, HEAD_DIM)
    kv = write_kv(PagedKV(k_pages, v_pages), meta.slot_mapping, k, v)
    o = paged_attention_reference(q, kv, meta.block_tables, meta.seq_lens, meta.positions, scale=HEAD_DIM**-0.5)
    x = x + linear(o.reshape(batch, seq, HEADS * HEAD_DIM), w["o"])
    h = rms_norm(x, w["post_norm"])
    x = x + linear(jax.nn.silu(linear(h, w["gate"])) * linear(h, w["up"]), w["down"])
    return x, kv.k, kv.v


def head(embed, final_norm, x, last):
    """Final norm, the last token of each row, tied-embedding logits, greedy token ``[batch]``."""
    x = jnp.take_along_axis(rms_norm(x, final_norm), last[:, None, None], axis=1)[:, 0]
    logits = jax.lax.dot_general(x, embed, (((1,), (1,)), ((), ())))
    return greedy(logits)


def step_unrolled(embed, final_norm, layers, cache, tokens, meta, last):
    """layers: a list of per-layer dicts; cache: (tuple of k pools, tuple of v pools)."""
    x = jnp.take(embed, tokens, axis=0)
    ks, vs = [], []
    for w, k_pages, v_pages in zip(layers, *cache):
        x, k_pages, v_pages = decoder_layer(w, x, k_pages, v_pages, meta)
        ks.append(k_pages)
        vs.append(v_pages)
    return head(embed, final_norm, x, last), (tuple(ks), tuple(vs))


def step_scan_xs(embed, final_norm, stacked, cache, tokens, meta, last):
    """stacked: dict of ``[L, ...]``; cache: (k ``[L, pages, ...]``, v ``[L, pages, ...]``) as xs/ys."""

    def body(x, xs):
        w, k_pages, v_pages = xs
        x, k_pages, v_pages = decoder_layer(w, x, k_pages, v_pages, meta)
        return x, (k_pages, v_pages)

    x = jnp.take(embed, tokens, axis=0)
    x, (k_all, v_all) = jax.lax.scan(body, x, (stacked, *cache))
    return head(embed, final_norm, x, last), (k_all, v_all)


def step_scan_carry(embed, final_norm, stacked, cache, tokens, meta, last):
    """As scan-xs, but the stacked cache is in the carry, sliced and updated in place per layer."""

    def body(carry, w):
        x, k_all, v_all, i = carry
        k_pages = jax.lax.dynamic_index_in_dim(k_all, i, 0, keepdims=False)
        v_pages = jax.lax.dynamic_index_in_dim(v_all, i, 0, keepdims=False)
        x, k_pages, v_pages = decoder_layer(w, x, k_pages, v_pages, meta)
        k_all = jax.lax.dynamic_update_index_in_dim(k_all, k_pages, i, 0)
        v_all = jax.lax.dynamic_update_index_in_dim(v_all, v_pages, i, 0)
        return (x, k_all, v_all, i + 1), None

    x = jnp.take(embed, tokens, axis=0)
    (x, k_all, v_all, _), _ = jax.lax.scan(body, (x, *cache, jnp.int32(0)), stacked)
    return head(embed, final_norm, x, last), (k_all, v_all)


STEPS = {"unrolled": step_unrolled, "scan-xs": step_scan_xs, "scan-carry": step_scan_carry}


# -- inputs ---------------------------------------------------------------------------------------

def step_inputs(batch: int, q_len: int, context: int, page_size: int, pages_per_seq: int):
    """tokens, metadata and last-token indices of ``batch`` rows whose context ends at ``context``.

    Row b owns pages ``1 + b * pages_per_seq ...`` (page 0 is the trash page)."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, VOCAB, (batch, q_len), dtype=np.int32)
    start = context - q_len
    positions = np.tile(np.arange(start, context, dtype=np.int32), (batch, 1))
    tables = (1 + np.arange(batch)[:, None] * pages_per_seq + np.arange(pages_per_seq)[None, :]).astype(np.int32)
    slots = np.take_along_axis(tables, positions // page_size, axis=1) * page_size + positions % page_size
    meta = AttentionMetadata(
        positions=jnp.asarray(positions),
        slot_mapping=jnp.asarray(slots.astype(np.int32)),
        block_tables=jnp.asarray(tables),
        seq_lens=jnp.full((batch,), context, jnp.int32),
    )
    assert TRASH_PAGE == 0
    return jnp.asarray(tokens), meta, jnp.full((batch,), q_len - 1, jnp.int32)


def new_cache(variant: str, num_layers: int, num_pages: int, page_size: int):
    shape = (num_pages, KV_HEADS, page_size, HEAD_DIM)
    if variant == "unrolled":
        return tuple(tuple(jnp.zeros(shape, jnp.float32) for _ in range(num_layers)) for _ in range(2))
    return tuple(jnp.zeros((num_layers, *shape), jnp.float32) for _ in range(2))


def cache_fingerprint(variant: str, cache) -> np.ndarray:
    """Per-layer sums of the K and V pools ``[2, L]`` (float64), to check the variants agree."""
    if variant == "unrolled":
        return np.array([[float(jnp.sum(p)) for p in pools] for pools in cache])
    return np.array([np.asarray(jnp.sum(p, axis=(1, 2, 3, 4)), np.float64) for p in cache])


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


# -- main -----------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int_list, default=[8, 30], help="depths to run, comma-separated (default 8,30)")
    ap.add_argument("--batches", type=int_list, default=[1, 16], help="decode batch sizes (default 1,16)")
    ap.add_argument("--context", type=int, default=256, help="decode context length in tokens (default 256)")
    ap.add_argument("--prefill-tokens", type=int, default=128, help="prefill chunk length, 0 to skip (default 128)")
    ap.add_argument("--page-size", type=int, default=64)
    ap.add_argument("--runs", type=int, default=10, help="timed calls of each step (default 10)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"subset of {','.join(VARIANTS)}")
    ap.add_argument("--write-results", action="store_true", help="append a dated section to benchmarks/RESULTS.md")
    args = ap.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    if not set(variants) <= set(VARIANTS):
        ap.error(f"unknown variant in {args.variants!r}")
    jax.config.update("jax_enable_compilation_cache", False)  # compile times must be real compiles

    page_size = args.page_size
    pages_per_seq = -(-max(args.context, args.prefill_tokens) // page_size)
    num_pages = 1 + max(args.batches) * pages_per_seq  # + the trash page
    shapes = [(f"decode b={b}", b, 1, args.context) for b in args.batches]
    if args.prefill_tokens:
        shapes.append((f"prefill {args.prefill_tokens}", 1, args.prefill_tokens, args.prefill_tokens))

    load_before = load_average()
    key = jax.random.key(0)
    k_embed, k_norm, k_layers = jax.random.split(key, 3)
    embed = jax.random.normal(k_embed, (VOCAB, HIDDEN), jnp.float32) * 0.02
    final_norm = jnp.ones((HIDDEN,), jnp.float32)
    max_layers = max(args.layers)
    all_layers = [random_layer(k) for k in jax.random.split(k_layers, max_layers)]
    print(
        f"{max_layers} random layers of {sum(a.nbytes for a in jax.tree.leaves(all_layers[0])) / 1e6:.1f} MB "
        f"+ embedding {embed.nbytes / 1e6:.1f} MB; cache {num_pages} pages x {page_size} tokens per layer",
        flush=True,
    )

    results = []  # (layers, shape name, variant, lower s, compile s, median ms, min ms)
    agreement = []
    for num_layers in args.layers:
        layers = all_layers[:num_layers]
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *layers) if set(variants) - {"unrolled"} else None
        weights = {v: (layers if v == "unrolled" else stacked) for v in variants}
        for shape_name, batch, q_len, context in shapes:
            tokens, meta, last = step_inputs(batch, q_len, context, page_size, pages_per_seq)
            compiled, caches, timing = {}, {}, {}
            for v in variants:
                caches[v] = new_cache(v, num_layers, num_pages, page_size)
                fn = jax.jit(STEPS[v], donate_argnums=(3,))
                t = time.perf_counter()
                lowered = fn.lower(embed, final_norm, weights[v], caches[v], tokens, meta, last)
                t_lower = time.perf_counter() - t
                t = time.perf_counter()
                compiled[v] = lowered.compile()
                t_compile = time.perf_counter() - t
                timing[v] = [t_lower, t_compile, []]
                print(f"  L={num_layers} {shape_name} {v}: lower {t_lower:.2f} s, compile {t_compile:.2f} s", flush=True)

            # First call of each (untimed): check the variants compute the same thing.
            firsts = {}
            for v in variants:
                out, caches[v] = compiled[v](embed, final_norm, weights[v], caches[v], tokens, meta, last)
                firsts[v] = (np.asarray(out), cache_fingerprint(v, caches[v]))
            ref_tokens, ref_fp = firsts[variants[0]]
            ok = all(
                np.array_equal(t_, ref_tokens) and np.allclose(fp, ref_fp, rtol=1e-3, atol=1e-2)
                for t_, fp in firsts.values()
            )
            agreement.append(ok)
            if not ok:
                print(f"  WARNING: variants disagree at L={num_layers} {shape_name}", flush=True)

            for _ in range(1):  # one more untimed round
                for v in variants:
                    out, caches[v] = compiled[v](embed, final_norm, weights[v], caches[v], tokens, meta, last)
                    out.block_until_ready()
            for _ in range(args.runs):
                for v in variants:
                    t = time.perf_counter()
                    out, caches[v] = compiled[v](embed, final_norm, weights[v], caches[v], tokens, meta, last)
                    out.block_until_ready()
                    timing[v][2].append(time.perf_counter() - t)
            for v in variants:
                t_lower, t_compile, times = timing[v]
                results.append(
                    (num_layers, shape_name, v, t_lower, t_compile, statistics.median(times) * 1e3, min(times) * 1e3)
                )
                print(
                    f"  L={num_layers} {shape_name} {v}: median {statistics.median(times) * 1e3:.1f} ms "
                    f"(min {min(times) * 1e3:.1f})",
                    flush=True,
                )
            del compiled, caches
        del stacked, weights
    load_after = load_average()

    base = {(r[0], r[1]): r[5] for r in results if r[2] == variants[0]}
    table = [
        f"| layers | step | variant | lower s | compile s | median ms | min ms | vs {variants[0]} |",
        "|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    for n, shape_name, v, t_lower, t_compile, med, mn in results:
        table.append(
            f"| {n} | {shape_name} | {v} | {t_lower:.2f} | {t_compile:.2f} | {med:.1f} | {mn:.1f} | "
            f"{med / base[(n, shape_name)]:.2f}x |"
        )
    notes = []
    if len(args.layers) > 1:
        lo, hi = min(args.layers), max(args.layers)
        for v in variants:
            c_lo = sum(r[3] + r[4] for r in results if r[0] == lo and r[2] == v)
            c_hi = sum(r[3] + r[4] for r in results if r[0] == hi and r[2] == v)
            notes.append(
                f"- {v}: lower + compile over the {len(shapes)} steps {c_lo:.1f} s at {lo} layers, "
                f"{c_hi:.1f} s at {hi} layers ({c_hi / c_lo:.1f}x for {hi / lo:.2f}x the layers)."
            )
    notes += [
        f"- Decode: context {args.context} tokens (the step writes position {args.context - 1}); prefill: "
        f"{args.prefill_tokens} tokens from position 0; page size {page_size}; {num_pages} pages per layer "
        f"pool (batch {max(args.batches)} x {pages_per_seq} + trash); random fp32 weights, zero cache.",
        f"- Step time: median (and min) of {args.runs} calls of the compiled step per variant, variants "
        "called in turn; 'vs' = median / the first variant's median.",
        f"- The variants' first outputs (greedy tokens, per-layer K/V pool sums) agree: "
        f"{'yes' if all(agreement) else 'NO'} ({sum(agreement)}/{len(agreement)} configurations).",
        f"- Load: before `{load_before}`; after `{load_after}`.",
    ]
    publish("Layer loop: unrolled vs lax.scan, SmolLM2-shaped decoder fp32", table, notes, write=args.write_results)


if __name__ == "__main__":
    main()
