"""Per-layer diagnostics of a quantized model: output SQNR, weight error, size share and sensitivity.

Like onnxruntime's ``qdq_loss_debug``: every quantized layer's output tensor is exposed as a graph output
of both the quantized model and the float reference, both run on the same feeds, and the signal and noise
energies are summed per layer over the batches (memory: one batch of layer outputs). The reference is
prepared exactly as ``quantize`` prepared it (BatchNorm folded), so tensor and weight names match the
quantized graph. The layers come from the ``onnxq.layers`` metadata written by the export.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from onnxq.allocation.mixed import MixedPlan
from onnxq.calibration.capture import CaptureEngine
from onnxq.data.images import ImagePreprocessing
from onnxq.data.sources import (
    Feed,
    batches,
    declared_preprocessing,
    default_preprocessing,
    feed_samples,
    feeds_from,
    model_inputs,
)
from onnxq.errors import OnnxqError
from onnxq.graph.layers import Layer, find_layers
from onnxq.graph.loading import load_model
from onnxq.graph.prepare import prepare
from onnxq.passes import relative_error

DIAGNOSTIC_BATCH = 4  # samples per run: bounds memory to one small batch of every layer's output


@dataclass
class QuantizedLayer:
    """A quantized layer as the exported graph holds it: the node computing it, its output, codes and widths."""

    name: str
    op_type: str
    output: str
    weight: str
    bits: int
    stored_bits: int
    holder: onnx.NodeProto  # the DequantizeLinear (or MatMulNBits) node that reads the stored codes


def quantized_layers(model: onnx.ModelProto) -> list[QuantizedLayer]:
    """The quantized layers listed in the model's ``onnxq.layers`` metadata, in graph order."""
    meta = {p.key: p.value for p in model.metadata_props}
    if "onnxq.layers" not in meta:
        raise OnnxqError("the model has no onnxq.layers metadata; pass a model written by onnxq quantize")
    readers: dict[str, onnx.NodeProto] = {}
    for node in model.graph.node:
        for tensor in node.input:
            readers.setdefault(tensor, node)
    layers = []
    for name, info in json.loads(meta["onnxq.layers"]).items():
        weight = info["weight"]
        holder = readers.get(f"{weight}_quantized") or readers.get(f"{weight}_Q4")
        node = readers.get(holder.output[0]) if holder is not None and holder.op_type == "DequantizeLinear" else holder
        if node is None:
            raise OnnxqError(f"layer {name} of the onnxq.layers metadata is not in the graph; "
                             "was the model edited after quantization?")
        layers.append(QuantizedLayer(name, node.op_type, node.output[0], weight, int(info["bits"]),
                                     int(info["stored_bits"]), holder))
    return layers


def dequantize_linear(codes: np.ndarray, scale: np.ndarray, zero: np.ndarray, axis: int,
                      block_size: int = 0) -> np.ndarray:
    """DequantizeLinear's arithmetic in float32: per tensor, per channel along ``axis``, or per block of it."""
    if block_size:
        scale, zero = (np.repeat(v, block_size, axis=axis).take(np.arange(codes.shape[axis]), axis=axis)
                       for v in (scale, zero))
    elif scale.ndim == 1:
        shape = [1] * codes.ndim
        shape[axis] = -1
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    return (codes - zero) * scale


def dequantized_tensor(model: onnx.ModelProto, layer: QuantizedLayer) -> np.ndarray:
    """The weight the quantized model computes with, rebuilt from its stored initializers."""
    inits = {t.name: t for t in model.graph.initializer if t.name.startswith(layer.weight)}
    arrays = [numpy_helper.to_array(inits[name]) if name in inits else None for name in layer.holder.input[1:]]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in layer.holder.attribute}
    if layer.holder.op_type == "MatMulNBits":
        from onnxq.export.nbits import dequantize_nbits  # only models written with MatMulNBits need it

        B = numpy_helper.to_array(inits[layer.holder.input[1]])
        zero = arrays[2] if len(arrays) > 2 else None
        return dequantize_nbits(B, arrays[1], zero, attrs["K"]).T  # (N, K) back to MatMul's [K, N] layout
    codes = numpy_helper.to_array(inits[layer.holder.input[0]]).astype(np.float32)
    scale = arrays[0].astype(np.float32)
    zero = arrays[1].astype(np.float32) if len(arrays) > 1 and arrays[1] is not None else np.zeros_like(scale)
    return dequantize_linear(codes, scale, zero, attrs.get("axis", 1), attrs.get("block_size", 0))


def weight_errors(W: np.ndarray, Q: np.ndarray, gram: np.ndarray | None) -> tuple[float, float | None]:
    """Relative reconstruction error ``|W-Q|^2/|W|^2``, and the Gram-weighted one when ``gram`` is given."""
    W64, Q64 = W.astype(np.float64), Q.astype(np.float64)
    plain = float(((W64 - Q64) ** 2).sum() / max(float((W64**2).sum()), 1e-300))
    return plain, (relative_error(W64, Q64, gram) if gram is not None else None)


def output_sqnr(quantized: onnx.ModelProto, reference: onnx.ModelProto, tensors: list[str],
                feeds: Iterable[Feed]) -> tuple[dict[str, float], int]:
    """SQNR (dB) of each named tensor of ``quantized`` against ``reference``, and the samples used."""
    engines = [CaptureEngine(m, tensors) for m in (reference, quantized)]
    signal, noise = np.zeros(len(tensors)), np.zeros(len(tensors))
    samples = 0
    for feed in feeds:
        expected, actual = (engine.values(feed) for engine in engines)
        for i, name in enumerate(tensors):
            ref64 = np.asarray(expected[name], dtype=np.float64)
            signal[i] += float((ref64**2).sum())
            noise[i] += float(((np.asarray(actual[name], dtype=np.float64) - ref64) ** 2).sum())
        samples += feed_samples(feed)
    with np.errstate(divide="ignore"):
        sqnr = np.where(noise > 0, 10 * np.log10(np.maximum(signal, 1e-300) / np.maximum(noise, 1e-300)), np.inf)
    return dict(zip(tensors, sqnr.tolist(), strict=True)), samples


def diagonal_sensitivity(plan: MixedPlan | None) -> dict[tuple[str, int], float]:
    """CLADO's single-layer sensitivity ``Omega[k, k]`` of each (layer, width) candidate, when measured."""
    if plan is None or plan.omega is None:
        return {}
    return {(name, int(bits)): float(v) for (name, bits), v in zip(plan.keys, np.diag(plan.omega), strict=True)}


def layer_diagnostics(quantized_path: str | Path, reference_path: str | Path, feeds: Iterable[Feed],
                      grams: dict[str, np.ndarray] | None = None, plan: MixedPlan | None = None) -> list[dict]:
    """One dict per quantized layer, in graph order: width, output SQNR, weight errors, size share, sensitivity.

    ``grams`` (layer name -> Gram matrix ``G x d x d`` or ``d x d``) adds the Gram-weighted error the
    rounding passes minimise; ``plan`` (a CLADO run's MixedPlan) adds the diagonal sensitivity.
    """
    quantized = load_model(quantized_path)
    reference = prepare(load_model(reference_path))
    layers = quantized_layers(quantized)
    produced = {o for n in reference.graph.node for o in n.output}
    tensors = [layer.output for layer in layers if layer.output in produced]
    sqnr, samples = output_sqnr(quantized, reference, tensors, feeds) if tensors else ({}, 0)
    views = {layer.name: layer for layer in find_layers(reference)[0]}
    weights = {t.name: t for t in reference.graph.initializer}
    total_bytes = file_size(Path(quantized_path))
    sensitivity = diagonal_sensitivity(plan)
    rows = []
    for layer in layers:
        W = numpy_helper.to_array(weights[layer.weight]).astype(np.float32)
        row = weight_row(layer, W, dequantized_tensor(quantized, layer), views.get(layer.name),
                         (grams or {}).get(layer.name))
        row.update(output_sqnr_db=sqnr.get(layer.output), samples=samples,
                   size_share=row["code_bytes"] / total_bytes if total_bytes else None,
                   sensitivity=sensitivity.get((layer.name, layer.bits)))
        rows.append(row)
    return rows


def weight_row(layer: QuantizedLayer, W: np.ndarray, Q: np.ndarray, view: Layer | None,
               gram: np.ndarray | None) -> dict:
    """A layer's static figures: identity, widths, weight errors (in the passes' matrix view) and code bytes."""
    matrix = view.matrix if view is not None else (lambda t: t.reshape(t.shape[0], -1))
    plain, weighted = weight_errors(matrix(W), matrix(Q), gram if view is not None else None)
    return {"name": layer.name, "op_type": layer.op_type, "output": layer.output, "shape": list(W.shape),
            "params": int(W.size), "bits": layer.bits, "stored_bits": layer.stored_bits,
            "weight_error": plain, "gram_error": weighted, "code_bytes": -(-W.size * layer.stored_bits // 8)}


def diagnostics_on_data(quantized_path: str | Path, reference_path: str | Path, data: Path,
                        preprocessing: ImagePreprocessing | None = None, samples: int = 16,
                        batch_size: int = DIAGNOSTIC_BATCH, grams: dict[str, np.ndarray] | None = None,
                        plan: MixedPlan | None = None) -> list[dict]:
    """:func:`layer_diagnostics` on the first ``samples`` samples of a data folder or file (any calib layout)."""
    reference = load_model(reference_path)
    inputs = model_inputs(reference)
    declared = declared_preprocessing(load_model(quantized_path)) or declared_preprocessing(reference)
    raw, _ = feeds_from(data, inputs, default_preprocessing(inputs, preprocessing, declared))
    feeds = batches(raw, inputs, batch_size, samples)
    return layer_diagnostics(quantized_path, reference_path, feeds, grams, plan)


def file_size(path: Path) -> int:
    """Bytes of a model file plus its external data file, if any."""
    data = path.parent / f"{path.name}.data"
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)
