"""Prepare a float model for quantization: fold BatchNorm and constants, infer shapes.

onnxruntime's basic graph optimizations do what ``onnxruntime.quantization.preprocess`` does (Conv+BN
and Conv+Mul/Add fusion, constant folding, Identity removal) without leaving the ONNX domain, so the
weights end up as plain initializers of Conv/Gemm/MatMul nodes.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import onnx
import onnxruntime as ort

from onnxq.errors import OnnxqError
from onnxq.graph.bodies import prepare_bodies
from onnxq.graph.loading import PROTOBUF_LIMIT, proto_size
from onnxq.graph.model import name_unnamed_nodes

QUANTIZED_OPS = {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "MatMulNBits",
                 "ConvInteger", "MatMulInteger", "DynamicQuantizeLinear"}


def refuse_quantized(model: onnx.ModelProto) -> None:
    """Quantizing twice compounds error and confuses deployment; ask for the float model instead."""
    found = sorted({n.op_type for n in model.graph.node if n.op_type in QUANTIZED_OPS})
    if found:
        raise OnnxqError(f"the model is already quantized (it contains {', '.join(found)}); "
                         "pass the original float model")


def prepare(model: onnx.ModelProto) -> onnx.ModelProto:
    """Return an optimised copy with folded BatchNorm/constants, inferred shapes and every node named (unnamed
    ones get ``graph.model.derived_names``, so a layer's name is its node's name in this copy)."""
    refuse_quantized(model)
    with tempfile.TemporaryDirectory(prefix="onnxq-") as tmp:
        src, dst = Path(tmp) / "in.onnx", Path(tmp) / "prepared.onnx"
        large = proto_size(model) > PROTOBUF_LIMIT
        onnx.save(model, str(src), save_as_external_data=large, location="in.data")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = str(dst)
        options.log_severity_level = 3
        if large:
            options.add_session_config_entry(
                "session.optimized_model_external_initializers_file_name", "prepared.data")
        try:
            ort.InferenceSession(str(src), options, providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own exception types for unsupported models
            line = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
            raise OnnxqError(f"onnxruntime cannot load the model ({line}); "
                             "check that it runs in onnxruntime before quantizing") from err
        prepared = onnx.load(str(dst), load_external_data=True)
    prepared = _keep_metadata(prepared, model)
    name_unnamed_nodes(prepared)
    prepare_bodies(prepared)  # layers inside If/Loop/Scan bodies: weights at the top level, inputs local
    return _infer_shapes(prepared)


def _keep_metadata(prepared: onnx.ModelProto, original: onnx.ModelProto) -> onnx.ModelProto:
    """onnxruntime's optimised copy drops producer fields; restore them for the user."""
    prepared.producer_name, prepared.producer_version = original.producer_name, original.producer_version
    prepared.doc_string = original.doc_string
    del prepared.metadata_props[:]
    prepared.metadata_props.extend(original.metadata_props)
    return prepared


def _infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Best-effort shape inference; models with custom ops keep whatever shapes are known."""
    try:
        if proto_size(model) < 2**31:
            return onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - inference is an optimisation; unknown shapes are handled later
        pass
    return model
