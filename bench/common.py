"""Shared benchmark helpers: the ../shared models with their preprocessing, and top-1 on imagenet-val1300."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from scipy.special import log_softmax

from onnxq import ImagePreprocessing, spread_order

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ONNXQ_SHARED", ROOT.parent / "shared"))
CALIB = SHARED / "data" / "imagenet-calib1000"
VAL = SHARED / "data" / "imagenet-val1300"
RESULTS = ROOT / "bench" / "results"

# Preprocessing exactly as ../shared/models/MODELS.md specifies it.
MODELS = {
    "squeezenet1.1": ImagePreprocessing(size=(227, 227), resize=(256, 256), mean=(104, 117, 123), std=(1, 1, 1),
                                        scale=1.0, channel_order="BGR"),
    "mobilenet_v1_0.75_224": ImagePreprocessing(size=(224, 224), resize=256, mean=(1, 1, 1),
                                                std=(1, 1, 1), scale=1 / 127.5),
    "efficientnet_lite0": ImagePreprocessing(size=(224, 224), resize=256, mean=(127, 127, 127),
                                             std=(128, 128, 128), scale=1.0),
}


def require_shared() -> None:
    """Benchmarks need the shared ImageNet assets; say so plainly when they are missing."""
    if not (SHARED / "models").is_dir():
        sys.exit(f"benchmark needs the shared assets at {SHARED} (set ONNXQ_SHARED)")


def model_path(name: str) -> Path:
    return SHARED / "models" / f"{name}.onnx"


def val_set(name: str, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The preprocessed imagenet-val1300 images and labels (cached as .npy under bench/results/cache)."""
    cache = RESULTS / "cache" / f"val1300_{name}_{limit or 'all'}.npz"
    if cache.exists():
        with np.load(cache) as data:
            return data["x"], data["y"]
    lines = (VAL / "labels.txt").read_text().split("\n")
    pairs = [line.split() for line in lines if line.strip()][:limit]
    prep = MODELS[name]
    x = np.concatenate([prep.load(VAL / "images" / file) for file, _ in pairs])
    y = np.array([int(label) for _, label in pairs])
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, x=x, y=y)
    return x, y


def logits(model: str | Path, x: np.ndarray, batch: int = 50) -> np.ndarray:
    """The first output of an ONNX model file on preprocessed images, in batches."""
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x[i:i + batch]})[0] for i in range(0, len(x), batch)])


def top1(model: str | Path, x: np.ndarray, y: np.ndarray, batch: int = 50) -> float:
    """Top-1 accuracy in percent of an ONNX model file on preprocessed images."""
    return float((logits(model, x, batch).argmax(1) == y).mean() * 100)


def kl_to(reference: np.ndarray, quantized: np.ndarray) -> float:
    """Mean KL divergence of the quantized model's softmax from the reference's (moves with every image, so it
    is far less noisy than top-1 on 1300 images)."""
    p_log = log_softmax(reference.astype(np.float64), axis=1)
    return float((np.exp(p_log) * (p_log - log_softmax(quantized.astype(np.float64), axis=1))).sum(1).mean())


def scores(model: str | Path, x: np.ndarray, y: np.ndarray, reference: np.ndarray) -> dict:
    """Top-1 (%) of a model file on the images and the mean KL of its output from the reference logits."""
    out = logits(model, x)
    return {"top1": round(float((out.argmax(1) == y).mean() * 100), 2), "kl": round(kl_to(reference, out), 4)}


def calib_files(count: int) -> list[Path]:
    """The ``count`` images of imagenet-calib1000 that --calib-size takes: spread over the sorted listing."""
    files = sorted(CALIB.iterdir())
    return [files[i] for i in spread_order(len(files))[:count]]


def calib_arrays(name: str, count: int) -> list[np.ndarray]:
    """The ``count`` calibration images of ``calib_files`` preprocessed for a shared model, one (1, C, H, W) each."""
    return [MODELS[name].load(file) for file in calib_files(count)]


def save_results(tag: str, fp32: dict[str, float], rows: list[dict], table: str, extra: dict | None = None) -> None:
    """Write bench/results/<tag>.json (FP32 top-1, every row and any ``extra`` entries) and <tag>.md (the table
    the README quotes)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{tag}.json").write_text(json.dumps({"fp32": fp32, "rows": rows, **(extra or {})}, indent=1))
    (RESULTS / f"{tag}.md").write_text(table)
