"""CLADO's probes as Ray tasks: local worker processes (``--workers N``) or an existing cluster (``--ray-address``).

The model, the held-out samples and every candidate's replacement tensors go to Ray's object store once; a
task carries only references to them and its list of probes, and returns one loss per probe (plus, for the
fast estimator's single-layer probes, the output change: samples x outputs float32). Each worker process
builds the loss oracle once and keeps it for the tasks that follow. A task whose worker dies is run again by
Ray (``max_retries``); a probe's result does not depend on which worker ran it, so Omega is the one a
single process measures. Each worker's onnxruntime sessions get its share of the node's cores (cores / workers),
not onnxruntime's default of every core in every worker. Ray is imported only here, and only when a cluster is
asked for.
"""

from __future__ import annotations

import logging
import os
import re
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from onnxq.allocation.oracle import LossOracle
from onnxq.allocation.probes import Finished, Task
from onnxq.data.sources import Feed
from onnxq.errors import OnnxqError
from onnxq.graph.bias import BiasSlot
from onnxq.graph.layers import Layer

log = logging.getLogger("onnxq")
REACH_SECONDS = 10.0  # to connect to a --ray-address host:port before handing it to Ray
TASK_RETRIES = 3  # runs of a task after its worker dies (Ray's own retry of system failures)
WAIT_SECONDS = 1.0  # longest a wait for the next finished task blocks signal handling (Ctrl-C)
_ORACLES: dict[str, tuple[LossOracle, list[Layer]]] = {}  # per worker process: the oracle of the shipped spec


@dataclass(frozen=True)
class Cluster:
    """Where probes run: ``workers`` local processes, or the Ray cluster at ``address`` (``auto``: the one the
    environment names); with an address, ``workers`` (default: the cluster's CPUs) sizes the tasks."""

    workers: int | None = None
    address: str | None = None

    def planned_workers(self) -> int:
        """The workers the tasks are sized for (with an address and no ``workers``: the cluster's CPUs)."""
        return self.workers or 1 if self.address is None else self.workers or cluster_cpus()

    def check(self) -> None:
        """Before any work: Ray is installed, and a host:port address accepts connections."""
        import_ray()
        if self.address is not None:
            check_reachable(self.address)

    @contextmanager
    def session(self) -> Iterator[None]:
        """Ray started (or joined) for the measurement; a runtime started here is shut down after it."""
        started = connect(self)
        try:
            yield
        finally:
            if started:
                import_ray().shutdown()


@dataclass(frozen=True)
class OracleSpec:
    """What a worker needs to build the same loss oracle as the driver (shipped once via the object store)."""

    model: onnx.ModelProto
    layers: list[Layer]
    feeds: list[Feed]
    labels: np.ndarray | None
    slots: dict[str, BiasSlot]

    def build(self, threads: int = 0) -> LossOracle:
        return LossOracle(self.model, self.layers, self.feeds, self.labels, self.slots, threads)


def import_ray() -> Any:
    """The ``ray`` module, or a one-line error saying how to install it."""
    try:
        import ray
    except ImportError as err:
        raise OnnxqError("--workers and --ray-address need Ray, which is not installed: "
                         "pip install 'onnxq[distributed]' (or drop the flags)") from err
    return ray


def cluster_cpus() -> int:
    ray = import_ray()
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def check_reachable(address: str) -> None:
    """A ``host:port`` address must accept a connection (Ray itself retries an unreachable one for minutes)."""
    match = re.fullmatch(r"([\w.-]+|\[[0-9a-fA-F:]+\]):(\d+)", address)
    if match is None:
        return  # auto, ray://..., or a form Ray resolves itself
    try:
        socket.create_connection((match[1].strip("[]"), int(match[2])), timeout=REACH_SECONDS).close()
    except OSError as err:
        raise OnnxqError(f"cannot reach the Ray cluster at {address} ({err.strerror or err}); start it with "
                         "`ray start --head` or check --ray-address") from err


def connect(cluster: Cluster) -> bool:
    """Start (or join) the Ray runtime; True when this call started it (and so must shut it down)."""
    ray = import_ray()
    if ray.is_initialized():
        return False
    if cluster.address is not None:
        check_reachable(cluster.address)
    try:
        if cluster.address is not None:
            ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False, configure_logging=False)
        else:
            ray.init(address="local", num_cpus=cluster.workers or 1, include_dashboard=False,  # not RAY_ADDRESS's
                     log_to_driver=False, configure_logging=False)
    except ConnectionError as err:
        raise OnnxqError(f"cannot reach the Ray cluster at {cluster.address} ({err}); start it with "
                         "`ray start --head` or check --ray-address") from err
    return True


def share_of_cores(cores: int, node_cpus: float, task_cpus: float) -> int:
    """onnxruntime threads for one task: the node's cores times the task's share of the node's Ray CPUs (cores /
    workers when each worker takes one CPU), at least one."""
    if node_cpus <= 0:
        return max(1, int(task_cpus))
    return max(1, int(cores * task_cpus / node_cpus))


def worker_threads() -> int:
    """In a Ray task: the threads its sessions get (``share_of_cores`` for this node and this task)."""
    ray = import_ray()
    context = ray.get_runtime_context()
    task_cpus = context.get_assigned_resources().get("CPU", 1.0)
    node = context.get_node_id()
    node_cpus = next((n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n["NodeID"] == node), 0.0)
    return share_of_cores(os.cpu_count() or 1, node_cpus, task_cpus)


def run_task(spec_ref: list, tensors: dict[tuple[int, int], dict[str, np.ndarray]], task: Task,
             keep_deltas: bool) -> tuple[int, int, list[Finished]]:
    """One task in a worker: the worker's oracle (built at its first task of this spec) evaluates the probes.
    Returns the worker's process id, the forward passes it ran and the results."""
    import ray

    from onnxq.allocation.mixed import evaluate_task

    key = spec_ref[0].hex()
    if key not in _ORACLES:
        _ORACLES.clear()  # one measurement at a time per worker: drop the previous model
        spec = ray.get(spec_ref[0])
        _ORACLES[key] = spec.build(worker_threads()), spec.layers
    oracle, layers = _ORACLES[key]
    before = oracle.evaluations
    results = evaluate_task(oracle, layers, tensors, task, keep_deltas)
    return os.getpid(), oracle.evaluations - before, results


def finished_results(ray: Any, ref: Any, task: Task, oracle: LossOracle) -> list[Finished]:
    """A finished task's results, its forward passes counted on the driver's ``oracle``; a task that failed in
    its code raises that error, one whose workers kept dying past the retries a one-line error."""
    try:
        _, passes, results = ray.get(ref)
        oracle.evaluations += passes
        return results
    except ray.exceptions.RayTaskError as err:
        raise err.as_instanceof_cause() from None
    except ray.exceptions.RayError as err:
        raise OnnxqError(f"a Ray task of {task.size} probes failed {TASK_RETRIES + 1} times "
                         f"({str(err).splitlines()[0]}); check the cluster's workers and run again (finished probes "
                         "are kept with --sensitivity-cache)") from err


def evaluate_on_ray(cluster: Cluster, oracle: LossOracle, layers: list[Layer],
                    tensors: dict[tuple[int, int], dict[str, np.ndarray]], tasks: list[Task],
                    keep_deltas: bool) -> Iterator[list[Finished]]:
    """Each task's results as it finishes, in completion order; pending tasks are cancelled when the caller
    stops early (an error or Ctrl-C). Runs inside ``cluster.session()``."""
    ray = import_ray()
    pending: dict[Any, Task] = {}
    try:
        spec = ray.put(OracleSpec(oracle.model, layers, oracle.feeds, oracle.labels, oracle.slots))
        weights = ray.put(tensors)
        remote = ray.remote(num_cpus=1, max_retries=TASK_RETRIES)(run_task)
        pending = {remote.remote([spec], weights, task, keep_deltas): task for task in tasks}
        log.info("sensitivity: %d tasks on %s", len(tasks), cluster.address or f"{cluster.workers} local workers")
        while pending:
            # a bounded wait, so that Ctrl-C (SIGINT to this process alone, too) stops the run within a second
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=WAIT_SECONDS)
            for ref in ready:
                task = pending.pop(ref)
                yield finished_results(ray, ref, task, oracle)
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)
