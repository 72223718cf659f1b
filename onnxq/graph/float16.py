"""Float16 models: undo the casts onnxruntime's CPU provider inserts while preparing them.

``prepare`` saves onnxruntime's optimised graph (BatchNorm and constants folded). For a float16 model the CPU
provider also inserts Cast nodes around every operator it has no float16 kernel for (Conv, Gemm, ...) and
renames the tensors in between ``InsertedPrecisionFreeCast_<name>``: the weights would then reach their layers
through a Cast (not quantizable) and the written model would compute in float32 on every provider. Removing
those casts restores the float16 graph the user gave, with the folding kept; onnxruntime inserts the same
casts again when it loads the quantized model on CPU, and GPU providers run it in float16.
"""

from __future__ import annotations

import onnx

from onnxq.errors import OnnxqError

INSERTED_PREFIX = "InsertedPrecisionFreeCast_"


def without_inserted_casts(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with onnxruntime's inserted precision casts removed (in place; returned for chaining)."""
    if not any(name.startswith(INSERTED_PREFIX) for node in model.graph.node for name in node.output):
        return model

    def original(name: str) -> str:
        return name[len(INSERTED_PREFIX):] if name.startswith(INSERTED_PREFIX) else name

    kept = []
    for node in model.graph.node:
        inputs, outputs = [original(n) for n in node.input], [original(n) for n in node.output]
        if node.op_type == "Cast" and len(inputs) == 1 and inputs == outputs:
            continue  # an inserted cast: its input and output are the same tensor again
        node.ClearField("input")
        node.input.extend(inputs)
        node.ClearField("output")
        node.output.extend(outputs)
        kept.append(node)
    del model.graph.node[:]
    model.graph.node.extend(kept)
    renamed = [v for v in model.graph.value_info if v.name.startswith(INSERTED_PREFIX)]
    for value in renamed:  # their float32 types are wrong now; shape inference gives the float16 ones
        model.graph.value_info.remove(value)
    try:
        return onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - as prepare's own inference: unknown shapes are handled later
        return model


def is_float16(tensor: onnx.TensorProto) -> bool:
    """A float16 initializer."""
    return tensor.data_type == onnx.TensorProto.FLOAT16


def refuse_float16_activations(model: onnx.ModelProto, act_bits: int | None) -> None:
    """Activation Q/DQ is written with float32 scales, which a float16 graph cannot take: say so before any work."""
    if act_bits is not None and any(is_float16(t) for t in model.graph.initializer):
        raise OnnxqError("--act-bits (and --prefer speed) needs a float32 model: this one computes in float16; "
                         "drop the option for weight-only quantization, or quantize the float32 model")
