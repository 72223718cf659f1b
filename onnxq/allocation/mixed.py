"""CLADO mixed precision on an ONNX model: candidates, measured sensitivities, and the budgeted allocation.

For every layer and candidate width the rounding pass (COMQ by default) gives a quantized weight; the
loss oracle measures how much the model's loss rises with each candidate alone (and, for the exact
estimator, with every pair); ``onnxq.passes.clado`` turns the losses into the sensitivity matrix Omega and
solves ``min alpha^T Omega alpha`` under the size budget exactly with HiGHS.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from onnxq.allocation.distributed import Cluster, evaluate_on_ray
from onnxq.allocation.oracle import LossOracle
from onnxq.allocation.probes import Finished, ProbeJournal, Task, run_probes
from onnxq.config import WIDTHS
from onnxq.data.npz import BadCache, CacheReader, looks_like_cache
from onnxq.errors import OnnxqError
from onnxq.export.atomic import write_text, write_with
from onnxq.export.qdq import stored_weight_bits
from onnxq.graph.layers import Layer
from onnxq.graph.suffix import SuffixProbes
from onnxq.passes import QuantWeight, clado
from onnxq.passes import budget as passes_budget
from onnxq.report.progress import NoProgress

log = logging.getLogger("onnxq")
ESTIMATORS = ("fast", "exact", "diagonal")


@dataclass
class Budget:
    """One of: an average stored width over the quantized weights, a file size in MB, or a size ratio."""

    avg_bits: float | None = None
    size_mb: float | None = None
    size_ratio: float | None = None

    def is_set(self) -> bool:
        return any(v is not None for v in (self.avg_bits, self.size_mb, self.size_ratio))


@dataclass
class MixedPlan:
    """The outcome of the allocation, for reports and metadata."""

    bits: dict[str, int]
    estimator: str
    predicted_loss: float
    gap: float
    status: str
    budget_bits: float
    used_bits: float
    evaluations: int
    seconds: dict[str, float] = field(default_factory=dict)
    omega: np.ndarray | None = None
    keys: list[tuple[str, int]] = field(default_factory=list)
    prefer: str = "size"
    integer_mac_share: float | None = None  # with prefer="speed": the share of MACs at 8 bits (W8A8 kernels)
    verified: dict[str, float] = field(default_factory=dict)  # measured loss of each allocation checked
    picked: str = "solver"  # which of them was kept: "solver", "diagonal" or "uniform <bits>"
    stopped: dict[str, int] = field(default_factory=dict)  # those of them stopped early: the samples they saw


def candidates_for(layers: list[Layer], choices: list[tuple[int, ...]],
                   blocks: dict[str, int | None] | None = None, channel_scales: bool = False) -> clado.Candidates:
    """Per layer, its candidate widths and their cost in stored bits, each tensor in whole bytes as packed.

    The cost is the codes plus, for the layers ``blocks`` gives a block size, their block-wise scales and zero
    points (what ``--avg-bits`` and the reports' "stored bits" count); with ``channel_scales`` (size budgets) also
    the per-channel scales and zero points of the other layers.
    """
    blocks = blocks or {}
    costs = tuple(tuple(float(stored_weight_bits(layer, bits, blocks.get(layer.name),
                                                 not channel_scales and blocks.get(layer.name) is None))
                        for bits in widths) for layer, widths in zip(layers, choices, strict=True))
    return clado.Candidates(tuple(choices), costs)


def budget_bits(budget: Budget, layers: list[Layer], fixed_bytes: int, float_bytes: int) -> tuple[float, bool]:
    """The budget in stored bits for the weight codes, and whether it is a file size (else an average)."""
    if budget.avg_bits is not None:
        return passes_budget.average_budget(budget.avg_bits, sum(layer.params for layer in layers)), False
    target_bytes = budget.size_mb * 1e6 if budget.size_mb is not None else budget.size_ratio * float_bytes
    try:
        return passes_budget.size_budget(target_bytes, fixed_bytes), True
    except passes_budget.InfeasibleBudget:
        raise OnnxqError(f"the size budget ({target_bytes / 1e6:.3f} MB) is smaller than the parts of the model "
                         f"that are not quantized ({fixed_bytes / 1e6:.3f} MB); raise the budget") from None


def check_budget(cands: clado.Candidates, limit: float, layers: list[Layer], is_size: bool, fixed_bytes: int) -> None:
    """Refuse budgets that no assignment meets, naming the smallest feasible one."""
    if cands.min_cost <= limit:
        return
    if is_size:
        smallest = (cands.min_cost / 8 + fixed_bytes) / 1e6
        raise OnnxqError(f"the size budget is below the smallest mixed model ({smallest:.3f} MB with every layer "
                         "at its lowest width); raise the budget or add lower --bit-choices")
    params = sum(layer.params for layer in layers)
    raise OnnxqError(f"--avg-bits is below the smallest stored width ({cands.min_cost / params:.2f} bits); "
                     "raise it or add lower --bit-choices")


def cache_key(fingerprint: str, choices: list[tuple[int, ...]], method: str, estimator: str, samples: int) -> str:
    """What a cached Omega depends on; "diagonal" shares "fast"'s matrix (it only reads its diagonal)."""
    measured = "fast" if estimator == "diagonal" else estimator
    text = json.dumps([fingerprint, choices, method, measured, samples])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def load_omega(path: Path | None, key: str, size: int) -> np.ndarray | None:
    """The cached sensitivity matrix when the file holds one for ``key`` that is ``size`` x ``size``, finite and
    symmetric; else None, with a warning saying why (the caller measures it again)."""
    if path is None or not path.exists():
        return None
    try:
        with CacheReader(path) as reader:
            stored = str(reader.array("key", (), "U"))
            if stored != key:
                log.warning("not reusing %s: it was measured for another model, data or options; measuring "
                            "sensitivities again", path)
                return None
            if "omega.npy" not in reader.names and "single_keys.npy" in reader.names:
                return None  # the finished probes of an interrupted measurement: it resumes from them
            omega = reader.array("omega", (size, size)).astype(np.float64)
    except BadCache as err:
        log.warning("not reusing %s: %s; measuring sensitivities again", path, err)
        return None
    if not np.allclose(omega, omega.T, rtol=1e-6, atol=1e-12):
        log.warning("not reusing %s: its sensitivity matrix is not symmetric; measuring sensitivities again", path)
        return None
    log.info("reusing the sensitivity matrix from %s", path)
    return omega


def save_omega(path: Path | None, key: str, omega: np.ndarray) -> None:
    """Cache Omega with its key, atomically; never over a file that is not an onnxq cache."""
    if path is None:
        return
    if path.exists() and not looks_like_cache(path, "key.npy"):
        log.warning("not caching the sensitivities in %s: it exists and is not an onnxq cache; delete it or "
                    "choose another --sensitivity-cache path", path)
        return
    write_with(path, lambda handle: np.savez(handle, key=np.array(key), omega=omega), "--sensitivity-cache")


def measure_omega(oracle: LossOracle, layers: list[Layer], cands: clado.Candidates,
                  candidates: dict[tuple[str, int], QuantWeight], estimator: str,
                  progress: Callable | None, errors: Mapping[tuple[str, int], float] | None = None,
                  cluster: Cluster | None = None, journal: ProbeJournal | None = None) -> np.ndarray:
    """Measure Omega: single-layer losses always; pairs for "exact"; Fisher cross terms for "fast". The probes
    run in tasks (``probes.py``), here or on ``cluster``; ``journal`` keeps the finished ones.

    With ``errors`` (each candidate's rounding error) the fast estimator measures only each layer's
    ``clado.measured_widths`` and estimates the other widths' losses and output changes from those errors
    (``clado.estimated_singles``): for {2, 3, 4, 8} the 8-bit losses scale from the 4-bit ones, a quarter fewer
    forward passes, the same allocations on SqueezeNet and MobileNet v1. The exact estimator measures every width.
    """
    plan = clado.evaluation_plan(cands)
    pairs = plan.pairs if estimator == "exact" else []
    singles = plan.singles
    if errors is not None and estimator != "exact":
        singles = [(i, b) for i, b in singles if b in clado.measured_widths(cands.bits[i])]
    total = len(singles) + len(pairs)
    skipped = len(plan.singles) - len(singles)
    log.info("measuring sensitivities: %d forward passes of %d samples%s", total + 1, len(oracle.reference),
             f" ({skipped} more widths estimated from their rounding errors)" if skipped else "")
    tensors = {(i, b): oracle.replacement(layers[i], candidates[(layers[i].name, b)]) for i, b in singles}
    reference_loss = oracle.loss_of_outputs(oracle.reference)
    keep_deltas = estimator == "fast" and oracle.classifier
    with (progress(total, "sensitivity") if progress else NoProgress()) as bar:
        found = run_probes(singles, pairs, keep_deltas, bar, journal or ProbeJournal(None, ""),
                           lambda task: evaluate_task(oracle, layers, tensors, task, keep_deltas), cluster,
                           lambda tasks: evaluate_on_ray(cluster, oracle, layers, tensors, tasks, keep_deltas))
    single, deltas = dict(found.single), dict(found.deltas)
    if skipped:
        increases = {key: value - reference_loss for key, value in single.items()}
        by_index = {(i, b): errors[(layers[i].name, b)] for i, b in plan.singles}
        for key, estimate in clado.estimated_singles(cands, increases, by_index).items():
            single[key] = reference_loss + estimate.increase
            if estimate.source in deltas:
                deltas[key] = deltas[estimate.source] * np.float32(np.sqrt(estimate.ratio))
    omega = clado.sensitivity_matrix(cands, reference_loss, single, found.pair)
    if estimator == "fast" and deltas:
        omega = clado.with_diagonal(clado.fisher_sensitivity(cands, deltas, oracle.probabilities), np.diag(omega))
    return omega


def evaluate_task(oracle: LossOracle, layers: list[Layer], tensors: dict[tuple[int, int], dict[str, np.ndarray]],
                  task: Task, keep_deltas: bool) -> list[Finished]:
    """One task's probes in this process: each single's loss (and output change), each pair's loss."""
    finished: list[Finished] = []
    for key, outputs in single_outputs(oracle, layers, {key: tensors[key] for key in task.singles}):
        delta = (outputs - oracle.reference).astype(np.float32) if keep_deltas else None
        finished.append((key, oracle.loss_of_outputs(outputs), delta))
    for a, b in task.pairs:
        finished.append(((a, b), oracle.loss({**tensors[a], **tensors[b]}), None))
    return finished


def single_outputs(oracle: LossOracle, layers: list[Layer], tensors: dict[tuple[int, int], dict[str, np.ndarray]]
                   ) -> Iterator[tuple[tuple[int, int], np.ndarray]]:
    """The model's output with each single candidate in place: on the layer's suffix only (``suffix.py``) where
    the graph allows it, else by a whole-model pass of the oracle."""
    if not SuffixProbes.applies(oracle.model):
        for key, replaced in tensors.items():
            yield key, oracle.outputs(replaced)
        return
    probes: dict[str, list] = {}
    for (i, b), replaced in tensors.items():
        probes.setdefault(layers[i].name, []).append(((i, b), replaced))
    suffixes = SuffixProbes(oracle.model, layers, oracle.feeds, oracle.reference, oracle.float_weights,
                            oracle.threads)
    for key, outputs in suffixes.outputs(probes):
        oracle.evaluations += 1
        yield key, outputs


Measure = Callable[[tuple[int, ...]], Iterator[np.ndarray]]  # one allocation's per-sample losses, batch by batch


def verify(result: clado.Allocation, cands: clado.Candidates, limit: float, omega: np.ndarray,
           measure: Measure) -> tuple[np.ndarray, str, dict[str, float], dict[str, int]]:
    """Measure the solver's allocation, the diagonal-only one and the widest uniform one that fits; keep the best.

    The quadratic model is a second-order expansion at the float model; at 2-3 bits the loss of many perturbed
    layers together departs from it, and one forward pass per alternative settles which is really better. The
    alternatives run side by side (``race``): one far worse than the best stops after a few batches. Returns the
    kept choice, its label, every alternative's loss, and the samples of those stopped early.
    """
    options = {"solver": result.choice, "diagonal": clado.allocate_diagonal(omega, cands, limit).choice,
               **passes_budget.uniform_choices(cands, limit)}
    widths = {label: tuple(int(b) for b in cands.bits_of(choice)) for label, choice in options.items()}
    means, samples = passes_budget.race({bits: measure(bits) for bits in dict.fromkeys(widths.values())})
    picked, losses, stopped = passes_budget.pick_verified(widths, means, samples)
    for label, seen in stopped.items():
        log.info("verification: dropped the %s allocation after %d samples (loss %.4g against %.4g)",
                 label, seen, losses[label], losses[picked])
    return options[picked], picked, losses, stopped


def allocate_bits(layers: list[Layer], choices: list[tuple[int, ...]], budget: Budget, omega: np.ndarray,
                  fixed_bytes: int, float_bytes: int, estimator: str, time_limit: float,
                  macs: dict[str, float] | None = None, blocks: dict[str, int | None] | None = None,
                  measure: Measure | None = None) -> MixedPlan:
    """Solve the allocation under the budget: exactly (MILP) with cross terms, or the diagonal baseline.

    With ``macs`` (``--prefer speed``) a second solve adds a linear speed term to Omega's diagonal: leaving
    every multiply-add to float kernels costs as much as the first (loss-only) solution's predicted loss, so
    8-bit (W8A8) layers win wherever they cost little accuracy for the same size.
    """
    limit, is_size = budget_bits(budget, layers, fixed_bytes, float_bytes)
    cands = candidates_for(layers, choices, blocks, is_size)
    check_budget(cands, limit, layers, is_size, fixed_bytes)
    loss_matrix = np.diag(np.diag(omega)) if estimator == "diagonal" else omega

    def solve(matrix: np.ndarray) -> clado.Allocation:
        if estimator == "diagonal":
            return clado.allocate_diagonal(matrix, cands, limit, time_limit=time_limit)
        return clado.allocate(matrix, cands, limit, time_limit=time_limit)

    result = solve(omega)
    seconds = result.seconds
    share = None
    if macs is not None:
        penalty = passes_budget.float_mac_share(cands, [macs[layer.name] for layer in layers])
        weight = max(result.objective, 1e-12)
        result = solve(omega + np.diag(weight * penalty))
        seconds += result.seconds
        share = 1.0 - float(penalty[cands.offsets[:-1] + result.choice].sum())
    choice, picked, verified, stopped = result.choice, "solver", {}, {}
    if measure is not None and macs is None:
        start = time.perf_counter()
        choice, picked, verified, stopped = verify(result, cands, limit, omega, measure)
        seconds += time.perf_counter() - start
    bits = {layer.name: int(b) for layer, b in zip(layers, cands.bits_of(choice), strict=True)}
    keys = [(layer.name, b) for layer, widths in zip(layers, choices, strict=True) for b in widths]
    loss = clado.quadratic_value(loss_matrix, cands, choice)
    return MixedPlan(bits, estimator, loss, float(result.gap), result.status, limit, cands.total_cost(choice), 0,
                     {"solve": seconds}, omega, keys, "speed" if macs is not None else "size", share, verified,
                     picked, stopped)


def sensitivity_and_allocation(oracle_factory: Callable[[], LossOracle], layers: list[Layer],
                               candidates: dict[tuple[str, int], QuantWeight], choices: list[tuple[int, ...]],
                               budget: Budget, estimator: str, fixed_bytes: int, float_bytes: int,
                               cache: Path | None, key: str, time_limit: float,
                               progress: Callable | None, macs: dict[str, float] | None = None,
                               verifier_factory: Callable[[], LossOracle] | None = None,
                               weights_for: Callable[[dict[str, int]], dict[str, QuantWeight]] | None = None,
                               errors: Mapping[tuple[str, int], float] | None = None,
                               cluster: Cluster | None = None) -> MixedPlan:
    """Measure (or reload) Omega, then allocate widths under the budget; with ``verifier_factory``, check the
    result against the diagonal-only and uniform allocations by measuring each on that oracle's samples, with
    the weights ``weights_for`` gives an allocation (default: the candidates; sequential rounding differs).
    With ``errors`` (the candidates' rounding errors) some widths are estimated, not measured (``measure_omega``);
    with ``cluster`` the probes run as Ray tasks; with ``cache`` the finished ones are kept as they finish."""
    if estimator not in ESTIMATORS:
        raise OnnxqError(f"unknown sensitivity estimator {estimator!r}; choose one of {', '.join(ESTIMATORS)}")
    limit, is_size = budget_bits(budget, layers, fixed_bytes, float_bytes)
    blocks = {name: qw.grid.block_size for (name, _), qw in candidates.items()}
    check_budget(candidates_for(layers, choices, blocks, is_size), limit, layers, is_size, fixed_bytes)
    start = time.perf_counter()
    omega = load_omega(cache, key, sum(len(c) for c in choices))
    evaluations, oracle = 0, None
    if omega is None:
        oracle = oracle_factory()
        cands = candidates_for(layers, choices)
        measured = "fast" if estimator == "diagonal" else estimator  # the Fisher terms cost no extra passes
        journal = ProbeJournal(cache, key)
        omega = measure_omega(oracle, layers, cands, candidates, measured, progress, errors, cluster, journal)
        evaluations = oracle.evaluations
        save_omega(cache, key, omega)
    measured = time.perf_counter() - start

    verifier = verifier_factory() if verifier_factory and estimator != "diagonal" and macs is None else None

    if verifier is not None and oracle is not None:
        verifier.share_reference(oracle)

    def measure(bits: tuple[int, ...]) -> Iterator[np.ndarray]:
        """The verifier's per-sample losses of one whole allocation (one forward pass), batch by batch."""
        widths = {layer.name: b for layer, b in zip(layers, bits, strict=True)}
        weights = weights_for(widths) if weights_for else {name: candidates[(name, b)] for name, b in widths.items()}
        replaced = {}
        for layer in layers:
            replaced.update(verifier.replacement(layer, weights[layer.name]))
        return verifier.constant_sample_losses(replaced)

    plan = allocate_bits(layers, choices, budget, omega, fixed_bytes, float_bytes, estimator, time_limit, macs,
                         blocks, measure if verifier is not None else None)
    plan.evaluations = evaluations + (verifier.evaluations if verifier is not None else 0)
    plan.seconds["sensitivity"] = measured
    return plan


def write_bits_json(path: Path, layers: list[Layer], bits: dict[str, int]) -> None:
    """The assignment as ``{"bits": {layer: width}}`` plus onnxruntime's TensorQuantOverrides form."""
    overrides = {layer.weight: [{"quant_type": "QInt8" if bits[layer.name] == 8 else "QInt4",
                                 "axis": layer.channel_axis}] for layer in layers if layer.name in bits}
    text = json.dumps({"bits": bits, "tensor_quant_overrides": overrides}, indent=1)
    write_text(path, text, "--bits-json")


def read_bits_json(path: Path, layers: list[Layer]) -> dict[str, int]:
    """Per-layer widths from an onnxq bits file, or from a plain TensorQuantOverrides file (by weight name)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise OnnxqError(f"cannot read bit assignment {path} ({err}); fix or delete the file") from err
    if not isinstance(data, dict):
        raise OnnxqError(f"bit assignment {path} holds a JSON {type(data).__name__}, not an object; write "
                         '{"bits": {"<layer>": <width>}} or an onnxruntime TensorQuantOverrides object')
    if "bits" in data:
        return _checked_widths(path, data["bits"])
    return _override_widths(path, data.get("tensor_quant_overrides", data), layers)


def _checked_widths(path: Path, bits: object) -> dict[str, int]:
    """``{"layer": width}`` with every width one onnxq can store."""
    if not isinstance(bits, dict):
        raise OnnxqError(f'"bits" in {path} must map layer names to widths, e.g. {{"conv1": 8}}')
    bad = {name: b for name, b in bits.items() if isinstance(b, bool) or b not in WIDTHS}
    if bad:
        name, width = next(iter(bad.items()))
        raise OnnxqError(f"bit assignment {path} gives layer {name!r} width {width!r}; widths are "
                         f"{', '.join(map(str, WIDTHS))}")
    return {str(name): int(b) for name, b in bits.items()}


def _override_widths(path: Path, overrides: object, layers: list[Layer]) -> dict[str, int]:
    """Widths from onnxruntime's ``{weight: [{"quant_type": "QInt4", ...}]}`` form (other types are skipped)."""
    if not isinstance(overrides, dict) or not all(isinstance(e, list) for e in overrides.values()):
        raise OnnxqError(f'{path} is neither an onnxq bit assignment ({{"bits": {{...}}}}) nor onnxruntime '
                         'TensorQuantOverrides ({"<weight>": [{"quant_type": "QInt4"}]}); fix or delete it')
    by_weight = {layer.weight: layer.name for layer in layers}
    widths = {"QInt8": 8, "QUInt8": 8, "QInt4": 4, "QUInt4": 4}
    bits = {}
    for weight, entries in overrides.items():
        quant_type = entries[0].get("quant_type") if entries and isinstance(entries[0], dict) else None
        if weight in by_weight and quant_type in widths:
            bits[by_weight[weight]] = widths[quant_type]
    return bits
