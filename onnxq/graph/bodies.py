"""Layers inside If/Loop/Scan bodies: their names, their weights at the top level, their inputs made visible.

onnxruntime returns only top-level tensors, so to calibrate a body layer a copy of the model made for capture
only (:func:`expose_body_tensors`) carries each wanted body tensor out: an If gains an output (the branch that
declares the tensor returns it, the other an empty tensor of the same element type and rank, so a branch the
data never takes gives no rows); a Loop or Scan gains a scan output (the tensor of every iteration, stacked on a
new first axis: the rows the Gram matrix needs); nested bodies pass it up level by level. The quantized model
is not changed that way: its body layers read their weights (and the dequantized codes) from the top level.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from typing import Protocol

import numpy as np
import onnx
from onnx import helper, numpy_helper

LAYER_OPS = ("Conv", "Gemm", "MatMul")
EXPOSED = "_onnxq_exposed"  # suffix of the tensors the capture copy adds


def body_node_name(owner: str, attribute: str, op_type: str, index: int) -> str:
    """The name an unnamed body node is known by: its owner, the body and ``<op_type>_<index>`` in the body."""
    return f"{owner}/{attribute}/{op_type}_{index}"


def subgraphs(node: onnx.NodeProto) -> Iterator[tuple[str, onnx.GraphProto]]:
    """``(attribute name, body)`` for each graph a node holds (If branches, Loop and Scan bodies)."""
    for attribute in node.attribute:
        if attribute.type == onnx.AttributeProto.GRAPH:
            yield attribute.name, attribute.g
        for graph in attribute.graphs:
            yield attribute.name, graph


def name_body_nodes(graph: onnx.GraphProto) -> None:
    """Edit in place: give every unnamed node inside a body of ``graph`` (any depth) its :func:`body_node_name`
    (top-level nodes are named by ``graph.model.name_unnamed_nodes``)."""
    for node in graph.node:
        for attribute, body in subgraphs(node):
            for index, inner in enumerate(body.node):
                if not inner.name:
                    inner.name = body_node_name(node.name, attribute, inner.op_type, index)
            name_body_nodes(body)


def prepare_bodies(model: onnx.ModelProto) -> None:
    """Edit a prepared copy in place so body layers can be calibrated and exported like top-level ones: their
    weights at the top level (:func:`hoist_layer_weights`), their inputs declared in their body
    (:func:`localise_layer_inputs`); equal constants that constant folding copied into several bodies stored once
    (:func:`share_equal_body_constants`)."""
    hoist_layer_weights(model)
    localise_layer_inputs(model)
    share_equal_body_constants(model)


def share_equal_body_constants(model: onnx.ModelProto, min_bytes: int = 1024) -> list[str]:
    """Edit in place: body initializers holding the same values (over ``min_bytes``) become one top-level
    initializer that every body reads. onnxruntime's constant folding, which prepares the model, writes a folded
    constant into each branch that computes it (silero-vad: its LSTM weights twice per sample-rate branch, +1 MB).
    Returns the names kept."""
    groups: dict[tuple, list[tuple[onnx.GraphProto, onnx.TensorProto]]] = {}
    for body in _bodies(model.graph):
        outputs = {v.name for v in body.output}
        for tensor in body.initializer:
            if len(tensor.raw_data) >= min_bytes and tensor.name not in outputs:
                key = (tensor.data_type, tuple(tensor.dims), hashlib.sha256(tensor.raw_data).digest())
                groups.setdefault(key, []).append((body, tensor))
    taken = set(_declared(model.graph))
    kept = []
    for copies in groups.values():
        first = onnx.TensorProto()
        first.CopyFrom(copies[0][1])
        if len(copies) < 2 or first.name in taken:
            continue
        for body, tensor in copies:
            name = tensor.name
            body.initializer.remove(tensor)
            _rename_reads(body, name, first.name)
        model.graph.initializer.append(first)
        taken.add(first.name)
        kept.append(first.name)
    return kept


def _bodies(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """Every body inside ``graph``, at any depth."""
    for node in graph.node:
        for _, body in subgraphs(node):
            yield body
            yield from _bodies(body)


def _rename_reads(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Point every node input called ``old`` in ``graph`` and its bodies at ``new``."""
    for node in graph.node:
        for index, name in enumerate(node.input):
            if name == old:
                node.input[index] = new
        for _, body in subgraphs(node):
            _rename_reads(body, old, new)


def localise_layer_inputs(model: onnx.ModelProto) -> list[str]:
    """Edit in place: a Conv/Gemm/MatMul inside a body that reads its input from an enclosing scope reads it
    through an Identity in its own body instead, so the tensor calibration captures for it exists only when the
    body runs (an If branch taken, each Loop iteration), not whenever the enclosing graph computes it. Returns
    the new tensors."""
    taken = set(_declared(model.graph))
    added: list[str] = []

    def visit(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            for _, body in subgraphs(node):
                local = set(_declared(body))
                taken.update(local)
                for index in reversed(range(len(body.node))):
                    inner = body.node[index]
                    if inner.op_type in LAYER_OPS and len(inner.input) > 1 and inner.input[0] not in local:
                        name = _fresh(f"{inner.name}_input", taken)
                        body.node.insert(index, helper.make_node("Identity", [inner.input[0]], [name],
                                                                 name=f"{inner.name}_input_Identity"))
                        inner.input[0] = name
                        added.append(name)
                visit(body)

    visit(model.graph)
    return added


def hoist_layer_weights(model: onnx.ModelProto) -> list[str]:
    """Edit in place: move the weight and bias initializers of Conv/Gemm/MatMul nodes inside bodies to the
    top-level graph (bodies read them from the enclosing scope), so every stage finds a layer's weight among the
    model's initializers and export stores it once; a name the top level already uses stays where it is.
    Returns the names moved."""
    taken = {t.name for t in model.graph.initializer} | {v.name for v in model.graph.input}
    taken |= {out for node in model.graph.node for out in node.output}
    moved: list[str] = []
    for node in model.graph.node:
        for _, body in subgraphs(node):
            moved += _hoist(body, model.graph, taken)
    return moved


def _hoist(body: onnx.GraphProto, top: onnx.GraphProto, taken: set[str]) -> list[str]:
    """Move ``body``'s layer weights (and those of bodies nested in it) into ``top``."""
    wanted = {name for node in body.node if node.op_type in LAYER_OPS for name in node.input[1:3] if name}
    moved = []
    for index in reversed(range(len(body.initializer))):
        tensor = body.initializer[index]
        if tensor.name in wanted and tensor.name not in taken:
            top.initializer.append(tensor)
            del body.initializer[index]
            taken.add(tensor.name)
            moved.append(tensor.name)
    for node in body.node:
        for _, inner in subgraphs(node):
            moved += _hoist(inner, top, taken)
    return moved


class _Located(Protocol):
    name: str
    where: str


class _Counted(Protocol):
    samples: int


def unreached_layers(layers: Iterable[_Located], stats: dict[str, _Counted]) -> list[str]:
    """``"name: reason"`` for each layer inside a body that no calibration sample ran (an If branch never taken,
    a Loop that never iterated): it has no statistics, so it is rounded to nearest (weight MSE)."""
    return [f"{layer.name}: {layer.where}, which the calibration data never ran; rounded to nearest (weight MSE) "
            "without statistics" for layer in layers
            if layer.where and layer.name in stats and not stats[layer.name].samples]


# -- capture: body tensors as outputs of a copy of the model ----------------------------------------------------

def expose_body_tensors(model: onnx.ModelProto, wanted: set[str]) -> dict[str, tuple[str, int]]:
    """Edit ``model`` (a copy made for capture) so each wanted tensor declared inside a body is carried out to the
    top-level graph; returns ``name -> (top-level tensor carrying it, stacked axes)``: one leading axis per Loop
    or Scan around it (iterations), the batch's axis after them."""
    types = _element_types(model.graph)
    return _expose(model.graph, wanted, types, set(_declared(model.graph)))


def branch_tensors_in_loops(model: onnx.ModelProto) -> set[str]:
    """Tensors declared in an If branch inside a Loop or Scan body (any depth): their capture stacks over the
    iterations only while every iteration takes the same branch."""
    found: set[str] = set()

    def visit(graph: onnx.GraphProto, in_loop: bool, in_branch: bool) -> None:
        if in_loop and in_branch:
            found.update(_declared(graph))
        for node in graph.node:
            for _, body in subgraphs(node):
                loop = in_loop or node.op_type in ("Loop", "Scan")
                visit(body, loop, in_branch or (in_loop and node.op_type == "If"))

    visit(model.graph, False, False)
    return found


def flatten_stacked(values: np.ndarray, axes: int) -> np.ndarray:
    """A captured tensor with its ``axes`` iteration axes merged into its first (batch) axis."""
    if not axes:
        return values
    merged = min(axes + 1, values.ndim - 1) if values.ndim > 1 else values.ndim
    return values.reshape(int(np.prod(values.shape[:merged])), *values.shape[merged:])


def _expose(graph: onnx.GraphProto, wanted: set[str], types: dict[str, tuple[int, int | None]],
            taken: set[str]) -> dict[str, tuple[str, int]]:
    found: dict[str, tuple[str, int]] = {}
    for node in list(graph.node):
        inner = {attribute: _carried(body, wanted, types, taken) for attribute, body in subgraphs(node)}
        if not any(inner.values()):
            continue
        if node.op_type == "If":
            found |= _expose_if(graph, node, inner, types, taken)
        elif node.op_type in ("Loop", "Scan"):
            found |= _expose_scan_output(graph, node, inner["body"], types, taken)
    return found


def _carried(body: onnx.GraphProto, wanted: set[str], types: dict, taken: set[str]) -> dict[str, tuple[str, int]]:
    """Wanted tensors visible in ``body``: declared there (0 stacked axes) or carried up from a nested body."""
    carried = _expose(body, wanted, types, taken)
    carried |= {name: (name, 0) for name in _declared(body) if name in wanted}
    return carried


def _declared(graph: onnx.GraphProto) -> Iterator[str]:
    """Tensors a graph declares itself (not those it reads from an enclosing scope)."""
    yield from (v.name for v in graph.input)
    yield from (t.name for t in graph.initializer)
    yield from (out for node in graph.node for out in node.output if out)


def _fresh(base: str, taken: set[str]) -> str:
    name = base
    while name in taken:
        name += "_"
    taken.add(name)
    return name


def _emit(body: onnx.GraphProto, tensor: str, name: str, types: dict) -> None:
    """Make ``body`` return ``tensor`` under the new name ``name`` (an Identity: a graph may already output it)."""
    body.node.append(helper.make_node("Identity", [tensor], [name], name=f"{name}_Identity"))
    body.output.append(helper.make_tensor_value_info(name, types.get(tensor, (onnx.TensorProto.FLOAT, None))[0],
                                                     None))


def _expose_if(graph: onnx.GraphProto, node: onnx.NodeProto, inner: dict[str, dict], types: dict,
               taken: set[str]) -> dict[str, tuple[str, int]]:
    """Each carried tensor becomes a new output of the If: its branch returns it, the other an empty tensor."""
    found = {}
    branches = dict(subgraphs(node))
    for attribute, carried in inner.items():
        other = "else_branch" if attribute == "then_branch" else "then_branch"
        for name, (tensor, axes) in carried.items():
            elem, rank = types.get(tensor, (onnx.TensorProto.FLOAT, None))
            output = _fresh(f"{name}{EXPOSED}", taken)
            _emit(branches[attribute], tensor, _fresh(f"{output}_{attribute}", taken), types)
            empty = np.zeros([0] * (rank if rank is not None else 1), helper.tensor_dtype_to_np_dtype(elem))
            other_name = _fresh(f"{output}_{other}", taken)
            branches[other].node.append(helper.make_node(
                "Constant", [], [other_name], name=f"{other_name}_empty",
                value=numpy_helper.from_array(empty, f"{other_name}_value")))
            branches[other].output.append(helper.make_tensor_value_info(other_name, elem, None))
            node.output.append(output)
            graph.value_info.append(helper.make_tensor_value_info(output, elem, None))
            types[output] = (elem, rank)
            found[name] = (output, axes)
    return found


def _expose_scan_output(graph: onnx.GraphProto, node: onnx.NodeProto, carried: dict[str, tuple[str, int]], types: dict,
                        taken: set[str]) -> dict[str, tuple[str, int]]:
    """Each carried tensor becomes a new scan output of the Loop/Scan: every iteration's value, stacked."""
    body = dict(subgraphs(node))["body"]
    found = {}
    for name, (tensor, axes) in carried.items():
        output = _fresh(f"{name}{EXPOSED}", taken)
        _emit(body, tensor, _fresh(f"{output}_body", taken), types)
        node.output.append(output)
        for attribute in node.attribute:  # an explicit per-output list must name the new output too
            if attribute.name in ("scan_output_axes", "scan_output_directions"):
                attribute.ints.append(0)
        elem, rank = types.get(tensor, (onnx.TensorProto.FLOAT, None))
        graph.value_info.append(helper.make_tensor_value_info(output, elem, None))
        types[output] = (elem, None if rank is None else rank + 1)
        found[name] = (output, axes + 1)
    return found


def _element_types(graph: onnx.GraphProto) -> dict[str, tuple[int, int | None]]:
    """``name -> (element type, rank or None)`` of every typed tensor in the graph and its bodies."""
    types: dict[str, tuple[int, int | None]] = {}
    for value in [*graph.input, *graph.output, *graph.value_info]:
        tensor_type = value.type.tensor_type
        if tensor_type.elem_type:
            types[value.name] = (tensor_type.elem_type,
                                 len(tensor_type.shape.dim) if tensor_type.HasField("shape") else None)
    types |= {t.name: (t.data_type, len(t.dims)) for t in graph.initializer}
    for node in graph.node:
        for _, body in subgraphs(node):
            types |= _element_types(body)
    return types
