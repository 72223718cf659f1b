"""Gram shrinkage (OAS towards the diagonal) and held-out samples for the sensitivity oracle."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from onnxq.passes import Grid, comq, relative_error
from onnxq.passes.shrinkage import oas_intensity, shrink_gram


def pooled_features(rng: np.random.Generator, rows: int, mixing: np.ndarray) -> np.ndarray:
    """Correlated non-negative features, as a classifier after ReLU and global pooling sees them."""
    return np.maximum(rng.normal(size=(rows, mixing.shape[0])) @ mixing, 0)


def test_intensity_falls_as_rows_grow():
    rng = np.random.default_rng(0)
    mixing = rng.normal(size=(64, 64)) / 8
    rhos = []
    for rows in (32, 128, 4096):
        X = pooled_features(rng, rows, mixing)
        rhos.append(oas_intensity(X.T @ X / rows, rows))
    assert rhos[0] > rhos[1] > rhos[2]
    assert rhos[0] > 0.2 and rhos[2] < 0.02


def test_diagonal_and_dead_inputs_are_left_alone():
    H = np.diag([1.0, 2.0, 0.0, 3.0])
    assert oas_intensity(H, 3) == 0.0
    shrunk, rho = shrink_gram(H[None], 3)
    assert rho == 0.0 and np.array_equal(shrunk[0], H)


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 24), st.integers(1, 40), st.integers(0, 2**31 - 1))
def test_shrunk_gram_keeps_diagonal_and_stays_psd(d: int, rows: int, seed: int):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(rows, d)) * rng.uniform(0.1, 10, size=d)
    H = (X.T @ X / rows)[None]
    shrunk, rho = shrink_gram(H, rows)
    assert 0.0 <= rho <= 1.0
    assert np.allclose(np.diagonal(shrunk[0]), np.diagonal(H[0]))
    assert np.linalg.eigvalsh(shrunk[0]).min() >= -1e-9 * np.trace(H[0])
    if rows < d and rho > 0:  # a rank-deficient estimate becomes positive definite
        assert np.linalg.eigvalsh(shrunk[0]).min() > 0


def test_shrinkage_lowers_the_error_on_unseen_inputs():
    """Few rows (one per image after pooling): rounding against the raw Gram overfits those rows."""
    rng = np.random.default_rng(1)
    mixing = rng.normal(size=(96, 96)) / np.sqrt(96)
    W = rng.normal(size=(48, 96))
    train, unseen = pooled_features(rng, 48, mixing), pooled_features(rng, 4000, mixing)
    H = train.T @ train / len(train)
    H_unseen = unseen.T @ unseen / len(unseen)
    shrunk, rho = shrink_gram(H[None], len(train))
    assert rho > 0.1
    grid = Grid(2, False, None)
    plain = relative_error(W, comq.quantize(W, H, grid).dequantize(), H_unseen)
    regularised = relative_error(W, comq.quantize(W, shrunk[0], grid).dequantize(), H_unseen)
    assert regularised < 0.8 * plain
