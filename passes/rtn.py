"""Round-to-nearest on a per-channel grid, with an optional clipping search (the baseline every pass beats)."""

from __future__ import annotations

import numpy as np

from .grid import Grid, QuantWeight, minmax_params, quant_weight, round_to_grid

CLIP_RATIOS = np.linspace(1.0, 0.3, 36)


def clipped_grid(W: np.ndarray, grid: Grid) -> tuple[np.ndarray, np.ndarray]:
    """Per channel, the shrunken min-max range whose round-to-nearest weight MSE is smallest."""
    lo, hi = W.min(axis=1), W.max(axis=1)
    best_err = np.full(W.shape[0], np.inf)
    best_scale, best_zp = minmax_params(lo, hi, grid)
    for ratio in CLIP_RATIOS:
        scale, zp = minmax_params(lo * ratio, hi * ratio, grid)
        codes = round_to_grid(W, scale, zp, grid)
        err = (((codes - zp[:, None].astype(np.float64)) * scale[:, None] - W) ** 2).sum(axis=1)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_scale = np.where(better, scale, best_scale)
        best_zp = np.where(better, zp, best_zp)
    return best_scale.astype(np.float32), best_zp.astype(np.int8)


def initial_grid(W: np.ndarray, grid: Grid, clip: bool) -> tuple[np.ndarray, np.ndarray]:
    """The per-channel scale and zero point a pass starts from: plain min-max or MSE-clipped."""
    return clipped_grid(W, grid) if clip else minmax_params(W.min(axis=1), W.max(axis=1), grid)


def quantize(W: np.ndarray, H: np.ndarray | None, grid: Grid, clip: bool = True) -> QuantWeight:
    """Round every weight to its nearest code; ``H`` is unused (RTN is data-free)."""
    W = np.asarray(W, dtype=np.float64)
    scale, zp = initial_grid(W, grid, clip)
    return quant_weight(W, scale, zp, grid)
