"""Rounding passes (RTN, GPTQ, COMQ): grid invariants, objective guarantees, exactness of fast paths."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from onnxq.passes import ROUNDING_PASSES, Grid, QuantWeight, comq, gptq, objective, rtn
from onnxq.passes.grid import SUPPORTED_BITS

GRAM_KINDS = ("correlated", "rank_deficient", "dead_inputs", "unnormalised", "identity")
SETTINGS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")  # no division by zero, overflow or NaN


def gram(rng: np.random.Generator, d: int, kind: str, groups: int = 1) -> np.ndarray:
    """A (groups, d, d) PSD stack of the given kind (float64, possibly singular)."""
    stack = []
    for _ in range(groups):
        if kind == "identity":
            stack.append(np.eye(d))
            continue
        n = max(1, d // 2) if kind == "rank_deficient" else 4 * d + 8
        X = rng.standard_normal((n, d)) @ (np.eye(d) + 0.7 * rng.standard_normal((d, d)))
        if kind == "dead_inputs":
            X[:, rng.random(d) < 0.3] = 0.0
        H = X.T @ X
        stack.append(H * 2.0**30 if kind == "unnormalised" else H / n)
    return np.stack(stack)


def weights(rng: np.random.Generator, out: int, d: int) -> np.ndarray:
    """Heavy-tailed weights with one all-zero row and one constant row when there is room."""
    W = rng.standard_t(4, size=(out, d)) * 0.1
    if out >= 4:
        W[1] = 0.0
        W[2] = 0.05
    return W


def f64_dequant(qw: QuantWeight) -> np.ndarray:
    """(codes - zp) * scale in float64, the exact value the float32 ``dequantize`` rounds."""
    return (qw.codes.astype(np.float64) - qw.zero_point[:, None]) * qw.scale.astype(np.float64)[:, None]


def check_quant_weight(qw: QuantWeight, W: np.ndarray, grid: Grid) -> None:
    """Codes and zero points in range, positive finite scales, no NaN, dequantize consistent."""
    assert qw.codes.shape == W.shape and qw.codes.dtype == np.int8
    assert qw.codes.min() >= grid.qmin and qw.codes.max() <= grid.qmax
    assert qw.zero_point.dtype == np.int8 and qw.scale.dtype == np.float32
    assert np.all((qw.zero_point >= grid.qmin) & (qw.zero_point <= grid.qmax))
    if grid.symmetric:
        assert np.all(qw.zero_point == 0)
    assert np.all(np.isfinite(qw.scale)) and np.all(qw.scale > 0)
    Q = qw.dequantize()
    assert np.all(np.isfinite(Q))
    np.testing.assert_allclose(Q, f64_dequant(qw), rtol=1e-6, atol=0)


def non_increasing(trace: list[float]) -> bool:
    """Every value at most the previous one, up to float rounding of the objective itself."""
    tol = 1e-9 * max(abs(trace[0]), 1e-300)
    return all(b <= a + tol for a, b in zip(trace, trace[1:], strict=False))


problems = st.fixed_dictionaries(
    {
        "seed": st.integers(0, 2**32 - 1),
        "out": st.integers(1, 12),
        "d": st.integers(1, 24),
        "bits": st.sampled_from(SUPPORTED_BITS),
        "symmetric": st.booleans(),
        "kind": st.sampled_from(GRAM_KINDS),
        "grouped": st.sampled_from(("one", "two", "depthwise")),
    }
)


def build(p: dict) -> tuple[np.ndarray, np.ndarray, Grid]:
    """W, grouped H and grid for one hypothesis example."""
    rng = np.random.default_rng(p["seed"])
    out = p["out"] * 2 if p["grouped"] == "two" else p["out"]
    groups = {"one": 1, "two": 2, "depthwise": out}[p["grouped"]]
    return weights(rng, out, p["d"]), gram(rng, p["d"], p["kind"], groups), Grid(p["bits"], p["symmetric"])


# --- RTN ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("clip", [False, True])
def test_rtn_codes_are_nearest_on_grid(bits: int, symmetric: bool, clip: bool) -> None:
    rng = np.random.default_rng(bits * 10 + symmetric)
    grid = Grid(bits, symmetric)
    W = rng.standard_t(3, size=(16, 40))
    qw = rtn.quantize(W, None, grid, clip=clip)
    check_quant_weight(qw, W, grid)
    levels = np.arange(grid.qmin, grid.qmax + 1, dtype=np.float64)
    values = (levels[None, :] - qw.zero_point[:, None]) * qw.scale.astype(np.float64)[:, None]  # out x L
    dist = np.abs(W[:, :, None] - values[:, None, :])
    chosen = np.abs(W - f64_dequant(qw))
    assert np.all(chosen <= dist.min(axis=2) + 1e-12 * qw.scale[:, None])


# --- invariants of every pass ------------------------------------------------------------------------

VARIANTS = {
    "rtn": lambda W, H, g: rtn.quantize(W, H, g),
    "gptq": lambda W, H, g: gptq.quantize(W, H, g),
    "gptq-natural-noclip": lambda W, H, g: gptq.quantize(W, H, g, act_order=False, clip=False, block=3),
    "comq": lambda W, H, g: comq.quantize(W, H, g),
    "comq-rtn-channel": lambda W, H, g: comq.quantize(W, H, g, init="rtn", order="channel"),
    "comq-float-shared": lambda W, H, g: comq.quantize(W, H, g, init="float", order="shared", block=4),
    "comq-damped": lambda W, H, g: comq.quantize(W, H, g, damp=0.1, sweeps=2),
}


def test_passes_are_registered() -> None:
    assert {"rtn", "gptq", "comq"} <= set(ROUNDING_PASSES)
    assert ROUNDING_PASSES["gptq"] is gptq.quantize and ROUNDING_PASSES["comq"] is comq.quantize


@SETTINGS
@given(problems)
def test_every_pass_keeps_grid_invariants(p: dict) -> None:
    W, H, grid = build(p)
    for name, fn in VARIANTS.items():
        qw = fn(W, H, grid)
        check_quant_weight(qw, W, grid)
        assert np.isfinite(objective(W, qw.dequantize(), H)), name


@SETTINGS
@given(problems, st.sampled_from(("channel", "shared")))
def test_comq_never_raises_objective(p: dict, order: str) -> None:
    W, H, grid = build(p)
    rtn_obj = objective(W, rtn.quantize(W, H, grid).dequantize(), H)
    gptq_obj = objective(W, gptq.quantize(W, H, grid).dequantize(), H)
    for init, start in (("rtn", rtn_obj), ("gptq", gptq_obj)):
        _, trace = comq.comq_trace(W, H, grid, init=init, order=order, block=5)
        assert trace[0] == pytest.approx(start, rel=1e-12, abs=1e-300)
        assert non_increasing(trace), (init, trace)
        assert trace[-1] <= start + 1e-9 * abs(start)
    _, trace = comq.comq_trace(W, H, grid, init="float", order=order, sweeps=4)
    assert non_increasing(trace), trace  # after the first sweep every coordinate is on the grid


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_comq_with_damping_descends_its_own_objective(bits: int) -> None:
    rng = np.random.default_rng(bits)
    W, H = weights(rng, 10, 30), gram(rng, 30, "rank_deficient")
    _, trace = comq.comq_trace(W, H, Grid(bits), damp=0.05, init="rtn", sweeps=4)
    assert non_increasing(trace)


# --- quality on a correlated layer (fixed seeds, not properties) -------------------------------------


def correlated_layer(seed: int, out: int = 48, d: int = 96) -> tuple[np.ndarray, np.ndarray]:
    """A layer whose inputs share a low-rank component: the case GPTQ and COMQ exist for."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((1024, d)) + rng.standard_normal((1024, 8)) @ rng.standard_normal((8, d))
    return rng.standard_t(5, size=(out, d)) * 0.05, X.T @ X


@pytest.mark.parametrize("bits", (2, 3, 4))
@pytest.mark.parametrize("symmetric", [False, True])
def test_gptq_and_comq_beat_rtn_on_correlated_inputs(bits: int, symmetric: bool) -> None:
    W, H = correlated_layer(bits)
    grid = Grid(bits, symmetric)
    e_rtn = objective(W, rtn.quantize(W, H, grid).dequantize(), H)
    e_gptq = objective(W, gptq.quantize(W, H, grid).dequantize(), H)
    e_comq = objective(W, comq.quantize(W, H, grid).dequantize(), H)
    assert e_gptq < 0.5 * e_rtn
    assert e_comq < e_gptq


def test_comq_scale_update_helps() -> None:
    W, H = correlated_layer(7)
    grid = Grid(3)
    fixed = objective(W, comq.quantize(W, H, grid, scale_update=False).dequantize(), H)
    updated = objective(W, comq.quantize(W, H, grid).dequantize(), H)
    assert updated <= fixed


# --- GPTQ against a literal port of the reference algorithm ------------------------------------------


def reference_gptq(W: np.ndarray, H: np.ndarray, grid: Grid, act_order: bool, percdamp: float) -> np.ndarray:
    """Frantar et al.'s loop, unblocked: U = chol(H^-1) upper, err_i = (w_i - q_i)/U_ii, W -= err U_i."""
    scale, zp = rtn.initial_grid(W, grid, clip=True)
    H = H + percdamp * np.mean(np.diag(H)) * np.eye(len(H))
    perm = np.argsort(-np.diag(H), kind="stable") if act_order else np.arange(len(H))
    Wc, H = W[:, perm].copy(), H[np.ix_(perm, perm)]
    U = np.linalg.cholesky(np.linalg.inv(H)).T
    codes = np.empty(W.shape, dtype=np.int8)
    for i in range(W.shape[1]):
        k = np.clip(np.rint(Wc[:, i] / scale.astype(np.float64)) + zp, grid.qmin, grid.qmax).astype(np.int8)
        q = ((k.astype(np.float32) - zp.astype(np.float32)) * scale).astype(np.float64)
        err = (Wc[:, i] - q) / U[i, i]
        Wc[:, i:] -= np.outer(err, U[i, i:])
        codes[:, perm[i]] = k
    return codes


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("bits", (2, 4, 8))
def test_gptq_matches_reference_loop(act_order: bool, bits: int) -> None:
    W, H = correlated_layer(bits, out=16, d=40)
    grid = Grid(bits)
    expected = reference_gptq(W, H, grid, act_order, 0.01)
    for block in (1, 7, 128):
        qw = gptq.quantize(W, H, grid, act_order=act_order, block=block)
        np.testing.assert_array_equal(qw.codes, expected)


def test_gptq_large_fan_in_and_indefinite_gram() -> None:
    """The in-place LAPACK path (d > 64), including the retry with more damping on a singular H."""
    rng = np.random.default_rng(0)
    W, H = correlated_layer(1, out=8, d=150)
    grid = Grid(4)
    np.testing.assert_array_equal(gptq.quantize(W, H, grid).codes, reference_gptq(W, H, grid, True, 0.01))
    X = rng.standard_normal((20, 150))
    qw = gptq.quantize(W, X.T @ X, grid, percdamp=0.0)  # rank 20 of 150: Cholesky fails, then retried
    check_quant_weight(qw, W, grid)


# --- exactness of the fast paths ---------------------------------------------------------------------


@pytest.mark.parametrize("order", ("shared", "channel"))
@pytest.mark.parametrize("init", ("gptq", "rtn", "float"))
@pytest.mark.parametrize("kind", ("correlated", "dead_inputs"))
def test_comq_blocked_equals_unblocked(order: str, init: str, kind: str) -> None:
    rng = np.random.default_rng(3)
    W, H = weights(rng, 24, 70), gram(rng, 70, kind, groups=2)
    grid = Grid(3)
    # shared: one block = plain rank-one updates of all of G; channel: blocks of one step = the same
    ref = comq.quantize(W, H, grid, init=init, order=order, block=70 if order == "shared" else 1)
    for block in (1, 8, 33, 70):
        got = comq.quantize(W, H, grid, init=init, order=order, block=block)
        np.testing.assert_array_equal(got.codes, ref.codes)
        np.testing.assert_allclose(got.scale, ref.scale, rtol=1e-9)


def test_comq_sparse_code_gram_update_is_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(4)
    W, H = weights(rng, 12, 30), gram(rng, 30, "correlated", groups=3)
    grid = Grid(3)
    results = []
    for threshold in (0.0, 1.0):  # always a GEMM, always the sparse update
        monkeypatch.setattr(comq, "SPARSE_UPDATE_MAX", threshold)
        results.append(comq.quantize(W, H, grid, init="rtn", order="channel", sweeps=5))
    np.testing.assert_array_equal(results[0].codes, results[1].codes)
    np.testing.assert_allclose(results[0].scale, results[1].scale, rtol=1e-9)


GROUPED_PASSES = {
    "gptq": lambda W, H, g: gptq.quantize(W, H, g),
    "comq-channel": lambda W, H, g: comq.quantize(W, H, g, order="channel", init="rtn"),
    "comq-shared": lambda W, H, g: comq.quantize(W, H, g, order="shared", block=4),
    "comq-float": lambda W, H, g: comq.quantize(W, H, g, init="float"),
}


@pytest.mark.parametrize("name", GROUPED_PASSES)
@pytest.mark.parametrize(("groups", "rows", "d"), [(3, 4, 20), (30, 1, 9), (2, 3, 80)])
def test_grouped_gram_equals_separate_groups(name: str, groups: int, rows: int, d: int) -> None:
    rng = np.random.default_rng(groups + d)
    W, H = weights(rng, groups * rows, d), gram(rng, d, "dead_inputs", groups)
    grid = Grid(4)
    fn = GROUPED_PASSES[name]
    whole = fn(W, H, grid)
    for g in range(groups):
        part = fn(W[g * rows : (g + 1) * rows], H[g], grid)
        np.testing.assert_array_equal(whole.codes[g * rows : (g + 1) * rows], part.codes)
        np.testing.assert_array_equal(whole.scale[g * rows : (g + 1) * rows], part.scale)


@pytest.mark.parametrize("name", GROUPED_PASSES)
def test_gram_scale_does_not_matter(name: str) -> None:
    rng = np.random.default_rng(5)
    W, H = weights(rng, 10, 25), gram(rng, 25, "correlated")
    a, b = GROUPED_PASSES[name](W, H, Grid(3)), GROUPED_PASSES[name](W, H * 2.0**40, Grid(3))
    np.testing.assert_array_equal(a.codes, b.codes)
    np.testing.assert_array_equal(a.scale, b.scale)


# --- degenerate inputs -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("symmetric", [False, True])
def test_zero_rows_are_exact(name: str, symmetric: bool) -> None:
    rng = np.random.default_rng(6)
    W, H = weights(rng, 8, 16), gram(rng, 16, "correlated")
    W[[0, 5]] = 0.0
    grid = Grid(4, symmetric)
    qw = VARIANTS[name](W, H, grid)
    for i in (0, 5):
        assert np.all(qw.codes[i] == qw.zero_point[i])
        assert np.all(qw.dequantize()[i] == 0.0)


def test_all_zero_weight_and_gram() -> None:
    W, H = np.zeros((4, 6)), np.zeros((6, 6))
    for fn in VARIANTS.values():
        qw = fn(W, H, Grid(2))
        check_quant_weight(qw, W, Grid(2))
        assert np.all(qw.dequantize() == 0.0)


@pytest.mark.parametrize("bits", (2, 3))
def test_dead_inputs_keep_their_start_codes(bits: int) -> None:
    rng = np.random.default_rng(bits)
    W, H = weights(rng, 12, 20), gram(rng, 20, "correlated")[0]
    dead = np.array([0, 7, 19])
    H[dead, :] = 0.0
    H[:, dead] = 0.0
    grid = Grid(bits)
    rtn_codes = rtn.quantize(W, H, grid).codes
    np.testing.assert_array_equal(gptq.quantize(W, H, grid).codes[:, dead], rtn_codes[:, dead])
    for order in ("channel", "shared"):
        for init in ("rtn", "float"):
            qw = comq.quantize(W, H, grid, init=init, order=order, scale_update=False)
            np.testing.assert_array_equal(qw.codes[:, dead], rtn_codes[:, dead])


def test_scale_update_keeps_old_scale_when_new_one_is_invalid_or_worse() -> None:
    W = np.array([[0.3, -0.2, 0.1, 0.4], [0.3, -0.2, 0.1, 0.4], [0.0, 0.0, 0.0, 0.0], [0.3, -0.2, 0.1, 0.4]])
    H = np.eye(4)[None]
    codes = np.array([[3, -2, 1, 4], [-3, 2, -1, -4], [0, 0, 0, 0], [3, -2, 1, 4]], dtype=np.int8)[None]
    scale = np.array([[0.1, 0.1, 0.1, 0.1]], dtype=np.float32)  # row 0 and 3: exact already
    scale[0, 3] = 0.2  # row 3: the least-squares scale 0.1 is better
    state = comq._State(W[None], H, codes, scale, np.zeros((1, 4)), None, Grid(4, True), rows_last=False)
    assert comq.update_scale(state) == 1
    np.testing.assert_array_equal(state.scale32[0], np.float32([0.1, 0.1, 0.1, 0.1]))  # row 1: k.Hw < 0
    np.testing.assert_allclose(state.Q[0, 3], W[3], rtol=1e-6)


def test_symmetric_comq_keeps_zero_point_zero() -> None:
    W, H = correlated_layer(11, out=12, d=30)
    for bits in SUPPORTED_BITS:
        qw = comq.quantize(W, H, Grid(bits, symmetric=True), init="rtn", sweeps=4)
        assert np.all(qw.zero_point == 0)


def test_invalid_options_raise() -> None:
    W, H = correlated_layer(0, out=4, d=8)
    with pytest.raises(ValueError):
        comq.quantize(W, H, Grid(4), init="bogus")
    with pytest.raises(ValueError):
        comq.quantize(W, H, Grid(4), order="bogus")
    with pytest.raises(ValueError):
        gptq.quantize(W, np.stack([H, H, H]), Grid(4))  # 4 rows do not split into 3 groups
