"""The layers at the edges of a model, which ``--first-last-bits`` keeps wider.

First: every layer that reads a graph input without passing another weighted layer (through Div, Sub,
Transpose ... of the input). Last: every layer whose output reaches a graph output without passing another
weighted layer, so each head of a multi-output model (a detector's class and box heads) counts, not just the
layer that happens to come last in the node list.
"""

from __future__ import annotations

from collections import defaultdict

import onnx

from onnxq.graph.layers import Layer


def boundary_layers(model: onnx.ModelProto, layers: list[Layer]) -> list[str]:
    """Names of the first and last layers (see the module docstring), in the order of ``layers``."""
    by_node = {layer.name: layer for layer in layers}
    graph = model.graph
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    producer: dict[str, onnx.NodeProto] = {}
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)
        for name in node.output:
            producer[name] = node
    constants = {t.name for t in graph.initializer}
    starts = [v.name for v in graph.input if v.name not in constants]
    edge = _reached(starts, lambda tensor: consumers[tensor], lambda node: node.output, by_node)
    ends = [v.name for v in graph.output]
    edge |= _reached(ends, lambda tensor: [producer[tensor]] if tensor in producer else [],
                     lambda node: node.input, by_node)
    return [layer.name for layer in layers if layer.name in edge]


def _reached(tensors: list[str], nodes_of, next_tensors, layers: dict[str, Layer]) -> set[str]:
    """Layers reached from ``tensors`` walking ``nodes_of`` / ``next_tensors``, stopping at each layer."""
    found: set[str] = set()
    seen_nodes: set[int] = set()
    stack = list(tensors)
    seen_tensors = set(stack)
    while stack:
        for node in nodes_of(stack.pop()):
            if id(node) in seen_nodes:
                continue
            seen_nodes.add(id(node))
            if node.name in layers:
                found.add(node.name)
                continue
            for tensor in next_tensors(node):
                if tensor and tensor not in seen_tensors:
                    seen_tensors.add(tensor)
                    stack.append(tensor)
    return found
