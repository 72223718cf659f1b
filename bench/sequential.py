"""Sequential, error-compensating rounding (``--sequential``) against the default (float-input statistics).

COMQ weight-only, first and last layer at 8 bits, calibrated on 256 images of imagenet-calib1000 (every 4th of
the sorted listing, what --calib-size 256 takes), evaluated on all of imagenet-val1300: top-1, the mean KL
divergence of the output from the float model's (less noisy than top-1: it moves with every image, not only the
ones whose top class flips) and the wall time of the whole quantize call (the default reuses cached statistics;
sequential captures every stage afresh).
Writes bench/results/sequential.json and .md.

    python bench/sequential.py [--models squeezenet1.1,...] [--bits 4,3]
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import click
import numpy as np
from common import CALIB, MODELS, logits, model_path, require_shared, save_results, scores, val_set
from methods import calibration_stats

import onnxq


def run_one(name: str, bits: int, sequential: bool, stats: Path | None, x, y, reference: np.ndarray,
            calib: Path = CALIB, calib_size: int = 256) -> dict:
    """COMQ at ``bits`` with the first and last layer at 8, default or sequential: top-1, KL and wall time."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "q.onnx"
        start = time.perf_counter()
        onnxq.quantize(model_path(name), calib, out, bits=bits, first_last_bits=8,
                       stats=None if sequential else stats,  # sequential captures stage by stage
                       calib_size=calib_size, preprocessing=MODELS[name], sequential=sequential)
        seconds = time.perf_counter() - start
        return {"model": name, "bits": bits, "sequential": sequential, **scores(out, x, y, reference),
                "seconds": round(seconds, 1)}


def markdown(rows: list[dict], fp32: dict[str, float]) -> str:
    out = ["| model (FP32 top-1) | weights | default: top-1 / KL / time | sequential: top-1 / KL / time |",
           "|---|---|---|---|"]
    for name in fp32:
        for bits in sorted({r["bits"] for r in rows if r["model"] == name}, reverse=True):
            cells = []
            for sequential in (False, True):
                r = next(r for r in rows if (r["model"], r["bits"], r["sequential"]) == (name, bits, sequential))
                cells.append(f"{r['top1']:.2f} % / {r['kl']:.4f} / {r['seconds']:.0f} s")
            out.append(f"| {name} ({fp32[name]:.2f}) | W{bits} (first/last 8) | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


@click.command()
@click.option("--models", default=",".join(MODELS))
@click.option("--bits", default="4,3")
@click.option("--tag", default="sequential", help="Name of the result files.")
def main(models: str, bits: str, tag: str) -> None:
    require_shared()
    rows, fp32 = [], {}
    for name in models.split(","):
        x, y = val_set(name)
        reference = logits(model_path(name), x)
        fp32[name] = float((reference.argmax(1) == y).mean() * 100)
        stats, _ = calibration_stats(name, 256)
        for b in map(int, bits.split(",")):
            for sequential in (False, True):
                rows.append(run_one(name, b, sequential, stats, x, y, reference))
                click.echo(json.dumps(rows[-1]), err=True)
    table = markdown(rows, fp32)
    save_results(tag, fp32, rows, table)
    click.echo(table)


if __name__ == "__main__":
    main()
