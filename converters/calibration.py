"""Text for calibration and evaluation: Python's own documentation (``pydoc_data.topics``), split so
that perplexity is never measured on what quantization was calibrated on, or a user's file."""

from __future__ import annotations

import json
import os

import numpy as np

from converters.errors import CheckpointError

# The first topics (in sorted order) calibrate; the rest are held out for evaluation.
CALIBRATION_FRACTION = 0.8


def pydoc_text(part: str) -> str:
    """English text from ``pydoc_data.topics``: ``part`` is "calibration" or "heldout"."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    cut = int(len(names) * CALIBRATION_FRACTION)
    chosen = names[:cut] if part == "calibration" else names[cut:] if part == "heldout" else None
    if chosen is None:
        raise ValueError(f"part must be 'calibration' or 'heldout', got {part!r}")
    return "\n\n".join(topics[n] for n in chosen)


def read_text(path: str) -> str:
    """A ``.jsonl`` file (its ``"text"`` fields, one record per line) or any text file."""
    if not os.path.isfile(path):
        raise CheckpointError(path, "file not found")
    try:
        with open(path, encoding="utf-8") as f:
            if path.endswith(".jsonl"):
                return "\n\n".join(json.loads(line)["text"] for line in f if line.strip())
            return f.read()
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise CheckpointError(path, f"cannot read text ({type(e).__name__}: {e})") from None


def calibration_tokens(tokenizer, source: str | None, samples: int, seqlen: int, seed: int = 0) -> np.ndarray:
    """``[samples, seqlen]`` token windows at random offsets of the calibration text."""
    text = pydoc_text("calibration") if source in (None, "pydoc") else read_text(source)
    ids = np.asarray(tokenizer.encode(text, add_special_tokens=False), np.int32)
    if len(ids) < seqlen + 1:
        raise ValueError(f"the calibration text has {len(ids)} tokens, fewer than --calib-seqlen {seqlen}")
    starts = np.random.default_rng(seed).integers(0, len(ids) - seqlen, size=samples)
    return np.stack([ids[s : s + seqlen] for s in starts])
