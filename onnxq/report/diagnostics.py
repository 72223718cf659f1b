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
import onnx_graphsurgeon as gs

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
from onnxq.graph.model import GraphModel
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
    holder: gs.Node  # the DequantizeLinear (or MatMulNBits) node that reads the stored codes


def quantized_layers(graph: GraphModel) -> list[QuantizedLayer]:
    """The quantized layers listed in the model's ``onnxq.layers`` metadata, in graph order."""
    if "onnxq.layers" not in graph.metadata:
        raise OnnxqError("the model has no onnxq.layers metadata; pass a model written by onnxq quantize")
    layers = []
    for name, info in json.loads(graph.metadata["onnxq.layers"]).items():
        weight = info["weight"]
        holder = _first_reader(graph, f"{weight}_quantized") or _first_reader(graph, f"{weight}_Q4")
        node = _first_reader(graph, holder.outputs[0].name) if holder is not None and holder.op == "DequantizeLinear" \
            else holder
        if node is None:
            raise OnnxqError(f"layer {name} of the onnxq.layers metadata is not in the graph; "
                             "was the model edited after quantization?")
        layers.append(QuantizedLayer(name, node.op, node.outputs[0].name, weight, int(info["bits"]),
                                     int(info["stored_bits"]), holder))
    return layers


def _first_reader(graph: GraphModel, tensor: str) -> gs.Node | None:
    readers = graph.readers(tensor)
    return readers[0] if readers else None


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


def dequantized_tensor(graph: GraphModel, layer: QuantizedLayer) -> np.ndarray:
    """The weight the quantized model computes with, rebuilt from its stored initializers."""
    holder = layer.holder
    arrays = [graph.array(t.name) if graph.constant(t.name) is not None else None for t in holder.inputs[1:]]
    if holder.op == "MatMulNBits":
        from onnxq.export.nbits import dequantize_nbits  # only models written with MatMulNBits need it

        zero = arrays[2] if len(arrays) > 2 else None
        return dequantize_nbits(arrays[0], arrays[1], zero, holder.attrs["K"]).T  # (N, K) back to [K, N]
    codes = graph.array(holder.inputs[0].name).astype(np.float32)
    scale = arrays[0].astype(np.float32)
    zero = arrays[1].astype(np.float32) if len(arrays) > 1 and arrays[1] is not None else np.zeros_like(scale)
    return dequantize_linear(codes, scale, zero, holder.attrs.get("axis", 1), holder.attrs.get("block_size", 0))


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
    sqnr[(signal == 0) & (noise == 0)] = np.nan  # never computed on this data (a branch not taken): unknown
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
    graph, reference_graph = GraphModel(quantized), GraphModel(reference)
    layers = quantized_layers(graph)
    tensors = [layer.output for layer in layers if reference_graph.producer(layer.output) is not None]
    sqnr, samples = output_sqnr(quantized, reference, tensors, feeds) if tensors else ({}, 0)
    views = {layer.name: layer for layer in find_layers(reference)[0]}
    total_bytes = file_size(Path(quantized_path))
    sensitivity = diagonal_sensitivity(plan)
    rows = []
    for layer in layers:
        W = reference_graph.array(layer.weight).astype(np.float32)
        row = weight_row(layer, W, dequantized_tensor(graph, layer), views.get(layer.name),
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
