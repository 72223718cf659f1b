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
import onnx_graphsurgeon as gs
import onnxruntime as ort

from onnxq.graph.layers import QUANTIZABLE_OPS
from onnxq.graph.model import GraphModel

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
    model = GraphModel(onnx.load(str(path)))
    optimized = GraphModel(optimized_graph(path, level))
    rows = []
    for node, weight in _layers(model):
        runner = _follow(weight, optimized) or _by_output(node, optimized)
        kernel = runner.op if runner is not None else "removed"
        rows.append({"layer": node.name, "op_type": node.op, "weight": weight, "kernel": kernel,
                     "runs": _runs(kernel, runner, optimized)})
    return rows


def _layers(model: GraphModel) -> list[tuple[gs.Node, str]]:
    """Conv/Gemm/MatMul nodes (and exported MatMulNBits) whose weight is an initializer, directly or through a
    DequantizeLinear."""
    found = []
    for node in model.nodes:
        if node.op in (*QUANTIZABLE_OPS, *LOW_BIT_KERNELS) and len(node.inputs) > 1:
            weight = node.inputs[1].name
            source = model.producer(weight)
            dequantized = source is not None and source.op == "DequantizeLinear"
            if dequantized and model.constant(source.inputs[0].name) is not None:
                weight = source.inputs[0].name
            if model.constant(weight) is not None:
                found.append((node, weight))
    return found


def _follow(weight: str, graph: GraphModel) -> gs.Node | None:
    """The first node reading the weight that is not a DequantizeLinear or layout change of it."""
    frontier = [weight]
    while frontier:
        tensor = frontier.pop()
        for node in graph.consumers(tensor):
            if node.op in WEIGHT_PASSTHROUGH:
                frontier.extend(t.name for t in node.outputs)
            else:
                return node
    return None


def _by_output(node: gs.Node, graph: GraphModel) -> gs.Node | None:
    """Fallback when fusion renamed the weight (MatMulNBits): the node writing the layer's (quantized) output."""
    output = node.outputs[0].name
    for name in (output, f"{output}_QuantizeLinear_Output"):
        if graph.producer(name) is not None:
            return graph.producer(name)
    return None


def _runs(kernel: str, runner: gs.Node | None, graph: GraphModel) -> str:
    """How the layer's arithmetic is done: integer, low-bit weights, or float."""
    if kernel in INTEGER_KERNELS:
        return "integer"
    if kernel in LOW_BIT_KERNELS:
        return "low-bit weights"
    weight_source = graph.producer(runner.inputs[1].name) if runner is not None and len(runner.inputs) > 1 else None
    if weight_source is not None and weight_source.op == "DequantizeLinear":
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
