"""onnxq: post-training low-bit weight quantization (COMQ, GPTQ, CLADO mixed precision) for ONNX models."""

__version__ = "0.1.0"

from .api import quantize  # noqa: E402
from .errors import OnnxqError  # noqa: E402

__all__ = ["OnnxqError", "quantize", "__version__"]
