"""The capture engine: run a model over batches once and hand the tensors each observer asks for to it.

Every consumer of intermediate tensors (calibration statistics, activation ranges, per-layer diagnostics) is an
*observer* that names the tensors it needs; one engine exposes them all as outputs of one onnxruntime session, so
one pass over the data serves every observer. While the observers work on batch ``k`` (numpy, GIL mostly
released), the session already runs batch ``k + 1`` on a second thread: both cores stay busy.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from functools import cache
from pathlib import Path
from typing import Protocol

import numpy as np
import onnx
import onnxruntime as ort
from google.protobuf.message import EncodeError

from onnxq.data.sources import Feed, feed_samples
from onnxq.errors import OnnxqError
from onnxq.graph.bodies import branch_tensors_in_loops, expose_body_tensors, flatten_stacked
from onnxq.graph.loading import PROTOBUF_LIMIT

Values = dict[str, np.ndarray]


class Observer(Protocol):
    """Something that accumulates statistics of some tensors, one batch at a time."""

    tensors: Sequence[str]

    def update(self, values: Values, feed: Feed) -> None:
        """Take one batch: ``values`` holds every requested tensor (graph inputs included), ``feed`` the inputs.
        The arrays are reused for a later batch once ``update`` returns: copy what must outlive it."""


def capture_model(model: onnx.ModelProto, tensors: Sequence[str]) -> onnx.ModelProto:
    """A copy of the model whose outputs are the given intermediate tensors."""
    return capture_outputs(model, tensors)[0]


def capture_outputs(model: onnx.ModelProto, tensors: Sequence[str]) -> tuple[onnx.ModelProto, list[str], list[int]]:
    """:func:`capture_model`, with each tensor's output name and iteration axes: a tensor inside an If/Loop/Scan
    body is carried out by the copy (``graph/bodies.py``), stacked over the iterations of each Loop/Scan."""
    captured = onnx.ModelProto()
    captured.CopyFrom(model)
    exposed = expose_body_tensors(captured, set(tensors))
    outputs, axes = zip(*(exposed.get(name, (name, 0)) for name in tensors), strict=True) if tensors else ((), ())
    known = {v.name: v for v in list(captured.graph.value_info) + list(model.graph.output)}
    del captured.graph.output[:]
    for name in outputs:
        value = known.get(name) or onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
        captured.graph.output.append(value)
    return captured, list(outputs), list(axes)


def make_session(model: onnx.ModelProto, threads: int = 0, shared_arena: bool = False) -> ort.InferenceSession:
    """A CPU session for an in-memory model (spilled to a temporary file when over protobuf's 2 GB); with
    ``shared_arena`` its buffers come from one process-wide arena (``shared_cpu_arena``) instead of its own."""
    options = ort.SessionOptions()
    options.log_severity_level = 4  # errors come back as exceptions (one line each); ORT would print them too
    options.intra_op_num_threads = threads
    if shared_arena:
        shared_cpu_arena()
        options.add_session_config_entry("session.use_env_allocators", "1")
    # onnxruntime's workers otherwise spin between runs, burning the core the observers' numpy work needs
    # (EfficientNet-Lite0 default run: 32.9 -> 30.2 CPU s, same wall time)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    serialized = _serialized(model)  # measuring the size first would serialize the model twice
    if serialized is not None:
        return ort.InferenceSession(serialized, options, providers=["CPUExecutionProvider"])
    with tempfile.TemporaryDirectory(prefix="onnxq-") as tmp:
        path = Path(tmp) / "model.onnx"
        onnx.save(model, str(path), save_as_external_data=True, location="model.data")
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _serialized(model: onnx.ModelProto) -> bytes | None:
    """The serialized model, or None when it is (near) protobuf's 2 GB limit and must go through a file."""
    try:
        serialized = model.SerializeToString()
    except EncodeError:  # protobuf cannot serialize a message over 2 GB
        return None
    return serialized if len(serialized) < PROTOBUF_LIMIT else None


@cache
def shared_cpu_arena() -> None:
    """Register one CPU arena with onnxruntime's environment (once per process). Sessions made with
    ``shared_arena`` draw from it, so many sessions alive at once (CLADO's probe groups: 2.3 GB of arenas on
    SqueezeNet) hold only what the runs in flight need."""
    info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
    ort.create_and_register_allocator(info, None)


def run_into(session: ort.InferenceSession, given: Feed, outputs: Sequence[str], arrays: Sequence[np.ndarray]
             ) -> None:
    """Run ``session`` on ``given`` writing the named outputs into ``arrays`` (IOBinding: no copy out of
    onnxruntime, no fresh memory); the arrays must have the outputs' shapes and types."""
    binding = session.io_binding()
    for name, value in given.items():
        binding.bind_cpu_input(name, np.ascontiguousarray(value))
    for name, array in zip(outputs, arrays, strict=True):
        binding.bind_output(name, "cpu", 0, array.dtype, array.shape, array.ctypes.data)
    session.run_with_iobinding(binding)


class OutputBuffers:
    """Arrays a session writes one batch's captured tensors into, kept for the next batch of the same shapes: fresh
    arrays of hundreds of MB per batch pay their first-touch page faults every time (EfficientNet-Lite0's
    calibration: 4 s of system time). Holds one set of shapes at a time (token batches change length)."""

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.arrays: list[np.ndarray] = []

    def take(self, key: tuple, types: list[tuple[tuple[int, ...], np.dtype]]) -> list[np.ndarray]:
        """The arrays for outputs of these shapes and types (allocated when the shapes changed)."""
        if key != self.key:
            self.key, self.arrays = key, [np.empty(shape, dtype) for shape, dtype in types]
        return self.arrays

    def keep(self, key: tuple, arrays: list[np.ndarray]) -> None:
        """Adopt a plain run's outputs as the arrays for ``key``."""
        self.key, self.arrays = key, arrays


class CaptureEngine:
    """One session over ``model`` that yields the named tensors for each batch."""

    def __init__(self, model: onnx.ModelProto, tensors: Iterable[str], threads: int = 0,
                 shared_arena: bool = False) -> None:
        graph_inputs = {v.name for v in model.graph.input}
        self.captured = sorted(set(tensors) - graph_inputs)
        self.model = model  # read again only to explain a capture that fails
        captured, self.outputs, self.axes = capture_outputs(model, self.captured) if self.captured else (None, [], [])
        self.session = make_session(captured, threads, shared_arena) if captured is not None else None
        self.output_types: dict[tuple, list[tuple[tuple[int, ...], np.dtype]]] = {}  # by the feed's shapes
        self.bindable = self.session is not None

    def values(self, feed: Feed, buffers: OutputBuffers | None = None) -> Values:
        """The captured tensors (and the feed's inputs) for one batch; a body tensor's iterations (Loop/Scan) are
        rows of the batch. With ``buffers`` the tensors are written into its arrays (valid until the next batch
        that uses the same buffers)."""
        try:
            arrays = self._run(feed, buffers) if self.session else []
        except Exception as err:  # onnxruntime's own exception types
            stacked = [name for name, axes in zip(self.captured, self.axes, strict=True) if axes]
            if not stacked or "Inconsistent shape" not in str(err):
                raise
            stacked = [name for name in stacked if name in branch_tensors_in_loops(self.model)] or stacked
            raise OnnxqError(f"cannot capture the inputs of layers inside an If whose branch changes between the "
                             f"iterations of a Loop or Scan ({', '.join(stacked[:3])}); keep those layers in float "
                             "with --nodes_to_exclude") from err
        values = {name: flatten_stacked(array, axes)
                  for name, array, axes in zip(self.captured, arrays, self.axes, strict=True)}
        values.update(feed)
        return values

    def _run(self, feed: Feed, buffers: OutputBuffers | None) -> list[np.ndarray]:
        """One session run: into ``buffers`` once this feed's shapes have run before, else plainly. A run whose
        output shapes depend on more than the input shapes (data-dependent shapes) fails to bind: it runs plainly,
        and so does every later batch."""
        if buffers is None or not self.bindable:
            return self.session.run(self.outputs, feed)
        given = {name: np.ascontiguousarray(value) for name, value in feed.items()}
        key = tuple((name, value.shape, value.dtype.str) for name, value in given.items())
        types = self.output_types.get(key)
        if types is None:
            arrays = self.session.run(self.outputs, feed)
            self.output_types[key] = [(array.shape, array.dtype) for array in arrays]
            buffers.keep(key, arrays)
            return arrays
        arrays = buffers.take(key, types)
        try:
            run_into(self.session, given, self.outputs, arrays)
        except Exception:  # noqa: BLE001 - onnxruntime's own types: a shape that changed with the data, an input
            self.bindable = False  # type binding does not take (strings)
            return self.session.run(self.outputs, feed)
        return arrays

    def stream(self, batches: Iterable[Feed]) -> Iterator[tuple[Values, Feed]]:
        """``(values, feed)`` per batch, the next batch's forward pass running while the caller works. The batches
        alternate between two sets of output buffers: a batch's values are valid until the caller asks for the
        next one (an observer copies what it keeps)."""
        buffers = (OutputBuffers(), OutputBuffers())
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="onnxq-capture") as pool:
            pending: Future | None = None
            pending_feed: Feed | None = None
            for index, feed in enumerate(batches):
                submitted = pool.submit(self.values, feed, buffers[index % 2])
                if pending is not None:
                    yield pending.result(), pending_feed
                pending, pending_feed = submitted, feed
            if pending is not None:
                yield pending.result(), pending_feed

    def run(self, batches: Iterable[Feed], observers: Sequence[Observer],
            on_batch: Callable[[int], None] | None = None) -> int:
        """Feed every batch to every observer; returns the number of samples seen."""
        samples = 0
        for values, feed in self.stream(batches):
            for observer in observers:
                observer.update(values, feed)
            samples += feed_samples(feed)
            if on_batch:
                on_batch(feed_samples(feed))
        if not samples:
            raise OnnxqError("the calibration data is empty; pass at least one sample")
        return samples


def capture(model: onnx.ModelProto, batches: Iterable[Feed], observers: Sequence[Observer],
            on_batch: Callable[[int], None] | None = None) -> int:
    """Run ``model`` once over ``batches`` for all ``observers`` (the tensors they need, in one session)."""
    tensors = {name for observer in observers for name in observer.tensors}
    return CaptureEngine(model, tensors).run(batches, observers, on_batch)
