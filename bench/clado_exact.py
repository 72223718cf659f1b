"""Issue 20: CLADO as the paper measures it. The exact Omega (every pair of layers and widths measured) on Ray
workers, the exact-vs-fast agreement of all its cross terms, and at each budget the allocations of exact CLADO,
fast CLADO, diagonal-only and uniform, each evaluated on validation images; then the measurement's scaling
(in-process, 1 and 2 local Ray workers, and a local Ray cluster the benchmark starts with 2 CPUs).

Calibration: 256 images of imagenet-calib1000 (cached statistics); sensitivities on the next ``--samples`` held
out; the solver's allocation as it is (``--verify-samples 0``: the question is whether the cross terms change
it); evaluation: top-1 and mean KL from the float model on imagenet-val1300 (``--val-limit`` for fewer).
``--layers K`` quantizes only the first K layers (the others stay float): a piece of the full run that fits a
busy machine. Writes bench/results/clado_exact_<model>_<layers>.{json,md}.

    python bench/clado_exact.py --model squeezenet1.1 --workers 2                 # the full run (hours)
    python bench/clado_exact.py --layers 4 --samples 32 --val-limit 300 --budgets 3,4   # a small piece
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np
from common import CALIB, MODELS, RESULTS, logits, model_path, require_shared, save_results, scores, val_set
from methods import calibration_stats
from scipy.stats import pearsonr, spearmanr

import onnxq

STORED = {2: 2, 3: 4, 4: 4, 8: 8}  # stored bits per width (3-bit codes are stored in INT4)


def quantize(name: str, stats: Path, out: Path, excluded: list[str], **options) -> onnxq.QuantizationResult:
    return onnxq.quantize(model_path(name), CALIB, out, stats=stats, preprocessing=MODELS[name],
                          nodes_to_exclude=tuple(re.escape(n) for n in excluded), **options)


def cross_agreement(exact: np.ndarray, fast: np.ndarray, widths: int) -> dict:
    """Exact vs Fisher cross terms over every pair of candidates of different layers."""
    layer = np.arange(len(exact)) // widths
    upper = np.triu(layer[:, None] != layer[None, :], 1)
    e, f = exact[upper], fast[upper]
    diagonal = np.diag(exact)
    return {"pairs": int(upper.sum()), "pearson": float(pearsonr(e, f)[0]), "spearman": float(spearmanr(e, f)[0]),
            "sign_agreement": float(np.mean(np.sign(e) == np.sign(f))),
            "exact_mean_abs": float(np.abs(e).mean()), "fast_mean_abs": float(np.abs(f).mean()),
            "cross_over_diag": float(np.abs(e).mean() / np.abs(diagonal).mean())}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_cluster(cpus: int, temp: str) -> tuple[subprocess.Popen, str]:
    """``ray start --head --block`` with its own port and temp folder, in a session of its own so that it (and
    only it) can be stopped; returns the process and the address."""
    port = free_port()
    ray = Path(sys.executable).with_name("ray")
    process = subprocess.Popen([str(ray), "start", "--head", "--block", f"--num-cpus={cpus}", f"--port={port}",
                                f"--temp-dir={temp}", "--include-dashboard=false", "--disable-usage-stats"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                               env={**os.environ, "RAY_AUTH_MODE": "disabled"})  # as the driver: no token
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
            time.sleep(5)  # the head's raylet registers after the GCS port opens
            return process, f"127.0.0.1:{port}"
        except OSError:
            time.sleep(1)
    stop_cluster(process)
    raise RuntimeError("the local Ray head did not start within 120 s")


def stop_cluster(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)


def measure(name: str, stats: Path, excluded: list[str], samples: int, **where) -> dict:
    """One exact measurement (no cache): its wall time, forward passes and Omega."""
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        result = quantize(name, stats, Path(tmp) / "q.onnx", excluded, avg_bits=4.0, sensitivity="exact",
                          clado_samples=samples, verify_samples=0, **where)
        total = time.perf_counter() - start
    plan = result.mixed
    return {"seconds": round(plan.seconds["sensitivity"], 1), "run_seconds": round(total, 1),
            "probes": plan.evaluations - 1, "omega": plan.omega}


@click.command()
@click.option("--model", "name", default="squeezenet1.1")
@click.option("--layers", "n_layers", default=0, help="Quantize only the first K layers (0: all).")
@click.option("--samples", default=128, help="Held-out samples the sensitivities are measured on.")
@click.option("--workers", default=2, help="Local Ray workers for the exact measurement.")
@click.option("--budgets", default="2.5,3,3.5,4")
@click.option("--val-limit", default=None, type=int, help="Evaluate on the first N validation images only.")
@click.option("--scaling/--no-scaling", default=True, help="Also time in-process, 1 and 2 workers and a cluster.")
def main(name: str, n_layers: int, samples: int, workers: int, budgets: str, val_limit: int | None,
         scaling: bool) -> None:
    require_shared()
    stats, _ = calibration_stats(name, 256)
    with onnxq.open_run(model_path(name), CALIB, onnxq.Config.from_options(preprocessing=MODELS[name])) as run:
        layers = run.layers  # as a run finds them in the prepared model
    kept = layers[:n_layers] if n_layers else layers
    excluded = [layer.name for layer in layers[len(kept):]]
    tag = f"clado_exact_{name}_{len(kept)}"
    widths = (2, 3, 4, 8)
    common = {"clado_samples": samples, "verify_samples": 0, "bit_choices": widths}
    cache = {est: RESULTS / "cache" / f"omega_{est}_{name}_{len(kept)}_{samples}.npz" for est in ("exact", "fast")}
    cache["exact"].parent.mkdir(parents=True, exist_ok=True)
    x, y = val_set(name, val_limit)
    reference = logits(model_path(name), x)
    fp32 = {name: round(float((reference.argmax(1) == y).mean() * 100), 2)}
    rows, omegas, seconds = [], {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "q.onnx"
        for estimator, where in (("exact", {"workers": workers}), ("fast", {})):
            start = time.perf_counter()
            result = quantize(name, stats, out, excluded, avg_bits=4.0, sensitivity=estimator,
                              sensitivity_cache=cache[estimator], **common, **where)
            omegas[estimator], seconds[estimator] = result.mixed.omega, round(time.perf_counter() - start, 1)
            click.echo(f"{estimator} Omega: {result.mixed.evaluations} forward passes, {seconds[estimator]} s",
                       err=True)
        for budget in (float(b) for b in budgets.split(",")):
            for strategy in ("exact", "fast", "diagonal", "uniform"):
                if strategy == "uniform":
                    bits = max(w for w in widths if STORED[w] <= budget)
                    result = quantize(name, stats, out, excluded, bits=bits)
                else:
                    result = quantize(name, stats, out, excluded, avg_bits=budget, sensitivity=strategy,
                                      sensitivity_cache=cache["exact" if strategy == "exact" else "fast"], **common)
                row = {"model": name, "budget": budget, "strategy": strategy, **scores(out, x, y, reference),
                       "avg_stored_bits": round(result.average_bits(stored=True), 3),
                       "bits": [r.bits for r in result.layers if r.name not in excluded]}
                rows.append(row)
                click.echo(json.dumps(row), err=True)
    agreement = cross_agreement(omegas["exact"], omegas["fast"], len(widths))
    timing = scaling_runs(name, stats, excluded, samples, omegas["exact"]) if scaling else []
    table = markdown(name, len(kept), samples, len(x), fp32[name], rows, agreement, timing)
    save_results(tag, fp32, rows, table, {"layers": len(kept), "samples": samples, "val_images": len(x),
                                          "agreement": agreement, "scaling": timing, "omega_seconds": seconds})
    click.echo(table)


def scaling_runs(name: str, stats: Path, excluded: list[str], samples: int, exact: np.ndarray) -> list[dict]:
    """The exact measurement's wall time in-process, on 1 and 2 local workers and on a 2-CPU local cluster;
    every Omega must equal the first one exactly."""
    runs = [("in-process", 1, {}), ("1 local worker", 1, {"workers": 1}), ("2 local workers", 2, {"workers": 2})]
    timing = []
    for label, count, where in runs:
        timing.append({"setup": label, "workers": count, **measure(name, stats, excluded, samples, **where)})
    with tempfile.TemporaryDirectory(prefix="rb") as temp:  # short: Ray's socket paths live under it
        process, address = start_cluster(2, temp)
        try:
            timing.append({"setup": "ray start --head (2 CPUs)", "workers": 2,
                           **measure(name, stats, excluded, samples, ray_address=address)})
        finally:
            stop_cluster(process)
    base = timing[0]["probes"] / timing[0]["seconds"]
    for entry in timing:
        omega = entry.pop("omega")
        entry["same_omega"] = bool(np.array_equal(omega, exact))
        entry["probes_per_s"] = round(entry["probes"] / entry["seconds"], 2)
        entry["per_worker_vs_in_process"] = round(entry["probes_per_s"] / entry["workers"] / base, 2)
    return timing


def markdown(name: str, n_layers: int, samples: int, images: int, fp32: float, rows: list[dict], agreement: dict,
             timing: list[dict]) -> str:
    lines = [f"**{name}**, {n_layers} layers quantized, Omega on {samples} held-out samples, {images} validation "
             f"images (FP32 top-1 {fp32:.2f} %); top-1 (%) / mean KL from the float model", "",
             "| avg stored bits | exact CLADO | fast CLADO | diagonal | uniform |", "|---|---|---|---|---|"]
    for budget in sorted({r["budget"] for r in rows}):
        cells = {r["strategy"]: f"{r['top1']:.2f} / {r['kl']:.4f}" for r in rows if r["budget"] == budget}
        lines.append(f"| {budget:g} | " + " | ".join(cells[s] for s in ("exact", "fast", "diagonal", "uniform")) + " |")
    lines += ["", f"Cross terms, all {agreement['pairs']} pairs: Pearson {agreement['pearson']:.3f}, Spearman "
              f"{agreement['spearman']:.3f}, sign agreement {agreement['sign_agreement']:.2f}, mean |exact| / mean "
              f"diagonal {agreement['cross_over_diag']:.3f}"]
    if timing:
        lines += ["", "| setup | probes | seconds | probes/s | per worker vs in-process | same Omega |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {t['setup']} | {t['probes']} | {t['seconds']} | {t['probes_per_s']} | "
                  f"{t['per_worker_vs_in_process']} | {t['same_omega']} |" for t in timing]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
