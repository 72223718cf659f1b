"""The layers at the edges of a model, which ``--first-last-bits`` keeps wider.

First: every layer that reads a graph input without passing another weighted layer (through Div, Sub,
Transpose ... of the input). Last: every layer whose output reaches a graph output without passing another
weighted layer, so each head of a multi-output model (a detector's class and box heads) counts, not just the
layer that happens to come last in the node list.
"""

from __future__ import annotations

from collections.abc import Callable

import onnx_graphsurgeon as gs

from onnxq.graph.layers import Layer
from onnxq.graph.model import GraphModel


def boundary_layers(graph: GraphModel, layers: list[Layer]) -> list[str]:
    """Names of the first and last layers (see the module docstring), in the order of ``layers``."""
    by_node = {layer.name: layer for layer in layers}
    starts = [name for name in graph.input_names if graph.constant(name) is None]
    edge = _reached(starts, graph.consumers, _names_of("outputs"), by_node)
    producer = graph.producer
    edge |= _reached(sorted(graph.output_names), lambda tensor: [node] if (node := producer(tensor)) else [],
                     _names_of("inputs"), by_node)
    return [layer.name for layer in layers if layer.name in edge]


def _names_of(side: str) -> Callable[[gs.Node], list[str]]:
    """A node's input or output tensor names."""
    return lambda node: [t.name for t in getattr(node, side)]


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
