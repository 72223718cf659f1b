"""A loss oracle for mixed precision: the model's loss with any mix of float and quantized weights.

The quantizable weights become graph inputs of one onnxruntime session, so each evaluation only feeds
different weight arrays: no session is rebuilt. The loss is label-free by default: the mean KL divergence
of the perturbed model's softmax from the float model's on a fixed calibration subset (cross-entropy
when labels are given; mean squared error relative to the float output for non-classifiers).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from onnxq.calibration.capture import make_session
from onnxq.data.sources import Feed
from onnxq.graph.bias import BiasSlot, replacement_tensors
from onnxq.graph.layers import Layer
from onnxq.passes import QuantWeight


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
        self.session = make_session(weights_as_inputs(model, list(self.float_weights)))
        self.output = self.session.get_outputs()[0].name
        self.feeds = feeds
        self.labels = labels
        self.evaluations = 0
        self.reference = self.outputs({})
        self.classifier = self.reference.ndim == 2 and self.reference.shape[1] > 1
        self.reference_log_p = log_softmax(self.reference.astype(np.float64)) if self.classifier else None

    @property
    def probabilities(self) -> np.ndarray:
        """The float model's softmax output per sample (for the Fisher-based cross-term estimator)."""
        return np.exp(self.reference_log_p)

    def replacement(self, layer: Layer, qw: QuantWeight) -> dict[str, np.ndarray]:
        """The tensors that put one quantized layer into the model: its weight, and its corrected bias."""
        return replacement_tensors(layer, qw, self.slots, self.float_weights)

    def outputs(self, replaced: dict[str, np.ndarray]) -> np.ndarray:
        """The first model output over all samples, with some weights replaced."""
        weights = {**self.float_weights, **replaced}
        self.evaluations += 1
        return np.concatenate([self.session.run([self.output], {**feed, **weights})[0] for feed in self.feeds])

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
