"""Unfold a layer's input into the rows X the weight multiplies (exact im2col), per group.

For a Conv, row r of group g holds the input patch that output pixel r reads, flattened in the order
``(Cin/g, kh, kw)`` so that ``X_g @ W_g.T`` is the Conv output. Gemm/MatMul inputs are flattened to rows.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from .layers import Layer


def unfold(layer: Layer, x: np.ndarray) -> np.ndarray:
    """Rows of the layer's input, shape ``(groups, rows, fan_in)``."""
    if layer.op_type == "Conv":
        return unfold_conv(x, layer.conv, layer.groups)
    if layer.op_type == "Gemm" and layer.trans_a:
        x = x.T
    return x.reshape(1, -1, x.shape[-1])


def conv_pads(in_spatial: tuple[int, ...], conv: dict) -> list[int]:
    """Explicit begin/end pads, resolving ``auto_pad`` SAME_UPPER/SAME_LOWER/VALID as ONNX defines them."""
    spatial = len(in_spatial)
    mode = conv.get("auto_pad", "NOTSET")
    if mode in ("NOTSET", ""):
        return list(conv["pads"])
    if mode == "VALID":
        return [0] * 2 * spatial
    begins, ends = [], []
    for size, k, s, d in zip(in_spatial, conv["kernel_shape"], conv["strides"], conv["dilations"], strict=True):
        out = -(-size // s)
        total = max(0, (out - 1) * s + (k - 1) * d + 1 - size)
        small, large = total // 2, total - total // 2
        begins.append(small if mode == "SAME_UPPER" else large)
        ends.append(large if mode == "SAME_UPPER" else small)
    return begins + ends


def unfold_conv(x: np.ndarray, conv: dict, groups: int) -> np.ndarray:
    """im2col of an NCHW (or NCW) input with the operator's stride, padding, dilation and groups."""
    if x.ndim == 3:  # 1-D Conv: treat as 2-D with height 1
        conv = dict(kernel_shape=[1, *conv["kernel_shape"]], strides=[1, *conv["strides"]],
                    dilations=[1, *conv["dilations"]], pads=_pads_1d_as_2d(conv_pads(x.shape[2:], conv)))
        x = x[:, :, None, :]
    n, c = x.shape[:2]
    kh, kw = conv["kernel_shape"]
    sh, sw = conv["strides"]
    dh, dw = conv["dilations"]
    top, left, bottom, right = conv_pads(x.shape[2:], conv)
    if kh == kw == 1 and sh == sw == 1 and not any((top, left, bottom, right)):
        patches = x[:, :, :, :, None, None]  # a 1x1 Conv reads each pixel as it is
    else:
        padded = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
        span = (dh * (kh - 1) + 1, dw * (kw - 1) + 1)
        windows = sliding_window_view(padded, span, axis=(2, 3))
        patches = windows[:, :, ::sh, ::sw, ::dh, ::dw]
    ho, wo = patches.shape[2:4]
    grouped = patches.reshape(n, groups, c // groups, ho, wo, kh, kw)
    rows = grouped.transpose(1, 0, 3, 4, 2, 5, 6)
    return rows.reshape(groups, n * ho * wo, (c // groups) * kh * kw)


def _pads_1d_as_2d(pads: list[int]) -> list[int]:
    begin, end = pads
    return [0, begin, 0, end]
