"""Issue 4 benchmark: top-1 against size for uniform widths, diagonal-only allocation, CLADO (fast) and
CLADO (exact) at average stored widths 2.5, 3, 3.5 and 4, on the ../shared models.

Calibration: 256 images of imagenet-calib1000, every 4th (what --calib-size 256 takes; cached statistics);
sensitivities on the next 128 of that spread order (--clado-samples, held out), verification on the next 512;
evaluation: all of imagenet-val1300.
Writes bench/results/<tag>.{json,md,png}.

    python bench/mixed_precision.py [--models ...] [--budgets 2.5,3,3.5,4] [--exact-models squeezenet1.1]
    python bench/mixed_precision.py --models squeezenet1.1 --sequential --tag mixed_squeezenet_sequential
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import click
from common import CALIB, MODELS, RESULTS, model_path, require_shared, save_results, top1, val_set
from methods import calibration_stats

import onnxq
from onnxq import Budget


def run(name: str, stats: Path, x, y, **options) -> dict:
    """Quantize with the given options and evaluate; returns the figures of one point."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "q.onnx"
        start = time.perf_counter()
        result = onnxq.quantize(model_path(name), CALIB, out, stats=stats, preprocessing=MODELS[name], **options)
        seconds = time.perf_counter() - start
        plan = result.mixed
        return {"top1": top1(out, x, y), "size_mb": out.stat().st_size / 1e6, "seconds": round(seconds, 1),
                "avg_stored_bits": round(result.average_bits(stored=True), 3),
                "avg_logical_bits": round(result.average_bits(stored=False), 3),
                "bits": [r.bits for r in result.layers],
                **({"solver": plan.status, "gap": plan.gap, "evaluations": plan.evaluations,
                    "sensitivity_seconds": round(plan.seconds.get("sensitivity", 0), 1),
                    "solve_seconds": round(plan.seconds.get("solve", 0), 2), "picked": plan.picked,
                    "verified": plan.verified} if plan else {})}


def plot(rows: list[dict], fp32: dict[str, float], path: Path) -> None:
    """One panel per model: top-1 against file size for each allocation strategy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(fp32)
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        for strategy, style in (("uniform", "ks--"), ("diagonal", "bo-"), ("clado-fast", "r^-"),
                                ("clado-exact", "gD-")):
            pts = sorted((r["size_mb"], r["top1"]) for r in rows if r["model"] == name and r["strategy"] == strategy)
            if pts:
                ax.plot(*zip(*pts, strict=True), style, label=strategy)
        ax.axhline(fp32[name], color="gray", lw=0.8, label="FP32")
        ax.set(title=name, xlabel="file size (MB)", ylabel="top-1 on imagenet-val1300 (%)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def markdown(rows: list[dict], fp32: dict[str, float]) -> str:
    out = []
    for name in fp32:
        out.append(f"\n**{name}** (FP32 top-1 {fp32[name]:.2f} %)\n")
        out.append("| budget | uniform | diagonal-only | CLADO fast | CLADO exact |")
        out.append("|---|---|---|---|---|")
        for budget in sorted({r["budget"] for r in rows if r["model"] == name}, key=str):
            cells = []
            for strategy in ("uniform", "diagonal", "clado-fast", "clado-exact"):
                hit = [r for r in rows if r["model"] == name and r["budget"] == budget and r["strategy"] == strategy]
                picked = hit[0].get("picked", "solver") if hit else "solver"
                note = "" if picked == "solver" else f" [{picked}]"
                cells.append(f"{hit[0]['top1']:.2f} ({hit[0]['size_mb']:.2f} MB){note}" if hit else "")
            out.append(f"| {budget} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


@click.command()
@click.option("--models", default=",".join(MODELS))
@click.option("--budgets", default="2.5,3,3.5,4")
@click.option("--method", default="comq")
@click.option("--clado-samples", default=128)
@click.option("--exact-models", default="", help="Models on which the exact (all pairs) estimator also runs.")
@click.option("--exact-samples", default=32, help="Samples for the exact estimator (it needs every pair).")
@click.option("--verify-samples", default=512, help="Held-out samples for verification (0: the solver's choice).")
@click.option("--sequential", is_flag=True, help="Round every run's chosen widths sequentially (--sequential).")
@click.option("--tag", default="mixed_precision", help="Name of the result files.")
def main(models: str, budgets: str, method: str, clado_samples: int, exact_models: str, exact_samples: int,
         verify_samples: int, sequential: bool, tag: str) -> None:
    require_shared()
    rows, fp32 = [], {}
    cache = RESULTS / "cache"
    for name in models.split(","):
        x, y = val_set(name)
        fp32[name] = top1(model_path(name), x, y)
        stats, _ = calibration_stats(name, 256)
        for bits in (2, 3, 4):
            row = run(name, None if sequential else stats, x, y, bits=bits, method=method, sequential=sequential)
            rows.append({"model": name, "strategy": "uniform", "budget": f"W{bits}", **row})
            click.echo(json.dumps(rows[-1]), err=True)
        strategies = [("diagonal", "diagonal", clado_samples), ("clado-fast", "fast", clado_samples)]
        if name in exact_models.split(","):
            strategies.append(("clado-exact", "exact", exact_samples))
        for budget in map(float, budgets.split(",")):
            for strategy, estimator, samples in strategies:
                shared = "fast" if estimator == "diagonal" else estimator  # the same measured matrix
                sens_cache = cache / f"omega_{name}_{method}_{shared}_{samples}.npz"
                row = run(name, stats, x, y, method=method, budget=Budget(avg_bits=budget), sensitivity=estimator,
                          clado_samples=samples, sensitivity_cache=sens_cache, clado_time_limit=120,
                          verify_samples=0 if estimator == "diagonal" else verify_samples, sequential=sequential)
                rows.append({"model": name, "strategy": strategy, "budget": f"avg {budget:g}", **row})
                click.echo(json.dumps(rows[-1]), err=True)
    table = markdown(rows, fp32)
    save_results(tag, fp32, rows, table)
    plot(rows, fp32, RESULTS / f"{tag}.png")
    click.echo(table)


if __name__ == "__main__":
    main()
