"""The streamed Gram matrix must equal X^T X of the whole unfolded input; statistics round-trip to disk."""

from __future__ import annotations

import numpy as np
import onnx
import tiny

from onnxq.calibration.calibrate import calibrate
from onnxq.calibration.capture import capture_model, make_session
from onnxq.calibration.unfold import unfold
from onnxq.data.sources import batches, model_inputs
from onnxq.graph.layers import find_layers
from onnxq.graph.prepare import prepare


def layer_inputs(model: onnx.ModelProto, layers, x: np.ndarray) -> dict[str, np.ndarray]:
    names = [layer.activation for layer in layers if layer.activation != "x"]
    outs = make_session(capture_model(model, names)).run(names, {"x": x})
    return {"x": x, **dict(zip(names, outs, strict=True))}


def test_gram_equals_full_unfolded_product():
    model = prepare(tiny.cnn_model())
    layers, _ = find_layers(model)
    assert [layer.op_type for layer in layers] == ["Conv", "Conv", "Conv", "Gemm"]
    x = np.random.default_rng(0).normal(size=(10, 3, 16, 16)).astype(np.float32)
    feeds = batches(({"x": x[i:i + 1]} for i in range(10)), model_inputs(model), batch_size=3, limit=None)
    stats = calibrate(model, layers, feeds)
    acts = layer_inputs(model, layers, x)
    for layer in layers:
        rows = unfold(layer, acts[layer.activation]).astype(np.float64)
        expected = np.einsum("gri,grj->gij", rows, rows)
        error = np.abs(stats[layer.name].gram - expected).max() / np.abs(expected).max()
        assert error < 1e-6
        assert stats[layer.name].rows == rows.shape[1]
        assert stats[layer.name].samples == 10
        assert stats[layer.name].act_min == acts[layer.activation].min()
    assert stats["conv3_depthwise"].gram.shape == (16, 9, 9)
    assert stats["conv2_grouped"].gram.shape == (2, 36, 36)


def test_calib_size_limits_samples():
    model = prepare(tiny.cnn_model())
    layers, _ = find_layers(model)
    x = np.zeros((7, 3, 16, 16), np.float32)
    stats = calibrate(model, layers, batches([{"x": x}], model_inputs(model), batch_size=4, limit=5))
    assert stats["fc"].samples == 5
