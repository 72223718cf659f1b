"""Single-layer probes that run only the part of the model a layer can change.

CLADO measures the loss with one layer quantized at a time: hundreds of forward passes. A layer's weight only
changes the nodes downstream of it, so each probe runs the layer's *suffix*: the layer's node and everything
that depends on it, fed with the float model's values at the suffix's boundary. The float model runs once per
batch for a group of layers (only as far as the deepest boundary they need), and each probe feeds only its own
weight (and corrected bias) while every other weight stays a constant that onnxruntime pre-packs. The outputs are
those of the whole model with that one layer replaced, up to float summation order.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxq.calibration.capture import CaptureEngine, make_session
from onnxq.data.sources import Feed
from onnxq.graph.layers import Layer
from onnxq.graph.model import GraphModel, as_graph
from onnxq.graph.segments import value_info

GROUP_LAYERS = 8  # suffix sessions alive at once (each holds its constant weights; buffers come from one arena)
# probes run side by side on single-threaded sessions: independent runs use the cores with no hand-offs inside a
# run (SqueezeNet: ~8 % less CPU than one two-threaded session)
PROBE_THREADS = max(1, min(2, os.cpu_count() or 1))


@dataclass
class Suffix:
    """The nodes downstream of one layer as a model: ``boundary`` float values and the ``fed`` tensors (the
    layer's weight and bias) in, the first graph output out."""

    boundary: list[str]
    fed: list[str]
    model: onnx.ModelProto | None  # None: the layer does not reach the output (its probes change nothing)


def has_subgraphs(model: onnx.ModelProto) -> bool:
    """Nodes with graph attributes (If/Loop/Scan) read outer-scope names a node list cannot show."""
    return any(attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
               for node in model.graph.node for attr in node.attribute)


def downstream_nodes(model: onnx.ModelProto | GraphModel, start: int) -> list[int]:
    """Indices of node ``start`` and every node that (transitively) consumes its outputs, in graph order."""
    nodes = as_graph(model).nodes
    reached, frontier = {id(nodes[start])}, [nodes[start]]
    while frontier:
        for output in frontier.pop().outputs:
            for consumer in output.outputs:
                if id(consumer) not in reached:
                    reached.add(id(consumer))
                    frontier.append(consumer)
    return [index for index, node in enumerate(nodes) if id(node) in reached]


def upstream_nodes(model: onnx.ModelProto | GraphModel, tensors: Iterable[str]) -> list[int]:
    """Indices of the nodes the named tensors are computed from (transitively), in graph order."""
    graph = as_graph(model)
    reached: set[int] = set()
    frontier = [node for node in map(graph.producer, tensors) if node is not None]
    while frontier:
        node = frontier.pop()
        if id(node) not in reached:
            reached.add(id(node))
            frontier += [tensor.inputs[0] for tensor in node.inputs if tensor.inputs]
    return [index for index, node in enumerate(graph.nodes) if id(node) in reached]


def prefix_of(model: onnx.ModelProto | GraphModel, tensors: Iterable[str]) -> onnx.ModelProto:
    """A copy of the model with only the nodes (and initializers) the named tensors need: onnxruntime runs every
    node of a graph whatever outputs are asked for, so a capture of early boundaries would pay a whole pass."""
    graph = as_graph(model)
    keep = upstream_nodes(graph, tensors)
    out = onnx.ModelProto()
    out.CopyFrom(graph.template)
    nodes = [out.graph.node[i] for i in keep]
    read = {name for node in nodes for name in node.input}
    initializers = [t for t in out.graph.initializer if t.name in read]
    produced = {name for node in nodes for name in node.output}
    outputs = [v for v in out.graph.output if v.name in produced]
    del out.graph.node[:], out.graph.initializer[:], out.graph.output[:]
    out.graph.node.extend(nodes)
    out.graph.initializer.extend(initializers)
    out.graph.output.extend(outputs)
    return out


def suffix_of(model: onnx.ModelProto | GraphModel, layer: Layer, replaced: Iterable[str]) -> Suffix:
    """The suffix model of ``layer``: its downstream nodes; the float values they read from outside, and the
    ``replaced`` tensors they read, as inputs; every other initializer a constant."""
    graph = as_graph(model)
    proto = graph.template.graph
    start = next(i for i, node in enumerate(graph.nodes) if node.name == layer.name)
    nodes = [proto.node[i] for i in downstream_nodes(graph, start)]
    produced = {name for node in nodes for name in node.output}
    output = proto.output[0]
    if output.name not in produced:
        return Suffix([], [], None)
    read = list(dict.fromkeys(name for node in nodes for name in node.input if name))
    fed = [name for name in read if name in set(replaced)]
    boundary = [name for name in read if name not in produced and graph.constant(name) is None and name not in fed]
    inputs = [_value_info(graph.tensor(name), name) for name in boundary]
    inputs += [onnx.helper.make_tensor_value_info(name, weight.data_type, weight.dims)
               for name, weight in ((name, graph.tensor_proto(name)) for name in fed)]
    constants = [graph.tensor_proto(name) for name in read if graph.constant(name) is not None and name not in fed]
    sub = onnx.helper.make_graph(nodes, f"{proto.name}_after_{layer.name}", inputs, [output], constants)
    return Suffix(boundary, fed, onnx.helper.make_model(sub, opset_imports=graph.opset_import,
                                                        ir_version=graph.template.ir_version))


def _value_info(tensor: gs.Tensor | None, name: str) -> onnx.ValueInfoProto:
    """A suffix input for a boundary tensor, typed as the model records it (float of unknown shape if not)."""
    if tensor is None or tensor.dtype is None:
        return onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
    return value_info(tensor, name)


Probes = dict[str, list[tuple[object, dict[str, np.ndarray]]]]  # layer name -> [(key, replaced tensors)]


class SuffixProbes:
    """First-output values of the model with one layer's tensors replaced, computed on suffixes only."""

    def __init__(self, model: onnx.ModelProto, layers: list[Layer], feeds: list[Feed], reference: np.ndarray,
                 float_tensors: dict[str, np.ndarray], threads: int = 0) -> None:
        """``threads``: the cores this process may use (0: all): the capture session's threads and the probes
        run side by side."""
        self.model = model
        self.threads = threads
        self.parallel = PROBE_THREADS if threads <= 0 else max(1, min(PROBE_THREADS, threads))
        self.graph = GraphModel(model)  # walked for every layer's suffix and every group's prefix
        self.float_tensors = float_tensors
        self.layers = {layer.name: layer for layer in layers}
        self.feeds = feeds
        self.reference = reference
        self.graph_inputs = {v.name for v in model.graph.input}

    @staticmethod
    def applies(model: onnx.ModelProto) -> bool:
        """Suffixes are cut from the top-level node list: models with subgraphs run whole."""
        return not has_subgraphs(model)

    def outputs(self, probes: Probes) -> Iterator[tuple[object, np.ndarray]]:
        """``(key, the model's first output over all samples)`` for every probe, ``GROUP_LAYERS`` layers at a
        time (only one group's outputs are held at once)."""
        names = list(probes)
        for start in range(0, len(names), GROUP_LAYERS):
            yield from self._run_group({name: probes[name] for name in names[start:start + GROUP_LAYERS]})

    def _run_group(self, probes: Probes) -> Iterator[tuple[object, np.ndarray]]:
        """One float pass per batch captures every boundary of the group; each probe runs only its suffix."""
        suffixes = {name: suffix_of(self.graph, self.layers[name], {t for _, tensors in entries for t in tensors})
                    for name, entries in probes.items()}
        live = {name: suffix for name, suffix in suffixes.items() if suffix.model is not None}
        sessions = {name: make_session(suffix.model, threads=1, shared_arena=True) for name, suffix in live.items()}
        boundary = {t for s in live.values() for t in s.boundary} - self.graph_inputs
        capture = CaptureEngine(prefix_of(self.graph, boundary), boundary, self.threads, shared_arena=True)
        parts: dict[object, list[np.ndarray]] = {key: [] for name in live for key, _ in probes[name]}
        jobs = [(name, key, tensors) for name in live for key, tensors in probes[name]]
        with ThreadPoolExecutor(max_workers=self.parallel, thread_name_prefix="onnxq-probe") as pool:
            for feed in self.feeds:
                values = capture.values(feed)

                def run(job: tuple, values: dict = values) -> np.ndarray:
                    name, _, tensors = job
                    suffix = live[name]
                    fed = {t: tensors.get(t, self.float_tensors[t]) for t in suffix.fed}
                    return sessions[name].run(None, {**{t: values[t] for t in suffix.boundary}, **fed})[0]

                for (_, key, _), output in zip(jobs, pool.map(run, jobs), strict=True):
                    parts[key].append(output)
        for name, entries in probes.items():
            for key, _ in entries:
                yield key, (np.concatenate(parts.pop(key)) if name in live else self.reference)
