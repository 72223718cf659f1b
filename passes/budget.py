"""Budget arithmetic of mixed precision: the bit budget, the uniform baseline, the speed term, and the race that
verifies alternative allocations on measured losses. Pure numpy, no ONNX; ``onnxq.allocation.mixed`` adapts it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import numpy as np

from .clado import Candidates

# An alternative allocation stops being measured once, after at least DROP_AFTER samples, its mean loss is
# DROP_RATIO times the best one's and the paired per-sample difference is DROP_Z standard errors above zero
# (uniform 2 bits at avg 3 on SqueezeNet / MobileNet v1 / EfficientNet-Lite0: 14-48x the best one's loss): the
# finalists still see every sample.
DROP_AFTER, DROP_RATIO, DROP_Z = 32, 1.5, 4.0


class InfeasibleBudget(ValueError):
    """A budget that no assignment of widths meets."""


def average_budget(avg_bits: float, params: int) -> float:
    """Stored bits the weight codes may take at an average of ``avg_bits`` per weight."""
    return avg_bits * params


def size_budget(target_bytes: float, fixed_bytes: int) -> float:
    """Stored bits left for the weight codes in a file of ``target_bytes`` once the unquantized parts
    (``fixed_bytes``) are counted."""
    available = (target_bytes - fixed_bytes) * 8
    if available <= 0:
        raise InfeasibleBudget(f"{target_bytes} bytes leave no room beside the {fixed_bytes} fixed bytes")
    return available


def uniform_choices(cands: Candidates, limit: float) -> dict[str, np.ndarray]:
    """The widest uniform width that fits the budget (layers with a single width keep it), by label; narrower
    uniform widths are never better, so they are not worth a forward pass."""
    for b in sorted({b for widths in cands.bits for b in widths}, reverse=True):
        if all(b in widths or len(widths) == 1 for widths in cands.bits):
            choice = np.array([widths.index(b) if b in widths else 0 for widths in cands.bits])
            if cands.total_cost(choice) <= limit:
                return {f"uniform {b}": choice}
    return {}


def float_mac_share(cands: Candidates, layer_macs: Sequence[float]) -> np.ndarray:
    """Per candidate, the share of the model's multiply-adds it leaves to float kernels: every width but 8
    (8-bit layers run as W8A8 in integer kernels; 2-4-bit weights are dequantized to float)."""
    total = float(sum(layer_macs)) or 1.0
    return np.array([0.0 if b == 8 else macs / total
                     for macs, widths in zip(layer_macs, cands.bits, strict=True) for b in widths])


def race(streams: Mapping[tuple[int, ...], Iterator[np.ndarray]]) -> tuple[dict[tuple[int, ...], float],
                                                                          dict[tuple[int, ...], int]]:
    """Advance every allocation's per-sample losses batch by batch, dropping the clearly worse ones early
    (``DROP_*``); returns each one's mean loss and the samples it was measured on (all, for those never dropped)."""
    seen: dict[tuple[int, ...], list[np.ndarray]] = {key: [] for key in streams}
    live = dict(streams)
    while live:
        for key, stream in list(live.items()):
            batch = next(stream, None)
            if batch is None:
                del live[key]
            else:
                seen[key].append(batch)
        if len(live) < 2:
            continue
        losses = {key: np.concatenate(seen[key]) for key in live}
        best = min(losses, key=lambda key: losses[key].mean())
        for key, values in losses.items():
            if key != best and clearly_worse(values, losses[best]):
                close = getattr(live.pop(key), "close", None)
                if close is not None:
                    close()
    means = {key: float(np.concatenate(parts).mean()) for key, parts in seen.items()}
    return means, {key: sum(len(part) for part in parts) for key, parts in seen.items()}


def clearly_worse(values: np.ndarray, best: np.ndarray) -> bool:
    """Whether per-sample losses ``values`` are far above ``best`` on the same samples (``DROP_*``)."""
    difference = values - best
    return bool(len(values) >= DROP_AFTER and values.mean() > DROP_RATIO * best.mean()
                and difference.mean() > DROP_Z * difference.std(ddof=1) / np.sqrt(len(values)))


def pick_verified(widths: Mapping[str, tuple[int, ...]], means: Mapping[tuple[int, ...], float],
                  samples: Mapping[tuple[int, ...], int]) -> tuple[str, dict[str, float], dict[str, int]]:
    """The label whose allocation measured the lowest loss among those measured on every sample (the solver's on
    a tie), every label's loss, and the samples of those stopped early."""
    full = max(samples.values())
    losses = {label: means[bits] for label, bits in widths.items()}
    finalists = [label for label, bits in widths.items() if samples[bits] == full]
    picked = min(finalists, key=lambda label: (losses[label], label != "solver"))
    stopped = {label: samples[bits] for label, bits in widths.items() if samples[bits] < full}
    return picked, losses, stopped
