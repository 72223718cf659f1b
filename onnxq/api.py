"""The Python API: ``onnxq.quantize(model, calib, output, bits=4, method="comq", ...)``."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

from .errors import OnnxqError
from .pipeline import Options, QuantizationResult, quantize_model


def quantize(model: str | Path, calib: object, output: str | Path, **options: object) -> QuantizationResult:
    """Quantize a model file and write ``output``; ``calib`` is a path, a CalibrationDataReader or feed dicts.

    Keyword options are the fields of :class:`onnxq.pipeline.Options` (the CLI flags with underscores):
    bits, method, symmetric, clip, block_size, matmul_nbits, first_last_bits, nodes_to_exclude, op_types_to_quantize,
    bits_per_layer, calib_size, batch_size, stats, preprocessing, allow_empty, external_data.
    """
    known = {f.name for f in fields(Options)}
    unknown = set(options) - known
    if unknown:
        raise OnnxqError(f"unknown option(s) {sorted(unknown)}; valid options are {sorted(known)}")
    return quantize_model(model, calib, output, Options(**options))
