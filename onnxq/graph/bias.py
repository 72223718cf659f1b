"""Bias correction: fold the mean of each layer's quantization error into its bias.

With the weight error ``E = W - Q`` and the mean input row ``mu``, a layer's output error has the constant
part ``E mu`` per output channel. Subtracting it in the bias leaves ``e^T (H - mu mu^T) e``: so the rounding
passes minimise the centred Gram matrix, and the bias absorbs the rest (the joint optimum over codes and a
bias shift). Conv and Gemm layers without a bias get a zero one first; MatMul layers use the constant
vector of the Add that follows them. A layer with nowhere to put a shift keeps the plain objective.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper

from onnxq.graph.layers import Layer
from onnxq.graph.model import GraphModel
from onnxq.passes import QuantWeight
from onnxq.passes.grid import group_of_rows

FLOAT_DTYPES = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16}


@dataclass(frozen=True)
class BiasSlot:
    """The float initializer a layer's output shift is added to, and the factor that maps a shift onto it."""

    tensor: str
    factor: float = 1.0


def add_zero_biases(graph: GraphModel, layers: list[Layer]) -> None:
    """Edit ``graph``: give Conv and Gemm layers without a bias a zero one, so their error mean can be corrected."""
    for layer in layers:
        node = graph.node(layer.name)
        if layer.op_type not in ("Conv", "Gemm") or (len(node.inputs) > 2 and node.inputs[2].name):
            continue
        dtype = FLOAT_DTYPES[graph.tensor_proto(layer.weight).data_type]  # float16 models get a float16 bias
        bias = graph.add_constant(numpy_helper.from_array(np.zeros(layer.out_channels, dtype), f"{layer.weight}_bias"))
        if len(node.inputs) > 2:
            node.inputs[2] = bias  # an empty optional input
        else:
            node.inputs.append(bias)


def with_zero_biases(model: onnx.ModelProto, layers: list[Layer]) -> onnx.ModelProto:
    """``model`` with :func:`add_zero_biases` applied: a new model when a bias was added, else ``model`` itself."""
    graph = GraphModel(model)
    missing = [layer for layer in layers if layer.op_type in ("Conv", "Gemm") and not layer.bias]
    if not missing:
        return model
    add_zero_biases(graph, missing)
    return graph.to_proto()


def bias_slots(model: onnx.ModelProto | GraphModel, layers: list[Layer]) -> dict[str, BiasSlot]:
    """The layers whose output can be shifted per channel through a float initializer used by them alone."""
    graph = model if isinstance(model, GraphModel) else GraphModel(model)
    slots = {}
    for layer in layers:
        slot = _slot(graph.node(layer.name), layer, graph)
        if (slot and graph.constant(slot.tensor) is not None and len(graph.consumers(slot.tensor)) == 1
                and _is_channel_vector(graph.tensor_proto(slot.tensor), layer)):
            slots[layer.name] = slot
    return slots


def _slot(node: gs.Node, layer: Layer, graph: GraphModel) -> BiasSlot | None:
    """Where the layer's bias lives: Conv/Gemm's third input, or the constant of the Add after a MatMul."""
    bias = node.inputs[2].name if len(node.inputs) > 2 else ""
    if layer.op_type == "Conv":
        return BiasSlot(bias) if bias else None
    if layer.op_type == "Gemm":
        beta = float(node.attrs.get("beta", 1.0))
        if not bias or beta == 0:
            return None
        return BiasSlot(bias, float(node.attrs.get("alpha", 1.0)) / beta)
    output = node.outputs[0].name
    after = graph.consumers(output)
    if len(after) != 1 or after[0].op != "Add":
        return None
    others = [t.name for t in after[0].inputs if t.name != output]
    return BiasSlot(others[0]) if len(others) == 1 else None


def _is_channel_vector(tensor: onnx.TensorProto, layer: Layer) -> bool:
    """A float (or float16) bias with one value per output channel ((out,) or (1, out))."""
    dims = [int(d) for d in tensor.dims]
    return (tensor.data_type in FLOAT_DTYPES and bool(dims) and dims[-1] == layer.out_channels
            and int(np.prod(dims)) == layer.out_channels)


def output_shift(W: np.ndarray, Q: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """``(W - Q) mu`` per output channel, each row against the mean input of its group (mean: G x d)."""
    groups = group_of_rows(W.shape[0], mean.shape[0])
    return np.einsum("od,od->o", W.astype(np.float64) - Q.astype(np.float64), mean[groups])


def corrected_bias(model_bias: np.ndarray, qw: QuantWeight, slot: BiasSlot) -> np.ndarray:
    """The bias initializer with the layer's error mean added back (its original shape and float type)."""
    shift = qw.bias_shift.reshape(model_bias.shape) * slot.factor
    with np.errstate(over="ignore"):  # only a float model whose own outputs overflow gets here; it is refused later
        return (model_bias.astype(np.float64) + shift).astype(model_bias.dtype)


def replacement_tensors(layer: Layer, qw: QuantWeight, slots: dict[str, BiasSlot],
                        float_tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The float tensors that put one quantized layer into the model: its dequantized weight and, where its bias
    absorbs the error mean, the corrected bias (``float_tensors`` holds the float tensors, whose types they keep:
    a float16 weight is the float32 dequantized one rounded to float16, as the exported Cast does)."""
    tensors = {layer.weight: layer.tensor(qw.dequantize()).astype(float_tensors[layer.weight].dtype)}
    slot = slots.get(layer.name)
    if slot is not None and qw.bias_shift is not None:
        tensors[slot.tensor] = corrected_bias(float_tensors[slot.tensor], qw, slot)
    return tensors


def apply_bias_shifts(graph: GraphModel, layers: list[Layer], results: dict[str, QuantWeight]) -> None:
    """Edit ``graph``: rewrite the bias of every layer whose quantized weight carries a shift."""
    slots = bias_slots(graph, layers)
    for layer in layers:
        qw = results.get(layer.name)
        if qw is None or qw.bias_shift is None or layer.name not in slots:
            continue
        slot = slots[layer.name]
        graph.set_values(slot.tensor, corrected_bias(graph.array(slot.tensor), qw, slot))
