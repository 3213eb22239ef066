"""Bytes moved, time, GB/s and roofline fraction of the kernel dispatch points.

What runs: ``pallas_kernels.paged_attention.paged_attention`` and
``pallas_kernels.int4_matmul.int4_matmul``, the functions the engine calls, each under
``jax.jit``. They choose a Pallas kernel or the jnp reference by
``pallas_kernels.dispatch.implementation()``: on a CPU the references run, on a GPU the same script
times the kernels (``--implementation`` overrides the choice; the script prints which one ran and
the backend). Activations (q of quantized pools, the matmul's x, scales and biases) are in the
engine's dtype: float32 on CPU, bfloat16 on GPU (``--dtype``).

Shapes: SmolLM2-135M (hidden 576, intermediate 1536, 9 query / 3 KV heads, head_dim 64) and a
7B-like set (4096 / 11008, 32 / 8 heads, head_dim 128); page size 64.
  - attention decode (q_len 1) at batch 1/8/32 x context 512/2048/4096: every cell with pages in
    the activation dtype; the other float dtype, int8 and int4 pages each once at every batch
    size and every context length (a Latin square over the grid, not the full product);
  - attention prefill: batch 1, one 256-token chunk ending a 512/2048/4096-token context (pages
    in the activation dtype; the other float dtype at 512, int8 at 2048, int4 at 4096), the
    earlier context already in the pages, causal inside the chunk;
  - int4 matmul ``x [M, K] @ W [K, N]``, ``W`` packed by ``pack_int4`` in groups of 128 (AWQ) at
    M = 1, 16, 256 and in groups of 32 (GGUF Q4_1) at M = 1, for the MLP's up (hidden ->
    intermediate) and down (intermediate -> hidden) shapes.

Minimum bytes an op must move (each input read once, the output written once):
  - attention: 2 (K and V) x batch x context x kv_heads x bytes per token and head (head_dim x
    itemsize; quantized pages: head_dim x bits / 8 codes + 2 x 4 bytes of float32 scale and zero)
    + 2 (q read, o written) x batch x q_len x heads x head_dim x q itemsize. Block tables,
    lengths and positions (int32, under 0.1%) are left out.
  - matmul: K_pad x N / 2 (uint32 words of eight 4-bit codes) + 2 x K_pad / group x N x itemsize
    (scales and biases) + M x K x itemsize (x) + M x N x itemsize (y); K_pad is K rounded up to
    whole groups (576 -> 640 at group 128).
Minimum FLOPs: attention 4 x head_dim x heads x visible (query, key) pairs (QK^T and PV; a chunk's
token at position p sees p + 1 keys); matmul 2 x M x K x N. Softmax and dequantization are not
counted.

Roofs, measured in the same run: memory bandwidth = 1 GiB / median time of a jitted ``jnp.sum``
over a 1 GiB float32 array (XLA uses both cores); compute = 2 S^3 / median time of a jitted
``[S, S] @ [S, S]`` in the activation dtype (S = 2048 on CPU, 8192 on GPU). Per op: GB/s = bytes /
time, % of bandwidth = GB/s / the measured bandwidth, GFLOP/s = FLOPs / time, % of peak = GFLOP/s
/ the measured compute roof. The bound is memory when bytes / bandwidth > FLOPs / compute roof,
compute otherwise; % of roofline = max(bytes / bandwidth, FLOPs / compute roof) / time.

Timing: an op is jitted and called once untimed (compile and warm-up), then called one call at a
time, each followed by ``block_until_ready``, for ``--seconds`` (at least ``--repeats`` calls, at
most 50); the median call is reported. The inputs rotate over copies (of the page pools for
attention, of the weights for the matmul), one per call or together at least 512 MiB, and once
they are built a read of the 1 GiB bandwidth array evicts them from the caches: every call reads
its inputs from memory, as in the engine, where the layers' pools and weights are read in turn.
A jitted call that does nothing is timed the same way and printed: the floor that the smallest ops
sit on. ``--quick`` times a dozen small cases of every kind for 0.1 s each: a smoke run.

    .venv/bin/python benchmarks/kernels.py                    # the full table (~3.5 min on 2 CPU cores)
    .venv/bin/python benchmarks/kernels.py --quick            # smoke run, under a minute
    .venv/bin/python benchmarks/kernels.py --write-results    # and append it to RESULTS.md
"""

from __future__ import annotations

import argparse
import functools
import math
import statistics
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from report import READ_BANDWIDTH_GBS, load_average, publish

from jaxinfer.config import default_dtype
from pallas_kernels import dispatch
from pallas_kernels.int4_matmul import int4_matmul, pack_int4, padded_rows
from pallas_kernels.paged_attention import paged_attention
from pallas_kernels.paged_kv import PagedKV, quantize_kv

PAGE_SIZE = 64
BATCHES = (1, 8, 32)
CONTEXTS = (512, 2048, 4096)
PREFILL_CHUNK = 256
MATMUL_M = (1, 16, 256)
AWQ_GROUP = 128
GGUF_GROUP = 32
BANDWIDTH_BYTES = 2**30
# Far beyond a GPU's L2; on this CPU the hypervisor reports the host's 480 MiB L3 as one cache.
COLD_BYTES = 512 * 2**20
MAX_REPEATS = 50
# Distinct random pages behind each pool: the pool repeats them (values do not change the work,
# and jax.random over hundreds of MB per case would take longer than the measurement).
PATTERN_PAGES = 16
# Earlier figures from ../shared/FACTS.md, measured on another 2-core machine (AMD EPYC, AVX2, no
# AVX-512), quoted beside ours.
FACTS_JNP_SUM_GBS = 17.0
FACTS_MATMUL_GFLOPS = 67.0


@dataclass(frozen=True)
class Model:
    name: str
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int


MODELS = {
    "smollm2": Model("SmolLM2", 576, 1536, 9, 3, 64),
    "7b": Model("7B", 4096, 11008, 32, 8, 128),
}

# Pool name -> (stored dtype, kv_bits).
POOLS = {"fp32": (jnp.float32, 0), "bf16": (jnp.bfloat16, 0), "int8": (jnp.uint8, 8), "int4": (jnp.uint8, 4)}
# (batch, context) cells of the decode grid for the other float pool, int8 and int4 (the pool in
# the activation dtype takes every cell): each pool once per batch size and once per context
# length. The other float (bfloat16 on CPU, several times slower there) takes the diagonal whose
# largest op is the smallest.
DIAGONALS = (
    ((1, 4096), (8, 2048), (32, 512)),
    ((1, 512), (8, 4096), (32, 2048)),
    ((1, 2048), (8, 512), (32, 4096)),
)


@dataclass(frozen=True)
class AttentionCase:
    model: Model
    pool: str
    batch: int
    context: int
    q_len: int

    @property
    def op(self) -> str:
        return "attention decode" if self.q_len == 1 else f"attention prefill chunk {self.q_len}"

    @property
    def shape(self) -> str:
        return f"b={self.batch} ctx={self.context}"

    def kv_bytes(self) -> int:
        m = self.model
        dtype, bits = POOLS[self.pool]
        per_head = m.head_dim * bits // 8 + 2 * 4 if bits else m.head_dim * jnp.dtype(dtype).itemsize
        return 2 * self.batch * self.context * m.kv_heads * per_head

    def q_dtype(self, act_dtype):
        dtype, bits = POOLS[self.pool]
        return act_dtype if bits else dtype

    def bytes(self, act_dtype) -> int:
        m = self.model
        q_bytes = self.batch * self.q_len * m.heads * m.head_dim * jnp.dtype(self.q_dtype(act_dtype)).itemsize
        return self.kv_bytes() + 2 * q_bytes

    def flops(self) -> int:
        first = self.context - self.q_len  # position of the chunk's first token
        pairs = sum(p + 1 for p in range(first, self.context))
        return 4 * self.model.head_dim * self.model.heads * self.batch * pairs


@dataclass(frozen=True)
class MatmulCase:
    model: Model
    m: int
    k: int
    n: int
    group: int

    op = "int4 matmul"

    @property
    def pool(self) -> str:
        return f"int4 g{self.group}"

    @property
    def shape(self) -> str:
        return f"M={self.m} {self.k}->{self.n}"

    def weight_bytes(self, act_dtype) -> int:
        rows = padded_rows(self.k, self.group)
        return rows * self.n // 2 + 2 * (rows // self.group) * self.n * jnp.dtype(act_dtype).itemsize

    def bytes(self, act_dtype) -> int:
        return self.weight_bytes(act_dtype) + (self.m * self.k + self.m * self.n) * jnp.dtype(act_dtype).itemsize

    def flops(self) -> int:
        return 2 * self.m * self.k * self.n


def cases(model_keys: list[str], ops: list[str], act_dtype, quick: bool) -> list:
    main_pool, other_float = ("bf16", "fp32") if act_dtype == jnp.bfloat16 else ("fp32", "bf16")
    out = []
    for key in model_keys:
        m = MODELS[key]
        if quick:
            decode = [(main_pool, 8, 2048), (other_float, 1, 512), ("int8", 32, 512), ("int4", 8, 512)]
            prefill = [(main_pool, 512), ("int4", 512)] if key == "smollm2" else []
            matmul = [(mm, m.hidden, m.intermediate, AWQ_GROUP) for mm in MATMUL_M] + [
                (1, m.intermediate, m.hidden, GGUF_GROUP)
            ]
            if key != "smollm2":
                decode, matmul = decode[:1], [(1, m.hidden, m.intermediate, AWQ_GROUP)]
        else:
            decode = [(main_pool, b, c) for b in BATCHES for c in CONTEXTS]
            decode += [(pool, b, c) for pool, cells in zip((other_float, "int8", "int4"), DIAGONALS) for b, c in cells]
            prefill = [(main_pool, c) for c in CONTEXTS] + [(other_float, 512), ("int8", 2048), ("int4", 4096)]
            matmul = [
                (mm, k, n, group)
                for k, n in ((m.hidden, m.intermediate), (m.intermediate, m.hidden))
                for mm, group in [(mm, AWQ_GROUP) for mm in MATMUL_M] + [(1, GGUF_GROUP)]
            ]
        if "decode" in ops:
            out += [AttentionCase(m, pool, b, c, 1) for pool, b, c in decode]
        if "prefill" in ops:
            out += [AttentionCase(m, pool, 1, c, PREFILL_CHUNK) for pool, c in prefill]
        if "matmul" in ops:
            out += [MatmulCase(m, mm, k, n, group) for mm, k, n, group in matmul]
    return out


# -- inputs ---------------------------------------------------------------------------------------

def copies_for(copy_bytes: int) -> int:
    """Input copies to rotate over: 512 MiB of them in all, but not more than one per call."""
    return max(1, min(MAX_REPEATS + 1, math.ceil(COLD_BYTES / copy_bytes)))


@functools.partial(jax.jit, static_argnames=("shape", "dtype"))
def random_fill(seed, shape, dtype, low=-1.0, high=1.0):
    """Uniform values in ``[low, high)``: a 64K-value random block repeated to fill ``shape``."""
    size = min(math.prod(shape), 2**16)
    base = jax.random.uniform(jax.random.key(seed), (size,), jnp.float32, low, high)
    return jnp.resize(base, shape).astype(dtype)


@functools.partial(jax.jit, static_argnames=("num_pages", "kv_heads", "head_dim", "pool"))
def make_pool(seed, num_pages, kv_heads, head_dim, pool):
    """``[num_pages, kv_heads, PAGE_SIZE, head_dim (or codes)]`` pages and, if quantized, their
    ``[..., 2]`` scale/zero pool, made by ``quantize_kv`` as the engine's cache writes make them."""
    dtype, bits = POOLS[pool]
    base = jax.random.normal(jax.random.key(seed), (PATTERN_PAGES, kv_heads, PAGE_SIZE, head_dim), jnp.float32)
    reps = -(-num_pages // PATTERN_PAGES)

    def tile(x):
        return jnp.tile(x, (reps, 1, 1, 1))[:num_pages]

    if bits:
        codes, scale_zero = quantize_kv(base, bits)
        return tile(codes), tile(scale_zero)
    return tile(base.astype(dtype)), None


def attention_inputs(case: AttentionCase, act_dtype) -> list[tuple]:
    """Argument tuples of ``paged_attention``, one per copy of the pools. Each copy's pool holds
    just the pages the op reads (and the trash page), in shuffled order as a used free list leaves
    them: the jnp reference's bfloat16 path on XLA:CPU takes time in proportion to the whole pool."""
    m = case.model
    pages_per_seq = case.context // PAGE_SIZE
    pages = case.batch * pages_per_seq
    q = random_fill(3, (case.batch, case.q_len, m.heads, m.head_dim), case.q_dtype(act_dtype))
    seq_lens = jnp.full((case.batch,), case.context, jnp.int32)
    positions = jnp.arange(case.context - case.q_len, case.context, dtype=jnp.int32)
    positions = jnp.broadcast_to(positions, (case.batch, case.q_len))
    _, bits = POOLS[case.pool]
    rng = np.random.default_rng(0)
    out = []
    for c in range(copies_for(case.kv_bytes())):
        k, k_sz = make_pool(2 * c, 1 + pages, m.kv_heads, m.head_dim, case.pool)  # page 0: the trash page
        v, v_sz = make_pool(2 * c + 1, 1 + pages, m.kv_heads, m.head_dim, case.pool)
        table = (1 + rng.permutation(pages)).reshape(case.batch, pages_per_seq).astype(np.int32)
        out.append((q, PagedKV(k, v, k_sz, v_sz, bits), jnp.asarray(table), seq_lens, positions))
    return out


@functools.lru_cache(maxsize=4)
def packed_codes(rows: int, n: int) -> np.ndarray:
    codes = np.random.default_rng(rows * n).integers(0, 16, (rows, n), dtype=np.uint8)
    return pack_int4(codes)


@jax.jit
def flip_codes(words, c):
    """A copy of ``words`` in a new buffer, every 4-bit code xor-ed with ``c % 16`` (still codes)."""
    return words ^ (c % 16).astype(jnp.uint32) * jnp.uint32(0x11111111)


def matmul_inputs(case: MatmulCase, act_dtype) -> list[tuple]:
    """Argument tuples of ``int4_matmul``, one per copy of the weights (x is shared)."""
    rows = padded_rows(case.k, case.group)
    words = jnp.asarray(packed_codes(rows, case.n))
    groups = (rows // case.group, case.n)
    x = random_fill(0, (case.m, case.k), act_dtype)
    out = []
    for c in range(copies_for(case.weight_bytes(act_dtype))):
        scales = random_fill(2 * c + 1, groups, act_dtype, 0.002, 0.02)
        biases = random_fill(2 * c + 2, groups, act_dtype, -0.15, 0.0)
        out.append((x, flip_codes(words, jnp.int32(c)), scales, biases))
    return out


# -- timing ---------------------------------------------------------------------------------------

def time_calls(fn, arg_sets: list[tuple], min_repeats: int, seconds: float) -> tuple[float, list[float]]:
    """(seconds of the first, untimed call, [seconds of each timed call]), rotating the inputs."""
    t = time.perf_counter()
    jax.block_until_ready(fn(*arg_sets[0]))
    first = time.perf_counter() - t
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < MAX_REPEATS and (len(times) < min_repeats or time.perf_counter() - start < seconds):
        args = arg_sets[(len(times) + 1) % len(arg_sets)]
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return first, times


class MemoryReader:
    """A jitted ``jnp.sum`` over a 1 GiB float32 array: measures the memory bandwidth, and reading
    the whole array evicts everything else from the caches."""

    def __init__(self):
        self.array = jnp.ones((BANDWIDTH_BYTES // 4,), jnp.float32)
        self.read = jax.jit(jnp.sum)

    def bandwidth(self, repeats: int) -> float:
        """Bytes/s (median)."""
        _, times = time_calls(self.read, [(self.array,)], repeats, 0.0)
        return BANDWIDTH_BYTES / statistics.median(times)

    def flush_caches(self) -> None:
        self.read(self.array).block_until_ready()


def measure_compute(size: int, dtype, repeats: int) -> float:
    """FLOP/s of a jitted square matmul in ``dtype`` (median)."""
    a = random_fill(0, (size, size), dtype)
    b = random_fill(1, (size, size), dtype)
    _, times = time_calls(jax.jit(jnp.matmul), [(a, b)], repeats, 0.0)
    return 2 * size**3 / statistics.median(times)


def measure_floor() -> float:
    """Seconds of a jitted call on 8 floats: dispatch and ``block_until_ready`` alone (median)."""
    x = jnp.zeros((8,), jnp.float32)
    _, times = time_calls(jax.jit(lambda a: a + 1), [(x,)], MAX_REPEATS, 0.0)
    return statistics.median(times)


def op_function(case):
    if isinstance(case, MatmulCase):
        return jax.jit(int4_matmul)

    def attention(q, kv, tables, seq_lens, positions):
        return paged_attention(q, kv, tables, seq_lens, positions, scale=case.model.head_dim**-0.5)

    return jax.jit(attention)


# -- the table ------------------------------------------------------------------------------------

def row(case, act_dtype, seconds: float, bandwidth: float, peak: float) -> dict:
    nbytes, flops = case.bytes(act_dtype), case.flops()
    t_memory, t_compute = nbytes / bandwidth, flops / peak
    return {
        "op": case.op, "model": case.model.name, "pool": case.pool, "shape": case.shape,
        "mb": nbytes / 1e6, "gflop": flops / 1e9, "ms": seconds * 1e3, "gbs": nbytes / seconds / 1e9,
        "bw_frac": nbytes / seconds / bandwidth, "gflops": flops / seconds / 1e9, "peak_frac": flops / seconds / peak,
        "bound": "memory" if t_memory >= t_compute else "compute", "roofline": max(t_memory, t_compute) / seconds,
    }


def format_table(rows: list[dict], bandwidth: float, peak: float) -> list[str]:
    lines = [
        (
            f"| op | model | pool / weights | shape | MB moved | GFLOP | median ms | GB/s "
            f"| % of {bandwidth / 1e9:.1f} GB/s | GFLOP/s | % of {peak / 1e9:.0f} GFLOP/s | bound | % of roofline |"
        ),
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['op']} | {r['model']} | {r['pool']} | {r['shape']} | {r['mb']:.2f} | {r['gflop']:.3f} | "
            f"{r['ms']:.3f} | {r['gbs']:.1f} | {r['bw_frac']:.0%} | {r['gflops']:.1f} | {r['peak_frac']:.0%} | "
            f"{r['bound']} | {r['roofline']:.0%} |"
        )
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a few small cases and short timings: a smoke run")
    ap.add_argument("--models", default="smollm2,7b", help="comma-separated from: " + ", ".join(MODELS))
    ap.add_argument("--ops", default="decode,prefill,matmul", help="comma-separated from: decode, prefill, matmul")
    ap.add_argument("--repeats", type=int, default=None, help="timed calls per op at least (default 5; --quick 3)")
    ap.add_argument("--seconds", type=float, default=None,
                    help="time spent timing calls of one op (default 0.5; --quick 0.1)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                    help="activation dtype (default: the engine's, float32 on CPU and bfloat16 on GPU)")
    ap.add_argument("--implementation", choices=dispatch.IMPLEMENTATIONS, default="auto",
                    help="what the dispatch points run (default auto: kernels on GPU, references elsewhere)")
    ap.add_argument("--peak-matmul-size", type=int, default=None,
                    help="S of the S x S matmul that measures the compute roof (default 2048 on CPU, 8192 on GPU)")
    ap.add_argument("--write-results", action="store_true", help="append a dated section to benchmarks/RESULTS.md")
    args = ap.parse_args()
    model_keys = args.models.split(",")
    ops = args.ops.split(",")
    if not set(model_keys) <= set(MODELS) or not set(ops) <= {"decode", "prefill", "matmul"}:
        ap.error("unknown model or op")
    repeats = args.repeats or (3 if args.quick else 5)
    seconds = args.seconds if args.seconds is not None else (0.1 if args.quick else 0.5)
    if not 1 <= repeats <= MAX_REPEATS:
        ap.error(f"--repeats must be in 1..{MAX_REPEATS}")
    act_dtype = jnp.dtype(args.dtype) if args.dtype else jnp.dtype(default_dtype())
    backend = jax.default_backend()
    peak_size = args.peak_matmul_size or (8192 if backend == "gpu" else 2048)

    load_before = load_average()
    t_start = time.perf_counter()
    with dispatch.use_implementation(args.implementation):
        impl = dispatch.implementation()
        print(f"implementation: {impl} (dispatch.implementation()), backend: {backend}, "
              f"activation dtype: {act_dtype.name}", flush=True)
        reader = MemoryReader()
        bandwidth = reader.bandwidth(repeats)
        print(f"memory bandwidth: {bandwidth / 1e9:.1f} GB/s (jitted jnp.sum over 1 GiB float32, median of "
              f"{repeats}); FACTS.md, another machine: ~{FACTS_JNP_SUM_GBS:.0f} GB/s measured so, "
              f"{READ_BANDWIDTH_GBS} GB/s a 2-thread AVX2 read loop", flush=True)
        peak = measure_compute(peak_size, act_dtype, repeats)
        print(f"compute roof: {peak / 1e9:.1f} GFLOP/s ({peak_size}^3 {act_dtype.name} matmul, median of {repeats}); "
              f"FACTS.md, another machine: ~{FACTS_MATMUL_GFLOPS:.0f} GFLOP/s fp32 at 2048", flush=True)
        floor = measure_floor()
        print(f"floor: {floor * 1e6:.0f} us per jitted call that does nothing", flush=True)

        rows = []
        for case in cases(model_keys, ops, act_dtype, args.quick):
            make_inputs = matmul_inputs if isinstance(case, MatmulCase) else attention_inputs
            arg_sets = make_inputs(case, act_dtype)
            reader.flush_caches()  # what building the inputs wrote is not left in the caches
            first, times = time_calls(op_function(case), arg_sets, repeats, seconds)
            rows.append(row(case, act_dtype, statistics.median(times), bandwidth, peak))
            r = rows[-1]
            print(
                f"  {r['op']} {r['model']} {r['pool']} {r['shape']}: {r['ms']:.3f} ms (min {min(times) * 1e3:.3f}, "
                f"{len(times)} calls, {len(arg_sets)} input copies; first call {first:.2f} s), {r['gbs']:.1f} GB/s, "
                f"{r['gflops']:.1f} GFLOP/s, {r['bound']}-bound, {r['roofline']:.0%} of roofline",
                flush=True,
            )
            del arg_sets  # before the next case builds its copies: two cases' at once could take 2 GB
    load_after = load_average()
    elapsed = time.perf_counter() - t_start

    table = format_table(rows, bandwidth, peak)
    notes = [
        (
            f"- Ran: `{impl}` (`pallas_kernels.dispatch.implementation()`) on backend `{backend}`; activation "
            f"dtype {act_dtype.name} (q of quantized pools, matmul x / scales / biases; q of float pools is in the "
            "pool's dtype)."
        ),
        (
            f"- Memory bandwidth: **{bandwidth / 1e9:.1f} GB/s**, a jitted `jnp.sum` over 1 GiB of float32 (median "
            f"of {repeats}). FACTS.md, on another 2-core machine (AMD EPYC, AVX2): ~{FACTS_JNP_SUM_GBS:.0f} GB/s "
            f"measured so, {READ_BANDWIDTH_GBS} GB/s by a 2-thread AVX2 read loop: a better reader than XLA's "
            "reduction can pass 100% of this figure."
        ),
        (
            f"- Compute roof: **{peak / 1e9:.1f} GFLOP/s**, a jitted {peak_size}x{peak_size} {act_dtype.name} "
            f"matmul (median of {repeats}); FACTS.md, the other machine: ~{FACTS_MATMUL_GFLOPS:.0f} GFLOP/s fp32 at "
            "2048. Both roofs are measured once, at the start: if the load changes during the run, an op can pass "
            "100% of them."
        ),
        (
            "- MB moved: the minimum (attention: K/V of the context, with scale/zero pools when quantized, q and o; "
            "matmul: packed weight, scales, biases, x and y); GFLOP: QK^T and PV over visible keys, or 2MKN. "
            "Bound: memory when MB / bandwidth > GFLOP / compute roof; % of roofline = the larger of the two "
            "times / median time."
        ),
        (
            f"- Median of at least {repeats} calls (up to {seconds} s, at most {MAX_REPEATS}) per op, jitted and "
            "warm, each call `block_until_ready`; inputs rotate over copies (at least 512 MiB, or one per call) "
            "and the caches are flushed after they are built, so calls read from memory. A jitted call doing "
            f"nothing takes {floor * 1e6:.0f} us: the floor of the smallest ops."
        ),
        f"- Whole run {elapsed:.0f} s. Load: before `{load_before}`; after `{load_after}`.",
    ]
    publish(f"Kernels: bytes, GB/s and roofline fraction of the dispatch points, {impl} on {backend}", table, notes,
            write=args.write_results)


if __name__ == "__main__":
    main()
