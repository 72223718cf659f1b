"""Float16 models: quantized end to end, float32 scales plus a Cast, calibrated on float16 or float32 data."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tiny
from conftest import save
from onnx import TensorProto, helper, numpy_helper

import onnxq
from onnxq.errors import OnnxqError
from onnxq.graph.float16 import INSERTED_PREFIX, without_inserted_casts
from onnxq.graph.prepare import prepare


def sample_folder(path, shape, count=8, dtype=np.float32):
    path.mkdir()
    rng = np.random.default_rng(0)
    for i in range(count):
        np.save(path / f"{i}.npy", rng.standard_normal(shape).astype(dtype))
    return path


def run(path_or_model, feed, outputs=None):
    source = path_or_model.SerializeToString() if isinstance(path_or_model, onnx.ModelProto) else str(path_or_model)
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"]).run(outputs, feed)


def sqnr(reference: np.ndarray, got: np.ndarray) -> float:
    reference, got = reference.astype(np.float64), got.astype(np.float64)
    return 10 * np.log10((reference**2).sum() / ((reference - got) ** 2).sum())


def test_prepare_keeps_the_float16_graph():
    """onnxruntime's CPU casts around Conv/Gemm are undone: every weight is a float16 initializer of its layer."""
    prepared = without_inserted_casts(prepare(tiny.to_float16(tiny.cnn_model())))
    assert not [n for n in prepared.graph.node if n.op_type == "Cast"]
    assert not any(INSERTED_PREFIX in name for n in prepared.graph.node for name in [*n.input, *n.output])
    inits = {t.name: t for t in prepared.graph.initializer}
    weights = [inits[n.input[1]] for n in prepared.graph.node if n.op_type in ("Conv", "Gemm")]
    assert len(weights) == 4 and all(w.data_type == TensorProto.FLOAT16 for w in weights)
    x = np.random.default_rng(1).standard_normal((2, 3, 16, 16)).astype(np.float16)
    np.testing.assert_allclose(run(prepared, {"x": x})[0], run(tiny.to_float16(tiny.cnn_model()), {"x": x})[0],
                               rtol=0.02, atol=0.02)


@pytest.mark.parametrize("name, shape, sequential", [("cnn", (1, 3, 16, 16), False), ("mlp", (1, 12), False),
                                                     ("mlp", (1, 12), True)])
@pytest.mark.parametrize("data_dtype", [np.float32, np.float16])
def test_float16_model_end_to_end(tmp_path, name, shape, sequential, data_dtype):
    builder = {"cnn": tiny.cnn_model, "mlp": tiny.mlp_model}[name]
    float32, float16 = builder(), tiny.to_float16(builder())
    path16 = save(float16, tmp_path / f"{name}16.onnx")
    calib = sample_folder(tmp_path / "calib", shape, dtype=data_dtype)
    out16, out32 = tmp_path / "q16.onnx", tmp_path / "q32.onnx"
    onnxq.quantize(path16, calib, out16, bits=4, sequential=sequential)
    onnxq.quantize(save(float32, tmp_path / f"{name}.onnx"), calib, out32, bits=4, sequential=sequential)

    quantized = onnx.load(str(out16))
    assert quantized.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    assert quantized.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    x = np.random.default_rng(7).standard_normal((16, *shape[1:])).astype(np.float32)
    reference = run(float16, {"x": x.astype(np.float16)})[0]
    got16 = run(out16, {"x": x.astype(np.float16)})[0]
    got32 = run(out32, {"x": x})[0]
    assert got16.dtype == np.float16
    # as close to the float16 model as the float32 pipeline gets to the float32 model
    assert sqnr(reference, got16) > sqnr(run(float32, {"x": x})[0], got32) - 2.0 > 10.0

    # the dequantized weights the model computes with are exactly codes x scale (float32), then float16
    inits = {t.name: numpy_helper.to_array(t) for t in quantized.graph.initializer}
    dq = [n for n in quantized.graph.node if n.op_type == "DequantizeLinear"]
    casts = {n.input[0]: n for n in quantized.graph.node if n.op_type == "Cast"}
    assert dq and all(d.output[0] in casts for d in dq)
    exposed = onnx.ModelProto()
    exposed.CopyFrom(quantized)
    for node in dq:
        exposed.graph.output.append(helper.make_tensor_value_info(node.output[0], TensorProto.FLOAT, None))
        exposed.graph.output.append(helper.make_tensor_value_info(casts[node.output[0]].output[0],
                                                                  TensorProto.FLOAT16, None))
    names = [t for n in dq for t in (n.output[0], casts[n.output[0]].output[0])]
    values = run(exposed, {"x": x[:1].astype(np.float16)}, names)
    for node, deq32, deq16 in zip(dq, values[::2], values[1::2], strict=True):
        codes, scale, zp = (inits[t] for t in node.input)
        assert scale.dtype == np.float32
        axis = next(a.i for a in node.attribute if a.name == "axis")
        shape_ = [1] * codes.ndim
        shape_[axis] = -1
        expected = (codes.astype(np.float32) - zp.astype(np.float32).reshape(shape_)) * scale.reshape(shape_)
        np.testing.assert_array_equal(deq32, expected)
        np.testing.assert_array_equal(deq16, expected.astype(np.float16))


def test_float16_bias_correction_keeps_float16_biases(tmp_path):
    path = save(tiny.to_float16(tiny.cnn_model()), tmp_path / "cnn16.onnx")
    out = tmp_path / "q.onnx"
    onnxq.quantize(path, sample_folder(tmp_path / "calib", (1, 3, 16, 16)), out, bits=3)
    before = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
    after = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer}
    assert after["fc_b"].dtype == np.float16 and not np.array_equal(after["fc_b"], before["fc_b"])


def test_float16_with_activation_quantization_is_refused_up_front(tmp_path):
    path = save(tiny.to_float16(tiny.mlp_model()), tmp_path / "mlp16.onnx")
    with pytest.raises(OnnxqError, match="needs a float32 model"):
        onnxq.quantize(path, sample_folder(tmp_path / "calib", (1, 12)), tmp_path / "q.onnx", act_bits=8)
    assert not (tmp_path / "q.onnx").exists()
