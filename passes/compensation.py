"""Sequential rounding's targets: what a layer should compute when its inputs come from the already quantized
layers before it (pure numpy; ``onnxq.rounding.sequential`` measures the statistics these take).

With S = E[x~ x~^T] (the quantized stream's inputs) and C = E[x~ x^T] (quantized against float), the weight whose
output on x~ best reproduces the float output W x is ``W* = W C^T S^-1``; the mean output error left after rounding
goes into the bias.
"""

from __future__ import annotations

import numpy as np

TARGET_DAMP = 0.01  # ridge on S (fraction of its mean diagonal) when solving for W*: S is often rank-deficient


def compensated_target(W: np.ndarray, S: np.ndarray, C: np.ndarray, rows: int | None = None,
                       damp: float = TARGET_DAMP, skip: np.ndarray | None = None) -> np.ndarray:
    """``W* = W + W (C - S)^T (S + lambda I)^-1`` per Gram group: the weight that, fed the quantized model's
    inputs, best reproduces the float output. The ridge only shrinks the correction, so X~ = X gives W.

    The correction is a regression of the earlier layers' error on the d inputs, fitted on ``rows`` rows;
    its noise grows as d / rows, so it is scaled by ``max(0, 1 - d / rows)``: a classifier after pooling
    (one row per image, more inputs than images) keeps W instead of fitting the calibration images' noise.
    ``skip`` (d x out, one Gram group) is ``cov(X~, e)`` of a residual layer: the skip's error joins the target."""
    groups, d = S.shape[0], S.shape[-1]
    weight = 1.0 if rows is None else max(0.0, 1.0 - d / max(rows, 1))
    target = W.astype(np.float64).copy()
    if weight == 0.0:
        return target
    grouped = target.reshape(groups, -1, d)  # rows of each Gram group
    ridge = damp * np.maximum(np.diagonal(S, axis1=1, axis2=2).mean(axis=1), 1e-30)
    rhs = np.matmul(C - S, grouped.transpose(0, 2, 1))
    if skip is not None:
        rhs = rhs + skip[None]
    correction = np.linalg.solve(S + ridge[:, None, None] * np.eye(d), rhs).transpose(0, 2, 1)
    return (grouped + weight * correction).reshape(W.shape)


def output_mean_shift(W: np.ndarray, Q: np.ndarray, mean_float: np.ndarray, mean_quantized: np.ndarray,
                      skip_mean: np.ndarray | None = None) -> np.ndarray:
    """``W mu - Q mu~`` per output channel (``mu`` per Gram group: ``G x d``), plus the skip's mean error of a
    residual layer: the bias shift that makes the quantized layer's mean output the float one's."""
    groups = mean_float.shape[0]
    index = np.repeat(np.arange(groups), W.shape[0] // groups)
    shift = (np.einsum("od,od->o", W.astype(np.float64), mean_float[index])
             - np.einsum("od,od->o", Q.astype(np.float64), mean_quantized[index]))
    return shift if skip_mean is None else shift + skip_mean
