"""Warnings with a next step: too few calibration samples for the model, a poor check of the written model."""

from __future__ import annotations

import logging

import numpy as np

import onnxq
from onnxq.data.images import ImagePreprocessing
from onnxq.report.advice import (
    MIN_SAMPLES,
    GramSize,
    RunFacts,
    calibration_size_warning,
    losing_most,
    quality_warning,
    samples_needed,
)

FACTS = RunFacts("comq", False, False, None, ("conv1", "fc"), 256, 64)


def test_samples_needed_counts_rows_per_gram_dimension():
    grams = [GramSize("conv", 576, 169.0), GramSize("small", 27, 3025.0), GramSize("fc", 1024, 1.0)]
    assert samples_needed(grams) == (35, grams[0])  # ceil(10 * 576 / 169); the pooled fc is left to shrinkage
    assert samples_needed(grams, shrinkage=False) == (1024, grams[2])
    assert samples_needed([GramSize("tiny", 4, 100.0)]) == (MIN_SAMPLES, None)
    message = calibration_size_warning(1, grams)
    assert message.startswith("calibrated on 1 sample, and this model needs about 35 (layer conv has 576 inputs")
    assert "give at least 35" in message
    assert calibration_size_warning(35, grams) is None


def test_poor_check_names_the_layers_losing_most_and_the_flags_to_try():
    layers = [("conv1", 2, 0.9), ("mid1", 2, 0.1), ("mid2", 2, 0.12), ("mid3", 2, 0.11), ("fc", 2, 0.5)]
    assert losing_most(layers) == ["conv1", "fc"]
    message = quality_warning(6.9, 0.4, True, layers, FACTS)
    assert "output SQNR 6.9 dB, top-1 agreement 40 % on held-out samples" in message
    assert "2 of 5 layers lose most (conv1, fc)" in message
    for step in ("--first-last-bits 8", "--bits 3", "--avg-bits 2.5", "--sequential"):
        assert step in message
    assert "more calibration samples" not in message  # 256 samples are enough here
    assert quality_warning(25.0, 0.95, True, layers, FACTS) is None
    done = RunFacts("rtn", True, True, 8, ("conv1", "fc"), 8, 64)
    tried = quality_warning(10.0, None, False, [(n, 8 if n in ("conv1", "fc") else 2, e) for n, _, e in layers], done)
    assert "a calibration batch, which flatters" in tried
    assert "--method comq" in tried and "more calibration samples (now 8)" in tried
    assert "--first-last-bits" not in tried and "--sequential" not in tried and "--avg-bits" not in tried


def test_one_image_at_two_bits_warns_twice_with_next_steps(tmp_path, demo_model, demo_calib, caplog):
    with caplog.at_level(logging.WARNING, logger="onnxq"):
        result = onnxq.quantize(demo_model, demo_calib, tmp_path / "q.onnx", bits=2, calib_size=1, method="rtn",
                                preprocessing=ImagePreprocessing(preset="caffe"))
    messages = [r.message for r in caplog.records]
    assert result.calibration_samples == 1
    assert any(m.startswith("calibrated on 1 sample, and this model needs about") for m in messages)
    poor = [m for m in messages if m.startswith("the quantized model is far from the float one")]
    assert poor and "on held-out samples" in poor[0] and "--bits 3" in poor[0]
    assert np.isfinite(result.output_sqnr_db)
