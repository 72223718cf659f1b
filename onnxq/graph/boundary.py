"""The layers at the edges of a model, which ``--first-last-bits`` keeps wider.

First: every layer whose activation input is computed from the graph inputs without any weighted layer (through
Div, Sub, Transpose, LayerNorm of an embedding ...): the stem of a CNN, a transformer's first Q/K/V projections.
An input that only joins later (an attention mask added to the scores) does not make the layers after the join
first. Last: every layer whose output reaches a graph output without passing another weighted layer, so each head
of a multi-output model (a detector's class and box heads) counts, not just the layer that happens to come last in
the node list. The walk back from the outputs does not follow skip connections: at a node whose input ``a`` is
an ancestor of another of its inputs (a residual ``Add(x, f(x))``), ``a`` is the skip and is not followed, so a
transformer's last layer is its last projection, not every layer the residual stream passes.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from onnxq.graph.layers import Layer
from onnxq.graph.model import GraphModel


def boundary_layers(graph: GraphModel, layers: list[Layer]) -> list[str]:
    """Names of the first and last layers (see the module docstring), in the order of ``layers``."""
    top = [layer for layer in layers if not layer.where]  # body layers: stages of their own graph, never edges
    ancestry, bit = _ancestry(graph)
    layer_bits = sum(bit[layer.name] for layer in top if layer.name in bit)
    first = {layer.name for layer in top
             if layer.activation in ancestry and not ancestry[layer.activation] & layer_bits}
    last = _last(graph, {layer.name for layer in top}, ancestry, bit)
    return [layer.name for layer in layers if layer.name in first | last]


def _ancestry(graph: GraphModel) -> tuple[dict[str, int], dict[str, int]]:
    """Each top-level tensor's upstream nodes as a bit set (graph inputs and constants: none), and each node's bit."""
    ancestry: dict[str, int] = {name: 0 for name in graph.input_names}
    bit: dict[str, int] = {}
    for index, node in enumerate(graph.nodes):  # topological order
        bit[node.name] = 1 << index
        upstream = bit[node.name]
        for tensor in node.inputs:
            upstream |= ancestry.get(tensor.name, 0)
        for tensor in node.outputs:
            ancestry[tensor.name] = upstream
    return ancestry, bit


def _last(graph: GraphModel, layers: set[str], ancestry: dict[str, int], bit: dict[str, int]) -> set[str]:
    """Layers reached walking back from the graph outputs through weight-free nodes, skip connections left out."""
    found: set[str] = set()
    stack = sorted(graph.output_names)
    seen = set(stack)
    while stack:
        node = graph.producer(stack.pop())
        if node is None:
            continue
        if node.name in layers:
            found.add(node.name)
            continue
        for name in _followed_inputs(node, graph, ancestry, bit):
            if name not in seen:
                seen.add(name)
                stack.append(name)
    return found


def _followed_inputs(node: gs.Node, graph: GraphModel, ancestry: dict[str, int], bit: dict[str, int]) -> list[str]:
    """The node's computed inputs, less those that feed another of its inputs (skip connections)."""
    names = list(dict.fromkeys(t.name for t in node.inputs if t.name and graph.constant(t.name) is None))

    def feeds_another(name: str) -> bool:
        producer = graph.producer(name)
        mine = bit.get(producer.name, 0) if producer is not None else 0
        return bool(mine) and any(other != name and ancestry.get(other, 0) & mine for other in names)

    return [name for name in names if not feeds_another(name)]
