"""In-memory onnxruntime sessions: a model is serialized once, and one past protobuf's limit goes through a file."""

from __future__ import annotations

import numpy as np
import pytest
import tiny

from onnxq.calibration import capture


def test_a_session_too_big_for_memory_goes_through_a_file(monkeypatch: pytest.MonkeyPatch) -> None:
    """make_session serializes a model once; past the in-memory limit it loads it from external data instead,
    with the same outputs."""
    model = tiny.cnn_model()
    x = np.random.default_rng(0).normal(size=(2, 3, 16, 16)).astype(np.float32)
    expected = capture.make_session(model).run(None, {"x": x})[0]
    monkeypatch.setattr(capture, "PROTOBUF_LIMIT", 100)
    assert capture._serialized(model) is None
    np.testing.assert_array_equal(capture.make_session(model).run(None, {"x": x})[0], expected)
