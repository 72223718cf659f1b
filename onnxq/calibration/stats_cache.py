"""The ``--stats`` cache: calibration statistics saved with a key of everything that changes them, validated
array by array when loaded, and reused only when the key matches; every reuse or rejection is said, with why.

The key holds the prepared model (graph and every initializer, so weights upstream of a layer count too), the
calibration data's identity (a path: the relative names, sizes and contents' hash of its files; a reader or an
iterable: a hash of its sample arrays), the preprocessing, ``--calib-size``, the layer set and the format.
``--batch-size`` is left out: the statistics are sums over rows, which batching only regroups.
With activation quantization the file also holds each candidate tensor's activation histogram (or only its
range for ``--act-method minmax``), so ``--stats`` covers W8A8 runs; a file without the activations a run needs
is measured again (one pass gives both).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Collection
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx

from onnxq.calibration.calibrate import LayerStats
from onnxq.config import Config
from onnxq.data.npz import BadCache, CacheReader, looks_like_cache
from onnxq.data.sources import InputSpec, augmentation_key, default_preprocessing, feeds_from
from onnxq.errors import OnnxqError
from onnxq.export.atomic import write_with
from onnxq.graph.layers import Layer
from onnxq.passes.histogram import BINS, RunningHistogram

log = logging.getLogger("onnxq")
STATS_FORMAT = 5  # 3: folder samples in spread order; 4: keyed by model, data, preprocessing and calib size;
# 5: activation histograms beside the Gram statistics
# what each key entry means, for the message that says why a cache is not reused
KEY_NAMES = {"format": "the file format", "model": "the model (its graph or weights)",
             "data": "the calibration data", "preprocessing": "the preprocessing", "calib_size": "--calib-size",
             "layers": "the layers quantized"}
CENTRED_TOLERANCE = 1e-5  # E[x^2] >= E[x]^2 per input, up to float32 rounding of the Gram blocks


@dataclass
class Statistics:
    """What calibration measured on the float model: each layer's Gram statistics (what rounding needs) and, with
    activation quantization, the histogram of each activation tensor that may get Q/DQ. ``key`` says what they were
    measured on (model, data, preprocessing, ``--calib-size``, layers: see :func:`statistics_key`); empty when a run
    did not need it. ``save`` writes the ``--stats`` file a later run with the same key reuses."""

    layers: dict[str, LayerStats]
    activations: dict[str, RunningHistogram] = field(default_factory=dict)
    key: dict = field(default_factory=dict)
    histograms: bool = True  # False: the activations hold exact ranges only (--act-method minmax)

    @property
    def samples(self) -> int:
        """The calibration samples the Gram statistics were summed over (0 without layers)."""
        return next(iter(self.layers.values())).samples if self.layers else 0

    def covers(self, tensors: Collection[str], histograms: bool) -> bool:
        """Whether these statistics hold the activations of ``tensors`` (with histograms when asked)."""
        return set(tensors) <= set(self.activations) and (self.histograms or not histograms or not tensors)

    def save(self, path: str | Path) -> None:
        """Write the statistics with their key as a ``--stats`` file (atomically)."""
        if not self.key:
            raise OnnxqError("these statistics have no key (they came from a run that did not need one); compute "
                             "them with onnxq.calibrate to save them")
        save_stats(Path(path), self)


def statistics_key(model: onnx.ModelProto, layers: list[Layer], calib: object, inputs: list[InputSpec],
                   config: Config, ignore: list[Path] = ()) -> tuple[dict, object]:
    """The cache key of this run's statistics, and the calibration data to use from here on: an iterator or
    reader is read once into a list (its samples are hashed, then calibrated on). ``ignore``: files written by
    this run, left out of a calibration folder's identity."""
    if not isinstance(calib, str | Path | list | tuple | dict):
        raw, _ = feeds_from(calib, inputs)
        calib = list(raw)
    preprocessing = default_preprocessing(inputs, config.data.preprocessing)
    key = {"format": STATS_FORMAT, "model": model_fingerprint(model), "data": data_identity(calib, ignore),
           "data_path": str(Path(calib).resolve()) if isinstance(calib, str | Path) else None,
           "preprocessing": json.loads(json.dumps(asdict(preprocessing), default=str)),
           **({"augmentation": augmentation_key()} if preprocessing.augment else {}),
           "calib_size": config.data.calib_size or None, "layers": [layer.name for layer in layers]}
    return key, calib


def sensitivity_fingerprint(model: onnx.ModelProto, layers: list[Layer], calib: object, inputs: list[InputSpec],
                            config: Config) -> str:
    """What a cached sensitivity matrix depends on beyond the widths, method and estimator in its own key: the
    statistics' key (model, data, preprocessing, --calib-size), which also fixes the held-out samples the losses
    are measured on, and the grid options that change the candidates."""
    key, _ = statistics_key(model, layers, calib, inputs, config)
    rounding, acts = config.rounding, config.activations
    grid = [bool(rounding.symmetric), rounding.clip, rounding.block_size, acts.bits if acts else None,
            acts.prefer if acts else "size"]
    return hashlib.sha256(json.dumps([key, grid], default=str).encode()).hexdigest()[:32]


def model_fingerprint(model: onnx.ModelProto) -> str:
    """A hash of the graph and every initializer (each serialized alone, so a model over 2 GB is fine)."""
    digest = hashlib.sha256()
    for node in model.graph.node:
        digest.update(node.SerializeToString())
    for value in list(model.graph.input) + list(model.graph.output):
        digest.update(value.SerializeToString())
    for tensor in model.graph.initializer:
        digest.update(tensor.SerializeToString())
    return digest.hexdigest()[:32]


_HASHED: dict[tuple, dict] = {}  # a calibration folder's listing (names, sizes, mtimes) -> its identity


def data_identity(calib: object, ignore: list[Path] = ()) -> dict:
    """What the calibration data is: for a path, its files' relative names, sizes and contents' hash; for samples
    given in Python, a hash of their names, dtypes, shapes and values."""
    digest = hashlib.sha256()
    if isinstance(calib, str | Path):
        root = Path(calib)
        if not root.exists():
            raise OnnxqError(f"calibration path {root} does not exist; pass a folder of images or arrays")
        files = _data_files(root, {os.path.abspath(p) for p in ignore})
        stats = [file.stat() for file in files]
        listing = tuple((file.name if file == root else file.relative_to(root).as_posix(), stat.st_size,
                         stat.st_mtime_ns) for file, stat in zip(files, stats, strict=True))
        if listing in _HASHED:  # the same files, unchanged, already hashed in this process (--stats, then the
            return dict(_HASHED[listing])  # sensitivity cache's fingerprint, read the folder once, not twice)
        for file, (relative, size, _) in zip(files, listing, strict=True):
            digest.update(json.dumps([relative, size]).encode())
            with open(file, "rb") as handle:
                while chunk := handle.read(1 << 20):
                    digest.update(chunk)
        identity = {"files": len(files), "bytes": sum(size for _, size, _ in listing), "hash": digest.hexdigest()[:32]}
        if len(_HASHED) >= 8:
            _HASHED.pop(next(iter(_HASHED)))
        _HASHED[listing] = identity
        return dict(identity)
    feeds = [calib] if isinstance(calib, dict) else calib
    for feed in feeds:
        if not isinstance(feed, dict):  # not a sample: calibration reports it, with the expected input names
            digest.update(type(feed).__name__.encode())
            continue
        for name in sorted(feed):
            array = np.ascontiguousarray(feed[name])
            digest.update(json.dumps([name, array.dtype.str, array.shape]).encode())
            digest.update(array.view(np.uint8).reshape(-1) if array.size and not array.dtype.hasobject else b"")
    return {"samples": len(feeds), "hash": digest.hexdigest()[:32]}


def _data_files(root: Path, ignore: set[str]) -> list[Path]:
    """The regular files under a calibration path, sorted; onnxq's own outputs and staging folders left out."""
    if root.is_file():
        return [root]
    if not root.is_dir():
        return []
    files = [p for p in root.rglob("*") if p.is_file() and not any(part.startswith(".onnxq-") for part in p.parts)]
    return sorted((p for p in files if os.path.abspath(p) not in ignore), key=lambda p: p.relative_to(root).parts)


def describe_data(key: dict) -> str:
    """The calibration data of a key in words: its path and size, or its sample count."""
    identity = key.get("data") or {}
    if "files" in identity:
        return f"{key.get('data_path')}, {identity['files']} files, {identity['bytes']} bytes"
    return f"{identity.get('samples', '?')} samples given in Python"


def save_stats(path: Path, statistics: Statistics) -> None:
    """Write the statistics with their key, atomically; never over a file that is not an onnxq cache."""
    if path.exists() and not looks_like_cache(path):
        log.warning("not caching statistics in %s: it exists and is not an onnxq statistics file; delete it or "
                    "choose another --stats path", path)
        return
    header = {"key": statistics.key, "layers": list(statistics.layers), "activations": list(statistics.activations),
              "histograms": statistics.histograms}
    arrays = {"header": np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)}
    for index, item in enumerate(statistics.layers.values()):
        arrays[f"gram_{index}"] = item.gram
        arrays[f"rowsum_{index}"] = item.row_sum
        arrays[f"info_{index}"] = np.array([item.rows, item.act_min, item.act_max, item.samples], dtype=np.float64)
    for index, hist in enumerate(statistics.activations.values()):
        arrays[f"hist_{index}"] = hist.counts
        arrays[f"histinfo_{index}"] = np.array([hist.width, hist.start, hist.zeros, hist.low, hist.high])
    path.parent.mkdir(parents=True, exist_ok=True)
    write_with(path, lambda handle: np.savez(handle, **arrays), "--stats")


def load_stats(path: Path, key: dict, layers: list[Layer], tensors: Collection[str] = (),
               histograms: bool = False) -> Statistics | None:
    """The cached statistics when the file's key equals ``key``, it holds the activations of ``tensors`` (with
    histograms when asked) and every array is valid; else None, with a warning that says why (the caller
    recalibrates). Says so when it reuses them."""
    if not path.exists():
        return None
    try:
        stored = read_stats(path, layers)
    except BadCache as err:
        log.warning("not reusing %s: %s; recalibrating", path, err)
        return None
    difference = key_difference(stored.key, key)
    if difference:
        log.warning("not reusing %s: %s; recalibrating", path, difference)
        return None
    if not stored.covers(tensors, histograms):
        what = "activation histograms" if stored.activations else "activation statistics"
        log.warning("not reusing %s: it holds no %s for these activations (it was made without --act-bits 8, or "
                    "with --act-method minmax); recalibrating", path, what)
        return None
    log.info("reusing calibration statistics from %s (same model, data, preprocessing and --calib-size)", path)
    return stored


def cached_stats(path: Path, layers: list[Layer]) -> dict[str, LayerStats]:
    """The validated statistics of a cache file for ``layers`` whatever its key (for scripts that made the file
    themselves); empty when the file is missing, invalid, or for other layers."""
    try:
        return read_stats(path, layers).layers
    except BadCache:
        return {}


def read_stats(path: Path, layers: list[Layer]) -> Statistics:
    """The validated statistics of a cache file for ``layers``, with its key (no layers when the file is of another
    format or for other layers); raises BadCache naming the problem."""
    with CacheReader(path) as reader:
        try:
            header = json.loads(reader.header().decode())
            if isinstance(header, dict) and "key" not in header and "format" in header:
                return Statistics({}, key={"format": header["format"]})  # an earlier onnxq's file
            stored, names = header["key"], header["layers"]
            tensors, histograms = header.get("activations", []), bool(header.get("histograms", False))
            if not isinstance(stored, dict) or not isinstance(names, list) or not isinstance(tensors, list):
                raise TypeError("malformed header")
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
            raise BadCache(f"not an onnxq statistics file of this version ({type(err).__name__})") from err
        if stored.get("format") != STATS_FORMAT:
            return Statistics({}, key=stored)
        if sorted(names) != sorted(layer.name for layer in layers):
            return Statistics({}, key=stored)
        by_name = {layer.name: layer for layer in layers}
        stats = {name: _layer_stats(reader, index, by_name[name]) for index, name in enumerate(names)}
        hists = {str(name): _histogram(reader, index, str(name)) for index, name in enumerate(tensors)}
        return Statistics(stats, hists, stored, histograms)


def _histogram(reader: CacheReader, index: int, tensor: str) -> RunningHistogram:
    """One activation tensor's histogram, checked: at most BINS non-negative counts on a positive bin width (or
    none, for a tensor of zeros or a range-only entry), an ordered range."""
    counts = reader.array(f"hist_{index}", None, "f", BINS)
    width, start, zeros, low, high = reader.array(f"histinfo_{index}", (5,), "f")
    problem = None
    if counts.ndim != 1 or (counts < 0).any() or zeros < 0 or zeros != int(zeros) or start != int(start):
        problem = "negative or fractional counts"
    elif width < 0 or (counts.size and width == 0):
        problem = f"a bin width of {width:g}"
    elif low > high:
        problem = f"a range [{low:g}, {high:g}]"
    if problem:
        raise BadCache(f"activation {tensor} has {problem}")
    return RunningHistogram.restored(float(width), int(start), counts.astype(np.float64), int(zeros),
                                     float(low), float(high))


def _layer_stats(reader: CacheReader, index: int, layer: Layer) -> LayerStats:
    """One layer's arrays, checked: shapes from its fan-in and groups, finite values, a non-negative Gram
    diagonal no smaller than the squared mean, a positive row and sample count, an ordered input range."""
    g, d = layer.groups, layer.fan_in
    gram = reader.array(f"gram_{index}", (g, d, d)).astype(np.float64)
    row_sum = reader.array(f"rowsum_{index}", (g, d)).astype(np.float64)
    rows, low, high, samples = reader.array(f"info_{index}", (4,), "fiu").astype(np.float64)
    if rows == samples == 0 and not gram.any() and not row_sum.any():  # a body layer the data never ran
        return LayerStats(gram, 0, np.inf, -np.inf, 0, row_sum)
    problem = None
    if rows < 1 or rows != int(rows) or samples < 1 or samples != int(samples):
        problem = f"a row count of {rows:g} and a sample count of {samples:g}"
    elif not np.isfinite([low, high]).all() or low > high:
        problem = f"an input range [{low:g}, {high:g}]"
    elif (np.diagonal(gram, axis1=1, axis2=2) < 0).any():
        problem = "a negative Gram diagonal"
    else:
        second = np.diagonal(gram, axis1=1, axis2=2) / rows
        if (second - (row_sum / rows) ** 2 < -CENTRED_TOLERANCE * (second.max() + 1e-30)).any():
            problem = "a mean larger than its second moment allows"
    if problem:
        raise BadCache(f"layer {layer.name} has {problem}")
    return LayerStats(gram, int(rows), float(low), float(high), int(samples), row_sum)


def key_difference(stored: dict, key: dict) -> str | None:
    """Why statistics made under ``stored`` do not fit a run of ``key`` (None when they do)."""
    differences = [name for name in KEY_NAMES if stored.get(name) != key.get(name)]
    return _difference(differences, stored, key) if differences else None


def _difference(names: list[str], stored: dict, key: dict) -> str:
    """Why the key differs, e.g. "it was made with other calibration data (old: ...; now: ...)"."""
    name = names[0]
    if name == "data" and isinstance(stored.get("data"), dict):
        return f"it was made with other calibration data ({describe_data(stored)}; now {describe_data(key)})"
    if name == "calib_size":
        return f"it was made with --calib-size {stored.get('calib_size') or 0}, this run uses {key['calib_size'] or 0}"
    if name == "format":
        return f"it was written by another onnxq version (format {stored.get('format')}, this one reads {STATS_FORMAT})"
    others = ", ".join(KEY_NAMES[n] for n in names[1:])
    return f"{KEY_NAMES[name]} changed" + (f" (and {others})" if others else "")
