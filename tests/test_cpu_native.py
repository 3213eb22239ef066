"""Building the CPU kernels (``pallas_kernels.cpu_native``): which build a CPU gets, and builds
that are atomic and replace only their own level's earlier libraries. Compiling needs g++ but not
the CPU the code is for, so every level builds here (once per suite, in the directory engines load
from); on a CPU with AVX-512 the AVX2 build also runs the kernels' tests."""

import os
import stat
import subprocess
import sys

import pytest

from jaxinfer.home import jaxinfer_home
from pallas_kernels import cpu_native


@pytest.mark.parametrize("flags,level", [
    ({"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "amx_tile"}, "avx512"),
    ({"avx2", "fma", "avx512f"}, "avx2"),  # AVX-512 without BW/VL: not enough for that build
    ({"avx2", "fma"}, "avx2"),
    ({"avx2", "sse4_2"}, None),
])
def test_the_best_level_the_cpu_runs(flags, level):
    got = cpu_native.isa_level(flags)
    assert (got and got.name) == level


@pytest.mark.parametrize("level", cpu_native.LEVELS, ids=lambda level: level.name)
def test_every_level_compiles(level):
    """Into the directory engines load from: the suite's engines (the best level) and the AVX2
    run below then find their build instead of compiling it again."""
    built = cpu_native.build(os.path.join(jaxinfer_home(), "native"), level)
    with open(built, "rb") as f:
        assert f.read(4) == b"\x7fELF"  # a shared library, whether or not this CPU can run it


@pytest.mark.parametrize("level", cpu_native.LEVELS, ids=lambda level: level.name)
def test_a_build_replaces_only_its_levels_earlier_builds(tmp_path, monkeypatch, level):
    # A stand-in compiler that writes each output it is asked for and counts its runs: what is
    # tested here is the files a build leaves, not the compiling (test_every_level_compiles).
    runs = tmp_path / "runs"
    compiler = tmp_path / "fake-c++"
    compiler.write_text('#!/bin/sh\necho run >> "$RUNS"\nwhile [ "$1" != "-o" ]; do shift; done\necho built > "$2"\n')
    compiler.chmod(compiler.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("CXX", str(compiler))
    monkeypatch.setenv("RUNS", str(runs))
    build_dir = tmp_path / "native"
    build_dir.mkdir()
    stale = build_dir / f"jaxinfer_cpu_{level.name}-0123456789abcdef.so"
    other = next(o for o in cpu_native.LEVELS if o != level)
    others = build_dir / f"jaxinfer_cpu_{other.name}-0123456789abcdef.so"
    for path in (stale, others):
        path.write_bytes(b"an earlier source's library")
    built = cpu_native.build(str(build_dir), level)
    assert sorted(p.name for p in build_dir.iterdir()) == sorted([built.rsplit("/", 1)[-1], others.name])
    assert open(built).read() == "built\n"
    compiles = len(runs.read_text().splitlines())
    assert compiles == len(level.sources) + 1  # each source, then the link
    assert cpu_native.build(str(build_dir), level) == built  # found, not rebuilt
    assert len(runs.read_text().splitlines()) == compiles


def test_failed_build_names_the_command_and_leaves_no_file(tmp_path, monkeypatch):
    monkeypatch.setenv("CXX", "false")
    with pytest.raises(RuntimeError, match="false .* failed"):
        cpu_native.build(str(tmp_path), cpu_native.LEVELS[-1])
    assert list(tmp_path.iterdir()) == []


# The kernels' comparisons with their references (the engine-level tests stay on the best build).
KERNEL_TESTS = ("test_f32_matmul.py", "test_paged_attention_cpu.py", "test_kv_write_cpu.py", "test_decoder_layer_cpu.py")


@pytest.mark.skipif(getattr(cpu_native.isa_level(), "name", None) != "avx512",
                    reason="the kernel tests already run the best build this CPU has, the AVX2 one or none")
def test_the_avx2_build_passes_the_kernel_tests():
    here = os.path.dirname(__file__)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([here, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "avx2_build", "-p", "no:cacheprovider", "-k", "not engine and not separate_ops",
         *(os.path.join(here, name) for name in KERNEL_TESTS)],
        env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and "skipped" not in done.stdout.splitlines()[-1], done.stdout[-2000:]
