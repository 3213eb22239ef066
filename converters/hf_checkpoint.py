"""HuggingFace model directories: ``config.json``, safetensors shards, tokenizer files."""

from __future__ import annotations

import glob
import json
import os

import numpy as np

from converters.errors import CheckpointError
from converters.safetensors_reader import SafetensorsFile

INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


class HFCheckpoint:
    """Config and lazily read tensors of one HF directory (sharded or not)."""

    def __init__(self, directory: str | os.PathLike):
        self.path = str(directory)
        config_path = os.path.join(self.path, "config.json")
        if not os.path.isfile(config_path):
            raise CheckpointError(config_path, "file not found (an HF model directory needs config.json)")
        try:
            with open(config_path) as f:
                self.hf_config = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(config_path, f"not valid JSON ({e})") from None
        self._files: dict[str, SafetensorsFile] = {}
        self._where: dict[str, str] = {}
        index_path = os.path.join(self.path, INDEX_FILE)
        if os.path.isfile(index_path):
            try:
                with open(index_path) as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as e:
                raise CheckpointError(index_path, f"not a valid safetensors index ({e})") from None
            shards = sorted(set(weight_map.values()))
        else:
            shards = sorted(os.path.basename(p) for p in glob.glob(os.path.join(self.path, "*.safetensors")))
            weight_map = None
        if not shards:
            found = [os.path.basename(p) for p in glob.glob(os.path.join(self.path, "*.bin"))]
            hint = " (only PyTorch .bin weights found; save with safe_serialization=True)" if found else ""
            raise CheckpointError(self.path, f"no *.safetensors weights{hint}")
        for shard in shards:
            file = SafetensorsFile(os.path.join(self.path, shard))  # checks every shard up front
            self._files[shard] = file
            for name in file.names():
                self._where[name] = shard
        if weight_map is not None:
            for name, shard in weight_map.items():
                if self._where.get(name) != shard:
                    raise CheckpointError(os.path.join(self.path, shard), f"tensor {name!r} listed in {INDEX_FILE} is missing")

    def names(self) -> list[str]:
        return list(self._where)

    def get(self, name: str) -> np.ndarray:
        return self._files[self._where[name]].get(name)

    def source_dtype(self) -> np.dtype:
        """The floating dtype most of the weights are stored in."""
        counts: dict[np.dtype, int] = {}
        for name, shard in self._where.items():
            a = self._files[shard].get(name)
            if a.dtype.kind == "f" or a.dtype.name == "bfloat16":
                counts[a.dtype] = counts.get(a.dtype, 0) + a.size
        return max(counts, key=counts.get) if counts else np.dtype(np.float32)

    def tokenizer_backend(self):
        """The directory's HF tokenizer (what ``jaxinfer.tokenizer.Tokenizer`` wraps), or None if it ships none."""
        if not any(os.path.isfile(os.path.join(self.path, f)) for f in TOKENIZER_FILES):
            return None
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(self.path)
        except Exception as e:
            raise CheckpointError(self.path, f"cannot load the tokenizer ({e})") from None
