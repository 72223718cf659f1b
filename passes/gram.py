"""Gram matrices as the rounding passes need them: accumulated without float32 overflow, centred without
cancellation noise, and made positive semi-definite when rounding noise leaves them indefinite.

Inputs the data does not see. An input that is constant over the calibration data (one sample, a folder of
identical samples, the pooled output of an all-zero Conv) has zero centred variance, so the objective
``tr((W-Q) H (W-Q)^T)`` does not depend on how its weights round: the data cannot choose. The passes then use
the plain weight MSE there (the identity Gram, what round-to-nearest minimises). That is the principled
choice: with nothing known about how deployment inputs vary along a direction, an isotropic prior makes the
expected output error proportional to the weight error, and the fallback never overrides a direction the data
does see. It is implemented by making such inputs exactly dead (zero row and column), which every pass
already rounds to nearest (GPTQ isolates them; COMQ never moves them from its start).

Why not a ridge with an absolute floor: Gram entries carry the square of the activations' unit (1e-6 in one
model, 1e60 in another), so no fixed epsilon fits both. The noise the floor must cover is relative too: the
centred Gram ``E[xx^T] - mu mu^T`` loses precision by cancellation against the *raw* second moment, so "zero
variance" is judged against that, which the data does define, and not against the centred Gram itself (whose
diagonal is then pure noise; damping relative to it was the LinAlgError of a single calibration sample).
"""

from __future__ import annotations

import numpy as np

DEAD_RTOL = 1e-12  # an input whose H_jj is below this fraction of the group's largest H_jj never varies
# Float32 block GEMMs (at most 8192 rows) give the raw second moment to about 1e-6 relative, so a centred
# variance under this fraction of it is indistinguishable from zero: the input is constant on the data.
CANCELLATION_RTOL = 1e-5
FLOAT32_EXPONENT_LIMIT = 126  # 2**126 < float32's largest value (about 2**128), with room for rounding


def dead_inputs(H: np.ndarray) -> np.ndarray:
    """(G, d) mask of inputs with no signal in the calibration data (H_jj ~ 0): the data cannot see them."""
    diag = np.diagonal(H, axis1=1, axis2=2)
    return diag <= DEAD_RTOL * diag.max(axis=1, keepdims=True)


def centred_gram(second_moment: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """``E[x x^T] - mu mu^T`` per group (G x d x d from G x d x d and G x d), with every input that is constant
    on the calibration data made exactly dead (zero row and column) instead of left as cancellation noise."""
    with np.errstate(invalid="ignore", over="ignore"):  # Inf statistics stay visible for the caller to report
        centred = second_moment - mean[:, :, None] * mean[:, None, :]
        raw = np.diagonal(second_moment, axis1=1, axis2=2)
        constant = (np.diagonal(centred, axis1=1, axis2=2) <= CANCELLATION_RTOL * raw) & np.isfinite(raw)
    groups, inputs = np.nonzero(constant)
    centred[groups, inputs, :] = 0.0
    centred[groups, :, inputs] = 0.0
    return centred


def unseen_inputs(H: np.ndarray) -> int:
    """How many inputs (over all groups) of a grouped Gram stack the calibration data does not vary."""
    H = H[None] if H.ndim == 2 else H
    return int(dead_inputs(H).sum())


def psd_part(H: np.ndarray) -> np.ndarray:
    """The nearest PSD stack to a symmetric one whose negative eigenvalues are rounding or estimation noise.

    A Gram matrix is PSD by construction, so its most negative eigenvalue measures the noise; noise of that
    size sits in the positive eigenvalues too, so every direction whose eigenvalue is below twice that
    magnitude is treated as unseen (eigenvalue 0, left to the passes' weight-MSE fallback and damping).
    Costs an eigendecomposition: only used when a Cholesky factorisation has failed.
    """
    H = np.asarray(H, dtype=np.float64)
    H = (H + H.transpose(0, 2, 1)) / 2
    values, vectors = np.linalg.eigh(H)
    noise = 2.0 * np.maximum(-values.min(axis=1, keepdims=True), 0.0)
    kept = np.where(values > noise, values, 0.0)
    return np.matmul(vectors * kept[:, None, :], vectors.transpose(0, 2, 1))


def scaled_matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b`` as a float32 GEMM (fast), to be added into a float64 sum, without overflow: when the operands
    are so large that a product or a sum of ``k`` products could pass float32's range (values near 1e17 and
    up), both are scaled by powers of two first (exact) and the result is scaled back in float64. Otherwise
    the plain product is returned as it is (float32: the caller's float64 ``+=`` widens it, with no copy)."""
    k = a.shape[-1]
    top_a, top_b = _largest_magnitude(a), _largest_magnitude(b)
    if not (np.isfinite(top_a) and np.isfinite(top_b)):
        with np.errstate(invalid="ignore", over="ignore"):  # Inf activations: the caller reports the layer
            return np.matmul(a, b)
    if top_a * top_b * k < 2.0**FLOAT32_EXPONENT_LIMIT:
        return np.matmul(a, b)
    room = (FLOAT32_EXPONENT_LIMIT - int(np.ceil(np.log2(k)))) // 2  # each operand at most 2**room after scaling
    shift_a = max(int(np.ceil(np.log2(top_a))) - room, 0)
    shift_b = max(int(np.ceil(np.log2(top_b))) - room, 0)
    product = np.matmul(np.ldexp(a, -shift_a).astype(a.dtype), np.ldexp(b, -shift_b).astype(b.dtype))
    return np.ldexp(product.astype(np.float64), shift_a + shift_b)


def overflow_shift(x: np.ndarray) -> int:
    """The power of two to divide ``x`` by so that any sum of products of its values fits float32 (0 for
    ordinary data: only values near 1e15 and up, or non-finite ones, are ever scaled)."""
    top = _largest_magnitude(x)
    if not np.isfinite(top) or top * top * max(x.size, 1) < 2.0**FLOAT32_EXPONENT_LIMIT:
        return 0
    room = (FLOAT32_EXPONENT_LIMIT - int(np.ceil(np.log2(max(x.size, 2))))) // 2
    return max(int(np.ceil(np.log2(top))) - room, 0)


def _largest_magnitude(x: np.ndarray) -> float:
    """max |x| by two reductions (no |x| temporary the size of a calibration block); 0 for an empty array."""
    return max(float(x.max(initial=0.0)), -float(x.min(initial=0.0)))
