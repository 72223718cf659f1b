"""Write the quantized model: integer weight initializers feeding per-channel DequantizeLinear nodes.

Names follow onnxruntime's QDQ conventions (``<w>_quantized``, ``<w>_scale``, ``<w>_zero_point``,
``<w>_DequantizeLinear``) so its tools (qdq_loss_debug) pair float and quantized tensors. Codes are stored
as INT8, INT4 (opset 21) or INT2 (opset 25); 3-bit codes live in INT4 with the range [-4, 3].
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, numpy_helper, version_converter

from . import __version__
from .errors import OnnxqError
from .layers import Layer
from .passes import QuantWeight

CONTAINERS = {2: (ml_dtypes.int2, TensorProto.INT2, 25), 4: (ml_dtypes.int4, TensorProto.INT4, 21),
              8: (np.int8, TensorProto.INT8, 13)}
IR_FOR_OPSET = {13: 7, 21: 10, 25: 11}
PROTOBUF_LIMIT = 2**31 - 2**26


def required_opset(results: dict[str, QuantWeight]) -> int:
    """The lowest default-domain opset whose DequantizeLinear accepts every container used."""
    return max([13] + [CONTAINERS[q.grid.storage_bits][2] for q in results.values()])


def raise_opset(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """Convert the model to ``opset`` only if it is below it, and raise the IR version to match."""
    current = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
    if current < opset:
        try:
            model = version_converter.convert_version(model, opset)
        except Exception as err:  # noqa: BLE001 - the converter raises bare RuntimeErrors
            raise OnnxqError(f"cannot convert the model from opset {current} to {opset} for low-bit weights "
                             f"({str(err).splitlines()[0][:160]}); use --bits 8 or convert the model first") from err
    model.ir_version = max(model.ir_version, IR_FOR_OPSET[max(k for k in IR_FOR_OPSET if k <= opset)])
    return model


def build_quantized_model(model: onnx.ModelProto, layers: list[Layer], results: dict[str, QuantWeight],
                          metadata: dict[str, str]) -> onnx.ModelProto:
    """A copy of ``model`` with every quantized layer's weight replaced by integer codes and a DQ node."""
    out = raise_opset(_copy(model), required_opset(results))
    inits = {t.name: t for t in out.graph.initializer}
    dq_nodes = []
    for layer in layers:
        if layer.name in results:
            dq_nodes.append(_quantize_weight(out, layer, results[layer.name], inits))
    nodes = dq_nodes + list(out.graph.node)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    _set_metadata(out, {"onnxq.version": __version__, **metadata})
    return out


def _quantize_weight(model: onnx.ModelProto, layer: Layer, qw: QuantWeight, inits: dict) -> onnx.NodeProto:
    """Swap one float initializer for codes, scale and zero point; return its DequantizeLinear node."""
    numpy_type, _, _ = CONTAINERS[qw.grid.storage_bits]
    name = layer.weight
    codes = layer.tensor(qw.codes).astype(numpy_type)
    model.graph.initializer.remove(inits[name])
    model.graph.initializer.extend([
        numpy_helper.from_array(codes, f"{name}_quantized"),
        numpy_helper.from_array(qw.scale.astype(np.float32), f"{name}_scale"),
        numpy_helper.from_array(qw.zero_point.astype(numpy_type), f"{name}_zero_point"),
    ])
    for value in [v for v in model.graph.input if v.name == name]:
        model.graph.input.remove(value)
    output = f"{name}_DequantizeLinear_Output"
    for node in model.graph.node:
        for index, tensor in enumerate(node.input):
            if tensor == name:
                node.input[index] = output
    return onnx.helper.make_node("DequantizeLinear", [f"{name}_quantized", f"{name}_scale", f"{name}_zero_point"],
                                 [output], name=f"{name}_DequantizeLinear", axis=layer.channel_axis)


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def _set_metadata(model: onnx.ModelProto, values: dict[str, str]) -> None:
    kept = [p for p in model.metadata_props if p.key not in values]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in values.items():
        model.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))


def layer_metadata(layers: list[Layer], results: dict[str, QuantWeight]) -> str:
    """Per-layer bit widths as JSON for the model's metadata."""
    return json.dumps({layer.name: {"weight": layer.weight, "bits": results[layer.name].grid.bits,
                                    "stored_bits": results[layer.name].grid.storage_bits,
                                    "symmetric": results[layer.name].grid.symmetric}
                       for layer in layers if layer.name in results})


def save_atomic(model: onnx.ModelProto, path: Path, external_data: bool | None = None) -> None:
    """Write the model (and its external data) to a temporary name, then rename: no partial file, ever."""
    external = model.ByteSize() > PROTOBUF_LIMIT if external_data is None else external_data
    path = Path(path)
    try:
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    except OSError as err:
        raise OnnxqError(f"cannot write to {path.parent} ({err.strerror}); choose another output path") from err
    try:
        data_name = f"{path.name}.data"
        onnx.save(model, str(tmp / path.name), save_as_external_data=external, location=data_name,
                  all_tensors_to_one_file=True, size_threshold=0 if external_data else 1024)
        if (tmp / data_name).exists():  # tensors under 1 KB stay inline even with external data
            os.replace(tmp / data_name, path.parent / data_name)
        os.replace(tmp / path.name, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
