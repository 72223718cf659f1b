"""The unfolded input times the reshaped weight must equal onnxruntime's Conv, for every geometry."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import tiny
from hypothesis import given, settings
from hypothesis import strategies as st

from onnxq.calibration.unfold import unfold
from onnxq.graph.layers import find_layers


def conv_via_unfold(model, x: np.ndarray) -> np.ndarray:
    """Conv computed as grouped (unfolded input) @ (weight matrix)^T + bias, back in NC(H)W layout."""
    layer = find_layers(model)[0][0]
    inits = {t.name: onnx_array(t) for t in model.graph.initializer}
    W = layer.matrix(inits[layer.weight])
    rows = unfold(layer, x)  # (G, rows, fan_in)
    G = layer.groups
    out = np.concatenate([rows[g] @ W.reshape(G, -1, W.shape[1])[g].T for g in range(G)], axis=1)
    if layer.bias:
        out = out + inits[layer.bias]
    return out


def onnx_array(tensor):
    from onnx import numpy_helper
    return numpy_helper.to_array(tensor)


def ort_conv(model, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    y = session.run(None, {"x": x})[0]
    return y.reshape(y.shape[0], y.shape[1], -1).transpose(0, 2, 1).reshape(-1, y.shape[1])


@settings(max_examples=40, deadline=None)
@given(groups=st.sampled_from([1, 2, 4]), kernel=st.integers(1, 4), stride=st.integers(1, 3),
       pad=st.integers(0, 2), dilation=st.integers(1, 2), size=st.integers(7, 12), batch=st.integers(1, 3),
       spatial=st.sampled_from([1, 2]))
def test_unfold_matches_onnxruntime_conv(groups, kernel, stride, pad, dilation, size, batch, spatial):
    model = tiny.conv_model(cin=4, cout=8, kernel=kernel, stride=stride, pad=pad, dilation=dilation,
                            group=groups, spatial=spatial)
    x = np.random.default_rng(0).normal(size=[batch, 4] + [size] * spatial).astype(np.float32)
    np.testing.assert_allclose(conv_via_unfold(model, x), ort_conv(model, x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("auto_pad", ["SAME_UPPER", "SAME_LOWER", "VALID"])
@pytest.mark.parametrize("stride", [1, 2])
def test_unfold_auto_pad(auto_pad, stride):
    model = tiny.conv_model(cin=3, cout=5, kernel=4, stride=stride, auto_pad=auto_pad)
    x = np.random.default_rng(1).normal(size=[2, 3, 9, 10]).astype(np.float32)
    np.testing.assert_allclose(conv_via_unfold(model, x), ort_conv(model, x), rtol=1e-4, atol=1e-4)


def test_depthwise_unfold():
    model = tiny.conv_model(cin=6, cout=6, kernel=3, group=6, stride=2)
    x = np.random.default_rng(2).normal(size=[2, 6, 11, 11]).astype(np.float32)
    np.testing.assert_allclose(conv_via_unfold(model, x), ort_conv(model, x), rtol=1e-4, atol=1e-4)
