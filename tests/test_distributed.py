"""Sensitivities on a local Ray runtime: with 2 workers, and with one worker process killed mid-task, Omega is
exactly the single-process one (skipped when Ray, the ``distributed`` extra, is not installed)."""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tiny
from conftest import SensitivityBar

import onnxq
from onnxq.allocation import distributed, probes
from onnxq.errors import OnnxqError
from onnxq.graph import suffix
from onnxq.graph.layers import find_layers
from onnxq.graph.prepare import prepare

ray = pytest.importorskip("ray")

OPTIONS = {"method": "rtn", "avg_bits": 3.0, "clado_samples": 16, "calib_size": 4}
WORKER_TITLE = b"ray::run_task"  # the process title Ray gives a worker while it runs a probe task


@pytest.fixture(scope="module")
def runtime():
    """One local runtime with 2 worker CPUs for the module (the pipeline joins it and leaves it running)."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def parent(pid: int) -> int:
    """The parent process id of ``pid`` (0 once it is gone)."""
    try:
        return int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def descends_from_this_process(pid: int) -> bool:
    """Whether ``pid`` was started, through any chain of processes, by this test process (its Ray runtime's)."""
    while pid > 1:
        pid = parent(pid)
        if pid == os.getpid():
            return True
    return False


def busy_workers() -> list[int]:
    """Process ids of this test's own Ray workers that are running a probe task now (never another run's on the
    same machine)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "cmdline").read_bytes().startswith(WORKER_TITLE) and \
                        descends_from_this_process(int(entry.name)):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


class KillOneWorker(SensitivityBar):
    """A progress bar that, when the first task has come back, kills (SIGKILL) a worker in the middle of the
    next one."""

    def __init__(self) -> None:
        self.killed: list[int] = []

    def update(self, n: int) -> None:
        if self.killed or n == 0:
            return
        deadline = time.monotonic() + 10
        while not self.killed and time.monotonic() < deadline:
            for pid in busy_workers():
                os.kill(pid, signal.SIGKILL)
                self.killed.append(pid)
                break


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the worker processes in /proc")
@pytest.mark.parametrize("estimator", ["exact", "fast"])
def test_omega_with_two_workers_and_one_killed_is_the_single_process_one(runtime, cnn_path, cnn_calib,
                                                                          monkeypatch, estimator):
    # many tasks, so the kill lands while work remains: pairs in twos, each layer's singles a task of its own
    monkeypatch.setattr(probes, "PAIRS_PER_TASK", 2)
    monkeypatch.setattr(probes, "GROUP_LAYERS", 1)
    monkeypatch.setattr(suffix, "GROUP_LAYERS", 1)
    alone = onnxq.quantize(cnn_path, cnn_calib, None, sensitivity=estimator, **OPTIONS)
    killer = KillOneWorker()
    spread = onnxq.quantize(cnn_path, cnn_calib, None, sensitivity=estimator, workers=2, progress=killer, **OPTIONS)
    assert len(killer.killed) == 1
    np.testing.assert_array_equal(spread.mixed.omega, alone.mixed.omega)
    assert spread.mixed.bits == alone.mixed.bits
    assert ray.is_initialized()  # a runtime the run did not start is left to its owner


def test_interrupted_distributed_run_resumes(runtime, tmp_path, cnn_path, cnn_calib, monkeypatch):
    monkeypatch.setattr(probes, "PAIRS_PER_TASK", 4)
    alone = onnxq.quantize(cnn_path, cnn_calib, None, sensitivity="exact", **OPTIONS)

    class Interrupt(KillOneWorker):
        def update(self, n: int) -> None:
            self.killed.append(n)
            if sum(self.killed) >= 40:
                raise KeyboardInterrupt

    cache = tmp_path / "omega.npz"
    with pytest.raises(KeyboardInterrupt):
        onnxq.quantize(cnn_path, cnn_calib, None, sensitivity="exact", workers=2, progress=Interrupt(),
                       sensitivity_cache=cache, **OPTIONS)
    assert cache.exists()
    resumed = onnxq.quantize(cnn_path, cnn_calib, None, sensitivity="exact", workers=2, sensitivity_cache=cache,
                             **OPTIONS)
    np.testing.assert_array_equal(resumed.mixed.omega, alone.mixed.omega)
    assert resumed.mixed.evaluations < alone.mixed.evaluations


def test_unreachable_cluster_is_a_one_line_error(tmp_path, cnn_path, cnn_calib):
    with socket.socket() as closed:  # a port nothing listens on once the socket is closed
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    with pytest.raises(OnnxqError, match=f"cannot reach the Ray cluster at 127.0.0.1:{port}"):
        onnxq.quantize(cnn_path, cnn_calib, tmp_path / "q.onnx", ray_address=f"127.0.0.1:{port}", **OPTIONS)
    assert not (tmp_path / "q.onnx").exists()


def test_worker_sessions_get_their_share_of_the_cores(runtime):
    """With 2 worker CPUs on this node, each worker's oracle sessions run cores / 2 threads, not every core."""
    model = prepare(tiny.cnn_model())
    layers, _ = find_layers(model)
    feeds = [{"x": np.zeros((2, 3, 16, 16), np.float32)}]

    def oracle_threads(model, layers, feeds):
        from onnxq.allocation import distributed
        oracle = distributed.OracleSpec(model, layers, feeds, None, {}).build(distributed.worker_threads())
        return (oracle.threads, oracle.session.get_session_options().intra_op_num_threads,
                oracle.constant_session({}).get_session_options().intra_op_num_threads)

    share = max(1, (os.cpu_count() or 1) // 2)
    assert ray.get(ray.remote(num_cpus=1)(oracle_threads).remote(model, layers, feeds)) == (share, share, share)


@pytest.mark.parametrize(("cores", "node_cpus", "task_cpus", "threads"),
                         [(2, 2, 1, 1), (2, 1, 1, 2), (64, 32, 1, 2), (16, 16, 4, 4), (1, 4, 1, 1), (8, 0, 1, 1)])
def test_share_of_cores(cores, node_cpus, task_cpus, threads):
    assert distributed.share_of_cores(cores, node_cpus, task_cpus) == threads
