"""The ``--stats`` cache: calibration statistics saved with a key of everything that changes them, validated
array by array when loaded, and reused only when the key matches; every reuse or rejection is said, with why.

The key holds the prepared model (graph and every initializer, so weights upstream of a layer count too), the
calibration data's identity (a path: the relative names, sizes and contents' hash of its files; a reader or an
iterable: a hash of its sample arrays), the preprocessing, ``--calib-size``, the layer set and the format.
``--batch-size`` is left out: the statistics are sums over rows, which batching only regroups.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np
import onnx

from onnxq.calibration.calibrate import LayerStats
from onnxq.data.npz import BadCache, CacheReader, looks_like_cache
from onnxq.data.sources import InputSpec, default_preprocessing, feeds_from
from onnxq.errors import OnnxqError
from onnxq.export.atomic import write_with
from onnxq.graph.layers import Layer

log = logging.getLogger("onnxq")
STATS_FORMAT = 4  # 3: folder samples in spread order; 4: keyed by model, data, preprocessing and calib size
# what each key entry means, for the message that says why a cache is not reused
KEY_NAMES = {"format": "the file format", "model": "the model (its graph or weights)",
             "data": "the calibration data", "preprocessing": "the preprocessing", "calib_size": "--calib-size",
             "layers": "the layers quantized"}
CENTRED_TOLERANCE = 1e-5  # E[x^2] >= E[x]^2 per input, up to float32 rounding of the Gram blocks


def statistics_key(model: onnx.ModelProto, layers: list[Layer], calib: object, inputs: list[InputSpec],
                   options: object, ignore: list[Path] = ()) -> tuple[dict, object]:
    """The cache key of this run's statistics, and the calibration data to use from here on: an iterator or
    reader is read once into a list (its samples are hashed, then calibrated on). ``ignore``: files written by
    this run, left out of a calibration folder's identity."""
    if not isinstance(calib, str | Path | list | tuple | dict):
        raw, _ = feeds_from(calib, inputs)
        calib = list(raw)
    preprocessing = default_preprocessing(inputs, options.preprocessing)
    key = {"format": STATS_FORMAT, "model": model_fingerprint(model), "data": data_identity(calib, ignore),
           "data_path": str(Path(calib).resolve()) if isinstance(calib, str | Path) else None,
           "preprocessing": json.loads(json.dumps(asdict(preprocessing), default=str)),
           "calib_size": options.calib_size or None, "layers": [layer.name for layer in layers]}
    return key, calib


def sensitivity_fingerprint(model: onnx.ModelProto, layers: list[Layer], calib: object, inputs: list[InputSpec],
                            options: object) -> str:
    """What a cached sensitivity matrix depends on beyond the widths, method and estimator in its own key: the
    statistics' key (model, data, preprocessing, --calib-size), which also fixes the held-out samples the losses
    are measured on, and the grid options that change the candidates."""
    key, _ = statistics_key(model, layers, calib, inputs, options)
    grid = [getattr(options, name, None) for name in ("symmetric", "clip", "block_size", "act_bits", "prefer")]
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


def data_identity(calib: object, ignore: list[Path] = ()) -> dict:
    """What the calibration data is: for a path, its files' relative names, sizes and contents' hash; for samples
    given in Python, a hash of their names, dtypes, shapes and values."""
    digest = hashlib.sha256()
    if isinstance(calib, str | Path):
        root = Path(calib)
        if not root.exists():
            raise OnnxqError(f"calibration path {root} does not exist; pass a folder of images or arrays")
        files = _data_files(root, {os.path.abspath(p) for p in ignore})
        for file in files:
            relative = file.name if file == root else file.relative_to(root).as_posix()
            digest.update(json.dumps([relative, file.stat().st_size]).encode())
            with open(file, "rb") as handle:
                while chunk := handle.read(1 << 20):
                    digest.update(chunk)
        return {"files": len(files), "bytes": sum(f.stat().st_size for f in files), "hash": digest.hexdigest()[:32]}
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


def save_stats(path: Path, stats: dict[str, LayerStats], key: dict) -> None:
    """Write the statistics with their key, atomically; never over a file that is not an onnxq cache."""
    if path.exists() and not looks_like_cache(path):
        log.warning("not caching statistics in %s: it exists and is not an onnxq statistics file; delete it or "
                    "choose another --stats path", path)
        return
    arrays = {"header": np.frombuffer(json.dumps({"key": key, "layers": list(stats)}).encode(), dtype=np.uint8)}
    for index, item in enumerate(stats.values()):
        arrays[f"gram_{index}"] = item.gram
        arrays[f"rowsum_{index}"] = item.row_sum
        arrays[f"info_{index}"] = np.array([item.rows, item.act_min, item.act_max, item.samples], dtype=np.float64)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_with(path, lambda handle: np.savez(handle, **arrays), "--stats")


def load_stats(path: Path, key: dict, layers: list[Layer]) -> dict[str, LayerStats] | None:
    """The cached statistics when the file's key equals ``key`` and every array is valid; else None, with a
    warning that says why (the caller recalibrates). Says so when it reuses them."""
    if not path.exists():
        return None
    try:
        stored, stats = read_stats(path, layers)
    except BadCache as err:
        log.warning("not reusing %s: %s; recalibrating", path, err)
        return None
    differences = [name for name in KEY_NAMES if stored.get(name) != key.get(name)]
    if differences:
        log.warning("not reusing %s: %s; recalibrating", path, _difference(differences, stored, key))
        return None
    log.info("reusing calibration statistics from %s (same model, data, preprocessing and --calib-size)", path)
    return stats


def cached_stats(path: Path, layers: list[Layer]) -> dict[str, LayerStats]:
    """The validated statistics of a cache file for ``layers`` whatever its key (for scripts that made the file
    themselves); empty when the file is missing, invalid, or for other layers."""
    try:
        return read_stats(path, layers)[1]
    except BadCache:
        return {}


def read_stats(path: Path, layers: list[Layer]) -> tuple[dict, dict[str, LayerStats]]:
    """The key and the validated statistics of a cache file for ``layers``; raises BadCache naming the problem."""
    with CacheReader(path) as reader:
        try:
            header = json.loads(reader.header().decode())
            if isinstance(header, dict) and "key" not in header and "format" in header:
                return {"format": header["format"]}, {}  # an earlier onnxq's file
            stored, names = header["key"], header["layers"]
            if not isinstance(stored, dict) or not isinstance(names, list):
                raise TypeError("malformed header")
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
            raise BadCache(f"not an onnxq statistics file of this version ({type(err).__name__})") from err
        if stored.get("format") != STATS_FORMAT:
            return stored, {}
        if sorted(names) != sorted(layer.name for layer in layers):
            return stored, {}
        by_name = {layer.name: layer for layer in layers}
        return stored, {name: _layer_stats(reader, index, by_name[name]) for index, name in enumerate(names)}


def _layer_stats(reader: CacheReader, index: int, layer: Layer) -> LayerStats:
    """One layer's arrays, checked: shapes from its fan-in and groups, finite values, a non-negative Gram
    diagonal no smaller than the squared mean, a positive row and sample count, an ordered input range."""
    g, d = layer.groups, layer.fan_in
    gram = reader.array(f"gram_{index}", (g, d, d)).astype(np.float64)
    row_sum = reader.array(f"rowsum_{index}", (g, d)).astype(np.float64)
    rows, low, high, samples = reader.array(f"info_{index}", (4,), "fiu").astype(np.float64)
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
