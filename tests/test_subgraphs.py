"""Models with If bodies: weights stored once, a weight shared with a body or listed as a graph output stays float.

The model: ``h = x @ w_top``; ``If(cond)`` then ``h @ w_branch`` else ``(h @ w_branch) * 2``, where ``w_branch``
is a top-level initializer both bodies read from the enclosing scope.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxq
from onnxq.export.qdq import build_quantized_model
from onnxq.graph.layers import find_layers
from onnxq.graph.model import GraphModel
from onnxq.passes import Grid, rtn

RNG = np.random.default_rng(0)
W_TOP = RNG.normal(size=(8, 8)).astype(np.float32)
W_BRANCH = RNG.normal(size=(8, 4)).astype(np.float32)


def if_model(shared_top: bool = False, weight_output: bool = False) -> onnx.ModelProto:
    value = helper.make_tensor_value_info
    inits = [numpy_helper.from_array(W_TOP, "w_top"), numpy_helper.from_array(W_BRANCH, "w_branch"),
             numpy_helper.from_array(np.array(2.0, np.float32), "two")]
    then_body = helper.make_graph([helper.make_node("MatMul", ["h", "w_branch"], ["t_y"], name="then_mm")],
                                  "then", [], [value("t_y", TensorProto.FLOAT, [1, 4])])
    else_body = helper.make_graph([helper.make_node("MatMul", ["h", "w_branch"], ["e_m"], name="else_mm"),
                                   helper.make_node("Mul", ["e_m", "two"], ["e_y"], name="else_mul")],
                                  "else", [], [value("e_y", TensorProto.FLOAT, [1, 4])])
    nodes = [helper.make_node("MatMul", ["x", "w_top"], ["h"], name="top_mm"),
             helper.make_node("If", ["cond"], ["y"], name="if", then_branch=then_body, else_branch=else_body)]
    outputs = [value("y", TensorProto.FLOAT, [1, 4])]
    if shared_top:
        nodes.append(helper.make_node("MatMul", ["x", "w_branch"], ["z"], name="top_reads_w_branch"))
        outputs.append(value("z", TensorProto.FLOAT, [1, 4]))
    if weight_output:
        outputs.append(value("w_top", TensorProto.FLOAT, [8, 8]))
    graph = helper.make_graph(nodes, "g", [value("x", TensorProto.FLOAT, [1, 8]), value("cond", TensorProto.BOOL, [])],
                              outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def bodies(model: onnx.ModelProto) -> list[onnx.GraphProto]:
    return [a.g for n in model.graph.node for a in n.attribute if a.type == onnx.AttributeProto.GRAPH]


def run(model: onnx.ModelProto, cond: bool) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": np.ones((1, 8), np.float32), "cond": np.array(cond)})


def test_round_trip_keeps_body_weights_in_the_enclosing_graph():
    """onnx-graphsurgeon alone would copy w_branch into both bodies (a 0.986x 'compression' in the field)."""
    model = if_model()
    out = GraphModel(model).to_proto()
    assert out.SerializeToString() == model.SerializeToString()
    assert all(not body.initializer for body in bodies(out))


def test_body_layers_are_named_as_skipped():
    layers, skipped = find_layers(if_model())
    assert [layer.name for layer in layers] == ["top_mm"]
    assert sorted(skipped) == [
        "else_mm: inside the else_branch of If if; layers in If/Loop/Scan bodies stay in float",
        "then_mm: inside the then_branch of If if; layers in If/Loop/Scan bodies stay in float"]


def test_exported_model_stores_each_weight_once_and_runs_both_branches():
    model = if_model()
    layers, _ = find_layers(model)
    qw = rtn.quantize(layers[0].matrix(W_TOP).astype(np.float64), None, Grid(4))
    out = build_quantized_model(model, layers, {"top_mm": qw}, {})
    onnx.checker.check_model(out)
    names = [t.name for t in out.graph.initializer]
    assert names.count("w_branch") == 1 and "w_top" not in names
    assert all(not body.initializer for body in bodies(out))
    h = np.ones((1, 8)) @ layers[0].tensor(qw.dequantize())
    np.testing.assert_allclose(run(out, True)[0], h @ W_BRANCH, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(run(out, False)[0], 2 * h @ W_BRANCH, rtol=1e-4, atol=1e-4)


def test_weight_read_at_top_level_and_in_a_body_stays_float():
    layers, skipped = find_layers(if_model(shared_top=True))
    assert [layer.name for layer in layers] == ["top_mm"]
    assert skipped[0] == ("top_reads_w_branch: weight w_branch is shared by 3 uses (else_mm, then_mm, "
                          "top_reads_w_branch); tied weights stay in float")


def test_weight_that_is_a_graph_output_stays_float():
    layers, skipped = find_layers(if_model(weight_output=True))
    assert layers == []
    assert skipped[0] == "top_mm: weight w_top is also a graph output; it stays in float"


@pytest.mark.parametrize("shape", [{}, {"shared_top": True}, {"weight_output": True}])
def test_quantize_end_to_end_writes_a_valid_model(tmp_path, shape):
    """Both shapes made the previous export write a model onnxruntime refused (caught by onnxq's own check)."""
    model = if_model(**shape)
    rng = np.random.default_rng(1)
    feeds = [{"x": rng.normal(size=(1, 8)).astype(np.float32), "cond": np.array(bool(i % 2))} for i in range(8)]
    result = onnxq.quantize(model, feeds, tmp_path / "q.onnx", bits=4, allow_empty=True)
    written = onnx.load(str(tmp_path / "q.onnx"))
    onnx.checker.check_model(written)
    assert [t.name for t in written.graph.initializer].count("w_branch") == 1
    assert [layer.name for layer in result.layers] == ([] if shape.get("weight_output") else ["top_mm"])
    for cond in (True, False):
        np.testing.assert_allclose(run(written, cond)[-1], run(model, cond)[-1], rtol=0.2, atol=0.5)
