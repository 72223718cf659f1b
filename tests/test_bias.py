"""Bias correction: the exported model's output error has zero mean on the calibration data, whatever the
layer's bias form (Conv with or without bias, grouped, Gemm with alpha/beta, MatMul followed by Add)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tiny
from onnx import TensorProto, helper, numpy_helper

import onnxq
from onnxq.calibration.calibrate import calibrate
from onnxq.calibration.unfold import unfold
from onnxq.graph.bias import bias_slots
from onnxq.graph.layers import find_layers
from onnxq.passes import Grid, objective, rtn


def gemm_model(alpha: float, beta: float, with_bias: bool = True) -> onnx.ModelProto:
    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(rng.normal(size=(5, 12)).astype(np.float32), "w")]
    inputs = ["x", "w"]
    if with_bias:
        inits.append(numpy_helper.from_array(rng.normal(size=(1, 5)).astype(np.float32), "b"))
        inputs.append("b")
    node = helper.make_node("Gemm", inputs, ["y"], name="gemm", transB=1, alpha=alpha, beta=beta)
    return tiny._model([node], [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 12])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])], inits)


def matmul_add_model() -> onnx.ModelProto:
    rng = np.random.default_rng(4)
    inits = [numpy_helper.from_array(rng.normal(size=(12, 6)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.normal(size=6).astype(np.float32), "b")]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"], name="matmul"),
             helper.make_node("Add", ["m", "b"], ["y"], name="add")]
    return tiny._model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 12])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6])], inits)


MODELS = {
    "conv": lambda: tiny.conv_model(cin=4, cout=6),
    "conv_no_bias": lambda: tiny.conv_model(cin=4, cout=6, bias=False),
    "depthwise": lambda: tiny.conv_model(cin=6, cout=6, group=6, bias=False),
    "gemm_alpha_beta": lambda: gemm_model(alpha=1.5, beta=0.5),
    "gemm_no_bias": lambda: gemm_model(alpha=2.0, beta=1.0, with_bias=False),
    "matmul_add": matmul_add_model,
}


def offset_data(model: onnx.ModelProto, count: int = 24) -> list[dict[str, np.ndarray]]:
    """Inputs with a large non-zero mean, so an uncorrected error has a visible mean."""
    rng = np.random.default_rng(0)
    shape = [count] + [d.dim_value or 8 for d in model.graph.input[0].type.tensor_type.shape.dim[1:]]
    return [{"x": (rng.normal(size=shape) + 2.0).astype(np.float32)}]


def output_error(path, model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> np.ndarray:
    """Quantized minus float output, with channels last and every other axis flattened to rows."""
    exact = ort.SessionOptions()  # no int8 activations in onnxruntime's fused DQ+MatMul (MatMulNBits) kernel
    exact.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    reference = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    quantized = ort.InferenceSession(str(path), exact, providers=["CPUExecutionProvider"])
    diff = (quantized.run(None, feed)[0].astype(np.float64) - reference.run(None, feed)[0].astype(np.float64))
    return np.moveaxis(diff, 1, -1).reshape(-1, diff.shape[1]) if diff.ndim > 2 else diff


@pytest.mark.parametrize("kind", list(MODELS))
def test_corrected_output_error_has_zero_mean(tmp_path, kind):
    model = MODELS[kind]()
    onnx.save(model, tmp_path / "m.onnx")
    feed = offset_data(model)
    errors = {}
    for corrected in (False, True):
        out = tmp_path / f"q{int(corrected)}.onnx"
        onnxq.quantize(tmp_path / "m.onnx", feed, out, bits=2, method="rtn", bias_correction=corrected)
        errors[corrected] = output_error(out, model, feed[0])
    scale = np.abs(errors[False]).mean()
    assert np.abs(errors[False].mean(axis=0)).max() > 0.05 * scale  # the data does produce a biased error
    assert np.abs(errors[True].mean(axis=0)).max() < 1e-4 * scale
    # same codes (RTN ignores H), so the corrected error energy is the uncorrected one minus its mean part
    assert (errors[True] ** 2).sum() < (errors[False] ** 2).sum()


def test_corrected_error_energy_is_the_centred_objective():
    """What onnxruntime computes equals the pass objective on the centred Gram matrix (independent paths)."""
    model = tiny.conv_model(cin=3, cout=4)
    layers, _ = find_layers(model)
    feed = offset_data(model, 8)[0]
    stats = calibrate(model, layers, [feed])[layers[0].name]
    W = layers[0].matrix(numpy_helper.to_array(model.graph.initializer[0])).astype(np.float64)
    Q = rtn.quantize(W, None, Grid(2)).dequantize()
    rows = unfold(layers[0], feed["x"])[0].astype(np.float64)
    error = rows @ (W - Q).T
    centred = error - error.mean(axis=0)
    assert np.isclose(objective(W, Q, stats.centred_gram) * stats.rows, (centred**2).sum(), rtol=1e-5)


def test_slots_follow_the_bias_form():
    model = matmul_add_model()
    layers, _ = find_layers(model)
    assert bias_slots(model, layers)["matmul"].tensor == "b"
    gemm = gemm_model(alpha=1.5, beta=0.5)
    layers, _ = find_layers(gemm)
    assert bias_slots(gemm, layers)["gemm"].factor == pytest.approx(3.0)
    shared = tiny.mlp_model()
    shared.graph.node.append(helper.make_node("Add", ["h", "mm_b"], ["h2"], name="second_use"))
    layers, _ = find_layers(shared)
    assert set(bias_slots(shared, layers)) == {"gemm"}  # mm_b is read twice: shifting it would move h2 too


def test_row_sums_match_the_unfolded_input():
    model = tiny.cnn_model()
    layers, _ = find_layers(model)
    x = np.random.default_rng(2).normal(size=(3, 3, 16, 16)).astype(np.float32) + 1.0
    stats = calibrate(model, layers, [{"x": x}])
    first = stats[layers[0].name]
    rows = unfold(layers[0], x).astype(np.float64)
    np.testing.assert_allclose(first.mean, rows.mean(axis=1), rtol=1e-6, atol=1e-9)
