"""Depthwise Convs on small maps (7 x 7): fold the Gram matrix of whole input images into the kernel's.

On a 7 x 7 map a 5x5 depthwise kernel's im2col copies every value 25 times and multiplies 25-column rows, a shape
BLAS runs slowly. Every patch is a subset of its image, so the patch Gram matrix is a fixed linear function of the
image Gram matrix ``B = sum_n x_n x_n^T`` (49 x 49 per channel, one GEMM over the samples):
``H[t, u] = sum_i B[pos(i, t), pos(i, u)]`` over the output pixels ``i`` whose taps ``t`` and ``u`` both read
the image (not its padding). That fold is one more GEMM, against a 0/1 count matrix built once per geometry.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from onnxq.calibration.unfold import Window

IMAGE_GRAM_MAX_PIXELS = 64  # maps up to 8 x 8: beyond, the image Gram matrix costs more than the im2col one
IMAGE_CHUNK_ELEMENTS = 1 << 22  # image Gram values built at once (16 MB)


@dataclass(frozen=True)
class Fold:
    """How the image Gram matrix (upper triangle, flattened) and the image sums map to the kernel's."""

    upper: tuple[np.ndarray, np.ndarray]  # row and column of each upper-triangle entry of B
    pairs: np.ndarray  # (upper entries, tap pairs) float32: output pixels reading that pair of positions
    pair_of: np.ndarray  # (taps, taps): index of the tap pair (t, u) or (u, t)
    sums: np.ndarray  # (pixels, taps) float32: output pixels whose tap reads that position


@lru_cache(maxsize=32)
def fold(window: Window, image: tuple[int, int], pads: tuple[int, int], out: tuple[int, int]) -> Fold:
    """The fold of a depthwise window on an unpadded image (height, width) with (top, left) padding."""
    (kh, kw), (sh, sw), (dh, dw) = window.kernel, window.strides, window.dilations
    rows = np.arange(out[0])[:, None, None, None] * sh + np.arange(kh)[None, None, :, None] * dh - pads[0]
    cols = np.arange(out[1])[None, :, None, None] * sw + np.arange(kw)[None, None, None, :] * dw - pads[1]
    inside = (rows >= 0) & (rows < image[0]) & (cols >= 0) & (cols < image[1])
    position = np.where(inside, rows * image[1] + cols, -1).reshape(out[0] * out[1], kh * kw)  # (pixels, taps)
    pixels, taps = image[0] * image[1], kh * kw
    upper = np.triu_indices(pixels)
    upper_index = np.full((pixels, pixels), -1)
    upper_index[upper] = np.arange(len(upper[0]))
    first, second = np.triu_indices(taps)
    pair_of = np.zeros((taps, taps), np.intp)
    pair_of[first, second] = pair_of[second, first] = np.arange(len(first))
    p, q = position[:, first], position[:, second]  # (output pixels, tap pairs)
    read = (p >= 0) & (q >= 0)
    entry = upper_index[np.minimum(p, q)[read], np.maximum(p, q)[read]]
    pairs = np.zeros((len(upper[0]), len(first)), np.float32)
    np.add.at(pairs, (entry, np.nonzero(read)[1]), 1)
    sums = np.zeros((pixels, taps), np.float32)
    valid = position >= 0
    np.add.at(sums, (position[valid], np.nonzero(valid)[1]), 1)
    return Fold(upper, pairs, pair_of, sums)


def fits(image: tuple[int, ...]) -> bool:
    """Whether a depthwise layer's (2-D) input map is small enough for the image Gram matrix."""
    return len(image) == 2 and image[0] * image[1] <= IMAGE_GRAM_MAX_PIXELS


def add_image_gram(gram: np.ndarray, row_sum: np.ndarray, x: np.ndarray, window: Window, pads: tuple[int, int],
                   out: tuple[int, int]) -> None:
    """Add a depthwise Conv's Gram matrices (G, taps, taps) and row sums (G, taps) for a batch of its unpadded
    input (n, G, H, W), through the image Gram matrices (module docstring)."""
    n, channels, height, width = x.shape
    plan = fold(window, (height, width), pads, out)
    images = x.reshape(n, channels, height * width)
    step = max(1, IMAGE_CHUNK_ELEMENTS // (height * width) ** 2)
    for start in range(0, channels, step):
        chunk = slice(start, start + step)
        columns = np.ascontiguousarray(images[:, chunk].transpose(1, 0, 2))  # (c, n, pixels)
        image_gram = np.matmul(columns.transpose(0, 2, 1), columns)  # (c, pixels, pixels)
        folded = image_gram[:, plan.upper[0], plan.upper[1]] @ plan.pairs  # (c, tap pairs)
        gram[chunk] += folded[:, plan.pair_of]
        row_sum[chunk] += columns.sum(axis=1) @ plan.sums
