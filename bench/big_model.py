"""Issue 7 benchmark: a float model larger than 2 GB (protobuf's limit), stored with external data, quantized end
to end by the CLI.

The model is synthetic (random weights; no public >2 GB model fits this repository's offline machine): an input
of 1024 features feeds 9 MatMul layers of 1024 x 65536 (256 MiB each, 2.25 GiB in all) whose outputs are summed.
It is written with external data, quantized with ``onnxq`` (RTN, 4 bits, 32 random calibration samples), and the
output is loaded and run in onnxruntime and compared with the float model. Reports the wall time, the peak memory
of the quantizing process and the file sizes. Writes bench/results/big_model.{json,md}.

    python bench/big_model.py [--layers 9] [--columns 65536] [--keep DIR]
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

RESULTS = Path(__file__).resolve().parent / "results"
FEATURES = 1024


def build(folder: Path, layers: int, columns: int) -> Path:
    """Write the model and its external data; returns the .onnx path."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((rng.standard_normal((FEATURES, columns), dtype=np.float32) / 32), f"w{i}")
             for i in range(layers)]
    nodes = [helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"], name=f"matmul{i}") for i in range(layers)]
    nodes.append(helper.make_node("Sum", [f"y{i}" for i in range(layers)], ["y"], name="sum"))
    graph = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", FEATURES])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", columns])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = folder / "big.onnx"
    onnx.save(model, str(path), save_as_external_data=True, location="big.onnx.data", all_tensors_to_one_file=True)
    return path


def calibration(folder: Path, samples: int) -> Path:
    calib = folder / "calib"
    calib.mkdir()
    rng = np.random.default_rng(1)
    for i in range(samples):
        np.save(calib / f"{i:03d}.npy", rng.standard_normal((1, FEATURES), dtype=np.float32))
    return calib


def size(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def agreement(float_path: Path, quant_path: Path) -> float:
    """Output SQNR (dB) of the quantized model against the float one on 4 random rows."""
    x = {"x": np.random.default_rng(2).standard_normal((4, FEATURES), dtype=np.float32)}
    expected = ort.InferenceSession(str(float_path), providers=["CPUExecutionProvider"]).run(None, x)[0]
    quantized = ort.InferenceSession(str(quant_path), providers=["CPUExecutionProvider"]).run(None, x)[0]
    noise = float(((quantized.astype(np.float64) - expected) ** 2).sum())
    return 10 * np.log10(float((expected.astype(np.float64) ** 2).sum()) / noise)


@click.command()
@click.option("--layers", default=9, show_default=True)
@click.option("--columns", default=65536, show_default=True)
@click.option("--samples", default=32, show_default=True)
@click.option("--bits", default="4", show_default=True)
@click.option("--method", default="rtn", show_default=True)
@click.option("--keep", type=click.Path(path_type=Path), default=None, help="Build in this folder and keep it.")
def main(layers: int, columns: int, samples: int, bits: str, method: str, keep: Path | None) -> None:
    with tempfile.TemporaryDirectory(dir=keep) as tmp:
        folder = Path(tmp)
        start = time.perf_counter()
        model = build(folder, layers, columns)
        built = time.perf_counter() - start
        calib = calibration(folder, samples)
        out = folder / "big_q.onnx"
        start = time.perf_counter()
        run = subprocess.run([sys.executable, "-m", "onnxq", str(model), "--calib", str(calib), "-o", str(out),
                              "--bits", bits, "--method", method, "-q"], capture_output=True, text=True)
        seconds = time.perf_counter() - start
        peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        if run.returncode:
            raise SystemExit(f"onnxq failed: {run.stderr.strip()}")
        row = {"layers": layers, "columns": columns, "float_gb": size(model) / 1e9, "quantized_gb": size(out) / 1e9,
               "external_data_out": out.with_name(out.name + ".data").exists(), "bits": int(bits), "method": method,
               "build_seconds": round(built, 1), "quantize_seconds": round(seconds, 1),
               "peak_rss_mb": round(peak_mb), "output_sqnr_db": round(agreement(model, out), 2)}
    click.echo(json.dumps(row, indent=1))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "big_model.json").write_text(json.dumps(row, indent=1))
    (RESULTS / "big_model.md").write_text(
        "| float model | quantized | external data out | method, bits | onnxq wall time | peak RSS | output SQNR |\n"
        "|---|---|---|---|---|---|---|\n"
        f"| {row['float_gb']:.2f} GB ({layers} MatMul {FEATURES}x{columns}) | {row['quantized_gb']:.3f} GB "
        f"| {'yes' if row['external_data_out'] else 'no'} | {method} W{bits} | {row['quantize_seconds']} s "
        f"| {row['peak_rss_mb']} MB | {row['output_sqnr_db']} dB |\n")


if __name__ == "__main__":
    main()
