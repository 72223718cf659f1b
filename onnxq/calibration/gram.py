"""Add a batch of a layer's input to its Gram matrix ``X^T X`` and row sums, without building ``X`` row-wise.

Every product is a float32 BLAS call over at most ``GRAM_BLOCK_ROWS`` rows (numpy runs ``a @ a.T`` as syrk),
summed into float64, so the rounding error stays near 1e-6 relative whatever the row count. The layouts
avoid a large transposed copy: a pointwise Conv's pixels already are columns, other Convs build columns with
one strided copy per kernel tap. A Conv with one input channel per group (depthwise) has a tiny fan-in
(9 for 3x3), where BLAS is slow; there each tile of ``L x L`` output pixels becomes one column of the
input window they read together (``span x span``, e.g. 9 x 9 for L = 7), and the Gram matrix of those
windows is folded back: the patch of output pixel ``l`` of a tile is a fixed subset of its window, so
``H = sum_l Big[idx_l, idx_l]``. That is ~1.7 times the floating point work of the 9 x 9 products in a
GEMM ~8 times faster, from a copy ~5 times smaller than the im2col one. Depthwise layers on small maps fold the
image Gram matrix instead (image_gram.py), stride-1 ones up to 5x5 on larger maps sum lagged image products
(lag_gram.py).
"""

from __future__ import annotations

import numpy as np

from onnxq.calibration import image_gram, lag_gram
from onnxq.calibration.unfold import Window, conv_pads, padded_input, patch_columns, patch_rows

GRAM_BLOCK_ROWS = 8192  # rows per float32 GEMM block (2.5x faster than float64; error ~1e-6 relative)
COLUMN_CHUNK_ELEMENTS = 1 << 23  # unfolded values built at once: bounds the column copy to ~32 MB
TILE_MAX_WINDOW = 81  # input values a tile's window may hold: the folded GEMM's size (81 for 7 x 7 tiles of 3x3)
TILE_MIN_COLUMNS = 300  # tiles per chunk below which the window GEMM is too thin to beat the direct one
TILE_SIDES = (8, 7, 6, 5, 4, 3, 2)
_ONES = np.ones(GRAM_BLOCK_ROWS, np.float32)


def add_columns(gram: np.ndarray, row_sum: np.ndarray, columns: np.ndarray) -> None:
    """Add rows given as float32 columns ``(groups, d, rows)`` to ``gram`` (G, d, d) and ``row_sum`` (G, d)."""
    for start in range(0, columns.shape[2], GRAM_BLOCK_ROWS):
        block = columns[:, :, start:start + GRAM_BLOCK_ROWS]
        gram += np.matmul(block, block.transpose(0, 2, 1))
        row_sum += np.matmul(block, _ONES[:block.shape[2]])


def add_pointwise(gram: np.ndarray, row_sum: np.ndarray, x: np.ndarray) -> None:
    """A 1x1 Conv's rows are its pixels: each sample's (C, HW) is already columns; small images are first
    gathered a few samples at a time so that one GEMM sees up to ``GRAM_BLOCK_ROWS`` rows."""
    pixels = x.reshape(x.shape[0], x.shape[1], -1)
    per_block = GRAM_BLOCK_ROWS // max(pixels.shape[2], 1)
    if per_block <= 1:
        for sample in pixels:
            add_columns(gram, row_sum, sample[None])
        return
    for start in range(0, pixels.shape[0], per_block):
        group = pixels[start:start + per_block]
        add_columns(gram, row_sum, group.transpose(1, 0, 2).reshape(1, pixels.shape[1], -1))


def add_conv(gram: np.ndarray, row_sum: np.ndarray, x: np.ndarray, conv: dict, groups: int) -> int:
    """Add a Conv's unfolded input, a few samples at a time; return the number of rows added."""
    n, channels = x.shape[:2]
    if channels == groups and (image_gram.fits(x.shape[2:]) or lag_gram.fits(x, conv)):
        top, left, bottom, right = conv_pads(x.shape[2:], conv)
        window = Window(tuple(conv["kernel_shape"]), tuple(conv["strides"]), tuple(conv["dilations"]))
        out = window.out_shape((x.shape[2] + top + bottom, x.shape[3] + left + right))
        small = image_gram.fits(x.shape[2:])
        (image_gram.add_image_gram if small else lag_gram.add_lagged_gram)(gram, row_sum, x, window, (top, left), out)
        return n * out[0] * out[1]
    padded, window = padded_input(x, conv)
    out = window.out_shape(padded.shape[2:])
    tile = tile_shape(window, out, n, channels, groups)
    per_sample = column_elements(window, out, channels, tile)
    step = max(1, COLUMN_CHUNK_ELEMENTS // max(per_sample, 1))
    for start in range(0, n, step):
        chunk = padded[start:start + step]
        if tile is None:
            add_columns(gram, row_sum, patch_columns(chunk, window, out, groups))
        else:
            add_tiled(gram, row_sum, chunk, window, out, groups, tile)
    return n * out[0] * out[1]


def tile_window(window: Window, tile: tuple[int, int]) -> Window:
    """The window read together by a tile of output pixels, stepping one tile at a time."""
    span = tuple((k - 1) * d + (t - 1) * s + 1 for k, d, t, s in zip(
        window.kernel, window.dilations, tile, window.strides, strict=True))
    return Window(span, tuple(t * s for t, s in zip(tile, window.strides, strict=True)), (1, 1))


def tile_shape(window: Window, out: tuple[int, int], n: int, channels: int,
               groups: int) -> tuple[int, int] | None:
    """The tile (output pixels per axis) for a one-channel-per-group Conv, or None for the direct GEMM.

    A tile's window may hold at most ``TILE_MAX_WINDOW`` values and a chunk must have ``TILE_MIN_COLUMNS``
    tiles; of those, the cheapest by the column count the GEMMs multiply (window size per tile, kernel taps
    per left-over pixel)."""
    if channels != groups or window.kernel == (1, 1):
        return None
    best, best_cost = None, None
    for side in TILE_SIDES:
        tile = (min(side, out[0]), min(side, out[1]))
        span = tile_window(window, tile).kernel
        tiles = (out[0] // tile[0]) * (out[1] // tile[1])
        chunk = min(n, max(1, COLUMN_CHUNK_ELEMENTS // max(channels * span[0] * span[1] * tiles, 1)))
        if tile == (1, 1) or span[0] * span[1] > TILE_MAX_WINDOW or chunk * tiles < TILE_MIN_COLUMNS:
            continue
        rest = out[0] * out[1] - tiles * tile[0] * tile[1]
        cost = tiles * span[0] * span[1] + rest * window.kernel[0] * window.kernel[1]
        if best_cost is None or cost < best_cost:
            best, best_cost = tile, cost
    return best


def column_elements(window: Window, out: tuple[int, int], channels: int, tile: tuple[int, int] | None) -> int:
    """Unfolded values one sample needs (the size of its column copy)."""
    taps = window.kernel[0] * window.kernel[1]
    if tile is None:
        return channels * taps * out[0] * out[1]
    span = tile_window(window, tile).kernel
    tiles = (out[0] // tile[0]) * (out[1] // tile[1])
    rest = out[0] * out[1] - tiles * tile[0] * tile[1]
    return channels * (span[0] * span[1] * tiles + taps * rest)


def add_tiled(gram: np.ndarray, row_sum: np.ndarray, padded: np.ndarray, window: Window, out: tuple[int, int],
              groups: int, tile: tuple[int, int]) -> None:
    """Add a one-channel-per-group Conv's patches tile by tile (module docstring); the output rows and
    columns that do not fill a tile go through the direct GEMM."""
    tiled = (out[0] // tile[0], out[1] // tile[1])
    big = tile_window(window, tile)
    index = tap_index(window, tile, big.kernel)
    rows = patch_rows(padded, big, tiled, groups)
    for start in range(0, rows.shape[1], GRAM_BLOCK_ROWS):
        block = rows[:, start:start + GRAM_BLOCK_ROWS]
        products = np.matmul(block.transpose(0, 2, 1), block)
        gram += products[:, index[:, :, None], index[:, None, :]].sum(axis=1, dtype=np.float64)
        row_sum += np.matmul(_ONES[:block.shape[1]], block)[:, index].sum(axis=1, dtype=np.float64)
    done = (tiled[0] * tile[0], tiled[1] * tile[1])
    (sh, sw) = window.strides
    if out[0] > done[0]:
        add_columns(gram, row_sum, patch_columns(padded[:, :, done[0] * sh:], window, (out[0] - done[0], out[1]),
                                                 groups))
    if out[1] > done[1] and done[0]:
        add_columns(gram, row_sum, patch_columns(padded[:, :, :, done[1] * sw:], window, (done[0], out[1] - done[1]),
                                                 groups))


def tap_index(window: Window, tile: tuple[int, int], span: tuple[int, int]) -> np.ndarray:
    """``(tile pixels, kh * kw)``: where each kernel tap of each output pixel of a tile sits in the tile's
    flattened ``span`` window."""
    (kh, kw), (sh, sw), (dh, dw) = window.kernel, window.strides, window.dilations
    rows = np.arange(tile[0])[:, None, None, None] * sh + np.arange(kh)[None, None, :, None] * dh
    cols = np.arange(tile[1])[None, :, None, None] * sw + np.arange(kw)[None, None, None, :] * dw
    return (rows * span[1] + cols).reshape(tile[0] * tile[1], kh * kw)
