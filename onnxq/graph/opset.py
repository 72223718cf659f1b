"""Fit a model's opset to the installed onnxruntime before any work is done.

A model stamped with an opset newer than onnxruntime implements may still load (its float ops resolve to older
kernels), but the DequantizeLinear nodes onnxq adds at that opset do not run, and that was found only after
calibrating. So the opset is checked up front: the newest opset at which onnxruntime runs an INT4
DequantizeLinear is probed once, and a newer model is converted down to it, or refused with a clear error.
"""

from __future__ import annotations

import logging
from functools import lru_cache

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxq.errors import OnnxqError, first_line

log = logging.getLogger("onnxq")
OLDEST_PROBED = 21  # INT4 DequantizeLinear needs opset 21; the exporter raises older models to it


def default_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def runs_dequantize(opset: int) -> bool:
    """Whether onnxruntime runs an INT4 DequantizeLinear in a model of this opset."""
    import onnxruntime as ort

    codes = helper.make_tensor("codes", TensorProto.INT4, [4], [0, 1, -1, 2])
    scale = numpy_helper.from_array(np.float32(1.0).reshape(()), "scale")
    graph = helper.make_graph([helper.make_node("DequantizeLinear", ["codes", "scale"], ["y"])], "probe", [],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], [codes, scale])
    opsets = [helper.make_opsetid("", opset)]
    options = ort.SessionOptions()
    options.log_severity_level = 4
    try:  # an onnx release can know an opset its own IR-version table does not list yet (ValueError)
        model = helper.make_model(graph, opset_imports=opsets, ir_version=helper.find_min_ir_version_for(opsets))
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, {})
    except Exception:  # noqa: BLE001 - onnxruntime raises its own types for an unimplemented opset
        return False
    return True


@lru_cache(maxsize=1)
def newest_runnable_opset() -> int:
    """The newest opset (up to onnx's own) at which onnxruntime runs the Q/DQ nodes onnxq writes."""
    for opset in range(onnx.defs.onnx_opset_version(), OLDEST_PROBED - 1, -1):
        if runs_dequantize(opset):
            return opset
    return OLDEST_PROBED


def fit_opset(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model itself when onnxruntime runs its opset, else the model converted down to the newest opset
    onnxruntime runs; a one-line error when the conversion is impossible."""
    opset = default_opset(model)
    newest = newest_runnable_opset()
    if opset <= newest:
        return model
    import onnxruntime as ort

    try:
        converted = onnx.version_converter.convert_version(model, newest)
    except Exception as err:  # noqa: BLE001 - the converter raises RuntimeError, ValueError, IndexError...
        raise OnnxqError(f"the model uses opset {opset}, but onnxruntime {ort.__version__} runs quantized models only "
                         f"up to opset {newest} and the model cannot be converted down ({first_line(err)}); "
                         f"export it at opset {newest} or upgrade onnxruntime") from err
    log.warning("the model uses opset %d; onnxruntime %s runs quantized models up to opset %d, so it is converted "
                "to opset %d first", opset, ort.__version__, newest, newest)
    return converted
