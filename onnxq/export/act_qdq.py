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
from onnx import TensorProto, helper, numpy_helper

from onnxq.calibration.activations import activation_ranges
from onnxq.data.sources import Feed
from onnxq.errors import OnnxqError
from onnxq.graph.layers import Layer

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


class _Graph:
    """Producers, consumers and constants of a graph, for planning."""

    def __init__(self, model: onnx.ModelProto) -> None:
        graph = model.graph
        self.nodes = list(graph.node)
        self.by_name = {n.name: n for n in self.nodes}
        self.outputs = {v.name for v in graph.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in self.nodes:
            for tensor in dict.fromkeys(node.input):
                self.consumers.setdefault(tensor, []).append(node)
        inits = {t.name for t in graph.initializer}
        self.constants = inits | {o for n in self.nodes if n.op_type == "Constant" for o in n.output}
        self.constants |= {n.output[0] for n in self.nodes if n.op_type == "DequantizeLinear" and n.input[0] in inits}
        bounds = {t for n in self.nodes if n.op_type == "Clip" for t in n.input[1:]}
        self.values = {t.name: numpy_helper.to_array(t) for t in graph.initializer if t.name in bounds}

    def is_activation(self, tensor: str) -> bool:
        return bool(tensor) and tensor not in self.constants


def plan_qdq(model: onnx.ModelProto, layers: list[Layer], act_layers: Collection[str]) -> QdqPlan:
    """Decide the Q/DQ placement for the act layers of ``model`` (float or weight-quantized: same tensors)."""
    graph = _Graph(model)
    lost = [layer.name for layer in layers if layer.name in act_layers and layer.name not in graph.by_name]
    if lost:
        raise OnnxqError(f"layer {lost[0]} is not a node of the model; pass the prepared model the layers were "
                         "found in (and the model exported from it)")
    acts = [graph.by_name[layer.name] for layer in layers
            if layer.name in act_layers and graph.is_activation(layer.activation)]
    folds = _foldable(graph, {n.name for n in acts} | {n.name for n in graph.nodes if n.op_type in QLINEAR_OPS})
    output_of = {n.name: folds[n.name][0].output[0] if n.name in folds else n.output[0] for n in graph.nodes}
    position = {t: index for index, node in enumerate(graph.nodes) for t in node.output}
    bounds = {output_of[name]: fold_bounds for name, (_, fold_bounds) in folds.items()}
    groups, plan, tentative = _Groups(position, bounds), QdqPlan(), set()
    for node in acts:
        for tensor in (node.input[0], output_of[node.name]):
            groups.add(tensor)
            plan.ranged.add(tensor)
        if node.op_type != "Conv":
            tentative.add(output_of[node.name])
    _propagate(graph, groups, plan.ranged, output_of)
    plan.source = {tensor: groups.find(tensor) for tensor in groups.parent}
    _drop_unneeded(graph, plan, tentative, {n.name for n in acts}, output_of)
    plan.folded = {folds[name][0].name: name for name in folds if output_of[name] in plan.source}
    at_output = _groups_reaching_outputs(graph, plan, output_of)
    plan.exact = {t for t in plan.ranged if plan.source[t] in at_output}
    return plan


def calibration_candidates(model: onnx.ModelProto, layers: list[Layer]) -> list[str]:
    """Every tensor that :func:`plan_qdq` may calibrate for any subset of ``layers`` (so one calibration pass
    serves whichever layers end up with activation Q/DQ): each layer's input and output, and the output of each
    op with an integer version whose inputs are all activations (a folded Relu/Clip's output where one follows)."""
    graph = _Graph(model)
    acts = {layer.name for layer in layers if layer.name in graph.by_name and graph.is_activation(layer.activation)}
    qlinear = {n.name for n in graph.nodes if n.op_type in QLINEAR_OPS
               and all(graph.is_activation(t) for t in n.input if t)}
    folds = _foldable(graph, acts | {n.name for n in graph.nodes if n.op_type in QLINEAR_OPS})
    output_of = {name: folds[name][0].output[0] if name in folds else graph.by_name[name].output[0]
                 for name in acts | qlinear}
    return sorted({graph.by_name[name].input[0] for name in acts} | set(output_of.values()))


def _groups_reaching_outputs(graph: _Graph, plan: QdqPlan, output_of: dict[str, str]) -> set[str]:
    """Groups whose values reach a graph output unchanged or only averaged (the logits and their evidence)."""
    reach = {plan.source[t] for t in plan.source if t in graph.outputs}
    pools = [n for n in graph.nodes if n.op_type in POOLING_OPS and n.input[0] in plan.source
             and output_of[n.name] in plan.source]
    grown = True
    while grown:
        before = len(reach)
        reach |= {plan.source[n.input[0]] for n in pools if plan.source[output_of[n.name]] in reach}
        grown = len(reach) > before
    return reach


def _foldable(graph: _Graph, producers: set[str]) -> dict[str, tuple[onnx.NodeProto, tuple[float, float]]]:
    """Producer node -> the Relu/Clip that alone consumes its output and that a uint8 Q can replace, with its
    bounds (the Q node's range must stay inside them, which the calibrated range of its output does)."""
    folds = {}
    for name in producers:
        out = graph.by_name[name].output[0]
        users = graph.consumers.get(out, [])
        if out in graph.outputs or len(users) != 1 or users[0].op_type not in FOLDABLE_OPS:
            continue
        bounds = _activation_bounds(graph, users[0])
        if bounds is not None and bounds[0] <= 0 <= bounds[1]:
            folds[name] = (users[0], bounds)
    return folds


def _activation_bounds(graph: _Graph, node: onnx.NodeProto) -> tuple[float, float] | None:
    """A Relu's or Clip's output bounds, or None when a Clip bound is not a known constant."""
    if node.op_type == "Relu":
        return (0.0, np.inf)
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    bounds = [float(attrs.get("min", -np.inf)), float(attrs.get("max", np.inf))]
    for index, tensor in enumerate(node.input[1:3]):
        if tensor:
            if tensor not in graph.values:
                return None
            bounds[index] = float(graph.values[tensor])
    return bounds[0], bounds[1]


def _propagate(graph: _Graph, groups: _Groups, ranged: set[str], output_of: dict[str, str]) -> None:
    """Extend quantization through pass-through ops and Concat (one shared scale: onnxruntime then copies
    bytes) and through ops with integer versions (their own range)."""
    for node in graph.nodes:
        if node.op_type in SAME_SCALE_OPS and node.input[0] in groups:
            _join_all(groups, ranged, [node.input[0]], node.output[0])
            continue
        inputs = [t for t in node.input if t]
        if node.op_type not in QLINEAR_OPS or not inputs or not all(
                graph.is_activation(t) and t in groups for t in inputs):
            continue
        if node.op_type == "Concat" and len({groups.bound(t) for t in inputs}) == 1:
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


def _drop_unneeded(graph: _Graph, plan: QdqPlan, tentative: set[str], acts: set[str],
                   output_of: dict[str, str]) -> None:
    """Forget Gemm/MatMul outputs (and tensors sharing their scale) that no integer consumer reads."""
    needed: set[str] = set()
    for node in reversed(graph.nodes):
        for tensor in node.input:
            if tensor in plan.source and (
                    (node.name in acts and tensor == node.input[0])
                    or (node.op_type in QLINEAR_OPS and output_of[node.name] in plan.source)
                    or (node.op_type in SAME_SCALE_OPS and node.output[0] in needed)):
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
    """A copy of ``qmodel`` with uint8 Q/DQ around the act layers, folded Relu/Clip and int32 biases."""
    plan = plan_qdq(qmodel, layers, act_layers)
    missing = [t for t in plan.calibrated if t not in ranges]
    if missing:
        raise OnnxqError(f"no calibrated range for {len(missing)} tensors (e.g. {missing[0]}); "
                         "calibrate the tensors listed by plan_qdq(...).calibrated")
    out = onnx.ModelProto()
    out.CopyFrom(qmodel)
    _fold_activations(out, plan)
    params = {owner: quant_params(*bounds) for owner, bounds in plan.group_ranges(ranges).items()}
    out.graph.initializer.extend(_param_initializers(params))
    bias_nodes = _quantize_biases(out, layers, act_layers, plan, params)
    _insert_pairs(out, plan, bias_nodes)
    return out


def _fold_activations(model: onnx.ModelProto, plan: QdqPlan) -> None:
    """Remove folded Relu/Clip nodes: their producer now writes the activation's output tensor."""
    nodes = {n.name: n for n in model.graph.node}
    bounds = set()
    for activation, producer in plan.folded.items():
        nodes[producer].output[0] = nodes[activation].output[0]
        bounds.update(nodes[activation].input[1:])
        model.graph.node.remove(nodes[activation])
    used = {t for n in model.graph.node for t in n.input}
    for init in [t for t in model.graph.initializer if t.name in bounds - used]:
        model.graph.initializer.remove(init)


def _param_initializers(params: dict[str, tuple[np.float32, np.uint8]]) -> list[onnx.TensorProto]:
    inits = []
    for tensor, (scale, zero_point) in params.items():
        inits.append(numpy_helper.from_array(np.array(scale, np.float32), f"{tensor}_scale"))
        inits.append(numpy_helper.from_array(np.array(zero_point, np.uint8), f"{tensor}_zero_point"))
    return inits


def _quantize_biases(model: onnx.ModelProto, layers: list[Layer], act_layers: Collection[str], plan: QdqPlan,
                     params: dict[str, tuple[np.float32, np.uint8]]) -> list[onnx.NodeProto]:
    """Replace each act layer's float bias by int32 codes on scale ``s_in * s_w``; return their DQ nodes."""
    inits = {t.name: t for t in model.graph.initializer}
    nodes = {n.name: n for n in model.graph.node}
    uses = [t for n in model.graph.node for t in n.input]
    dq_nodes = []
    for layer in layers:
        node = nodes.get(layer.name)
        if layer.name not in act_layers or node is None or node.input[0] not in plan.source:
            continue
        if len(node.input) < 3 or node.input[2] not in inits or uses.count(node.input[2]) != 1:
            continue
        bias = _bias_vector(node, numpy_helper.to_array(inits[node.input[2]]), layer.out_channels)
        if bias is None:
            continue
        if f"{layer.weight}_scale" not in inits:
            raise OnnxqError(f"the weight of {layer.name} is not quantized; export the weights of every act layer "
                             "with build_quantized_model first")
        if len(inits[f"{layer.weight}_scale"].dims) > 1:
            continue  # block-wise weights have no per-channel s_w; such a layer runs in float, bias and all
        in_scale = params[plan.source[node.input[0]]][0]
        weight_scale = _fit_weight_scale(model, layer, inits, bias, in_scale)
        dq_nodes.append(_replace_bias(model, node, bias, in_scale * np.broadcast_to(weight_scale, bias.shape)))
    return dq_nodes


def _fit_weight_scale(model: onnx.ModelProto, layer: Layer, inits: dict[str, onnx.TensorProto], bias: np.ndarray,
                      in_scale: np.float32) -> np.ndarray:
    """The weight scale, raised where the int32 bias would overflow (as onnxruntime does), codes re-rounded.

    Only near-dead channels are touched (weights ~1e-12 next to a bias ~1, e.g. MobileNet v1's BN-folded convs):
    their codes shrink towards the zero point, which changes the weights by less than their old step.
    """
    scale = numpy_helper.to_array(inits[f"{layer.weight}_scale"]).astype(np.float32)
    needed = (np.abs(bias).astype(np.float64) / (float(in_scale) * BIAS_LIMIT)).astype(np.float32)
    needed = needed if scale.ndim else needed.max(initial=0)
    grow = needed > scale
    if not grow.any():
        return scale
    codes, zero_point = (numpy_helper.to_array(inits[f"{layer.weight}_{part}"]) for part in ("quantized", "zero_point"))
    shape = [1] * codes.ndim
    if scale.ndim:
        shape[layer.channel_axis] = -1
    new_scale = np.where(grow, needed, scale).astype(np.float32)
    centred = codes.astype(np.float64) - zero_point.astype(np.float64).reshape(shape)
    requantized = np.round(centred * (scale / new_scale).reshape(shape)) + zero_point.astype(np.float64).reshape(shape)
    limits = ml_dtypes.iinfo(codes.dtype)
    codes = np.where(grow.reshape(shape), np.clip(requantized, limits.min, limits.max), codes).astype(codes.dtype)
    for name, array in ((f"{layer.weight}_quantized", codes), (f"{layer.weight}_scale", new_scale)):
        model.graph.initializer.remove(inits[name])
        inits[name] = numpy_helper.from_array(array, name)
        model.graph.initializer.append(inits[name])
    log.info("%s: weight scale raised on %d channels so the int32 bias fits", layer.name, int(np.sum(grow)))
    return new_scale


def _bias_vector(node: onnx.NodeProto, bias: np.ndarray, channels: int) -> np.ndarray | None:
    """The bias as one value per output channel (Gemm's beta folded in), or None if it is not one."""
    if bias.dtype != np.float32 or bias.size not in (1, channels) or (bias.ndim > 1 and bias.shape[-1] != bias.size):
        return None
    beta = 1.0
    if node.op_type == "Gemm":
        attrs = {a.name: a for a in node.attribute}
        if "beta" in attrs:
            beta = attrs["beta"].f
            node.attribute.remove(attrs["beta"])
    return np.broadcast_to(bias.reshape(-1) * np.float32(beta), (channels,)).astype(np.float32)


def _replace_bias(model: onnx.ModelProto, node: onnx.NodeProto, bias: np.ndarray, scale: np.ndarray
                  ) -> onnx.NodeProto:
    """Swap the float bias initializer for int32 codes, a scale and a zero point; return the DQ node."""
    name = node.input[2]
    codes = np.round(bias.astype(np.float64) / scale.astype(np.float64))
    if np.abs(codes).max(initial=0) > INT32_MAX:
        log.warning("bias %s overflows int32 at scale s_in * s_w; clipped", name)
    codes = np.clip(codes, -INT32_MAX, INT32_MAX).astype(np.int32)
    old = next(t for t in model.graph.initializer if t.name == name)
    model.graph.initializer.remove(old)
    model.graph.initializer.extend([
        numpy_helper.from_array(codes, f"{name}_quantized"),
        numpy_helper.from_array(scale.astype(np.float32), f"{name}_scale"),
        numpy_helper.from_array(np.zeros(codes.shape, np.int32), f"{name}_zero_point"),
    ])
    output = f"{name}_DequantizeLinear_Output"
    node.input[2] = output
    return helper.make_node("DequantizeLinear", [f"{name}_quantized", f"{name}_scale", f"{name}_zero_point"],
                            [output], name=f"{name}_DequantizeLinear", axis=0)


def _insert_pairs(model: onnx.ModelProto, plan: QdqPlan, bias_nodes: list[onnx.NodeProto]) -> None:
    """Insert a Q/DQ pair after each planned tensor's producer and point its consumers at the DQ output.

    A graph output keeps its name on the DQ output; its producer then writes ``<t>_QuantizeLinear_Input``.
    """
    outputs = {v.name for v in model.graph.output}
    pairs = {}
    for tensor, owner in plan.source.items():
        q_input = f"{tensor}_QuantizeLinear_Input" if tensor in outputs else tensor
        pairs[q_input] = _pair(tensor, owner, q_input, tensor if tensor in outputs else _dq_output(tensor))
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name in plan.source and name not in outputs:
                node.input[i] = _dq_output(name)
        for i, name in enumerate(node.output):
            if name in plan.source and name in outputs:
                node.output[i] = f"{name}_QuantizeLinear_Input"
    ordered = list(bias_nodes) + [n for v in model.graph.input for n in pairs.get(v.name, [])]
    for node in model.graph.node:
        ordered += [node] + [n for name in node.output for n in pairs.get(name, [])]
    del model.graph.node[:]
    model.graph.node.extend(ordered)


def _dq_output(tensor: str) -> str:
    return f"{tensor}_DequantizeLinear_Output"


def _pair(tensor: str, owner: str, q_input: str, dq_output: str) -> list[onnx.NodeProto]:
    """The Q and DQ nodes of one tensor, on the scale and zero point initializers of ``owner``."""
    scale, zero_point = f"{owner}_scale", f"{owner}_zero_point"
    q_output = f"{tensor}_QuantizeLinear_Output"
    return [helper.make_node("QuantizeLinear", [q_input, scale, zero_point], [q_output],
                             name=f"{tensor}_QuantizeLinear"),
            helper.make_node("DequantizeLinear", [q_output, scale, zero_point], [dq_output],
                             name=f"{tensor}_DequantizeLinear")]


def default_act_layers(qmodel: onnx.ModelProto, layers: list[Layer]) -> list[str]:
    """Layers whose weight is INT8 per channel with zero point 0: those onnxruntime runs as integer kernels."""
    inits = {t.name: t for t in qmodel.graph.initializer}
    chosen = []
    for layer in layers:
        codes, zp = inits.get(f"{layer.weight}_quantized"), inits.get(f"{layer.weight}_zero_point")
        if (codes is not None and zp is not None and codes.data_type == TensorProto.INT8 and len(zp.dims) <= 1
                and not np.any(numpy_helper.to_array(zp))):
            chosen.append(layer.name)
    return chosen


def quantize_activations(model: onnx.ModelProto, qmodel: onnx.ModelProto, layers: list[Layer],
                         batches: Iterable[Feed], method: str = "mse", act_layers: Collection[str] | None = None,
                         percentile: float = 99.999) -> onnx.ModelProto:
    """Calibrate the activation ranges on the float ``model`` and return ``qmodel`` with activation Q/DQ."""
    act = default_act_layers(qmodel, layers) if act_layers is None else list(act_layers)
    unknown = set(act) - {layer.name for layer in layers}
    if unknown:
        raise OnnxqError(f"activation quantization asked for unknown layers {sorted(unknown)[:3]}")
    plan = plan_qdq(model, layers, act)
    ranges = activation_ranges(model, plan.calibrated, batches, method, percentile,
                               methods={t: "minmax" for t in plan.exact})
    return insert_activation_qdq(qmodel, layers, ranges, act)
