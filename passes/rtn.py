"""Round-to-nearest on a per-channel or per-block grid, with an optional clipping search (the baseline to beat)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .grid import Grid, QuantWeight, block_reduce, minmax_params, per_weight, quant_weight

CLIP_RATIOS = np.linspace(1.0, 0.3, 36)
CLIP_CHUNK = 1 << 16  # weights searched at a time (512 KB of float64 per pass)


def clipped_grid(W: np.ndarray, grid: Grid) -> tuple[np.ndarray, np.ndarray]:
    """Per channel (or block), the shrunken min-max range whose round-to-nearest weight MSE is smallest.

    Rows are searched in chunks of about ``CLIP_CHUNK`` weights, so every ratio's passes stay in cache."""
    rows = max(1, CLIP_CHUNK // max(W.shape[1], 1))
    if W.shape[0] <= rows:
        return _clipped_rows(W, grid)
    found = [_clipped_rows(W[start:start + rows], grid) for start in range(0, W.shape[0], rows)]
    return np.concatenate([f[0] for f in found]), np.concatenate([f[1] for f in found])


def _clipped_rows(W: np.ndarray, grid: Grid) -> tuple[np.ndarray, np.ndarray]:
    """``clipped_grid`` of some rows."""
    lo, hi = weight_range(W, grid)
    best_err = np.full(lo.shape, np.inf)
    best_scale, best_zp = minmax_params(lo, hi, grid)
    view, spread, restore = _param_view(W, grid)
    buffer = np.empty_like(view)  # reused by every ratio (a fresh 512 KB array would be page-faulted in each time)
    for ratio in CLIP_RATIOS:
        scale, zp = minmax_params(lo * ratio, hi * ratio, grid)
        err = block_reduce(restore(_squared_error(view, spread(scale), spread(zp.astype(np.float64)), grid, buffer)),
                           grid)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_scale = np.where(better, scale, best_scale)
        best_zp = np.where(better, zp, best_zp)
    return best_scale.astype(np.float32), best_zp.astype(np.int8)


def _param_view(W: np.ndarray, grid: Grid
                ) -> tuple[np.ndarray, Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]]:
    """W laid out so that each scale covers one column: (block, rows x n_blocks) when the blocks are whole,
    (fan_in, rows) per channel; how a per-row/per-block quantity broadcasts against it (as a row, so numpy's
    inner loops run over contiguous memory instead of repeating a scalar for 32 weights); and how a result in
    that layout returns to W's shape (into one reused buffer). Partial blocks keep W's layout."""
    rows, d = W.shape
    if grid.block_size is not None and d % grid.block_size:
        return W, lambda x: per_weight(x, d, grid), lambda X: X
    size = grid.block_size or d
    view = np.ascontiguousarray(W.reshape(-1, size).T)
    back = np.empty(W.shape)
    columns = back.reshape(-1, size).T  # a view of back in the working layout

    def restore(X: np.ndarray) -> np.ndarray:
        columns[...] = X
        return back

    return view, lambda x: x.reshape(1, -1), restore


def _squared_error(W: np.ndarray, scale32: np.ndarray, zp64: np.ndarray, grid: Grid,
                   out: np.ndarray | None = None) -> np.ndarray:
    """(dequantize(round_to_grid(W)) - W)^2, in place in one buffer (``out`` when given).

    The codes are clipped as ``rint(W / scale)`` to [qmin - zp, qmax - zp] rather than shifted by zp, clipped to
    [qmin, qmax] and shifted back: the same integers (exact in float64), two passes fewer."""
    scale64 = scale32.astype(np.float64)
    err = np.rint(np.divide(W, scale64, out=out), out=out)
    np.minimum(np.maximum(err, grid.qmin - zp64, out=err), grid.qmax - zp64, out=err)
    err *= scale64
    err -= W
    err *= err
    return err


def weight_range(W: np.ndarray, grid: Grid) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (or per-block) minimum and maximum of W."""
    return block_reduce(W, grid, np.minimum), block_reduce(W, grid, np.maximum)


def initial_grid(W: np.ndarray, grid: Grid, clip: bool) -> tuple[np.ndarray, np.ndarray]:
    """The per-channel (or per-block) scale and zero point a pass starts from: plain min-max or MSE-clipped."""
    return clipped_grid(W, grid) if clip else minmax_params(*weight_range(W, grid), grid)


def quantize(W: np.ndarray, H: np.ndarray | None, grid: Grid, clip: bool = True) -> QuantWeight:
    """Round every weight to its nearest code; ``H`` is unused (RTN is data-free)."""
    W = np.asarray(W, dtype=np.float64)
    scale, zp = initial_grid(W, grid, clip)
    return quant_weight(W, scale, zp, grid)
