"""Run the float model with onnxruntime and accumulate each layer's Gram matrix ``H = X^T X``.

One session exposes every layer input as an extra output; batches stream through it and each input
is unfolded exactly as its operator reads it; blocks of rows are multiplied in float32 and summed into
``H`` in float64. Nothing grows with the
calibration set, so memory is bounded by one batch. When the model takes an attention mask, padding tokens
are left out of every (batch, tokens, features) layer input (``masking.py``).
"""

from __future__ import annotations

import copy
import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import onnx
from threadpoolctl import threadpool_limits

from onnxq.calibration.capture import Observer, capture
from onnxq.calibration.gram import COLUMN_CHUNK_ELEMENTS, add_columns, add_conv, add_pointwise
from onnxq.calibration.unfold import unfold_columns
from onnxq.data.masking import attention_mask_name, batch_mask, token_rows
from onnxq.data.sources import Feed, model_inputs
from onnxq.graph.bodies import unreached_layers
from onnxq.graph.layers import Layer, grouped_reasons
from onnxq.passes.gram import FLOAT32_EXPONENT_LIMIT, centred_gram, overflow_shift

log = logging.getLogger("onnxq")
UNFOLD_CHUNK_ELEMENTS = COLUMN_CHUNK_ELEMENTS  # unfolded values processed at once: bounds the im2col copy
RANGE_CHUNK_ELEMENTS = 1 << 16  # values per min/max pair: the max re-reads them from cache, not from memory


@dataclass
class LayerStats:
    """What a rounding pass needs from calibration: the Gram matrix (G x d x d), the row sums (G x d) and
    input ranges. The row sums give the mean input, for bias correction and the centred Gram matrix."""

    gram: np.ndarray
    rows: int
    act_min: float
    act_max: float
    samples: int = 0
    row_sum: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.row_sum is None:
            self.row_sum = np.zeros(self.gram.shape[:2])

    def merge(self, x: np.ndarray, layer: Layer, mask: np.ndarray | None = None) -> None:
        """Add one batch of the layer's raw input (only its real tokens, given the batch's attention mask)."""
        self.samples += x.shape[0]
        x = token_rows(x, layer, mask)
        if not x.size:
            return
        low, high = value_range(x)
        self.act_min, self.act_max = min(self.act_min, low), max(self.act_max, high)
        top = max(-low, high)  # the range decides whether float32 products could overflow: no second pass over x
        safe = bool(np.isfinite(top)) and top * top * x.size < 2.0**FLOAT32_EXPONENT_LIMIT
        if is_pointwise(layer):
            rows = self._add(add_pointwise, x, safe=safe)
        elif layer.op_type == "Conv":
            rows = self._add(add_conv, x, layer.conv, layer.groups, safe=safe)
        else:
            rows = self._add(add_columns, unfold_columns(layer, x), safe=safe)
        self.rows += rows

    def _add(self, kernel: Callable, x: np.ndarray, *args: object, safe: bool = False) -> int:
        """Run a float32 Gram kernel on ``x`` (pre-scaled by an exact power of two when its squares could overflow
        float32's range: values near 1e15 and up; ``safe`` when the caller's range check has ruled that out) and
        return the rows it added."""
        shift = 0 if safe else overflow_shift(x)
        if not shift:
            with np.errstate(invalid="ignore", over="ignore"):  # Inf activations: reported per layer by the caller
                rows = kernel(self.gram, self.row_sum, x, *args)
            return x.size // x.shape[1] if rows is None else rows
        gram, row_sum = np.zeros_like(self.gram), np.zeros_like(self.row_sum)
        scaled = np.ldexp(x, -shift).astype(np.float32)
        rows = kernel(gram, row_sum, scaled, *args)
        self.gram += np.ldexp(gram, 2 * shift)
        self.row_sum += np.ldexp(row_sum, shift)
        return scaled.size // scaled.shape[1] if rows is None else rows

    @property
    def normalised_gram(self) -> np.ndarray:
        """``H / rows``: the same minimiser, with magnitudes independent of the calibration size."""
        return self.gram / max(self.rows, 1)

    @property
    def mean(self) -> np.ndarray:
        """The mean input row (G x d): what a constant bias shift sees."""
        return self.row_sum / max(self.rows, 1)

    @property
    def centred_gram(self) -> np.ndarray:
        """``E[x x^T] - mean mean^T``: the error left once the bias absorbs the error's mean (bias correction)."""
        return centred_gram(self.normalised_gram, self.mean)


def value_range(x: np.ndarray) -> tuple[float, float]:
    """``(x.min(), x.max())`` (NaN if x holds one) in one sweep over memory: both reductions per cache-sized chunk
    (MobileNet's layer inputs, 62 M values per batch: 26 instead of 36 ms)."""
    if not x.flags.c_contiguous or x.size <= RANGE_CHUNK_ELEMENTS:
        return float(x.min()), float(x.max())
    flat = x.reshape(-1)
    starts = range(0, flat.size, RANGE_CHUNK_ELEMENTS)
    lows, highs = np.empty(len(starts), x.dtype), np.empty(len(starts), x.dtype)
    for k, start in enumerate(starts):
        chunk = flat[start:start + RANGE_CHUNK_ELEMENTS]
        lows[k], highs[k] = chunk.min(), chunk.max()
    return float(lows.min()), float(highs.max())


def is_pointwise(layer: Layer) -> bool:
    """A 1x1, stride-1, unpadded, ungrouped 2-D Conv: its unfolded input is just the pixels."""
    conv = layer.conv
    return (layer.op_type == "Conv" and layer.groups == 1 and len(layer.shape) == 4
            and all(k == 1 for k in conv["kernel_shape"]) and all(s == 1 for s in conv["strides"])
            and not any(conv["pads"]) and conv.get("auto_pad", "NOTSET") in ("NOTSET", "", "VALID"))


def empty_stats(layer: Layer) -> LayerStats:
    d = layer.fan_in
    return LayerStats(np.zeros((layer.groups, d, d)), 0, np.inf, -np.inf)


def batch_chunks(x: np.ndarray, layer: Layer) -> Iterable[np.ndarray]:
    """Split a batch along its first axis so one unfolded chunk stays small."""
    if layer.op_type != "Conv" or x.shape[0] <= 1:
        yield x
        return
    per_sample = x[0].size * int(np.prod(layer.conv["kernel_shape"])) // max(
        1, int(np.prod(layer.conv["strides"])))
    step = max(1, UNFOLD_CHUNK_ELEMENTS // max(per_sample, 1))
    for start in range(0, x.shape[0], step):
        yield x[start:start + step]


def input_signature(layer: Layer) -> tuple:
    """What a layer's statistics depend on besides the data: its input tensor and how it unfolds it. Layers with
    the same signature (a transformer's query, key and value projections) have identical statistics."""
    conv = tuple(sorted((k, str(v)) for k, v in layer.conv.items())) if layer.op_type == "Conv" else ()
    return (layer.activation, layer.op_type, layer.op_type == "Gemm" and layer.trans_a, layer.groups,
            layer.fan_in, len(layer.shape), conv)


class GramObserver:
    """Accumulates each layer's statistics from its input tensor (padding tokens left out); layers that read the
    same input the same way (``input_signature``) share one accumulation.

    With a thread pool, the layers of one batch are merged in parallel (numpy and BLAS release the GIL), the
    slowest layers of the previous batch first so the workers finish together; each layer still takes its batches
    in order, so the sums are the same as on one thread."""

    def __init__(self, layers: list[Layer], mask_name: str | None, pool: ThreadPoolExecutor | None = None) -> None:
        first = {}
        for layer in layers:
            first.setdefault(input_signature(layer), layer)
        self.layers = list(first.values())  # the layers whose statistics are accumulated
        self.same_as = {layer.name: first[input_signature(layer)].name for layer in layers}
        self.tensors = sorted({layer.activation for layer in layers})
        self.mask_name = mask_name
        self.accumulated = {layer.name: empty_stats(layer) for layer in self.layers}
        self.pool = pool
        self.seconds = dict.fromkeys((layer.name for layer in self.layers), 0.0)

    @property
    def stats(self) -> dict[str, LayerStats]:
        """Every layer's statistics (a copy of the shared ones for the layers that share them)."""
        return {name: self.accumulated[name] if name == source else copy.deepcopy(self.accumulated[source])
                for name, source in self.same_as.items()}

    def update(self, values: dict[str, np.ndarray], feed: Feed) -> None:
        mask = batch_mask(feed, self.mask_name)

        def merge(layer: Layer) -> None:
            start = time.perf_counter()
            self.accumulated[layer.name].merge(np.asarray(values[layer.activation], dtype=np.float32), layer, mask)
            self.seconds[layer.name] = time.perf_counter() - start

        if self.pool is None:
            for layer in self.layers:
                merge(layer)
            return
        slowest_first = sorted(self.layers, key=lambda layer: -self.seconds[layer.name])
        for done in [self.pool.submit(merge, layer) for layer in slowest_first]:
            done.result()


def gram_workers() -> int:
    """Threads for the Gram updates: one per core this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def calibrate(model: onnx.ModelProto, layers: list[Layer], batches: Iterable[Feed],
              on_batch: Callable[[int], None] | None = None, observers: Sequence[Observer] = ()
              ) -> dict[str, LayerStats]:
    """Stream the batches through the float model and return each layer's statistics (``observers`` see the same
    pass: activation histograms for W8A8)."""
    # one BLAS thread per call: small GEMMs lose to thread hand-offs; the cores are used by the layer workers
    # and by the forward pass of the next batch instead
    with threadpool_limits(1), ThreadPoolExecutor(gram_workers(), thread_name_prefix="onnxq-gram") as pool:
        observer = GramObserver(layers, attention_mask_name(model_inputs(model)), pool)
        capture(model, batches, [observer, *observers], on_batch)
    stats = observer.stats
    unreached = unreached_layers(layers, stats)  # If branches the data never took
    if unreached:
        log.warning("%d layer(s) the calibration data never ran: %s", len(unreached),
                    "; ".join(grouped_reasons(unreached)))
    return stats
