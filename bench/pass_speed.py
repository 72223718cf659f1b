"""Time the rounding passes (RTN, GPTQ, COMQ in both visiting orders) on typical layer shapes.

Synthetic layers: W heavy-tailed, H = X^T X with X correlated (low-rank common part, per-input scales),
so GPTQ/COMQ have something to exploit. Prints seconds and relative error tr(E H E^T)/tr(W H W^T) per pass.

    OPENBLAS_NUM_THREADS=1 python bench/pass_speed.py [--bits 4] [--sweeps 3] [--repeat 3] [--quality]

Times are the best of ``--repeat`` runs, wall clock and CPU (summed over threads; on a busy machine the CPU
column is the steadier one).

``--quality`` adds a table of relative errors on a moderately correlated layer (AR(1) inputs, rho 0.6), where
the passes differ more than on the strongly low-rank synthetic layers.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import scipy.linalg

from onnxq.passes import Grid, QuantWeight, comq, gptq, relative_error, rtn

# name, out channels, fan-in, groups (depthwise: groups = out)
SHAPES = (
    ("fc 1280x1000", 1280, 1000, 1),
    ("conv 512x4608", 512, 4608, 1),
    ("conv 96x864", 96, 864, 1),
    ("dw 1000x9", 1000, 9, 1000),
)


def correlated_gram(d: int, groups: int, rng: np.random.Generator, samples: int = 2048) -> np.ndarray:
    """(groups, d, d) Gram matrices of inputs with a shared low-rank part and uneven per-input scales."""
    rank = max(1, min(32, d // 3))
    H = np.empty((groups, d, d))
    for g in range(groups):
        Z = rng.standard_normal((samples, d)) + rng.standard_normal((samples, rank)) @ rng.standard_normal((rank, d))
        X = Z * np.exp(rng.normal(0.0, 0.5, d))
        H[g] = X.T @ X
    return H


def depthwise_gram(d: int, groups: int, rng: np.random.Generator, samples: int = 512) -> np.ndarray:
    """Batched Gram matrices for many tiny groups (one 3x3 patch per channel): built in one einsum."""
    mix = rng.standard_normal((groups, d, d)) * 0.5 + np.eye(d)
    X = np.einsum("gnd,gde->gne", rng.standard_normal((groups, samples, d)), mix)
    return np.einsum("gnd,gne->gde", X, X)


def timed(fn: Callable[[], QuantWeight], repeat: int) -> tuple[float, float, QuantWeight]:
    """Best wall time and best CPU time (all threads) of ``repeat`` runs, and the last result."""
    wall, cpu, out = np.inf, np.inf, None
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        wall, cpu = min(wall, time.perf_counter() - t0), min(cpu, time.process_time() - c0)
    return wall, cpu, out


def bench_shape(name: str, out: int, d: int, groups: int, grid: Grid, sweeps: int, repeat: int) -> list[str]:
    """Table rows for one shape: time and relative error of every pass."""
    rng = np.random.default_rng(0)
    W = rng.standard_t(5, size=(out, d)) * 0.05
    H = depthwise_gram(d, groups, rng) if groups > 1 else correlated_gram(d, groups, rng)
    passes: dict[str, Callable[[], QuantWeight]] = {
        "rtn": lambda: rtn.quantize(W, H, grid),
        "gptq": lambda: gptq.quantize(W, H, grid),
    }
    for order in ("channel", "shared"):
        passes[f"comq/{order}"] = lambda o=order: comq.quantize(W, H, grid, sweeps=sweeps, order=o)
    passes["comq/auto"] = lambda: comq.quantize(W, H, grid, sweeps=sweeps)
    passes["comq/rtn-init"] = lambda: comq.quantize(W, H, grid, sweeps=sweeps, init="rtn")
    passes["comq/float-init"] = lambda: comq.quantize(W, H, grid, sweeps=sweeps, init="float")
    rows = []
    for label, fn in passes.items():
        wall, cpu, qw = timed(fn, repeat)
        err = relative_error(W, qw.dequantize(), H)
        rows.append(f"| {name:<14} | {label:<16} | {wall:8.3f} | {cpu:8.3f} | {err:.5f} |")
    return rows


def quality_table(sweeps: int) -> list[str]:
    """Relative errors of every pass/option on a 256x576 layer with AR(1)-correlated inputs, W2-W4."""
    rng = np.random.default_rng(2)
    d = 576
    corr = np.linalg.cholesky(scipy.linalg.toeplitz(0.6 ** np.arange(d)))
    X = (rng.standard_normal((4096, d)) @ corr.T) * np.exp(rng.normal(0.0, 0.5, d))
    H, W = X.T @ X, rng.standard_t(5, size=(256, d)) * 0.05
    variants: dict[str, Callable[[Grid], QuantWeight]] = {
        "rtn": lambda g: rtn.quantize(W, H, g),
        "gptq": lambda g: gptq.quantize(W, H, g),
    }
    for init in ("gptq", "rtn", "float"):
        for order in ("channel", "shared"):
            variants[f"comq {init}/{order}"] = lambda g, i=init, o=order: comq.quantize(
                W, H, g, init=i, order=o, sweeps=sweeps
            )
        variants[f"comq {init}, no scale upd."] = lambda g, i=init: comq.quantize(
            W, H, g, init=i, sweeps=sweeps, scale_update=False
        )
        variants[f"comq {init}, 1 sweep"] = lambda g, i=init: comq.quantize(W, H, g, init=i, sweeps=1)
    rows = ["| pass (AR 0.6, 256x576)      | W2     | W3     | W4     |", "|---|---|---|---|"]
    for label, fn in variants.items():
        errs = [relative_error(W, fn(Grid(bits)).dequantize(), H) for bits in (2, 3, 4)]
        rows.append(f"| {label:<27} | " + " | ".join(f"{e:.4f}" for e in errs) + " |")
    return rows


def main() -> None:
    """Print the markdown table for every shape."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--symmetric", action="store_true")
    parser.add_argument("--sweeps", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--quality", action="store_true")
    args = parser.parse_args()
    grid = Grid(args.bits, args.symmetric)
    print(f"W{args.bits} {'symmetric' if args.symmetric else 'asymmetric'}, COMQ sweeps={args.sweeps}")
    print("| shape          | pass             | wall s   | cpu s    | rel. err |")
    print("|----------------|------------------|----------|----------|----------|")
    for name, out, d, groups in SHAPES:
        for row in bench_shape(name, out, d, groups, grid, args.sweeps, args.repeat):
            print(row, flush=True)
    if args.quality:
        print()
        print("\n".join(quality_table(args.sweeps)))


if __name__ == "__main__":
    main()
