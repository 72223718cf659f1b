"""The calibration data of one run, read and preprocessed once, with explicit splits.

``--calib`` (a folder, files, a ``CalibrationDataReader`` or an iterable of feed dicts) is decoded and validated on
first use into batches: the first ``calib_size`` samples are the *calibration* split (Gram matrices, activation
ranges, sequential stages), the samples after them the *held-out* split (CLADO's loss oracle, verification, the
final check). Every consumer reads the batches from here, so a reader with only ``get_next()`` works in every mode
and no image is decoded twice. Batches stay in memory up to a byte limit and go to a temporary file beyond it,
so memory stays bounded whatever the number of samples.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import OnnxqError
from .images import ImagePreprocessing
from .sources import Feed, InputSpec, batches, default_preprocessing, feed_samples, feeds_from, is_mergeable

log = logging.getLogger("onnxq")
MEMORY_LIMIT_BYTES = 64 << 20  # batches beyond this many bytes are spilled to a temporary file


class SpillStore:
    """Arrays kept in memory up to a byte limit and appended to one temporary file beyond it.

    Spilled arrays are read back with one ``np.fromfile`` each, so they occupy memory only while a consumer
    holds them (a memory map would keep every page it touched resident).
    """

    def __init__(self, memory_limit: int = MEMORY_LIMIT_BYTES) -> None:
        self.memory_limit = memory_limit
        self.in_memory = 0
        self.items: list[np.ndarray | tuple[int, np.dtype, tuple[int, ...]]] = []
        self._folder: tempfile.TemporaryDirectory | None = None
        self._file = None
        self._offset = 0

    def put(self, array: np.ndarray) -> int:
        """Store a copy-free reference (in memory) or the bytes (spilled); returns the key to ``get`` it."""
        array = np.ascontiguousarray(array)
        if self.in_memory + array.nbytes <= self.memory_limit or array.dtype.hasobject:
            self.in_memory += array.nbytes
            self.items.append(array)
        else:
            handle = self._spill_file()
            handle.write(array.tobytes())
            self.items.append((self._offset, array.dtype, array.shape))
            self._offset += array.nbytes
        return len(self.items) - 1

    def get(self, key: int) -> np.ndarray:
        item = self.items[key]
        if isinstance(item, np.ndarray):
            return item
        offset, dtype, shape = item
        self._file.flush()
        count = int(np.prod(shape, dtype=np.int64))
        return np.fromfile(self._file.name, dtype=dtype, count=count, offset=offset).reshape(shape)

    @property
    def spilled_bytes(self) -> int:
        return self._offset

    def _spill_file(self):
        if self._file is None:
            self._folder = tempfile.TemporaryDirectory(prefix="onnxq-calib-")
            self._file = open(Path(self._folder.name) / "batches.bin", "wb")  # noqa: SIM115 - closed in close()
        return self._file

    def close(self) -> None:
        """Delete the spill file (also done when the store is garbage-collected)."""
        if self._file is not None:
            self._file.close()
            self._folder.cleanup()
            self._file = self._folder = None
        self.items.clear()


@dataclass
class _Batch:
    keys: dict[str, int]
    samples: int


class CalibrationSet:
    """The ``--calib`` source decoded once into a calibration split and a held-out split.

    ``calib_size`` samples (None: all) calibrate; up to ``held_out`` samples after them are kept for measuring
    losses and checking the written model on data the statistics never saw. Nothing is read until a split is
    asked for, so a run that reuses cached statistics decodes only what its check needs.
    """

    def __init__(self, source: object, inputs: list[InputSpec], preprocessing: ImagePreprocessing | None = None,
                 batch_size: int = 16, calib_size: int | None = 256, held_out: int = 0,
                 memory_limit: int = MEMORY_LIMIT_BYTES) -> None:
        if batch_size < 1:
            raise OnnxqError(f"batch size must be positive, not {batch_size}")
        self.source = source
        self.inputs = inputs
        self.preprocessing = default_preprocessing(inputs, preprocessing)
        self.batch_size = batch_size
        self.calib_size = calib_size or None
        self.held_out_size = held_out
        self.store = SpillStore(memory_limit)
        self._calibration: list[_Batch] | None = None
        self._held_out: list[_Batch] = []
        self.reads = 0  # times the source was opened: one per run

    # -- the splits ---------------------------------------------------------------------------------------------
    @property
    def samples(self) -> int:
        """Calibration samples (the first split)."""
        return sum(batch.samples for batch in self._loaded())

    @property
    def held_out_samples(self) -> int:
        self._loaded()
        return sum(batch.samples for batch in self._held_out)

    def calibration(self) -> Iterator[Feed]:
        """The calibration batches, in the order the source gave them."""
        return (self._feed(batch) for batch in self._loaded())

    def held_out(self, samples: int | None = None) -> list[Feed]:
        """Up to ``samples`` held-out samples in batches (all kept ones when None)."""
        self._loaded()
        return self._take(self._held_out, samples)

    def first(self, samples: int) -> list[Feed]:
        """The first ``samples`` calibration samples in batches (for when no held-out samples exist)."""
        return self._take(self._loaded(), samples)

    def check_batch(self) -> tuple[Feed | None, bool]:
        """One batch to check the written model on, and whether it is held out (else a calibration batch)."""
        held = self.held_out(self.batch_size)
        if held and is_mergeable(self.inputs):
            return {name: np.concatenate([feed[name] for feed in held]) for name in held[0]}, True
        if held:
            return held[0], True
        return next(self.calibration(), None), False

    def identity(self) -> object:
        """What identifies the data to the caches: a path as given (its files are hashed), else the decoded
        batches (the source itself may be a reader that can be drained only once)."""
        if isinstance(self.source, str | Path):
            return self.source
        self._loaded()
        return [self._feed(batch) for batch in self._calibration + self._held_out]

    def close(self) -> None:
        self.store.close()

    # -- reading ------------------------------------------------------------------------------------------------
    def _loaded(self) -> list[_Batch]:
        if self._calibration is None:
            self._read()
        return self._calibration

    def _read(self) -> None:
        """Decode and validate the source once, splitting the batches at ``calib_size`` samples."""
        self.reads += 1
        raw, _ = feeds_from(self.source, self.inputs, self.preprocessing)
        limit = self.calib_size + self.held_out_size if self.calib_size else None
        mergeable = is_mergeable(self.inputs)
        calibration: list[_Batch] = []
        taken = 0
        for feed in batches(raw, self.inputs, self.batch_size, limit):
            rows = feed_samples(feed) if mergeable else 1
            room = (self.calib_size - taken) if self.calib_size else rows
            if room >= rows:
                calibration.append(self._put(feed, rows))
            elif room > 0:
                calibration.append(self._put({k: v[:room] for k, v in feed.items()}, room))
                self._held_out.append(self._put({k: v[room:] for k, v in feed.items()}, rows - room))
            else:
                self._held_out.append(self._put(feed, rows))
            taken += rows
        self._calibration = calibration
        if self.store.spilled_bytes:
            log.info("calibration data: %.0f MB kept in memory, %.0f MB in a temporary file",
                     self.store.in_memory / 2**20, self.store.spilled_bytes / 2**20)

    def _put(self, feed: Feed, samples: int) -> _Batch:
        return _Batch({name: self.store.put(array) for name, array in feed.items()}, samples)

    def _feed(self, batch: _Batch) -> Feed:
        return {name: self.store.get(key) for name, key in batch.keys.items()}

    def _take(self, split: list[_Batch], samples: int | None) -> list[Feed]:
        """The first ``samples`` samples of a split, cutting the last batch when the inputs allow it."""
        feeds, count = [], 0
        for batch in split:
            if samples is not None and count >= samples:
                break
            feed = self._feed(batch)
            if samples is not None and count + batch.samples > samples and is_mergeable(self.inputs):
                feed = {k: v[: samples - count] for k, v in feed.items()}
            feeds.append(feed)
            count += feed_samples(feed) if is_mergeable(self.inputs) else 1
        return feeds
