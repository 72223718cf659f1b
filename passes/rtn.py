"""Round-to-nearest on a per-channel or per-block grid, with an optional clipping search (the baseline to beat)."""

from __future__ import annotations

import numpy as np

from .grid import Grid, QuantWeight, block_reduce, minmax_params, per_weight, quant_weight, round_to_grid

CLIP_RATIOS = np.linspace(1.0, 0.3, 36)


def clipped_grid(W: np.ndarray, grid: Grid) -> tuple[np.ndarray, np.ndarray]:
    """Per channel (or block), the shrunken min-max range whose round-to-nearest weight MSE is smallest."""
    lo, hi = weight_range(W, grid)
    best_err = np.full(lo.shape, np.inf)
    best_scale, best_zp = minmax_params(lo, hi, grid)
    d = W.shape[1]
    for ratio in CLIP_RATIOS:
        scale, zp = minmax_params(lo * ratio, hi * ratio, grid)
        codes = round_to_grid(W, scale, zp, grid)
        deq = (codes - per_weight(zp.astype(np.float64), d, grid)) * per_weight(scale, d, grid)
        err = block_reduce((deq - W) ** 2, grid)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_scale = np.where(better, scale, best_scale)
        best_zp = np.where(better, zp, best_zp)
    return best_scale.astype(np.float32), best_zp.astype(np.int8)


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
