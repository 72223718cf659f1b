"""onnxq: post-training low-bit weight quantization (COMQ, GPTQ, CLADO mixed precision) for ONNX models.

The API names load on first use (PEP 562), so ``import onnxq`` and ``onnxq --help`` stay light: neither
onnxruntime nor scipy is imported until a run needs them.
"""

from __future__ import annotations

from importlib import import_module
from importlib.util import find_spec
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

from onnxq.config import Activations, Config, Data, Export, Layers, MixedPrecision, Rounding  # noqa: E402
from onnxq.errors import OnnxqError  # noqa: E402

_LAZY = {  # public name -> the module that defines it
    "quantize": "api",
    "calibrate": "api",
    "allocate": "api",
    "BitPlan": "api",
    "open_run": "api",
    "evaluate": "api",
    "write_report": "api",
    "EvalResult": "report.evaluate",
    "Run": "pipeline",
    "kernel_report": "report.kernels",
    "kernel_summary": "report.kernels",
    "compare_latency": "report.kernels",
    "Statistics": "calibration.stats_cache",
    "QuantizationResult": "pipeline",
    "LayerReport": "pipeline",
    "MixedPlan": "allocation.mixed",
    "Budget": "allocation.mixed",
    "ImagePreprocessing": "data.images",
    "Layer": "graph.layers",
    "spread_order": "data.sources",
}

if TYPE_CHECKING:
    from onnxq.allocation.mixed import Budget, MixedPlan
    from onnxq.api import BitPlan, allocate, calibrate, evaluate, open_run, quantize, write_report
    from onnxq.calibration.stats_cache import Statistics
    from onnxq.data.images import ImagePreprocessing
    from onnxq.data.sources import spread_order
    from onnxq.graph.layers import Layer
    from onnxq.pipeline import LayerReport, QuantizationResult, Run
    from onnxq.report.evaluate import EvalResult
    from onnxq.report.kernels import compare_latency, kernel_report, kernel_summary


def __getattr__(name: str) -> Any:
    """Load an API name, or a submodule (``onnxq.pipeline``), on first access."""
    if name in _LAZY:
        value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
    elif not name.startswith("_") and find_spec(f"{__name__}.{name}") is not None:
        value = import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module 'onnxq' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = ["Activations", "BitPlan", "Budget", "Config", "Data", "EvalResult", "Export", "ImagePreprocessing",
           "Layer", "LayerReport", "Layers", "MixedPlan", "MixedPrecision", "OnnxqError", "QuantizationResult",
           "Rounding", "Run", "Statistics", "__version__", "allocate", "calibrate", "compare_latency", "evaluate",
           "kernel_report", "kernel_summary", "open_run", "quantize", "spread_order", "write_report"]
