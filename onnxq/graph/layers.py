"""Find the quantizable layers of a model (a query on its ``GraphModel``) and map weights to and from the matrix view.

A layer is one constant float weight feeding a Conv, Gemm or MatMul. Passes see it as a matrix
``out_channels x fan_in`` (Conv: ``Cout x Cin/g*kh*kw``); export maps codes back to the ONNX layout.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxq.errors import OnnxqError
from onnxq.graph.model import GraphModel

QUANTIZABLE_OPS = ("Conv", "Gemm", "MatMul")
FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)  # float16 weights are rounded in float64


@dataclass
class Layer:
    """A view of one Conv/Gemm/MatMul node and its constant weight: the names that find them in the model's
    ``GraphModel`` and the geometry needed to unfold the input and rebuild the tensor (plain data, so it
    pickles to worker processes and keys the statistics cache)."""

    name: str
    op_type: str
    weight: str
    activation: str
    shape: tuple[int, ...]
    bias: str | None = None
    groups: int = 1
    transposed: bool = False  # the ONNX tensor is [fan_in, out] (MatMul, Gemm with transB=0)
    trans_a: bool = False
    conv: dict = field(default_factory=dict)  # kernel_shape, strides, pads, dilations, auto_pad
    where: str = ""  # inside an If/Loop/Scan body: e.g. "inside the then_branch of If if" (graph/bodies.py)

    @property
    def out_channels(self) -> int:
        return self.shape[1] if self.transposed else self.shape[0]

    @property
    def fan_in(self) -> int:
        """Inputs one output channel reads (Conv: Cin/groups * kernel area)."""
        return self.params // self.out_channels

    @property
    def channel_axis(self) -> int:
        """The per-channel axis of the ONNX weight tensor (DequantizeLinear's ``axis``)."""
        return 1 if self.transposed else 0

    @property
    def input_axis(self) -> int:
        """The fan-in axis of a 2-D weight (blocked DequantizeLinear's ``axis``): 0 for MatMul's [in, out]."""
        return 0 if self.transposed else 1

    @property
    def params(self) -> int:
        return int(np.prod(self.shape))

    def matrix(self, tensor: np.ndarray) -> np.ndarray:
        """The ONNX weight tensor as ``out_channels x fan_in``."""
        return tensor.T if self.transposed else tensor.reshape(self.shape[0], -1)

    def tensor(self, matrix: np.ndarray) -> np.ndarray:
        """The inverse of :meth:`matrix`: back to the ONNX layout."""
        return np.ascontiguousarray(matrix.T) if self.transposed else matrix.reshape(self.shape)


def _exclusion_pattern(text: str) -> re.Pattern:
    """A --nodes_to_exclude entry as a compiled regular expression, or a one-line error saying why not."""
    try:
        return re.compile(text)
    except re.error as err:
        raise OnnxqError(f"--nodes_to_exclude {text!r} is not a valid regular expression ({err}); "
                         "escape special characters, e.g. 'conv\\[1\\]' for a node named conv[1]") from err


def find_layers(model: onnx.ModelProto | GraphModel, op_types: tuple[str, ...] = QUANTIZABLE_OPS,
                exclude: tuple[str, ...] = ()) -> tuple[list[Layer], list[str]]:
    """Every quantizable layer in graph order, and human-readable reasons for what was skipped. The model is
    not changed: an unnamed node's layer gets the node's derived name (``graph.model.derived_names``)."""
    unknown = set(op_types) - set(QUANTIZABLE_OPS)
    if unknown:
        raise OnnxqError(f"cannot quantize op types {sorted(unknown)}; choose from {', '.join(QUANTIZABLE_OPS)}")
    graph = model if isinstance(model, GraphModel) else GraphModel(model)
    patterns = [_exclusion_pattern(p) for p in exclude]
    layers, skipped = [], []
    for node, where in graph.walk():  # layers inside If/Loop/Scan bodies too (calibrated through graph/bodies.py)
        if node.op not in QUANTIZABLE_OPS or len(node.inputs) < 2:
            continue
        if node.op not in op_types:
            skipped.append(f"{node.name}: {node.op} is not in --op_types_to_quantize ({', '.join(op_types)})")
            continue
        if any(p.fullmatch(node.name) for p in patterns):
            skipped.append(f"{node.name}: excluded by --nodes_to_exclude")
            continue
        if graph.constant(node.inputs[1].name) is None:
            reason = _no_constant_weight(node, graph)
            if reason:
                skipped.append(f"{node.name}: {reason}")
            continue  # otherwise activation x activation (attention): not a layer
        weight = graph.tensor_proto(node.inputs[1].name)
        reason = _unsupported(node, weight, graph)
        if reason:
            skipped.append(f"{node.name}: {reason}")
            continue
        layers.append(_make_layer(node, weight, where))
    refuse_non_finite(layers, graph)
    return layers, skipped


def refuse_non_finite(layers: list[Layer], graph: GraphModel) -> None:
    """One error naming every layer whose weight holds NaN or Inf (a model to fix, not to quantize)."""
    bad = [f"weight {layer.weight} of {layer.name}" for layer in layers
           if not np.isfinite(graph.array(layer.weight)).all()]
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise OnnxqError(f"{', '.join(bad[:3])}{more} contain{'s' if len(bad) == 1 else ''} NaN or Inf; "
                         "fix the float model first")


def grouped_reasons(skipped: list[str], names_shown: int = 4) -> list[str]:
    """``"name: reason"`` lines merged per reason (``"a, b and 3 more: reason"``), in first-seen order."""
    groups: dict[str, list[str]] = {}
    for line in skipped:
        name, _, reason = line.partition(": ")
        groups.setdefault(reason, []).append(name)
    merged = []
    for reason, names in groups.items():
        more = len(names) - names_shown
        merged.append(", ".join(names[:names_shown]) + (f" and {more} more" if more > 0 else "") + f": {reason}")
    return merged


def nothing_to_quantize(skipped: list[str]) -> OnnxqError:
    """The error for a model without a quantizable layer: the reason for each candidate, when there are some."""
    if not skipped:
        return OnnxqError("the model has no Conv, Gemm or MatMul with a constant float weight to quantize; "
                          "pass --allow-empty to write it unchanged")
    reasons = grouped_reasons(skipped)
    shown = "; ".join(reasons[:3]) + (f"; and {len(reasons) - 3} other reasons" if len(reasons) > 3 else "")
    return OnnxqError(f"no layer can be quantized ({len(skipped)} candidate(s) skipped: {shown}); "
                      "pass --allow-empty to write the model unchanged")


def _no_constant_weight(node: gs.Node, graph: GraphModel) -> str | None:
    """Why a Conv/Gemm/MatMul whose second input is not an initializer is no layer (None: activation x activation)."""
    first, second = node.inputs[0].name, node.inputs[1].name
    if node.op == "MatMul" and graph.constant(first) is not None:
        return (f"its constant {first} is the first input (W @ x); only x @ W with the weight second is "
                "supported (rewrite it as x^T @ W^T or Gemm)")
    source = graph.producer(second)
    if node.op != "MatMul" and source is not None:
        return f"its weight {second} is computed in the graph (by a {source.op} node), not stored"
    return None


def _unsupported(node: gs.Node, weight: onnx.TensorProto, graph: GraphModel) -> str | None:
    """Why a candidate node cannot be quantized, or None."""
    if weight.data_type not in FLOAT_TYPES:
        kind = onnx.TensorProto.DataType.Name(weight.data_type)
        return f"weight {weight.name} is {kind}, not FLOAT or FLOAT16"
    if graph.is_output(weight.name):
        return f"weight {weight.name} is also a graph output; it stays in float"
    users = [user.name for user in graph.consumers(weight.name)]
    if len(users) > 1:
        return (f"weight {weight.name} is shared by {len(users)} uses ({', '.join(dict.fromkeys(users))}); "
                "tied weights stay in float")
    dims = len(weight.dims)
    if node.op == "Conv" and dims not in (3, 4):
        return f"{dims - 2}-D Conv is not supported (1-D and 2-D are)"
    if node.op in ("Gemm", "MatMul") and dims != 2:
        return f"weight has {dims} dimensions (a 2-D weight is needed)"
    return None


def _make_layer(node: gs.Node, weight: onnx.TensorProto, where: str = "") -> Layer:
    """Build the Layer record for a supported node (``where``: the body it sits in, "" at the top level)."""
    attrs = node.attrs
    shape = tuple(int(d) for d in weight.dims)
    bias = node.inputs[2].name if len(node.inputs) > 2 and node.inputs[2].name else None
    common = dict(name=node.name, op_type=node.op, weight=weight.name, activation=node.inputs[0].name,
                  shape=shape, bias=bias, where=where)
    if node.op == "Conv":
        spatial = len(shape) - 2
        auto_pad = attrs.get("auto_pad", "NOTSET")
        conv = dict(kernel_shape=list(shape[2:]), strides=list(attrs.get("strides", [1] * spatial)),
                    pads=list(attrs.get("pads", [0] * 2 * spatial)),
                    dilations=list(attrs.get("dilations", [1] * spatial)),
                    auto_pad=auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad)
        return Layer(**common, groups=int(attrs.get("group", 1)), conv=conv)
    if node.op == "Gemm":
        return Layer(**common, transposed=not attrs.get("transB", 0), trans_a=bool(attrs.get("transA", 0)))
    return Layer(**common, transposed=True)
