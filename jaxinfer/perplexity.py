"""Perplexity over a text, computed the way llama.cpp's ``llama-perplexity`` does.

The tokens are cut into non-overlapping windows of ``ctx``; each window's first token becomes BOS
(when the model has one) and only its second half is scored: every scored token has at least
``ctx / 2`` tokens of context, so the figure compares with llama.cpp's for the same ``ctx``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from tqdm.auto import tqdm

from jaxinfer.config import ModelConfig
from jaxinfer.scoring import sequence_logits


@dataclass(frozen=True)
class Perplexity:
    value: float
    windows: int
    scored_tokens: int


def perplexity(config: ModelConfig, params: Any, tokens: Sequence[int], ctx: int = 512, quant_policy: int = 0,
               batch: int = 4, dtype=np.float32, progress: bool = True) -> Perplexity:
    tokens = np.asarray(tokens, np.int32)
    n_windows = len(tokens) // ctx
    if n_windows < 1:
        raise ValueError(f"the text has {len(tokens)} tokens, fewer than one window of {ctx}")
    first = ctx // 2
    nll, count = 0.0, 0
    windows = [tokens[i * ctx : (i + 1) * ctx].copy() for i in range(n_windows)]
    if config.bos_token_id is not None:
        for w in windows:
            w[0] = config.bos_token_id
    for start in tqdm(range(0, n_windows, batch), desc="perplexity", unit="batch", disable=not progress):
        chunk = windows[start : start + batch]
        for w, logits in zip(chunk, sequence_logits(config, params, chunk, dtype, quant_policy)):
            scored = logits[first : ctx - 1].astype(np.float64)
            peak = scored.max(axis=-1, keepdims=True)
            log_z = np.log(np.exp(scored - peak).sum(axis=-1)) + peak[:, 0]
            nll += float(np.sum(log_z - scored[np.arange(len(scored)), w[first + 1 :]]))
            count += len(scored)
    return Perplexity(value=float(np.exp(nll / count)), windows=n_windows, scored_tokens=count)
