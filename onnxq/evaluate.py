"""``onnxq eval``: how far a quantized model is from its float reference, and from the labels when known.

Always: top-1 agreement with the reference, mean KL divergence, output SQNR, cosine similarity and max
error. With labels (a folder per class, or a ``<file> <index>`` labels file): top-1 and top-5 of both.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .errors import OnnxqError
from .images import ImagePreprocessing, list_images, read_image
from .loading import load_model
from .oracle import log_softmax
from .progress import NoProgress
from .sources import InputSpec, batches, default_preprocessing, feed_samples, feeds_from, model_inputs

LABEL_FILES = ("labels.txt", "val.txt", "ground_truth.txt")


@dataclass
class EvalResult:
    """Accuracy and fidelity figures of a quantized model against its reference."""

    samples: int
    agreement: float | None
    mean_kl: float | None
    sqnr_db: float
    cosine: float
    max_error: float
    top1: float | None = None
    top5: float | None = None
    reference_top1: float | None = None
    reference_top5: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def read_labels(folder: Path, images: list[Path], labels_file: Path | None) -> np.ndarray | None:
    """Labels per image from a ``<file> <index>`` file, or from one sub-folder per class; else None."""
    candidates = [labels_file] if labels_file else [folder / name for name in LABEL_FILES]
    for file in candidates:
        if file and file.is_file():
            table = {}
            for line in file.read_text().splitlines():
                parts = line.split()
                if len(parts) >= 2 and parts[-1].lstrip("-").isdigit():
                    table[Path(parts[0]).name] = int(parts[-1])
            missing = [img.name for img in images if img.name not in table]
            if missing:
                raise OnnxqError(f"{file} has no label for {missing[0]} (and {len(missing) - 1} more); "
                                 "fix the labels file")
            return np.array([table[img.name] for img in images])
    classes = sorted({img.parent for img in images})
    if len(classes) > 1 and all(img.parent.parent == folder for img in images):
        index = {c: i for i, c in enumerate(classes)}
        return np.array([index[img.parent] for img in images])
    return None


def labelled_image_batches(folder: Path, spec: InputSpec, preprocessing: ImagePreprocessing,
                           labels_file: Path | None, batch_size: int, limit: int | None
                           ) -> tuple[Iterator[tuple[dict, np.ndarray | None]], int]:
    """Batches of preprocessed images with their labels (or None), in sorted file order."""
    images = list_images(folder)[:limit]
    labels = read_labels(folder, images, labels_file)

    def generate():
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size]
            arrays, keep = [], []
            for offset, path in enumerate(chunk):
                image = read_image(path, preprocessing)
                if image is not None:
                    arrays.append(image)
                    keep.append(start + offset)
            if arrays:
                yield {spec.name: np.concatenate(arrays)}, (labels[keep] if labels is not None else None)

    return generate(), len(images)


class _Accumulator:
    """Running sums for the fidelity and accuracy figures (nothing kept per sample)."""

    def __init__(self) -> None:
        self.n = self.agree = self.kl = self.signal = self.noise = self.dot = self.qq = 0.0
        self.max_error = 0.0
        self.hits = {"top1": 0, "top5": 0, "reference_top1": 0, "reference_top5": 0}
        self.labelled = 0

    def add(self, reference: np.ndarray, quantized: np.ndarray, labels: np.ndarray | None) -> None:
        ref, q = reference.astype(np.float64), quantized.astype(np.float64)
        self.n += len(ref)
        self.signal += float((ref**2).sum())
        self.noise += float(((q - ref) ** 2).sum())
        self.dot += float((q * ref).sum())
        self.qq += float((q**2).sum())
        self.max_error = max(self.max_error, float(np.abs(q - ref).max()))
        if ref.ndim == 2 and ref.shape[1] > 1:
            self.agree += int((ref.argmax(1) == q.argmax(1)).sum())
            log_p, log_q = log_softmax(ref), log_softmax(q)
            self.kl += float((np.exp(log_p) * (log_p - log_q)).sum())
            if labels is not None:
                self._count_hits(ref, q, labels)

    def _count_hits(self, ref: np.ndarray, q: np.ndarray, labels: np.ndarray) -> None:
        for prefix, logits in (("", q), ("reference_", ref)):
            top5 = np.argsort(-logits, axis=1)[:, :5]
            self.hits[f"{prefix}top1"] += int((top5[:, 0] == labels).sum())
            self.hits[f"{prefix}top5"] += int((top5 == labels[:, None]).any(axis=1).sum())
        self.labelled += len(labels)

    def result(self, classifier: bool) -> EvalResult:
        n = max(self.n, 1)
        sqnr = 10 * np.log10(self.signal / self.noise) if self.noise > 0 else float("inf")
        cosine = self.dot / np.sqrt(self.signal * self.qq) if self.signal * self.qq > 0 else 1.0
        accuracy = {k: 100 * v / self.labelled for k, v in self.hits.items()} if self.labelled else {}
        return EvalResult(int(self.n), 100 * self.agree / n if classifier else None,
                          self.kl / n if classifier else None, float(sqnr), float(cosine), self.max_error,
                          **accuracy)


def evaluate(quantized: Path, reference: Path, data: Path, preprocessing: ImagePreprocessing | None = None,
             labels_file: Path | None = None, batch_size: int = 32, limit: int | None = None,
             progress: Callable | None = None) -> EvalResult:
    """Run both models on the data and compare them (and score them against labels when available)."""
    reference_model = load_model(reference)
    load_model(quantized)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    sessions = [ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"])
                for p in (reference, quantized)]
    inputs = model_inputs(reference_model)
    prep = default_preprocessing(inputs, preprocessing)
    if len(inputs) == 1 and data.is_dir() and list_images(data):
        stream, total = labelled_image_batches(data, inputs[0], prep, labels_file, batch_size, limit)
    else:
        raw, total = feeds_from(data, inputs, prep)
        stream = ((feed, None) for feed in batches(raw, inputs, batch_size, limit))
    accumulator = _Accumulator()
    classifier = False
    with progress(total, "evaluating") if progress else NoProgress() as bar:
        for feed, labels in stream:
            ref, q = (s.run(None, feed)[0] for s in sessions)
            classifier = ref.ndim == 2 and ref.shape[1] > 1
            accumulator.add(ref, q, labels)
            bar.update(feed_samples(feed))
    if not accumulator.n:
        raise OnnxqError(f"no evaluation samples could be read from {data}; check the folder")
    return accumulator.result(classifier)
