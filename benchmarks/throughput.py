"""Static-batch throughput of SmolLM2-135M in float32: jaxinfer vs transformers vs llama.cpp.

LMDeploy's ``profile_generation`` shape: for each batch size B (``--batches``), B requests of
``--input-len`` prompt tokens each are submitted at once and every request generates exactly
``--output-len`` tokens (EOS does not stop it). Prompts are different windows of real English
text (``pydoc_data.topics``, tokenized with the model's tokenizer); batch B uses the first B
windows, the same for every engine. All engines run in this one process on the same weights: the
embedded Q4_1 GGUF, dequantized to float32 (jaxinfer through its converter, transformers through
``from_pretrained(gguf_file=...)``, llama.cpp from an F32 GGUF written from it with the ``gguf``
package's writer, ``peers.write_dense_gguf``), and llama.cpp on the Q4_1 file itself too.

Engines:
  - jaxinfer: one ``LLMEngine`` (``max_batch_size`` = the largest batch, ``session_len`` = input +
    output), shape buckets compiled and every batch size run once untimed before timing; driven
    by ``engine.step()`` (continuous batching: prompts are admitted up to ``max_prefill_tokens``
    per step while earlier requests decode).
  - transformers: one greedy ``generate`` over the batch (left padding; the prompts are of equal
    length), ``min_new_tokens = max_new_tokens = output len``, ``--torch-threads`` threads.
  - llama.cpp (``llama-cpp-python``, ``make bench`` installs it): batch 1 only, ``Llama.generate``
    greedy on the prompt's token ids, ``n_threads=2``, ``n_batch=512``; Q4_1 and F32 files. A
    subprocess first checks that llama.cpp's default buffer types survive a prompt (on an AMX CPU
    its AMX matmul crashes on prompts; ``peers.default_buffers_work``); if not, that file runs
    without them, plus once with them and ``n_batch=1`` (prompt fed token by token).
  - with ``--bf16``, two more: ``jaxinfer bf16``, the same engine on the weights rounded to bfloat16
    (on CPU activations and the KV cache stay float32; matmuls take bfloat16 inputs and
    accumulate in float32), and ``transformers bf16`` (torch in bfloat16 throughout).

Figures per (engine, batch), each the median over ``--repeats`` repeats:
  - first-token latency: time from submission to a request's first token; median (and max) over
    the requests of the batch.
  - decode tok/s per request: (output len - 1) / (its last token - its first token), median over
    requests.
  - decode tok/s aggregate: tokens generated after every request of the batch had its first
    token / time from then to the last token (all B sequences decoding together).
  - output tok/s total: B x output len / (last token - submission).

Goals (issue "Engine", item 8): at batch 32 at least 3x transformers' output tok/s; at batch 1
in float32 at least llama.cpp's F32 decode tok/s, judged by the median over repeats of the ratio
of the two runs, which run back to back in each repeat. ``--startup`` adds the start-up times: a
subprocess from process start to the first token of a chat reply, with the shape-bucket warm-up
included, cold (empty XLA compilation cache: a fresh temporary ``$JAXINFER_HOME``) then warm (the
same home again); converting the embedded model into that home is timed separately, before.

    .venv/bin/python benchmarks/throughput.py --batches 1,2 --input-len 32 --output-len 16 --repeats 1
    .venv/bin/python benchmarks/throughput.py --startup --write-results   # full run, plot, RESULTS.md
    .venv/bin/python benchmarks/throughput.py --bf16 --skip-llamacpp --write-results   # bfloat16 weights too
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

# No progress bars (transformers' GGUF loading draws one); tqdm reads this when it is imported.
os.environ.setdefault("TQDM_DISABLE", "1")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from report import (REPO, READ_BANDWIDTH_GBS, ReadBandwidthProbe, common_prefix, cpu_times, load_average,  # noqa: E402
                    plot_reference, publish, stolen_since)

import peers  # noqa: E402

DEFAULT_PLOT = os.path.join(HERE, "throughput.png")
STARTUP_MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


# -- prompts ------------------------------------------------------------------------------------

def english_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def prompt_windows(tokenizer, n: int, length: int) -> list[list[int]]:
    """``n`` different, non-overlapping ``length``-token windows of English text."""
    ids = tokenizer.encode(english_text(), add_special_tokens=False)
    if len(ids) < n * length:
        raise SystemExit(f"the English text has {len(ids)} tokens; {n} prompts of {length} need {n * length}")
    return [ids[i * length : (i + 1) * length] for i in range(n)]


# -- figures, the same for every engine -----------------------------------------------------------

def figures(run: peers.Run, output_len: int) -> dict[str, float]:
    stamps = run.stamps
    for s in stamps:
        assert s and s[-1][1] == output_len, f"a request generated {s[-1][1] if s else 0} of {output_len} tokens"
    firsts = [s[0][0] for s in stamps]
    lasts = [s[-1][0] for s in stamps]
    t_all_first, t_end = max(firsts), max(lasts)

    def count_at(s, t):
        n = 0
        for when, k in s:
            if when <= t:
                n = k
        return n

    after = sum(output_len - count_at(s, t_all_first) for s in stamps)
    per_request = [(output_len - 1) / (b - a) for a, b in zip(firsts, lasts) if b > a]
    return {
        "ttft_ms": statistics.median(f - run.submitted for f in firsts) * 1e3,
        "ttft_max_ms": max(f - run.submitted for f in firsts) * 1e3,
        "decode_req": statistics.median(per_request) if per_request else float("nan"),
        "decode_agg": after / (t_end - t_all_first) if t_end > t_all_first else float("nan"),
        "total": len(stamps) * output_len / (t_end - run.submitted),
        "wall_s": t_end - run.submitted,
    }


# -- jaxinfer ---------------------------------------------------------------------------------------

def engine_options(args) -> dict:
    return {"max_batch_size": max(args.batch_list), "session_len": args.input_len + args.output_len}


class JaxSide:
    def __init__(self, args, dtype: str = "float32"):
        import jax
        import jax.numpy as jnp

        from converters.convert import embedded_model_path
        from converters.loader import load_model
        from jaxinfer.llm import LLM

        t = time.perf_counter()
        self.dtype = dtype
        self.loaded = load_model(embedded_model_path(progress=False), jnp.dtype(dtype), progress=False)
        self.load_s = time.perf_counter() - t
        self.options = engine_options(args)
        t = time.perf_counter()
        self.engine = LLM(self.loaded, warmup=True, progress=False, **self.options).engine
        self.warmup_s = time.perf_counter() - t
        self.tokenizer = self.loaded.tokenizer
        self.jax_version = jax.__version__
        self._ids = 0

    def run(self, prompts: list[list[int]], output_len: int) -> peers.Run:
        from jaxinfer.sampling_params import SamplingParams

        engine = self.engine
        params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
        self._ids += 1
        rids = [f"bench-{self._ids}-{i}" for i in range(len(prompts))]
        stamps: dict[str, list[tuple[float, int]]] = {r: [] for r in rids}
        tokens: dict[str, list[int]] = {}
        submitted = time.perf_counter()
        for rid, p in zip(rids, prompts):
            engine.add_request(rid, p, params)
        while engine.has_unfinished_requests():
            outs = engine.step()
            t = time.perf_counter()
            for o in outs:
                stamps[o.request_id].append((t, len(o.outputs[0].token_ids)))
                if o.finished:
                    tokens[o.request_id] = list(o.outputs[0].token_ids)
        return peers.Run(submitted, [stamps[r] for r in rids], [tokens[r] for r in rids])


# -- start-up: subprocesses -----------------------------------------------------------------------

def startup_child(args) -> None:
    """``--startup-child convert|start``: print one JSON line of wall-clock (time.time()) stamps."""
    stamps = {}
    if args.startup_child == "convert":
        from converters.convert import embedded_model_path

        stamps["imported"] = time.time()
        embedded_model_path(progress=False)
        stamps["done"] = time.time()
        print("STARTUP " + json.dumps(stamps), flush=True)
        return
    from converters.convert import embedded_model_path
    from converters.loader import load_model
    from jaxinfer.compilation import compilation_count
    from jaxinfer.llm import LLM
    from jaxinfer.sampling_params import SamplingParams

    stamps["imported"] = time.time()
    loaded = load_model(embedded_model_path(progress=False), np.float32, progress=False)
    stamps["loaded"] = time.time()
    llm = LLM(loaded, warmup=True, progress=False, **engine_options(args))
    stamps["warmed"] = time.time()
    (out,) = llm.chat(STARTUP_MESSAGES, SamplingParams(temperature=0, max_tokens=1))
    stamps["first_token"] = time.time()
    stamps["token"] = out.outputs[0].text
    stamps["lowerings"] = compilation_count()
    stamps["shapes"] = len(llm.engine.buckets.all_shapes())
    print("STARTUP " + json.dumps(stamps), flush=True)


def _dir_mb(path: str) -> float:
    total = 0
    for root, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total / 1e6


def measure_startup(args) -> dict:
    """Conversion, cold start and warm start, each in a fresh process with a temporary home."""
    home = tempfile.mkdtemp(prefix="jaxinfer-startup-")
    env = dict(os.environ, JAXINFER_HOME=home)
    base = [
        sys.executable, os.path.abspath(__file__), "--batches", args.batches,
        "--input-len", str(args.input_len), "--output-len", str(args.output_len),
    ]
    result: dict = {"home": home}
    try:
        for phase, child in (("convert", "convert"), ("cold", "start"), ("warm", "start")):
            if phase == "cold":
                cache = os.path.join(home, "xla_cache")
                result["cache_before_cold_mb"] = _dir_mb(cache) if os.path.exists(cache) else 0.0
            t0 = time.time()
            proc = subprocess.run(base + ["--startup-child", child], env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"start-up child {phase} failed:\n{proc.stderr[-3000:]}")
            line = [x for x in proc.stdout.splitlines() if x.startswith("STARTUP ")][-1]
            s = json.loads(line[len("STARTUP "):])
            end = s.get("first_token", s.get("done"))
            entry = {"total_s": end - t0, "imports_s": s["imported"] - t0}
            if child == "start":
                entry.update(
                    load_s=s["loaded"] - s["imported"], warmup_s=s["warmed"] - s["loaded"],
                    first_token_s=s["first_token"] - s["warmed"], lowerings=s["lowerings"], shapes=s["shapes"],
                    token=s["token"],
                )
            result[phase] = entry
            for kind, sub in (("cache", "xla_cache"), ("steps", "exported_steps")):
                path = os.path.join(home, sub)
                result[f"{kind}_after_{phase}_mb"] = _dir_mb(path) if os.path.exists(path) else 0.0
            print(f"start-up {phase}: {entry}", flush=True)
    finally:
        shutil.rmtree(home, ignore_errors=True)
    return result


def workload_gflop(config, batch: int, n_in: int, n_out: int) -> float:
    """The model arithmetic of one static batch, counted as multiply-adds x 2 of the work any
    engine must do: every linear layer for the n_in + n_out - 1 tokens each request feeds, the LM
    head for its n_out outputs, and causal attention (QK^T and PV over the positions before each)."""
    c = config
    q_out, kv_out = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    per_token = c.num_layers * c.hidden_size * (q_out + 2 * kv_out + q_out + 3 * c.intermediate_size)
    fed = n_in + n_out - 1
    attention = c.num_layers * 2 * q_out * sum(range(1, fed + 1))  # a token at position p sees p + 1 keys
    return batch * 2 * (per_token * fed + c.vocab_size * c.hidden_size * n_out + attention) / 1e9


# -- main ---------------------------------------------------------------------------------------------

def median_figures(runs: list[dict]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def fmt(x: float, spec: str) -> str:
    return "-" if x != x else format(x, spec)


def plot(path: str, rows: list[dict], batches: list[int], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    styles = {"jaxinfer": ("tab:blue", "o", "-"), "transformers": ("tab:orange", "s", "-"),
              "llama.cpp Q4_1": ("tab:green", "^", ""), "llama.cpp Q4_1 AMX n_batch 1": ("tab:olive", "D", ""),
              "llama.cpp F32": ("tab:red", "v", ""), "jaxinfer bf16": ("tab:blue", "o", "--"),
              "transformers bf16": ("tab:orange", "s", "--")}
    for ax, key, label in ((axes[0], "total", "output tokens/s (total)"),
                           (axes[1], "decode_agg", "decode tokens/s (aggregate)")):
        for name, (color, marker, line) in styles.items():
            pts = sorted((r["batch"], r[key]) for r in rows if r["engine"] == name)
            if not pts:
                continue
            xs, ys = zip(*pts)
            ax.plot(xs, ys, color=color, marker=marker, linestyle=line or "none", label=name, markersize=7)
            for x, y in pts:
                ax.annotate(f"{y:.0f}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8, color=color)
        ax.set_xscale("log", base=2)
        ax.set_xticks(batches)
        ax.set_xticklabels([str(b) for b in batches])
        ax.set_xlabel("batch size")
        ax.set_ylabel(label)
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {os.path.relpath(path, REPO)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", default="1,8,32", help="comma-separated batch sizes (default 1,8,32)")
    ap.add_argument("--input-len", type=int, default=128, help="prompt tokens per request (default 128)")
    ap.add_argument("--output-len", type=int, default=128, help="generated tokens per request (default 128)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of every measurement (default 3)")
    ap.add_argument("--skip-llamacpp", action="store_true", help="do not run llama.cpp")
    ap.add_argument("--skip-transformers", action="store_true", help="do not run transformers")
    ap.add_argument("--startup", action="store_true", help="also measure cold and warm start-up (subprocesses)")
    ap.add_argument("--bf16", action="store_true", help="also run jaxinfer with bfloat16 weights (float32 "
                    "activations, the CPU's bfloat16 mode) and transformers in bfloat16")
    ap.add_argument("--torch-threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument("--llama-threads", type=int, default=2, help="llama.cpp n_threads (default 2)")
    ap.add_argument("--plot", default=None, help=f"write the plot here (default with --write-results: "
                    f"{os.path.relpath(DEFAULT_PLOT, REPO)})")
    ap.add_argument("--write-results", action="store_true", help="append a dated section to benchmarks/RESULTS.md")
    ap.add_argument("--startup-child", choices=("convert", "start"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    try:
        args.batch_list = sorted({int(b) for b in args.batches.split(",") if b.strip()})
    except ValueError:
        ap.error("--batches takes comma-separated integers, e.g. 1,8,32")
    if not args.batch_list or min(args.batch_list) < 1 or args.input_len < 1 or args.output_len < 2 or args.repeats < 1:
        ap.error("need batches >= 1, --input-len >= 1, --output-len >= 2, --repeats >= 1")
    if args.startup_child:
        startup_child(args)
        return
    if args.plot is None and args.write_results:
        args.plot = DEFAULT_PLOT

    b_max, n_in, n_out = max(args.batch_list), args.input_len, args.output_len
    load_before, times_before = load_average(), cpu_times()
    t_start = time.perf_counter()

    startup = measure_startup(args) if args.startup else None

    jx = JaxSide(args)
    print(
        f"jaxinfer: loaded in {jx.load_s:.1f} s; engine {jx.options}, buckets {jx.engine.buckets.all_shapes()} "
        f"warmed up in {jx.warmup_s:.1f} s; {jx.engine.cache_plan.explanation}",
        flush=True,
    )
    jx_bf16 = None
    if args.bf16:
        jx_bf16 = JaxSide(args, "bfloat16")
        print(f"jaxinfer bf16: loaded in {jx_bf16.load_s:.1f} s, warmed up in {jx_bf16.warmup_s:.1f} s; "
              f"{jx_bf16.engine.cache_plan.explanation}", flush=True)
    prompts = prompt_windows(jx.tokenizer, b_max, n_in)

    from converters.convert import embedded_model_gguf

    q4_path = embedded_model_gguf()
    transformers_peers: dict[str, peers.TransformersPeer] = {}
    if not args.skip_transformers:
        for name, dtype in (("transformers", "float32"), ("transformers bf16", "bfloat16")):
            if dtype == "float32" or args.bf16:
                th = transformers_peers[name] = peers.TransformersPeer(q4_path, args.torch_threads, dtype)
                print(f"{name} {th.version}: loaded the GGUF in {th.load_s:.1f} s ({th.threads} threads, "
                      f"attention {th.attention}, {dtype})", flush=True)
    th = transformers_peers.get("transformers")
    jaxinfers = {"jaxinfer": jx, **({"jaxinfer bf16": jx_bf16} if jx_bf16 else {})}
    llamas: dict[str, peers.LlamaCppPeer] = {}
    f32_note = ""
    llama_notes: list[str] = []
    if not args.skip_llamacpp:
        t = time.perf_counter()
        f32_path = peers.write_dense_gguf(q4_path)
        f32_note = peers.check_f32_gguf(q4_path, f32_path)
        print(f"F32 GGUF {f32_path} ready in {time.perf_counter() - t:.1f} s: {f32_note}", flush=True)
        n_ctx = n_in + n_out + 16
        for label, path in (("Q4_1", q4_path), ("F32", f32_path)):
            ok = peers.default_buffers_work(path)
            llamas[f"llama.cpp {label}"] = peers.LlamaCppPeer(path, n_ctx, args.llama_threads, extra_bufts=ok)
            if ok:
                llama_notes.append(f"{label}: default buffer types")
            else:
                llama_notes.append(
                    f"{label}: with its default buffer types (AMX on this CPU) llama.cpp dies on any prompt of 2+ "
                    f"tokens (general protection fault at `ldtilecfg` in `ggml_backend_amx_mul_mat`), so the row "
                    f"`llama.cpp {label}` runs with `use_extra_bufts=False` (no AMX, no repacking) and the row "
                    f"`llama.cpp {label} AMX n_batch 1` keeps AMX and feeds the prompt one token per decode "
                    f"(`n_batch=1`; its first-token latency is {n_in} single-token steps, its decode is AMX's)"
                )
                llamas[f"llama.cpp {label} AMX n_batch 1"] = peers.LlamaCppPeer(
                    path, n_ctx, args.llama_threads, n_batch=1, extra_bufts=True
                )
        for name, peer in llamas.items():
            print(f"{name}: llama-cpp-python {peer.version}, n_batch {peer.n_batch}, extra buffer types "
                  f"{peer.extra_bufts}, loaded in {peer.load_s:.1f} s", flush=True)

    # Untimed warm-up of exactly the timed paths.
    for b in args.batch_list:
        for side in jaxinfers.values():
            side.run(prompts[:b], min(n_out, 4))
    for peer in transformers_peers.values():
        peer.run(prompts[:1], 4)
        peer.run(prompts[:b_max], 2)
    for peer in llamas.values():
        peer.run(prompts[0], 4)
    gc.collect()

    # Repeats: every engine at every batch size in turn, so a change of load hits them all.
    runs: dict[tuple[str, int], list[dict]] = {}
    last_tokens: dict[tuple[str, int], list[list[int]]] = {}

    def record(name, b, run):
        f = figures(run, n_out)
        runs.setdefault((name, b), []).append(f)
        last_tokens[(name, b)] = run.tokens
        print(f"  {name:15s} batch {b:3d}: TTFT {f['ttft_ms']:8.1f} ms (max {f['ttft_max_ms']:8.1f}), decode "
              f"{f['decode_req']:6.1f} tok/s/request, {f['decode_agg']:7.1f} aggregate, total {f['total']:7.1f} tok/s",
              flush=True)
        time.sleep(0.3)  # let the other runtimes' worker threads go idle

    # Goal 2's pairs: the machine's read bandwidth just before jaxinfer's batch 1 and just after
    # llama.cpp F32's, per repeat (both None without the probe).
    probe = ReadBandwidthProbe(tempfile.mkdtemp()) if "llama.cpp F32" in llamas and 1 in args.batch_list else None
    probes: list[tuple[float | None, float | None]] = []

    def run_llamas(before=None):
        after = None
        for name, peer in sorted(llamas.items(), key=lambda item: "F32" not in item[0]):
            record(name, 1, peer.run(prompts[0], n_out))
            if name == "llama.cpp F32" and probe:
                after = probe.measure()
        probes.append((before, after))

    # llama.cpp F32 runs right after jaxinfer's batch 1, so goal 2's ratio compares runs seconds apart.
    for r in range(args.repeats):
        print(f"repeat {r + 1}/{args.repeats}", flush=True)
        for b in args.batch_list:
            before = probe.measure() if b == 1 and probe else None
            for name, side in jaxinfers.items():
                record(name, b, side.run(prompts[:b], n_out))
            if b == 1:
                run_llamas(before)
            for name, peer in transformers_peers.items():
                record(name, b, peer.run(prompts[:b], n_out))
        if 1 not in args.batch_list:
            run_llamas()
    load_after, stolen = load_average(), stolen_since(times_before)
    elapsed = time.perf_counter() - t_start
    for peer in llamas.values():
        peer.close()

    # -- table ------------------------------------------------------------------------------------
    order = [*jaxinfers, *transformers_peers, *llamas]
    weights = {"jaxinfer": "fp32", "transformers": "fp32", "jaxinfer bf16": "bf16 (fp32 activations)",
               "transformers bf16": "bf16", **{n: n.split()[1] for n in llamas}}
    rows = []
    for b in args.batch_list:
        for name in order:
            if (name, b) in runs:
                rows.append({"engine": name, "batch": b, **median_figures(runs[(name, b)])})
    by = {(r["engine"], r["batch"]): r for r in rows}
    table = [
        "| engine | weights | batch | first-token latency ms (median / max) | decode tok/s per request "
        "| decode tok/s aggregate | output tok/s total | jaxinfer / this (total) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        jr = by.get(("jaxinfer", r["batch"]))
        vs = "-" if r["engine"] == "jaxinfer" or jr is None else f"{jr['total'] / r['total']:.2f}x"
        table.append(
            f"| {r['engine']} | {weights[r['engine']]} | {r['batch']} | {fmt(r['ttft_ms'], '.0f')} / "
            f"{fmt(r['ttft_max_ms'], '.0f')} | {fmt(r['decode_req'], '.1f')} | {fmt(r['decode_agg'], '.1f')} | "
            f"{fmt(r['total'], '.1f')} | {vs} |"
        )

    # -- ratios and goals -------------------------------------------------------------------------
    notes = []
    ratio_parts = []
    for b in args.batch_list:
        jr, tr = by.get(("jaxinfer", b)), by.get(("transformers", b))
        if jr and tr:
            ratio_parts.append(
                f"batch {b}: total {jr['total'] / tr['total']:.2f}x, decode aggregate "
                f"{jr['decode_agg'] / tr['decode_agg']:.2f}x, first-token latency {jr['ttft_ms'] / tr['ttft_ms']:.2f}x"
            )
    if ratio_parts:
        notes.append("- jaxinfer / transformers: " + "; ".join(ratio_parts) + ".")
    for other in ("jaxinfer", "transformers", "transformers bf16"):
        parts = []
        for b in args.batch_list:
            jb, o = by.get(("jaxinfer bf16", b)), by.get((other, b))
            if jb and o:
                parts.append(f"batch {b}: total {jb['total'] / o['total']:.2f}x, decode aggregate "
                             f"{jb['decode_agg'] / o['decode_agg']:.2f}x")
        if parts:
            notes.append(f"- jaxinfer bf16 / {other}: " + "; ".join(parts) + ".")
    j1 = by.get(("jaxinfer", 1))
    for name in sorted(llamas, key=lambda n: ("F32" not in n, n)):
        lr = by.get((name, 1))
        if j1 and lr:
            notes.append(
                f"- jaxinfer batch 1 / {name}: decode {j1['decode_req']:.1f} / {lr['decode_req']:.1f} = "
                f"**{j1['decode_req'] / lr['decode_req']:.2f}x**, total {j1['total'] / lr['total']:.2f}x, "
                f"first-token latency {j1['ttft_ms']:.0f} / {lr['ttft_ms']:.0f} ms = {j1['ttft_ms'] / lr['ttft_ms']:.2f}x."
            )
    goals = []
    j32, t32 = by.get(("jaxinfer", 32)), by.get(("transformers", 32))

    def per_repeat_ratios(name: str) -> str:
        # The engines run in turn within a repeat, so each repeat's ratio compares runs close in time.
        pairs = zip(runs[(name, 32)], runs[("transformers", 32)])
        return "; per repeat " + ", ".join(f"{j['total'] / t['total']:.2f}x" for j, t in pairs)

    if j32 and t32:
        ratio = j32["total"] / t32["total"]
        goals.append(
            f"- Goal 1, batch 32 output tok/s >= 3x transformers: jaxinfer {j32['total']:.1f} vs transformers "
            f"{t32['total']:.1f} = {ratio:.2f}x: **{'MET' if ratio >= 3 else 'NOT MET'}**"
            + ("" if ratio >= 3 else f" (3x would need {3 * t32['total']:.1f} tok/s; {ratio / 3:.0%} of the goal)")
            + per_repeat_ratios("jaxinfer") + "."
        )
    else:
        goals.append("- Goal 1, batch 32 output tok/s >= 3x transformers: not measured in this run.")
    jb32 = by.get(("jaxinfer bf16", 32))
    if jb32 and t32:
        ratio = jb32["total"] / t32["total"]
        goals.append(
            f"- Goal 1 with jaxinfer's bfloat16 weights (transformers still float32, as the goal states it): "
            f"{jb32['total']:.1f} vs {t32['total']:.1f} = {ratio:.2f}x: **{'MET' if ratio >= 3 else 'NOT MET'}**"
            + per_repeat_ratios("jaxinfer bf16") + "."
        )
    lf = by.get(("llama.cpp F32", 1))
    if j1 and lf:
        # Each repeat's pair ran back to back, so their ratio cancels most of the machine's drift.
        paired = [j["decode_req"] / l["decode_req"] for j, l in zip(runs[("jaxinfer", 1)], runs[("llama.cpp F32", 1)])]
        ratio = statistics.median(paired)
        read = [f" ({b:.0f}/{a:.0f} GB/s)" if b and a else "" for b, a in probes] + [""] * len(paired)
        goals.append(
            f"- Goal 2, batch 1 fp32 decode >= llama.cpp F32 decode: per repeat, jaxinfer / llama.cpp run back to "
            f"back{' (the read bandwidth probed just before / just after the pair)' if any(read) else ''}: "
            f"{', '.join(f'{x:.2f}x{r}' for x, r in zip(paired, read))}; median **{ratio:.2f}x: "
            f"{'MET' if ratio >= 1 else 'NOT MET'}**"
            + ("" if ratio >= 1 else f" ({ratio:.0%} of llama.cpp's F32 decode rate)")
            + f". Medians over repeats: jaxinfer {j1['decode_req']:.1f} vs llama.cpp {lf['decode_req']:.1f} tok/s = "
            f"{j1['decode_req'] / lf['decode_req']:.2f}x."
        )
    else:
        goals.append("- Goal 2, batch 1 fp32 decode >= llama.cpp F32 decode: not measured in this run.")

    agreement = []
    jt1 = last_tokens.get(("jaxinfer", 1))
    for name in ("transformers", *llamas):
        other = last_tokens.get((name, 1))
        if jt1 and other:
            agreement.append(f"{name} {common_prefix(jt1[0], other[0])}/{n_out}")
    q4t, f32t = last_tokens.get(("llama.cpp Q4_1", 1)), last_tokens.get(("llama.cpp F32", 1))
    same_weights = (
        f" llama.cpp Q4_1 vs F32 (the same weights; Q4_1 matmuls quantize activations to 8 bits): "
        f"{common_prefix(q4t[0], f32t[0])}/{n_out}." if q4t and f32t else ""
    )
    batch_inv = []
    for name in jaxinfers:
        first = last_tokens.get((name, 1))
        for b in args.batch_list:
            if b > 1 and first and (name, b) in last_tokens:
                same = common_prefix(first[0], last_tokens[(name, b)][0])
                batch_inv.append(f"{name} batch {b} {same}/{n_out}")
    jb1 = last_tokens.get(("jaxinfer bf16", 1))
    if jt1 and jb1:
        agreement.append(f"jaxinfer bf16 {common_prefix(jt1[0], jb1[0])}/{n_out}")
    notes.append(
        f"- Greedy tokens of request 0 at batch 1, jaxinfer vs: {', '.join(agreement) or '-'} (common prefix)."
        + same_weights
        + (f" Request 0 at larger batches vs batch 1: {', '.join(batch_inv)}." if batch_inv else "")
    )
    notes.append(
        f"- Workload: batches {args.batches}; {n_in} prompt tokens (different windows of `pydoc_data.topics` "
        f"English text per request, the same for every engine) and exactly {n_out} generated tokens per request "
        f"(greedy, EOS ignored); {args.repeats} repeats, engines in turn at each batch size (llama.cpp right "
        f"after jaxinfer's batch 1); medians over repeats."
    )
    if any(b and a for b, a in probes):
        notes.append(
            "- Read bandwidth around goal 2's pairs: `benchmarks/read_bandwidth.cc` (2 threads, AVX2 loads, a 512 MB "
            "buffer, median of 5 passes, ~0.3 s). A batch-1 decode streams the weights, so both engines follow it; "
            f"the goal's figures were set on a machine that read {READ_BANDWIDTH_GBS} GB/s (FACTS.md)."
        )
    notes.append(
        f"- jaxinfer {jx.jax_version}: float32, `LLMEngine` with {jx.options} (other options default: "
        f"max_prefill_tokens {jx.engine.config.max_prefill_tokens}, page {jx.engine.config.cache_block_seq_len}); "
        f"shape buckets {jx.engine.buckets.all_shapes()} compiled before timing (load {jx.load_s:.1f} s, "
        f"engine + warm-up {jx.warmup_s:.1f} s in this process, XLA cache possibly warm)."
        + (f" jaxinfer bf16: the same engine on the weights rounded to bfloat16 (`--dtype bfloat16`); activations "
           f"stay float32, the KV cache is {jx_bf16.engine.runner.cache.layers[0].k.dtype} (`--kv-cache-dtype auto`), "
           f"each matmul rounds its input rows to bfloat16 and accumulates in float32."
           if jx_bf16 else "")
    )
    for th in transformers_peers.values():
        notes.append(
            f"- transformers {th.version}: torch {th.dtype}, `torch.set_num_threads({args.torch_threads})` "
            f"({th.threads} threads), attention `{th.attention}`, one `generate(do_sample=False, "
            f"min_new_tokens=max_new_tokens={n_out})` per batch; weights from the Q4_1 GGUF dequantized by "
            f"transformers."
        )
    if llamas:
        notes.append(
            f"- llama.cpp: `llama-cpp-python` {next(iter(llamas.values())).version} built from its sdist with "
            f"`CMAKE_ARGS=-DGGML_NATIVE=ON`; `Llama(n_ctx={n_in + n_out + 16}, n_threads={args.llama_threads}, "
            f"n_batch=512)`, `generate(tokens, temp=0)` on the token ids, batch 1 only. "
            + "; ".join(llama_notes) + f". F32 file: {f32_note}."
        )
    notes.append(
        "- first-token latency: submission to a request's first token (median / max over the batch's requests; "
        "at batch > 1 jaxinfer admits prompts under a 512-token prefill budget per step, so later requests wait). "
        "decode per request: (output - 1) tokens / (its last - its first token), median over requests. decode "
        "aggregate: tokens generated after all requests had their first token / time from then to the last token. "
        "total: batch x output tokens / (last token - submission)."
    )
    arithmetic = []
    for b in args.batch_list:
        gflop = workload_gflop(jx.loaded.config, b, n_in, n_out)
        rates = [f"{name} {gflop / by[(name, b)]['wall_s']:.0f}" for name in order if (name, b) in by]
        arithmetic.append(f"batch {b}: {gflop:.0f} GFLOP, GFLOP/s " + ", ".join(rates))
    need = (f" Goal 1 needs 3x transformers' rate at batch 32: "
            f"{3 * workload_gflop(jx.loaded.config, 32, n_in, n_out) / t32['wall_s']:.0f} GFLOP/s over the whole run "
            "(compare with the CPU's FMA rate: `cpu_tiles.py`'s float32 tile rate per core x 2 cores)." if t32 else "")
    notes.append("- Model arithmetic (multiply-adds x 2 of the linear layers, LM head and causal attention; "
                 "`workload_gflop`) over each median run's wall time: " + "; ".join(arithmetic) + "." + need)
    per_repeat = []
    for (name, b), fs in runs.items():
        per_repeat.append(f"{name} b{b} " + "/".join(f"{f['total']:.1f}" for f in fs))
    notes.append("- Per-repeat output tok/s total: " + "; ".join(per_repeat) + ".")

    startup_lines = []
    if startup:
        c, w, conv = startup["cold"], startup["warm"], startup["convert"]
        startup_lines = [
            f"- Start-up, process start to the first token of a chat reply (\"{c['token']}\"), engine options as "
            f"above ({c['shapes']} shape buckets warmed up): **cold {c['total_s']:.1f} s** (empty XLA cache: imports "
            f"{c['imports_s']:.1f}, load weights {c['load_s']:.1f}, engine + warm-up {c['warmup_s']:.1f}, first "
            f"token {c['first_token_s'] * 1e3:.0f} ms; {c['lowerings']} lowerings), **warm {w['total_s']:.1f} s** "
            f"(same home: imports {w['imports_s']:.1f}, load {w['load_s']:.1f}, engine + warm-up {w['warmup_s']:.1f}, "
            f"first token {w['first_token_s'] * 1e3:.0f} ms; {w['lowerings']} lowerings, the buckets' traced steps "
            f"from `exported_steps/`, executables from the persistent cache). XLA cache: "
            f"{startup['cache_before_cold_mb']:.1f} MB before the cold start, {startup['cache_after_cold_mb']:.1f} MB "
            f"after it, {startup['cache_after_warm_mb']:.1f} MB after the warm one; saved traced steps "
            f"{startup['steps_after_cold_mb']:.1f} MB after the cold start, {startup['steps_after_warm_mb']:.1f} MB "
            f"after the warm one. Converting the embedded Q4_1 GGUF into the fresh home (one-time, not in the figures "
            f"above): {conv['total_s']:.1f} s process start to done."
        ]
    notes.append(f"- Load: before `{load_before}`; after `{load_after}`. Whole run {elapsed / 60:.1f} min. {stolen}.")

    precision = "fp32 and bf16" if args.bf16 else "fp32"
    title = (f"SmolLM2-135M {precision}, {n_in} in / {n_out} out, median of {args.repeats} "
             f"({time.strftime('%Y-%m-%d', time.gmtime())}, 2-core CPU, shared)")
    plot_note = []
    if args.plot:
        plot(args.plot, rows, args.batch_list, title)
        plot_note = [f"- Plot: {plot_reference(args.plot)} (output tok/s total and decode tok/s aggregate against "
                     "batch size; llama.cpp at batch 1 only)."]
    publish(f"Throughput, static batches, SmolLM2-135M {precision}: jaxinfer vs transformers vs llama.cpp",
            table, goals + notes + startup_lines + plot_note, write=args.write_results)


if __name__ == "__main__":
    main()
