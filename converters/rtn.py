"""Round-to-nearest group quantization of linear kernels into the packed format of
``pallas_kernels.int4_matmul`` (asymmetric: per group a scale and the group's minimum as bias)."""

from __future__ import annotations

import numpy as np

from pallas_kernels.int4_matmul import dequantize, pack_int4, padded_rows


def quantize_kernel(w: np.ndarray, bits: int, group_size: int) -> dict[str, np.ndarray]:
    """``w`` ``[in, out]`` float -> ``{"qweight", "scales", "biases"}`` (float32 scales/biases).

    A partial last group is padded with copies of its last row, which leave its range as it is."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    n_in, n_out = w.shape
    rows = padded_rows(n_in, group_size)
    w = np.concatenate([w, np.repeat(w[-1:], rows - n_in, axis=0)]) if rows > n_in else w
    levels = 2**bits - 1
    g = w.astype(np.float32).reshape(rows // group_size, group_size, n_out)
    lo, hi = g.min(axis=1), g.max(axis=1)
    scales = (hi - lo) / levels
    scales = np.where(scales > 0, scales, 1.0).astype(np.float32)
    codes = np.clip(np.rint((g - lo[:, None, :]) / scales[:, None, :]), 0, levels).reshape(rows, n_out)
    if bits == 4:
        qweight = pack_int4(codes.astype(np.uint8))
    else:  # int8 codes hold 0..255 shifted to -128..127; the bias absorbs the shift
        qweight = (codes - 128).astype(np.int8)
        lo = lo + 128 * scales
    return {"qweight": qweight, "scales": scales, "biases": lo.astype(np.float32)}


def dequantize_kernel(q: dict[str, np.ndarray], n_in: int) -> np.ndarray:
    """``[n_in, out]`` float32: the inverse of ``quantize_kernel`` up to rounding."""
    return np.asarray(dequantize(q["qweight"], q["scales"], q["biases"], n_in))
