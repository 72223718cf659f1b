"""Activation range search on a streamed histogram: pure numpy, no ONNX (the calibration stage feeds it).

Each tensor keeps its exact min/max and, for ``percentile`` and ``mse``, a fixed-size histogram whose bins
sit on multiples of a width that doubles (merging pairs of bins exactly) whenever new data falls outside
the covered span. Memory is bounded by one batch plus ``BINS`` counters per tensor, whatever the data size.
Exact zeros are counted apart: they are exact on any grid with an integer zero point (most ReLU outputs).

Methods: ``minmax`` (the observed range), ``percentile`` (the two-sided ``percentile``-th range, within
one bin of ``np.percentile``), ``mse`` (the clipping range that minimises the expected uint8 quantization
error over the histogram: clipping error plus ``step**2 / 12`` rounding noise for the non-zero values kept).
"""

from __future__ import annotations

import numpy as np

METHODS = ("minmax", "percentile", "mse")
BINS = 4096  # the histogram never holds more bins than this; a fresh one uses half, so it can grow
LEVELS = 255  # uint8 steps between the ends of the range
MSE_ROUNDS = 8  # coordinate-descent rounds (lower end, upper end) of the MSE search


class RunningHistogram:
    """A histogram of one tensor's non-zero values on bins ``[k*width, (k+1)*width)``, ``k`` from ``start``."""

    def __init__(self) -> None:
        self.width = 0.0
        self.start = 0
        self.counts = np.zeros(0)
        self.zeros = 0
        self.low, self.high = np.inf, -np.inf

    @classmethod
    def restored(cls, width: float, start: int, counts: np.ndarray, zeros: int, low: float, high: float
                 ) -> RunningHistogram:
        """A histogram from its saved state (the ``--stats`` file), equal to the one that was saved."""
        hist = cls()
        hist.width, hist.start, hist.counts, hist.zeros, hist.low, hist.high = width, start, counts, zeros, low, high
        return hist

    @property
    def total(self) -> float:
        return float(self.counts.sum()) + self.zeros

    def add(self, values: np.ndarray, histogram: bool = True) -> None:
        """Merge a batch of values (any shape); with ``histogram`` False only min/max are kept."""
        x = np.asarray(values, dtype=np.float32).ravel()
        if x.size == 0:
            return
        if not np.isfinite(x).all():
            raise FloatingPointError("values contain NaN or Inf")
        self.low, self.high = min(self.low, float(x.min())), max(self.high, float(x.max()))
        if not histogram:
            return
        self._bin(x)

    def _bin(self, x: np.ndarray) -> None:
        """Count values into the bins, first widening bins until the observed span fits; zeros apart."""
        zeros = x.size - int(np.count_nonzero(x))
        if zeros == x.size:
            self.zeros += zeros
            return
        if self.width == 0.0:
            span = max(self.high, 0.0) - min(self.low, 0.0)
            self.width = span / (BINS // 2)
            self.start = int(np.floor(self.low / self.width))
        first, last = self._index(self.low), self._index(self.high)
        while last - first + 1 > BINS:
            self._merge_pairs()
            first, last = self._index(self.low), self._index(self.high)
        self._cover(first, last)
        scaled = x * np.float32(1 / self.width)  # float32 on purpose: 4x less memory traffic than float64
        np.floor(scaled, out=scaled)
        scaled -= np.float32(self.start)  # integers below 2**24: exact, and 0.0 lands exactly in bin -start
        index = scaled.astype(np.intp)
        np.clip(index, 0, self.counts.size - 1, out=index)  # float rounding at the outermost edges
        self.counts += np.bincount(index, minlength=self.counts.size)
        if zeros:
            self.counts[-self.start] -= zeros  # zeros went to bin [0, width); they are counted apart
            self.zeros += zeros

    def _index(self, value: float) -> int:
        return int(np.floor(value / self.width))

    def _merge_pairs(self) -> None:
        """Double the bin width: absolute bin ``k`` goes to ``k // 2``, which keeps the counts exact."""
        absolute = np.arange(self.start, self.start + self.counts.size) // 2
        start = self.start // 2
        self.counts = np.bincount(absolute - start, weights=self.counts)
        self.start, self.width = start, self.width * 2

    def _cover(self, first: int, last: int) -> None:
        """Pad the counts with empty bins so absolute bins ``first..last`` exist."""
        end = self.start + self.counts.size
        before, after = max(0, self.start - first), max(0, last + 1 - end)
        if before or after:
            self.counts = np.pad(self.counts, (before, after))
            self.start -= before

    def centers(self) -> np.ndarray:
        return (np.arange(self.start, self.start + self.counts.size) + 0.5) * self.width

    def quantile(self, q: float) -> float:
        """The ``q``-quantile (0..1) of all values, zeros included, defined as ``np.percentile`` defines it.

        The ``k``-th smallest value is placed evenly inside its bin, so the result is within one bin width.
        """
        at_zero = int(np.clip(-self.start, 0, self.counts.size))  # exact zeros sit between bins -1 and 0
        lefts = np.insert((np.arange(self.counts.size) + self.start) * self.width, at_zero, 0.0)
        widths = np.insert(np.full(self.counts.size, self.width), at_zero, 0.0)
        counts = np.insert(self.counts, at_zero, self.zeros)
        cumulative = np.cumsum(counts)
        rank = q * (cumulative[-1] - 1)
        ranks = np.array([np.floor(rank), np.ceil(rank)])
        i = np.minimum(np.searchsorted(cumulative, ranks, side="right"), counts.size - 1)
        within = (ranks - (cumulative[i] - counts[i]) + 0.5) / np.maximum(counts[i], 1)
        below, above = lefts[i] + np.clip(within, 0, 1) * widths[i]
        return float(np.clip(below + (rank - ranks[0]) * (above - below), self.low, self.high))


def range_mse(hist: RunningHistogram, low: np.ndarray | float, high: np.ndarray | float) -> np.ndarray:
    """Expected squared uint8 quantization error per value for ranges ``[low, high]`` (vectorised).

    Values are represented by their bin centres; those outside the range cost their clipping error, the
    non-zero values inside cost ``step**2 / 12`` (``step = (high - low) / 255``), exact zeros cost nothing.
    """
    low, high = np.minimum(np.asarray(low, float), 0.0), np.maximum(np.asarray(high, float), 0.0)
    centers, counts = hist.centers(), hist.counts
    p0, p1, p2 = (np.concatenate([[0.0], np.cumsum(counts * centers**k)]) for k in range(3))
    above = np.searchsorted(centers, high, side="right")
    below = np.searchsorted(centers, low, side="left")
    clip_high = (p2[-1] - p2[above]) - 2 * high * (p1[-1] - p1[above]) + high**2 * (p0[-1] - p0[above])
    clip_low = p2[below] - 2 * low * p1[below] + low**2 * p0[below]
    inside = p0[above] - p0[below]
    noise = inside * ((high - low) / LEVELS) ** 2 / 12
    return (clip_low + clip_high + noise) / max(hist.total, 1.0)


def mse_range(hist: RunningHistogram) -> tuple[float, float]:
    """The range minimising :func:`range_mse`, by alternating exact searches over each end from min/max."""
    low, high = min(hist.low, 0.0), max(hist.high, 0.0)
    if hist.counts.sum() == 0:
        return low, high
    edges = np.arange(hist.start, hist.start + hist.counts.size + 1) * hist.width
    highs = np.append(edges[(edges > 0) & (edges < high)], high)
    lows = np.append(edges[(edges < 0) & (edges > low)], low)
    for _ in range(MSE_ROUNDS):
        new_high = float(highs[np.argmin(range_mse(hist, low, highs))])
        new_low = float(lows[np.argmin(range_mse(hist, lows, new_high))])
        if (new_low, new_high) == (low, high):
            break
        low, high = new_low, new_high
    return low, high


def choose_range(hist: RunningHistogram, method: str, percentile: float) -> tuple[float, float]:
    """One tensor's calibrated range (always containing 0, as the uint8 grid needs)."""
    if method == "minmax":
        low, high = hist.low, hist.high
    elif method == "percentile":
        low, high = hist.quantile(1 - percentile / 100), hist.quantile(percentile / 100)
    else:
        low, high = mse_range(hist)
    return min(float(low), 0.0), max(float(high), 0.0)
