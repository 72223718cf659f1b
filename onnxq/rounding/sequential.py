"""Sequential, error-compensating rounding: each layer is rounded against the inputs the quantized model
really feeds it, towards the float model's output.

COMQ's objective ``||X W - X Q||^2`` uses the float model's inputs X for every layer, so each layer ignores
the error the layers before it already made. Here the layers are rounded stage by stage; a stage's inputs
are captured twice on the same batches, from the float model (X) and from the model whose earlier stages
are already quantized (X~), and the stage's layers minimise ``||X W - X~ Q - 1 b||^2`` (the asymmetric
reconstruction of AdaRound/GPFQ). In Gram form that is ``(Q - W*) S (Q - W*)^T`` with the centred
``S = cov(X~)`` and the compensated target ``W* = W cov(X, X~) S^-1``, so every rounding pass runs
unchanged on ``(W*, S)``; the bias absorbs ``W mu - Q mu~``. When X~ = X, W* = W exactly.

A layer whose output is added to a skip connection (the project conv of a residual block) aims at the float
sum instead: the skip already carries the earlier layers' error e = s - s~, so its target becomes
``||X W + e - X~ Q - 1 b||^2`` (``W*`` gains ``cov(X~, e)^T S^-1``, the bias the mean of e) and the residual
stream is repaired where it is written, instead of drifting through every block.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from threadpoolctl import threadpool_limits

from onnxq.allocation.oracle import weights_as_inputs
from onnxq.calibration import image_gram
from onnxq.calibration.calibrate import is_pointwise
from onnxq.calibration.capture import make_session, run_into
from onnxq.calibration.gram import add_columns, add_conv, add_pointwise
from onnxq.calibration.unfold import unfold_columns
from onnxq.data.masking import attention_mask_name, batch_mask, token_rows
from onnxq.data.sources import Feed, feed_samples, model_inputs
from onnxq.data.spill import STORE_BYTES, BatchStore, SpillFile
from onnxq.errors import OnnxqError
from onnxq.graph.bias import BiasSlot, replacement_tensors
from onnxq.graph.layers import Layer
from onnxq.graph.model import GraphModel, as_graph
from onnxq.graph.segments import Segment, plan_segments, segment_model
from onnxq.passes.compensation import compensated_target, output_mean_shift
from onnxq.passes.gram import centred_gram, overflow_shift
from onnxq.rounding.paired_gram import (
    PairedSums,
    add_paired_columns,
    add_paired_conv,
    add_paired_pointwise,
    release_frames,
)
from onnxq.rounding.paired_image_gram import ImageGeometry, ImageSums

if TYPE_CHECKING:
    import onnxruntime as ort


@dataclass
class PairedStats:
    """Sums over one layer's input rows in the quantized-so-far model (x~) and the float model (x)."""

    gram: np.ndarray  # (G, d, d) sum x~ x~^T
    cross: np.ndarray  # (G, d, d) sum x~ x^T
    sum_quantized: np.ndarray  # (G, d)
    sum_float: np.ndarray  # (G, d)
    rows: int = 0
    samples: int = 0
    skip_cross: np.ndarray | None = None  # (d, out) sum x~ e^T, e = s - s~ the skip's error (residual layers)
    skip_sum: np.ndarray | None = None  # (out,) sum e
    images: ImageSums | None = None  # a small-map depthwise layer's image sums, folded into the above by settle()
    geometry: ImageGeometry | None = None

    @classmethod
    def empty(cls, layer: Layer) -> PairedStats:
        g, d = layer.groups, layer.fan_in
        return cls(np.zeros((g, d, d)), np.zeros((g, d, d)), np.zeros((g, d)), np.zeros((g, d)))

    def merge(self, x_quantized: np.ndarray, x_float: np.ndarray, layer: Layer, mask: np.ndarray | None,
              skip_error: np.ndarray | None = None) -> None:
        """Add one batch of the layer's input from both models (same samples, same order), and for a residual
        layer the error of the skip its output is added to. When the batch's float32 products overflow, it is
        summed again scaled by an exact power of two (``passes.gram.overflow_shift``): checking the batch's sums
        for that costs nothing, where measuring every input's largest value costs two passes over it."""
        part = PairedStats.empty(layer)
        with np.errstate(invalid="ignore", over="ignore"):  # overflow, or Inf activations (reported per layer later)
            part._merge(x_quantized, x_float, layer, mask, skip_error)
        shift = 0
        if not part.finite:
            shift = max(overflow_shift(x) for x in (x_quantized, x_float, skip_error) if x is not None)
        if shift:
            part = PairedStats.empty(layer)
            scaled = [None if x is None else np.ldexp(x, -shift).astype(np.float32)
                      for x in (x_quantized, x_float, skip_error)]
            part._merge(scaled[0], scaled[0] if x_float is x_quantized else scaled[1], layer, mask, scaled[2])
        self._add_scaled(part, shift)

    @property
    def finite(self) -> bool:
        return all(np.isfinite(total).all() for total in (self.gram, self.cross, self.sum_quantized, self.sum_float,
                                                          self.skip_cross, self.skip_sum) if total is not None) and (
            self.images is None or self.images.finite)

    def settle(self) -> None:
        """Fold the pending image sums of a small-map depthwise layer into the paired sums (once, after the
        last batch: ``paired_image_gram``); every reader of the sums calls it."""
        if self.images is not None:
            with np.errstate(invalid="ignore", over="ignore"):  # Inf activations are reported per layer later
                for total, folded in zip((self.gram, self.cross, self.sum_quantized, self.sum_float),
                                         self.images.folded(self.geometry), strict=True):
                    total += folded
            self.images = None

    def _add_scaled(self, part: PairedStats, shift: int) -> None:
        """Add sums of inputs that were divided by ``2**shift``."""
        self.gram += np.ldexp(part.gram, 2 * shift)
        self.cross += np.ldexp(part.cross, 2 * shift)
        self.sum_quantized += np.ldexp(part.sum_quantized, shift)
        self.sum_float += np.ldexp(part.sum_float, shift)
        self.rows += part.rows
        self.samples += part.samples
        if part.images is not None:
            if self.images is not None and self.geometry != part.geometry:  # the map size changed: fold what came
                self.settle()
            if self.images is None:
                self.images, self.geometry = part.images.zeros_like(), part.geometry
            self.images.add(part.images, shift)
        if part.skip_cross is not None:
            if self.skip_cross is None:
                self.skip_cross, self.skip_sum = np.zeros_like(part.skip_cross), np.zeros_like(part.skip_sum)
            self.skip_cross += np.ldexp(part.skip_cross, 2 * shift)
            self.skip_sum += np.ldexp(part.skip_sum, shift)

    def _merge(self, x_quantized: np.ndarray, x_float: np.ndarray, layer: Layer, mask: np.ndarray | None,
               skip_error: np.ndarray | None) -> None:
        self.samples += x_quantized.shape[0]
        xq, xf = token_rows(x_quantized, layer, mask), token_rows(x_float, layer, mask)
        if skip_error is not None:
            self._add_skip(xq, token_rows(skip_error, layer, mask), layer)
        if x_quantized is x_float:  # nothing rounded above this layer yet: one Gram, which is also the cross
            self._add_same(xq, layer)
            return
        sums = PairedSums(self.gram, self.cross, self.sum_quantized, self.sum_float)
        if is_pointwise(layer):
            self.rows += add_paired_pointwise(sums, xq, xf)
        elif layer.op_type == "Conv" and xq.ndim == 4 and xq.shape[1] == layer.groups and image_gram.fits(xq.shape[2:]):
            self.geometry = ImageGeometry.of(xq.shape[2:], layer.conv)
            self.images = ImageSums.of_batch(xq, xf)
            self.rows += xq.shape[0] * self.geometry.rows
        elif layer.op_type == "Conv":
            self.rows += add_paired_conv(sums, xq, xf, layer.conv, layer.groups)
        else:
            self.rows += add_paired_columns(sums, unfold_columns(layer, xq), unfold_columns(layer, xf))

    def _add_same(self, x: np.ndarray, layer: Layer) -> None:
        """Both streams are ``x``: the default's Gram kernel once, added to the Gram and the cross alike."""
        gram, row_sum = np.zeros_like(self.gram), np.zeros_like(self.sum_quantized)
        if is_pointwise(layer):
            add_pointwise(gram, row_sum, x)
            rows = x.size // x.shape[1]
        elif layer.op_type == "Conv":
            rows = add_conv(gram, row_sum, x, layer.conv, layer.groups)
        else:
            columns = unfold_columns(layer, x)
            add_columns(gram, row_sum, columns)
            rows = columns.shape[2]
        self.gram += gram
        self.cross += gram
        self.sum_quantized += row_sum
        self.sum_float += row_sum
        self.rows += rows

    def _add_skip(self, xq: np.ndarray, error: np.ndarray, layer: Layer) -> None:
        """Add ``x~ e^T`` over rows that are the same pixels or tokens in the input and in the output."""
        out = layer.out_channels
        if layer.op_type == "Conv":  # pointwise: (N, d, *spatial) and (N, out, *spatial)
            rows_q = xq.reshape(xq.shape[0], xq.shape[1], -1).transpose(1, 0, 2).reshape(xq.shape[1], -1)
            rows_e = error.reshape(error.shape[0], out, -1).transpose(1, 0, 2).reshape(out, -1)
            cross, total = rows_q @ rows_e.T, rows_e.sum(axis=1, dtype=np.float64)
        else:
            rows_q, rows_e = xq.reshape(-1, xq.shape[-1]), error.reshape(-1, out)
            cross, total = rows_q.T @ rows_e, rows_e.sum(axis=0, dtype=np.float64)
        if self.skip_cross is None:
            self.skip_cross, self.skip_sum = np.zeros((layer.fan_in, out)), np.zeros(out)
        self.skip_cross += cross
        self.skip_sum += total

    def skip_covariance(self, centred: bool) -> np.ndarray | None:
        """``cov(x~, e)`` (d, out) for a residual layer, or None."""
        if self.skip_cross is None:
            return None
        self.settle()
        n = max(self.rows, 1)
        cov = self.skip_cross / n
        return cov - np.outer(self.mean_quantized[0], self.skip_sum / n) if centred else cov

    @property
    def mean_quantized(self) -> np.ndarray:
        self.settle()
        return self.sum_quantized / max(self.rows, 1)

    @property
    def mean_float(self) -> np.ndarray:
        self.settle()
        return self.sum_float / max(self.rows, 1)

    def covariances(self, centred: bool) -> tuple[np.ndarray, np.ndarray]:
        """``(S, C)``: the second moments of x~ and of (x~, x) per row, centred when a bias takes the means."""
        self.settle()
        n = max(self.rows, 1)
        S, C = self.gram / n, self.cross / n
        if centred:
            mq, mf = self.mean_quantized, self.mean_float
            S = centred_gram(S, mq)
            C = C - mq[:, :, None] * mf[:, None, :]
        return S, C


def compensated_bias_shift(W: np.ndarray, Q: np.ndarray, stats: PairedStats) -> np.ndarray:
    """``W mu - Q mu~`` per output channel from a layer's paired statistics (``passes.compensation``)."""
    skip_mean = None if stats.skip_sum is None else stats.skip_sum / max(stats.rows, 1)
    return output_mean_shift(W, Q, stats.mean_float, stats.mean_quantized, skip_mean)


def layer_ancestry(graph: GraphModel, layers: list[Layer]) -> Callable[[str], set[str]]:
    """A function giving the names of the layers a tensor depends on (memoised)."""
    names = {layer.name for layer in layers}
    upstream: dict[str, set[str]] = {}

    def layers_above(tensor: str) -> set[str]:
        if tensor in upstream:
            return upstream[tensor]
        found: set[str] = set()
        stack, seen = [tensor], set()
        while stack:
            name = stack.pop()
            node = graph.producer(name)
            if node is None or name in seen:
                continue
            seen.add(name)
            if node.name in names:
                found.add(node.name)
            stack.extend(t.name for t in node.inputs if t.name)
        upstream[tensor] = found
        return found

    return layers_above


def stages(model: onnx.ModelProto | GraphModel, layers: list[Layer]) -> list[list[Layer]]:
    """Split the layers (in graph order) into stages whose inputs do not depend on a layer of the same stage,
    so a stage's layers can be captured together once the earlier stages are quantized."""
    layers_above = layer_ancestry(as_graph(model), layers)
    result: list[list[Layer]] = []
    for layer in layers:
        if result and not (layers_above(layer.activation) & {item.name for item in result[-1]}):
            result[-1].append(layer)
        else:
            result.append([layer])
    return result


def residual_skips(model: onnx.ModelProto | GraphModel, layers: list[Layer]) -> dict[str, str]:
    """``{layer: skip tensor}`` for the layers whose output (after at most one constant bias Add) is added to
    another activation, the skip whose error the layer can absorb; only where input rows are output rows
    (pointwise Conv, MatMul, Gemm with alpha 1 and untransposed input) and the skip depends on some layer."""
    graph = as_graph(model)
    layers_above = layer_ancestry(graph, layers)
    skips = {}
    for layer in layers:
        node = graph.node(layer.name)
        if not _rows_align(layer, node):
            continue
        tensor = node.outputs[0].name
        after = graph.consumers(tensor)
        if len(after) == 1 and after[0].op == "Add" and any(_is_constant(graph, t.name) for t in after[0].inputs):
            tensor = after[0].outputs[0].name  # a MatMul's bias
            after = graph.consumers(tensor)
        if len(after) != 1 or after[0].op != "Add" or len(after[0].inputs) != 2:
            continue
        other = [t.name for t in after[0].inputs if t.name != tensor]
        if len(other) == 1 and not _is_constant(graph, other[0]) and layers_above(other[0]):
            skips[layer.name] = other[0]
    return skips


def _is_constant(graph: GraphModel, name: str) -> bool:
    """An initializer or a Constant node's output."""
    producer = graph.producer(name)
    return graph.constant(name) is not None or (producer is not None and producer.op == "Constant")


def _rows_align(layer: Layer, node: gs.Node) -> bool:
    """Each input row of the layer is one row (pixel or token) of its output."""
    if layer.op_type == "Conv":
        return is_pointwise(layer)
    if layer.op_type == "Gemm":
        return not layer.trans_a and node.attrs.get("alpha", 1.0) == 1.0
    return layer.op_type == "MatMul"


@dataclass
class Stage:
    """One stage: layers captured together, and the skips whose error is final when it is captured (every
    layer a skip depends on is in an earlier stage) as ``{layer: skip tensor}``."""

    layers: list[Layer]
    skips: dict[str, str]

    @property
    def needs(self) -> list[str]:
        """The tensors the stage reads: its layers' inputs, then the skips."""
        return list(dict.fromkeys([layer.activation for layer in self.layers] + list(self.skips.values())))


def stage_plan(model: onnx.ModelProto | GraphModel, layers: list[Layer]) -> list[Stage]:
    """The stages in rounding order with their ready skips."""
    graph = as_graph(model)
    skips, layers_above = residual_skips(graph, layers), layer_ancestry(graph, layers)
    plan, rounded = [], set()
    for group in stages(graph, layers):
        plan.append(Stage(group, {layer.name: skips[layer.name] for layer in group
                                  if layer.name in skips and layers_above(skips[layer.name]) <= rounded}))
        rounded |= {layer.name for layer in group}
    return plan


class StageCapture:
    """Runs the model segment by segment (``segments.py``) on two streams of the same batches, the float model
    and the model with the layers rounded so far, keeping each stream's cut between stages in a ``BatchStore``
    (spilled under ``folder`` past its limit): every node runs once per stream, and memory stays bounded. The
    stores spill into one shared file, and each batch of a cut is released once its stage has read it, so the next
    cut's batches are written over its pages: the file grows to what is alive at once, not to four whole cuts."""

    def __init__(self, model: onnx.ModelProto | GraphModel, replaced_names: list[str], plan: list[Stage],
                 feeds: Iterable[Feed], folder: Path, store_bytes: int = STORE_BYTES) -> None:
        graph = as_graph(model)
        self.float_tensors = {name: graph.array(name) for name in replaced_names}
        self.fed_model = GraphModel(weights_as_inputs(graph.template, replaced_names))  # walked per segment
        self.parameters = set(replaced_names)
        self.mask_name = attention_mask_name(model_inputs(graph.template))
        self.segments = iter(plan_segments(self.fed_model, [stage.needs for stage in plan], self.parameters))
        self.feeds, self.folder, self.store_bytes = feeds, folder, store_bytes
        self.float_cut: BatchStore | None = None  # None: the feeds are the cut (first stage)
        self.quantized_cut: BatchStore | None = None  # None: the same as the float cut (nothing rounded yet)
        self.spare: list[BatchStore] = []  # stores read to the end and cleared, for the next cuts
        self.spill = SpillFile(folder)
        self.masks: list[np.ndarray | None] = []
        self.samples = 0
        self.threads = ThreadPoolExecutor(2, thread_name_prefix="onnxq-stream")  # the float and quantized runs

    def paired_stats(self, stage: Stage, replaced: dict[str, np.ndarray]) -> dict[str, PairedStats]:
        """Statistics of the stage's inputs, float model against the model with ``replaced`` tensors, and of
        the error of the stage's skips; moves both streams to the next boundary."""
        segment = next(self.segments)
        stats = {layer.name: PairedStats.empty(layer) for layer in stage.layers}
        next_float = self._new_store()
        next_quantized = self._new_store() if replaced else None
        sinks = (output_sink(next_float, segment), output_sink(next_quantized, segment) if replaced else None)
        for index, (floats, quantized) in enumerate(self._values(SegmentRunner(self, segment), replaced, sinks)):
            for layer in stage.layers:
                xq = np.asarray(quantized[layer.activation], dtype=np.float32)
                xf = np.asarray(floats[layer.activation], dtype=np.float32)
                skip = stage.skips.get(layer.name)
                error = _skip_error(np.asarray(floats[skip], dtype=np.float32),
                                    np.asarray(quantized[skip], dtype=np.float32), xq, layer) if skip else None
                stats[layer.name].merge(xq, xf, layer, self.masks[index], error)
            next_float.append({name: floats[name] for name in segment.cut})
            if next_quantized is not None:
                next_quantized.append({name: quantized[name] for name in segment.cut})
            self._release(index)
        self._advance(next_float, next_quantized)
        for layer_stats in stats.values():
            layer_stats.settle()
        return stats

    def _values(self, runner: SegmentRunner, replaced: dict[str, np.ndarray], sinks: tuple[Sink, Sink | None]
                ) -> Iterator[tuple[dict, dict]]:
        """Both streams' tensors (float, quantized), batch by batch. Each stream's segment runs on its own thread
        (one onnxruntime thread each: no hand-offs between them), and the next batch's runs go on while the
        caller adds up this one's statistics."""

        def submit(float_cut: Feed, quantized_cut: Feed) -> tuple[Future, Future | None]:
            runner.prepare(float_cut, replaced)
            return (self.threads.submit(runner.run, float_cut, {}, sinks[0]),
                    self.threads.submit(runner.run, quantized_cut, replaced, sinks[1]) if replaced else None)

        def results(runs: tuple[Future, Future | None]) -> tuple[dict, dict]:
            floats = runs[0].result()
            return floats, floats if runs[1] is None else runs[1].result()

        pending = None
        for cuts in self._cuts():
            runs = submit(*cuts)
            if pending is not None:
                yield results(pending)
            pending = runs
        if pending is not None:
            yield results(pending)

    def _cuts(self) -> Iterator[tuple[Feed, Feed]]:
        """Both streams' cut, batch by batch; on the first stage, the feeds (whose masks are kept)."""
        if self.float_cut is None:
            for feed in self.feeds:
                self.masks.append(batch_mask(feed, self.mask_name))
                self.samples += feed_samples(feed)
                yield feed, feed
            return
        quantized = self.quantized_cut or self.float_cut
        for index in range(len(self.float_cut)):
            float_cut = self.float_cut[index]
            yield float_cut, float_cut if quantized is self.float_cut else quantized[index]

    def _new_store(self) -> BatchStore:
        return self.spare.pop() if self.spare else BatchStore(self.folder, self.store_bytes, self.spill)

    def _release(self, index: int) -> None:
        """Batch ``index`` of the cut being read is done with (both streams ran on it, its statistics are added and
        what goes on is in the next cut): its pages go to the batches written next."""
        for store in {id(store): store for store in (self.float_cut, self.quantized_cut) if store is not None}.values():
            store.release(index)

    def _advance(self, next_float: BatchStore, next_quantized: BatchStore | None) -> None:
        """Keep the new boundary; the one just read is cleared for the next stage to write over."""
        for store in (self.float_cut, self.quantized_cut):
            if store is not None:
                store.clear()
                self.spare.append(store)
        self.float_cut, self.quantized_cut = next_float, next_quantized

    def close(self) -> None:
        """Stop the stream threads and delete every store's file."""
        self.threads.shutdown(cancel_futures=True)
        release_frames()
        for store in (self.float_cut, self.quantized_cut, *self.spare):
            if store is not None:
                store.close()
        self.spill.close()


Sink = Callable[[str, tuple[int, ...], np.dtype], np.ndarray]  # (output, shape, dtype) -> array to write it into


def output_sink(store: BatchStore, segment: Segment) -> Sink:
    """Where a stream's segment outputs go: the tensors of the next cut straight into the store (onnxruntime
    writes a spilled one into the store's file), the others into fresh arrays."""
    cut = set(segment.cut)

    def output(name: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        return store.reserve(shape, dtype) if name in cut else np.empty(shape, dtype)

    return output


class SegmentRunner:
    """One segment's onnxruntime sessions, one per stream (float, quantized; one thread each: each stream runs on
    its own) with that stream's weights as constants, which onnxruntime pre-packs (fed as inputs, EfficientNet-Lite0's
    weights made each pass 2.8x slower). Made on the first batch (the cut's types come from the arrays). Once a
    cut of the same shapes has run, the outputs' shapes are known, and later runs write their outputs into the
    arrays a ``Sink`` gives (no copy out of onnxruntime)."""

    def __init__(self, capture: StageCapture, segment: Segment) -> None:
        self.capture, self.segment = capture, segment
        self.sessions: dict[bool, ort.InferenceSession] = {}  # by stream: True the quantized one
        self.output_types: dict[tuple, list[tuple[tuple[int, ...], np.dtype]]] = {}  # by the cut's shapes

    def prepare(self, cut: Feed, replaced: dict[str, np.ndarray]) -> None:
        """Make the streams' sessions for cuts typed like this one (the quantized one when ``replaced`` holds
        rounded tensors), unless made already."""
        if self.sessions or not self.segment.outputs:
            return
        graph_types = {v.name: v.type for v in self.capture.fed_model.template.graph.input}
        types = {name: graph_types.get(name) or onnx.helper.make_tensor_type_proto(
            onnx.helper.np_dtype_to_tensor_dtype(np.asarray(cut[name]).dtype), None)
            for name in self.segment.inputs}
        streams = {False: self.capture.float_tensors}
        if replaced:
            streams[True] = {**self.capture.float_tensors, **replaced}
        for stream, weights in streams.items():
            model = segment_model(self.capture.fed_model, self.segment, types, self.capture.parameters, weights)
            self.sessions[stream] = make_session(model, threads=1, shared_arena=True)

    def run(self, cut: Feed, replaced: dict[str, np.ndarray], sink: Sink) -> dict[str, np.ndarray]:
        """The cut's tensors and the segment's outputs, on the quantized stream when ``replaced`` is not empty."""
        values = dict(cut)
        if not self.segment.outputs:
            return values
        self.prepare(cut, replaced)
        session = self.sessions[bool(replaced)]
        given = {name: np.asarray(cut[name]) for name in self.segment.inputs}
        key = tuple((name, value.shape, value.dtype.str) for name, value in given.items())
        known = self.output_types.get(key)
        if known is None:
            outputs = session.run(self.segment.outputs, given)
            self.output_types[key] = [(output.shape, output.dtype) for output in outputs]
        else:
            outputs = [sink(name, shape, dtype) for name, (shape, dtype) in zip(self.segment.outputs, known,
                                                                                strict=True)]
            run_into(session, given, self.segment.outputs, outputs)
        values.update(zip(self.segment.outputs, outputs, strict=True))
        return values


def _skip_error(skip_float: np.ndarray, skip_quantized: np.ndarray, x: np.ndarray, layer: Layer
                ) -> np.ndarray | None:
    """``s - s~`` when the skip has the layer output's shape (a broadcast Add is left alone)."""
    out_shape = ((x.shape[0], layer.out_channels, *x.shape[2:]) if layer.op_type == "Conv"
                 else (*x.shape[:-1], layer.out_channels))
    if skip_float.shape != out_shape:
        return None
    return skip_float - skip_quantized


def round_sequentially(model: onnx.ModelProto, layers: list[Layer], feeds: Iterable[Feed],
                       round_stage: Callable[[list[tuple[Layer, np.ndarray, np.ndarray, int]]], dict],
                       slots: dict[str, BiasSlot], on_stage: Callable[[int], None] | None = None,
                       store_bytes: int = STORE_BYTES) -> dict:
    """Round stage after stage: capture the stage's inputs (float and quantized-so-far), compute each layer's
    compensated target, round them with ``round_stage([(layer, W*, S, rows)])`` -> {name: (qw, error)}, set the
    bias shifts of the layers in ``slots`` and feed their quantized tensors to the next stages. The feeds are
    read once; the activations kept between stages go to a temporary folder past ``store_bytes`` per store."""
    inside = [layer.name for layer in layers if layer.where]
    if inside:  # stages are cut in the top-level graph
        raise OnnxqError(f"--sequential cannot round layers inside If/Loop/Scan bodies ({', '.join(inside[:3])}"
                         f"{' and more' if len(inside) > 3 else ''}); drop --sequential, or keep them in float "
                         "with --nodes_to_exclude")
    graph = GraphModel(model)  # unedited: its template is ``model``
    plan = stage_plan(graph, layers)
    names = [layer.weight for layer in layers] + [slot.tensor for slot in slots.values()]
    replaced: dict[str, np.ndarray] = {}
    results: dict = {}
    # one BLAS thread: the paired GEMMs are small (a pointwise Conv's are per sample), and multithreaded BLAS
    # on them cost 4x the CPU time on a loaded 2-core machine (threads spinning while their partner waits)
    with threadpool_limits(1), tempfile.TemporaryDirectory(prefix="onnxq-sequential-") as folder:
        capture = StageCapture(graph, names, plan, feeds, Path(folder), store_bytes)
        try:
            for stage in plan:
                paired = capture.paired_stats(stage, replaced)
                work, weights = [], {}
                for layer in stage.layers:
                    W = weights[layer.name] = layer.matrix(capture.float_tensors[layer.weight]).astype(np.float64)
                    centred = layer.name in slots
                    S, C = paired[layer.name].covariances(centred)
                    rows = paired[layer.name].rows
                    target = compensated_target(W, S, C, rows, skip=paired[layer.name].skip_covariance(centred))
                    work.append((layer, target, S, rows))
                rounded = round_stage(work)
                for layer in stage.layers:
                    qw, error = rounded[layer.name]
                    if layer.name in slots:
                        qw.bias_shift = compensated_bias_shift(weights[layer.name], qw.dequantize(),
                                                               paired[layer.name])
                    results[layer.name] = (qw, error)
                    replaced.update(replacement_tensors(layer, qw, slots, capture.float_tensors))
                if on_stage:
                    on_stage(len(stage.layers))
        finally:
            capture.close()
    return results
