"""Time the CLADO allocation MILP (RLT linearisation) on random CLADO-like instances.

Instances: 4 candidates (2, 3, 4, 8 bits; 3-bit codes are stored in 4 bits as in ``passes.grid``), per-layer
sizes log-uniform in [1e4, 2.4e6] weights, cost = weights * stored bits + 32-bit per-channel scales,
budget = 3 bits per weight on average. Omega is indefinite: the diagonal is positive and falls 4x per
extra bit, cross terms are ``rho_ij sqrt(Omega_ii Omega_jj)`` with rho decaying with layer distance plus
measurement-like noise. Columns: model size of the linearisation, smallest eigenvalue of Omega over
max |Omega|, status, who found the returned allocation (HiGHS or the local search), objective, HiGHS's dual
bound, relative gap, wall seconds, and the predicted loss of the allocation over that of the diagonal-only
(layers independent) allocation. Run: ``python bench/clado_solver.py [--layers 20 30 50 80] [--time-limit 60]``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from onnxq.passes.clado import Candidates, allocate, allocate_diagonal, quadratic_value, rlt_model
from onnxq.passes.grid import Grid

BITS = (2, 3, 4, 8)


def random_problem(n_layers: int, seed: int, avg_bits: float = 3.0) -> tuple[np.ndarray, Candidates, float]:
    """A CLADO-like (Omega, candidates, budget) triple."""
    rng = np.random.default_rng(seed)
    params = np.exp(rng.uniform(np.log(1e4), np.log(2.4e6), n_layers)).round()
    channels = np.sqrt(params).round()
    stored = np.array([Grid(b).storage_bits for b in BITS], dtype=float)
    costs = params[:, None] * stored[None, :] + 32.0 * channels[:, None]
    cands = Candidates.uniform(BITS, costs)
    budget = float((params * avg_bits + 32.0 * channels).sum())
    scale = np.exp(rng.normal(-3.0, 1.0, n_layers))
    diag = (scale[:, None] * 4.0 ** -(np.array(BITS) - 2.0)[None, :]).ravel()
    root = np.sqrt(diag)
    dist = np.abs(np.subtract.outer(np.arange(n_layers), np.arange(n_layers)))
    rho = rng.normal(0.0, 0.15, (n_layers, n_layers)) * np.exp(-dist / 5.0)
    rho = np.kron(0.5 * (rho + rho.T), np.ones((len(BITS), len(BITS))))
    noise = rng.normal(0.0, 0.05, rho.shape)
    Omega = (rho + 0.5 * (noise + noise.T)) * np.outer(root, root)
    Omega[cands.same_layer()] = 0.0
    np.fill_diagonal(Omega, diag)
    return Omega, cands, budget


def model_size(Omega: np.ndarray, cands: Candidates) -> str:
    """Variables x rows of the linearisation (before the one-hot and budget rows)."""
    c, rows = rlt_model(Omega, cands)
    return f"{c.size}x{sum(r.A.shape[0] for r in rows)}"


def run(layers: list[int], seeds: int, time_limit: float, avg_bits: float) -> None:
    """Solve every instance and print one row per (L, seed)."""
    print(
        f"{'L':>3} {'seed':>4} {'vars x rows':>12} {'min eig':>9} {'status':>10} {'found by':>12} "
        f"{'objective':>10} {'bound':>10} {'gap':>8} {'seconds':>8} {'vs diag':>8}"
    )
    for n_layers in layers:
        for seed in range(seeds):
            Omega, cands, budget = random_problem(n_layers, seed, avg_bits)
            min_eig = np.linalg.eigvalsh(Omega).min() / np.abs(Omega).max()
            base = allocate_diagonal(Omega, cands, budget)
            base_obj = quadratic_value(Omega, cands, base.choice)
            t0 = time.perf_counter()
            res = allocate(Omega, cands, budget, time_limit=time_limit)
            wall = time.perf_counter() - t0
            print(
                f"{n_layers:>3} {seed:>4} {model_size(Omega, cands):>12} {min_eig:>9.2e} "
                f"{res.status:>10} {res.source:>12} {res.objective:>10.4e} {res.bound:>10.3e} "
                f"{res.gap:>8.2%} {wall:>8.2f} {quadratic_value(Omega, cands, res.choice) / base_obj:>8.3f}",
                flush=True,
            )


def main() -> None:
    """Parse arguments and run the benchmark."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[20, 30, 50, 80])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--time-limit", type=float, default=60.0)
    parser.add_argument("--avg-bits", type=float, default=3.0, help="budget in bits per weight")
    args = parser.parse_args()
    run(args.layers, args.seeds, args.time_limit, args.avg_bits)


if __name__ == "__main__":
    main()
