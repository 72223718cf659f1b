"""A loss oracle for mixed precision: the model's loss with any mix of float and quantized weights.

The quantizable weights become graph inputs of one onnxruntime session, so each evaluation only feeds
different weight arrays: no session is rebuilt. Whole allocations (the verification) and the float reference
instead run a session with every weight a constant, which onnxruntime pre-packs (a third less CPU per pass on
SqueezeNet, for a session build of a few milliseconds). The loss is label-free by default: the mean KL divergence
of the perturbed model's softmax from the float model's on a fixed calibration subset (cross-entropy
when labels are given; mean squared error relative to the float output for non-classifiers). Weights and graph
inputs are looked up on the model's ``GraphModel``; ``threads`` sizes every session it makes (a Ray worker gets its
share of the node's cores, so worker processes do not oversubscribe them).
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import numpy_helper

from onnxq.calibration.capture import make_session
from onnxq.data.sources import Feed
from onnxq.graph.bias import BiasSlot, replacement_tensors
from onnxq.graph.layers import Layer
from onnxq.graph.model import GraphModel
from onnxq.passes import QuantWeight

if TYPE_CHECKING:
    import onnxruntime as ort


def weights_as_inputs(model: onnx.ModelProto, weights: list[str], graph: GraphModel | None = None
                      ) -> onnx.ModelProto:
    """A copy of the model in which the named initializers are graph inputs instead (``graph``: the model's
    ``GraphModel``, for the lookups; built here when not given)."""
    graph = graph or GraphModel(model)
    moved = [name for name in dict.fromkeys(weights) if graph.constant(name) is not None]
    out = onnx.ModelProto()
    out.CopyFrom(model)
    wanted = set(moved)
    kept = [t for t in out.graph.initializer if t.name not in wanted]
    del out.graph.initializer[:]
    out.graph.initializer.extend(kept)
    existing = set(graph.input_names)
    for name in moved:
        if name not in existing:
            tensor = graph.tensor_proto(name)
            out.graph.input.append(onnx.helper.make_tensor_value_info(name, tensor.data_type, tensor.dims))
    return out


def with_constants(model: onnx.ModelProto, tensors: dict[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of the model in which the named initializers hold the given arrays."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for tensor in out.graph.initializer:
        if tensor.name in tensors:
            tensor.CopyFrom(numpy_helper.from_array(tensors[tensor.name], tensor.name))
    return out


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


class LossOracle:
    """``loss({weight_name: array})``: the model's loss with those weights replaced, on fixed samples."""

    def __init__(self, model: onnx.ModelProto, layers: list[Layer], feeds: list[Feed],
                 labels: np.ndarray | None = None, slots: dict[str, BiasSlot] | None = None,
                 threads: int = 0) -> None:
        self.model = model
        self.graph = GraphModel(model)
        self.slots = slots or {}
        self.threads = threads  # onnxruntime intra-op threads per session (0: its default, every core)
        names = [layer.weight for layer in layers] + [slot.tensor for slot in self.slots.values()]
        self.float_weights = {name: self.graph.array(name) for name in names}
        self.feeds = feeds
        self.labels = labels
        self.evaluations = 0

    @cached_property
    def reference(self) -> np.ndarray:
        """The float model's first output over all samples (one pass, on first use)."""
        return self.constant_outputs({})

    def share_reference(self, other: LossOracle) -> int:
        """Take the float outputs of the leading batches this oracle shares with ``other`` (the same arrays, e.g.
        the verification samples that begin with the sensitivity samples) instead of running them again; the
        rest run here. Call before the reference is used; returns the samples taken over."""
        shared = 0
        for mine, theirs in zip(self.feeds, other.feeds, strict=False):
            if mine.keys() != theirs.keys() or not all(np.array_equal(mine[k], theirs[k]) for k in mine):
                break
            shared += 1
        if shared == 0:
            return 0
        rows = sum(len(next(iter(feed.values()))) for feed in self.feeds[:shared])
        rest = [self.constant_outputs({}, self.feeds[shared:])] if shared < len(self.feeds) else []
        self.__dict__["reference"] = np.concatenate([other.reference[:rows], *rest])
        return rows

    @cached_property
    def classifier(self) -> bool:
        return self.reference.ndim == 2 and self.reference.shape[1] > 1

    @cached_property
    def reference_log_p(self) -> np.ndarray | None:
        return log_softmax(self.reference.astype(np.float64)) if self.classifier else None

    @property
    def probabilities(self) -> np.ndarray:
        """The float model's softmax output per sample (for the Fisher-based cross-term estimator)."""
        return np.exp(self.reference_log_p)

    def replacement(self, layer: Layer, qw: QuantWeight) -> dict[str, np.ndarray]:
        """The tensors that put one quantized layer into the model: its weight, and its corrected bias."""
        return replacement_tensors(layer, qw, self.slots, self.float_weights)

    @cached_property
    def session(self) -> ort.InferenceSession:
        """The session with every quantizable weight (and corrected bias) a graph input, built on first use."""
        return make_session(weights_as_inputs(self.model, list(self.float_weights), self.graph), self.threads,
                            shared_arena=True)

    def outputs(self, replaced: dict[str, np.ndarray]) -> np.ndarray:
        """The first model output over all samples, with some weights replaced (fed to the shared session)."""
        weights = {**self.float_weights, **replaced}
        output = self.session.get_outputs()[0].name
        self.evaluations += 1
        return np.concatenate([self.session.run([output], {**feed, **weights})[0] for feed in self.feeds])

    def constant_outputs(self, replaced: dict[str, np.ndarray], feeds: list[Feed] | None = None) -> np.ndarray:
        """The same as :meth:`outputs`, on a session built with the replaced weights as constants: cheaper
        per pass when the same weights run once over all samples (whole allocations, the reference)."""
        return np.concatenate(list(self.constant_batches(replaced, feeds)))

    def constant_batches(self, replaced: dict[str, np.ndarray], feeds: list[Feed] | None = None
                         ) -> Iterator[np.ndarray]:
        """:meth:`constant_outputs` batch by batch (a caller may stop early)."""
        session = self.constant_session(replaced)
        output = session.get_outputs()[0].name
        self.evaluations += 1
        for feed in self.feeds if feeds is None else feeds:
            yield session.run([output], feed)[0]

    def constant_session(self, replaced: dict[str, np.ndarray]) -> ort.InferenceSession:
        """A session of the model with the replaced weights as constants."""
        return make_session(with_constants(self.model, replaced) if replaced else self.model, self.threads,
                            shared_arena=True)

    def loss_of_outputs(self, outputs: np.ndarray) -> float:
        """KL(float || perturbed) per sample, averaged; cross-entropy with labels; else relative MSE."""
        return float(self.sample_losses(outputs).mean())

    def sample_losses(self, outputs: np.ndarray, start: int = 0) -> np.ndarray:
        """The loss of each sample of ``outputs``, the outputs of samples ``start, start + 1, ...``: their mean
        over all samples is :meth:`loss_of_outputs`."""
        rows = slice(start, start + len(outputs))
        reference = self.reference[rows]
        if not self.classifier:
            scale = max(float((self.reference**2).mean()), 1e-30)
            return ((outputs - reference) ** 2).reshape(len(outputs), -1).mean(axis=1) / scale
        log_q = log_softmax(outputs.astype(np.float64))
        if self.labels is not None:
            return -log_q[np.arange(len(log_q)), self.labels[rows]]
        log_p = self.reference_log_p[rows]
        return (np.exp(log_p) * (log_p - log_q)).sum(axis=1)

    def loss(self, replaced: dict[str, np.ndarray]) -> float:
        return self.loss_of_outputs(self.outputs(replaced))

    def constant_sample_losses(self, replaced: dict[str, np.ndarray]) -> Iterator[np.ndarray]:
        """The per-sample losses of one whole allocation (weights as constants), batch by batch."""
        start = 0
        for outputs in self.constant_batches(replaced):
            yield self.sample_losses(outputs, start)
            start += len(outputs)

    def constant_loss(self, replaced: dict[str, np.ndarray]) -> float:
        """The loss of one whole allocation, run on a session with its weights as constants."""
        return self.loss_of_outputs(self.constant_outputs(replaced))
