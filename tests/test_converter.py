"""`jaxinfer convert` on HF directories: sharded input, dtypes, atomic output, bad input files."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from tiny_models import build_tiny

from converters import checkpoint, convert as convert_module
from converters.convert import convert
from converters.errors import CheckpointError
from converters.loader import load_model
from jaxinfer.scoring import sequence_logits

PROMPTS = [[5, 9, 200, 31, 7], list(range(3, 40))]
JAXINFER = [sys.executable, "-m", "jaxinfer.cli.main"]


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """A tiny Llama saved in several safetensors shards with an index, plus its torch model."""
    path = tmp_path_factory.mktemp("sharded") / "model"
    model = build_tiny("llama", str(path))
    shutil.rmtree(path)
    model.save_pretrained(str(path), max_shard_size="60KB")
    assert os.path.isfile(path / "model.safetensors.index.json")
    assert len([f for f in os.listdir(path) if f.endswith(".safetensors")]) > 2
    return str(path), model


def logits_of(path, dtype=None):
    m = load_model(path, dtype)
    return sequence_logits(m.config, m.params, PROMPTS)


def test_converted_checkpoint_matches_the_source(sharded, tmp_path):
    src, _ = sharded
    out = tmp_path / "converted"
    convert(src, str(out), progress=False)
    assert checkpoint.is_converted_dir(str(out))
    meta = json.loads((out / checkpoint.CONFIG_FILE).read_text())
    assert meta["dtype"] == "float32" and meta["model"]["architecture"] == "llama"
    assert not [p for p in os.listdir(tmp_path) if ".partial-" in p]
    for a, b in zip(logits_of(src), logits_of(str(out))):
        np.testing.assert_array_equal(a, b)


def test_bfloat16_conversion_halves_the_bytes_and_stays_close(sharded, tmp_path):
    src, _ = sharded
    f32, bf16 = tmp_path / "f32", tmp_path / "bf16"
    convert(src, str(f32), dtype="float32", progress=False)
    convert(src, str(bf16), dtype="bfloat16", progress=False)
    size = lambda d: sum(a.nbytes for a in jax.tree.leaves(checkpoint.read_params(str(d))))  # noqa: E731
    assert size(bf16) * 2 == size(f32)
    assert json.loads((bf16 / checkpoint.CONFIG_FILE).read_text())["dtype"] == "bfloat16"
    for a, b in zip(logits_of(str(f32)), logits_of(str(bf16))):
        assert 0 < np.abs(a - b).max() < 0.05


def test_existing_output_is_kept_unless_forced(sharded, tmp_path):
    src, _ = sharded
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        convert(src, str(out), progress=False)
    assert (out / "keep.txt").read_text() == "mine"
    convert(src, str(out), overwrite=True, progress=False)
    assert checkpoint.is_converted_dir(str(out)) and not (out / "keep.txt").exists()


def test_interrupted_conversion_leaves_nothing(sharded, tmp_path, monkeypatch):
    src, _ = sharded

    def interrupted(directory, *args, **kwargs):
        open(os.path.join(directory, checkpoint.CONFIG_FILE), "w").close()  # half written
        raise KeyboardInterrupt

    monkeypatch.setattr(convert_module, "write_checkpoint", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert(src, str(tmp_path / "out"), progress=False)
    assert os.listdir(tmp_path) == []


def damaged_copy(src, dst, damage):
    shutil.copytree(src, dst)
    shard = sorted(f for f in os.listdir(dst) if f.endswith(".safetensors"))[1]
    damage(os.path.join(dst, shard))
    return os.path.join(dst, shard)


def truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def corrupt_header(path):
    with open(path, "r+b") as f:
        f.seek(8)
        f.write(b"\xff\xfe not json")


@pytest.mark.parametrize("damage,message", [(truncate, "truncated"), (corrupt_header, "corrupt")])
def test_damaged_shard_is_named(sharded, tmp_path, damage, message):
    src, _ = sharded
    bad = damaged_copy(src, tmp_path / "bad", damage)
    with pytest.raises(CheckpointError, match=message) as err:
        load_model(str(tmp_path / "bad"))
    assert bad in str(err.value)
    result = subprocess.run(JAXINFER + ["convert", str(tmp_path / "bad"), str(tmp_path / "out")],
                            capture_output=True, text=True)
    assert result.returncode == 1 and bad in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()
    assert not [p for p in os.listdir(tmp_path) if ".partial-" in p]


def test_missing_files_are_named(sharded, tmp_path):
    src, _ = sharded
    shutil.copytree(src, tmp_path / "no_shard")
    shard = sorted(f for f in os.listdir(tmp_path / "no_shard") if f.endswith(".safetensors"))[0]
    os.remove(tmp_path / "no_shard" / shard)
    with pytest.raises(CheckpointError, match="file not found") as err:
        load_model(str(tmp_path / "no_shard"))
    assert shard in str(err.value)
    shutil.copytree(src, tmp_path / "no_config")
    os.remove(tmp_path / "no_config" / "config.json")
    with pytest.raises(CheckpointError, match="config.json"):
        load_model(str(tmp_path / "no_config"))
    with pytest.raises(CheckpointError, match="no such file"):
        load_model(str(tmp_path / "nowhere"))


def test_missing_tensor_is_named(tmp_path):
    from safetensors.numpy import load_file, save_file

    build_tiny("llama", str(tmp_path / "m"))
    f = str(tmp_path / "m" / "model.safetensors")
    tensors = load_file(f)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, f)
    with pytest.raises(CheckpointError, match="model.layers.1.mlp.up_proj.weight"):
        load_model(str(tmp_path / "m"))


def test_converted_dir_keeps_the_tokenizer_and_chat_template(tmp_path, smollm2_tokenizer_dir):
    build_tiny("llama", str(tmp_path / "hf"), tokenizer_dir=smollm2_tokenizer_dir, num_hidden_layers=1)
    result = subprocess.run(JAXINFER + ["convert", str(tmp_path / "hf"), str(tmp_path / "out")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    m = load_model(str(tmp_path / "out"))
    assert m.tokenizer is not None and m.tokenizer.has_chat_template
    ids = m.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert m.tokenizer.decode(ids, skip_special_tokens=False).endswith("<|im_start|>assistant\n")


def test_concurrent_first_starts_convert_the_embedded_model_once(tmp_path, monkeypatch):
    """Starts that find no converted model at once (parallel test workers, two chats on a new
    home) convert it once; none replaces the directory another already reads."""
    import threading
    import time

    monkeypatch.setenv("JAXINFER_HOME", str(tmp_path))
    monkeypatch.setattr(convert_module, "embedded_model_gguf", lambda: "embedded.gguf")
    calls = []

    def slow_convert(src, out, overwrite=False, progress=True):
        calls.append(out)
        time.sleep(0.3)  # the other start looks meanwhile
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, checkpoint.CONFIG_FILE), "w") as f:
            f.write("{}")

    monkeypatch.setattr(convert_module, "convert", slow_convert)
    paths = []
    starts = [threading.Thread(target=lambda: paths.append(convert_module.embedded_model_path(progress=False)))
              for _ in range(3)]
    for t in starts:
        t.start()
    for t in starts:
        t.join()
    assert len(calls) == 1
    assert paths == [calls[0]] * 3 and checkpoint.is_converted_dir(calls[0])
