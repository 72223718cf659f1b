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


def shared_input_model(seed: int = 0) -> onnx.ModelProto:
    """Three MatMuls reading one tensor (a transformer's query/key/value) and two Convs reading one image with
    different kernels (SqueezeNet's expand 1x1 / 3x3)."""
    rng = np.random.default_rng(seed)
    h = onnx.helper
    inits = [onnx.numpy_helper.from_array(rng.normal(size=shape).astype(np.float32), name) for name, shape in (
        ("wq", (8, 4)), ("wk", (8, 4)), ("wv", (8, 6)), ("e1", (5, 3, 1, 1)), ("e3", (5, 3, 3, 3)))]
    nodes = [h.make_node("MatMul", ["t", w], [f"{w}_out"], name=w) for w in ("wq", "wk", "wv")]
    nodes += [h.make_node("Conv", ["img", "e1"], ["e1_out"], name="e1"),
              h.make_node("Conv", ["img", "e3"], ["e3_out"], name="e3", pads=[1, 1, 1, 1])]
    graph = h.make_graph(nodes, "shared", [h.make_tensor_value_info("t", onnx.TensorProto.FLOAT, [None, 8]),
                                            h.make_tensor_value_info("img", onnx.TensorProto.FLOAT, [None, 3, 6, 6])],
                         [h.make_tensor_value_info(f"{n}_out", onnx.TensorProto.FLOAT, None)
                          for n in ("wq", "wk", "wv", "e1", "e3")], inits)
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])


def test_layers_reading_one_input_the_same_way_share_one_accumulation():
    from onnxq.calibration.calibrate import GramObserver

    model = prepare(shared_input_model())
    layers, _ = find_layers(model)
    rng = np.random.default_rng(1)
    samples = [{"t": rng.normal(size=(1, 8)).astype(np.float32),
                "img": rng.normal(size=(1, 3, 6, 6)).astype(np.float32)} for _ in range(6)]
    observer = GramObserver(layers, None)
    assert sorted(layer.name for layer in observer.layers) == ["e1", "e3", "wq"]  # wk and wv share wq's
    stats = calibrate(model, layers, batches(samples, model_inputs(model), batch_size=4, limit=None))
    for layer in layers:  # each equals a calibration of that layer alone, and owns its arrays
        alone = calibrate(model, [layer], batches(samples, model_inputs(model), batch_size=4, limit=None))
        np.testing.assert_array_equal(stats[layer.name].gram, alone[layer.name].gram)
        np.testing.assert_array_equal(stats[layer.name].row_sum, alone[layer.name].row_sum)
        assert (stats[layer.name].rows, stats[layer.name].samples) == (alone[layer.name].rows, 6)
    assert not np.shares_memory(stats["wq"].gram, stats["wk"].gram)
