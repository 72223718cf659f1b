"""Paired Gram kernels for sequential rounding: ``x~^T x~``, ``x~^T x`` and both row sums of one layer's
input rows, from the quantized-so-far stream (x~) and the float stream (x) of the same samples.

They use the layouts of ``calibration/gram.py``, so a pair costs about what the default's single Gram costs
twice: a pointwise Conv's pixels are columns (small images gathered a few samples at a time so one GEMM sees
up to ``GRAM_BLOCK_ROWS`` rows), other Convs build columns with one strided copy per kernel tap, and a
depthwise Conv multiplies tiles of output pixels as the columns of the window they read and folds the
window products back (see that module). Every product is a float32 BLAS call summed into float64. Depthwise
layers on small maps take ``paired_image_gram.py`` instead (``PairedStats`` routes them), those on large maps the
lagged maps of ``calibration/lag_gram.py``.
"""

from __future__ import annotations

import threading
from typing import NamedTuple

import numpy as np

from onnxq.calibration import lag_gram
from onnxq.calibration.gram import (
    COLUMN_CHUNK_ELEMENTS,
    GRAM_BLOCK_ROWS,
    column_elements,
    tap_index,
    tile_shape,
    tile_window,
)
from onnxq.calibration.unfold import Window, conv_pads, padded_input, patch_columns, patch_rows
from onnxq.rounding.paired_image_gram import ImageGeometry

_ONES = np.ones(GRAM_BLOCK_ROWS, np.float32)
# the lagged maps for kernels up to 3x3: a 5x5 kernel's cross products need 81 maps (its Gram 41), more than its
# window tiles cost (EfficientNet-Lite0 --sequential: 3 CPU s less with its 5x5 layers on tiles)
PAIRED_LAG_MAX_TAPS = 9
_FRAMES = threading.local()  # per stream: a zero-framed buffer the padded chunks are written into


class PairedSums(NamedTuple):
    """The accumulators one layer's pair of inputs is added to (float64, updated in place)."""

    gram: np.ndarray  # (G, d, d) sum x~ x~^T
    cross: np.ndarray  # (G, d, d) sum x~ x^T
    sum_quantized: np.ndarray  # (G, d)
    sum_float: np.ndarray  # (G, d)


def add_paired_columns(sums: PairedSums, columns_q: np.ndarray, columns_f: np.ndarray) -> int:
    """Add rows given as float32 columns ``(groups, d, rows)`` of both streams; return the rows added."""
    for start in range(0, columns_q.shape[2], GRAM_BLOCK_ROWS):
        block_q = columns_q[:, :, start:start + GRAM_BLOCK_ROWS]
        block_f = columns_f[:, :, start:start + GRAM_BLOCK_ROWS]
        sums.gram[...] += np.matmul(block_q, block_q.transpose(0, 2, 1))
        sums.cross[...] += np.matmul(block_q, block_f.transpose(0, 2, 1))
        sums.sum_quantized[...] += np.matmul(block_q, _ONES[:block_q.shape[2]])
        sums.sum_float[...] += np.matmul(block_f, _ONES[:block_f.shape[2]])
    return columns_q.shape[2]


def add_paired_pointwise(sums: PairedSums, x_q: np.ndarray, x_f: np.ndarray) -> int:
    """A 1x1 Conv's pixels ``(N, C, *spatial)``, a few samples gathered per GEMM when images are small."""
    pixels_q = x_q.reshape(x_q.shape[0], x_q.shape[1], -1)
    pixels_f = x_f.reshape(x_f.shape[0], x_f.shape[1], -1)
    per_block = GRAM_BLOCK_ROWS // max(pixels_q.shape[2], 1)
    if per_block <= 1:
        for sample_q, sample_f in zip(pixels_q, pixels_f, strict=True):
            add_paired_columns(sums, sample_q[None], sample_f[None])
    else:
        channels = pixels_q.shape[1]
        for start in range(0, pixels_q.shape[0], per_block):
            group_q, group_f = pixels_q[start:start + per_block], pixels_f[start:start + per_block]
            add_paired_columns(sums, group_q.transpose(1, 0, 2).reshape(1, channels, -1),
                               group_f.transpose(1, 0, 2).reshape(1, channels, -1))
    return pixels_q.shape[0] * pixels_q.shape[2]


def add_paired_conv(sums: PairedSums, x_q: np.ndarray, x_f: np.ndarray, conv: dict, groups: int) -> int:
    """A Conv's unfolded inputs, a few samples at a time (each stream's copy bounded as in the default). Each
    chunk is padded on its own: copies under glibc's 32 MB map threshold reuse freed heap memory, where a
    padded batch would be a fresh map whose pages the kernel zeroes on every call. Depthwise layers on large
    maps take the lagged maps instead (``add_paired_lagged``), kernels up to ``PAIRED_LAG_MAX_TAPS``."""
    taps = int(np.prod(conv["kernel_shape"]))
    if x_q.shape[1] == groups and lag_gram.fits(x_q, conv) and taps <= PAIRED_LAG_MAX_TAPS:
        return add_paired_lagged(sums, x_q, x_f, conv)
    first, window = padded_input(x_q[:1], conv)
    out = window.out_shape(first.shape[2:])
    n, channels = x_q.shape[:2]
    tile = tile_shape(window, out, n, channels, groups)
    step = max(1, COLUMN_CHUNK_ELEMENTS // max(column_elements(window, out, channels, tile), 1))
    for start in range(0, n, step):
        chunk_q = padded_chunk(x_q[start:start + step], conv, 0)
        chunk_f = chunk_q if x_f is x_q else padded_chunk(x_f[start:start + step], conv, 1)
        if tile is None:
            add_paired_columns(sums, patch_columns(chunk_q, window, out, groups),
                               patch_columns(chunk_f, window, out, groups))
        else:
            add_paired_tiled(sums, chunk_q, chunk_f, window, out, groups, tile)
    return n * out[0] * out[1]


def add_paired_lagged(sums: PairedSums, x_q: np.ndarray, x_f: np.ndarray, conv: dict) -> int:
    """A depthwise Conv from lagged dot products of the unpadded maps (``calibration/lag_gram.py``): the quantized
    stream's Gram matrix and row sums as the default computes them, the float stream's row sums, and the cross
    products of the two streams' maps (no im2col copy of either)."""
    geometry = ImageGeometry.of(x_q.shape[2:], conv)
    window, pads, out = geometry.window, geometry.pads, geometry.out
    lag_gram.add_lagged_gram(sums.gram, sums.sum_quantized, x_q, window, pads, out)
    lag_gram.add_lagged_cross(sums.cross, x_q, x_f, window, pads, out)
    sums.sum_float[...] += lag_gram.tap_sums(x_f, *lag_gram.axes(x_f.shape[2:], window, pads, out))
    return x_q.shape[0] * geometry.rows


def padded_chunk(x: np.ndarray, conv: dict, stream: int) -> np.ndarray:
    """A chunk's padded input (``unfold.padded_input``) written into the stream's reused buffer: its frame of
    zeros stays from the chunk before, so only the interior is copied (no zero fill, no fresh memory)."""
    if x.ndim != 4 or not any(conv_pads(x.shape[2:], conv)):
        return padded_input(x, conv)[0]
    top, left, bottom, right = conv_pads(x.shape[2:], conv)
    n, c, height, width = x.shape
    shape = (c, top + height + bottom, left + width + right)
    frames = getattr(_FRAMES, "buffers", None) or [None, None]
    frame = frames[stream]
    if frame is None or frame.shape[1:] != shape or len(frame) < n or frame.dtype != x.dtype:
        frame = frames[stream] = np.zeros((n, *shape), x.dtype)
    _FRAMES.buffers = frames
    padded = frame[:n]
    padded[:, :, top:top + height, left:left + width] = x
    return padded


def release_frames() -> None:
    """Drop this thread's padded-chunk buffers (at the end of a sequential run)."""
    _FRAMES.buffers = None


def add_paired_tiled(sums: PairedSums, padded_q: np.ndarray, padded_f: np.ndarray, window: Window,
                     out: tuple[int, int], groups: int, tile: tuple[int, int]) -> None:
    """A depthwise Conv tile by tile: the window products of both streams folded back onto the kernel taps
    (``calibration.gram.add_tiled``); the pixels that do not fill a tile go through the direct GEMMs."""
    tiled = (out[0] // tile[0], out[1] // tile[1])
    big = tile_window(window, tile)
    index = tap_index(window, tile, big.kernel)
    rows_q, rows_f = patch_rows(padded_q, big, tiled, groups), patch_rows(padded_f, big, tiled, groups)
    for start in range(0, rows_q.shape[1], GRAM_BLOCK_ROWS):
        block_q = rows_q[:, start:start + GRAM_BLOCK_ROWS]
        block_f = rows_f[:, start:start + GRAM_BLOCK_ROWS]
        transposed = block_q.transpose(0, 2, 1)
        for total, products in ((sums.gram, np.matmul(transposed, block_q)),
                                (sums.cross, np.matmul(transposed, block_f))):
            total += products[:, index[:, :, None], index[:, None, :]].sum(axis=1, dtype=np.float64)
        for total, block in ((sums.sum_quantized, block_q), (sums.sum_float, block_f)):
            total += np.matmul(_ONES[:block.shape[1]], block)[:, index].sum(axis=1, dtype=np.float64)
    done = (tiled[0] * tile[0], tiled[1] * tile[1])
    (sh, sw) = window.strides
    if out[0] > done[0]:
        rest = (out[0] - done[0], out[1])
        add_paired_columns(sums, patch_columns(padded_q[:, :, done[0] * sh:], window, rest, groups),
                           patch_columns(padded_f[:, :, done[0] * sh:], window, rest, groups))
    if out[1] > done[1] and done[0]:
        rest = (done[0], out[1] - done[1])
        add_paired_columns(sums, patch_columns(padded_q[:, :, :, done[1] * sw:], window, rest, groups),
                           patch_columns(padded_f[:, :, :, done[1] * sw:], window, rest, groups))
