"""Rounding and allocation passes: pure numpy/scipy, no ONNX (installed as ``onnxq.passes``).

Every rounding pass has the signature ``quantize(W, H, grid, **options) -> QuantWeight`` and minimises
the same objective, ``tr((W-Q) H (W-Q)^T)``.
"""

from . import clado, comq, gptq, rtn
from .grid import SUPPORTED_BITS, Grid, QuantWeight, objective, relative_error

ROUNDING_PASSES = {"rtn": rtn.quantize, "gptq": gptq.quantize, "comq": comq.quantize}
DEFAULT_METHOD = "comq"

__all__ = ["DEFAULT_METHOD", "ROUNDING_PASSES", "SUPPORTED_BITS", "Grid", "QuantWeight", "clado", "objective",
           "relative_error"]
