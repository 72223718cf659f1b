"""When nothing can be quantized, the error says why for each candidate layer, not a generic sentence."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
import tiny
from conftest import save
from onnx import TensorProto, helper, numpy_helper

import onnxq
from onnxq.errors import OnnxqError
from onnxq.graph.layers import find_layers


def matmul_model(nodes, weight_dtype=np.float32) -> onnx.ModelProto:
    """x [N, 4] through the given MatMul nodes, with a 4 x 4 weight ``w``."""
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 4)).astype(weight_dtype), "w")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    graph = helper.make_graph(nodes, "g", [x], [y], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


TIED = matmul_model([helper.make_node("MatMul", ["x", "w"], ["h"], name="first"),
                     helper.make_node("MatMul", ["h", "w"], ["y"], name="second")])
WEIGHT_FIRST = matmul_model([helper.make_node("Transpose", ["x"], ["xt"], name="t"),
                             helper.make_node("MatMul", ["w", "xt"], ["wx"], name="w_times_x"),
                             helper.make_node("Transpose", ["wx"], ["y"], name="back")])


@pytest.mark.parametrize("model, options, reason", [
    (TIED, {}, "first, second: weight w is shared by 2 uses (first, second); tied weights stay in float"),
    (WEIGHT_FIRST, {}, "w_times_x: its constant w is the first input (W @ x)"),
    (tiny.cnn_model(), {"op_types_to_quantize": ("MatMul",)},
     "conv1, conv2_grouped, conv3_depthwise: Conv is not in --op_types_to_quantize (MatMul)"),
    (tiny.cnn_model(), {"nodes_to_exclude": (".*",)},
     "4 candidate(s) skipped: conv1, conv2_grouped, conv3_depthwise, fc: excluded by --nodes_to_exclude"),
])
def test_nothing_to_quantize_names_the_reason(tmp_path, model, options, reason):
    path = save(model, tmp_path / "m.onnx")
    calib = tmp_path / "calib"
    calib.mkdir()
    shape = (1, 3, 16, 16) if len(model.graph.input[0].type.tensor_type.shape.dim) == 4 else (1, 4)
    np.save(calib / "0.npy", np.ones(shape, np.float32))
    with pytest.raises(OnnxqError, match="no layer can be quantized") as caught:
        onnxq.quantize(path, calib, tmp_path / "q.onnx", **options)
    assert reason in str(caught.value) and "\n" not in str(caught.value)
    assert "--allow-empty" in str(caught.value)


def test_other_float_types_say_their_type():
    model = matmul_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")])
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.ones((4, 4), np.float64), "w"))
    layers, skipped = find_layers(model)
    assert not layers and skipped == ["mm: weight w is DOUBLE, not FLOAT or FLOAT16"]


def test_computed_conv_weight_is_explained():
    model = tiny.conv_model()
    w = model.graph.initializer[0]
    model.graph.node.insert(0, helper.make_node("Identity", [w.name], ["w_copy"], name="copy"))
    model.graph.node[1].input[1] = "w_copy"
    layers, skipped = find_layers(model)
    assert not layers
    assert skipped == ["conv: its weight w_copy is computed in the graph (by a Identity node), not stored"]


@pytest.mark.parametrize("flag, value", [("--avg-bits", "nan"), ("--size-ratio", "inf"), ("--size-mb", "nan")])
def test_budget_that_is_not_a_number_says_so(tmp_path, cnn_path, cnn_calib, flag, value):
    """Through the CLI (whichever layer validates it): one line saying it is not a (finite) number."""
    out = tmp_path / "q.onnx"
    result = subprocess.run([sys.executable, "-m", "onnxq", str(cnn_path), "--calib", str(cnn_calib), "-o", str(out),
                             flag, value], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and not out.exists()
    assert value in result.stderr and "number" in result.stderr and "smallest" not in result.stderr
    assert "Traceback" not in result.stderr
