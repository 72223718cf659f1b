"""The demo model shipped in models/: 8-bit keeps every top-1, and low-bit files are really small."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from scipy.special import log_softmax

import onnxq
from onnxq.data.images import ImagePreprocessing, list_images
from onnxq.report.summary import summary

DEMO = ImagePreprocessing(size=(227, 227), resize=(256, 256), mean=(104, 117, 123), std=(1, 1, 1), scale=1.0,
                          channel_order="BGR")


def top1(path, images) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"data": images})[0].argmax(axis=1)


@pytest.fixture(scope="module")
def images(demo_calib_dir=None):
    from conftest import ROOT
    files = list_images(ROOT / "models" / "demo_calib")
    return np.concatenate([DEMO.load(f) for f in files])


def test_8bit_keeps_every_top1(tmp_path, demo_model, demo_calib, images):
    out = tmp_path / "q8.onnx"
    onnxq.quantize(demo_model, demo_calib, out, bits=8, preprocessing=DEMO)
    np.testing.assert_array_equal(top1(out, images), top1(demo_model, images))


@pytest.mark.parametrize("bits, max_ratio", [(4, 0.16), (2, 0.10)])
def test_low_bit_file_sizes(tmp_path, demo_model, demo_calib, bits, max_ratio):
    out = tmp_path / f"q{bits}.onnx"
    result = onnxq.quantize(demo_model, demo_calib, out, bits=bits, method="rtn", preprocessing=DEMO)
    assert out.stat().st_size <= max_ratio * demo_model.stat().st_size
    assert result.size_ratio <= max_ratio
    assert result.average_bits(stored=True) == bits


def test_the_augmented_quick_start_checks_on_held_out_views_as_eval_measures_them(tmp_path, demo_model, demo_calib):
    """The quick start's printed check: on the held-out views (none calibrated on), agreement and KL as an
    independent onnxruntime computation on those views gives them."""
    from onnxq.data.calibration_set import CalibrationSet
    from onnxq.data.sources import CHECK_VIEWS, model_inputs

    out, prep = tmp_path / "q.onnx", ImagePreprocessing(preset="caffe", augment=24)
    result = onnxq.quantize(demo_model, demo_calib, out, bits=4, method="rtn", preprocessing=prep)
    inputs = model_inputs(onnx.load(str(demo_model)))
    data = CalibrationSet(demo_calib, inputs, prep, calib_size=256, held_out=CHECK_VIEWS)
    views, held_out = data.check_batch()
    assert result.calibration_samples == 24 and result.check_held_out and held_out
    assert len(views["data"]) == CHECK_VIEWS
    run = {p: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, views)[0].astype(np.float64)
           for p in (demo_model, out)}
    expected, quantized = (log_softmax(run[p], axis=1) for p in (demo_model, out))
    kl = (np.exp(expected) * (expected - quantized)).sum(1).mean()
    assert result.check_kl == pytest.approx(kl, rel=1e-6) and result.check_kl > 0
    assert result.top1_agreement == np.mean(expected.argmax(1) == quantized.argmax(1))
    assert f"held-out samples: {result.output_sqnr_db:.1f} dB" in summary(result)
    assert f"KL {result.check_kl:.3f}" in summary(result)
