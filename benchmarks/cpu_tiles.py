"""What one core multiplies per second in a matmul's register tile: float32 FMAs vs integer dot products.

Compiles ``cpu_tiles.cc`` (AVX2 + FMA) and runs it on one thread: a 6-row x 16-column tile over
K = 576 with its operands in L1, the shape of the float32 kernel's AVX2 tile
(``pallas_kernels/f32_matmul.cc``), in four arithmetics:

  - ``f32_fma``: float32 ``vfmadd`` (what the engine runs);
  - ``i16_madd``: int16 pairs, ``vpmaddwd`` + ``vpaddd``;
  - ``u8s8_maddubs``: uint8 x int8 quads, ``vpmaddubsw`` + ``vpmaddwd`` + ``vpaddd``; its int16 pair
    sums saturate unless one operand is limited to 7 bits;
  - ``s8_sign_maddubs``: the same with llama.cpp's sign trick (``|w|`` times ``x`` carrying ``w``'s
    sign), exact for int8 x int8.

GMAC/s per core (a MAC is one multiply-add; GFLOP/s is twice that), median over passes, and each
integer arithmetic's ratio to float32: the ceiling an int8 weight-and-activation matmul mode could
reach over the float32 kernel on this CPU, before quantizing activations and scaling results.

    .venv/bin/python benchmarks/cpu_tiles.py [--write-results]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile

from report import load_average, publish

from pallas_kernels import cpu_native

HERE = os.path.dirname(os.path.abspath(__file__))
ARITHMETICS = {
    "f32_fma": "float32 FMA (the engine's kernel)",
    "i16_madd": "int16 vpmaddwd",
    "u8s8_maddubs": "uint8 x int8 vpmaddubsw (saturates at 8 x 8 bits)",
    "s8_sign_maddubs": "int8 x int8 vpmaddubsw with the sign trick",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--passes", type=int, default=7, help="passes over the four tiles (default 7)")
    ap.add_argument("--write-results", action="store_true", help="append a dated section to benchmarks/RESULTS.md")
    args = ap.parse_args()
    if not {"avx2", "fma"} <= cpu_native.cpu_flags():
        raise SystemExit("cpu_tiles: the tiles need AVX2 and FMA, which this CPU lacks")
    compiler = cpu_native.cxx_compiler()
    load_before = load_average()
    with tempfile.TemporaryDirectory() as tmp:
        binary = os.path.join(tmp, "cpu_tiles")
        subprocess.run([compiler, "-O3", "-mavx2", "-mfma", "-o", binary, os.path.join(HERE, "cpu_tiles.cc")],
                       check=True)
        run = subprocess.run([binary, str(args.passes)], capture_output=True, text=True)
    if run.returncode != 0:
        raise SystemExit(f"cpu_tiles: the tile program failed ({run.returncode}): {run.stderr}")
    passes = [dict((k, float(v)) for k, v in (f.split("=") for f in line.split())) for line in run.stdout.split("\n") if line]
    median = {name: statistics.median(p[name] for p in passes) for name in ARITHMETICS}
    table = ["| arithmetic | GMAC/s per core (median) | per pass | / float32 FMA |", "|---|---:|---|---:|"]
    for name, what in ARITHMETICS.items():
        per_pass = " / ".join(f"{p[name]:.1f}" for p in passes)
        table.append(f"| {what} | {median[name]:.1f} | {per_pass} | {median[name] / median['f32_fma']:.2f}x |")
    notes = [
        f"- One thread; a 6 x 16 tile over K = 576, operands in L1; {len(passes)} passes of the four tiles in turn, "
        "100000 tiles each, every tile's sums checked. Per core: the engine's kernels run on two. float32 "
        "GFLOP/s = 2 x GMAC/s.",
        f"- Compiler: `{compiler} -O3 -mavx2 -mfma`.",
        f"- Load: before `{load_before}`; after `{load_average()}`.",
    ]
    publish("CPU tiles: float32 FMA vs integer dot products per core", table, notes, write=args.write_results)


if __name__ == "__main__":
    main()
