"""The calibration set: read once, split into calibration and held-out samples, spilled past a memory limit."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import tiny

import onnxq
from onnxq.allocation.mixed import Budget
from onnxq.data.calibration_set import CalibrationSet
from onnxq.data.sources import InputSpec, model_inputs, spread_order
from onnxq.graph.prepare import prepare
from onnxq.pipeline import oracle_feeds


def values(feeds, name="x"):
    return np.concatenate([f[name] for f in feeds])


def test_held_out_samples_follow_the_calibration_ones_in_spread_order(cnn_path, cnn_calib):
    inputs = model_inputs(prepare(onnx.load(str(cnn_path))))
    data = CalibrationSet(cnn_calib, inputs, batch_size=3, calib_size=8, held_out=8)
    name = inputs[0].name
    order = spread_order(20)  # the folder's 20 files are read in spread order
    files = [np.load(cnn_calib / f"{i:03d}.npy") for i in order]
    assert np.array_equal(values(data.calibration(), name), np.concatenate(files[:8]))
    assert np.array_equal(values(data.held_out(), name), np.concatenate(files[8:16]))
    assert np.array_equal(values(data.held_out(5), name), np.concatenate(files[8:13]))
    assert data.samples == 8 and data.held_out_samples == 8 and data.reads == 1
    check, held_out = data.check_batch()
    assert held_out and np.array_equal(check[name], np.concatenate(files[8:11]))


def test_oracle_falls_back_to_calibration_samples_with_a_warning(cnn_path, cnn_calib, caplog):
    inputs = model_inputs(prepare(onnx.load(str(cnn_path))))
    data = CalibrationSet(cnn_calib, inputs, batch_size=4, calib_size=20, held_out=8)
    with caplog.at_level("WARNING", logger="onnxq"):
        fallback = oracle_feeds(data, 8)
    assert "held-out" in caplog.text
    assert np.array_equal(values(fallback, inputs[0].name), values(data.first(8), inputs[0].name))
    assert len(values(fallback, inputs[0].name)) == 8
    assert data.check_batch()[1] is False  # nothing held out: the check runs on a calibration batch


@pytest.mark.parametrize("mergeable", [True, False])
def test_split_cuts_batches_at_the_calibration_size(mergeable: bool):
    spec = InputSpec("x", np.dtype(np.float32), (None, 2) if mergeable else (1, 2))
    feeds = [{"x": np.full((1, 2), i, np.float32)} for i in range(10)]
    data = CalibrationSet(feeds, [spec], batch_size=3, calib_size=4, held_out=5)
    assert values(data.calibration())[:, 0].tolist() == [0, 1, 2, 3]
    assert values(data.held_out())[:, 0].tolist() == [4, 5, 6, 7, 8]
    none_left = CalibrationSet(feeds, [spec], batch_size=3, calib_size=10, held_out=5)
    assert none_left.held_out() == [] and none_left.held_out_samples == 0


def test_spilled_set_gives_the_same_batches(cnn_path, cnn_calib):
    inputs = model_inputs(prepare(onnx.load(str(cnn_path))))
    kept = CalibrationSet(cnn_calib, inputs, batch_size=4, calib_size=12, held_out=4)
    spilled = CalibrationSet(cnn_calib, inputs, batch_size=4, calib_size=12, held_out=4, memory_limit=4096)
    name = inputs[0].name
    assert np.array_equal(values(kept.calibration(), name), values(spilled.calibration(), name))
    assert np.array_equal(values(kept.held_out(), name), values(spilled.held_out(), name))
    assert spilled.store.spilled_bytes > 0 and kept.store.spilled_bytes == 0
    spilled.close()


class CountingReader:
    """An onnxruntime-style CalibrationDataReader with only ``get_next()``: it can be drained once."""

    def __init__(self, samples: int, shape: tuple[int, ...]) -> None:
        rng = np.random.default_rng(3)
        self.samples = [rng.normal(size=shape).astype(np.float32) for _ in range(samples)]
        self.calls = 0

    def get_next(self):
        self.calls += 1
        return {"x": self.samples[self.calls - 1]} if self.calls <= len(self.samples) else None


def test_a_reader_is_read_once_with_budget_sequential_and_activations(tmp_path):
    path = tmp_path / "cnn.onnx"
    onnx.save(tiny.cnn_model(), str(path))
    reader = CountingReader(24, (1, 3, 16, 16))
    result = onnxq.quantize(path, reader, tmp_path / "q.onnx", method="rtn", budget=Budget(avg_bits=5.0),
                            bit_choices=(4, 8), sequential=True, act_bits=8, calib_size=12, clado_samples=8,
                            verify_samples=8, batch_size=4)
    assert reader.calls == 20  # 12 calibration + 8 held-out samples, each asked for once
    assert result.calibration_samples == 12 and result.check_held_out
