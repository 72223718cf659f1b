"""A loss oracle for mixed precision: the model's loss with any mix of float and quantized weights.

The quantizable weights become graph inputs of one onnxruntime session, so each evaluation only feeds
different weight arrays: no session is rebuilt. Whole allocations (the verification) and the float reference
instead run a session with every weight a constant, which onnxruntime pre-packs (a third less CPU per pass on
SqueezeNet, for a session build of a few milliseconds). The loss is label-free by default: the mean KL divergence
of the perturbed model's softmax from the float model's on a fixed calibration subset (cross-entropy
when labels are given; mean squared error relative to the float output for non-classifiers).
"""

from __future__ import annotations

from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import numpy_helper

from onnxq.calibration.capture import make_session
from onnxq.data.sources import Feed
from onnxq.graph.bias import BiasSlot, replacement_tensors
from onnxq.graph.layers import Layer
from onnxq.passes import QuantWeight

if TYPE_CHECKING:
    import onnxruntime as ort


def weights_as_inputs(model: onnx.ModelProto, weights: list[str]) -> onnx.ModelProto:
    """A copy of the model in which the named initializers are graph inputs instead."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    wanted = set(weights)
    kept = [t for t in out.graph.initializer if t.name not in wanted]
    moved = [t for t in out.graph.initializer if t.name in wanted]
    del out.graph.initializer[:]
    out.graph.initializer.extend(kept)
    existing = {v.name for v in out.graph.input}
    for tensor in moved:
        if tensor.name not in existing:
            out.graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims))
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
                 labels: np.ndarray | None = None, slots: dict[str, BiasSlot] | None = None) -> None:
        inits = {t.name: t for t in model.graph.initializer}
        self.model = model
        self.slots = slots or {}
        names = [layer.weight for layer in layers] + [slot.tensor for slot in self.slots.values()]
        self.float_weights = {name: numpy_helper.to_array(inits[name]) for name in names}
        self.feeds = feeds
        self.labels = labels
        self.evaluations = 0
        self.reference = self.constant_outputs({})
        self.classifier = self.reference.ndim == 2 and self.reference.shape[1] > 1
        self.reference_log_p = log_softmax(self.reference.astype(np.float64)) if self.classifier else None

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
        return make_session(weights_as_inputs(self.model, list(self.float_weights)))

    def outputs(self, replaced: dict[str, np.ndarray]) -> np.ndarray:
        """The first model output over all samples, with some weights replaced (fed to the shared session)."""
        weights = {**self.float_weights, **replaced}
        output = self.session.get_outputs()[0].name
        self.evaluations += 1
        return np.concatenate([self.session.run([output], {**feed, **weights})[0] for feed in self.feeds])

    def constant_outputs(self, replaced: dict[str, np.ndarray]) -> np.ndarray:
        """The same as :meth:`outputs`, on a session built with the replaced weights as constants: cheaper
        per pass when the same weights run once over all samples (whole allocations, the reference)."""
        session = make_session(with_constants(self.model, replaced) if replaced else self.model)
        output = session.get_outputs()[0].name
        self.evaluations += 1
        return np.concatenate([session.run([output], feed)[0] for feed in self.feeds])

    def loss_of_outputs(self, outputs: np.ndarray) -> float:
        """KL(float || perturbed) per sample, averaged; cross-entropy with labels; else relative MSE."""
        if not self.classifier:
            return float(((outputs - self.reference) ** 2).mean() / max((self.reference**2).mean(), 1e-30))
        log_q = log_softmax(outputs.astype(np.float64))
        if self.labels is not None:
            return float(-log_q[np.arange(len(log_q)), self.labels].mean())
        p = np.exp(self.reference_log_p)
        return float((p * (self.reference_log_p - log_q)).sum(axis=1).mean())

    def loss(self, replaced: dict[str, np.ndarray]) -> float:
        return self.loss_of_outputs(self.outputs(replaced))

    def constant_loss(self, replaced: dict[str, np.ndarray]) -> float:
        """The loss of one whole allocation, run on a session with its weights as constants."""
        return self.loss_of_outputs(self.constant_outputs(replaced))
