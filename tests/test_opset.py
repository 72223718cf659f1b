"""A model at an opset newer than onnxruntime runs is converted down up front, or refused before any work."""

from __future__ import annotations

import onnx
import onnxruntime as ort
import pytest
import tiny

import onnxq
from onnxq.errors import OnnxqError
from onnxq.graph import opset


def stamped(version: int) -> onnx.ModelProto:
    model = tiny.cnn_model()
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            entry.version = version
    model.ir_version = onnx.helper.find_min_ir_version_for(list(model.opset_import))
    return model


def test_the_probe_finds_an_opset_onnxruntime_runs():
    newest = opset.newest_runnable_opset()
    assert opset.runs_dequantize(newest) and newest >= opset.OLDEST_PROBED
    assert all(not opset.runs_dequantize(v) for v in range(newest + 1, onnx.defs.onnx_opset_version() + 1))


def test_a_newer_model_is_converted_down_and_its_output_runs(tmp_path, cnn_calib, monkeypatch, caplog):
    monkeypatch.setattr(opset, "newest_runnable_opset", lambda: 21)
    path = tmp_path / "new.onnx"
    onnx.save(stamped(23), str(path))
    with caplog.at_level("WARNING", logger="onnxq"):
        onnxq.quantize(path, cnn_calib, tmp_path / "q.onnx", method="rtn")
    assert "converted to opset 21" in caplog.text
    written = onnx.load(str(tmp_path / "q.onnx"))
    assert opset.default_opset(written) == 21
    ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"])


def test_a_model_that_cannot_be_converted_is_refused_before_any_work(tmp_path, cnn_calib, monkeypatch):
    monkeypatch.setattr(opset, "newest_runnable_opset", lambda: 21)

    def fails(model, target):
        raise RuntimeError("no adapter for op X")

    monkeypatch.setattr(onnx.version_converter, "convert_version", fails)
    monkeypatch.setattr("onnxq.pipeline.prepare", lambda model: pytest.fail("prepared a model it should refuse"))
    path = tmp_path / "new.onnx"
    onnx.save(stamped(23), str(path))
    with pytest.raises(OnnxqError, match=r"opset 23.*up to opset 21.*cannot be converted down \(no adapter"):
        onnxq.quantize(path, cnn_calib, tmp_path / "q.onnx", method="rtn")
    assert not (tmp_path / "q.onnx").exists()


def test_an_opset_missing_from_onnx_ir_table_is_skipped_not_fatal(monkeypatch):
    """onnx 1.22 knows opset 27 but its IR-version table stops at 26: the probe must skip it, not crash."""
    real = onnx.helper.find_min_ir_version_for

    def lagging_table(opsets, *args, **kwargs):
        if any(entry.version > 22 for entry in opsets):
            raise ValueError("Unsupported opset-version.")
        return real(opsets, *args, **kwargs)

    monkeypatch.setattr(opset.helper, "find_min_ir_version_for", lagging_table)
    opset.newest_runnable_opset.cache_clear()
    try:
        newest = opset.newest_runnable_opset()
        assert newest <= 22 and opset.runs_dequantize(newest)
    finally:
        opset.newest_runnable_opset.cache_clear()
