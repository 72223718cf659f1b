"""COMQ (Zhang et al., 2024): coordinate descent on the integer codes plus a closed-form per-channel scale
update, in Gram form (no calibration activations needed, only H).

Per output row i the state is ``G_i = (w_i - q_i) H``. Visiting coordinate j sets the code to the exact
minimiser on the grid along that coordinate, ``round((q_ij + G_ij / H_jj) / delta_i) + z_i`` (clipped), and
updates ``G_i`` by a rank-one term. A move is only taken when it strictly lowers the objective, so from a
fully quantized start the objective never rises. Two visiting orders:

* ``"channel"``: the paper's greedy order, decreasing ``|w_ij| sqrt(H_jj)`` separately per row; rows
  whose code does not change cost nothing (most of them after the first sweep).
* ``"shared"``: one greedy order per Gram group (``sqrt(H_jj) mean_i |w_ij|``), which allows GPTQ-style
  lazy blocks: within a block only the block's columns of G are updated, the rest by one BLAS-3 product.

Block-wise grids (``Grid.block_size``): each coordinate rounds on its own block's scale and zero point, and
the scale update is the closed form restricted to one block's coordinates, ``delta_b += k_b^T H (w - q) /
k_b^T H_bb k_b`` (the exact minimiser over that block's scale with the others fixed), one block after another.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import scipy.sparse

from . import gptq, rtn
from .gptq import dead_inputs, dequantize_codes, round_codes, stacked
from .grid import Grid, QuantWeight, as_grouped, block_index, objective

INITS = ("gptq", "rtn", "float")
ORDERS = ("auto", "channel", "shared")
SPARSE_UPDATE_MAX = 0.02  # above this fraction of changed codes, (codes - zp) H is recomputed by a GEMM
DEFER_MIN_ROWS = 8  # per-channel order: defer a step's moves when at least 1/8 of the rows move
SHARED_BLOCK, CHANNEL_BLOCK = 128, 32  # default lazy-block sizes (measured best on the bench shapes)
SCALE_SPAN = 256  # columns whose residual a block-scale step updates at once; the rest by one GEMM per span
WAVE_WINDOW_FIXED = 8  # shared order from a float start: coordinates a wave evaluates ahead
SHARED_MIN_DIM = 2048  # "auto" always uses the shared blocked order from this fan-in on (bench/pass_speed.py)

Callback = Callable[[int, QuantWeight], None]


class _State:
    """Mutable working arrays of one COMQ run, stacked per Gram group.

    ``rows_last`` False: (G, r, d), rows of W (channel order). True: (G, d, r), one contiguous slice per
    input coordinate (shared order, columns already permuted into visiting order). Scales and zero points
    are (G, r) per channel, or (G, r, n_blocks) with ``col_block`` (G, d) giving each working column's block.
    """

    def __init__(
        self,
        W: np.ndarray,
        H: np.ndarray,
        codes: np.ndarray,
        scale32: np.ndarray,
        zero_point: np.ndarray,
        fixed: np.ndarray | None,
        grid: Grid,
        rows_last: bool,
        col_block: np.ndarray | None = None,
    ) -> None:
        self.W, self.H, self.codes, self.fixed, self.grid = W, H, codes, fixed, grid
        self.rows_last, self.col_block = rows_last, col_block
        self.scale32 = scale32  # (G, r) or (G, r, n_blocks) float32
        self.zp = zero_point.astype(np.float64)  # shaped as scale32
        self.coordinate_params()
        self.Q = dequantize_codes(codes, self.S32, self.Z)
        if fixed is not None:  # None: every coordinate holds a grid value
            self.Q = np.where(fixed, self.Q, W)
        self.live = ~dead_inputs(H)  # (G, d)
        self.hsafe = np.where(self.live, np.diagonal(H, axis1=1, axis2=2), 1.0)
        self.Gr = np.empty_like(W)
        self.KH: np.ndarray | None = None  # (codes - zp) H, kept for the scale update
        self.K_at_KH = codes.copy()  # the codes KH was computed for

    def per_row(self, x: np.ndarray) -> np.ndarray:
        """A (G, r) per-row quantity shaped to broadcast against the working arrays."""
        return x[:, None, :] if self.rows_last else x[:, :, None]

    def coordinate_params(self) -> None:
        """Refresh ``S32``/``Z``: every coordinate's scale and zero point in the working layout (views per channel)."""
        if self.col_block is None:
            self.S32 = np.broadcast_to(self.per_row(self.scale32), self.W.shape)
            self.Z = np.broadcast_to(self.per_row(self.zp), self.W.shape)
            return
        self.S32, self.Z = self._per_coordinate(self.scale32), self._per_coordinate(self.zp)

    def _per_coordinate(self, x: np.ndarray) -> np.ndarray:
        """A (G, r, n_blocks) quantity gathered to one value per working coordinate."""
        if self.rows_last:  # whole rows of the transposed (G, n_blocks, r) stack: a row gather, no transpose
            return x.transpose(0, 2, 1)[np.arange(x.shape[0])[:, None], self.col_block]
        return np.take_along_axis(x, self.col_block[:, None, :], axis=2)  # (G, r, d)

    def times_gram(self, X: np.ndarray) -> np.ndarray:
        """Every row of X times its group's H (H is symmetric, so the transposed layout is H @ X)."""
        return np.matmul(self.H, X) if self.rows_last else np.matmul(X, self.H)

    def row_dot(self, X: np.ndarray, Y: np.ndarray) -> np.ndarray:
        """(G, r) per-row inner products over the input coordinates."""
        return (X * Y).sum(axis=1 if self.rows_last else 2)

    def centred_codes(self) -> np.ndarray:
        """Codes minus zero point, as float64."""
        return self.codes.astype(np.float64) - self.Z

    def codes_times_gram(self) -> np.ndarray:
        """(codes - zp) H, by one GEMM or, when few codes moved since the last call, a sparse update."""
        changed = self.codes != self.K_at_KH
        if self.KH is None or changed.mean() > SPARSE_UPDATE_MAX:
            self.KH = self.times_gram(self.centred_codes())
        elif changed.any():
            self.KH += self._sparse_gram(changed)
        self.K_at_KH = self.codes.copy()
        return self.KH

    def _sparse_gram(self, changed: np.ndarray) -> np.ndarray:
        """(new codes - old codes) H for a sparse set of changed codes: cost nnz x d instead of a GEMM."""
        if self.rows_last:
            g, t, i = np.nonzero(changed)
        else:
            g, i, t = np.nonzero(changed)
        G, d = self.live.shape
        r = self.codes.size // (G * d)
        dk = self.codes[changed].astype(np.float64) - self.K_at_KH[changed]
        rows, cols = g * r + i, g * d + t
        delta = scipy.sparse.csr_matrix((dk, (rows, cols)), shape=(G * r, G * d)) @ self.H.reshape(G * d, d)
        delta = np.asarray(delta).reshape(G, r, d)
        return delta.transpose(0, 2, 1) if self.rows_last else delta

    def refresh_gradient(self) -> None:
        """Recompute G = (W - Q) H from scratch (at every sweep start, so rank-one drift never builds up)."""
        self.Gr = self.times_gram(self.W - self.Q)


def _proposal(
    grid: Grid,
    q: np.ndarray,
    g: np.ndarray,
    hsafe: np.ndarray,
    scale64: np.ndarray,
    scale32: np.ndarray,
    zp: np.ndarray,
    fixed: np.ndarray | None,
    live: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact coordinate minimiser on the grid: its codes, values and whether taking it strictly helps."""
    tgt = q + g / hsafe
    k = round_codes(tgt, scale64, zp, grid)
    qn = dequantize_codes(k, scale32, zp)
    better = np.abs(qn - tgt) < np.abs(q - tgt)
    if fixed is not None:
        better |= ~fixed
    return k, qn, better & live


def sweep_shared(state: _State, block: int) -> int:
    """One pass over the (permuted, rows-last) coordinates with lazy blocks; returns the number of moves.

    Within a block only the block's columns of G are updated (rank one per move); the columns past it get the
    block's moves by one BLAS-3 product. The block itself is swept in waves (``_sweep_block``).
    """
    G, d, r = state.W.shape
    S64 = state.S32.astype(np.float64)  # the scales do not change during a sweep
    moves = 0
    for b1 in range(0, d, block):
        b2 = min(b1 + block, d)
        D, moved = _sweep_block(state, S64, b1, b2)
        moves += moved
        if b2 < d and moved:
            state.Gr[:, b2:] += np.matmul(state.H[:, b2:, b1:b2], D)
    return moves


def _sweep_block(state: _State, S64: np.ndarray, b1: int, b2: int) -> tuple[np.ndarray, int]:
    """Visit coordinates b1..b2-1 in order for every row; returns the moves D = q_old - q_new (G, w, r), count.

    Rows are independent, so instead of one numpy step per coordinate (about 100 us of overhead each) the
    block goes in waves: every row still active evaluates its remaining coordinates at once with G as it
    stands, which is exact up to the row's first improving coordinate; that move is taken, its rank-one
    update reaches the row's later block columns, and the row resumes after it. Waves = the most moves of
    one row in the block (a few, where coordinates are visited one by one otherwise). Each row sees the same
    float operations in the same order as a coordinate-by-coordinate sweep, so the codes are identical.
    """
    G, _, r = state.W.shape
    n, w = G * r, b2 - b1
    group = np.repeat(np.arange(G), r)

    def by_row(X: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(X[:, b1:b2].transpose(0, 2, 1)).reshape(n, w)

    Gb, Qb, codes = by_row(state.Gr), by_row(state.Q), by_row(state.codes)
    S64b, S32b, Zb = by_row(S64), by_row(state.S32), by_row(state.Z)
    fixed = None if state.fixed is None else by_row(state.fixed)
    hsafe, live = state.hsafe[group, b1:b2], state.live[group, b1:b2]
    Hb = state.H[:, b1:b2, b1:b2]
    # a float start moves every unvisited coordinate: short windows then, so a wave does not scan the block
    window = w if fixed is None or fixed.all() else WAVE_WINDOW_FIXED
    D = np.zeros((n, w))
    pos = np.zeros(n, dtype=np.int64)  # each row's next coordinate in the block
    active = np.arange(n)
    columns = np.arange(w)
    moves = 0
    while active.size:
        c0 = int(pos[active].min())
        c1 = min(c0 + window, w)
        at = (active, slice(c0, c1))
        q = Qb[at]
        k, qn, better = _proposal(state.grid, q, Gb[at], hsafe[at], S64b[at], S32b[at], Zb[at],
                                  None if fixed is None else fixed[at], live[at])
        better &= columns[c0:c1] >= pos[active, None]
        first = better.argmax(axis=1)
        hit = better[np.arange(active.size), first]
        pos[active[~hit]] = np.maximum(pos[active[~hit]], c1)
        rows, f = active[hit], first[hit]
        if rows.size:
            t = c0 + f
            dq = q[hit, f] - qn[hit, f]
            later = Gb[rows]
            np.add(later, Hb[group[rows], t] * dq[:, None], out=later, where=columns > t[:, None])
            Gb[rows] = later
            Qb[rows, t], codes[rows, t], D[rows, t] = qn[hit, f], k[hit, f], dq
            if fixed is not None:
                fixed[rows, t] = True
            pos[rows] = t + 1
            moves += rows.size
        active = active[pos[active] < w]
    if moves:
        for name, X in (("Gr", Gb), ("Q", Qb), ("codes", codes)):
            getattr(state, name)[:, b1:b2] = X.reshape(G, r, w).transpose(0, 2, 1)
        if fixed is not None:
            state.fixed[:, b1:b2] = fixed.reshape(G, r, w).transpose(0, 2, 1)
    return np.ascontiguousarray(D.reshape(G, r, w).transpose(0, 2, 1)), moves


def sweep_channel(state: _State, perm: np.ndarray, block: int) -> int:
    """One pass where every row follows its own order ``perm`` (n x d); returns the number of moves.

    A step where few rows move updates their rows of G at once (rank one each). When many move (first sweep
    from a float or RTN start), the moves are deferred within a lazy block of ``block`` steps: a step reads
    G plus the block's deferred moves of its row (a gather of their H entries), and at block end they reach
    G in one sparse x dense product, (moves x d) in C instead of numpy temporaries of n x d per step.
    """
    G, r, d = state.W.shape
    n = G * r
    Q, Gr, codes = state.Q.reshape(n, d), state.Gr.reshape(n, d), state.codes.reshape(n, d)
    fixed_all = None if state.fixed is None else state.fixed.reshape(n, d)
    group = np.repeat(np.arange(G), r)
    Hflat, Hrows, hbase = state.H.reshape(-1), state.H.reshape(G * d, d), group * d * d
    hsafe, live = state.hsafe[group], state.live[group]
    rows = np.arange(n)
    params = _row_params(state, rows)
    moves = 0
    for b1 in range(0, d, block):
        J = perm[:, b1 : b1 + block]
        D = np.zeros(J.shape)
        moved = np.zeros(n, dtype=bool)
        for s in range(J.shape[1]):
            j = J[:, s]
            g = Gr[rows, j]
            act = np.flatnonzero(moved)
            if act.size:  # this block's earlier moves of the same row: sum_s' D[i, s'] H[J[i, s'], j_i]
                h = Hflat[hbase[act, None] + J[act, :s] * d + j[act, None]]
                g[act] += (D[act, :s] * h).sum(axis=1)
            q = Q[rows, j]
            fixed = None if fixed_all is None else fixed_all[rows, j]
            scale64, scale32, zp = params(j)
            k, qn, move = _proposal(state.grid, q, g, hsafe[rows, j], scale64, scale32, zp, fixed, live[rows, j])
            idx = np.flatnonzero(move)
            if not idx.size:
                continue
            moves += idx.size
            ji = j[idx]
            if idx.size * DEFER_MIN_ROWS < n:  # few rows move: update their G rows now
                Gr[idx] += (q[idx] - qn[idx])[:, None] * Hrows[group[idx] * d + ji]
            else:  # many: defer to the block's sparse flush
                D[idx, s] = q[idx] - qn[idx]
                moved[idx] = True
            Q[idx, ji] = qn[idx]
            codes[idx, ji] = k[idx]
            if fixed_all is not None:
                fixed_all[idx, ji] = True
        if moved.any():
            i, s = np.nonzero(D)
            flush = scipy.sparse.csr_matrix((D[i, s], (i, group[i] * d + J[i, s])), shape=(n, G * d))
            Gr += np.asarray(flush @ Hrows)
    return moves


def _row_params(state: _State, rows: np.ndarray) -> Callable[[np.ndarray], tuple[np.ndarray, ...]]:
    """For the per-channel order: ``j -> (scale64, scale32, zp)`` of coordinate ``j[i]`` of every row i."""
    n = rows.size
    if state.col_block is None:
        scale32, zp = state.scale32.reshape(n), state.zp.reshape(n)
        scale64 = scale32.astype(np.float64)
        return lambda j: (scale64, scale32, zp)
    S32, Z = state.S32.reshape(n, -1), state.Z.reshape(n, -1)

    def params(j: np.ndarray) -> tuple[np.ndarray, ...]:
        scale32 = S32[rows, j]
        return scale32.astype(np.float64), scale32, Z[rows, j]

    return params


def update_scale(state: _State) -> int:
    """Closed-form least-squares scale per row, delta = k^T H w / k^T H k (codes centred on the zero point).

    A row keeps its old scale unless the new one is finite, positive and lowers that row's objective
    (checked on the float32 value actually stored). Returns the number of rows changed.
    """
    K = state.centred_codes()
    KH = state.codes_times_gram()
    a = state.row_dot(KH, state.W)
    b = state.row_dot(KH, K)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        cand32 = np.where(b > 0, a / np.where(b > 0, b, 1.0), np.nan).astype(np.float32)
    cand = cand32.astype(np.float64)
    old = state.scale32.astype(np.float64)
    ok = np.isfinite(cand) & (cand > 0)
    gain = (cand - old) * ((cand + old) * b - 2.0 * a)  # f(cand) - f(old) for f(s) = c - 2 s a + s^2 b
    ok &= np.where(ok, gain, 0.0) < 0
    if not ok.any():
        return 0
    state.scale32 = np.where(ok, cand32, state.scale32)
    state.coordinate_params()
    Qnew = dequantize_codes(state.codes, state.S32, state.Z)
    state.Q = np.where(state.per_row(ok), Qnew, state.Q)
    return int(ok.sum())


def update_block_scales(state: _State, W: np.ndarray, H: np.ndarray, to_work: Callable, from_work: Callable) -> int:
    """Blocked grids: per block b in turn, ``delta_b += k_b^T H (w - q) / (k_b^T H_bb k_b)`` for every row.

    Each step is the exact minimiser over one block's scale with the others fixed (block coordinate descent,
    done in the natural layout: W (G, r, d), H (G, d, d)); a scale changes only when the float32 value
    stored lowers the row's objective. Returns the number of (row, block) scales changed.

    The residual ``R = (W - Q) H`` is only read on blocks not yet visited, so a step updates R within its
    span of ``SCALE_SPAN`` columns at once and the columns past the span by one GEMM per span (lazy, BLAS-3)
    instead of one thin product over all of R per block.
    """
    d = W.shape[2]
    size = state.grid.block_size

    def per_weight(x: np.ndarray) -> np.ndarray:  # (G, r, n_blocks) -> (G, r, d): each block's value repeated
        return np.repeat(x, size, axis=2)[..., :d]

    codes, scale32 = from_work(state.codes), state.scale32.copy()
    zp = per_weight(state.zp)
    K = codes.astype(np.float64) - zp
    R = np.matmul(W - dequantize_codes(codes, per_weight(scale32), zp), H)  # (W - Q) H
    changed = 0
    span = size * max(1, SCALE_SPAN // size)
    for s1 in range(0, d, span):
        s2 = min(s1 + span, d)
        moved = np.zeros(K.shape[:2] + (s2 - s1,))  # each column's scale change in this span
        for start in range(s1, s2, size):
            cols, b = slice(start, min(start + size, d)), start // size
            Kb = K[:, :, cols]
            KbH = np.matmul(Kb, H[:, cols, start:s2])
            width = Kb.shape[2]
            step = _block_step(scale32[:, :, b], (Kb * R[:, :, cols]).sum(axis=2),
                               (Kb * KbH[:, :, :width]).sum(axis=2))
            if not step.any():
                continue
            scale32[:, :, b] = (scale32[:, :, b] + step).astype(np.float32)
            R[:, :, start:s2] -= step[:, :, None] * KbH
            moved[:, :, start - s1 : start - s1 + width] = step[:, :, None]
            changed += int(np.count_nonzero(step))
        if s2 < d and moved.any():
            R[:, :, s2:] -= np.matmul(K[:, :, s1:s2] * moved, H[:, s1:s2, s2:])
    if changed:
        state.scale32 = scale32
        state.coordinate_params()
        state.Q = dequantize_codes(state.codes, state.S32, state.Z)  # in the working layout already
    return changed


def _block_step(old32: np.ndarray, num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """Exact change of one block's float32 scales toward ``old + num / den``; 0 where it would not help.

    For f(s) = c - 2 (s - old) num + (s - old)^2 den, the step t lowers f iff t (t den - 2 num) < 0.
    """
    old = old32.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        cand32 = np.where(den > 0, old + num / np.where(den > 0, den, 1.0), np.nan).astype(np.float32)
    step = cand32.astype(np.float64) - old
    ok = np.isfinite(step) & (cand32 > 0)
    step = np.where(ok, step, 0.0)
    return np.where(step * (step * den - 2.0 * num) < 0, step, 0.0)


def _start(
    W: np.ndarray, H: np.ndarray, grid: Grid, init: str, clip: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """Codes, scale, zero point and the mask of quantized coordinates (None: all) the descent starts from."""
    if init == "gptq":
        qw = gptq.quantize(W, H, grid, clip=clip)
    elif init in ("rtn", "float"):
        qw = rtn.quantize(W, None, grid, clip=clip)
    else:
        raise ValueError(f"unknown init {init!r}; choose one of {INITS}")
    fixed = None
    if init == "float":  # the paper: every live coordinate starts at its float value
        dead = dead_inputs(as_grouped(H))
        fixed = np.repeat(dead, W.shape[0] // H.shape[0], axis=0)
    return qw.codes.copy(), qw.scale.astype(np.float32), qw.zero_point.astype(np.int8), fixed


def resolve_order(order: str, d: int, init: str) -> str:
    """The visiting order used; "auto" picks by measurement (bench/pass_speed.py, synthetic correlated H).

    From a GPTQ start both orders reach the same error and the blocked shared order is 1.0-1.6x faster at
    every measured shape; from RTN or float starts the paper's per-channel order ends 1-9 % lower, so it is
    used unless the fan-in is so wide that its per-row gathers get slow.
    """
    if order not in ORDERS:
        raise ValueError(f"unknown order {order!r}; choose one of {ORDERS}")
    if order != "auto":
        return order
    return "shared" if init == "gptq" or d >= SHARED_MIN_DIM else "channel"


def effective_gram(H: np.ndarray, damp: float) -> np.ndarray:
    """The float64 Gram stack COMQ minimises: H plus ``damp`` x mean diagonal (per group) when damp > 0."""
    H = as_grouped(np.asarray(H, dtype=np.float64))
    if damp > 0:
        H = H.copy()
        idx = np.arange(H.shape[1])
        H[:, idx, idx] += damp * H[:, idx, idx].mean(axis=1, keepdims=True)
    return H


def quantize(
    W: np.ndarray,
    H: np.ndarray,
    grid: Grid,
    sweeps: int = 3,
    init: str = "gptq",
    order: str = "auto",
    scale_update: bool = True,
    clip: bool = True,
    damp: float = 0.0,
    block: int | None = None,
    callback: Callback | None = None,
) -> QuantWeight:
    """COMQ: ``sweeps`` coordinate-descent passes over the codes, each followed by the scale update.

    ``block`` is the lazy-block size (None: 128 for the shared order, 32 for the per-channel one; results do
    not depend on it beyond float rounding). ``callback(k, qw)`` sees the weight after sweep k (and k = 0,
    the start, unless init is "float"). Stops early once a sweep moves no code and changes no scale.
    """
    W = np.asarray(W, dtype=np.float64)
    out, d = W.shape
    H = effective_gram(H, damp)
    Ws, H = stacked(W, H)
    G, r, _ = Ws.shape
    codes, scale32, zp, fixed = _start(W, H, grid, init, clip)
    mode = resolve_order(order, d, init)
    perm = _shared_order(Ws, H) if mode == "shared" else None
    layout, restore = _layout(perm)
    params = (G, r) if grid.block_size is None else (G, r, -1)
    state = _State(
        layout(Ws),
        H if perm is None else gptq.permute_gram(H, perm),
        layout(codes.reshape(G, r, d)),
        scale32.reshape(params),
        zp.reshape(params),
        None if fixed is None else layout(fixed.reshape(G, r, d)),
        grid,
        rows_last=perm is not None,
        col_block=_column_blocks(grid, d, G, perm),
    )

    def snapshot() -> QuantWeight:
        codes_now = restore(state.codes).reshape(out, d).copy()
        return QuantWeight(codes_now, state.scale32.reshape(scale32.shape).copy(), zp.copy(), grid)

    def rescale() -> int:
        if not scale_update:
            return 0
        return update_scale(state) if grid.block_size is None else update_block_scales(state, Ws, H, layout, restore)

    if callback is not None and fixed is None:
        callback(0, snapshot())
    row_perm = _channel_order(Ws, H) if mode == "channel" else None
    for k in range(1, sweeps + 1):
        state.refresh_gradient()
        if mode == "shared":
            moves = sweep_shared(state, max(block or SHARED_BLOCK, 1))
        else:
            moves = sweep_channel(state, row_perm, max(block or CHANNEL_BLOCK, 1))
        state.fixed = None  # every live coordinate has now been visited
        changed = rescale()
        if callback is not None:
            callback(k, snapshot())
        if moves == 0 and changed == 0:
            break
    return snapshot()


def _column_blocks(grid: Grid, d: int, G: int, perm: np.ndarray | None) -> np.ndarray | None:
    """(G, d) block of each working column (columns permuted in the shared order); None per channel."""
    if grid.block_size is None:
        return None
    blocks = block_index(d, grid)
    return blocks[perm] if perm is not None else np.broadcast_to(blocks, (G, d))


def _layout(perm: np.ndarray | None) -> tuple[Callable, Callable]:
    """Maps between (G, r, d) stacks and the working layout: as is, or permuted and rows-last (shared order)."""
    if perm is None:
        return np.ascontiguousarray, lambda X: X

    groups = np.arange(perm.shape[0])[:, None]
    inverse = np.argsort(perm, axis=1)

    def to_work(X: np.ndarray) -> np.ndarray:  # transpose, then gather whole rows (cheaper than column gathers)
        return np.ascontiguousarray(X.transpose(0, 2, 1))[groups, perm]

    def from_work(X: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(X[groups, inverse].transpose(0, 2, 1))

    return to_work, from_work


def _channel_order(W: np.ndarray, H: np.ndarray) -> np.ndarray:
    """(n, d) per-row greedy order: decreasing |w_ij| sqrt(H_jj) (the paper's order)."""
    G, r, d = W.shape
    root = np.sqrt(np.maximum(np.diagonal(H, axis1=1, axis2=2), 0.0))
    score = np.abs(W) * root[:, None, :]
    return np.argsort(-score.reshape(G * r, d), axis=1, kind="stable")


def _shared_order(W: np.ndarray, H: np.ndarray) -> np.ndarray:
    """(G, d) one greedy order per group: decreasing sqrt(H_jj) x mean_i |w_ij|."""
    root = np.sqrt(np.maximum(np.diagonal(H, axis1=1, axis2=2), 0.0))
    return np.argsort(-(np.abs(W).mean(axis=1) * root), axis=1, kind="stable")


def comq_trace(W: np.ndarray, H: np.ndarray, grid: Grid, **options) -> tuple[QuantWeight, list[float]]:
    """COMQ's result and the objective after each sweep (index 0: the start, unless init is "float")."""
    Heff = effective_gram(H, options.get("damp", 0.0))
    W = np.asarray(W, dtype=np.float64)
    trace: list[float] = []

    def record(_sweep: int, qw: QuantWeight) -> None:
        trace.append(objective(W, qw.dequantize(), Heff))

    qw = quantize(W, H, grid, callback=record, **options)
    return qw, trace
