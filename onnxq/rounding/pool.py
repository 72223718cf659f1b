"""Run a rounding pass over many layers (or layer x width candidates), using every core.

Layers are independent once their Gram matrices are known, so they are farmed out to worker processes,
largest first; each worker runs single-threaded BLAS so the processes do not fight over cores. Workers are
forked where the platform allows it, so scripts that call onnxq need no ``if __name__ == "__main__"`` guard; forked
workers find the tasks in the memory they inherit (only an index goes through the pipe, not hundreds of MB of
weights and Gram matrices to pickle and unpickle).
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field

import numpy as np
from threadpoolctl import threadpool_limits

from onnxq.allocator import keep_freed_memory
from onnxq.passes import ROUNDING_PASSES, Grid, QuantWeight, relative_error


@dataclass
class RoundingTask:
    """One weight matrix to round on one grid."""

    key: object
    W: np.ndarray
    H: np.ndarray
    grid: Grid
    options: dict = field(default_factory=dict)
    measured_on: np.ndarray | None = None  # the Gram the reported error uses when H is a regularised one

    @property
    def cost(self) -> float:
        return float(self.W.size) * self.W.shape[1]


def run_task(method: str, task: RoundingTask) -> tuple[QuantWeight, float]:
    """Round one matrix and measure its relative reconstruction error."""
    qw = ROUNDING_PASSES[method](task.W, task.H, task.grid, **task.options)
    H = task.H if task.measured_on is None else task.measured_on
    return qw, relative_error(task.W, qw.dequantize(), H)


_INHERITED: list[RoundingTask] = []  # the tasks of the running pool, set before its workers fork


def _run_inherited(method: str, index: int) -> tuple[QuantWeight, float]:
    """In a forked worker: ``run_task`` on the parent's task ``index``, read from the inherited memory."""
    return run_task(method, _INHERITED[index])


def default_jobs() -> int:
    return max(1, min(os.cpu_count() or 1, 8))


def round_all(tasks: list[RoundingTask], method: str, jobs: int | None = None,
              on_done: Callable[[], None] | None = None) -> dict[object, tuple[QuantWeight, float]]:
    """Round every task with ``method``; ``jobs`` worker processes (1: in this process)."""
    jobs = default_jobs() if jobs is None else jobs
    ordered = sorted(tasks, key=lambda t: -t.cost)
    if jobs <= 1 or len(tasks) <= 1 or sum(t.cost for t in tasks) < 1e7:
        results = {}
        for task in ordered:
            results[task.key] = run_task(method, task)
            if on_done:
                on_done()
        return results
    forked = "fork" in multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if forked else "spawn")
    if forked:
        _INHERITED[:] = ordered  # workers fork on the first submits, after this
    try:
        with ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=_worker_setup) as pool:
            futures = {(pool.submit(_run_inherited, method, index) if forked else pool.submit(run_task, method, task)):
                       task.key for index, task in enumerate(ordered)}
            results = {}
            for future in as_completed(futures):
                results[futures[future]] = future.result()
                if on_done:
                    on_done()
            return results
    finally:
        _INHERITED.clear()


def _worker_setup() -> None:
    """In a worker: one BLAS thread, since the workers themselves already use every core; and freed memory kept
    for reuse, since the passes allocate the same few-MB temporaries thousands of times (MiniLM's 36 layers:
    about 1 CPU s of page faults in 11-13 saved; the job's peak RSS did not grow)."""
    threadpool_limits(1)
    keep_freed_memory()
