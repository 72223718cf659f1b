"""Issue 3 benchmark: top-1 on imagenet-val1300 of FP32, RTN, GPTQ and COMQ (weight-only) at 8/4/3/2 bits.

Calibration: 256 images of imagenet-calib1000, what --calib-size 256 takes (every 4th of the sorted listing);
statistics computed once per model and cached.
Each width is run with every layer at that width ("all") and with the first and last layer at 8 bits
("fl8"). Writes bench/results/methods.json and bench/results/methods.md.

    python bench/methods.py [--models squeezenet1.1,...] [--bits 8,4,3,2] [--methods rtn,gptq,comq]
    python bench/methods.py --bits 4,3 --methods gptq,comq --no-bias-correction --tag methods_no_bias_correction
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import click
import numpy as np
from common import CALIB, MODELS, RESULTS, logits, model_path, require_shared, save_results, scores, val_set

import onnxq


def calibration_stats(name: str, calib_size: int) -> tuple[Path, float]:
    """Compute (or reuse) the model's calibration statistics; return the file and the seconds it took."""
    stats = RESULTS / "cache" / f"stats_{name}_{calib_size}.npz"
    start = time.perf_counter()  # reuses the file when it is current, recomputes a stale one
    onnxq.calibrate(model_path(name), CALIB, calib_size=calib_size, stats=stats, preprocessing=MODELS[name])
    return stats, time.perf_counter() - start


def run_one(name: str, method: str, bits: int, fl8: bool, stats: Path, x, y, reference: np.ndarray,
            bias_correction: bool = True) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "q.onnx"
        start = time.perf_counter()
        result = onnxq.quantize(model_path(name), CALIB, out, bits=bits, method=method, stats=stats,
                                first_last_bits=8 if fl8 else None, preprocessing=MODELS[name],
                                bias_correction=bias_correction)
        seconds = time.perf_counter() - start
        return {"model": name, "method": method, "bits": bits, "first_last_8": fl8,
                **scores(out, x, y, reference), "seconds": round(seconds, 1),
                "size_ratio": round(result.size_ratio, 4),
                "avg_stored_bits": round(result.average_bits(stored=True), 3)}


def markdown(rows: list[dict], fp32: dict[str, float]) -> str:
    """One table per model: rows = width/config, columns = methods; cells: top-1 / mean KL to FP32 (time)."""
    out = []
    for name in fp32:
        out.append(f"\n**{name}** (FP32 top-1 {fp32[name]:.2f} %)\n")
        methods = sorted({r["method"] for r in rows if r["model"] == name}, key=["rtn", "gptq", "comq"].index)
        out.append("| weights | " + " | ".join(m.upper() for m in methods) + " |")
        out.append("|---|" + "---|" * len(methods))
        configs = sorted({(r["bits"], r["first_last_8"]) for r in rows if r["model"] == name},
                         key=lambda c: (-c[0], c[1]))
        for bits, fl8 in configs:
            cells = []
            for m in methods:
                key = (name, m, bits, fl8)
                hit = [r for r in rows if (r["model"], r["method"], r["bits"], r["first_last_8"]) == key]
                cells.append(f"{hit[0]['top1']:.2f} / {hit[0]['kl']:.4f} ({hit[0]['seconds']:.0f} s)" if hit else "")
            out.append(f"| W{bits}{' (first/last 8)' if fl8 else ''} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


@click.command()
@click.option("--models", default=",".join(MODELS))
@click.option("--bits", default="8,4,3,2")
@click.option("--methods", default="rtn,gptq,comq")
@click.option("--calib-size", default=256)
@click.option("--tag", default="methods", help="Name of the result files.")
@click.option("--bias-correction/--no-bias-correction", default=True, show_default=True)
def main(models: str, bits: str, methods: str, calib_size: int, tag: str, bias_correction: bool) -> None:
    require_shared()
    rows, fp32 = [], {}
    for name in models.split(","):
        x, y = val_set(name)
        reference = logits(model_path(name), x)
        fp32[name] = float((reference.argmax(1) == y).mean() * 100)
        stats, calib_seconds = calibration_stats(name, calib_size)
        click.echo(f"{name}: FP32 {fp32[name]:.2f} %, calibration {calib_seconds:.0f} s", err=True)
        for b in map(int, bits.split(",")):
            for fl8 in ([False] if b == 8 else [False, True]):
                for method in methods.split(","):
                    row = run_one(name, method, b, fl8, stats, x, y, reference, bias_correction)
                    rows.append(row)
                    click.echo(json.dumps(row), err=True)
    table = markdown(rows, fp32)
    save_results(tag, fp32, rows, table)
    click.echo(table)


if __name__ == "__main__":
    main()
