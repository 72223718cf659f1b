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
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from onnxq.data.images import ImagePreprocessing
from onnxq.data.sources import (
    Feed,
    InputSpec,
    batches,
    check_samples,
    default_preprocessing,
    feed_samples,
    feeds_from,
    is_mergeable,
    merge_feeds,
)
from onnxq.data.spill import BatchStore
from onnxq.errors import OnnxqError

log = logging.getLogger("onnxq")
MEMORY_LIMIT_BYTES = 64 << 20  # batches beyond this many bytes are spilled to a temporary file


@dataclass
class Reiterable:
    """An iterable that calls ``make`` for every pass (a generator function can be iterated once only)."""

    make: Callable[[], Iterator[Feed]]

    def __iter__(self) -> Iterator[Feed]:
        return self.make()


@dataclass
class _Batch:
    index: int  # in the store
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
        self.store = BatchStore(None, memory_limit)
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

    def calibration_batches(self) -> Iterable[Feed]:
        """The calibration batches as an iterable that can be read many times (one batch in memory at a time)."""
        return Reiterable(self.calibration)

    def held_out(self, samples: int | None = None) -> list[Feed]:
        """Up to ``samples`` held-out samples in batches (all kept ones when None)."""
        self._loaded()
        return self._take(self._held_out, samples)

    def first(self, samples: int) -> list[Feed]:
        """The first ``samples`` calibration samples in batches (for when no held-out samples exist)."""
        return self._take(self._loaded(), samples)

    def check_batch(self) -> tuple[Feed | None, bool]:
        """One batch to check the written model on, and whether it is held out (else a calibration batch)."""
        held = self.held_out(max(self.batch_size, check_samples(self.preprocessing)))
        if held and is_mergeable(self.inputs):
            return merge_feeds(held, self.inputs), True
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
        raw, count = feeds_from(self.source, self.inputs, self.preprocessing)
        calib_size = self.calib_size
        if self.preprocessing.augment and count:  # an augmented folder's held-out views follow its `count` samples
            calib_size = min(calib_size or count, count)
        limit = calib_size + self.held_out_size if calib_size else None
        mergeable = is_mergeable(self.inputs)
        calibration: list[_Batch] = []
        taken = 0
        for feed in batches(raw, self.inputs, self.batch_size, limit, pad=True, boundary=self.calib_size or None):
            rows = feed_samples(feed) if mergeable else 1
            room = (calib_size - taken) if calib_size else rows
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
        self.store.append(feed)
        return _Batch(len(self.store) - 1, samples)

    def _feed(self, batch: _Batch) -> Feed:
        return self.store[batch.index]

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
