"""In-memory onnxruntime sessions: a model is serialized once, and one past protobuf's limit goes through a file."""

from __future__ import annotations

import contextlib
import sys

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


def test_streamed_captures_reuse_two_sets_of_buffers_and_match_plain_runs() -> None:
    """``CaptureEngine.stream`` writes each batch's tensors into one of two buffer sets (fresh arrays would pay their
    page faults every batch): the values equal a plain run's, batch sizes that change get buffers of their own
    shapes, and batch k + 2 reuses batch k's arrays only after the caller has moved past batch k."""
    model = tiny.cnn_model()
    rng = np.random.default_rng(1)
    batches = [{"x": rng.normal(size=(n, 3, 16, 16)).astype(np.float32)} for n in (4, 4, 4, 4, 3, 3, 4)]
    engine = capture.CaptureEngine(model, ["r1", "r3"])
    plain = capture.CaptureEngine(model, ["r1", "r3"])
    seen = []
    for values, feed in engine.stream(batches):
        expected = plain.values(feed)
        for name in ("r1", "r3"):
            np.testing.assert_array_equal(values[name], expected[name])
        seen.append(values["r1"])
        if len(seen) > 1:
            assert not np.shares_memory(seen[-1], seen[-2])  # the batch in flight never writes the one in use
    assert np.shares_memory(seen[1], seen[3])  # same shapes, same buffer set: reused
    assert seen[4].shape[0] == 3 and seen[6].shape[0] == 4


def test_captures_whose_shapes_follow_the_data_fall_back_to_plain_runs() -> None:
    """An output whose shape depends on the values (NonZero) cannot be written into the last batch's buffers:
    the engine runs plainly from then on, with the right values."""
    from onnx import TensorProto, helper

    node = helper.make_node("NonZero", ["x"], ["nz"])
    graph = helper.make_graph([node, helper.make_node("Identity", ["nz"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N"])],
                              [helper.make_tensor_value_info("y", TensorProto.INT64, None)],
                              value_info=[helper.make_tensor_value_info("nz", TensorProto.INT64, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    batches = [{"x": np.array(values, np.float32)} for values in ([1, 0, 2], [0, 0, 3], [4, 5, 6], [0, 0, 0])]
    engine = capture.CaptureEngine(model, ["nz"])
    for values, feed in engine.stream(batches):
        np.testing.assert_array_equal(values["nz"], np.array(np.nonzero(feed["x"])))
    assert not engine.bindable


def test_the_cli_keeps_freed_memory_for_reuse(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI (and each rounding worker) asks glibc to serve large arrays from the heap and never trim it; glibc
    takes every setting (skipped without glibc, where the call changes nothing)."""
    import ctypes

    from onnxq import allocator, cli

    try:
        ctypes.CDLL(None).mallopt  # noqa: B018 - probing for glibc
    except (OSError, AttributeError):
        pytest.skip("no glibc mallopt here")
    assert allocator.keep_freed_memory()
    called = []
    monkeypatch.setattr(allocator, "keep_freed_memory", lambda: called.append(True))
    monkeypatch.setattr(sys, "argv", ["onnxq", "--version"])
    with contextlib.suppress(SystemExit):
        cli.main()
    assert called
