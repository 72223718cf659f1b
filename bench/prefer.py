"""Issue 5 benchmark: one size budget, two preferences. `--prefer size` (weight-only mixed widths, lowest loss)
against `--prefer speed` (8-bit layers as W8A8 integer kernels, the rest weight-only, CLADO's speed term), next
to FP32, uniform W8A8 and uniform W4 weight-only (first/last 8).

Calibration: 256 images of imagenet-calib1000 (every 4th) (cached statistics); sensitivities (CLADO fast) on its first
128; top-1 on all of imagenet-val1300; latency: median of repeated runs on random input at batch 1 and 32 on
this machine's CPU (every core), models timed in turn. Writes bench/results/prefer.{json,md}.

    python bench/prefer.py [--models squeezenet1.1,mobilenet_v1_0.75_224] [--avg-bits 5] [--choices 2,4,8]
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import click
from common import CALIB, MODELS, RESULTS, model_path, require_shared, top1, val_set
from methods import calibration_stats

import onnxq
from onnxq import Budget, compare_latency, kernel_report


def integer_share(path: Path) -> str:
    """How many of the model's layers onnxruntime runs in integer kernels."""
    rows = kernel_report(path)
    return f"{sum(r['runs'] == 'integer' for r in rows)}/{len(rows)}"


def markdown(rows: list[dict], fp32: dict[str, float]) -> str:
    out = []
    for name in fp32:
        out.append(f"\n**{name}** (FP32 top-1 {fp32[name]:.2f} %)\n")
        out.append("| model | top-1 % | size MB | avg stored bits | layers in integer kernels "
                   "| MACs in 8-bit layers (plan) | batch 1 ms | batch 32 ms |")
        out.append("|---|---|---|---|---|---|---|---|")
        for r in (r for r in rows if r["model"] == name):
            share = "" if r.get("integer_mac_share") is None else f"{100 * r['integer_mac_share']:.1f} %"
            out.append(f"| {r['config']} | {r['top1']:.2f} | {r['size_mb']:.2f} | {r.get('avg_stored_bits', '')} "
                       f"| {r['integer_layers']} | {share} | {r['ms_b1']:.1f} | {r['ms_b32']:.1f} |")
    return "\n".join(out) + "\n"


@click.command()
@click.option("--models", default="squeezenet1.1,mobilenet_v1_0.75_224")
@click.option("--avg-bits", default=5.0, show_default=True, help="The size budget of both mixed runs.")
@click.option("--choices", default="2,4,8", show_default=True)
@click.option("--repeats", default=20, show_default=True)
def main(models: str, avg_bits: float, choices: str, repeats: int) -> None:
    require_shared()
    rows, fp32 = [], {}
    bit_choices = tuple(int(b) for b in choices.split(","))
    for name in models.split(","):
        x, y = val_set(name)
        fp32[name] = top1(model_path(name), x, y)
        stats, _ = calibration_stats(name, 256)
        configs = {
            "W8A8 uniform": dict(bits=8, act_bits=8),
            "W4 weight-only (first/last 8)": dict(bits=4, first_last_bits=8),
            f"mixed avg {avg_bits:g}, --prefer size": dict(budget=Budget(avg_bits=avg_bits), bit_choices=bit_choices),
            f"mixed avg {avg_bits:g}, --prefer speed": dict(budget=Budget(avg_bits=avg_bits), bit_choices=bit_choices,
                                                             act_bits=8, prefer="speed"),
        }
        with tempfile.TemporaryDirectory() as tmp:
            paths = {"FP32": model_path(name)}
            results = {}
            for label, options in configs.items():
                paths[label] = Path(tmp) / f"{len(paths)}.onnx"
                results[label] = onnxq.quantize(model_path(name), CALIB, paths[label], stats=stats,
                                                preprocessing=MODELS[name], sensitivity_cache=RESULTS / "cache" /
                                                f"omega_prefer_{name}.npz", **options)
            timings = {batch: compare_latency(paths, batch, repeats) for batch in (1, 32)}
            for label, path in paths.items():
                result = results.get(label)
                plan = result.mixed if result else None
                rows.append({"model": name, "config": label, "top1": top1(path, x, y),
                             "size_mb": Path(path).stat().st_size / 1e6,
                             "avg_stored_bits": round(result.average_bits(stored=True), 3) if result else "",
                             "integer_layers": integer_share(Path(path)) if result else "0",
                             "integer_mac_share": plan.integer_mac_share if plan else None,
                             "ms_b1": timings[1][label], "ms_b32": timings[32][label]})
                click.echo(json.dumps(rows[-1]), err=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "prefer.json").write_text(json.dumps({"fp32": fp32, "rows": rows}, indent=1))
    table = markdown(rows, fp32)
    (RESULTS / "prefer.md").write_text(table)
    click.echo(table)


if __name__ == "__main__":
    main()
