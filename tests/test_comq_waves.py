"""COMQ's shared-order sweep in waves equals the coordinate-by-coordinate sweep it replaced, code for code."""

from __future__ import annotations

import numpy as np
import pytest
from test_passes import gram, weights

from onnxq.passes import Grid, comq, objective
from onnxq.passes.comq import _proposal


def stepwise_sweep_shared(state, block: int) -> int:
    """The plain shared-order sweep: one coordinate at a time for all rows, lazy blocks of ``block``."""
    G, d, r = state.W.shape
    H, S64 = state.H, state.S32.astype(np.float64)
    moves = 0
    for b1 in range(0, d, block):
        b2 = min(b1 + block, d)
        D = np.zeros((G, b2 - b1, r))
        for t in range(b1, b2):
            fixed = None if state.fixed is None else state.fixed[:, t]
            q = state.Q[:, t]
            k, qn, move = _proposal(state.grid, q, state.Gr[:, t], state.hsafe[:, t, None], S64[:, t],
                                    state.S32[:, t], state.Z[:, t], fixed, state.live[:, t, None])
            if not move.any():
                continue
            moves += int(move.sum())
            dq = np.where(move, q - qn, 0.0)
            state.Gr[:, t + 1 : b2] += H[:, t, t + 1 : b2, None] * dq[:, None, :]
            D[:, t - b1] = dq
            q[...] = np.where(move, qn, q)
            state.codes[:, t] = np.where(move, k, state.codes[:, t])
            if fixed is not None:
                fixed |= move
        if b2 < d and D.any():
            state.Gr[:, b2:] += np.matmul(H[:, b2:, b1:b2], D)
    return moves


def run_both(monkeypatch: pytest.MonkeyPatch, W: np.ndarray, H: np.ndarray, grid: Grid, **options):
    """(waves, stepwise) results and the number of moves each sweep made under the wave sweep."""
    moves: list[int] = []
    waves = comq.sweep_shared

    def counted(state, block):
        moves.append(waves(state, block))
        return moves[-1]

    monkeypatch.setattr(comq, "sweep_shared", counted)
    got = comq.quantize(W, H, grid, order="shared", **options)
    monkeypatch.setattr(comq, "sweep_shared", stepwise_sweep_shared)
    ref = comq.quantize(W, H, grid, order="shared", **options)
    return got, ref, moves


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("grid", [Grid(4), Grid(3, symmetric=True), Grid(4, block_size=16), Grid(2, block_size=8)])
@pytest.mark.parametrize("init", ["gptq", "rtn", "float"])
def test_wave_sweep_equals_the_stepwise_sweep(monkeypatch: pytest.MonkeyPatch, seed: int, grid: Grid,
                                              init: str) -> None:
    rng = np.random.default_rng(seed)
    d = [40, 64, 97, 130][seed]  # a block cut by the fan-in, exactly two blocks, odd sizes
    kind = ["correlated", "dead_inputs", "correlated", "rank_deficient"][seed]
    groups = 2 if seed == 2 else 1
    W, H = weights(rng, 6 * groups * (seed + 1), d), gram(rng, d, kind, groups=groups)
    got, ref, moves = run_both(monkeypatch, W, H, grid, init=init, block=32, sweeps=3)
    np.testing.assert_array_equal(got.codes, ref.codes)
    np.testing.assert_array_equal(got.scale, ref.scale)
    assert sum(moves) > 0  # the sweeps did move codes, so the waves were exercised
    assert objective(W, got.dequantize(), H) <= objective(W, comq.quantize(W, H, grid, init=init, sweeps=0)
                                                          .dequantize(), H) * (1 + 1e-12)


def test_a_row_moving_at_many_coordinates_of_one_block(monkeypatch: pytest.MonkeyPatch) -> None:
    """From a float start every coordinate moves: one block needs as many waves as it has columns."""
    rng = np.random.default_rng(11)
    W, H = weights(rng, 5, 50), gram(rng, 50, "correlated")
    got, ref, moves = run_both(monkeypatch, W, H, Grid(3), init="float", block=50, sweeps=2)
    np.testing.assert_array_equal(got.codes, ref.codes)
    assert moves[0] >= W.size - 5  # (nearly) every weight moved off its float value in the first sweep
