"""The demo model shipped in models/: 8-bit keeps every top-1, and low-bit files are really small."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

import onnxq
from onnxq.data.images import ImagePreprocessing, list_images

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
