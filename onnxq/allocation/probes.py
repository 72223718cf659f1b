"""Running CLADO's probes (single layers and layer pairs at given widths) in tasks, here or on a Ray cluster,
with the finished ones journalled in ``--sensitivity-cache`` so that an interrupted measurement resumes.

A task is one group of single-layer probes (the layers whose suffixes ``suffix.SuffixProbes`` runs together,
so a probe's output does not depend on how the work was split) or a run of layer pairs. The same tasks run
in this process or as Ray tasks (``distributed.py``); either way results stream into the progress bar and
the journal as each task finishes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from onnxq.data.npz import BadCache, CacheReader, looks_like_cache
from onnxq.export.atomic import write_with
from onnxq.graph.suffix import GROUP_LAYERS

log = logging.getLogger("onnxq")
Key = tuple[int, int]  # (layer index, width)
PairKey = tuple[Key, Key]
Probe = Key | PairKey
# One finished probe: its key, its loss, and (singles of the fast estimator) its output change from the float model.
Finished = tuple[Probe, float, np.ndarray | None]
JOURNAL_SECONDS = 30.0  # a running measurement rewrites its journal at most this often (and when it stops)
PAIRS_PER_TASK = 64  # at most; fewer when that leaves some worker without work


@dataclass(frozen=True)
class Task:
    """Probes evaluated together: single-layer probes of one suffix group, or pairs."""

    singles: tuple[Key, ...] = ()
    pairs: tuple[PairKey, ...] = ()

    @property
    def size(self) -> int:
        return len(self.singles) + len(self.pairs)


@dataclass
class ProbeResults:
    """Losses of the finished probes (and the fast estimator's output changes of the single ones)."""

    single: dict[Key, float] = field(default_factory=dict)
    deltas: dict[Key, np.ndarray] = field(default_factory=dict)
    pair: dict[PairKey, float] = field(default_factory=dict)

    def add(self, finished: Iterable[Finished]) -> int:
        """Record finished probes; returns how many."""
        count = 0
        for key, loss, delta in finished:
            count += 1
            if isinstance(key[0], tuple):
                self.pair[key] = loss
                continue
            self.single[key] = loss
            if delta is not None:
                self.deltas[key] = delta
        return count

    def has_single(self, key: Key, keep_deltas: bool) -> bool:
        return key in self.single and (not keep_deltas or key in self.deltas)


def single_groups(singles: list[Key]) -> list[tuple[Key, ...]]:
    """The singles in groups of ``GROUP_LAYERS`` consecutive layers, as ``SuffixProbes`` runs them."""
    layers = list(dict.fromkeys(i for i, _ in singles))
    groups = [set(layers[start:start + GROUP_LAYERS]) for start in range(0, len(layers), GROUP_LAYERS)]
    return [tuple(key for key in singles if key[0] in group) for group in groups]


def plan_tasks(singles: list[Key], pairs: list[PairKey], done: ProbeResults, keep_deltas: bool,
               workers: int = 1) -> list[Task]:
    """The tasks still to run: every group with a missing single (whole, so its outputs match an uninterrupted
    run), and the missing pairs in runs of at most ``PAIRS_PER_TASK``, at least four runs per worker (so a
    slow or restarted worker delays the end by little)."""
    tasks = [Task(singles=group) for group in single_groups(singles)
             if not all(done.has_single(key, keep_deltas) for key in group)]
    todo = [pair for pair in pairs if pair not in done.pair]
    if todo:
        per_task = max(1, min(PAIRS_PER_TASK, -(-len(todo) // (4 * workers))))
        tasks += [Task(pairs=tuple(todo[start:start + per_task])) for start in range(0, len(todo), per_task)]
    return tasks


class ProbeJournal:
    """The finished probes of one measurement (``key``) in the sensitivity cache file, rewritten atomically at
    most every ``JOURNAL_SECONDS`` and when the measurement stops early (a finished one writes Omega there)."""

    def __init__(self, path: Path | None, key: str) -> None:
        self.path, self.key = path, key
        self.results = ProbeResults()
        self.written = time.monotonic()
        self.dirty = False

    def load(self) -> ProbeResults:
        """The probes a previous run of the same measurement finished (none when the file holds another one)."""
        if self.path is None or not self.path.exists():
            return self.results
        try:
            with CacheReader(self.path) as reader:
                if str(reader.array("key", (), "U")) != self.key or "single_keys.npy" not in reader.names:
                    return self.results
                self.results = read_results(reader)
        except BadCache as err:
            log.warning("not resuming from %s: %s; measuring every probe", self.path, err)
            self.results = ProbeResults()
            return self.results
        found = len(self.results.single) + len(self.results.pair)
        if found:
            log.warning("resuming the sensitivity measurement from %s: %d probes already measured", self.path, found)
        return self.results

    def record(self, finished: Iterable[Finished]) -> int:
        """Add finished probes; rewrite the file when the last write is ``JOURNAL_SECONDS`` old."""
        count = self.results.add(finished)
        self.dirty = self.dirty or count > 0
        if time.monotonic() - self.written >= JOURNAL_SECONDS:
            self.flush()
        return count

    def flush(self) -> None:
        """Write the finished probes now (never over a file that is not an onnxq cache)."""
        if self.path is None or not self.dirty:
            return
        if self.path.exists() and not looks_like_cache(self.path, "key.npy"):
            log.warning("not keeping the finished probes in %s: it exists and is not an onnxq cache", self.path)
            self.path = None
            return
        arrays = results_arrays(self.results)
        write_with(self.path, lambda handle: np.savez(handle, key=np.array(self.key), **arrays),
                   "--sensitivity-cache")
        self.written, self.dirty = time.monotonic(), False


def results_arrays(results: ProbeResults) -> dict[str, np.ndarray]:
    """The results as plain arrays for ``np.savez``."""
    single_keys = list(results.single)
    delta_keys = list(results.deltas)
    pair_keys = list(results.pair)
    return {"single_keys": np.array(single_keys, dtype=np.int64).reshape(-1, 2),
            "single_loss": np.array([results.single[k] for k in single_keys], dtype=np.float64),
            "pair_keys": np.array([[*a, *b] for a, b in pair_keys], dtype=np.int64).reshape(-1, 4),
            "pair_loss": np.array([results.pair[k] for k in pair_keys], dtype=np.float64),
            "delta_keys": np.array(delta_keys, dtype=np.int64).reshape(-1, 2),
            "deltas": (np.stack([results.deltas[k] for k in delta_keys]) if delta_keys
                       else np.zeros((0, 0, 0), np.float32))}


def read_results(reader: CacheReader) -> ProbeResults:
    """The results a journal holds; BadCache when its arrays do not fit together or are not finite."""
    single_keys = reader.array("single_keys", None, "i", 10**7)
    pair_keys = reader.array("pair_keys", None, "i", 10**8)
    delta_keys = reader.array("delta_keys", None, "i", 10**7)
    single_loss = reader.array("single_loss", (len(single_keys),))
    pair_loss = reader.array("pair_loss", (len(pair_keys),))
    deltas = reader.array("deltas", None, "f", 10**10)
    if single_keys.shape[1:] != (2,) or pair_keys.shape[1:] != (4,) or delta_keys.shape[1:] != (2,) \
            or len(deltas) != len(delta_keys) or deltas.ndim != 3:
        raise BadCache("its probe arrays do not fit together")
    if not (np.isfinite(single_loss).all() and np.isfinite(pair_loss).all() and np.isfinite(deltas).all()):
        raise BadCache("it holds losses that are not finite")
    results = ProbeResults()
    results.single = {(int(i), int(b)): float(v) for (i, b), v in zip(single_keys, single_loss, strict=True)}
    results.pair = {((int(i), int(b)), (int(j), int(c))): float(v)
                    for (i, b, j, c), v in zip(pair_keys, pair_loss, strict=True)}
    results.deltas = {(int(i), int(b)): d for (i, b), d in zip(delta_keys, deltas, strict=True)}
    return results


Evaluate = Callable[[Task], list[Finished]]


def run_probes(singles: list[Key], pairs: list[PairKey], keep_deltas: bool, bar, journal: ProbeJournal,
               evaluate_here: Evaluate, cluster=None, evaluate_remote=None) -> ProbeResults:
    """Every probe's result: the journalled ones, then the missing ones task by task, in this process
    (``evaluate_here``) or, with a cluster, on Ray (``evaluate_remote(tasks)`` yields each task's results
    as it finishes). The journal is written every ``JOURNAL_SECONDS`` and when the measurement fails or is
    interrupted."""
    done = journal.load()
    with cluster.session() if cluster is not None else nullcontext():
        tasks = plan_tasks(singles, pairs, done, keep_deltas, cluster.planned_workers() if cluster else 1)
        bar.update(len(singles) + len(pairs) - sum(task.size for task in tasks))
        finished: Iterator[list[Finished]] = (evaluate_remote(tasks) if cluster is not None
                                              else (evaluate_here(task) for task in tasks))
        try:
            for results in finished:
                bar.update(journal.record(results))
        except BaseException:  # Ctrl-C, a kill's SystemExit, a failed task: keep what finished
            journal.flush()
            raise
    return journal.results  # complete: the caller caches Omega itself
