"""The rounding pool: worker processes give what one process gives, and forked workers read the tasks from
the memory they inherit instead of having them pickled."""

from __future__ import annotations

import multiprocessing

import numpy as np
import pytest

from onnxq.passes import Grid
from onnxq.rounding import pool
from onnxq.rounding.pool import RoundingTask, round_all


def tasks(count: int = 4) -> list[RoundingTask]:
    """Tasks large enough (cost >= 1e7 in all) for round_all to start workers."""
    rng = np.random.default_rng(0)
    made = []
    for i in range(count):
        X = rng.standard_normal((400, 160))
        made.append(RoundingTask(("layer", i), rng.standard_normal((120 + 8 * i, 160)), X.T @ X,
                                 Grid(4, block_size=32)))
    assert sum(t.cost for t in made) >= 1e7
    return made


def test_workers_give_the_single_process_result() -> None:
    work = tasks()
    alone = round_all(work, "comq", jobs=1)
    shared = round_all(work, "comq", jobs=2)
    assert set(shared) == set(alone)
    for key, (qw, err) in alone.items():
        np.testing.assert_array_equal(shared[key][0].codes, qw.codes)
        np.testing.assert_array_equal(shared[key][0].scale, qw.scale)
        assert shared[key][1] == err
    assert not pool._INHERITED  # nothing kept alive after the pool


class Unpicklable:
    """A task key that refuses to be pickled: it can reach a worker only by inheritance."""

    def __reduce__(self):
        raise TypeError("this key must not be pickled")


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork")
def test_forked_workers_inherit_the_tasks() -> None:
    work = tasks()
    keys = [Unpicklable() for _ in work]
    for task, key in zip(work, keys, strict=True):
        task.key = key
    done = []
    results = round_all(work, "rtn", jobs=2, on_done=lambda: done.append(1))
    assert set(results) == set(keys) and len(done) == len(work)

