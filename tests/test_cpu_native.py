"""Building the CPU kernels (``pallas_kernels.cpu_native``): which build a CPU gets, and builds
that are atomic and replace only their own level's earlier libraries. Compiling needs g++ but not
the CPU the code is for, so every level builds here."""

import pytest

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
def test_a_build_replaces_only_its_levels_earlier_builds(tmp_path, level):
    stale = tmp_path / f"jaxinfer_cpu_{level.name}-0123456789abcdef.so"
    other = next(o for o in cpu_native.LEVELS if o != level)
    others = tmp_path / f"jaxinfer_cpu_{other.name}-0123456789abcdef.so"
    for path in (stale, others):
        path.write_bytes(b"an earlier source's library")
    built = cpu_native.build(str(tmp_path), level)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([built.rsplit("/", 1)[-1], others.name])
    assert cpu_native.build(str(tmp_path), level) == built  # found, not rebuilt


def test_failed_build_names_the_command_and_leaves_no_file(tmp_path, monkeypatch):
    monkeypatch.setenv("CXX", "false")
    with pytest.raises(RuntimeError, match="false .* failed"):
        cpu_native.build(str(tmp_path), cpu_native.LEVELS[-1])
    assert list(tmp_path.iterdir()) == []
