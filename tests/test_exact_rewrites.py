"""Fast paths of the rounding passes against literal reference loops: the same codes and scales, bit for bit.

GPTQ's column loop works on transposed blocks and the clip search on a column-per-scale layout for speed;
both must give exactly what the plain per-weight formulas give, on per-channel, blocked and partial-block grids.
"""

from __future__ import annotations

import numpy as np
import pytest

from onnxq.passes import Grid, gptq, rtn
from onnxq.passes.grid import block_reduce, minmax_params, per_weight

GRIDS = [Grid(4), Grid(3, symmetric=True), Grid(4, block_size=32), Grid(2, block_size=16),
         Grid(4, symmetric=True, block_size=32), Grid(3, block_size=20)]  # the last: 96 = 4 x 20 + 16


def layer(seed: int, out: int = 24, d: int = 96) -> tuple[np.ndarray, np.ndarray]:
    """Heavy-tailed weights (clipping pays) and a correlated Gram matrix (GPTQ's updates matter)."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((512, d)) + rng.standard_normal((512, 6)) @ rng.standard_normal((6, d))
    return rng.standard_t(3, size=(out, d)) * 0.05, X.T @ X


def reference_clip(W: np.ndarray, grid: Grid) -> tuple[np.ndarray, np.ndarray]:
    """The clip search as first written: per-weight scales, shift by zp, clip to [qmin, qmax], shift back."""
    d = W.shape[1]
    lo, hi = rtn.weight_range(W, grid)
    best_err = np.full(lo.shape, np.inf)
    best_scale, best_zp = minmax_params(lo, hi, grid)
    for ratio in rtn.CLIP_RATIOS:
        scale, zp = minmax_params(lo * ratio, hi * ratio, grid)
        s, z = per_weight(scale, d, grid), per_weight(zp.astype(np.float64), d, grid)
        codes = np.clip(np.rint(W / s.astype(np.float64)) + z, grid.qmin, grid.qmax)
        err = block_reduce(((codes - z) * s - W) ** 2, grid)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_scale, best_zp = np.where(better, scale, best_scale), np.where(better, zp, best_zp)
    return best_scale.astype(np.float32), best_zp.astype(np.int8)


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("seed", [0, 1])
def test_clip_search_equals_the_per_weight_formula(grid: Grid, seed: int) -> None:
    W, _ = layer(seed)
    scale, zp = rtn.clipped_grid(W, grid)
    ref_scale, ref_zp = reference_clip(W, grid)
    np.testing.assert_array_equal(scale, ref_scale)
    np.testing.assert_array_equal(zp, ref_zp)
    assert (scale < minmax_params(*rtn.weight_range(W, grid), grid)[0]).any()  # some ranges were shrunk


def reference_gptq(W: np.ndarray, H: np.ndarray, grid: Grid, percdamp: float = 0.01) -> np.ndarray:
    """Frantar et al.'s loop with act-order, unblocked, each weight on its own (block's) scale."""
    d = W.shape[1]
    scale, zp = rtn.initial_grid(W, grid, clip=True)
    s, z = per_weight(scale, d, grid), per_weight(zp.astype(np.float64), d, grid)
    s, z = np.broadcast_to(s, W.shape), np.broadcast_to(z, W.shape)
    H = H + percdamp * np.mean(np.diag(H)) * np.eye(d)
    perm = np.argsort(-np.diag(H), kind="stable")
    Wc, H = W[:, perm].copy(), H[np.ix_(perm, perm)]
    U = np.linalg.cholesky(np.linalg.inv(H)).T
    codes = np.empty(W.shape, dtype=np.int8)
    for i in range(d):
        j = perm[i]
        k = np.clip(np.rint(Wc[:, i] / s[:, j].astype(np.float64)) + z[:, j], grid.qmin, grid.qmax).astype(np.int8)
        q = ((k.astype(np.float32) - z[:, j].astype(np.float32)) * s[:, j]).astype(np.float64)
        Wc[:, i:] -= np.outer((Wc[:, i] - q) / U[i, i], U[i, i:])
        codes[:, j] = k
    return codes


@pytest.mark.parametrize("grid", GRIDS)
def test_gptq_on_every_grid_equals_the_reference_loop(grid: Grid) -> None:
    W, H = layer(2, d=80)
    expected = reference_gptq(W, H, grid)
    for block in (1, 7, 32, 128):  # one column, blocks across scale blocks, one lazy block for all
        np.testing.assert_array_equal(gptq.quantize(W, H, grid, block=block).codes, expected)
