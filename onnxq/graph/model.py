"""One graph model: an onnx-graphsurgeon graph with its lookups by name, built once.

Finding layers, bias slots, weight and activation Q/DQ, MatMulNBits and the kernel report all walk or edit a
``GraphModel`` instead of rebuilding name -> node and name -> tensor dicts. Producers and consumers come from
onnx-graphsurgeon's own links (``tensor.inputs`` / ``tensor.outputs``), which stay right through edits; the
name lookups here are updated by the edit methods. Export is the edits plus one serialisation (:meth:`to_proto`).

Importing never changes the caller's ``ModelProto``: onnx-graphsurgeon builds its own nodes (unnamed ones get a
stable derived name, see :func:`derived_names`) and refers to the caller's initializers without copying them; an
edit replaces a constant's values, it never writes into the original tensor.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter
from onnx_graphsurgeon.ir.tensor import LazyValues

from onnxq.graph.bodies import body_node_name, name_body_nodes, subgraphs

MODEL_FIELDS = ("ir_version", "producer_name", "producer_version", "domain", "model_version", "doc_string")


def derived_names(names: Sequence[str], op_types: Sequence[str]) -> list[str]:
    """Each node's name, or for an unnamed one ``<op_type>_<index>`` (``_`` appended until unique): the names
    layers are reported, excluded and stored by."""
    seen = {name for name in names if name}
    named = []
    for index, (name, op_type) in enumerate(zip(names, op_types, strict=True)):
        if not name:
            name = f"{op_type}_{index}"
            while name in seen:
                name += "_"
            seen.add(name)
        named.append(name)
    return named


def name_unnamed_nodes(model: onnx.ModelProto) -> None:
    """Edit ``model`` in place: give its unnamed top-level nodes their :func:`derived_names` and unnamed nodes in
    If/Loop/Scan bodies their ``bodies.body_node_name`` (for a model this package made itself, such as the
    prepared copy, so the names layers are found by are the nodes' names)."""
    nodes = model.graph.node
    for node, name in zip(nodes, derived_names([n.name for n in nodes], [n.op_type for n in nodes]), strict=True):
        if node.name != name:
            node.name = name
    name_body_nodes(model.graph)


class GraphModel:
    """An onnx-graphsurgeon graph of one model, with its nodes and tensors by name and its model-level fields."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.graph: gs.Graph = gs.import_onnx(model)
        self.template = model  # model-level fields (metadata, producer, IR version) for the serialisation
        self.opset_import = [_copy(o, onnx.OperatorSetIdProto()) for o in model.opset_import]
        self.metadata = {p.key: p.value for p in model.metadata_props}
        self.min_ir_version = 0  # raised by edits that need a newer IR (INT4 codes: 10)
        nodes = self.graph.nodes
        for node, name in zip(nodes, derived_names([n.name for n in nodes], [n.op for n in nodes]), strict=True):
            node.name = name
        self._doc_strings = {name: n.doc_string for n, name in zip(model.graph.node, (n.name for n in nodes),
                                                                    strict=True) if n.doc_string}
        self._order = {t.name: i for i, t in enumerate(model.graph.initializer)}
        self._positions = len(self._order)
        self._value_order = {v.name: i for i, v in enumerate(model.graph.value_info)}
        self._tensors: dict[str, gs.Tensor] = self.graph.tensors()
        self._local: set[str] = set()  # tensors declared inside bodies (stored there, not at the top level)
        for subgraph in self.graph.subgraphs(recursive=True):  # top-level weights only If/Loop/Scan bodies read
            for name, tensor in subgraph.tensors().items():
                if name not in self._tensors:
                    self._tensors[name] = tensor
                    if name not in self._order:
                        self._local.add(name)
        self._nodes: dict[str, gs.Node] = {node.name: node for node in nodes}
        self._body_nodes: dict[str, gs.Node] = {}
        self._owner: dict[int, gs.Graph] = {}  # id(body node) -> the body that holds it
        self._where: dict[str, str] = {}  # body node name -> "inside the then_branch of If if"
        self._walk_bodies(self.graph, "")

    def _walk_bodies(self, graph: gs.Graph, where: str) -> None:
        """Name the unnamed nodes of every body in ``graph`` (``bodies.body_node_name``) and index them."""
        for node in graph.nodes:
            for attribute, body in node.attrs.items():
                if not isinstance(body, gs.Graph):
                    continue
                inside = f"{where}inside the {attribute} of {node.op} {node.name}"
                for index, inner in enumerate(body.nodes):
                    inner.name = inner.name or body_node_name(node.name, attribute, inner.op, index)
                    self._body_nodes.setdefault(inner.name, inner)
                    self._owner[id(inner)] = body
                    self._where.setdefault(inner.name, inside)
                self._walk_bodies(body, f"{inside}, ")

    # Queries ----------------------------------------------------------------------------------------------
    @property
    def nodes(self) -> list[gs.Node]:
        """Top-level nodes in graph order."""
        return self.graph.nodes

    def walk(self) -> Iterator[tuple[gs.Node, str]]:
        """Every node with where it sits ("" at the top level): each top-level node, then the nodes of its bodies
        (depth first), in graph order."""
        def visit(nodes: list[gs.Node]) -> Iterator[tuple[gs.Node, str]]:
            for node in nodes:
                yield node, self._where.get(node.name, "") if id(node) in self._owner else ""
                for body in node.attrs.values():
                    if isinstance(body, gs.Graph):
                        yield from visit(body.nodes)
        return visit(self.graph.nodes)

    def node(self, name: str) -> gs.Node | None:
        """The node called ``name``, top-level or inside a body."""
        return self._nodes.get(name) or self._body_nodes.get(name)

    def where(self, name: str) -> str:
        """Where a node sits: "" at the top level, else e.g. "inside the then_branch of If if"."""
        return self._where.get(name, "") if name not in self._nodes else ""

    def tensor(self, name: str) -> gs.Tensor | None:
        return self._tensors.get(name) if name else None

    def constant(self, name: str) -> gs.Constant | None:
        """The initializer (or Constant-valued tensor) called ``name``, or None."""
        tensor = self.tensor(name)
        return tensor if isinstance(tensor, gs.Constant) else None

    def array(self, name: str) -> np.ndarray:
        """The values of constant ``name`` as a numpy array."""
        return numpy_helper.to_array(self.tensor_proto(name))

    def tensor_proto(self, name: str) -> onnx.TensorProto:
        """Constant ``name`` as an ONNX tensor (its original message for an imported initializer: do not edit)."""
        constant = self.constant(name)
        if constant is None:
            raise KeyError(name)
        if isinstance(constant._values, LazyValues):
            return constant._values.tensor
        return numpy_helper.from_array(constant.values, name)

    def producer(self, name: str) -> gs.Node | None:
        tensor = self.tensor(name)
        return tensor.inputs[0] if tensor is not None and tensor.inputs else None

    def consumers(self, name: str) -> list[gs.Node]:
        """Nodes reading ``name``, once per input slot, subgraph nodes that read it from the outer scope included."""
        tensor = self.tensor(name)
        return list(tensor.outputs) if tensor is not None else []

    def readers(self, name: str) -> list[gs.Node]:
        """The distinct nodes reading ``name`` (a node reading it twice is listed once), in reading order."""
        return list({id(node): node for node in self.consumers(name)}.values())

    def is_output(self, name: str) -> bool:
        return any(t.name == name for t in self.graph.outputs)

    @property
    def output_names(self) -> set[str]:
        return {t.name for t in self.graph.outputs}

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.graph.inputs]

    # Edits ------------------------------------------------------------------------------------------------
    def add_constant(self, tensor: onnx.TensorProto) -> gs.Constant:
        """A new initializer holding exactly ``tensor`` (packed INT4/INT2 included); not yet used by a node."""
        constant = gs.Constant(tensor.name, LazyValues(tensor))
        self._tensors[tensor.name] = constant
        if tensor.name not in self._order:
            self._order[tensor.name] = self._next_position()
        return constant

    def set_values(self, name: str, array: np.ndarray, last: bool = False) -> None:
        """Replace the values of constant ``name`` (the original tensor message is left as it was); ``last``
        lists it after every other initializer in the file, as a removed and re-added one would be."""
        self.constant(name)._values = LazyValues(numpy_helper.from_array(array, name))
        if last:
            self._order[name] = self._next_position()

    def _next_position(self) -> int:
        self._positions += 1
        return self._positions

    def variable(self, name: str) -> gs.Variable:
        """A new activation tensor (no type recorded, so it gets no value_info)."""
        tensor = gs.Variable(name)
        self._tensors[name] = tensor
        return tensor

    def make_node(self, op: str, name: str, inputs: Iterable[gs.Tensor], outputs: Iterable[gs.Tensor],
                  domain: str | None = None, **attrs: object) -> gs.Node:
        """A new node (not yet placed in the graph: see :meth:`place`); attributes in name order, as
        ``onnx.helper.make_node`` writes them."""
        node = gs.Node(op, name, dict(sorted(attrs.items())), list(inputs), list(outputs), domain=domain)
        self._nodes[name] = node
        return node

    def place(self, nodes: list[gs.Node], before: gs.Node | None = None, first: bool = False) -> None:
        """Put new nodes into the graph order: at the front, just before ``before``, or at the end."""
        if first:
            self.graph.nodes[:0] = nodes
        elif before is not None:  # in the graph (or body) that holds ``before``
            graph = self._owner.get(id(before), self.graph)
            index = next(i for i, n in enumerate(graph.nodes) if n is before)
            graph.nodes[index:index] = nodes
            for node in nodes if graph is not self.graph else ():
                self._owner[id(node)] = graph
                self._where[node.name] = self._where.get(before.name, "")
        else:
            self.graph.nodes.extend(nodes)

    def reorder(self, nodes: list[gs.Node]) -> None:
        """Set the graph order to ``nodes`` (the same nodes plus any new ones, each once)."""
        self.graph.nodes = list(nodes)
        self._nodes = {node.name: node for node in self.graph.nodes}

    def remove_node(self, node: gs.Node) -> None:
        """Drop a node; its tensors stay (a tensor nothing reads any more is not exported)."""
        self._owner.get(id(node), self.graph).nodes.remove(node)
        if self._nodes.get(node.name) is node:
            self._nodes.pop(node.name)
        if self._body_nodes.get(node.name) is node:
            self._body_nodes.pop(node.name)
        node.inputs.clear()
        node.outputs.clear()

    def replace_input(self, old: str, new: gs.Tensor) -> None:
        """Point every reader of tensor ``old`` (graph outputs excepted) at ``new``."""
        for node in self.readers(old):
            for index, tensor in enumerate(node.inputs):
                if tensor.name == old:
                    node.inputs[index] = new

    def drop_unused(self, names: Iterable[str]) -> None:
        """Forget the given constants once nothing reads them (they are then left out of the export)."""
        for name in names:
            tensor = self._tensors.get(name)
            if tensor is not None and not tensor.outputs and not self.is_output(name):
                del self._tensors[name]
                self.graph.inputs[:] = [t for t in self.graph.inputs if t.name != name]

    def set_opset(self, domain: str, version: int) -> None:
        """Import ``domain`` at ``version`` (raising an existing import, never lowering it)."""
        for opset in self.opset_import:
            if opset.domain == domain or (domain == "" and opset.domain == "ai.onnx"):
                opset.version = max(opset.version, version)
                return
        self.opset_import.append(onnx.OperatorSetIdProto(domain=domain, version=version))

    # Serialisation -----------------------------------------------------------------------------------------
    def to_proto(self) -> onnx.ModelProto:
        """The edited model as one ``ModelProto``: the template's model fields, initializers and value_info in
        their original order (new ones after, in the order they were made), node doc strings kept."""
        with _payloads_held(self._tensors.values()) as held:  # each weight is copied once, into the result
            model = gs.export_onnx(self.graph, do_type_check=False)
        for tensor in _initializers(model.graph):  # bodies keep their own weights (``_local``)
            if tensor.name in held:
                tensor.CopyFrom(held[tensor.name])
        exported = {t.name for t in model.graph.initializer}
        model.graph.initializer.extend(  # top-level weights only If/Loop/Scan bodies read
            OnnxExporter.export_tensor_proto(tensor) for name, tensor in self._tensors.items()
            if isinstance(tensor, gs.Constant) and name not in exported and tensor.outputs and name not in self._local)
        _store_once(model.graph, set())
        for field in MODEL_FIELDS:  # onnx.proto is proto2: a field the template leaves unset stays unset
            model.ClearField(field)
            if self.template.HasField(field):
                setattr(model, field, getattr(self.template, field))
        model.graph.ClearField("doc_string")
        if self.template.graph.HasField("doc_string"):
            model.graph.doc_string = self.template.graph.doc_string
        model.ir_version = max(model.ir_version, self.min_ir_version)
        del model.opset_import[:]
        model.opset_import.extend(self.opset_import)
        model.metadata_props.extend(onnx.StringStringEntryProto(key=k, value=v) for k, v in self.metadata.items())
        model.graph.initializer.sort(key=lambda t: self._order.get(t.name, self._positions + 1))
        model.graph.value_info.sort(key=lambda v: self._value_order.get(v.name, len(self._value_order)))
        for node in model.graph.node:
            if node.name in self._doc_strings:
                node.doc_string = self._doc_strings[node.name]
        return model



def as_graph(model: onnx.ModelProto | GraphModel) -> GraphModel:
    """The model's ``GraphModel``: a caller that walks a graph several times passes one it built once."""
    return model if isinstance(model, GraphModel) else GraphModel(model)

def _copy(message, into):
    into.CopyFrom(message)
    return into


@contextmanager
def _payloads_held(tensors: Iterable[gs.Tensor]) -> Iterator[dict[str, onnx.TensorProto]]:
    """While onnx-graphsurgeon exports (which copies every initializer twice: into a graph, then into the model),
    its tensors stand in without their raw bytes; yields name -> original tensor, copied in whole afterwards."""
    held: dict[str, onnx.TensorProto] = {}
    for tensor in tensors:
        values = getattr(tensor, "_values", None)
        if isinstance(values, LazyValues) and values.tensor.HasField("raw_data"):
            held[tensor.name] = values.tensor
            stub = onnx.TensorProto()
            stub.CopyFrom(values.tensor)
            stub.ClearField("raw_data")
            tensor._values = LazyValues(stub)
    try:
        yield held
    finally:
        for tensor in tensors:
            if tensor.name in held:
                tensor._values = LazyValues(held[tensor.name])


def _initializers(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """The initializers of a graph and of every body in it."""
    yield from graph.initializer
    for node in graph.node:
        for _, body in subgraphs(node):
            yield from _initializers(body)


def _store_once(graph: onnx.GraphProto, outer: set[str]) -> None:
    """Keep each weight once, in the graph that declares it: If/Loop/Scan bodies read an enclosing graph's
    initializers from its scope, and onnx-graphsurgeon's export would copy them into every body that reads them."""
    for index in reversed(range(len(graph.initializer))):
        if graph.initializer[index].name in outer:
            del graph.initializer[index]
    scope = outer | {t.name for t in graph.initializer}
    for node in graph.node:
        for attribute in node.attribute:
            for body in [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else attribute.graphs:
                _store_once(body, scope)
