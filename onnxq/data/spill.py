"""Batches of named arrays kept in memory up to a byte limit, the rest written to a temporary file.

Sequential rounding keeps the activations at a stage boundary for every calibration batch; past the limit they
go to disk, so memory does not grow with the calibration set. Spilled arrays are read back as memory maps of
the file (private, so a reader may write to its copy): the pages come straight from the page cache, with no
fresh array to zero and no copy. A map lives as long as the arrays made from it, so only the batches in use
count towards the resident memory. A producer can also ``reserve`` an array in the store and write into it
(onnxruntime writes a segment's outputs there): past the limit that is a writable map of the file itself.

Stores can share one ``SpillFile``: a batch released once read (or a cleared store) leaves its pages to the next
batches written, so the file grows only to what is alive at once, and writing over pages a file already has costs
the kernel a fraction of growing it (new pages cost ~2.8 s of system time per GB on this project's machine).
"""

from __future__ import annotations

import bisect
import mmap
import os
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

STORE_BYTES = 32 << 20  # per store; a stream holds two (the boundary it reads and the one it writes)
PAGE = mmap.ALLOCATIONGRANULARITY  # spilled arrays start on a page, so each maps on its own


@dataclass(frozen=True)
class OnDisk:
    """Where one spilled array lies in the store's file."""

    offset: int
    dtype: np.dtype
    shape: tuple[int, ...]

    @property
    def span(self) -> int:
        """The bytes it takes in the file: whole pages."""
        return pages(int(np.prod(self.shape)) * self.dtype.itemsize)


def pages(nbytes: int) -> int:
    """``nbytes`` rounded up to whole pages (each spilled array starts on a page and maps on its own)."""
    return -(-nbytes // PAGE) * PAGE


class SpillFile:
    """A temporary file under ``folder`` (made on first use) whose page ranges stores take and give back: first fit
    over the ranges given back (neighbours merged), else the file grows. Thread-safe."""

    def __init__(self, folder: Path | None) -> None:
        self.folder = folder
        self.fd: int | None = None
        self.path: Path | None = None
        self.free: list[tuple[int, int]] = []  # (offset, size), sorted, never adjacent
        self.end = 0  # bytes of the file in use or given back
        self._lock = threading.Lock()

    def allocate(self, nbytes: int) -> int:
        """The offset of ``nbytes`` (whole pages) of the file for one array."""
        size = pages(nbytes)
        with self._lock:
            if self.fd is None:
                self.fd, name = tempfile.mkstemp(dir=self.folder, prefix="batches-", suffix=".bin")
                self.path = Path(name)
            for index, (offset, room) in enumerate(self.free):
                if room >= size:
                    self.free[index:index + 1] = [(offset + size, room - size)] if room > size else []
                    return offset
            offset, self.end = self.end, self.end + size
            os.ftruncate(self.fd, self.end)
            return offset

    def release(self, offset: int, nbytes: int) -> None:
        """Give ``nbytes`` at ``offset`` back (their pages stay in the file, to be written over)."""
        size = pages(nbytes)
        if not size:
            return
        with self._lock:
            index = bisect.bisect(self.free, (offset, size))
            start, end = offset, offset + size
            if index < len(self.free) and self.free[index][0] == end:  # merge with the range after
                end += self.free.pop(index)[1]
            if index and sum(self.free[index - 1]) == start:  # and the one before
                index -= 1
                start = self.free.pop(index)[0]
            self.free.insert(index, (start, end - start))

    def close(self) -> None:
        """Delete the file (maps still in use stay readable until dropped)."""
        with self._lock:
            if self.fd is not None:
                os.close(self.fd)
                self.path.unlink(missing_ok=True)
                self.fd = None


class BatchStore:
    """An append-only list of ``{name: array}`` batches: in memory while under ``limit`` bytes, then on disk
    in a file under ``folder``, its own or a ``SpillFile`` shared with other stores (its own is removed by
    ``close``). ``reserve`` may be called from another thread than ``append``."""

    def __init__(self, folder: Path | None, limit: int = STORE_BYTES, spill: SpillFile | None = None) -> None:
        self.limit = limit
        self.in_memory = 0
        self.batches: list[dict[str, np.ndarray | OnDisk] | None] = []  # None: released
        self.spill = spill or SpillFile(folder)
        self._owns_file = spill is None
        self._spilled = 0  # bytes of the arrays on disk
        self._reserved: dict[int, tuple[np.ndarray, OnDisk | None]] = {}  # id(array) -> (array, where on disk)
        self._lock = threading.Lock()

    @property
    def path(self) -> Path | None:
        return self.spill.path

    def reserve(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """An uninitialised array to fill and then ``append``: in memory while under the limit, else a writable
        map of its place in the file (filling it writes the file; ``append`` copies nothing)."""
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape)) * dtype.itemsize
        with self._lock:
            if self.in_memory + nbytes <= self.limit:
                self.in_memory += nbytes
                array, placed = np.empty(shape, dtype), None
            else:
                placed = self._place(nbytes, dtype, tuple(shape))
                array = self._map(placed, mmap.ACCESS_WRITE)
            self._reserved[id(array)] = (array, placed)
        return array

    def append(self, arrays: dict[str, np.ndarray]) -> None:
        """Add one batch. Arrays from ``reserve`` stay where they were reserved; others kept in memory are
        referenced, not copied (do not modify them later), unless they map a file (another store may write
        over it), and the rest are written to the file."""
        batch: dict[str, np.ndarray | OnDisk] = {}
        for name, value in arrays.items():
            array = np.asarray(value)
            with self._lock:
                reserved = self._reserved.pop(id(array), None)
            if reserved is not None and reserved[0] is array:
                batch[name] = array if reserved[1] is None else reserved[1]
                continue
            with self._lock:
                keep = self.in_memory + array.nbytes <= self.limit
                if keep:
                    self.in_memory += array.nbytes
                else:
                    placed = self._place(array.nbytes, array.dtype, array.shape)
            if keep:
                batch[name] = np.array(array) if _maps_a_file(array) else array
            else:
                os.pwrite(self.spill.fd, np.ascontiguousarray(array).data, placed.offset)
                batch[name] = placed
        self.batches.append(batch)

    def _place(self, nbytes: int, dtype: np.dtype, shape: tuple[int, ...]) -> OnDisk:
        """Room for one array in the file (call with the lock)."""
        self._spilled += nbytes
        return OnDisk(self.spill.allocate(nbytes), np.dtype(dtype), tuple(shape))

    def _map(self, placed: OnDisk, access: int) -> np.ndarray:
        count = int(np.prod(placed.shape))
        if count == 0:
            return np.empty(placed.shape, placed.dtype)
        mapped = mmap.mmap(self.spill.fd, count * placed.dtype.itemsize, access=access, offset=placed.offset)
        return np.frombuffer(mapped, placed.dtype, count).reshape(placed.shape)

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        """One batch, its spilled arrays mapped from the file (private copies: writing to them changes nothing)."""
        batch = self.batches[index]
        if batch is None:
            raise IndexError(f"batch {index} was released")
        return {name: self._map(value, mmap.ACCESS_COPY) if isinstance(value, OnDisk) else value
                for name, value in batch.items()}

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return (self[index] for index in range(len(self)))

    @property
    def spilled_bytes(self) -> int:
        return self._spilled

    def release(self, index: int) -> None:
        """Give batch ``index`` up once read for the last time: its pages go to the next arrays spilled (earlier
        maps of them must not be read again)."""
        batch, self.batches[index] = self.batches[index], None
        for value in (batch or {}).values():
            if isinstance(value, OnDisk):
                self.spill.release(value.offset, value.span)

    def clear(self) -> None:
        """Drop the batches and give their pages back, to be written over: rewriting pages a file already has costs
        the kernel ~6x less than growing a new file (ext4: 0.23 against 1.35 s of system time per GB)."""
        for index in range(len(self.batches)):
            self.release(index)
        for _, placed in self._reserved.values():
            if placed is not None:
                self.spill.release(placed.offset, placed.span)
        self.batches = []
        self._reserved = {}
        self.in_memory = 0
        self._spilled = 0

    def close(self) -> None:
        """Drop the batches; delete the file if it is the store's own (maps still in use stay readable until
        dropped)."""
        if self._owns_file:
            self.batches, self._reserved = [], {}
            self.spill.close()
        else:
            self.clear()


def _maps_a_file(array: np.ndarray) -> bool:
    """Whether the array's memory is a map of a file (such as a batch read from a store)."""
    base = array
    while isinstance(base, np.ndarray):
        base = base.base
    return isinstance(base.obj if isinstance(base, memoryview) else base, mmap.mmap)
