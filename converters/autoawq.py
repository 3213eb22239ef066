"""HF AutoAWQ checkpoints (``quant_method: awq``, GEMM version) into jaxinfer's packed format.

AutoAWQ stores a linear layer as ``qweight`` int32 ``[in, out // 8]`` (eight 4-bit codes per word
along ``out``, in the order ``AWQ_ORDER``), ``qzeros`` int32 ``[in // group, out // 8]`` packed the
same way, and float16 ``scales`` ``[in // group, out]``: ``W = (q - zero) * scale``. That is our
format with ``bias = -zero * scale``, the codes repacked along ``in``: exact, nothing re-rounded.
"""

from __future__ import annotations

import numpy as np

from converters.errors import CheckpointError
from pallas_kernels.int4_matmul import pack_int4

# Nibble i of an AutoAWQ word holds column AWQ_ORDER[i] of its group of eight.
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def unpack_awq(packed: np.ndarray) -> np.ndarray:
    """int32 ``[rows, cols // 8]`` in AutoAWQ's order -> uint8 codes ``[rows, cols]``."""
    words = packed.astype(np.uint32)
    codes = np.empty((words.shape[0], words.shape[1], 8), np.uint8)
    for nibble, column in enumerate(AWQ_ORDER):
        codes[:, :, column] = (words >> np.uint32(4 * nibble)) & 0xF
    return codes.reshape(words.shape[0], -1)


def awq_config(hf_config: dict) -> tuple[int, int] | None:
    """(bits, group_size) of an AutoAWQ config.json, None if it is not one."""
    q = hf_config.get("quantization_config") or {}
    if q.get("quant_method") != "awq":
        return None
    bits, group = int(q.get("bits", q.get("w_bit", 4))), int(q.get("group_size", q.get("q_group_size", 128)))
    if bits != 4 or not q.get("zero_point", True) or str(q.get("version", "gemm")).lower() != "gemm":
        raise ValueError(f"only 4-bit GEMM AutoAWQ checkpoints with zero points are supported, got {q}")
    return bits, group


def linear(source, prefix: str) -> dict[str, np.ndarray]:
    """The packed ``[in, out]`` weight of the AutoAWQ linear ``prefix`` (e.g. ``model.layers.0.mlp.up_proj``)."""
    try:
        qweight, qzeros, scales = (source.get(f"{prefix}.{n}") for n in ("qweight", "qzeros", "scales"))
    except KeyError as e:
        raise CheckpointError(source.path, f"missing AutoAWQ tensor {e} of {prefix}") from None
    codes = unpack_awq(qweight)
    zeros = unpack_awq(qzeros).astype(np.float32)
    scales = np.asarray(scales, np.float32)
    if codes.shape[0] % scales.shape[0] or zeros.shape != scales.shape:
        raise CheckpointError(source.path, f"{prefix}: qweight {qweight.shape}, qzeros {qzeros.shape} and "
                                           f"scales {scales.shape} do not fit together")
    return {"qweight": pack_int4(codes), "scales": scales, "biases": -zeros * scales}
