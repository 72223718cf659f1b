"""Unfold a layer's input into the rows X the weight multiplies (exact im2col), per group.

For a Conv, row r of group g holds the input patch that output pixel r reads, flattened in the order
``(Cin/g, kh, kw)`` so that ``X_g @ W_g.T`` is the Conv output. Gemm/MatMul inputs are flattened to rows.
The patches are built as columns ``(groups, fan_in, rows)`` with one copy per kernel tap, each reading
whole output rows of the padded input; the row view is their transpose.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from onnxq.graph.layers import Layer


@dataclass(frozen=True)
class Window:
    """The 2-D sliding window of a Conv on its padded input (a 1-D Conv has height 1)."""

    kernel: tuple[int, int]
    strides: tuple[int, int]
    dilations: tuple[int, int]

    def out_shape(self, padded: tuple[int, ...]) -> tuple[int, int]:
        """Output pixels per axis on a padded input of that (height, width)."""
        return tuple(max(0, (size - (k - 1) * d - 1) // s + 1) for size, k, s, d in zip(
            padded, self.kernel, self.strides, self.dilations, strict=True))


def unfold(layer: Layer, x: np.ndarray) -> np.ndarray:
    """Rows of the layer's input, shape ``(groups, rows, fan_in)`` (a transposed view of the columns)."""
    return unfold_columns(layer, x).transpose(0, 2, 1)


def unfold_columns(layer: Layer, x: np.ndarray) -> np.ndarray:
    """Rows of the layer's input as columns, shape ``(groups, fan_in, rows)``."""
    if layer.op_type == "Conv":
        padded, window = padded_input(x, layer.conv)
        return patch_columns(padded, window, window.out_shape(padded.shape[2:]), layer.groups)
    if layer.op_type == "Gemm" and layer.trans_a:
        x = x.T
    return x.reshape(-1, x.shape[-1]).T[None]


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


def padded_input(x: np.ndarray, conv: dict) -> tuple[np.ndarray, Window]:
    """The NCHW input with the Conv's padding applied (a 1-D NCW input gets height 1), and its window."""
    pads = conv_pads(x.shape[2:], conv)
    kernel, strides, dilations = conv["kernel_shape"], conv["strides"], conv["dilations"]
    if x.ndim == 3:  # 1-D Conv: treat as 2-D with height 1
        x, pads = x[:, :, None, :], [0, pads[0], 0, pads[1]]
        kernel, strides, dilations = [1, *kernel], [1, *strides], [1, *dilations]
    top, left, bottom, right = pads
    if any(pads):  # zeros (lazily zeroed pages) and one copy: faster than np.pad's copy and border fills
        n, c, height, width = x.shape
        padded = np.zeros((n, c, top + height + bottom, left + width + right), x.dtype)
        padded[:, :, top:top + height, left:left + width] = x
        x = padded
    return x, Window(tuple(kernel), tuple(strides), tuple(dilations))


def patch_columns(padded: np.ndarray, window: Window, out_shape: tuple[int, int], groups: int) -> np.ndarray:
    """im2col as columns ``(groups, Cin/g * kh * kw, n * ho * wo)`` for the first ``out_shape`` output pixels
    of the window on the padded input: one strided copy per kernel tap."""
    n, c = padded.shape[:2]
    (kh, kw), (sh, sw), (dh, dw) = window.kernel, window.strides, window.dilations
    ho, wo = out_shape
    columns = np.empty((groups, c // groups, kh, kw, n, ho, wo), padded.dtype)
    for i in range(kh):
        for j in range(kw):
            taps = padded[:, :, i * dh:i * dh + (ho - 1) * sh + 1:sh, j * dw:j * dw + (wo - 1) * sw + 1:sw]
            columns[:, :, i, j] = taps.reshape(n, groups, c // groups, ho, wo).transpose(1, 2, 0, 3, 4)
    return columns.reshape(groups, -1, n * ho * wo)



def patch_rows(padded: np.ndarray, window: Window, out_shape: tuple[int, int], groups: int) -> np.ndarray:
    """im2col as rows ``(groups, n * ho * wo, Cin/g * kh * kw)``, copied at once from a sliding-window view:
    faster than :func:`patch_columns` when the window is large and the taps strided (tiles of output pixels)."""
    n, c = padded.shape[:2]
    (kh, kw), (sh, sw), (dh, dw) = window.kernel, window.strides, window.dilations
    ho, wo = out_shape
    span = ((kh - 1) * dh + 1, (kw - 1) * dw + 1)
    windows = sliding_window_view(padded, span, axis=(2, 3))[:, :, ::sh, ::sw, ::dh, ::dw][:, :, :ho, :wo]
    grouped = windows.reshape(n, groups, c // groups, ho, wo, kh, kw).transpose(1, 0, 3, 4, 2, 5, 6)
    return np.ascontiguousarray(grouped).reshape(groups, n * ho * wo, (c // groups) * kh * kw)
