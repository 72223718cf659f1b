"""Write the quantized model: integer weight initializers feeding per-channel DequantizeLinear nodes.

Block-wise grids use opset 21's blocked DequantizeLinear (``block_size``, ``axis`` = the weight's input
dimension). With ``matmul_nbits``, MatMul layers with 4-bit codes become ``com.microsoft.MatMulNBits``
(see ``nbits.py``) instead.

Names follow onnxruntime's QDQ conventions (``<w>_quantized``, ``<w>_scale``, ``<w>_zero_point``,
``<w>_DequantizeLinear``) so its tools (qdq_loss_debug) pair float and quantized tensors. Codes are stored
as INT8, INT4 (opset 21) or INT2 (opset 25); 3-bit codes live in INT4 with the range [-4, 3].
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto, numpy_helper, version_converter

from onnxq import __version__
from onnxq.errors import OnnxqError
from onnxq.export.atomic import Staging
from onnxq.export.nbits import replace_with_nbits, supports_nbits
from onnxq.graph.bias import apply_bias_shifts
from onnxq.graph.layers import Layer
from onnxq.graph.loading import PROTOBUF_LIMIT, proto_size
from onnxq.graph.model import GraphModel
from onnxq.passes import Grid, QuantWeight

CONTAINERS = {2: (ml_dtypes.int2, TensorProto.INT2, 25), 4: (ml_dtypes.int4, TensorProto.INT4, 21),
              8: (np.int8, TensorProto.INT8, 13)}
IR_FOR_OPSET = {13: 7, 21: 10, 25: 11}
BLOCKED_OPSET = 21  # DequantizeLinear's block_size attribute


def container_bits(layer: Layer, bits: int) -> int:
    """Bits per code in the file: the grid's container, except 2-bit [in, out] weights whose output count is
    not a multiple of 4, which go in INT4. onnxruntime 1.32 fuses DequantizeLinear(INT2) + MatMul into a
    2-bit MatMulNBits and computes those shapes wrongly (its per-column INT2 zero points are not whole bytes)."""
    stored = Grid(bits).storage_bits
    if stored == 2 and layer.transposed and layer.out_channels % 4:
        return 4
    return stored


def stored_weight_bits(layer: Layer, bits: int, block_size: int | None = None, codes_only: bool = False) -> int:
    """Bits the file spends on one quantized weight: its codes, plus (unless ``codes_only``) a float32 scale and
    a zero point in the codes' container per output channel, or per block of inputs with ``block_size``; each
    tensor in whole bytes."""
    width = container_bits(layer, bits)
    codes = 8 * -(-layer.params * width // 8)
    if codes_only:
        return codes
    params = layer.out_channels * (1 if block_size is None else -(-layer.fan_in // block_size))
    return codes + 8 * (4 * params + -(-params * width // 8))


def block_scale_bits(layer: Layer, grid: Grid) -> int:
    """Bits of one weight's block-wise scales and zero points (0 for a per-channel grid, whose one scale per
    output channel is not counted in the stored width, as a bias is not)."""
    if not grid.block_size:
        return 0
    return (stored_weight_bits(layer, grid.bits, grid.block_size)
            - stored_weight_bits(layer, grid.bits, None, codes_only=True))


def required_opset(layers: list[Layer], results: dict[str, QuantWeight]) -> int:
    """The lowest default-domain opset whose DequantizeLinear accepts every container (and blocking) used."""
    return max([13] + [max(CONTAINERS[container_bits(layer, q.grid.bits)][2], BLOCKED_OPSET if q.grid.block_size
                           else 0) for layer in layers if (q := results.get(layer.name)) is not None])


def raise_opset(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """``model`` converted to ``opset`` (a new model, IR version raised to match) if it is below it, else
    ``model`` itself; the input is never changed."""
    current = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
    if current >= opset:
        return model
    try:
        converted = _convert_without_weights(model, opset)
    except Exception as err:  # noqa: BLE001 - the converter raises bare RuntimeErrors
        raise OnnxqError(f"cannot convert the model from opset {current} to {opset} for low-bit weights "
                         f"({str(err).splitlines()[0][:160]}); use --bits 8 or convert the model first") from err
    converted.ir_version = max(converted.ir_version, ir_version_for(opset))
    return converted


def ir_version_for(opset: int) -> int:
    """The lowest IR version a default-domain ``opset`` needs (INT4 needs IR 10, INT2 IR 11)."""
    return IR_FOR_OPSET[max(k for k in IR_FOR_OPSET if k <= opset)]


def _convert_without_weights(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """The version converter on the graph alone: large initializers leave the message while it runs (it
    serializes the model, which protobuf refuses over 2 GB) and come back by name afterwards."""
    held = {}
    for tensor in model.graph.initializer:
        if len(tensor.raw_data) > 1024:
            held[tensor.name] = tensor.raw_data
            tensor.ClearField("raw_data")
    try:
        converted = version_converter.convert_version(model, opset)
    finally:
        for tensor in model.graph.initializer:
            if tensor.name in held:
                tensor.raw_data = held[tensor.name]
    for tensor in converted.graph.initializer:
        if tensor.name in held and not tensor.raw_data:
            tensor.raw_data = held[tensor.name]
    return converted


def nbits_layers(layers: list[Layer], results: dict[str, QuantWeight], matmul_nbits: bool,
                 float16_weights: frozenset[str] = frozenset()) -> set[str]:
    """The layers written as MatMulNBits: with the option, every MatMul whose codes fit its 4-bit blocks
    (float32 ones: MatMulNBits' scales have the activations' type, and float16 layers keep float32 scales)."""
    return {layer.name for layer in layers if matmul_nbits and layer.name in results
            and supports_nbits(layer, results[layer.name]) and layer.weight not in float16_weights}


def build_quantized_model(model: onnx.ModelProto, layers: list[Layer], results: dict[str, QuantWeight],
                          metadata: dict[str, str], matmul_nbits: bool = False,
                          nbits_accuracy_level: int = 0) -> onnx.ModelProto:
    """A new model: ``model`` with every quantized layer's weight replaced by integer codes and a DQ node
    (or, with ``matmul_nbits``, 4-bit MatMul layers replaced by MatMulNBits nodes); ``model`` is not changed."""
    return quantized_graph(model, layers, results, metadata, matmul_nbits, nbits_accuracy_level).to_proto()


def quantized_graph(model: onnx.ModelProto, layers: list[Layer], results: dict[str, QuantWeight],
                    metadata: dict[str, str], matmul_nbits: bool = False, nbits_accuracy_level: int = 0) -> GraphModel:
    """The edits of :func:`build_quantized_model` on the model's graph (at the opset the codes need), for more
    edits (activation Q/DQ) before the one serialisation."""
    for layer in layers:
        if layer.name in results and results[layer.name].grid.block_size and len(layer.shape) != 2:
            raise OnnxqError(f"{layer.name}: block-wise scales need a 2-D weight (MatMul/Gemm), not a "
                             f"{len(layer.shape)}-D {layer.op_type} weight; quantize it per channel")
    float16 = frozenset(t.name for t in model.graph.initializer if t.data_type == TensorProto.FLOAT16)
    nbits = nbits_layers(layers, results, matmul_nbits, float16)
    opset = required_opset([layer for layer in layers if layer.name not in nbits], results)
    graph = GraphModel(raise_opset(model, opset))
    graph.min_ir_version = ir_version_for(opset)
    apply_bias_shifts(graph, layers, results)
    dq_nodes = []
    for layer in layers:
        if layer.name in nbits:
            replace_with_nbits(graph, layer, results[layer.name], nbits_accuracy_level)
        elif layer.name in results:
            dq_nodes.extend(_quantize_weight(graph, layer, results[layer.name]))
    graph.place(dq_nodes, first=True)
    set_metadata(graph, {"onnxq.version": __version__, **metadata})
    return graph


def _quantize_weight(graph: GraphModel, layer: Layer, qw: QuantWeight) -> list[gs.Node]:
    """Swap one float initializer for codes, scale and zero point; return its DequantizeLinear node, followed
    for a float16 weight by a Cast to float16 (float32 scales: the file holds exactly codes x scale, and
    onnxruntime's CPU provider ran that 1.0-1.9x faster than float16 scales in README's measurement)."""
    numpy_type, _, _ = CONTAINERS[container_bits(layer, qw.grid.bits)]
    name = layer.weight
    half = graph.tensor_proto(name).data_type == TensorProto.FLOAT16
    parts = {"quantized": layer.tensor(qw.codes).astype(numpy_type),
             "scale": _param_tensor(layer, qw.scale).astype(np.float32),
             "zero_point": _param_tensor(layer, qw.zero_point).astype(numpy_type)}
    codes, scale, zero_point = (graph.add_constant(numpy_helper.from_array(array, f"{name}_{part}"))
                                for part, array in parts.items())
    output = graph.variable(f"{name}_DequantizeLinear_Output")
    graph.replace_input(name, output)
    graph.drop_unused([name])
    blocked = {"axis": layer.input_axis, "block_size": qw.grid.block_size} if qw.grid.block_size else None
    dequantized = graph.variable(f"{output.name}_float32") if half else output
    dq = graph.make_node("DequantizeLinear", f"{name}_DequantizeLinear", [codes, scale, zero_point], [dequantized],
                         **(blocked or {"axis": layer.channel_axis}))
    if not half:
        return [dq]
    return [dq, graph.make_node("Cast", f"{name}_Cast", [dequantized], [output], to=TensorProto.FLOAT16)]


def _param_tensor(layer: Layer, values: np.ndarray) -> np.ndarray:
    """Per-channel (out,) parameters as they are; per-block (out, n_blocks) ones in the weight's layout."""
    return values.T if values.ndim == 2 and layer.transposed else values


def set_metadata(graph: GraphModel, values: dict[str, str]) -> None:
    """Set metadata entries; a key already present moves to the end with its new value."""
    for key in values:
        graph.metadata.pop(key, None)
    graph.metadata.update(values)


def layer_metadata(layers: list[Layer], results: dict[str, QuantWeight]) -> str:
    """Per-layer bit widths as JSON for the model's metadata."""
    return json.dumps({layer.name: _layer_entry(layer, results[layer.name]) for layer in layers
                       if layer.name in results})


def _layer_entry(layer: Layer, qw: QuantWeight) -> dict:
    """One layer's metadata: weight name, widths, symmetry and (blocked grids only) the block size."""
    entry = {"weight": layer.weight, "bits": qw.grid.bits, "stored_bits": container_bits(layer, qw.grid.bits),
             "symmetric": qw.grid.symmetric}
    return entry | ({"block_size": qw.grid.block_size} if qw.grid.block_size else {})


def save_atomic(model: onnx.ModelProto, path: Path, external_data: bool | None = None) -> list[Path]:
    """Write the model (and its external data) atomically; returns the files written."""
    with staged_model(model, path, external_data) as (_, written):
        pass
    return written


def keep_used_domains(model: onnx.ModelProto) -> None:
    """Drop (in place) the opset imports no node uses: onnxruntime's optimizer, which prepares the model, declares
    nine domains (ai.onnx.ml, training, preview, com.microsoft.nchwc, ...) where the input had one."""
    used = {"", "ai.onnx"} | {function.domain for function in model.functions}
    for nodes in (model.graph.node, *(function.node for function in model.functions)):
        used |= {node.domain for node in _all_nodes(nodes)}
    kept = [opset for opset in model.opset_import if opset.domain in used]
    if len(kept) != len(model.opset_import):
        del model.opset_import[:]
        model.opset_import.extend(kept)


def _all_nodes(nodes: Iterable[onnx.NodeProto]) -> Iterator[onnx.NodeProto]:
    """The nodes and, recursively, those of their subgraphs (If branches, Loop and Scan bodies)."""
    for node in nodes:
        yield node
        for attr in node.attribute:
            for graph in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs):
                yield from _all_nodes(graph.node)


@contextmanager
def staged_model(model: onnx.ModelProto, path: Path, external_data: bool | None = None
                 ) -> Iterator[tuple[Path, list[Path]]]:
    """Write the model, with its weights in ``<path>.data`` when ``external_data`` (default: over 2 GB), under a
    private temporary name and yield ``(staged model path, files)``; the block can load and check it there. When
    the block ends, the model and its data replace the previous ones together (``atomic.py``); if it raises,
    nothing changes. ``files`` lists the paths written, filled in at the commit."""
    keep_used_domains(model)
    external = proto_size(model) > PROTOBUF_LIMIT if external_data is None else external_data
    path = Path(path)
    data = path.parent / f"{path.name}.data"
    written: list[Path] = []
    staging = Staging([data, path])
    try:
        try:
            with staging.open(path):  # created exclusively: onnx then writes into the file we own
                pass
            onnx.save(model, str(staging.path(path)), save_as_external_data=external, location=data.name,
                      all_tensors_to_one_file=True, size_threshold=0 if external_data else 1024)
        except OSError as err:
            raise OnnxqError(f"cannot write {path} ({err.strerror or err}); check the folder's free space and "
                             "permissions") from err
        yield staging.path(path), written
        written.extend(staging.commit())
    finally:
        staging.discard()
