"""Engine options: one definition, shared by the Python API, `jaxinfer chat` and `jaxinfer serve`.

Each field carries its command-line help; ``add_engine_args`` turns the dataclass into flags and
``EngineConfig.from_args`` back, so a new option is added in exactly one place.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field

from jaxinfer.config import KV_CACHE_DTYPES


def _opt(default, help: str):
    return field(default=default, metadata={"help": help})


def parse_cache_max_entry_count(value: str | float | int) -> float | int:
    """A fraction of the memory left after weights (float) or a number of pages (int)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = value
    else:
        text = str(value)
        number = float(text) if any(c in text for c in ".eE") else int(text)
    if isinstance(number, float) and not 0 < number <= 1:
        raise ValueError(f"cache_max_entry_count as a fraction must be in (0, 1], got {number}")
    if isinstance(number, int) and number < 2:
        raise ValueError(f"cache_max_entry_count as a page count must be >= 2, got {number}")
    return number


@dataclass(frozen=True)
class EngineConfig:
    max_batch_size: int = _opt(32, "most sequences decoded together in one step")
    max_prefill_tokens: int = _opt(512, "most prompt tokens computed in one step (chunked prefill)")
    cache_block_seq_len: int = _opt(64, "tokens per KV cache page")
    cache_max_entry_count: float | int = _opt(
        0.8, "KV cache size: a fraction of the memory left after the weights (float) or a number of pages (int)"
    )
    session_len: int | None = _opt(None, "longest sequence (prompt + output); default: the model's context length")
    enable_prefix_caching: bool = _opt(False, "share KV pages between requests with a common prefix")
    quant_policy: int = _opt(0, "KV cache quantization: 0 (off), 8 (int8) or 4 (int4), per token per head")
    kv_cache_dtype: str = _opt("auto", "dtype of the KV cache when not quantized: auto (the weights'), "
                                       "float32 or bfloat16")
    async_scheduling: bool = _opt(True, "send a decode step to the device before reading the tokens of the one "
                                        "before, so that host work overlaps device work")

    def __post_init__(self):
        object.__setattr__(self, "cache_max_entry_count", parse_cache_max_entry_count(self.cache_max_entry_count))
        for name in ("max_batch_size", "max_prefill_tokens", "cache_block_seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.quant_policy not in (0, 4, 8):
            raise ValueError(f"quant_policy must be 0, 4 or 8, got {self.quant_policy}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {self.kv_cache_dtype!r}")
        if self.session_len is not None and self.session_len < 2:
            raise ValueError(f"session_len must be >= 2, got {self.session_len}")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "EngineConfig":
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def add_engine_args(parser: argparse.ArgumentParser, **defaults) -> None:
    """Add one ``--flag`` per EngineConfig field; ``defaults`` overrides a command's defaults."""
    group = parser.add_argument_group("engine")
    for f in dataclasses.fields(EngineConfig):
        flag = "--" + f.name.replace("_", "-")
        default = defaults.get(f.name, f.default)
        help_text = f"{f.metadata['help']} (default: {default})"
        if f.type in ("bool", bool):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        elif f.name == "cache_max_entry_count":
            group.add_argument(flag, type=parse_cache_max_entry_count, default=default, help=help_text)
        elif f.name == "quant_policy":
            group.add_argument(flag, type=int, choices=(0, 4, 8), default=default, help=help_text)
        elif f.name == "kv_cache_dtype":
            group.add_argument(flag, choices=KV_CACHE_DTYPES, default=default, help=help_text)
        else:
            group.add_argument(flag, type=int, default=default, help=help_text)
