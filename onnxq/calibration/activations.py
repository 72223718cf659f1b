"""Calibrate activation ranges for uint8 quantization by streaming batches through the float model.

The capture engine feeds each batch to a :class:`HistogramObserver`; the histogram and the range search
themselves are pure numpy in ``onnxq.passes.histogram`` (re-exported here for the stage's callers).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable

import numpy as np
import onnx

from onnxq.calibration.capture import capture
from onnxq.data.masking import batch_mask
from onnxq.data.sources import Feed
from onnxq.errors import OnnxqError
from onnxq.passes.histogram import METHODS, RunningHistogram, choose_range


def activation_ranges(model: onnx.ModelProto, tensors: list[str], batches: Iterable[Feed], method: str = "mse",
                      percentile: float = 99.999, methods: dict[str, str] | None = None
                      ) -> dict[str, tuple[float, float]]:
    """Stream ``batches`` through ``model`` and return each tensor's ``(low, high)`` range.

    ``methods`` overrides the method per tensor (e.g. ``minmax`` for logits, whose top value must survive).
    """
    chosen = _methods(tensors, method, methods, percentile)
    hists = activation_histograms(model, tensors, batches, {n for n, m in chosen.items() if m != "minmax"})
    return ranges_from(hists, method, percentile, methods)


def ranges_from(hists: dict[str, RunningHistogram], method: str = "mse", percentile: float = 99.999,
                methods: dict[str, str] | None = None) -> dict[str, tuple[float, float]]:
    """Ranges from collected histograms: one calibration pass can be tried with several methods."""
    chosen = _methods(list(hists), method, methods, percentile)
    return {name: choose_range(hist, chosen[name], percentile) for name, hist in hists.items()}


def _methods(tensors: list[str], method: str, methods: dict[str, str] | None, percentile: float) -> dict[str, str]:
    """The method of each tensor, checked."""
    chosen = {name: (methods or {}).get(name, method) for name in tensors}
    unknown = set(chosen.values()) - set(METHODS)
    if unknown:
        raise OnnxqError(f"unknown calibration method {sorted(unknown)[0]!r}; choose one of {', '.join(METHODS)}")
    if not 0 < percentile <= 100:
        raise OnnxqError(f"percentile {percentile} is outside (0, 100]; use e.g. 99.999")
    return chosen


class HistogramObserver:
    """Keeps each tensor's exact range and, where asked, its running histogram. With ``mask_name`` (a token
    model's attention mask), tensors laid out (batch, tokens, ...) lose their padding positions first, as the Gram
    statistics do: padded tokens would otherwise widen the ranges."""

    def __init__(self, tensors: list[str], with_histogram: Collection[str] | None = None,
                 mask_name: str | None = None) -> None:
        self.tensors = tensors
        self.keep = set(tensors if with_histogram is None else with_histogram)
        self.hists = {name: RunningHistogram() for name in tensors}
        self.mask_name = mask_name

    def update(self, values: dict[str, np.ndarray], feed: Feed) -> None:
        mask = batch_mask(feed, self.mask_name)
        for name in self.tensors:
            value = values[name]
            if mask is not None and value.ndim >= 2 and value.shape[:2] == mask.shape:
                value = value[mask]
            try:
                self.hists[name].add(value, histogram=name in self.keep)
            except FloatingPointError:
                raise OnnxqError("an activation contains NaN or Inf during calibration; check the model and data"
                                 ) from None


def activation_histograms(model: onnx.ModelProto, tensors: list[str], batches: Iterable[Feed],
                          with_histogram: Collection[str] | None = None) -> dict[str, RunningHistogram]:
    """Run the batches once through ``model``, merging each tensor into its histogram (all tensors if None)."""
    observer = HistogramObserver(tensors, with_histogram)
    capture(model, batches, [observer])
    return observer.hists
