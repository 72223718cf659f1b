"""--first-last-bits widens every layer reading a graph input and every head that reaches a graph output."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import onnxq
from onnxq.graph.boundary import boundary_layers
from onnxq.graph.layers import find_layers
from onnxq.graph.model import GraphModel


def two_head_model(seed: int = 0) -> onnx.ModelProto:
    """input / 255 -> stem -> body -> {cls head -> Sigmoid -> out, box head -> Softmax -> 1x4 projection -> out}:
    a detector's shape in miniature (the projection is a constant MatMul after the box head, like YOLO's DFL)."""
    rng = np.random.default_rng(seed)

    def init(name, shape, scale=0.3):
        return numpy_helper.from_array((rng.normal(size=shape) * scale).astype(np.float32), name)

    inits = [init("stem_w", [8, 3, 3, 3]), init("body_w", [8, 8, 3, 3]), init("cls_w", [5, 8, 1, 1]),
             init("box_w", [4, 8, 1, 1]), init("proj_w", [4, 1]),
             numpy_helper.from_array(np.array(255, np.float32), "k255")]
    nodes = [
        helper.make_node("Div", ["x", "k255"], ["xn"], name="normalise"),
        helper.make_node("Conv", ["xn", "stem_w"], ["s"], name="stem", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["s"], ["sr"], name="stem_relu"),
        helper.make_node("Conv", ["sr", "body_w"], ["b"], name="body", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["b"], ["br"], name="body_relu"),
        helper.make_node("Conv", ["br", "cls_w"], ["c"], name="cls_head"),
        helper.make_node("Sigmoid", ["c"], ["scores"], name="cls_sigmoid"),
        helper.make_node("Conv", ["br", "box_w"], ["bx"], name="box_head"),
        helper.make_node("Transpose", ["bx"], ["bt"], name="box_t", perm=[0, 2, 3, 1]),
        helper.make_node("Softmax", ["bt"], ["bs"], name="box_softmax", axis=-1),
        helper.make_node("MatMul", ["bs", "proj_w"], ["boxes"], name="box_projection"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])
    outputs = [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 5, 8, 8]),
               helper.make_tensor_value_info("boxes", TensorProto.FLOAT, ["N", 8, 8, 1])]
    graph = helper.make_graph(nodes, "two_heads", [x], outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_every_input_reader_and_every_head_is_an_edge():
    model = two_head_model()
    layers, _ = find_layers(model)
    assert [layer.name for layer in layers] == ["stem", "body", "cls_head", "box_head", "box_projection"]
    assert boundary_layers(GraphModel(model), layers) == ["stem", "cls_head", "box_projection"]


def test_first_last_bits_widens_all_heads_of_a_two_head_model(tmp_path):
    path = tmp_path / "heads.onnx"
    onnx.save(two_head_model(), path)
    rng = np.random.default_rng(1)
    calib = [{"x": rng.uniform(0, 255, size=(4, 3, 8, 8)).astype(np.float32)} for _ in range(6)]
    result = onnxq.quantize(path, calib, tmp_path / "q.onnx", bits=4, first_last_bits=8, method="rtn")
    widths = {r.name: r.bits for r in result.layers}
    assert widths == {"stem": 8, "body": 4, "cls_head": 8, "box_head": 4, "box_projection": 8}
    budget = onnxq.quantize(path, calib, tmp_path / "m.onnx", avg_bits=4.5, first_last_bits=8, method="rtn",
                            verify_samples=0, clado_samples=8, calib_size=16)
    assert all(r.bits == 8 for r in budget.layers if r.name in ("stem", "cls_head", "box_projection"))


def test_a_transformer_block_keeps_its_first_projections_and_its_last_one_only():
    """The attention mask joins after the Q/K projections and the residual stream reaches the output past every
    layer: neither makes the layers in between edges (all would stay at 8 bits)."""
    from test_transformer import transformer

    model = transformer()
    layers, _ = find_layers(model)
    assert [layer.name for layer in layers] == ["proj_q", "proj_k", "proj_v", "proj_o", "fc1", "fc2"]
    assert boundary_layers(GraphModel(model), layers) == ["proj_q", "proj_k", "proj_v", "fc2"]


def test_a_skip_connection_around_the_head_is_not_followed():
    """y = x + head(relu(stem(x))): the stem reads the input, the head is last; the skip adds no edge layer."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(4, 4)).astype(np.float32), n) for n in ("w0", "w1", "w2")]
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["a"], name="stem"),
             helper.make_node("Relu", ["a"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w1"], ["b"], name="middle"),
             helper.make_node("Add", ["r", "b"], ["c"], name="skip"),
             helper.make_node("MatMul", ["c", "w2"], ["d"], name="head"),
             helper.make_node("Add", ["c", "d"], ["y"], name="skip2")]
    vi = helper.make_tensor_value_info
    model = helper.make_model(helper.make_graph(nodes, "res", [vi("x", TensorProto.FLOAT, [2, 4])],
                                                [vi("y", TensorProto.FLOAT, [2, 4])], inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    layers, _ = find_layers(model)
    assert boundary_layers(GraphModel(model), layers) == ["stem", "head"]
