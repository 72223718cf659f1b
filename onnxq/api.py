"""The Python API: ``onnxq.quantize(model, calib, output=None, config=Config(...))``.

``model`` is a path or an ``onnx.ModelProto``; without ``output`` the quantized model comes back in memory
(``result.model``). Keyword options (the CLI flags with underscores: ``bits=3, first_last_bits=8``) are applied
on top of ``config``, so ``onnxq.quantize("m.onnx", "calib/", "q.onnx", bits=4)`` keeps working.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx

from onnxq.config import Config
from onnxq.errors import OnnxqError
from onnxq.pipeline import QuantizationResult, quantize_model

ONNX_PROTO_LIMIT = 2**31 - 1  # protobuf's serialisation limit: larger models keep their weights in external data


def quantize(model: str | Path | onnx.ModelProto, calib: object, output: str | Path | None = None,
             config: Config | None = None, *, progress: Callable | None = None, **options: Any) -> QuantizationResult:
    """Quantize ``model`` with calibration data ``calib`` (a path, a CalibrationDataReader or feed dicts).

    Writes ``output`` when given; otherwise the quantized model is returned as ``result.model``. ``options``
    override ``config`` by flat name (see :data:`onnxq.config.OPTIONS`); the caller's config is never changed.
    """
    if config is not None and not isinstance(config, Config):
        raise OnnxqError(f"config must be an onnxq.Config, not {type(config).__name__}")
    config = (config or Config()).with_options(**options) if options else (config or Config())
    check_files(config)
    with tempfile.TemporaryDirectory(prefix="onnxq-") as scratch:
        model_path = model if not isinstance(model, onnx.ModelProto) else saved_proto(model, Path(scratch))
        target = Path(output) if output is not None else Path(scratch) / "quantized.onnx"
        result = quantize_model(model_path, calib, target, config, progress)
        if output is None:
            return dataclasses.replace(result, output=None, model=onnx.load(str(target)))
    return result


def check_files(config: Config) -> None:
    """Input files the config names must exist (an absent one would be silently skipped by the run)."""
    bits_json = config.layers.bits_json
    if bits_json is not None and config.mixed is None and not bits_json.is_file():
        raise OnnxqError(f"--bits-json {bits_json} does not exist: without a budget it is read (write it first "
                         "with a budget, e.g. --avg-bits 3)")


def saved_proto(model: onnx.ModelProto, folder: Path) -> Path:
    """Write an in-memory model where the pipeline can read it (weights in external data past 2 GB)."""
    if any(onnx.external_data_helper.uses_external_data(t) for t in model.graph.initializer):
        raise OnnxqError("the ModelProto refers to external data files it does not hold; load it with "
                         "onnx.load(path) (which reads them) or pass the model's path")
    path = folder / "model.onnx"
    if model.ByteSize() <= ONNX_PROTO_LIMIT:
        onnx.save_model(model, str(path))
        return path
    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # saving as external data rewrites the tensors it moves: not the caller's model
    onnx.save_model(copy, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data")
    return path
