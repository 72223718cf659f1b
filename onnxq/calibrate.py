"""Run the float model with onnxruntime and accumulate each layer's Gram matrix ``H = X^T X``.

One session exposes every layer input as an extra output; batches stream through it and each input
is unfolded exactly as its operator reads it; blocks of rows are multiplied in float32 and summed into
``H`` in float64. Nothing grows with the
calibration set, so memory is bounded by one batch. When the model takes an attention mask, padding tokens
are left out of every (batch, tokens, features) layer input (``masking.py``).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from threadpoolctl import threadpool_limits

from .errors import OnnxqError
from .gram import COLUMN_CHUNK_ELEMENTS, add_columns, add_conv, add_pointwise
from .gram import GRAM_BLOCK_ROWS as GRAM_BLOCK_ROWS  # re-exported for sequential.py
from .layers import Layer
from .loading import proto_size
from .masking import attention_mask_name, batch_mask, token_rows
from .sources import Feed, feed_samples, model_inputs
from .unfold import unfold_columns

UNFOLD_CHUNK_ELEMENTS = COLUMN_CHUNK_ELEMENTS  # unfolded values processed at once: bounds the im2col copy
STATS_FORMAT = 3  # 2: row sums next to the Grams; 3: folder samples in spread order (older files: recalibrated)


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
        self.act_min = min(self.act_min, float(x.min()))
        self.act_max = max(self.act_max, float(x.max()))
        if is_pointwise(layer):
            add_pointwise(self.gram, self.row_sum, x)
            self.rows += x.size // x.shape[1]
        elif layer.op_type == "Conv":
            self.rows += add_conv(self.gram, self.row_sum, x, layer.conv, layer.groups)
        else:
            columns = unfold_columns(layer, x)
            add_columns(self.gram, self.row_sum, columns)
            self.rows += columns.shape[2]

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
        mean = self.mean
        return self.normalised_gram - mean[:, :, None] * mean[:, None, :]


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


def capture_model(model: onnx.ModelProto, tensors: list[str]) -> onnx.ModelProto:
    """A copy of the model whose outputs are the given intermediate tensors."""
    captured = onnx.ModelProto()
    captured.CopyFrom(model)
    known = {v.name: v for v in list(model.graph.value_info) + list(model.graph.output)}
    del captured.graph.output[:]
    for name in tensors:
        value = known.get(name) or onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
        captured.graph.output.append(value)
    return captured


def make_session(model: onnx.ModelProto, threads: int = 0) -> ort.InferenceSession:
    """A CPU session for an in-memory model (spilled to a temporary file when over protobuf's 2 GB)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    if proto_size(model) < 2**31 - 2**26:
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    with tempfile.TemporaryDirectory(prefix="onnxq-") as tmp:
        path = Path(tmp) / "model.onnx"
        onnx.save(model, str(path), save_as_external_data=True, location="model.data")
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def calibrate(model: onnx.ModelProto, layers: list[Layer], batches: Iterable[Feed],
              on_batch: Callable[[int], None] | None = None) -> dict[str, LayerStats]:
    """Stream the batches through the float model and return each layer's statistics."""
    graph_inputs = {v.name for v in model.graph.input}
    captured = sorted({layer.activation for layer in layers} - graph_inputs)
    session = make_session(capture_model(model, captured)) if captured else None
    stats = {layer.name: empty_stats(layer) for layer in layers}
    mask_name = attention_mask_name(model_inputs(model))

    def forward(feed: Feed) -> dict[str, np.ndarray]:
        values = dict(zip(captured, session.run(captured, feed), strict=True)) if session else {}
        values.update(feed)
        return values

    with threadpool_limits(1):  # one BLAS thread: small GEMMs lose to thread hand-offs; forward uses the other core
        for feed, values in ahead(batches, forward):
            mask = batch_mask(feed, mask_name)
            for layer in layers:
                stats[layer.name].merge(np.asarray(values[layer.activation], dtype=np.float32), layer, mask)
            if on_batch:
                on_batch(feed_samples(feed))
    return stats


def ahead(items: Iterable[Feed], work: Callable[[Feed], dict]) -> Iterator[tuple[Feed, dict]]:
    """``(item, work(item))`` in order, the next item's work already running in a thread while the caller
    handles this one: onnxruntime's forward pass of batch k+1 overlaps the Gram updates of batch k (both
    release the GIL), at the cost of one more batch of layer inputs in memory."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = None
        for item in items:
            submitted = (item, pool.submit(work, item))
            if pending is not None:
                yield pending[0], pending[1].result()
            pending = submitted
        if pending is not None:
            yield pending[0], pending[1].result()


def save_stats(path: Path, stats: dict[str, LayerStats], fingerprint: str) -> None:
    """Write statistics atomically (temporary file, then rename) so an interrupted run leaves nothing."""
    arrays = {"header": np.frombuffer(json.dumps(
        {"fingerprint": fingerprint, "format": STATS_FORMAT, "layers": list(stats)}).encode(), dtype=np.uint8)}
    for index, item in enumerate(stats.values()):
        arrays[f"gram_{index}"] = item.gram
        arrays[f"rowsum_{index}"] = item.row_sum
        arrays[f"info_{index}"] = np.array([item.rows, item.act_min, item.act_max, item.samples])
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            np.savez(handle, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_stats(path: Path, fingerprint: str) -> dict[str, LayerStats] | None:
    """Statistics saved for the same layers and weights, or None when the file is for another model."""
    try:
        with np.load(path) as data:
            header = json.loads(data["header"].tobytes().decode())
            if header.get("fingerprint") != fingerprint or header.get("format", 1) < STATS_FORMAT:
                return None
            stats = {}
            for index, name in enumerate(header["layers"]):
                rows, lo, hi, samples = data[f"info_{index}"]
                stats[name] = LayerStats(data[f"gram_{index}"], int(rows), float(lo), float(hi), int(samples),
                                         data[f"rowsum_{index}"])
            return stats
    except (OSError, ValueError, KeyError) as err:
        raise OnnxqError(f"cannot read statistics file {path} ({err}); delete it to recalibrate") from err
