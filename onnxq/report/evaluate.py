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

from onnxq.allocation.oracle import log_softmax
from onnxq.data.images import ImagePreprocessing, list_images, read_image
from onnxq.data.sources import (
    InputSpec,
    batches,
    declared_preprocessing,
    default_preprocessing,
    feed_samples,
    feeds_from,
    model_inputs,
)
from onnxq.errors import OnnxqError
from onnxq.graph.loading import load_model
from onnxq.report.progress import NoProgress

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
    if labels_file is not None and not labels_file.is_file():
        raise OnnxqError(f"labels file {labels_file} does not exist or is not a file; check the --labels path")
    candidates = [labels_file] if labels_file else [folder / name for name in LABEL_FILES]
    for file in candidates:
        if file and file.is_file():
            table = {}
            for line in file.read_text(errors="replace").splitlines():
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


def check_label_range(labels: np.ndarray, output: np.ndarray, given: bool) -> None:
    """Labels must index the model's classes (its output is [batch, classes]); else top-1 would read 0 %.
    Labels a user ``given`` explicitly must also have a classifier to score."""
    if output.ndim != 2 or output.shape[1] < 2:
        if given:
            raise OnnxqError(f"--labels was given but the model's output has shape {list(output.shape)}, not "
                             "[batch, classes]; evaluate without --labels")
        return
    classes = output.shape[1]
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= classes:
        raise OnnxqError(f"the labels run from {low} to {high} but the model has {classes} classes (0 to "
                         f"{classes - 1}); give 0-based class indices in the model's order (labels file or one "
                         "folder per class)")


def fixed_batch(spec: InputSpec) -> int | None:
    """The input's batch size when the model fixes it (e.g. [1, 3, 224, 224]), else None."""
    return spec.shape[0] if spec.shape and spec.shape[0] is not None else None


def labelled_image_batches(images: list[Path], spec: InputSpec, preprocessing: ImagePreprocessing,
                           labels: np.ndarray | None, batch_size: int) -> Iterator[tuple[dict, np.ndarray | None]]:
    """Batches of preprocessed images with their labels (or None), in sorted file order."""
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        arrays, keep = [], []
        for offset, path in enumerate(chunk):
            image = read_image(path, preprocessing)  # None, with a warning, for an unusable file
            if image is not None:
                arrays.append(image)
                keep.append(start + offset)
        if arrays:
            yield {spec.name: np.concatenate(arrays)}, (labels[keep] if labels is not None else None)


def run_fitted(session: ort.InferenceSession, feed: dict, batch: int | None) -> np.ndarray:
    """The first output for ``feed``. A model with a fixed batch gets the feed in slices of that size, the last
    one padded by repeating its last sample; the padding rows are dropped from the output."""
    rows = feed_samples(feed)
    if batch is None or rows == batch:
        return session.run(None, feed)[0]
    outputs = []
    for start in range(0, rows, batch):
        piece = {k: v[start:start + batch] for k, v in feed.items()}
        short = batch - feed_samples(piece)
        if short:
            piece = {k: np.concatenate([v, np.repeat(v[-1:], short, axis=0)]) for k, v in piece.items()}
        outputs.append(session.run(None, piece)[0][:batch - short])
    return np.concatenate(outputs)


def _check_same_inputs(reference: list[InputSpec], quantized: list[InputSpec], path: Path) -> None:
    """Both models must take the same inputs, else the comparison is meaningless."""
    def key(specs: list[InputSpec]) -> list[tuple]:
        return sorted((s.name, str(s.dtype), len(s.shape)) for s in specs)

    if key(reference) != key(quantized):
        raise OnnxqError(f"{path} takes inputs {key(quantized)} but the reference takes {key(reference)}; pass "
                         "the float model it was quantized from as --reference")


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own exception types (not RuntimeError)
        raise OnnxqError(f"onnxruntime cannot load {path} ({str(err).strip().splitlines()[0][:160]}); "
                         "check that the model runs in onnxruntime") from err


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
    inputs = model_inputs(reference_model)
    quantized_model = load_model(quantized)
    _check_same_inputs(inputs, model_inputs(quantized_model), quantized)
    sessions = [_session(p) for p in (reference, quantized)]
    declared = declared_preprocessing(quantized_model) or declared_preprocessing(reference_model)
    prep = default_preprocessing(inputs, preprocessing, declared)
    batch = fixed_batch(inputs[0]) if len(inputs) == 1 else None  # several inputs: each feed as it comes
    labels = None
    if len(inputs) == 1 and data.is_dir() and list_images(data):
        images = list_images(data)[:limit]
        labels = read_labels(data, images, labels_file)
        stream = labelled_image_batches(images, inputs[0], prep, labels, batch or batch_size)
        total = len(images)
    else:
        if labels_file is not None:
            raise OnnxqError(f"--labels needs --data to be a folder of images, and {data} is not; "
                             "drop --labels or pass the image folder")
        raw, total = feeds_from(data, inputs, prep)
        stream = ((feed, None) for feed in batches(raw, inputs, batch_size, limit))
    accumulator = _Accumulator()
    classifier = False
    with progress(total, "evaluating") if progress else NoProgress() as bar:
        for feed, batch_labels in stream:
            ref, q = (run_fitted(s, feed, batch) for s in sessions)
            if ref.shape != q.shape:
                raise OnnxqError(f"{quantized}'s output has shape {list(q.shape)} but the reference's has "
                                 f"{list(ref.shape)}; pass the float model it was quantized from as --reference")
            if labels is not None and not accumulator.n:
                check_label_range(labels, ref, labels_file is not None)
            classifier = ref.ndim == 2 and ref.shape[1] > 1
            accumulator.add(ref, q, batch_labels)
            bar.update(feed_samples(feed))
    if not accumulator.n:
        raise OnnxqError(f"no evaluation samples could be read from {data}; check the folder")
    return accumulator.result(classifier)
