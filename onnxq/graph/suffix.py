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
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxq.calibration.capture import CaptureEngine, make_session
from onnxq.data.sources import Feed
from onnxq.graph.layers import Layer
from onnxq.graph.model import GraphModel, as_graph
from onnxq.graph.segments import value_info

if TYPE_CHECKING:
    import onnxruntime as ort

GROUP_LAYERS = 8  # suffix sessions alive at once (each holds its constant weights; buffers come from one arena)
# probes run side by side on single-threaded sessions: independent runs use the cores with no hand-offs inside a
# run (SqueezeNet: ~8 % less CPU than one two-threaded session)
PROBE_THREADS = max(1, min(2, os.cpu_count() or 1))
# samples per probe run, tried against whole batches (``RowChoice``): one sample's activations can stay in the
# core's cache from node to node where a batch streams each large map through memory
PROBE_ROWS = 1
# operators that compute each sample on its own, with the same kernel whatever the batch: a suffix of only these
# gives the same outputs one sample at a time (a Gemm or MatMul picks another kernel for one row, so other
# suffixes always run whole batches)
SAMPLEWISE_OPS = frozenset({"Conv", "Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Add", "Sub",
                            "Mul", "Div", "Concat", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool",
                            "BatchNormalization", "Flatten", "Identity", "Dropout"})


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
        choices = {name: RowChoice(splittable(live[name], session)) for name, session in sessions.items()}
        boundary = {t for s in live.values() for t in s.boundary} - self.graph_inputs
        capture = CaptureEngine(prefix_of(self.graph, boundary), boundary, self.threads, shared_arena=True)
        parts: dict[object, list[np.ndarray]] = {key: [] for name in live for key, _ in probes[name]}
        jobs = [(name, key, tensors) for name in live for key, tensors in probes[name]]
        with ThreadPoolExecutor(max_workers=self.parallel, thread_name_prefix="onnxq-probe") as pool:
            for batch, feed in enumerate(self.feeds):
                values = capture.values(feed)

                def run(job: tuple, values: dict = values, batch: int = batch) -> np.ndarray:
                    name, _, tensors = job
                    suffix, choice = live[name], choices[name]
                    fed = {t: tensors.get(t, self.float_tensors[t]) for t in suffix.fed}
                    rows = choice.rows(batch)
                    start = time.thread_time()  # the session runs on this thread (one intra-op thread)
                    outputs = [sessions[name].run(None, {**chunk, **fed})[0]
                               for chunk in row_chunks({t: values[t] for t in suffix.boundary}, rows)]
                    output = outputs[0] if len(outputs) == 1 else np.concatenate(outputs)
                    choice.record(rows, time.thread_time() - start, len(output))
                    return output

                for (_, key, _), output in zip(jobs, pool.map(run, jobs), strict=True):
                    parts[key].append(output)
        for name, entries in probes.items():
            for key, _ in entries:
                yield key, (np.concatenate(parts.pop(key)) if name in live else self.reference)


class RowChoice:
    """Whole batches or runs of ``PROBE_ROWS`` samples for one suffix session, whichever took less CPU per sample
    on the first two batches (SqueezeNet's 55 x 55 maps: ~8 % less one sample at a time; MobileNet v1's layers:
    more). Convolutions compute each sample alone either way, so the outputs do not depend on the choice."""

    def __init__(self, splittable: bool) -> None:
        self.splittable = splittable
        self.seconds: dict[int | None, list[float]] = {None: [], PROBE_ROWS: []}  # CPU per sample of each run

    def rows(self, batch: int) -> int | None:
        """The rows per run for the ``batch``-th batch (None: the whole batch)."""
        if not self.splittable or batch == 0:
            return None
        whole, split = self.seconds[None], self.seconds[PROBE_ROWS]
        if batch == 1 or not whole or not split:
            return PROBE_ROWS
        return PROBE_ROWS if min(split) < min(whole) else None

    def record(self, rows: int | None, seconds: float, samples: int) -> None:
        self.seconds[rows].append(seconds / max(samples, 1))


def splittable(suffix: Suffix, session: ort.InferenceSession) -> bool:
    """Whether the suffix gives the same outputs run sample by sample: only ``SAMPLEWISE_OPS``, and boundary inputs
    of any length along the leading axis (not a fixed size)."""
    shapes = {arg.name: arg.shape for arg in session.get_inputs()}
    return all(node.op_type in SAMPLEWISE_OPS and node.domain in ("", "ai.onnx") for node in suffix.model.graph.node) \
        and all(shapes[name] and not isinstance(shapes[name][0], int) for name in suffix.boundary)


def row_chunks(values: dict[str, np.ndarray], rows: int | None) -> list[dict[str, np.ndarray]]:
    """The values in runs of ``rows`` samples (views along the leading axis) when every array is batched
    along it, the same length; else the values whole (an array without the sample axis cannot be split)."""
    lengths = {np.shape(array)[0] if np.ndim(array) else None for array in values.values()}
    if rows is None or len(lengths) != 1 or None in lengths or next(iter(lengths)) <= rows:
        return [values]
    count = next(iter(lengths))
    return [{name: array[start:start + rows] for name, array in values.items()} for start in range(0, count, rows)]
