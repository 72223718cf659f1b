"""Issue 18 benchmark: onnxq next to the peer quantizers users compare it with, on the same samples in one run.

For each shared CNN, the first ``--samples`` calibration images (the ones ``--calib-size`` takes from
imagenet-calib1000, preprocessed once into .npy files that every tool reads in the same order) go to:
  - onnxq W4 weight-only, first/last 8 (its default run) and onnxq W8A8 (``--bits 8 --act-bits 8``);
  - onnxruntime ``quantize_static`` W8A8 (per channel, MinMax) and its int4 weights (QInt4, first/last QInt8,
    QUInt16 activations: it has no weight-only int4 Conv path);
  - NNCF ``quantize`` (INT8) and ``compress_weights`` INT4_ASYM;
  - AMD Quark ONNX W8A8 (per channel, MinMax) and Quark asked for QInt4 weights.
Each job is its own process (bench/peer_jobs.py or ``python -m onnxq``), measured from outside as bench/speed.py
does (CPU s = user + sys of the process tree). Each written model is then scored on imagenet-val1300: top-1 and
mean KL of its softmax from the float model's, the file size, what its weighted layers really store (counted from
the file: INT4/INT8 codes behind a DequantizeLinear, or float), and for W8A8 models the onnxruntime CPU speed-up
over the float model (median of interleaved batch-32 runs in one process). A job that fails is reported with the
last line of its error, not hidden. Writes bench/results/<out>.json and .md.

    pip install -e '.[peers]'
    python bench/peers.py [--models squeezenet1.1,mobilenet_v1_0.75_224,efficientnet_lite0] [--samples 256]
                          [--val-limit N] [--out peers]

MiniLM's peers (onnxruntime's MatMul 4-bit RTN/HQQ/GPTQ, NNCF INT4) are in bench/minilm.py.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np
import onnx
import onnxruntime as ort
from common import MODELS, calib_arrays, logits, model_path, require_shared, save_results, scores, val_set
from speed import IMAGE_BATCH, PEERS_SCRIPT, run_child, write_samples

WEIGHTED = ("Conv", "Gemm", "MatMul")
SPEED_BATCH = 32
SPEED_ROUNDS = 15


def jobs(model: Path, samples: Path) -> dict[str, tuple[str, list[str]]]:
    """label -> (kind, command with "{out}"): every tool on the same sample folder."""
    onnxq = [sys.executable, "-m", "onnxq", str(model), "--calib", str(samples), "--calib-size", "0",
             "--batch-size", str(IMAGE_BATCH), "-q", "-o", "{out}"]
    peer = [sys.executable, str(PEERS_SCRIPT)]
    return {
        "onnxq W4, first/last 8": ("w4", [*onnxq, "--bits", "4", "--first-last-bits", "8"]),
        "onnxruntime int4 (QInt4, first/last QInt8, A16)": ("w4", [*peer, "static-int4", str(model), str(samples),
                                                                    "{out}"]),
        "NNCF compress_weights INT4_ASYM": ("w4", [*peer, "nncf-int4", str(model), "{out}"]),
        "Quark QInt4 weights": ("w4", [*peer, "quark-int4", str(model), str(samples), "{out}"]),
        "onnxq W8A8": ("w8a8", [*onnxq, "--bits", "8", "--act-bits", "8"]),
        "onnxruntime quantize_static W8A8": ("w8a8", [*peer, "static", str(model), str(samples), "{out}"]),
        "NNCF quantize W8A8": ("w8a8", [*peer, "nncf-w8a8", str(model), str(samples), "{out}"]),
        "Quark W8A8": ("w8a8", [*peer, "quark-w8a8", str(model), str(samples), "{out}"]),
    }


def stored_weights(path: Path) -> str:
    """What the weighted layers of a written model hold, e.g. "24 INT4, 2 INT8" or "26 INT8 (at most 16 levels)"."""
    model = onnx.load(str(path))
    constants = {t.name: t for t in model.graph.initializer}
    producers = {out: node for node in model.graph.node for out in node.output}
    counts: dict[str, int] = {}
    levels = []
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            bits = next((a.i for a in node.attribute if a.name == "bits"), 4)
            counts[f"INT{bits} (MatMulNBits)"] = counts.get(f"INT{bits} (MatMulNBits)", 0) + 1
            continue
        if node.op_type not in WEIGHTED or len(node.input) < 2:
            continue
        kind, codes = weight_kind(node.input[1], constants, producers)
        if kind is None:
            continue
        counts[kind] = counts.get(kind, 0) + 1
        if codes is not None and kind.startswith(("INT8", "UINT8")):
            levels.append(max(len(np.unique(row)) for row in codes.reshape(codes.shape[0], -1)))
    text = ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items(), key=lambda item: -item[1]))
    if levels and max(levels) <= 16:
        text += f" (at most {max(levels)} levels per channel: 4-bit values in an 8-bit container)"
    return text


def weight_kind(name: str, constants: dict, producers: dict) -> tuple[str | None, np.ndarray | None]:
    """The stored type of a layer's weight: its DequantizeLinear's code type, "float", or None (not constant)."""
    if name in constants:
        return "float", None
    node = producers.get(name)
    while node is not None and node.op_type in ("Reshape", "Transpose", "Cast"):  # blocked or transposed views
        node = producers.get(node.input[0])
    if node is None or node.op_type != "DequantizeLinear":
        return None, None
    source = node.input[0]
    if source in constants:
        tensor = constants[source]
        return onnx.TensorProto.DataType.Name(tensor.data_type), onnx.numpy_helper.to_array(tensor)
    if source in producers and producers[source].op_type == "QuantizeLinear":
        return "float (Q/DQ at run time)", None
    return None, None


def speedup(float_model: Path, quantized: Path, x: np.ndarray) -> float:
    """onnxruntime CPU latency of the float model over the quantized one, batch 32, interleaved medians."""
    sessions = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (float_model, quantized)]
    feed = {sessions[0].get_inputs()[0].name: x[:SPEED_BATCH]}
    times: list[list[float]] = [[], []]
    for _ in range(SPEED_ROUNDS):
        for index, session in enumerate(sessions):
            start = time.perf_counter()
            session.run(None, feed)
            times[index].append(time.perf_counter() - start)
    return statistics.median(times[0]) / statistics.median(times[1])


def file_size(path: Path) -> float:
    """MB on disk, external data included."""
    data = path.parent / f"{path.name}.data"
    return (path.stat().st_size + (data.stat().st_size if data.exists() else 0)) / 1e6


def compare_model(name: str, count: int, val_limit: int | None, tmp: Path) -> list[dict]:
    """Every job on one model, then every written model scored on the validation images."""
    samples = tmp / name
    write_samples(samples, calib_arrays(name, count), ".npy", lambda path, array: np.save(path, array))
    model = model_path(name)
    x, y = val_set(name, val_limit)
    reference = logits(model, x)
    rows = [{"model": name, "job": "float", "kind": "fp32", "top1": round(float((reference.argmax(1) == y).mean()
                                                                                * 100), 2),
             "kl": 0.0, "size_mb": round(file_size(model), 2)}]
    for label, (kind, command) in jobs(model, samples).items():
        out = tmp / f"{name}-{len(rows)}.onnx"
        cpu, wall, _, _, error = run_child([str(out) if a == "{out}" else a for a in command], tmp / "job.log")
        row = {"model": name, "job": label, "kind": kind, "cpu_s": round(cpu, 1), "wall_s": round(wall, 1),
               "load": round(os.getloadavg()[0], 2)}
        if error is None:
            try:
                row |= scores(out, x, y, reference) | {"size_mb": round(file_size(out), 2),
                                                       "weights": stored_weights(out)}
                if kind == "w8a8":
                    row["speedup"] = round(speedup(model, out, x), 2)
            except Exception as err:  # noqa: BLE001 - a peer's file that onnxruntime refuses is a result too
                message = str(err).strip().splitlines()[-1]
                error = "its model does not run in onnxruntime: ..." + message[-150:]
        if error is not None:
            row["error"] = error
        click.echo(f"{name} {label}: {row}")
        rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| model | tool and configuration | top-1 % | KL | CPU s | size MB | weighted layers store | "
             "W8A8 speed-up |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['model']} | {row['job']} | failed: {row['error']} | | {row['cpu_s']} | | | |")
            continue
        stored = row.get("weights", "float")
        if row["kind"] == "w4" and "INT4" not in stored:
            stored += ": no layer stored in 4 bits"
        lines.append(f"| {row['model']} | {row['job']} | {row['top1']:.2f} | {row['kl']:.4f} | "
                     f"{row.get('cpu_s', '')} | {row['size_mb']} | {stored} | {row.get('speedup', '')} |")
    return "\n".join(lines) + "\n"


@click.command()
@click.option("--models", default=",".join(MODELS), show_default=True)
@click.option("--samples", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--val-limit", type=click.IntRange(min=1), default=None, help="Score on the first N images only.")
@click.option("--out", default="peers", show_default=True, help="Results tag: bench/results/<out>.json and .md.")
def main(models: str, samples: int, val_limit: int | None, out: str) -> None:
    """onnxq and its peers on the same samples: accuracy, KL, cost, size, what is stored, W8A8 speed-up."""
    require_shared()
    rows = []
    with tempfile.TemporaryDirectory(prefix="peers-") as tmp:
        for name in models.split(","):
            rows += compare_model(name, samples, val_limit, Path(tmp))
    table = markdown(rows)
    click.echo(table)
    fp32 = {row["model"]: row["top1"] for row in rows if row["kind"] == "fp32"}
    save_results(out, fp32, rows, table, {"samples": samples, "val_images": val_limit or 1300,
                                          "versions": versions()})


def versions() -> dict[str, str]:
    """The tools' versions, for the record."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("onnxq", "onnxruntime", "nncf", "amd-quark", "onnx"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "not installed"
    return found


if __name__ == "__main__":
    main()
