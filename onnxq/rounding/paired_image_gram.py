"""Paired depthwise statistics on small maps (up to 8 x 8, ``image_gram.fits``): image Gram matrices summed over
every batch, folded onto the kernel's taps once per layer.

Every patch of a depthwise Conv is a subset of its input image, so both paired sums are fixed linear functions of
the image products ``B = sum_n x~_n x~_n^T`` and ``B_x = sum_n x~_n x_n^T`` (pixels x pixels per channel):
``H[t, u] = sum_i B[pos(i, t), pos(i, u)]`` over the output pixels ``i`` whose taps t and u both read the image.
The fold is linear, so it runs once on the float64 totals instead of once per batch; a batch then costs two small
GEMMs over its samples (for a 7 x 7 map with a 5x5 kernel about a tenth of the tiled im2col products). The cross
products are not symmetric, so the fold reads the whole of ``B_x`` (a sparse 0/1 matrix, built once per geometry).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import sparse

from onnxq.calibration.unfold import Window, conv_pads


@dataclass(frozen=True)
class ImageGeometry:
    """A depthwise Conv on an unpadded image: its window, (top, left) padding and output pixels per axis."""

    window: Window
    image: tuple[int, int]
    pads: tuple[int, int]
    out: tuple[int, int]

    @classmethod
    def of(cls, image: tuple[int, int], conv: dict) -> ImageGeometry:
        top, left, bottom, right = conv_pads(image, conv)
        window = Window(tuple(conv["kernel_shape"]), tuple(conv["strides"]), tuple(conv["dilations"]))
        return cls(window, image, (top, left), window.out_shape((image[0] + top + bottom, image[1] + left + right)))

    @property
    def rows(self) -> int:
        """Output pixels per sample (the rows one sample adds)."""
        return self.out[0] * self.out[1]


@dataclass
class ImageSums:
    """Sums over samples of a depthwise layer's input images, per channel: ``x~ x~^T`` and ``x~ x^T`` (G, P, P),
    ``x~`` and ``x`` (G, P)."""

    gram: np.ndarray
    cross: np.ndarray
    sum_quantized: np.ndarray
    sum_float: np.ndarray

    @classmethod
    def of_batch(cls, x_quantized: np.ndarray, x_float: np.ndarray) -> ImageSums:
        """One batch's sums (n, G, H, W) of both streams: float32 products over its samples, float64 sums."""
        n, channels = x_quantized.shape[:2]
        images_q = np.ascontiguousarray(x_quantized.reshape(n, channels, -1).transpose(1, 0, 2))  # (G, n, P)
        images_f = np.ascontiguousarray(x_float.reshape(n, channels, -1).transpose(1, 0, 2))
        transposed = images_q.transpose(0, 2, 1)
        return cls(np.matmul(transposed, images_q), np.matmul(transposed, images_f),
                   images_q.sum(axis=1, dtype=np.float64), images_f.sum(axis=1, dtype=np.float64))

    def add(self, part: ImageSums, shift: int) -> None:
        """Add the sums of inputs that were divided by ``2**shift``."""
        for total, value, power in ((self.gram, part.gram, 2), (self.cross, part.cross, 2),
                                    (self.sum_quantized, part.sum_quantized, 1), (self.sum_float, part.sum_float, 1)):
            total += np.ldexp(value.astype(np.float64), power * shift) if shift else value

    @property
    def finite(self) -> bool:
        return all(np.isfinite(value).all() for value in (self.gram, self.cross, self.sum_quantized, self.sum_float))

    def zeros_like(self) -> ImageSums:
        """float64 totals to add batches to."""
        return ImageSums(*(np.zeros(value.shape) for value in (self.gram, self.cross, self.sum_quantized,
                                                                self.sum_float)))

    def folded(self, geometry: ImageGeometry) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The layer's paired sums ``(gram, cross, sum_quantized, sum_float)``: (G, taps, taps) and (G, taps)."""
        pairs, sums = tap_fold(geometry)
        channels, taps = len(self.gram), sums.shape[1]

        def fold(products: np.ndarray) -> np.ndarray:
            return np.asarray(pairs.T @ products.reshape(channels, -1).T).T.reshape(channels, taps, taps)

        return fold(self.gram), fold(self.cross), self.sum_quantized @ sums, self.sum_float @ sums


def tap_positions(geometry: ImageGeometry) -> np.ndarray:
    """(output pixels, taps): the image pixel each tap of each output pixel reads, -1 where it reads padding."""
    (kh, kw), (sh, sw), (dh, dw) = geometry.window.kernel, geometry.window.strides, geometry.window.dilations
    (height, width), (top, left), out = geometry.image, geometry.pads, geometry.out
    rows = np.arange(out[0])[:, None, None, None] * sh + np.arange(kh)[None, None, :, None] * dh - top
    cols = np.arange(out[1])[None, :, None, None] * sw + np.arange(kw)[None, None, None, :] * dw - left
    inside = (rows >= 0) & (rows < height) & (cols >= 0) & (cols < width)
    return np.where(inside, rows * width + cols, -1).reshape(out[0] * out[1], kh * kw)


@lru_cache(maxsize=32)
def tap_fold(geometry: ImageGeometry) -> tuple[sparse.csr_matrix, np.ndarray]:
    """The fold: (pixels^2, taps^2) sparse counts of output pixels whose taps (t, u) read pixels (p, q), and
    (pixels, taps) counts of output pixels whose tap t reads pixel p."""
    position = tap_positions(geometry)
    pixels, taps = geometry.image[0] * geometry.image[1], position.shape[1]
    first, second = (index.ravel() for index in np.meshgrid(np.arange(taps), np.arange(taps), indexing="ij"))
    p, q = position[:, first], position[:, second]  # (output pixels, tap pairs)
    read = (p >= 0) & (q >= 0)
    pair = np.broadcast_to(first * taps + second, p.shape)[read]
    pairs = sparse.csr_matrix((np.ones(len(pair)), (p[read] * pixels + q[read], pair)),
                              shape=(pixels * pixels, taps * taps))  # duplicates are summed: the counts
    sums = np.zeros((pixels, taps))
    valid = position >= 0
    np.add.at(sums, (position[valid], np.nonzero(valid)[1]), 1)
    return pairs, sums
