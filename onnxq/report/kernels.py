"""Deployment truth: which onnxruntime CPU kernel runs each Conv/Gemm/MatMul layer, and how fast the model is.

``kernel_report`` saves onnxruntime's optimised graph (``SessionOptions.optimized_model_filepath``) and follows
each layer's weight to the node that consumes it there: QLinearConv, QLinearMatMul, QGemm, MatMulInteger,
ConvInteger, MatMulIntegerToFloat (integer kernels), MatMulNBits (low-bit weights, float activations), or a
float Conv/FusedConv/Gemm/MatMul behind a DequantizeLinear ("float (dequantized weights)").
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from onnxq.graph.layers import QUANTIZABLE_OPS

INTEGER_KERNELS = ("QLinearConv", "QLinearMatMul", "QGemm", "MatMulInteger", "ConvInteger",
                   "MatMulIntegerToFloat", "DynamicQuantizeMatMul")
LOW_BIT_KERNELS = ("MatMulNBits",)
WEIGHT_PASSTHROUGH = ("DequantizeLinear", "Transpose", "Reshape", "Cast", "ReorderInput")
LEVELS = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
          "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
          "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}


def optimized_graph(model: str | Path | onnx.ModelProto, level: str = "extended") -> onnx.ModelProto:
    """The graph onnxruntime actually runs on CPU after its optimisations at ``level``."""
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    with tempfile.TemporaryDirectory(prefix="onnxq-") as tmp:
        options = ort.SessionOptions()
        options.graph_optimization_level = LEVELS[level]
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        options.log_severity_level = 3
        ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        return onnx.load(options.optimized_model_filepath)


def kernel_report(path: str | Path, level: str = "extended") -> list[dict]:
    """One row per Conv/Gemm/MatMul with a constant weight: its name, op type, the kernel that runs it."""
    model = onnx.load(str(path))
    optimized = optimized_graph(path, level)
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in optimized.graph.node:
        for tensor in node.input:
            consumers.setdefault(tensor, []).append(node)
    producers = {t: n for n in optimized.graph.node for t in n.output}
    rows = []
    for node, weight in _layers(model):
        runner = _follow(weight, consumers) or _by_output(node, producers)
        kernel = runner.op_type if runner is not None else "removed"
        rows.append({"layer": node.name, "op_type": node.op_type, "weight": weight, "kernel": kernel,
                     "runs": _runs(kernel, runner, producers)})
    return rows


def _layers(model: onnx.ModelProto) -> list[tuple[onnx.NodeProto, str]]:
    """Conv/Gemm/MatMul nodes (and exported MatMulNBits) whose weight is an initializer, directly or through a
    DequantizeLinear."""
    inits = {t.name for t in model.graph.initializer}
    dq_source = {n.output[0]: n.input[0] for n in model.graph.node
                 if n.op_type == "DequantizeLinear" and n.input[0] in inits}
    found = []
    for node in model.graph.node:
        if node.op_type in (*QUANTIZABLE_OPS, *LOW_BIT_KERNELS) and len(node.input) > 1:
            weight = dq_source.get(node.input[1], node.input[1])
            if weight in inits:
                found.append((node, weight))
    return found


def _follow(weight: str, consumers: dict[str, list[onnx.NodeProto]]) -> onnx.NodeProto | None:
    """The first node reading the weight that is not a DequantizeLinear or layout change of it."""
    frontier = [weight]
    while frontier:
        tensor = frontier.pop()
        for node in consumers.get(tensor, []):
            if node.op_type in WEIGHT_PASSTHROUGH:
                frontier.extend(node.output)
            else:
                return node
    return None


def _by_output(node: onnx.NodeProto, producers: dict[str, onnx.NodeProto]) -> onnx.NodeProto | None:
    """Fallback when fusion renamed the weight (MatMulNBits): the node writing the layer's (quantized) output."""
    for name in (node.output[0], f"{node.output[0]}_QuantizeLinear_Output"):
        if name in producers:
            return producers[name]
    return None


def _runs(kernel: str, runner: onnx.NodeProto | None, producers: dict[str, onnx.NodeProto]) -> str:
    """How the layer's arithmetic is done: integer, low-bit weights, or float."""
    if kernel in INTEGER_KERNELS:
        return "integer"
    if kernel in LOW_BIT_KERNELS:
        return "low-bit weights"
    if runner is not None and len(runner.input) > 1 and runner.input[1] in producers \
            and producers[runner.input[1]].op_type == "DequantizeLinear":
        return "float (dequantized weights)"
    return "float"


def kernel_summary(rows: list[dict]) -> dict[str, int]:
    """How many layers each kernel runs, e.g. ``{"QLinearConv": 26}``."""
    return dict(Counter(row["kernel"] for row in rows).most_common())


def random_feed(session: ort.InferenceSession, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs for every model input: dynamic first dimension = ``batch``, other dynamic ones = 1."""
    rng = np.random.default_rng(seed)
    feed = {}
    for value in session.get_inputs():
        shape = [d if isinstance(d, int) else (batch if i == 0 else 1) for i, d in enumerate(value.shape)]
        if "float" in value.type:
            dtype = np.float16 if "float16" in value.type else np.float32
            feed[value.name] = rng.normal(size=shape).astype(dtype)
        else:
            feed[value.name] = np.zeros(shape, dtype=np.int64 if "int64" in value.type else np.int32)
    return feed


def cpu_session(path: str | Path, threads: int | None = None) -> ort.InferenceSession:
    """A CPU session with every optimisation and ``threads`` intra-op threads (default: every core)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or os.cpu_count() or 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def latency(path: str | Path, batch: int, repeats: int = 20, warmup: int = 3, threads: int | None = None) -> float:
    """Median wall time in ms of one run on random inputs (CPU, all optimisations, every core)."""
    return compare_latency({"model": path}, batch, repeats, warmup, threads)["model"]


def compare_latency(paths: dict[str, str | Path], batch: int, repeats: int = 20, warmup: int = 3,
                    threads: int | None = None) -> dict[str, float]:
    """Median ms per model, timing single runs in turn so that changing machine load hits every model alike."""
    sessions = {label: cpu_session(path, threads) for label, path in paths.items()}
    feeds = {label: random_feed(session, batch) for label, session in sessions.items()}
    for label, session in sessions.items():
        for _ in range(warmup):
            session.run(None, feeds[label])
    times: dict[str, list[float]] = {label: [] for label in sessions}
    for _ in range(repeats):
        for label, session in sessions.items():
            start = time.perf_counter()
            session.run(None, feeds[label])
            times[label].append((time.perf_counter() - start) * 1000)
    return {label: statistics.median(values) for label, values in times.items()}
