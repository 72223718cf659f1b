"""Issue 5 benchmark: W8A8 models that onnxruntime runs with integer kernels, against FP32 and quantize_static.

Per model: FP32; onnxq W8A8 (8-bit symmetric RTN or COMQ weights from the cached Gram statistics, uint8
activations calibrated on 256 images of imagenet-calib1000, every 4th, with each range method); onnxruntime
``quantize_static`` (``quant_pre_process`` first, QDQ, per-channel, MinMax) on the same 256 images, with uint8
activations (onnxruntime's advice for x86 with VNNI) and with its defaults (int8 activations); W4 weight-only
(COMQ) and W4A8 (the same weights plus uint8 activation Q/DQ). Reports top-1 on imagenet-val1300, file size,
median latency at batch 1 and 32 (single runs alternate between variants, so machine load hits them alike)
and which kernel runs each layer. Writes bench/results/w8a8.json and bench/results/w8a8.md.

    python bench/w8a8.py [--models squeezenet1.1,...] [--repeats 30] [--keep DIR [--latency-only [--threads 1]]]
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import click
import numpy as np
import onnx
from common import CALIB, MODELS, RESULTS, calib_files, model_path, require_shared, top1, val_set
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quant_pre_process,
    quantize_static,
)

from onnxq.calibration.activations import METHODS, activation_histograms, ranges_from
from onnxq.calibration.stats_cache import cached_stats
from onnxq.export.act_qdq import default_act_layers, insert_activation_qdq, plan_qdq
from onnxq.export.qdq import build_quantized_model, save_atomic
from onnxq.graph.layers import Layer, find_layers
from onnxq.graph.loading import load_model
from onnxq.graph.prepare import prepare
from onnxq.passes import Grid, QuantWeight
from onnxq.pipeline import Options, round_candidates, with_bias_slots
from onnxq.report.kernels import compare_latency, kernel_report, kernel_summary

CALIB_SIZE, CALIB_BATCH = 256, 32
DEFAULT_METHOD = "mse"


class Reader(CalibrationDataReader):
    """onnxruntime's reader over in-memory feeds."""

    def __init__(self, feeds: list[dict]) -> None:
        self.feeds, self.position = feeds, 0

    def get_next(self) -> dict | None:
        self.position += 1
        return self.feeds[self.position - 1] if self.position <= len(self.feeds) else None

    def rewind(self) -> None:
        self.position = 0


def calib_feeds(name: str, input_name: str) -> list[dict]:
    """The 256 calib1000 images --calib-size 256 takes, preprocessed for the model, in batches of 32."""
    x = np.concatenate([MODELS[name].load(f) for f in calib_files(CALIB_SIZE)])
    return [{input_name: x[i:i + CALIB_BATCH]} for i in range(0, len(x), CALIB_BATCH)]


def round_weights(model: onnx.ModelProto, layers: list[Layer], stats: dict, method: str, grid: Grid,
                  slots: dict) -> dict[str, QuantWeight]:
    """Every layer's weight rounded on ``grid`` by ``method`` with the cached statistics, bias-corrected as the
    pipeline does by default (the layers in ``slots``)."""
    options = Options(bits=grid.bits, method=method, symmetric=grid.symmetric)
    rounded = round_candidates(model, layers, stats, {layer.name: (grid.bits,) for layer in layers}, options, None,
                               slots)
    return {name: qw for (name, _), (qw, _) in rounded.items()}


def onnxq_models(name: str, folder: Path, feeds: list[dict]) -> dict[str, tuple[Path, float]]:
    """Write every onnxq variant; returns label -> (path, seconds to produce it)."""
    model = prepare(load_model(model_path(name)))
    layers, _ = find_layers(model)
    stats = cached_stats(RESULTS / "cache" / f"stats_{name}_{CALIB_SIZE}.npz", layers)
    if not stats:
        raise SystemExit(f"no cached statistics for {name}; run bench/methods.py first")
    model, slots = with_bias_slots(model, layers, Options())
    out = {}
    start = time.perf_counter()
    plan = plan_qdq(model, layers, [layer.name for layer in layers])
    hists = activation_histograms(model, plan.calibrated, iter(feeds))
    calib_seconds = time.perf_counter() - start
    exact = {t: "minmax" for t in plan.exact}
    for method in ("rtn", "comq"):
        start = time.perf_counter()
        weights = round_weights(model, layers, stats, method, Grid(8, True), slots)
        qmodel = build_quantized_model(model, layers, weights, {})
        acts = default_act_layers(qmodel, layers)
        seconds = time.perf_counter() - start + calib_seconds
        for act_method in (METHODS if method == "comq" else (DEFAULT_METHOD,)):
            path = folder / f"w8a8_{method}_{act_method}.onnx"
            save_atomic(insert_activation_qdq(qmodel, layers, ranges_from(hists, act_method, methods=exact), acts),
                        path)
            out[f"onnxq W8A8 {method.upper()} act={act_method}"] = (path, seconds)
    start = time.perf_counter()
    w4 = build_quantized_model(model, layers, round_weights(model, layers, stats, "comq", Grid(4), slots), {})
    save_atomic(w4, folder / "w4.onnx")
    out["onnxq W4 COMQ weight-only"] = (folder / "w4.onnx", time.perf_counter() - start)
    names = [layer.name for layer in layers]
    save_atomic(insert_activation_qdq(w4, layers, ranges_from(hists, DEFAULT_METHOD, methods=exact), names),
                folder / "w4a8.onnx")
    out[f"onnxq W4A8 COMQ act={DEFAULT_METHOD}"] = (folder / "w4a8.onnx", time.perf_counter() - start + calib_seconds)
    return out


def ort_models(name: str, folder: Path, feeds: list[dict]) -> dict[str, tuple[Path, float]]:
    """onnxruntime quantize_static after quant_pre_process: uint8 activations, then its int8 defaults."""
    pre = folder / "ort_pre.onnx"
    cache = folder / "ort_calibration.json"
    cache.unlink(missing_ok=True)  # calibrate once per run (a kept folder may hold the last run's ranges)
    out = {}
    for label, act_type in (("ORT quantize_static u8s8", QuantType.QUInt8), ("ORT quantize_static s8s8 (defaults)",
                                                                           QuantType.QInt8)):
        start = time.perf_counter()
        if not pre.exists():
            quant_pre_process(str(model_path(name)), str(pre))
        path = folder / f"ort_{act_type.name}.onnx"
        quantize_static(str(pre), str(path), Reader(feeds), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=act_type, weight_type=QuantType.QInt8, calibration_cache_path=cache)
        out[label] = (path, time.perf_counter() - start)
    return out


def timed(paths: dict[str, Path], batches: tuple[int, ...], repeats: int, threads: int) -> dict[str, dict]:
    """Median latency (ms) per variant and batch; single runs alternate between variants (fair under load)."""
    per_batch = {b: compare_latency(paths, b, repeats, threads=threads or None) for b in batches}
    return {label: {f"b{b}": round(per_batch[b][label], 2) for b in batches} for label in paths}


def timed_variants(rows: list[dict]) -> list[str]:
    """The variants worth timing: FP32, one W8A8 (COMQ, default ranges), W4, W4A8 and onnxruntime's."""
    return [r["variant"] for r in rows if "RTN" not in r["variant"]
            and ("act=" not in r["variant"] or f"act={DEFAULT_METHOD}" in r["variant"])]


def run_model(name: str, repeats: int, keep: Path | None) -> list[dict]:
    x, y = val_set(name)
    input_name = onnx.load(str(model_path(name))).graph.input[0].name
    feeds = calib_feeds(name, input_name)
    with tempfile.TemporaryDirectory(prefix="w8a8-") as tmp:
        folder = keep / name if keep else Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        variants = {"FP32": (model_path(name), 0.0)}
        variants.update(onnxq_models(name, folder, feeds))
        variants.update(ort_models(name, folder, feeds))
        rows = []
        for label, (path, seconds) in variants.items():
            report = kernel_report(path)
            rows.append({"model": name, "variant": label, "file": path.name, "top1": round(top1(path, x, y), 2),
                         "size_bytes": path.stat().st_size, "seconds": round(seconds, 1),
                         "kernels": kernel_summary(report),
                         "integer_layers": f"{sum(r['runs'] == 'integer' for r in report)}/{len(report)}"})
            click.echo(json.dumps(rows[-1]), err=True)
        add_latency(rows, {label: path for label, (path, _) in variants.items()}, repeats)
        return rows


def add_latency(rows: list[dict], paths: dict[str, Path], repeats: int, threads: int = 0) -> None:
    """Time the chosen variants of one model and store the medians in their rows (per thread count)."""
    labels = timed_variants(rows)
    times = timed({label: paths[label] for label in labels}, (1, 32), repeats, threads)
    for row in rows:
        row[latency_key(threads)] = times.get(row["variant"])


def latency_key(threads: int) -> str:
    return "latency_ms" if not threads else f"latency_ms_{threads}thread"


def markdown(rows: list[dict]) -> str:
    """One table per model, speed-ups against its FP32 row (every core; one thread too when measured)."""
    lines = []
    for name in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == name]
        fp32 = mine[0]
        single = latency_key(1) in fp32
        extra = " ms b32 1 thread | speed-up 1 thread |" if single else ""
        lines += [f"\n**{name}** (FP32 top-1 {fp32['top1']:.2f} %)\n",
                  "| variant | top-1 | Δ vs FP32 | size | ms b1 | ms b32 | speed-up b32 |" + extra
                  + " integer layers | kernels |", "|---" * (9 + 2 * single) + "|"]
        for r in mine:
            cells = _latency_cells(r, fp32, latency_key(0)) + (_latency_cells(r, fp32, latency_key(1))[1:]
                                                                if single else [])
            kernels = ", ".join(f"{k} {v}" for k, v in r["kernels"].items())
            lines.append(f"| {r['variant']} | {r['top1']:.2f} | {r['top1'] - fp32['top1']:+.2f} | "
                         f"{r['size_bytes'] / 1e6:.2f} MB | " + " | ".join(cells) + f" | {r['integer_layers']} | "
                         f"{kernels} |")
    return "\n".join(lines) + "\n"


def _latency_cells(row: dict, fp32: dict, key: str) -> list[str]:
    """ms at batch 1 and 32 and the batch-32 speed-up over FP32, blank when not timed."""
    lat = row.get(key)
    if not lat:
        return ["", "", ""]
    return [f"{lat['b1']:.1f}", f"{lat['b32']:.1f}", f"{fp32[key]['b32'] / lat['b32']:.2f}x"]


@click.command()
@click.option("--models", default=",".join(MODELS))
@click.option("--repeats", default=30, help="Timed runs per variant and batch size (the median is kept).")
@click.option("--keep", type=click.Path(path_type=Path), default=None,
              help="Keep the quantized models in this folder (for --latency-only).")
@click.option("--latency-only", is_flag=True, help="Re-time the models kept by --keep; top-1 rows are reused.")
@click.option("--threads", default=0, help="Intra-op threads for timing (0: every core, the reported figure).")
@click.option("--tag", default="w8a8", help="Name of the result files.")
def main(models: str, repeats: int, keep: Path | None, latency_only: bool, threads: int, tag: str) -> None:
    require_shared()
    assert CALIB.is_dir()
    if latency_only:
        rows = json.loads((RESULTS / f"{tag}.json").read_text())["rows"]
        for name in models.split(","):
            mine = [r for r in rows if r["model"] == name]
            paths = {r["variant"]: model_path(name) if r["variant"] == "FP32" else keep / name / r["file"]
                     for r in mine}
            add_latency(mine, paths, repeats, threads)
    else:
        rows = []
        for name in models.split(","):
            rows += run_model(name, repeats, keep)
            write(rows, tag, final=False)
    write(rows, tag, final=True)


def write(rows: list[dict], tag: str, final: bool) -> None:
    """Save the rows as JSON (after every model) and, at the end, the markdown tables."""
    (RESULTS / f"{tag}.json").write_text(json.dumps({"calibration": f"first {CALIB_SIZE} of {CALIB.name}",
                                                     "rows": rows}, indent=1))
    if final:
        table = markdown(rows)
        (RESULTS / f"{tag}.md").write_text(table)
        click.echo(table)


if __name__ == "__main__":
    main()
