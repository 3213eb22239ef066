"""Weight quantization of a float parameter tree: RTN for all decoder linears, and AWQ's
activation-aware scaling before it.

AWQ (Lin et al. 2023): channels of a linear layer's input that carry large activations matter
more, so before rounding, each input channel ``c`` of a weight is multiplied by
``s_c = mean|x_c| ** alpha`` and the op that feeds the layer divides its output by ``s_c``
(a norm's scale, or the previous linear's output columns): the float model is unchanged, but the
important weights get finer quantization steps. ``alpha`` is searched per group of linears sharing
an input, minimizing the output error on calibration activations (``--search-scale``), or fixed
at 0.5.

Activations come from running the model itself in JAX, one decoder layer at a time over the
calibration batch, so memory holds one layer's activations, never the whole model's.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from converters.rtn import dequantize_kernel, quantize_kernel
from jaxinfer.config import ModelConfig, WeightQuant
from jaxinfer.kv_cache import KVCache
from jaxinfer.model import DecoderLayer, Linear, rope_rotation
from jaxinfer.scoring import contiguous_metadata

LINEARS = ("attn/q_proj", "attn/k_proj", "attn/v_proj", "attn/o_proj", "mlp/gate_proj", "mlp/up_proj", "mlp/down_proj")
ALPHA_GRID = np.linspace(0.0, 1.0, 21)
FIXED_ALPHA = 0.5
# Calibration rows kept per linear input for the scale search (the mean |x| uses every token).
SEARCH_TOKENS = 1024


@dataclass(frozen=True)
class ScaleGroup:
    """Linears that share an input, and where the inverse scale is folded in: a norm's scale
    (``prev_norm``) or a linear's output columns (``prev_linear``)."""

    linears: tuple[str, ...]
    prev_norm: str | None = None
    prev_linear: str | None = None


def scale_groups(config: ModelConfig) -> list[ScaleGroup]:
    groups = [
        ScaleGroup(("attn/q_proj", "attn/k_proj", "attn/v_proj"), prev_norm="input_norm"),
        ScaleGroup(("mlp/gate_proj", "mlp/up_proj"), prev_norm="post_attention_norm"),
        ScaleGroup(("mlp/down_proj",), prev_linear="mlp/up_proj"),
    ]
    if config.num_heads == config.num_kv_heads:  # o's inputs map one to one on v's outputs
        groups.append(ScaleGroup(("attn/o_proj",), prev_linear="attn/v_proj"))
    return groups


def _get(tree: dict, path: str) -> dict:
    for key in path.split("/"):
        tree = tree[key]
    return tree


def quantize_params(params: dict, config: ModelConfig, bits: int, group_size: int, method: str,
                    progress: bool = True) -> tuple[dict, ModelConfig]:
    """Every decoder linear of a float numpy tree RTN-quantized; embeddings, norms, LM head kept."""
    out = jax.tree.map(lambda a: a, params)  # new dicts, same leaves
    for i in tqdm(range(config.num_layers), desc="quantizing layers", unit="layer", disable=not progress):
        layer = out[f"layers_{i}"]
        for path in LINEARS:
            module = _get(layer, path)
            kernel = np.asarray(module.pop("kernel"), np.float32)
            module.update(quantize_kernel(kernel, bits, group_size))
    return out, dataclasses.replace(config, weight_quant=WeightQuant(bits, group_size, method))


class _LayerRunner:
    """One decoder layer over a batch of sequences, returning the input of every linear."""

    def __init__(self, config: ModelConfig, batch: int, seqlen: int):
        self.config, self.batch, self.seqlen = config, batch, seqlen
        self.meta = contiguous_metadata([seqlen] * batch, seqlen)
        self._run = jax.jit(self._forward)

    def _forward(self, layer_params, x):
        captured = {}

        def capture(next_fun, args, kwargs, context):
            if isinstance(context.module, Linear) and context.method_name == "__call__":
                captured["/".join(context.module.path[-2:])] = args[0]
            return next_fun(*args, **kwargs)

        cfg = dataclasses.replace(self.config, num_layers=1)
        cache = KVCache.allocate(cfg, self.batch + 1, self.seqlen, jnp.float32)
        with nn.intercept_methods(capture):
            rotation = rope_rotation(self.meta.positions, self.config.rope_inv_freq())
            y, _ = DecoderLayer(self.config).apply({"params": layer_params}, x, cache.layers[0], self.meta, rotation)
        return y, captured

    def __call__(self, layer_params, x: np.ndarray):
        return self._run(layer_params, jnp.asarray(x))


def _best_scale(weights: list[np.ndarray], x: np.ndarray, x_absmean: np.ndarray, bits: int, group_size: int,
                search: bool) -> np.ndarray:
    """The per-input-channel scale minimizing the group's output error after quantization."""
    reference = [x @ w for w in weights]
    best, best_err = None, np.inf
    for alpha in ALPHA_GRID if search else [FIXED_ALPHA]:
        s = np.maximum(x_absmean, 1e-8) ** alpha
        s = np.maximum(s / np.sqrt(s.max() * s.min()), 1e-4).astype(np.float32)
        err = 0.0
        for w, ref in zip(weights, reference):
            deq = dequantize_kernel(quantize_kernel(w * s[:, None], bits, group_size), len(w)) / s[:, None]
            err += float(np.sum((x @ deq - ref) ** 2))
        if err < best_err:
            best, best_err = s, err
    return best


def _apply_scale(layer: dict, group: ScaleGroup, s: np.ndarray) -> None:
    for path in group.linears:
        module = _get(layer, path)
        module["kernel"] = np.asarray(module["kernel"], np.float32) * s[:, None]
    if group.prev_norm:
        norm = layer[group.prev_norm]
        norm["scale"] = np.asarray(norm["scale"], np.float32) / s
    else:
        prev = _get(layer, group.prev_linear)
        prev["kernel"] = np.asarray(prev["kernel"], np.float32) / s[None, :]
        if "bias" in prev:
            prev["bias"] = np.asarray(prev["bias"], np.float32) / s


def awq_scale(params: dict, config: ModelConfig, calib: np.ndarray, bits: int, group_size: int,
              search_scale: bool, batch_size: int, seed: int = 0, progress: bool = True) -> dict:
    """The float tree with AWQ's scales folded in (still unquantized: quantize_params follows).

    ``calib`` is ``[samples, seqlen]`` token ids; layers run ``batch_size`` samples at a time.
    """
    params = jax.tree.map(lambda a: np.array(a, np.float32), params)
    samples, seqlen = calib.shape
    runner = _LayerRunner(config, batch_size, seqlen)
    rng = np.random.default_rng(seed)
    keep = np.sort(rng.choice(samples * seqlen, size=min(SEARCH_TOKENS, samples * seqlen), replace=False))
    x = params["embed_tokens"][calib]  # [samples, seqlen, embed]
    for i in tqdm(range(config.num_layers), desc="AWQ layers", unit="layer", disable=not progress):
        layer = params[f"layers_{i}"]
        abs_sum: dict[str, np.ndarray] = {}
        rows: dict[str, list[np.ndarray]] = {}
        outputs = []
        for start in range(0, samples, batch_size):
            chunk = x[start : start + batch_size]
            n = len(chunk)
            if n < batch_size:  # the runner's shapes are fixed: pad the last batch
                chunk = np.concatenate([chunk, np.zeros((batch_size - n, *chunk.shape[1:]), np.float32)])
            y, captured = runner(layer, chunk)
            outputs.append(np.asarray(y)[:n])
            lo, hi = start * seqlen, (start + n) * seqlen
            picked = keep[(keep >= lo) & (keep < hi)] - lo
            for path, inp in captured.items():
                inp = np.asarray(inp)[:n].reshape(n * seqlen, -1)
                abs_sum[path] = abs_sum.get(path, 0.0) + np.abs(inp).sum(axis=0)
                rows.setdefault(path, []).append(inp[picked])
        for group in scale_groups(config):
            first = group.linears[0]
            x_search = np.concatenate(rows[first])
            weights = [np.asarray(_get(layer, p)["kernel"], np.float32) for p in group.linears]
            s = _best_scale(weights, x_search, abs_sum[first] / (samples * seqlen), bits, group_size, search_scale)
            _apply_scale(layer, group, s)
        x = np.concatenate(outputs)
    return params
