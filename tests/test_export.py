"""The exported model stores real integers whose dequantized values are exactly the pass's codes x scales."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tiny
from onnx import TensorProto, numpy_helper

from onnxq.export.qdq import build_quantized_model, container_bits, save_atomic
from onnxq.graph.layers import find_layers
from onnxq.graph.prepare import prepare
from onnxq.passes import Grid, rtn

CONTAINER = {2: TensorProto.INT2, 3: TensorProto.INT4, 4: TensorProto.INT4, 8: TensorProto.INT8}


def quantize_all(model, bits: int, symmetric: bool = False):
    layers, _ = find_layers(model)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    results = {layer.name: rtn.quantize(layer.matrix(inits[layer.weight]), None, Grid(bits, symmetric))
               for layer in layers}
    return layers, results


def dequantize_initializers(model: onnx.ModelProto, weight: str, axis: int) -> np.ndarray:
    """Dequantize by hand from the stored initializers (independent of onnxruntime)."""
    inits = {t.name: t for t in model.graph.initializer}
    codes = numpy_helper.to_array(inits[f"{weight}_quantized"]).astype(np.float64)
    scale = numpy_helper.to_array(inits[f"{weight}_scale"]).astype(np.float64)
    zp = numpy_helper.to_array(inits[f"{weight}_zero_point"]).astype(np.float64)
    shape = [1] * codes.ndim
    shape[axis] = -1
    return (codes - zp.reshape(shape)) * scale.reshape(shape)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("builder", [tiny.cnn_model, tiny.mlp_model])
def test_exported_weights_equal_codes_times_scales(tmp_path, bits, builder):
    model = prepare(builder())
    layers, results = quantize_all(model, bits)
    out = build_quantized_model(model, layers, results, {"onnxq.method": "rtn"})
    path = tmp_path / "q.onnx"
    save_atomic(out, path)
    loaded = onnx.load(str(path))
    onnx.checker.check_model(loaded)
    inits = {t.name: t for t in loaded.graph.initializer}
    for layer in layers:
        qw = results[layer.name]
        stored = inits[f"{layer.weight}_quantized"]
        assert stored.data_type == CONTAINER[container_bits(layer, bits)]
        codes = numpy_helper.to_array(stored).astype(np.int64)
        np.testing.assert_array_equal(layer.matrix(codes), qw.codes)
        assert codes.min() >= Grid(bits).qmin and codes.max() <= Grid(bits).qmax
        expected = layer.tensor(qw.dequantize())
        np.testing.assert_allclose(dequantize_initializers(loaded, layer.weight, layer.channel_axis), expected,
                                   rtol=1e-6, atol=1e-7)
        assert layer.weight not in inits
    opset = {o.domain: o.version for o in loaded.opset_import}[""]
    assert opset == {2: 25, 3: 21, 4: 21, 8: 13}[bits]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).normal(size=[2, *[d.dim_value for d in model.graph.input[0].type.tensor_type
                                                  .shape.dim][1:]]).astype(np.float32)
    y = session.run(None, {model.graph.input[0].name: x})[0]
    assert np.isfinite(y).all()


@pytest.mark.parametrize("outputs", [6, 8])
def test_two_bit_matmul_runs_the_file_math_in_a_default_session(tmp_path, outputs):
    """onnxruntime 1.32 fuses INT2 DQ + MatMul into MatMulNBits, wrongly when the output count is not a multiple
    of 4: such weights are stored in INT4, so a default session computes what the file says."""
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.normal(size=(16, outputs)).astype(np.float32), "w")
    node = onnx.helper.make_node("MatMul", ["x", "w"], ["y"], name="matmul")
    model = tiny._model([node], [onnx.helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
                        [onnx.helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", outputs])], [weight])
    layers, results = quantize_all(model, 2)
    path = tmp_path / "q.onnx"
    save_atomic(build_quantized_model(model, layers, results, {}), path)
    stored = {t.name: t.data_type for t in onnx.load(str(path)).graph.initializer}["w_quantized"]
    assert stored == (TensorProto.INT2 if outputs % 4 == 0 else TensorProto.INT4)
    x = {"x": rng.normal(size=(4, 16)).astype(np.float32)}
    default = ort.SessionOptions()
    default.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    plain = ort.SessionOptions()
    plain.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    fused, unfused = (ort.InferenceSession(str(path), o, providers=["CPUExecutionProvider"]).run(None, x)[0]
                      for o in (default, plain))
    np.testing.assert_allclose(fused, unfused, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(unfused, x["x"] @ layers[0].tensor(results["matmul"].dequantize()), rtol=1e-5, atol=1e-5)


def test_model_output_matches_fake_quantized_float_model(tmp_path):
    """onnxruntime running the QDQ model equals the float model with dequantized weights substituted."""
    model = prepare(tiny.cnn_model())
    layers, results = quantize_all(model, 4)
    path = tmp_path / "q.onnx"
    save_atomic(build_quantized_model(model, layers, results, {}), path)
    fake = onnx.ModelProto()
    fake.CopyFrom(model)
    for init in fake.graph.initializer:
        for layer in layers:
            if init.name == layer.weight:
                init.CopyFrom(numpy_helper.from_array(layer.tensor(results[layer.name].dequantize()), init.name))
    x = np.random.default_rng(3).normal(size=(4, 3, 16, 16)).astype(np.float32)
    quantized = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    reference = ort.InferenceSession(fake.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x})[0]
    np.testing.assert_allclose(quantized, reference, rtol=1e-4, atol=1e-5)


def test_metadata_records_tool_and_bits(tmp_path):
    model = prepare(tiny.mlp_model())
    layers, results = quantize_all(model, 3)
    from onnxq.export.qdq import layer_metadata
    out = build_quantized_model(model, layers, results, {"onnxq.layers": layer_metadata(layers, results)})
    meta = {p.key: p.value for p in out.metadata_props}
    assert "onnxq.version" in meta
    assert '"bits": 3' in meta["onnxq.layers"] and '"stored_bits": 4' in meta["onnxq.layers"]
