"""Budget arithmetic of mixed precision (passes/budget.py) on plain arrays, against brute force."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onnxq.passes.budget import (
    DROP_AFTER,
    InfeasibleBudget,
    average_budget,
    clearly_worse,
    float_mac_share,
    pick_verified,
    race,
    size_budget,
    uniform_choices,
)
from onnxq.passes.clado import Candidates

WIDTHS = (2, 3, 4, 8)


@st.composite
def candidates(draw) -> Candidates:
    """Layers with a few of the widths each (some with a single one), costs = params x stored bits."""
    layers = draw(st.integers(1, 4))
    bits, costs = [], []
    for _ in range(layers):
        widths = tuple(sorted(draw(st.sets(st.sampled_from(WIDTHS), min_size=1, max_size=4))))
        params = draw(st.integers(1, 50))
        bits.append(widths)
        costs.append(tuple(float(params * (4 if b == 3 else b)) for b in widths))
    return Candidates(tuple(bits), tuple(costs))


@settings(max_examples=150, deadline=None)
@given(cands=candidates(), fraction=st.floats(0.0, 1.2))
def test_uniform_choice_is_the_widest_uniform_width_that_fits(cands, fraction):
    limit = cands.min_cost + fraction * (sum(max(c) for c in cands.costs) - cands.min_cost)
    found = uniform_choices(cands, limit)
    fitting = []  # brute force: every width all multi-width layers share, with single-width layers fixed
    for b in sorted({b for widths in cands.bits for b in widths}):
        if all(b in widths or len(widths) == 1 for widths in cands.bits):
            choice = np.array([widths.index(b) if b in widths else 0 for widths in cands.bits])
            if cands.total_cost(choice) <= limit:
                fitting.append((b, choice))
    if not fitting:
        assert found == {}
        return
    b, choice = fitting[-1]
    assert list(found) == [f"uniform {b}"]
    np.testing.assert_array_equal(found[f"uniform {b}"], choice)


def test_budgets_in_bits_and_an_impossible_size():
    assert average_budget(3.0, 1000) == 3000.0
    assert size_budget(1000, 200) == 6400
    with pytest.raises(InfeasibleBudget):
        size_budget(200, 200)


def test_float_mac_share_counts_every_width_but_8():
    cands = Candidates(((2, 8), (4,), (3, 4, 8)), ((2.0, 8.0), (4.0,), (4.0, 4.0, 8.0)))
    share = float_mac_share(cands, [10.0, 30.0, 60.0])
    np.testing.assert_allclose(share, [0.1, 0.0, 0.3, 0.6, 0.6, 0.0])


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**16), scales=st.lists(st.floats(1.0, 40.0), min_size=2, max_size=4),
       batch=st.sampled_from([8, 16, 32]))
def test_race_keeps_the_best_allocation_and_exact_means_of_what_it_measures(seed, scales, batch):
    rng = np.random.default_rng(seed)
    base = rng.gamma(2.0, 0.1, size=128)
    losses = {(i,): base * s + rng.normal(0, 0.01, base.size) for i, s in enumerate(scales)}

    def stream(key):
        for start in range(0, base.size, batch):
            yield losses[key][start:start + batch]

    means, samples = race({key: stream(key) for key in losses})
    best = min(losses, key=lambda key: losses[key].mean())
    assert samples[best] == base.size  # the best is never dropped
    for key, seen in samples.items():
        assert seen == base.size or seen >= DROP_AFTER
        assert means[key] == pytest.approx(losses[key][:seen].mean(), rel=1e-12)
        if seen < base.size:  # dropped: it was clearly worse than some allocation at that point
            assert clearly_worse(losses[key][:seen], losses[best][:seen]) or any(
                clearly_worse(losses[key][:seen], losses[other][:seen]) for other in losses if other != key)


def test_pick_prefers_the_solver_on_a_tie_and_skips_stopped_allocations():
    widths = {"solver": (4, 4), "diagonal": (2, 8), "uniform 2": (2, 2)}
    means = {(4, 4): 1.0, (2, 8): 1.0, (2, 2): 0.5}
    samples = {(4, 4): 64, (2, 8): 64, (2, 2): 32}
    picked, losses, stopped = pick_verified(widths, means, samples)
    assert picked == "solver" and stopped == {"uniform 2": 32} and losses["uniform 2"] == 0.5
    means[(2, 8)] = 0.9
    assert pick_verified(widths, means, samples)[0] == "diagonal"


def test_clearly_worse_needs_enough_samples_a_ratio_and_significance():
    best = np.linspace(0.1, 1.0, DROP_AFTER)
    assert clearly_worse(best * 3, best)
    assert not clearly_worse(best[:-1] * 3, best[:-1])  # too few samples
    assert not clearly_worse(best * 1.4, best)  # below the ratio
    flat = np.full(DROP_AFTER, 0.1)
    noisy = flat + 0.2 + np.tile([1.0, -1.0], DROP_AFTER // 2)  # 3x the mean, but 1.1 standard errors above
    assert noisy.mean() > 1.5 * flat.mean() and not clearly_worse(noisy, flat)
