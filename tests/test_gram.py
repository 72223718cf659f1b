"""The Gram kernels must give X^T X and the row sums of the exact im2col rows, computed here independently in
float64 by indexing the padded input tap by tap, for every Conv geometry, Gemm and MatMul."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onnxq.calibration import gram, image_gram, lag_gram
from onnxq.calibration.calibrate import LayerStats, empty_stats, value_range
from onnxq.calibration.unfold import Window
from onnxq.graph.layers import Layer


def conv_layer(channels: int, groups: int, kernel: list[int], strides: list[int], dilations: list[int],
               pads: list[int], auto_pad: str = "NOTSET") -> Layer:
    conv = dict(kernel_shape=kernel, strides=strides, pads=pads, dilations=dilations, auto_pad=auto_pad)
    return Layer("conv", "Conv", "w", "x", (2 * groups, channels // groups, *kernel), groups=groups, conv=conv)


def reference_rows(x: np.ndarray, layer: Layer) -> np.ndarray:
    """float64 im2col ``(groups, rows, fan_in)`` with explicit pads (NOTSET), built output pixel by pixel."""
    conv, spatial = layer.conv, x.ndim - 2
    pads = conv["pads"]
    padded = np.pad(x.astype(np.float64), [(0, 0), (0, 0)] + [(pads[i], pads[i + spatial]) for i in range(spatial)])
    kernel, strides, dilations = conv["kernel_shape"], conv["strides"], conv["dilations"]
    out = [(padded.shape[2 + i] - (kernel[i] - 1) * dilations[i] - 1) // strides[i] + 1 for i in range(spatial)]
    patches = []
    for n in range(x.shape[0]):
        for pixel in np.ndindex(*out):
            taps = tuple(slice(p * s, p * s + (k - 1) * d + 1, d)
                         for p, s, k, d in zip(pixel, strides, kernel, dilations, strict=True))
            patches.append(padded[(n, slice(None), *taps)])
    rows = np.array(patches).reshape(len(patches), layer.groups, -1)
    return rows.transpose(1, 0, 2)


def assert_matches(stats: LayerStats, rows: np.ndarray) -> None:
    expected = np.einsum("gri,grj->gij", rows, rows)
    scale = max(np.abs(expected).max(), 1e-30)
    assert np.abs(stats.gram - expected).max() / scale < 2e-6
    row_sum_scale = np.abs(rows).sum(axis=1) + 1e-30
    assert (np.abs(stats.row_sum - rows.sum(axis=1)) / row_sum_scale).max() < 2e-6
    assert stats.rows == rows.shape[1]


@settings(max_examples=60, deadline=None)
@given(spatial=st.sampled_from([1, 2]), group_kind=st.sampled_from(["dense", "grouped", "depthwise"]),
       kernel=st.integers(1, 5), stride=st.integers(1, 3), dilation=st.integers(1, 2),
       pads=st.lists(st.integers(0, 2), min_size=4, max_size=4), size=st.integers(5, 19), batch=st.integers(1, 3),
       tile_min=st.sampled_from([1, 4, gram.TILE_MIN_COLUMNS]), block_rows=st.sampled_from([7, 64, 8192]),
       chunk=st.sampled_from([200, 1 << 23]), seed=st.integers(0, 2**16))
def test_conv_stats_match_exact_im2col(spatial, group_kind, kernel, stride, dilation, pads, size, batch, tile_min,
                                       block_rows, chunk, seed):
    channels = 4
    groups = {"dense": 1, "grouped": 2, "depthwise": channels}[group_kind]
    pads = pads[:spatial] + pads[2:2 + spatial]
    if min(size + pads[i] + pads[i + spatial] for i in range(spatial)) <= (kernel - 1) * dilation:
        return  # no output pixel: not a valid Conv
    layer = conv_layer(channels, groups, [kernel] * spatial, [stride] * spatial, [dilation] * spatial, pads)
    x = np.random.default_rng(seed).normal(1.0, 1.0, size=[batch, channels] + [size] * spatial).astype(np.float32)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gram, "TILE_MIN_COLUMNS", tile_min)
        patch.setattr(gram, "GRAM_BLOCK_ROWS", block_rows)
        patch.setattr(gram, "COLUMN_CHUNK_ELEMENTS", chunk)
        stats = empty_stats(layer)
        stats.merge(x[:1], layer)
        stats.merge(x[1:], layer)
    assert_matches(stats, reference_rows(x, layer))


@pytest.mark.parametrize("auto_pad", ["SAME_UPPER", "SAME_LOWER", "VALID"])
def test_auto_pad_depthwise_tiled(auto_pad, monkeypatch):
    """auto_pad resolves to the pads a NOTSET Conv with the same output states explicitly."""
    monkeypatch.setattr(gram, "TILE_MIN_COLUMNS", 1)
    x = np.random.default_rng(3).normal(size=(2, 3, 13, 12)).astype(np.float32)
    layer = conv_layer(3, 3, [4, 3], [2, 1], [1, 1], [0, 0, 0, 0], auto_pad)
    explicit = {"SAME_UPPER": [1, 1, 2, 1], "SAME_LOWER": [2, 1, 1, 1], "VALID": [0, 0, 0, 0]}[auto_pad]
    stats = empty_stats(layer)
    stats.merge(x, layer)
    assert_matches(stats, reference_rows(x, conv_layer(3, 3, [4, 3], [2, 1], [1, 1], explicit)))


def test_depthwise_mobilenet_geometry_is_tiled_and_exact(monkeypatch):
    """A stride-2 3x3 depthwise layer on a large map, with the lagged maps off (they take it by default), takes the
    tiled path (with left-over rows and columns) and still matches the exact Gram matrix."""
    monkeypatch.setattr(lag_gram, "LAG_MAX_STRIDE", 1)
    layer = conv_layer(5, 5, [3, 3], [2, 2], [1, 1], [1, 1, 1, 1])
    x = np.random.default_rng(4).normal(size=(16, 5, 30, 33)).astype(np.float32)
    assert gram.tile_shape(Window((3, 3), (2, 2), (1, 1)), (15, 17), 16, 5, 5) == (3, 3)  # 2 columns left over
    window = Window((3, 3), (1, 1), (1, 1))
    assert gram.tile_shape(window, (30, 33), 16, 5, 5) == (6, 6)  # 3 columns left over
    assert gram.tile_shape(window, (112, 112), 16, 96, 96) == (7, 7)
    assert gram.tile_shape(window, (7, 7), 16, 96, 96) is None  # too few tiles: direct GEMM
    assert gram.tile_shape(window, (112, 112), 16, 96, 1) is None  # dense Conv: direct GEMM
    stats = empty_stats(layer)
    stats.merge(x, layer)
    assert_matches(stats, reference_rows(x, layer))


@pytest.mark.parametrize("pixels", [(3, 5), (40, 50)])
def test_pointwise_stats(pixels, monkeypatch):
    """1x1 Convs: small images are gathered several samples to a GEMM, large ones split into row blocks."""
    monkeypatch.setattr(gram, "GRAM_BLOCK_ROWS", 64)
    layer = conv_layer(6, 1, [1, 1], [1, 1], [1, 1], [0, 0, 0, 0])
    x = np.random.default_rng(5).normal(2.0, 1.0, size=(7, 6, *pixels)).astype(np.float32)
    stats = empty_stats(layer)
    stats.merge(x, layer)
    assert_matches(stats, reference_rows(x, layer))


@pytest.mark.parametrize("op_type, trans_a", [("MatMul", False), ("Gemm", False), ("Gemm", True)])
def test_matrix_layer_stats(op_type, trans_a, monkeypatch):
    monkeypatch.setattr(gram, "GRAM_BLOCK_ROWS", 10)
    layer = Layer("fc", op_type, "w", "x", (6, 3), transposed=True, trans_a=trans_a)
    rng = np.random.default_rng(6)
    x = rng.normal(1.0, 1.0, size=(6, 37) if trans_a else (37, 6)).astype(np.float32)
    stats = empty_stats(layer)
    stats.merge(x, layer)
    rows = (x.T if trans_a else x).astype(np.float64)[None]
    assert_matches(stats, rows)


def test_matmul_token_rows_drop_padding():
    """A (batch, tokens, features) MatMul input keeps only the rows of real tokens under the attention mask."""
    layer = Layer("fc", "MatMul", "w", "x", (5, 4), transposed=True)
    x = np.random.default_rng(7).normal(size=(3, 6, 5)).astype(np.float32)
    mask = np.arange(6)[None, :] < np.array([[6], [2], [4]])
    stats = empty_stats(layer)
    stats.merge(x, layer, mask)
    assert_matches(stats, x[mask].astype(np.float64)[None])
    assert stats.samples == 3


@settings(max_examples=40, deadline=None)
@given(kernel=st.integers(1, 5), stride=st.integers(1, 3), dilation=st.integers(1, 2),
       pads=st.lists(st.integers(0, 3), min_size=4, max_size=4), height=st.integers(1, 8), width=st.integers(1, 8),
       batch=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_depthwise_small_maps_fold_the_image_gram(kernel, stride, dilation, pads, height, width, batch, seed):
    """Depthwise layers on small maps (EfficientNet's 7 x 7 with 5x5 kernels) take the image Gram path, which
    matches the exact im2col for any stride, dilation and uneven padding."""
    if min(height + pads[0] + pads[2], width + pads[1] + pads[3]) <= (kernel - 1) * dilation:
        return
    assert image_gram.fits((height, width))
    layer = conv_layer(3, 3, [kernel, kernel], [stride, stride], [dilation, dilation], pads)
    x = np.random.default_rng(seed).normal(1.0, 1.0, size=(batch, 3, height, width)).astype(np.float32)
    stats = empty_stats(layer)
    stats.merge(x[:1], layer)
    stats.merge(x[1:], layer)
    assert_matches(stats, reference_rows(x, layer))


def test_image_gram_only_for_small_two_dimensional_maps():
    assert image_gram.fits((7, 7)) and image_gram.fits((8, 8))
    assert not image_gram.fits((14, 14)) and not image_gram.fits((7,))


@settings(max_examples=60, deadline=None)
@given(kernel=st.integers(1, 5), stride=st.integers(1, 3), dilation=st.integers(1, 2),
       pads=st.lists(st.integers(0, 3), min_size=4, max_size=4), height=st.integers(1, 14), width=st.integers(1, 14),
       batch=st.integers(1, 3), chunk=st.sampled_from([1, 1 << 20]), seed=st.integers(0, 2**16))
def test_lagged_maps_match_exact_im2col(kernel, stride, dilation, pads, height, width, batch, chunk, seed):
    """The lagged-map kernel (lag_gram.py) is exact for every geometry, though only stride-1 3x3 layers on larger
    maps are routed to it: strides 2 and 3 through phase images, dilation, uneven pads, rows and columns that no
    output pixel reads, channels split over chunks, batches merged in two calls."""
    if min(height + pads[0] + pads[2], width + pads[1] + pads[3]) <= (kernel - 1) * dilation:
        return
    layer = conv_layer(3, 3, [kernel, kernel], [stride, stride], [dilation, dilation], pads)
    x = np.random.default_rng(seed).normal(1.0, 1.0, size=(batch, 3, height, width)).astype(np.float32)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(image_gram, "IMAGE_GRAM_MAX_PIXELS", 0)
        patch.setattr(lag_gram, "fits", lambda x, conv: x.ndim == 4)
        patch.setattr(lag_gram, "LAG_CHUNK_ELEMENTS", chunk)
        stats = empty_stats(layer)
        stats.merge(x[:1], layer)
        stats.merge(x[1:], layer)
    assert_matches(stats, reference_rows(x, layer))


def test_lagged_maps_take_layers_up_to_five_by_five_and_stride_two():
    """Stride-1 and stride-2 3x3 and 5x5 depthwise layers on maps of 10 x 10 and up take the lagged maps; stride 3,
    7x7 kernels and dense Convs keep the window tiles; the result matches the exact Gram matrix."""
    x = np.random.default_rng(8).normal(size=(4, 5, 30, 33)).astype(np.float32)
    same = dict(kernel_shape=[3, 3], strides=[1, 1], dilations=[1, 1], pads=[1, 1, 1, 1])
    assert lag_gram.fits(x, same)
    assert lag_gram.fits(x, same | {"strides": [2, 2]})
    assert not lag_gram.fits(x, same | {"strides": [3, 3]})
    assert lag_gram.fits(x, same | {"kernel_shape": [5, 5], "pads": [2, 2, 2, 2]})
    assert not lag_gram.fits(x, same | {"kernel_shape": [7, 7]})
    assert not lag_gram.fits(x[:, :, :9, :9], same)
    layer = conv_layer(5, 5, [3, 3], [1, 1], [1, 1], [1, 1, 1, 1])
    stats = empty_stats(layer)
    stats.merge(x, layer)
    assert_matches(stats, reference_rows(x, layer))


def test_lag_gram_dot_products_match_on_any_numpy():
    """numpy < 2 has no vecdot: the einsum fallback gives the same dot products along the last axis."""
    from onnxq.calibration import lag_gram

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2, 3, 2, 50)).astype(np.float32)
    expected = (a.astype(np.float64) * b).sum(-1)
    for dot in (lag_gram.dot_last, lag_gram._einsum_dot):
        np.testing.assert_allclose(dot(a, b), expected, rtol=1e-5)


@pytest.mark.parametrize("size", [1, 1000, (1 << 16) + 1, 5 * (1 << 16) - 3])
def test_value_range_is_min_and_max(size):
    """The chunked one-sweep range equals numpy's min and max, on contiguous and strided inputs, and NaN spreads."""
    x = np.random.default_rng(size).normal(size=(size, 2)).astype(np.float32)
    assert value_range(x) == (float(x.min()), float(x.max()))
    assert value_range(x[:, 1]) == (float(x[:, 1].min()), float(x[:, 1].max()))
    x[size // 2, 0] = np.nan
    assert all(np.isnan(value_range(x)))
