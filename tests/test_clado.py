"""CLADO allocation: exactness against brute force, budgets, sensitivity assembly and the Fisher estimator."""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onnxq.passes import clado
from onnxq.passes.clado import (
    Candidates,
    allocate,
    allocate_diagonal,
    evaluation_plan,
    fisher_cross,
    fisher_sensitivity,
    quadratic_value,
    sensitivity_matrix,
    with_diagonal,
)

BITS = (2, 3, 4, 8)


def measure_sensitivity(cands: Candidates, loss, max_distance: int | None = None,
                        skip_max_bits: bool = False) -> np.ndarray:
    """Omega from an oracle ``loss({layer: bits, ...})``, the way mixed.measure_omega drives the pass."""
    plan = evaluation_plan(cands, max_distance, skip_max_bits)
    single = {k: loss({k[0]: k[1]}) for k in plan.singles}
    pair = {(a, b): loss({a[0]: a[1], b[0]: b[1]}) for a, b in plan.pairs}
    return sensitivity_matrix(cands, loss({}), single, pair, skip_max_bits)


def brute_force(Omega: np.ndarray, cands: Candidates, budget: float) -> float:
    """Smallest alpha^T Omega alpha over every feasible one-hot assignment."""
    choices = np.array(list(itertools.product(*[range(k) for k in cands.sizes])))
    idx = cands.offsets[:-1] + choices
    costs = cands.cost[idx].sum(1)
    values = Omega[idx[:, :, None], idx[:, None, :]].sum((1, 2))
    return float(values[costs <= budget].min())


@st.composite
def instances(draw: st.DrawFn) -> tuple[np.ndarray, Candidates, float]:
    """Random small problems: 1-6 layers, 2-4 candidates each, indefinite Omega, integer costs."""
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    sizes = draw(st.lists(st.integers(2, 4), min_size=1, max_size=6))
    bits = tuple(tuple(sorted(rng.choice(BITS, k, replace=False).tolist())) for k in sizes)
    costs = tuple(tuple(float(c) for c in rng.integers(1, 30, k)) for k in sizes)
    cands = Candidates(bits, costs)
    M = rng.normal(size=(cands.n, cands.n)) * draw(st.sampled_from([0.01, 1.0, 100.0]))
    Omega = M + M.T
    fraction = draw(st.floats(0.0, 1.0))
    budget = float(np.floor(cands.min_cost + fraction * (cands.max_cost - cands.min_cost)))
    return Omega, cands, budget


@settings(max_examples=100, deadline=None)
@given(instances())
def test_allocate_matches_brute_force(problem: tuple) -> None:
    Omega, cands, budget = problem
    res = allocate(Omega, cands, budget, time_limit=20)
    best = brute_force(Omega, cands, budget)
    assert res.status == "optimal"
    assert res.cost <= budget
    assert res.objective == pytest.approx(quadratic_value(Omega, cands, res.choice))
    assert res.objective <= best + 1e-6 * (1 + abs(best))
    assert res.bound <= res.objective
    assert res.bits == tuple(cands.bits[i][c] for i, c in enumerate(res.choice))


@settings(max_examples=100, deadline=None)
@given(instances())
def test_milp_alone_is_exact(problem: tuple) -> None:
    """The linearised MILP by itself (no local-search incumbent) reaches the brute-force optimum."""
    Omega, cands, budget = problem
    S = clado._objective_matrix(Omega, cands)
    scale = np.abs(S).max()
    c, rows = clado.rlt_model(S / scale, cands)
    res = clado._run_milp(c, rows, cands, budget, time_limit=20, rel_gap=1e-9)
    best = brute_force(Omega, cands, budget)
    assert res.proven and cands.total_cost(res.choice) <= budget
    assert quadratic_value(Omega, cands, res.choice) == pytest.approx(best, rel=1e-6, abs=1e-9 * scale)


@settings(max_examples=60, deadline=None)
@given(instances())
def test_allocate_diagonal_is_the_knapsack_optimum(problem: tuple) -> None:
    Omega, cands, budget = problem
    D = np.diag(np.diag(Omega))
    res = allocate_diagonal(Omega, cands, budget)
    assert res.status == "optimal" and res.cost <= budget
    assert res.objective == pytest.approx(brute_force(D, cands, budget), rel=1e-9, abs=1e-9)
    assert allocate_diagonal(np.diag(Omega), cands, budget).objective == pytest.approx(res.objective)


def test_budget_at_minimum_cost() -> None:
    """HiGHS 1.12's presolve called these RLT models infeasible (tied cheapest widths, budget = minimum)."""
    cands = Candidates(((2, 3, 4, 8), (2, 3, 8), (2, 3, 8)), ((26, 5, 15, 19), (13, 29, 19), (23, 25, 23)))
    M = np.random.default_rng(0).normal(size=(cands.n, cands.n))
    Omega = M + M.T
    assert cands.min_cost == 41
    S = clado._objective_matrix(Omega, cands)
    c, rows = clado.rlt_model(S, cands)
    assert clado._run_milp(c, rows, cands, 41.0, time_limit=10, rel_gap=1e-9).proven
    res = allocate(Omega, cands, 41.0)
    assert res.status == "optimal" and res.cost == 41
    assert res.objective == pytest.approx(brute_force(Omega, cands, 41.0))


def test_indefinite_interaction_changes_the_choice() -> None:
    """A negative cross term (errors that cancel) makes two low-bit layers better than the diagonal says."""
    cands = Candidates.uniform((2, 8), [[2.0, 8.0], [2.0, 8.0]])
    Omega = np.diag([1.0, 0.1, 1.0, 0.1])
    Omega[0, 2] = Omega[2, 0] = -1.2  # (0@2, 1@2) together: 1 + 1 - 2.4 = -0.4 (measurement noise)
    assert np.linalg.eigvalsh(Omega).min() < 0
    assert allocate(Omega, cands, budget=16.0).bits == (2, 2)
    assert allocate_diagonal(Omega, cands, budget=16.0).bits == (8, 8)


def test_infeasible_budget_names_the_minimum() -> None:
    cands = Candidates.uniform(BITS, [[2, 4, 4, 8], [20, 40, 40, 80]])
    with pytest.raises(ValueError, match=r"budget >= 22"):
        allocate(np.eye(cands.n), cands, budget=21.5)
    with pytest.raises(ValueError, match=r"budget >= 22"):
        allocate_diagonal(np.eye(cands.n), cands, budget=21.5)
    assert allocate(np.eye(cands.n), cands, budget=22).bits == (2, 2)


def test_costs_only_and_bad_inputs() -> None:
    res = allocate(np.diag([3.0, 1.0, 2.0, 0.0]), [[1, 2], [1, 2]], budget=4)
    assert res.cost == 4 and res.objective == pytest.approx(1.0) and res.choice.tolist() == [1, 1]
    with pytest.raises(ValueError, match="expected"):
        allocate(np.eye(3), [[1, 2], [1, 2]], budget=3)
    with pytest.raises(ValueError, match="costs"):
        Candidates(((2, 4),), ((1.0,),))


# ------------------------------------------------------------------------------------- sensitivity


def quadratic_oracle(cands: Candidates, seed: int, zero_max_bits: bool = False):
    """L(config) = L0 + g.dw + dw^T A dw with A indefinite and dw the sum of the perturbed layers' vectors."""
    rng = np.random.default_rng(seed)
    dim = 12
    V = rng.normal(size=(cands.n, dim)) / np.repeat(np.array([max(b) for b in cands.bits]), cands.sizes)[:, None]
    if zero_max_bits:
        V[cands.max_bits_index] = 0.0
    A = rng.normal(size=(dim, dim))
    A = A + A.T
    g = rng.normal(size=dim)

    def loss(config: dict[int, int]) -> float:
        dw = sum((V[cands.index(i, b)] for i, b in config.items()), np.zeros(dim))
        return 3.0 + g @ dw + dw @ A @ dw

    return loss


def one_hot_configs(cands: Candidates, rng: np.random.Generator, count: int):
    """Random full assignments as (choice, {layer: bits})."""
    for _ in range(count):
        choice = np.array([rng.integers(k) for k in cands.sizes])
        yield choice, {i: cands.bits[i][c] for i, c in enumerate(choice)}


def test_sensitivity_recovers_a_quadratic_loss_exactly() -> None:
    cands = Candidates.uniform((2, 4, 8), np.ones((5, 3)))
    loss = quadratic_oracle(cands, seed=1)
    Omega = measure_sensitivity(cands, loss)
    assert np.allclose(Omega, Omega.T)
    same = cands.same_layer() & ~np.eye(cands.n, dtype=bool)
    assert np.all(Omega[same] == 0)
    rng = np.random.default_rng(0)
    for choice, config in one_hot_configs(cands, rng, 50):
        assert quadratic_value(Omega, cands, choice) == pytest.approx(loss(config) - loss({}), abs=1e-9)
    for (i, b), (j, c) in evaluation_plan(cands).pairs:  # every one-hot pair configuration
        a, bb = cands.index(i, b), cands.index(j, c)
        predicted = Omega[a, a] + Omega[bb, bb] + 2 * Omega[a, bb]
        assert predicted == pytest.approx(loss({i: b, j: c}) - loss({}), abs=1e-9)


def test_skip_max_bits_is_exact_when_max_bits_is_lossless() -> None:
    cands = Candidates.uniform((2, 4, 8), np.ones((4, 3)))
    loss = quadratic_oracle(cands, seed=2, zero_max_bits=True)
    calls: list[dict] = []
    Omega = measure_sensitivity(cands, lambda cfg: calls.append(cfg) or loss(cfg), skip_max_bits=True)
    assert len(calls) == evaluation_plan(cands, skip_max_bits=True).n_evaluations == 1 + 8 + 6 * 4
    assert not any(8 in cfg.values() for cfg in calls)
    assert np.all(Omega[cands.max_bits_index] == 0)
    for choice, config in one_hot_configs(cands, np.random.default_rng(1), 30):
        assert quadratic_value(Omega, cands, choice) == pytest.approx(loss(config) - loss({}), abs=1e-9)


def test_evaluation_plan_counts_and_band() -> None:
    cands = Candidates.uniform((2, 4, 8), np.ones((4, 3)))
    assert evaluation_plan(cands).n_evaluations == 1 + 12 + 6 * 9
    band = evaluation_plan(cands, max_distance=1)
    assert len(band.pairs) == 3 * 9 and all(b[0] - a[0] == 1 for a, b in band.pairs)
    loss = quadratic_oracle(cands, seed=3)
    single = {k: loss({k[0]: k[1]}) for k in band.singles}
    pair = {(a, b): loss({a[0]: a[1], b[0]: b[1]}) for a, b in band.pairs}
    Omega = sensitivity_matrix(cands, loss({}), single, pair)
    far = np.abs(np.subtract.outer(cands.layer, cands.layer)) > 1
    assert np.all(Omega[far] == 0)  # unmeasured pairs count as independent
    with pytest.raises(ValueError, match="single"):
        sensitivity_matrix(cands, 0.0, {}, {})
    with pytest.raises(ValueError, match="same layer"):
        sensitivity_matrix(cands, 0.0, single, {((0, 2), (0, 4)): 1.0})


def test_fisher_estimator_matches_explicit_fisher() -> None:
    rng = np.random.default_rng(4)
    N, K = 10, 5
    cands = Candidates.uniform((2, 4, 8), np.ones((3, 3)))
    logits = rng.normal(size=(N, K))
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    deltas = {k: rng.normal(size=(N, K)) for k in cands.keys if k != (2, 8)}  # one candidate not measured
    Omega = fisher_sensitivity(cands, deltas, p, chunk=3)
    F = np.stack([np.diag(ps) - np.outer(ps, ps) for ps in p])  # (N, K, K)
    for a, ka in enumerate(cands.keys):
        for b, kb in enumerate(cands.keys):
            if ka not in deltas or kb not in deltas or (ka[0] == kb[0] and a != b):
                assert Omega[a, b] == 0
                continue
            direct = 0.5 * np.mean(np.einsum("sk,skl,sl->s", deltas[ka], F, deltas[kb]))
            assert Omega[a, b] == pytest.approx(direct, rel=1e-10, abs=1e-12)
            assert fisher_cross(deltas[ka], deltas[kb], p) == pytest.approx(direct, rel=1e-10, abs=1e-12)
    measured = rng.uniform(size=cands.n)
    assert np.array_equal(np.diag(with_diagonal(Omega, measured)), measured)


def test_fisher_quadratic_form_is_second_order_kl() -> None:
    rng = np.random.default_rng(5)
    z, d = rng.normal(size=(4, 6)), 1e-3 * rng.normal(size=(4, 6))
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    q = np.exp(z + d) / np.exp(z + d).sum(1, keepdims=True)
    kl = np.mean((p * np.log(p / q)).sum(1))
    assert fisher_cross(d, d, p) == pytest.approx(kl, rel=1e-2)


# ------------------------------------------------------------------------------------------ scale


def clado_like(n_layers: int, seed: int) -> tuple[np.ndarray, Candidates, float]:
    """Positive diagonal falling 4x per bit, small noisy cross terms (indefinite), budget 3 bits/weight."""
    rng = np.random.default_rng(seed)
    params = np.exp(rng.uniform(np.log(1e4), np.log(1e6), n_layers)).round()
    cands = Candidates.uniform(BITS, params[:, None] * np.array([2.0, 4.0, 4.0, 8.0]))
    diag = (np.exp(rng.normal(-3, 1, n_layers))[:, None] * 4.0 ** -(np.array(BITS) - 2.0)).ravel()
    noise = rng.normal(0, 0.1, (cands.n, cands.n))
    Omega = 0.5 * (noise + noise.T) * np.sqrt(np.outer(diag, diag))
    np.fill_diagonal(Omega, diag)
    return Omega, cands, float(3 * params.sum())


def test_large_instance_returns_within_time_limit() -> None:
    Omega, cands, budget = clado_like(40, seed=0)
    assert np.linalg.eigvalsh(Omega).min() < 0
    t0 = time.perf_counter()
    res = allocate(Omega, cands, budget, time_limit=8)
    assert time.perf_counter() - t0 < 8 + 3  # model building and decoding on top of HiGHS's limit
    assert res.cost <= budget and np.isfinite(res.objective) and res.bound <= res.objective
    assert res.status == "optimal" or res.gap > 0
    naive = allocate_diagonal(Omega, cands, budget)
    assert res.objective <= quadratic_value(Omega, cands, naive.choice) + 1e-12


def test_measured_widths_are_those_up_to_four_bits_or_the_narrowest() -> None:
    assert clado.measured_widths((2, 3, 4, 8)) == (2, 3, 4)
    assert clado.measured_widths((8, 4, 2)) == (2, 4)
    assert clado.measured_widths((4, 8)) == (4,)
    assert clado.measured_widths((5, 6, 8)) == (5,)
    assert clado.measured_widths((8,)) == (8,)


def test_wider_widths_scale_with_the_rounding_error_from_the_widest_measured_one() -> None:
    """A loss increase that is linear in the rounding error above 4 bits is reproduced exactly, and the output
    change of an estimated width is its source's scaled by sqrt(error ratio)."""
    bits = (2, 3, 4, 6, 8)
    cands = Candidates.uniform(bits, np.ones((3, len(bits))))
    rng = np.random.default_rng(0)
    errors = {(i, b): float(rng.uniform(0.5, 2.0) * 4.0 ** -b) for i in range(3) for b in bits}
    slope = (1.0, 5.0, 0.2)
    measured = {(i, b): slope[i] * errors[(i, b)] ** 1.4 for i in range(3) for b in clado.measured_widths(bits)}
    estimates = clado.estimated_singles(cands, measured, errors)
    assert set(estimates) == {(i, b) for i in range(3) for b in (6, 8)}
    for (i, b), estimate in estimates.items():
        assert estimate.source == (i, 4)
        assert estimate.ratio == pytest.approx(errors[(i, b)] / errors[(i, 4)])
        assert estimate.increase == pytest.approx(measured[(i, 4)] * errors[(i, b)] / errors[(i, 4)], rel=1e-12)
    with pytest.raises(ValueError, match="no measured width"):
        clado.estimated_singles(cands, {(0, 2): 1.0}, errors)


def test_local_search_runs_only_when_highs_proves_nothing(monkeypatch) -> None:
    """A proven optimum is returned without the local search's seconds; an unproven one still gets its incumbent."""
    calls = []
    search = clado.local_search
    monkeypatch.setattr(clado, "local_search", lambda *a, **k: calls.append(1) or search(*a, **k))
    Omega, cands, budget = clado_like(6, seed=1)
    res = allocate(Omega, cands, budget, time_limit=20)
    assert res.status == "optimal" and res.source == "milp" and not calls
    best = brute_force(Omega, cands, budget)
    assert res.objective <= best + 1e-6 * (1 + abs(best))
    Omega, cands, budget = clado_like(40, seed=0)
    res = allocate(Omega, cands, budget, time_limit=1.0, heuristic_seconds=0.3)
    assert res.status == "time_limit" and calls == [1]
    assert res.cost <= budget and res.bound <= res.objective
