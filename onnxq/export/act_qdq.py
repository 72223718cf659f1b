"""Activation Q/DQ for W8A8: place uint8 QuantizeLinear/DequantizeLinear pairs so onnxruntime runs integer kernels.

Entry point: ``quantize_activations(model, qmodel, layers, batches, method, act_layers)``.

* ``model`` is the prepared float model (what ``onnxq.graph.prepare.prepare`` returns; BatchNorm already folded),
  ``qmodel`` the output of ``build_quantized_model`` for the same model and ``layers``.
* ``act_layers`` (layer names) get activation Q/DQ; their weights must already be quantized in ``qmodel``.
  onnxruntime fuses a layer into QLinearConv / QLinearMatMul / QGemm only when its weight is INT8 with zero
  point 0 (per channel); other widths are allowed (W4A8) and run as DequantizeLinear + float op.
  ``None`` means every layer whose weight is INT8 with zero point 0 (``default_act_layers``).
* ``batches`` are calibration feeds for ``model`` (e.g. ``sources.batches(...)``), streamed once: memory is
  one batch plus a 4096-bin histogram per calibrated tensor. ``method``: ``mse`` (default), ``percentile``
  or ``minmax`` (see ``onnxq.calibration.activations``).
* Returns a new ModelProto; neither input model is modified. Opset and IR version are those of ``qmodel``.
  A bias that would overflow int32 raises its channel's weight scale (near-dead channels only), as
  onnxruntime does.

Placement follows ``onnxruntime.quantization.quantize_static(quant_format=QDQ)``: every act layer's input
and every Conv output get ``<t>_QuantizeLinear`` -> ``<t>_DequantizeLinear``; a Relu, or a Clip whose bounds
contain 0, that alone consumes a quantized output is removed and its range moves to the Q node (onnxruntime
does the same); MaxPool/Flatten/Reshape/Transpose/Squeeze/Unsqueeze reuse their input's scale, so
onnxruntime runs them on uint8; Add/Mul/GlobalAveragePool/AveragePool whose inputs are all quantized get
their own output range (QLinearAdd, QLinearGlobalAveragePool, ...); a Concat of quantized inputs shares one
scale with them (the union of their ranges), so QLinearConcat only copies bytes (onnxruntime's quantize_static
requantizes every input). A Gemm or MatMul output is quantized only when something quantized consumes it
(onnxruntime's QGemm and MatMulIntegerToFloat can return float), so logits stay float. Tensors that reach a
graph output unchanged or only averaged (SqueezeNet's last Conv before its global pooling) are calibrated by
min/max: clipping the top logit, or its evidence, changes the prediction. Biases become int32 with scale
``s_in * s_w`` (per channel) and zero point 0.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field

import ml_dtypes
import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto, numpy_helper

from onnxq.calibration.activations import activation_ranges
from onnxq.data.sources import Feed
from onnxq.errors import OnnxqError
from onnxq.graph.layers import Layer
from onnxq.graph.model import GraphModel

log = logging.getLogger("onnxq")
SAME_SCALE_OPS = ("MaxPool", "Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze")
QLINEAR_OPS = ("Add", "Mul", "Concat", "GlobalAveragePool", "AveragePool")
FOLDABLE_OPS = ("Relu", "Clip")
POOLING_OPS = ("GlobalAveragePool", "AveragePool")  # order-preserving: the top values before them matter
QMIN, QMAX = 0, 255  # uint8 activations (u8s8 on x86, what onnxruntime's CPU kernels prefer)
INT32_MAX = 2**31 - 1
BIAS_LIMIT = 2**30  # largest int32 bias code we write: headroom for the accumulator it starts


@dataclass
class QdqPlan:
    """Which activation tensors get a Q/DQ pair, and which of them share one scale and zero point."""

    source: dict[str, str] = field(default_factory=dict)  # quantized tensor -> tensor naming its group's scale
    ranged: set[str] = field(default_factory=set)  # calibrated tensors; a group's range is their union
    folded: dict[str, str] = field(default_factory=dict)  # removed Relu/Clip node -> producer node
    exact: set[str] = field(default_factory=set)  # ranged tensors whose group reaches a graph output

    @property
    def calibrated(self) -> list[str]:
        """The tensors that need a calibrated range."""
        return sorted(self.ranged)

    def group_ranges(self, ranges: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
        """Each group's range: the union of its calibrated members' ranges."""
        union: dict[str, tuple[float, float]] = {}
        for tensor in self.calibrated:
            owner, (low, high) = self.source[tensor], ranges[tensor]
            old_low, old_high = union.get(owner, (low, high))
            union[owner] = (min(low, old_low), max(high, old_high))
        return union


class _Groups:
    """Union-find over tensor names; a group is named after its most upstream member (as onnxruntime does)."""

    def __init__(self, position: dict[str, int], bounds: dict[str, tuple[float, float]]) -> None:
        self.parent: dict[str, str] = {}
        self.position = position
        self.bounds = dict(bounds)  # group -> the Relu/Clip bounds its Q node must keep (folded activations)

    def __contains__(self, tensor: str) -> bool:
        return tensor in self.parent

    def add(self, tensor: str) -> None:
        self.parent.setdefault(tensor, tensor)

    def find(self, tensor: str) -> str:
        while self.parent[tensor] != tensor:
            self.parent[tensor] = self.parent[self.parent[tensor]]
            tensor = self.parent[tensor]
        return tensor

    def bound(self, tensor: str) -> tuple[float, float] | None:
        return self.bounds.get(self.find(tensor))

    def join(self, a: str, b: str) -> None:
        first, second = sorted((self.find(a), self.find(b)), key=lambda t: self.position.get(t, -1))
        if first != second:
            self.bounds[first] = self.bounds.get(first) or self.bounds.get(second)
            self.parent[second] = first


def _is_activation(graph: GraphModel, tensor: str) -> bool:
    """A tensor computed from the inputs: not an initializer, a Constant's output or a dequantized initializer."""
    if not tensor or graph.constant(tensor) is not None:
        return False
    producer = graph.producer(tensor)
    return producer is None or not (producer.op == "Constant" or (
        producer.op == "DequantizeLinear" and graph.constant(producer.inputs[0].name) is not None))


def _names(tensors: list[gs.Tensor]) -> list[str]:
    return [t.name for t in tensors]


def plan_qdq(model: onnx.ModelProto | GraphModel, layers: list[Layer], act_layers: Collection[str]) -> QdqPlan:
    """Decide the Q/DQ placement for the act layers of ``model`` (float or weight-quantized: same tensors)."""
    graph = model if isinstance(model, GraphModel) else GraphModel(model)
    lost = [layer.name for layer in layers if layer.name in act_layers and graph.node(layer.name) is None]
    if lost:
        raise OnnxqError(f"layer {lost[0]} is not a node of the model; pass the prepared model the layers were "
                         "found in (and the model exported from it)")
    acts = [graph.node(layer.name) for layer in layers  # body layers keep float activations (weight-only)
            if layer.name in act_layers and not layer.where and _is_activation(graph, layer.activation)]
    folds = _foldable(graph, [n.name for n in acts] + [n.name for n in graph.nodes if n.op in QLINEAR_OPS])
    output_of = {n.name: folds[n.name][0].outputs[0].name if n.name in folds else n.outputs[0].name
                 for n in graph.nodes}
    position = {t.name: index for index, node in enumerate(graph.nodes) for t in node.outputs}
    bounds = {output_of[name]: fold_bounds for name, (_, fold_bounds) in folds.items()}
    groups, plan, tentative = _Groups(position, bounds), QdqPlan(), set()
    for node in acts:
        for tensor in (node.inputs[0].name, output_of[node.name]):
            groups.add(tensor)
            plan.ranged.add(tensor)
        if node.op != "Conv":
            tentative.add(output_of[node.name])
    _propagate(graph, groups, plan.ranged, output_of)
    plan.source = {tensor: groups.find(tensor) for tensor in groups.parent}
    _drop_unneeded(graph, plan, tentative, {n.name for n in acts}, output_of)
    plan.folded = {folds[name][0].name: name for name in folds if output_of[name] in plan.source}
    at_output = _groups_reaching_outputs(graph, plan, output_of)
    plan.exact = {t for t in plan.ranged if plan.source[t] in at_output}
    return plan


def calibration_candidates(model: onnx.ModelProto | GraphModel, layers: list[Layer]) -> list[str]:
    """Every tensor that :func:`plan_qdq` may calibrate for any subset of ``layers`` (so one calibration pass
    serves whichever layers end up with activation Q/DQ): each layer's input and output, and the output of each
    op with an integer version whose inputs are all activations (a folded Relu/Clip's output where one follows)."""
    graph = model if isinstance(model, GraphModel) else GraphModel(model)
    acts = [layer.name for layer in layers
            if graph.node(layer.name) is not None and not layer.where and _is_activation(graph, layer.activation)]
    qlinear_ops = [n.name for n in graph.nodes if n.op in QLINEAR_OPS]
    qlinear = [name for name in qlinear_ops
               if all(_is_activation(graph, t) for t in _names(graph.node(name).inputs) if t)]
    folds = _foldable(graph, list(dict.fromkeys(acts + qlinear_ops)))
    output_of = {name: folds[name][0].outputs[0].name if name in folds else graph.node(name).outputs[0].name
                 for name in {*acts, *qlinear}}
    return sorted({graph.node(name).inputs[0].name for name in acts} | set(output_of.values()))


def _groups_reaching_outputs(graph: GraphModel, plan: QdqPlan, output_of: dict[str, str]) -> set[str]:
    """Groups whose values reach a graph output unchanged or only averaged (the logits and their evidence)."""
    reach = {plan.source[t] for t in plan.source if graph.is_output(t)}
    pools = [n for n in graph.nodes if n.op in POOLING_OPS and n.inputs[0].name in plan.source
             and output_of[n.name] in plan.source]
    grown = True
    while grown:
        before = len(reach)
        reach |= {plan.source[n.inputs[0].name] for n in pools if plan.source[output_of[n.name]] in reach}
        grown = len(reach) > before
    return reach


def _foldable(graph: GraphModel, producers: list[str]) -> dict[str, tuple[gs.Node, tuple[float, float]]]:
    """Producer node -> the Relu/Clip that alone consumes its output and that a uint8 Q can replace, with its
    bounds (the Q node's range must stay inside them, which the calibrated range of its output does)."""
    folds = {}
    for name in producers:
        out = graph.node(name).outputs[0].name
        users = graph.readers(out)
        if graph.is_output(out) or len(users) != 1 or users[0].op not in FOLDABLE_OPS:
            continue
        bounds = _activation_bounds(graph, users[0])
        if bounds is not None and bounds[0] <= 0 <= bounds[1]:
            folds[name] = (users[0], bounds)
    return folds


def _activation_bounds(graph: GraphModel, node: gs.Node) -> tuple[float, float] | None:
    """A Relu's or Clip's output bounds, or None when a Clip bound is not a known constant."""
    if node.op == "Relu":
        return (0.0, np.inf)
    bounds = [float(node.attrs.get("min", -np.inf)), float(node.attrs.get("max", np.inf))]
    for index, tensor in enumerate(_names(node.inputs[1:3])):
        if tensor:
            if graph.constant(tensor) is None:
                return None
            bounds[index] = float(graph.array(tensor))
    return bounds[0], bounds[1]


def _propagate(graph: GraphModel, groups: _Groups, ranged: set[str], output_of: dict[str, str]) -> None:
    """Extend quantization through pass-through ops and Concat (one shared scale: onnxruntime then copies
    bytes) and through ops with integer versions (their own range)."""
    for node in graph.nodes:
        if node.op in SAME_SCALE_OPS and node.inputs[0].name in groups:
            _join_all(groups, ranged, [node.inputs[0].name], node.outputs[0].name)
            continue
        inputs = [t for t in _names(node.inputs) if t]
        if node.op not in QLINEAR_OPS or not inputs or not all(
                _is_activation(graph, t) and t in groups for t in inputs):
            continue
        if node.op == "Concat" and len({groups.bound(t) for t in inputs}) == 1:
            _join_all(groups, ranged, inputs, output_of[node.name])  # equal bounds: every folded Relu/Clip holds
        else:
            groups.add(output_of[node.name])
            ranged.add(output_of[node.name])


def _join_all(groups: _Groups, ranged: set[str], inputs: list[str], output: str) -> None:
    """Put ``output`` in one group with ``inputs``; its range is then theirs (values pass through unchanged)."""
    groups.add(output)
    ranged.discard(output)
    for tensor in inputs:
        groups.join(tensor, output)


def _drop_unneeded(graph: GraphModel, plan: QdqPlan, tentative: set[str], acts: set[str],
                   output_of: dict[str, str]) -> None:
    """Forget Gemm/MatMul outputs (and tensors sharing their scale) that no integer consumer reads."""
    needed: set[str] = set()
    for node in reversed(graph.nodes):
        first = node.inputs[0].name if node.inputs else None
        for tensor in _names(node.inputs):
            if tensor in plan.source and (
                    (node.name in acts and tensor == first)
                    or (node.op in QLINEAR_OPS and output_of[node.name] in plan.source)
                    or (node.op in SAME_SCALE_OPS and node.outputs[0].name in needed)):
                needed.add(tensor)
    for tensor in tentative - needed:
        group = [t for t, owner in plan.source.items() if owner == plan.source[tensor]]
        if not needed.intersection(group) and plan.ranged.intersection(group) <= tentative:
            for member in group:
                del plan.source[member]
                plan.ranged.discard(member)


def quant_params(low: float, high: float) -> tuple[np.float32, np.uint8]:
    """uint8 scale and zero point for a range widened to contain 0 (as onnxruntime computes them)."""
    low, high = min(float(low), 0.0), max(float(high), 0.0)
    scale = np.float32((high - low) / (QMAX - QMIN)) if high > low else np.float32(1.0)
    zero_point = np.uint8(np.clip(round(QMIN - low / float(scale)), QMIN, QMAX))
    return scale, zero_point


def insert_activation_qdq(qmodel: onnx.ModelProto, layers: list[Layer], ranges: dict[str, tuple[float, float]],
                          act_layers: Collection[str]) -> onnx.ModelProto:
    """A new model: ``qmodel`` with uint8 Q/DQ around the act layers, folded Relu/Clip and int32 biases."""
    graph = GraphModel(qmodel)
    add_activation_qdq(graph, layers, ranges, act_layers)
    return graph.to_proto()


def add_activation_qdq(graph: GraphModel, layers: list[Layer], ranges: dict[str, tuple[float, float]],
                       act_layers: Collection[str]) -> None:
    """Edit ``graph`` (weights already quantized): uint8 Q/DQ around the act layers, folded Relu/Clip and int32
    biases."""
    plan = plan_qdq(graph, layers, act_layers)
    inside = [layer.name for layer in layers if layer.where and layer.name in act_layers]
    if inside:
        log.info("%d layer(s) inside If/Loop/Scan bodies keep float activations (weight-only): %s", len(inside),
                 ", ".join(inside[:4]) + (f" and {len(inside) - 4} more" if len(inside) > 4 else ""))
    missing = [t for t in plan.calibrated if t not in ranges]
    if missing:
        raise OnnxqError(f"no calibrated range for {len(missing)} tensors (e.g. {missing[0]}); "
                         "calibrate the tensors listed by plan_qdq(...).calibrated")
    _fold_activations(graph, plan)
    params = {owner: quant_params(*bounds) for owner, bounds in plan.group_ranges(ranges).items()}
    for tensor, (scale, zero_point) in params.items():
        graph.add_constant(numpy_helper.from_array(np.array(scale, np.float32), f"{tensor}_scale"))
        graph.add_constant(numpy_helper.from_array(np.array(zero_point, np.uint8), f"{tensor}_zero_point"))
    bias_nodes = _quantize_biases(graph, layers, act_layers, plan, params)
    _insert_pairs(graph, plan, bias_nodes)


def _fold_activations(graph: GraphModel, plan: QdqPlan) -> None:
    """Remove folded Relu/Clip nodes: their producer now writes the activation's output tensor."""
    bounds = []
    for activation, producer in plan.folded.items():
        node = graph.node(activation)
        output = node.outputs[0]
        bounds += [t.name for t in node.inputs[1:]]
        graph.remove_node(node)
        graph.node(producer).outputs[0] = output
    graph.drop_unused(bounds)


def _quantize_biases(graph: GraphModel, layers: list[Layer], act_layers: Collection[str], plan: QdqPlan,
                     params: dict[str, tuple[np.float32, np.uint8]]) -> list[gs.Node]:
    """Replace each act layer's float bias by int32 codes on scale ``s_in * s_w``; return their DQ nodes."""
    dq_nodes = []
    for layer in layers:
        node = graph.node(layer.name)
        if layer.name not in act_layers or node is None or node.inputs[0].name not in plan.source:
            continue
        bias_name = node.inputs[2].name if len(node.inputs) > 2 else ""
        if graph.constant(bias_name) is None or len(graph.consumers(bias_name)) != 1:
            continue
        bias = _bias_vector(node, graph.array(bias_name), layer.out_channels)
        if bias is None:
            continue
        scale_name = f"{layer.weight}_scale"
        if graph.constant(scale_name) is None:
            raise OnnxqError(f"the weight of {layer.name} is not quantized; export the weights of every act layer "
                             "with build_quantized_model first")
        if graph.constant(scale_name).shape and len(graph.constant(scale_name).shape) > 1:
            continue  # block-wise weights have no per-channel s_w; such a layer runs in float, bias and all
        in_scale = params[plan.source[node.inputs[0].name]][0]
        weight_scale = _fit_weight_scale(graph, layer, bias, in_scale)
        dq_nodes.append(_replace_bias(graph, node, bias, in_scale * np.broadcast_to(weight_scale, bias.shape)))
    return dq_nodes


def _fit_weight_scale(graph: GraphModel, layer: Layer, bias: np.ndarray, in_scale: np.float32) -> np.ndarray:
    """The weight scale, raised where the int32 bias would overflow (as onnxruntime does), codes re-rounded.

    Only near-dead channels are touched (weights ~1e-12 next to a bias ~1, e.g. MobileNet v1's BN-folded convs):
    their codes shrink towards the zero point, which changes the weights by less than their old step.
    """
    scale = graph.array(f"{layer.weight}_scale").astype(np.float32)
    needed = (np.abs(bias).astype(np.float64) / (float(in_scale) * BIAS_LIMIT)).astype(np.float32)
    needed = needed if scale.ndim else needed.max(initial=0)
    grow = needed > scale
    if not grow.any():
        return scale
    codes, zero_point = (graph.array(f"{layer.weight}_{part}") for part in ("quantized", "zero_point"))
    shape = [1] * codes.ndim
    if scale.ndim:
        shape[layer.channel_axis] = -1
    new_scale = np.where(grow, needed, scale).astype(np.float32)
    centred = codes.astype(np.float64) - zero_point.astype(np.float64).reshape(shape)
    requantized = np.round(centred * (scale / new_scale).reshape(shape)) + zero_point.astype(np.float64).reshape(shape)
    limits = ml_dtypes.iinfo(codes.dtype)
    codes = np.where(grow.reshape(shape), np.clip(requantized, limits.min, limits.max), codes).astype(codes.dtype)
    graph.set_values(f"{layer.weight}_quantized", codes, last=True)
    graph.set_values(f"{layer.weight}_scale", new_scale, last=True)
    log.info("%s: weight scale raised on %d channels so the int32 bias fits", layer.name, int(np.sum(grow)))
    return new_scale


def _bias_vector(node: gs.Node, bias: np.ndarray, channels: int) -> np.ndarray | None:
    """The bias as one value per output channel (Gemm's beta folded into it and dropped from the node), or None
    if it is not one."""
    if bias.dtype != np.float32 or bias.size not in (1, channels) or (bias.ndim > 1 and bias.shape[-1] != bias.size):
        return None
    beta = float(node.attrs.pop("beta", 1.0)) if node.op == "Gemm" else 1.0
    return np.broadcast_to(bias.reshape(-1) * np.float32(beta), (channels,)).astype(np.float32)


def _replace_bias(graph: GraphModel, node: gs.Node, bias: np.ndarray, scale: np.ndarray) -> gs.Node:
    """Swap the float bias initializer for int32 codes, a scale and a zero point; return the DQ node."""
    name = node.inputs[2].name
    codes = np.round(bias.astype(np.float64) / scale.astype(np.float64))
    if np.abs(codes).max(initial=0) > INT32_MAX:
        log.warning("bias %s overflows int32 at scale s_in * s_w; clipped", name)
    codes = np.clip(codes, -INT32_MAX, INT32_MAX).astype(np.int32)
    parts = [graph.add_constant(numpy_helper.from_array(array, f"{name}_{part}")) for part, array in (
        ("quantized", codes), ("scale", scale.astype(np.float32)), ("zero_point", np.zeros(codes.shape, np.int32)))]
    output = graph.variable(f"{name}_DequantizeLinear_Output")
    node.inputs[2] = output
    graph.drop_unused([name])
    return graph.make_node("DequantizeLinear", f"{name}_DequantizeLinear", parts, [output], axis=0)


def _insert_pairs(graph: GraphModel, plan: QdqPlan, bias_nodes: list[gs.Node]) -> None:
    """Insert a Q/DQ pair after each planned tensor's producer and point its consumers at the DQ output.

    A graph output keeps its name on the DQ output; its producer then writes ``<t>_QuantizeLinear_Input``.
    """
    pairs: dict[str, list[gs.Node]] = {}
    for tensor, owner in plan.source.items():
        original = graph.tensor(tensor)
        readers = graph.readers(tensor)
        if graph.is_output(tensor):
            q_input = graph.variable(f"{tensor}_QuantizeLinear_Input")
            producer = graph.producer(tensor)
            producer.outputs[[t.name for t in producer.outputs].index(tensor)] = q_input
            dq_output = original
        else:
            q_input, dq_output = original, graph.variable(_dq_output(tensor))
            for node in readers:
                for index, name in enumerate(_names(node.inputs)):
                    if name == tensor:
                        node.inputs[index] = dq_output
        pairs[q_input.name] = _pair(graph, tensor, owner, q_input, dq_output)
    ordered = list(bias_nodes) + [n for name in graph.input_names for n in pairs.get(name, [])]
    for node in graph.nodes:
        ordered += [node] + [n for t in node.outputs for n in pairs.get(t.name, [])]
    graph.reorder(ordered)


def _dq_output(tensor: str) -> str:
    return f"{tensor}_DequantizeLinear_Output"


def _pair(graph: GraphModel, tensor: str, owner: str, q_input: gs.Tensor, dq_output: gs.Tensor) -> list[gs.Node]:
    """The Q and DQ nodes of one tensor, on the scale and zero point initializers of ``owner``."""
    scale, zero_point = graph.constant(f"{owner}_scale"), graph.constant(f"{owner}_zero_point")
    q_output = graph.variable(f"{tensor}_QuantizeLinear_Output")
    return [graph.make_node("QuantizeLinear", f"{tensor}_QuantizeLinear", [q_input, scale, zero_point], [q_output]),
            graph.make_node("DequantizeLinear", f"{tensor}_DequantizeLinear", [q_output, scale, zero_point],
                            [dq_output])]


def default_act_layers(qmodel: onnx.ModelProto | GraphModel, layers: list[Layer]) -> list[str]:
    """Layers whose weight is INT8 per channel with zero point 0: those onnxruntime runs as integer kernels."""
    graph = qmodel if isinstance(qmodel, GraphModel) else GraphModel(qmodel)
    chosen = []
    for layer in layers:
        codes, zp = f"{layer.weight}_quantized", f"{layer.weight}_zero_point"
        if graph.constant(codes) is None or graph.constant(zp) is None:
            continue
        if (graph.tensor_proto(codes).data_type == TensorProto.INT8 and len(graph.tensor_proto(zp).dims) <= 1
                and not np.any(graph.array(zp))):
            chosen.append(layer.name)
    return chosen


def quantize_activations(model: onnx.ModelProto, qmodel: onnx.ModelProto | GraphModel, layers: list[Layer],
                         batches: Iterable[Feed], method: str = "mse", act_layers: Collection[str] | None = None,
                         percentile: float = 99.999) -> onnx.ModelProto | None:
    """Calibrate the activation ranges on the float ``model`` and add activation Q/DQ to ``qmodel``: a new model
    for a ``ModelProto``; a ``GraphModel`` is edited in place (and None returned), to be serialised once."""
    graph = qmodel if isinstance(qmodel, GraphModel) else GraphModel(qmodel)
    act = default_act_layers(graph, layers) if act_layers is None else list(act_layers)
    unknown = set(act) - {layer.name for layer in layers}
    if unknown:
        raise OnnxqError(f"activation quantization asked for unknown layers {sorted(unknown)[:3]}")
    plan = plan_qdq(model, layers, act)
    ranges = activation_ranges(model, plan.calibrated, batches, method, percentile,
                               methods={t: "minmax" for t in plan.exact})
    add_activation_qdq(graph, layers, ranges, act)
    return None if isinstance(qmodel, GraphModel) else graph.to_proto()
