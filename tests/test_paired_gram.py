"""Sequential rounding's paired statistics (x~^T x~, x~^T x and both row sums) must equal those of the exact
im2col rows of both streams, computed here independently in float64 output pixel by output pixel, for every
Conv geometry the paired kernels take apart (direct columns, depthwise tiles and their left-over pixels,
pointwise pixels gathered across samples), for Gemm/MatMul rows, and when both streams are the same array."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onnxq.calibration import gram, lag_gram
from onnxq.graph.layers import Layer
from onnxq.rounding.sequential import PairedStats


def conv_layer(channels: int, groups: int, kernel: int, stride: int, dilation: int, pads: list[int]) -> Layer:
    conv = dict(kernel_shape=[kernel, kernel], strides=[stride, stride], pads=pads, dilations=[dilation, dilation],
                auto_pad="NOTSET")
    return Layer("conv", "Conv", "w", "x", (2 * groups, channels // groups, kernel, kernel), groups=groups,
                 conv=conv)


def reference_rows(x: np.ndarray, layer: Layer) -> np.ndarray:
    """float64 im2col ``(groups, rows, fan_in)`` of a 2-D Conv input, one output pixel at a time."""
    conv = layer.conv
    top, left, bottom, right = conv["pads"]
    padded = np.pad(x.astype(np.float64), [(0, 0), (0, 0), (top, bottom), (left, right)])
    (k, _), (s, _), (d, _) = conv["kernel_shape"], conv["strides"], conv["dilations"]
    out = [(padded.shape[axis] - (k - 1) * d - 1) // s + 1 for axis in (2, 3)]
    patches = [padded[n, :, i * s:i * s + (k - 1) * d + 1:d, j * s:j * s + (k - 1) * d + 1:d]
               for n in range(x.shape[0]) for i in range(out[0]) for j in range(out[1])]
    return np.array(patches).reshape(len(patches), layer.groups, -1).transpose(1, 0, 2)


def assert_paired(stats: PairedStats, rows_q: np.ndarray, rows_f: np.ndarray) -> None:
    stats.settle()
    for got, expected in ((stats.gram, np.einsum("gri,grj->gij", rows_q, rows_q)),
                          (stats.cross, np.einsum("gri,grj->gij", rows_q, rows_f))):
        assert np.abs(got - expected).max() <= 2e-6 * max(np.abs(expected).max(), 1e-30)
    for got, rows in ((stats.sum_quantized, rows_q), (stats.sum_float, rows_f)):
        assert (np.abs(got - rows.sum(axis=1)) / (np.abs(rows).sum(axis=1) + 1e-30)).max() < 2e-6
    assert stats.rows == rows_q.shape[1]


def stream_pair(rng: np.random.Generator, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    x_f = rng.normal(size=shape).astype(np.float32)
    return (x_f + 0.3 * rng.normal(size=shape)).astype(np.float32), x_f


@settings(max_examples=60, deadline=None)
@given(group_kind=st.sampled_from(["dense", "grouped", "depthwise"]), kernel=st.integers(1, 4),
       stride=st.integers(1, 2), dilation=st.integers(1, 2), pads=st.lists(st.integers(0, 2), min_size=4, max_size=4),
       size=st.integers(5, 17), batch=st.integers(1, 3), tile_min=st.sampled_from([1, gram.TILE_MIN_COLUMNS]),
       block_rows=st.sampled_from([7, 8192]), chunk=st.sampled_from([200, 1 << 23]), same=st.booleans(),
       seed=st.integers(0, 2**16))
def test_paired_conv_stats_match_exact_im2col(group_kind, kernel, stride, dilation, pads, size, batch, tile_min,
                                              block_rows, chunk, same, seed):
    channels = 4
    groups = {"dense": 1, "grouped": 2, "depthwise": channels}[group_kind]
    if size + min(pads[0] + pads[2], pads[1] + pads[3]) <= (kernel - 1) * dilation:
        return
    layer = conv_layer(channels, groups, kernel, stride, dilation, pads)
    x_q, x_f = stream_pair(np.random.default_rng(seed), (batch, channels, size, size + 1))
    if same:
        x_q = x_f
    with pytest.MonkeyPatch.context() as patch:  # small blocks, chunks and tiles reach every code path
        patch.setattr(gram, "TILE_MIN_COLUMNS", tile_min)
        patch.setattr("onnxq.rounding.paired_gram.GRAM_BLOCK_ROWS", block_rows)
        patch.setattr("onnxq.rounding.paired_gram.COLUMN_CHUNK_ELEMENTS", chunk)
        stats = PairedStats.empty(layer)
        stats.merge(x_q, x_f, layer, None)
        stats.merge(x_q[:1], x_q[:1] if same else x_f[:1], layer, None)
    rows_q = np.concatenate([reference_rows(x_q, layer), reference_rows(x_q[:1], layer)], axis=1)
    rows_f = np.concatenate([reference_rows(x_f, layer), reference_rows(x_f[:1], layer)], axis=1)
    assert_paired(stats, rows_q, rows_f)


@pytest.mark.parametrize(("shape", "per_block"), [((5, 3, 4, 6), 8192), ((5, 3, 4, 6), 48), ((2, 3, 9, 9), 50)])
def test_paired_pointwise_gathers_samples_without_mixing_them_up(shape, per_block, monkeypatch):
    """Pixels of several samples go through one GEMM (or one sample's pixels through several)."""
    monkeypatch.setattr("onnxq.rounding.paired_gram.GRAM_BLOCK_ROWS", per_block)
    layer = conv_layer(3, 1, 1, 1, 1, [0, 0, 0, 0])
    x_q, x_f = stream_pair(np.random.default_rng(2), shape)
    stats = PairedStats.empty(layer)
    stats.merge(x_q, x_f, layer, None)
    assert_paired(stats, reference_rows(x_q, layer), reference_rows(x_f, layer))


@pytest.mark.parametrize("trans_a", [False, True])
def test_paired_gemm_rows(trans_a):
    layer = Layer("g", "Gemm", "w", "x", (5, 6), trans_a=trans_a)
    x_q, x_f = stream_pair(np.random.default_rng(4), (6, 9) if trans_a else (9, 6))
    stats = PairedStats.empty(layer)
    stats.merge(x_q, x_f, layer, None)
    rows_q, rows_f = (x.T if trans_a else x for x in (x_q, x_f))
    assert_paired(stats, rows_q[None].astype(np.float64), rows_f[None].astype(np.float64))


@pytest.mark.parametrize("same", [False, True])
def test_paired_stats_of_inputs_past_float32s_range_are_the_scaled_ones(same):
    """Inputs near 1e25: their float32 products overflow, so the batch is summed again scaled by a power of two;
    the sums (the skip's too) are the unit-scale ones times 1e50 (1e25 for the row sums)."""
    rng = np.random.default_rng(6)
    layer = Layer("m", "MatMul", "w", "x", (4, 6), transposed=True)
    x_q, x_f = stream_pair(rng, (3, 5, 4))
    if same:
        x_q = x_f
    error = rng.normal(size=(3, 5, 6)).astype(np.float32)
    plain, huge = PairedStats.empty(layer), PairedStats.empty(layer)
    plain.merge(x_q, x_f, layer, None, error)
    big = [x * np.float32(1e25) for x in (x_q, x_f, error)]
    huge.merge(big[0], big[0] if same else big[1], layer, None, big[2])
    for got, expected, scale in ((huge.gram, plain.gram, 1e50), (huge.cross, plain.cross, 1e50),
                                 (huge.skip_cross, plain.skip_cross, 1e50), (huge.sum_float, plain.sum_float, 1e25),
                                 (huge.skip_sum, plain.skip_sum, 1e25)):
        assert np.all(np.isfinite(got))
        np.testing.assert_allclose(got / scale, expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())
    assert huge.rows == plain.rows == 15


@pytest.mark.parametrize(("kernel", "stride", "pads", "size"), [
    (5, 1, [2, 2, 2, 2], (7, 7)), (3, 2, [0, 1, 1, 0], (8, 7)), (5, 2, [2, 1, 2, 2], (7, 8)),
    (3, 1, [1, 1, 1, 1], (1, 6))])
def test_small_map_depthwise_sums_wait_for_the_last_batch_and_survive_overflow(kernel, stride, pads, size):
    """A small-map depthwise layer keeps image sums until its sums are read (one fold for all batches); they equal
    the exact im2col ones, also for inputs whose float32 products overflow (summed again scaled)."""
    layer = conv_layer(3, 3, kernel, stride, 1, pads)
    rng = np.random.default_rng(8)
    batches = [stream_pair(rng, (n, 3, *size)) for n in (4, 1, 3)]
    plain, huge = PairedStats.empty(layer), PairedStats.empty(layer)
    for x_q, x_f in batches:
        plain.merge(x_q, x_f, layer, None)
        huge.merge(x_q * np.float32(1e25), x_f * np.float32(1e25), layer, None)
    assert plain.images is not None and not plain.gram.any()  # nothing folded yet
    rows_q, rows_f = (np.concatenate([reference_rows(pair[k], layer) for pair in batches], axis=1) for k in (0, 1))
    assert_paired(plain, rows_q, rows_f)
    S, C = huge.covariances(centred=True)
    expected = plain.covariances(centred=True)
    assert huge.images is None and np.isfinite(S).all()
    np.testing.assert_allclose(S / 1e50, expected[0], rtol=1e-5, atol=1e-6 * np.abs(expected[0]).max())
    np.testing.assert_allclose(C / 1e50, expected[1], rtol=1e-5, atol=1e-6 * np.abs(expected[1]).max())


def test_small_map_depthwise_batches_of_different_map_sizes_fold_each_size_apart():
    """Batches whose maps differ in size (a model with dynamic spatial shapes) each fold with their own geometry."""
    layer = conv_layer(3, 3, 3, 1, 1, [1, 1, 1, 1])
    rng = np.random.default_rng(9)
    batches = [stream_pair(rng, (2, 3, *size)) for size in ((7, 7), (6, 5), (7, 7))]
    stats = PairedStats.empty(layer)
    for x_q, x_f in batches:
        stats.merge(x_q, x_f, layer, None)
    rows_q, rows_f = (np.concatenate([reference_rows(pair[k], layer) for pair in batches], axis=1) for k in (0, 1))
    assert_paired(stats, rows_q, rows_f)


@settings(max_examples=60, deadline=None)
@given(kernel=st.integers(1, 5), stride=st.integers(1, 3), dilation=st.integers(1, 2),
       pads=st.lists(st.integers(0, 3), min_size=4, max_size=4), height=st.integers(1, 14), width=st.integers(1, 14),
       batch=st.integers(1, 3), chunk=st.sampled_from([1, 1 << 20]), seed=st.integers(0, 2**16))
def test_paired_lagged_maps_match_exact_im2col(kernel, stride, dilation, pads, height, width, batch, chunk, seed):
    """Depthwise layers on large maps (``lag_gram.fits``; forced here for every geometry up to 5x5) take the lagged
    maps for both streams: the Gram matrix of x~, its cross products with x (not symmetric: each tap pair its own
    map) and both row sums equal the exact im2col ones, over channel chunks and two merged batches."""
    if min(height + pads[0] + pads[2], width + pads[1] + pads[3]) <= (kernel - 1) * dilation:
        return
    layer = conv_layer(3, 3, kernel, stride, dilation, pads)
    x_q, x_f = stream_pair(np.random.default_rng(seed), (batch, 3, height, width))
    crossed = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("onnxq.calibration.image_gram.IMAGE_GRAM_MAX_PIXELS", 0)
        patch.setattr(lag_gram, "fits", lambda x, conv: x.ndim == 4)
        patch.setattr(lag_gram, "LAG_CHUNK_ELEMENTS", chunk)
        patch.setattr("onnxq.rounding.paired_gram.PAIRED_LAG_MAX_TAPS", 25)
        cross = lag_gram.add_lagged_cross
        patch.setattr(lag_gram, "add_lagged_cross", lambda *args: crossed.append(cross(*args)))
        stats = PairedStats.empty(layer)
        for part in (slice(0, 1), slice(1, None)):
            if len(x_q[part]):
                stats.merge(x_q[part], x_f[part], layer, None)
    assert len(crossed) == min(batch, 2)  # every batch took the lagged maps
    assert_paired(stats, reference_rows(x_q, layer), reference_rows(x_f, layer))
