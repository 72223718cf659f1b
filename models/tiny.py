"""Builders for the small synthetic ONNX models the tests use (random weights, deterministic seeds)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 13


def _model(nodes, inputs, outputs, inits, opset: int = OPSET) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "tiny", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="onnxq-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array, dtype=np.float32), name)


def conv_model(cin: int = 4, cout: int = 6, kernel: int = 3, stride: int = 1, pad: int = 1, dilation: int = 1,
               group: int = 1, auto_pad: str | None = None, spatial: int = 2, bias: bool = True,
               seed: int = 0) -> onnx.ModelProto:
    """One Conv with the given geometry: input ``x`` [N, cin, *spatial], output ``y``."""
    rng = np.random.default_rng(seed)
    kshape = [kernel] * spatial
    inits = [_init("w", rng.normal(size=[cout, cin // group, *kshape]))]
    names = ["x", "w"]
    if bias:
        inits.append(_init("b", rng.normal(size=cout)))
        names.append("b")
    attrs = dict(strides=[stride] * spatial, dilations=[dilation] * spatial, group=group)
    if auto_pad:
        attrs["auto_pad"] = auto_pad
    else:
        attrs["pads"] = [pad] * 2 * spatial
    node = helper.make_node("Conv", names, ["y"], name="conv", **attrs)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", cin] + [None] * spatial)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", cout] + [None] * spatial)
    return _model([node], [x], [y], inits)


def cnn_model(seed: int = 0, classes: int = 10, size: int = 16) -> onnx.ModelProto:
    """A small classifier: strided Conv+BatchNorm, grouped dilated Conv, depthwise Conv, pooling, Gemm."""
    rng = np.random.default_rng(seed)
    inits = [
        _init("c1_w", rng.normal(size=[8, 3, 3, 3]) * 0.3), _init("c1_b", rng.normal(size=8) * 0.1),
        _init("bn_scale", rng.uniform(0.5, 1.5, 8)), _init("bn_bias", rng.normal(size=8) * 0.1),
        _init("bn_mean", rng.normal(size=8) * 0.1), _init("bn_var", rng.uniform(0.5, 1.5, 8)),
        _init("c2_w", rng.normal(size=[16, 4, 3, 3]) * 0.3), _init("c2_b", rng.normal(size=16) * 0.1),
        _init("dw_w", rng.normal(size=[16, 1, 3, 3]) * 0.5), _init("dw_b", rng.normal(size=16) * 0.1),
        _init("fc_w", rng.normal(size=[classes, 16]) * 0.3), _init("fc_b", rng.normal(size=classes) * 0.1),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "c1_w", "c1_b"], ["c1"], name="conv1", strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "bn_scale", "bn_bias", "bn_mean", "bn_var"], ["bn"],
                         name="bn1"),
        helper.make_node("Relu", ["bn"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "c2_w", "c2_b"], ["c2"], name="conv2_grouped", group=2,
                         dilations=[2, 2], pads=[2, 2, 2, 2]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("Conv", ["r2", "dw_w", "dw_b"], ["dw"], name="conv3_depthwise", group=16,
                         pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["dw"], ["r3"], name="relu3"),
        helper.make_node("GlobalAveragePool", ["r3"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], name="fc", transB=1),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, size, size])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])
    return _model(nodes, [x], [y], inits)


def mlp_model(seed: int = 0, features: int = 12, hidden: int = 24, classes: int = 5) -> onnx.ModelProto:
    """MatMul with an [in, out] weight plus Add, then Gemm with transB=0: the transposed weight layouts."""
    rng = np.random.default_rng(seed)
    inits = [_init("mm_w", rng.normal(size=[features, hidden]) * 0.3), _init("mm_b", rng.normal(size=hidden) * 0.1),
             _init("gemm_w", rng.normal(size=[hidden, classes]) * 0.3), _init("gemm_b", rng.normal(size=classes))]
    nodes = [
        helper.make_node("MatMul", ["x", "mm_w"], ["mm"], name="matmul"),
        helper.make_node("Add", ["mm", "mm_b"], ["h"], name="add"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Gemm", ["r", "gemm_w", "gemm_b"], ["logits"], name="gemm", transB=0),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", features])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])
    return _model(nodes, [x], [y], inits)


def two_input_model(seed: int = 0, features: int = 6) -> onnx.ModelProto:
    """Two float inputs added, then a MatMul: for multi-input calibration layouts."""
    rng = np.random.default_rng(seed)
    inits = [_init("w", rng.normal(size=[features, 4]))]
    nodes = [helper.make_node("Add", ["a", "b"], ["s"], name="add"),
             helper.make_node("MatMul", ["s", "w"], ["y"], name="matmul")]
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", features]) for n in ("a", "b")]
    return _model(nodes, inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], inits)


def no_weights_model() -> onnx.ModelProto:
    """A model with nothing to quantize (a single Relu)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    return _model([helper.make_node("Relu", ["x"], ["y"], name="relu")], [x], [y], [])


def to_float16(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same model computing in float16 (in place): float initializers, inputs, outputs and known value types
    converted. Used by the float16 tests and by bench/fp16_models.py on the shared models."""
    for tensor in model.graph.initializer:
        if tensor.data_type == TensorProto.FLOAT:
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float16), tensor.name))
    for value in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        if value.type.tensor_type.elem_type == TensorProto.FLOAT:
            value.type.tensor_type.elem_type = TensorProto.FLOAT16
    onnx.checker.check_model(model)
    return model
