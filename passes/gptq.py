"""GPTQ (Frantar et al., 2023): one pass over the columns on a fixed grid, each rounding error pushed onto
the columns not yet quantized (the upper Cholesky factor of H^-1, used implicitly; lazy blocks, BLAS-3).

Grouped Gram matrices (G x d x d) are handled as a stack: the column loop is vectorised over groups, so a
depthwise layer (G = out, d = 9) costs d numpy steps, not G Python loops.

Block-wise grids use static groups: every block's scale and zero point are fixed from the float weights
before the column loop (as AutoGPTQ's ``static_groups``), so act-order stays compatible with contiguous blocks.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg

from .gram import dead_inputs, psd_part
from .grid import Grid, QuantWeight, as_grouped, group_of_rows, per_weight
from .rtn import initial_grid

BATCHED_MAX_DIM = 64  # groups with fan-in up to this are factorised in one batched numpy call
DAMP_RETRIES = 6  # a failed Cholesky is retried with ten times more damping, this many times


def stacked(W: np.ndarray, H: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """W as (G, rows per group, d) float64 and H as a float64 (G, d, d) stack, checked for consistency."""
    W = np.asarray(W, dtype=np.float64)
    H = as_grouped(np.asarray(H, dtype=np.float64))
    if H.shape[1:] != (W.shape[1], W.shape[1]):
        raise ValueError(f"Gram matrix of shape {H.shape} does not match weight of shape {W.shape}")
    group_of_rows(W.shape[0], H.shape[0])  # validates the split
    return W.reshape(H.shape[0], -1, W.shape[1]), H


def dequantize_codes(codes: np.ndarray, scale32: np.ndarray, zero_point: np.ndarray) -> np.ndarray:
    """Float64 copy of exactly what ``QuantWeight.dequantize`` computes (a float32 product)."""
    centred = codes.astype(np.float32) - zero_point.astype(np.float32)
    return (centred * scale32).astype(np.float64)


def round_codes(values: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, grid: Grid) -> np.ndarray:
    """Nearest in-range codes for ``values`` (scale and zero point broadcast against them), as int8."""
    codes = np.rint(values / scale) + zero_point
    # two ufuncs in place: the same values as np.clip without its Python wrapper (this runs once per column)
    return np.minimum(np.maximum(codes, grid.qmin, out=codes), grid.qmax, out=codes).astype(np.int8)


def damped_diagonal(H: np.ndarray, percdamp: float) -> tuple[np.ndarray, np.ndarray]:
    """(G, d) diagonal GPTQ factorises, and the dead mask: dead inputs get the mean live H_jj, all get damping."""
    diag = np.diagonal(H, axis1=1, axis2=2)
    dead = dead_inputs(H)
    live = ~dead
    live_mean = (diag * live).sum(axis=1) / np.maximum(live.sum(axis=1), 1)
    live_mean = np.where(live_mean > 0, live_mean, 1.0)
    return np.where(dead, live_mean[:, None], diag) + (percdamp * live_mean)[:, None], dead


def permute_gram(H: np.ndarray, perm: np.ndarray) -> np.ndarray:
    """Per group, H[g][perm[g]][:, perm[g]] (one gather; the index arrays only broadcast)."""
    g = np.arange(H.shape[0])[:, None, None]
    return H[g, perm[:, :, None], perm[:, None, :]]


def prepared_gram(H: np.ndarray, perm: np.ndarray, percdamp: float) -> np.ndarray:
    """One new array: H permuted by ``perm``, dead inputs cut off (zero row and column), damped diagonal."""
    diag, dead = damped_diagonal(H, percdamp)
    Hp = permute_gram(H, perm)
    dead = np.take_along_axis(dead, perm, axis=1)
    gi, ji = np.nonzero(dead)
    Hp[gi, ji, :] = 0.0
    Hp[gi, :, ji] = 0.0
    idx = np.arange(H.shape[1])
    Hp[:, idx, idx] = np.take_along_axis(diag, perm, axis=1)
    return Hp


def _cholesky_inplace(A: np.ndarray) -> np.ndarray:
    """Lower Cholesky factor of one symmetric C-ordered A, written over A's lower triangle (no copy).

    The strict upper triangle is left as it was (the caller never reads it) and, after a failure, restores
    the lower one, so the factorisation is retried with ten times more damping each time.
    """
    d = A.shape[0]
    diag = np.diagonal(A).copy()
    extra = 1e-6 * max(float(diag.mean()), 1e-300)
    for _ in range(DAMP_RETRIES + 1):
        # A.T is Fortran-ordered: its upper triangle is A's lower one, so LAPACK works in place.
        _, info = scipy.linalg.lapack.dpotrf(A.T, lower=0, clean=0, overwrite_a=1)
        if info == 0:
            return A
        for i in range(1, d):  # rare path: restore the lower triangle from the untouched upper one
            A[i, :i] = A[:i, i]
        A[np.diag_indices(d)] = diag + extra
        extra *= 10.0
    raise np.linalg.LinAlgError("Gram matrix stays indefinite after damping")


def cholesky_stack(H: np.ndarray) -> np.ndarray:
    """Lower Cholesky factors of a (G, d, d) stack (upper triangles unspecified); H is consumed.

    Small d: one batched numpy call. Large d: LAPACK in place per group, so no d x d copy is made.
    """
    if H.shape[1] <= BATCHED_MAX_DIM:
        try:
            return np.linalg.cholesky(H)
        except np.linalg.LinAlgError:
            pass
    for h in H:
        _cholesky_inplace(h)
    return H


def column_order(diag: np.ndarray, act_order: bool) -> np.ndarray:
    """(G, d) visiting order: decreasing H_jj (act-order, stable) or natural."""
    G, d = diag.shape
    if not act_order:
        return np.tile(np.arange(d), (G, 1))
    return np.argsort(-diag, axis=1, kind="stable")


def gptq_columns(
    W: np.ndarray, L: np.ndarray, scale32: np.ndarray, zero_point: np.ndarray, grid: Grid, block: int
) -> np.ndarray:
    """The GPTQ column loop, last column first, on W (G, r, d) and lower factors L (G, d, d; consumed).

    ``scale32`` and ``zero_point`` are (G, r, d), one value per weight in visiting order (broadcast views for
    per-channel grids).

    Columns are stored in reverse visiting order, so ``H = L L^T`` gives the usual upper factor of H^-1 as
    ``J L^-1 J``. The update is written with L itself: the value rounded at column t is
    ``w_t + sum_{i > t} (w_i - q_i) L_it / L_tt``, which equals GPTQ's ``w_t - sum_i err_i U_it`` exactly but
    needs no inverse. Lazy blocks: inside a block only its columns are updated, the rest by one GEMM. A block
    is worked on transposed (G, w, r), so each column is one contiguous row (the same float operations).
    """
    G, r, d = W.shape
    Ln = L
    Ln /= np.diagonal(L, axis1=1, axis2=2).copy()[:, None, :]  # column t scaled by 1 / L_tt
    codes = np.empty((G, r, d), dtype=np.int8)
    acc = np.zeros_like(W)
    for b2 in range(d, 0, -block):
        b1 = max(b2 - block, 0)
        w, cols = b2 - b1, slice(b1, b2)
        Wb, accb, Lb = _by_column(W, cols), _by_column(acc, cols), np.ascontiguousarray(Ln[:, cols, cols])
        s32, s64 = _by_column(scale32, cols, np.float32), _by_column(scale32, cols)
        z, z32 = _by_column(zero_point, cols), _by_column(zero_point, cols, np.float32)
        Db = np.empty((G, w, r))
        kb = np.empty((G, w, r), dtype=np.int8)
        for c in range(w - 1, -1, -1):
            k = round_codes(Wb[:, c] + accb[:, c], s64[:, c], z[:, c], grid)
            delta = Wb[:, c] - ((k.astype(np.float32) - z32[:, c]) * s32[:, c]).astype(np.float64)
            if c:
                accb[:, :c] += Lb[:, c, :c, None] * delta[:, None, :]
            Db[:, c], kb[:, c] = delta, k
        codes[:, :, b1:b2] = kb.transpose(0, 2, 1)
        if b1 > 0:
            D = np.ascontiguousarray(Db.transpose(0, 2, 1))  # (G, r, w): the layout the GEMM always had
            acc[:, :, :b1] += np.matmul(D, Ln[:, b1:b2, :b1])
    return codes


def _by_column(X: np.ndarray, cols: slice, dtype: type = np.float64) -> np.ndarray:
    """Columns ``cols`` of a (G, r, d) stack as a contiguous (G, w, r) array of ``dtype``."""
    return np.ascontiguousarray(X[:, :, cols].transpose(0, 2, 1), dtype=dtype)


def column_params(
    scale: np.ndarray, zero_point: np.ndarray, grid: Grid, shape: tuple[int, int, int], perm: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point of every weight as (G, r, d) in the permuted column order ``perm`` (G, d).

    Per-channel grids give read-only broadcast views (no copy); blocked grids a gathered copy.
    """
    G, r, d = shape
    if scale.ndim == 1:
        return (np.broadcast_to(scale.reshape(G, r, 1), shape), np.broadcast_to(zero_point.reshape(G, r, 1), shape))

    def gather(x: np.ndarray) -> np.ndarray:
        return np.take_along_axis(per_weight(x, d, grid).reshape(shape), perm[:, None, :], axis=2)

    return gather(scale), gather(zero_point)


def unpermute_columns(X: np.ndarray, perm: np.ndarray) -> np.ndarray:
    """Inverse of ``take_along_axis(X, perm[:, None, :], axis=2)`` for a (G, r, d) stack."""
    out = np.empty_like(X)
    np.put_along_axis(out, perm[:, None, :], X, axis=2)
    return out


def _factorised(H: np.ndarray, percdamp: float, act_order: bool) -> tuple[np.ndarray, np.ndarray]:
    """The (G, d) reversed visiting order and the lower Cholesky factors of the prepared, permuted H."""
    rev = column_order(damped_diagonal(H, percdamp)[0], act_order)[:, ::-1]  # last visited first
    return rev, cholesky_stack(prepared_gram(H, rev, percdamp))


def quantize(
    W: np.ndarray,
    H: np.ndarray,
    grid: Grid,
    clip: bool = True,
    act_order: bool = True,
    percdamp: float = 0.01,
    block: int = 128,
) -> QuantWeight:
    """GPTQ on the grid ``rtn.initial_grid(W, grid, clip)``; dead inputs are isolated, hence plain RTN."""
    W = np.asarray(W, dtype=np.float64)
    out, d = W.shape
    Ws, Hs = stacked(W, H)
    scale32, zero_point = initial_grid(W, grid, clip)
    G, r, _ = Ws.shape
    try:
        rev, L = _factorised(Hs, percdamp, act_order)
    except np.linalg.LinAlgError:  # noise made H indefinite beyond any damping: round against its PSD part
        rev, L = _factorised(psd_part(Hs), percdamp, act_order)
    Wp = np.take_along_axis(Ws, rev[:, None, :], axis=2)
    s_cols, z_cols = column_params(scale32, zero_point.astype(np.float64), grid, (G, r, d), rev)
    codes = gptq_columns(Wp, L, s_cols, z_cols, grid, max(block, 1))
    codes = unpermute_columns(codes, rev).reshape(out, d)
    return QuantWeight(codes, scale32, zero_point, grid)
