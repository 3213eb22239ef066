"""A checked, memory-mapped reader of ``.safetensors`` files (bfloat16 included, via ml_dtypes).

Written here rather than taken from the ``safetensors`` package so that a truncated or corrupt file
is caught before any tensor is used, with an error naming the file, and bfloat16 needs no torch.
"""

from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np

from converters.errors import CheckpointError

DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsFile:
    """Tensors of one file, read lazily: ``names()``, ``shape(name)``, ``get(name) -> np.ndarray``."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        if not os.path.isfile(self.path):
            raise CheckpointError(self.path, "file not found")
        size = os.path.getsize(self.path)
        try:
            with open(self.path, "rb") as f:
                raw = f.read(8)
                if len(raw) < 8:
                    raise CheckpointError(self.path, "truncated: no safetensors header")
                (header_len,) = struct.unpack("<Q", raw)
                if header_len > min(_MAX_HEADER, size - 8):
                    raise CheckpointError(self.path, "corrupt or truncated safetensors header")
                header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(self.path, f"corrupt safetensors header ({e})") from None
        header.pop("__metadata__", None)
        data_start = 8 + header_len
        self._entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            try:
                dtype = np.dtype(DTYPES[info["dtype"]])
                shape = tuple(int(d) for d in info["shape"])
                begin, end = (int(x) for x in info["data_offsets"])
            except KeyError as e:
                raise CheckpointError(self.path, f"tensor {name!r}: unsupported or missing field {e}") from None
            if end - begin != dtype.itemsize * int(np.prod(shape, dtype=np.int64)):
                raise CheckpointError(self.path, f"tensor {name!r}: size does not match its shape")
            if data_start + end > size:
                raise CheckpointError(
                    self.path, f"truncated: tensor {name!r} ends at byte {data_start + end}, file has {size}"
                )
            self._entries[name] = (dtype, shape, data_start + begin, data_start + end)
        self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r") if size > data_start else None

    def names(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def get(self, name: str) -> np.ndarray:
        dtype, shape, begin, end = self._entries[name]
        if begin == end:
            return np.zeros(shape, dtype)
        return self._mmap[begin:end].view(dtype).reshape(shape)
