"""Traced steps saved on disk: a second runner loads them without running the model's Python,
with the same results and donation; a damaged file is traced again; a different program, shape
or kernel implementation gets another key; old files are pruned."""

import os

import jax
import numpy as np
import pytest
from tiny_models import build_tiny

from converters.loader import load_model
from jaxinfer import model_runner
from jaxinfer.buckets import Buckets, StepRow
from jaxinfer.exported_steps import _prune, can_export, step_key
from jaxinfer.model_runner import ModelRunner
from jaxinfer.sampling_params import SamplingParams
from pallas_kernels import cpu_native, dispatch

GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_exec")
    build_tiny("llama", str(path))
    return load_model(str(path))


def runner(tiny, directory):
    buckets = Buckets.create(2, 16, 64, 16, tiny.config.vocab_size)
    r = ModelRunner(tiny.config, tiny.params, tiny.dtype, buckets, 12, exported_steps=str(directory))
    r.warmup(progress=False)
    return r


def greedy_decode(r, prompt, steps):
    """Prefill ``prompt`` in one chunk on pages 1-4, then decode ``steps`` tokens; the tokens."""
    tokens, pages = list(prompt), [1, 2, 3, 4]
    new = []
    for i in range(steps + 1):
        start = 0 if i == 0 else len(tokens) - 1
        row = StepRow(token_ids=tokens[start:], start=start, pages=pages, sampling=GREEDY, seed=(0, 0),
                      num_generated=i, prompt_len=len(prompt))
        n = len(tokens) - start
        shape = r.buckets.prefill_shape(n) if i == 0 else r.buckets.decode_shape(1)
        tokens.append(int(r.execute([row], shape).tokens[0]))
        new.append(tokens[-1])
    return new


def test_second_runner_loads_the_steps_without_tracing(tiny, tmp_path, monkeypatch):
    first = runner(tiny, tmp_path)
    saved = sorted(os.listdir(tmp_path))
    assert len(saved) == len(first.buckets.all_shapes()) + len(first.buckets.batch_sizes)  # steps, samplers
    traced = []
    step, sample = model_runner._model_step, model_runner.sample
    monkeypatch.setattr(model_runner, "_model_step", lambda *a: traced.append("step") or step(*a))
    monkeypatch.setattr(model_runner, "sample", lambda *a: traced.append("sampler") or sample(*a))
    second = runner(tiny, tmp_path)
    assert not traced  # every bucket's step and every batch size's sampler came from disk
    assert sorted(os.listdir(tmp_path)) == saved
    assert greedy_decode(second, [3, 4, 5, 6, 7], 6) == greedy_decode(first, [3, 4, 5, 6, 7], 6)
    old = second.cache
    greedy_decode(second, [9, 8], 1)
    assert all(a.is_deleted() for a in jax.tree.leaves(old))  # loaded steps still donate the cache


def test_a_damaged_file_is_compiled_again(tiny, tmp_path):
    runner(tiny, tmp_path)
    for name in os.listdir(tmp_path):
        (tmp_path / name).write_bytes(b"not an executable")
    r = runner(tiny, tmp_path)
    assert greedy_decode(r, [3, 4, 5], 2) == greedy_decode(runner(tiny, tmp_path / "fresh"), [3, 4, 5], 2)
    assert all((tmp_path / name).read_bytes() != b"not an executable" for name in os.listdir(tmp_path)
               if name.endswith(".bin"))


def test_key_covers_program_shapes_and_implementation(monkeypatch):
    monkeypatch.setattr(cpu_native, "_kernels", cpu_native.CpuKernels(paged_attention=True))
    args = (np.zeros((2, 3), np.float32), {"a": np.zeros(4, np.int32)})
    key = step_key(args, "p")
    assert step_key(args, "p") == key
    assert step_key(args, "q") != key
    assert step_key((np.zeros((2, 4), np.float32), args[1]), "p") != key
    assert step_key((args[0].astype(np.float16), args[1]), "p") != key
    with dispatch.use_implementation("reference"):
        assert can_export()
    with dispatch.use_implementation("interpret"):
        assert step_key(args, "p") != key
        assert not can_export()  # Pallas kernels' custom calls are not exported
    with cpu_native.turned_off("paged_attention"):  # the same arguments, another program
        assert step_key(args, "p") != key


def test_prune_keeps_the_most_recently_used(tmp_path):
    for i, name in enumerate(["old.bin", "mid.bin", "new.bin"]):
        (tmp_path / name).write_bytes(b"x" * 100)
        os.utime(tmp_path / name, (1000 + i, 1000 + i))
    (tmp_path / "other.txt").write_bytes(b"y" * 1000)
    _prune(str(tmp_path), 250)
    assert sorted(os.listdir(tmp_path)) == ["mid.bin", "new.bin", "other.txt"]
