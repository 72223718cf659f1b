"""Probe tasks and the probe journal: the work splits without changing Omega, and an interrupted measurement
resumes from the probes it finished (no Ray needed)."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from conftest import SensitivityBar

import onnxq
from onnxq.allocation import probes
from onnxq.allocation.probes import ProbeJournal, ProbeResults, plan_tasks, single_groups
from onnxq.config import Config
from onnxq.errors import OnnxqError

OPTIONS = {"method": "rtn", "avg_bits": 3.0, "sensitivity": "exact", "clado_samples": 8, "calib_size": 8}


def test_tasks_cover_every_probe_once_and_keep_suffix_groups(monkeypatch):
    singles = [(i, b) for i in range(19) for b in (2, 4, 8)]
    pairs = [(a, c) for x, a in enumerate(singles) for c in singles[x + 1:] if a[0] < c[0]]
    groups = single_groups(singles)
    assert [len({i for i, _ in g}) for g in groups] == [8, 8, 3]
    monkeypatch.setattr(probes, "PAIRS_PER_TASK", 50)
    tasks = plan_tasks(singles, pairs, ProbeResults(), keep_deltas=False, workers=2)
    assert [t.singles for t in tasks if t.singles] == groups
    assert sorted(p for t in tasks for p in t.pairs) == sorted(pairs)
    assert max(t.size for t in tasks if t.pairs) == 50
    done = ProbeResults(single={k: 0.0 for k in groups[0] + groups[1][:1]}, pair={p: 0.0 for p in pairs[:100]})
    left = plan_tasks(singles, pairs, done, keep_deltas=False, workers=2)
    assert [t.singles for t in left if t.singles] == groups[1:]  # a partly done group runs again whole
    assert sorted(p for t in left for p in t.pairs) == sorted(pairs[100:])
    # the fast estimator also needs each single's output change
    assert [t.singles for t in plan_tasks(singles, [], done, keep_deltas=True)] == groups


def test_journal_round_trip(tmp_path):
    results = ProbeResults(single={(0, 2): 0.5, (1, 4): 0.25}, deltas={(0, 2): np.ones((3, 5), np.float32)},
                           pair={((0, 2), (1, 4)): 0.875})
    journal = ProbeJournal(tmp_path / "omega.npz", "k1")
    journal.record([(key, loss, results.deltas.get(key)) for key, loss in results.single.items()])
    journal.record([(key, loss, None) for key, loss in results.pair.items()])
    journal.flush()
    back = ProbeJournal(tmp_path / "omega.npz", "k1").load()
    assert back.single == results.single and back.pair == results.pair
    np.testing.assert_array_equal(back.deltas[(0, 2)], results.deltas[(0, 2)])
    assert ProbeJournal(tmp_path / "omega.npz", "another").load().single == {}


class Interrupt(SensitivityBar):
    """A progress bar that raises KeyboardInterrupt (as Ctrl-C does) once ``after`` probes have finished."""

    def __init__(self, after: int | None) -> None:
        self.after, self.done = after, 0

    def update(self, n: int) -> None:
        self.done += n
        if self.after is not None and self.done >= self.after:
            raise KeyboardInterrupt


def test_interrupted_measurement_resumes_from_finished_probes(tmp_path, cnn_path, cnn_calib, monkeypatch):
    monkeypatch.setattr(probes, "PAIRS_PER_TASK", 10)
    whole = onnxq.quantize(cnn_path, cnn_calib, None, **OPTIONS)
    total = whole.mixed.evaluations  # 16 singles + 96 pairs (+ the reference and the verification passes)
    cache = tmp_path / "omega.npz"
    with pytest.raises(KeyboardInterrupt):
        onnxq.quantize(cnn_path, cnn_calib, None, progress=Interrupt(after=50), sensitivity_cache=cache, **OPTIONS)
    assert cache.exists()
    counted = Interrupt(after=None)
    resumed = onnxq.quantize(cnn_path, cnn_calib, None, progress=counted, sensitivity_cache=cache, **OPTIONS)
    np.testing.assert_array_equal(resumed.mixed.omega, whole.mixed.omega)
    # 16 singles in one task, then pairs in tasks of 10: the first 56 probes were finished and kept
    assert resumed.mixed.evaluations == total - 56
    again = onnxq.quantize(cnn_path, cnn_calib, None, sensitivity_cache=cache, **OPTIONS)  # the complete matrix
    np.testing.assert_array_equal(again.mixed.omega, whole.mixed.omega)
    assert again.mixed.evaluations == total - 112 - 1


def test_workers_without_ray_is_a_one_line_error_before_any_work(tmp_path, cnn_path, cnn_calib, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # makes the import fail
    with pytest.raises(OnnxqError, match=r"need Ray, which is not installed: pip install 'onnxq\[distributed\]'"):
        onnxq.quantize(cnn_path, cnn_calib, tmp_path / "q.onnx", workers=2, **OPTIONS)
    assert not (tmp_path / "q.onnx").exists()


def test_workers_options_are_checked():
    with pytest.raises(OnnxqError, match="--workers must be at least 1"):
        Config.from_options(avg_bits=3.0, workers=0)
    with pytest.raises(OnnxqError, match="needs a budget"):
        Config.from_options(workers=2)
    assert Config.from_options(avg_bits=3.0, ray_address="auto").mixed.ray_address == "auto"
