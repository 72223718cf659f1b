"""Float16 models: quantize a float16 copy of a shared model and time the two ways to dequantize its weights.

onnxq writes a float16 layer's weight as DequantizeLinear with float32 scales followed by a Cast to float16
("f32+cast"). The alternative is float16 scales, so DequantizeLinear outputs float16 directly ("f16 scales").
This converts the model to float16, quantizes it (W4, first/last 8), derives the f16-scales variant from the
written file, and reports the accuracy against the float16 model and the onnxruntime CPU latency of each.

    python bench/fp16_models.py [--model squeezenet1.1] [--images 200] [--calib-size 64]
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np
import onnx
import onnxruntime as ort
from common import CALIB, MODELS, ROOT, kl_to, model_path, require_shared, val_set
from onnx import numpy_helper

import onnxq

sys.path.insert(0, str(ROOT / "models"))
import tiny  # noqa: E402 - models/tiny.py: the float16 conversion the tests use too


def with_float16_scales(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same quantized model with float16 scales and no Cast: DequantizeLinear outputs float16 itself."""
    inits = {t.name: t for t in model.graph.initializer}
    casts = {n.input[0]: n for n in model.graph.node if n.op_type == "Cast"}
    kept = []
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.output[0] in casts:
            scale = inits[node.input[1]]
            scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale).astype(np.float16), scale.name))
            node.output[0] = casts[node.output[0]].output[0]
        if not (node.op_type == "Cast" and node.input[0].endswith("_DequantizeLinear_Output_float32")):
            kept.append(node)
    del model.graph.node[:]
    model.graph.node.extend(kept)
    return model


def latency_ms(path: Path, x: np.ndarray, repeats: int = 20) -> float:
    """Median time of one run on ``x`` (onnxruntime CPU, default threads)."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x}
    session.run(None, feed)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def outputs(path: Path, x: np.ndarray, batch: int = 25) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x[i:i + batch]})[0] for i in range(0, len(x), batch)])


@click.command()
@click.option("--model", "name", default="squeezenet1.1", type=click.Choice(sorted(MODELS)))
@click.option("--images", default=200, help="val1300 images for the accuracy figures")
@click.option("--calib-size", default=64)
def main(name: str, images: int, calib_size: int) -> None:
    require_shared()
    x, y = val_set(name, images)
    x16 = x.astype(np.float16)
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"float16": Path(tmp) / "f16.onnx", "f32+cast": Path(tmp) / "q.onnx",
                 "f16 scales": Path(tmp) / "q16.onnx"}
        onnx.save(tiny.to_float16(onnx.load(str(model_path(name)))), str(paths["float16"]))
        start = time.perf_counter()
        onnxq.quantize(paths["float16"], CALIB, paths["f32+cast"], bits=4, first_last_bits=8,
                       calib_size=calib_size, preprocessing=MODELS[name])
        seconds = time.perf_counter() - start
        onnx.save(with_float16_scales(onnx.load(str(paths["f32+cast"]))), str(paths["f16 scales"]))
        reference = outputs(paths["float16"], x16).astype(np.float64)
        print(f"{name} float16, W4 first/last 8, {calib_size} calibration images, quantized in {seconds:.0f} s; "
              f"{images} val1300 images")
        for label, path in paths.items():
            got = outputs(path, x16).astype(np.float64)
            top1 = 100 * float((got.argmax(1) == y).mean())
            times = ", ".join(f"batch {b}: {latency_ms(path, x16[:b]):.1f} ms" for b in (1, 8))
            print(f"  {label:10s} top-1 {top1:.2f} %, KL to float16 {kl_to(reference, got):.4f}, "
                  f"{path.stat().st_size / 1e6:.2f} MB, {times}")


if __name__ == "__main__":
    main()
