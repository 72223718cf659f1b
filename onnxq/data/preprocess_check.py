"""Warn before calibration when the image preprocessing looks wrong for the model.

Two checks on a few calibration images, each against every preset of ``onnxq.data.presets`` applied to the same
images: (1) the model's input statistics (per-channel mean and spread) after the chosen preprocessing are far from
what every preset gives (a --scale or --mean that no convention uses); (2) for a classifier, the float model is far
more confident under another preset than under the chosen one (torchvision's default fed to a Caffe model). Wrong
preprocessing otherwise passes silently: the calibration statistics and the check batch share it.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx

from onnxq.data.images import ImagePreprocessing, list_images, read_image
from onnxq.data.presets import PRESETS, to_metadata
from onnxq.data.sources import (
    InputSpec,
    declared_preprocessing,
    default_preprocessing,
    model_inputs,
    reads_images,
    spread_order,
)

log = logging.getLogger("onnxq")
CHECK_IMAGES = 8
STATISTICS_DISTANCE = 1.0  # in units of the preset's spread; presets differ from each other by 2 or more
CONFIDENCE_RATIO = 2.0  # another preset's mean top probability this many times the chosen one's ...
CONFIDENCE_MARGIN = 0.2  # ... and this much higher in absolute terms
NEAR_BEST = 0.8  # presets this close to the most confident one are named too (caffe and none differ little)
MAX_MODEL_BYTES = 1 << 30  # the check runs the float model once per preset: skip it for very large models


def preprocessing_for(model: onnx.ModelProto, calib: object, given: ImagePreprocessing | None
                      ) -> tuple[ImagePreprocessing, dict[str, str]]:
    """The complete preprocessing of a run (flags, preset, the model's metadata, torchvision) and the metadata
    entries that record it in the output (none when ``calib`` is not an image folder); warns when it looks wrong
    for the model."""
    inputs = model_inputs(model)
    chosen = default_preprocessing(inputs, given, declared_preprocessing(model))
    if not reads_images(calib, inputs) or len(inputs) != 1:
        return chosen, {}
    check_preprocessing(model, Path(calib), inputs[0], chosen)
    return chosen, to_metadata(chosen.description())


def preset_variants(chosen: ImagePreprocessing) -> dict[str, ImagePreprocessing]:
    """Every preset at the chosen size, layout and resize mode."""
    return {name: replace(chosen, preset=name, **fields) for name, fields in PRESETS.items()}


def input_statistics(batch: np.ndarray, layout: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and standard deviation of a batch of images."""
    axes = (0, 1, 2) if layout.upper() == "NHWC" else (0, 2, 3)
    return batch.mean(axis=axes, dtype=np.float64), batch.std(axis=axes, dtype=np.float64)


def statistics_distance(observed: tuple[np.ndarray, np.ndarray], expected: tuple[np.ndarray, np.ndarray]) -> float:
    """How far observed channel statistics are from expected ones: mean offset in units of the expected spread
    plus the log-ratio of the spreads, worst channel."""
    (mean, std), (want_mean, want_std) = observed, expected
    spread = np.maximum(want_std, 1e-6)
    return float(np.max(np.abs(mean - want_mean) / spread + np.abs(np.log(np.maximum(std, 1e-12) / spread))))


def mean_confidence(outputs: np.ndarray) -> float:
    """Mean top-class probability of classifier outputs (logits, or probabilities that already sum to 1)."""
    values = outputs.astype(np.float64)
    if not (values.min() >= 0 and np.allclose(values.sum(axis=1), 1, atol=1e-3)):
        values = np.exp(values - values.max(axis=1, keepdims=True))
        values /= values.sum(axis=1, keepdims=True)
    return float(values.max(axis=1).mean())


def check_preprocessing(model: onnx.ModelProto, calib: Path, spec: InputSpec, chosen: ImagePreprocessing) -> None:
    """Warn, with the flag to try, when the chosen preprocessing looks wrong for ``model`` on ``calib``'s images."""
    files = list_images(Path(calib))
    files = [files[i] for i in spread_order(len(files))[:CHECK_IMAGES]]
    variants = preset_variants(chosen)
    batches = {name: _batch(files, prep) for name, prep in {"chosen": chosen, **variants}.items()}
    if any(batch is None for batch in batches.values()):
        return
    observed = input_statistics(batches["chosen"], chosen.layout)
    distances = {name: statistics_distance(observed, input_statistics(batches[name], chosen.layout))
                 for name in variants}
    if min(distances.values()) > STATISTICS_DISTANCE:
        mean, std = observed
        log.warning("the preprocessed images look unlike any preprocessing convention (channel means %s, spreads "
                    "%s); check --scale, --mean and --std, or use --preprocess %s", _numbers(mean), _numbers(std),
                    "|".join(PRESETS))
        return
    confidences = _confidences(model, spec, batches)
    if confidences is None:
        return
    best = max(variants, key=confidences.__getitem__)
    mine = confidences["chosen"]
    if confidences[best] > max(CONFIDENCE_RATIO * mine, mine + CONFIDENCE_MARGIN) and distances[best] > 0.05:
        near = sorted((n for n in variants if confidences[n] >= NEAR_BEST * confidences[best]),
                      key=confidences.__getitem__, reverse=True)
        tried = " or ".join(f"--preprocess {n} ({confidences[n]:.2f})" for n in near)
        log.warning("the float model is far less confident on the calibration images with this preprocessing (%s: "
                    "mean top-class probability %.2f) than with %s: it was probably trained with another convention; "
                    "rerun with --preprocess %s (or the flags of the model's documentation)",
                    chosen.preset or "custom", mine, tried, near[0])


def _batch(files: list[Path], prep: ImagePreprocessing) -> np.ndarray | None:
    images = [image for image in (read_image(f, prep) for f in files) if image is not None]
    return np.concatenate(images) if images else None


def _confidences(model: onnx.ModelProto, spec: InputSpec, batches: dict[str, np.ndarray]) -> dict[str, float] | None:
    """Mean top probability of the float model's first output per preprocessing, or None when the model is not a
    classifier this can judge (output not (samples, classes), too large, or it does not run)."""
    if model.ByteSize() > MAX_MODEL_BYTES:
        return None
    from onnxq.calibration.capture import make_session

    try:
        session = make_session(model)
        output = session.get_outputs()[0].name
        run = (lambda x: session.run([output], {spec.name: x.astype(spec.dtype)})[0]) if spec.shape[0] is None \
            else (lambda x: np.concatenate([session.run([output], {spec.name: x[i:i + 1].astype(spec.dtype)})[0]
                                            for i in range(len(x))]))
        outputs = {name: run(batch) for name, batch in batches.items()}
    except Exception as err:  # noqa: BLE001 - only a warning is at stake; calibration reports real failures
        log.debug("preprocessing check skipped: %s", err)
        return None
    if any(o.ndim != 2 or o.shape[1] < 2 or not np.isfinite(o).all() for o in outputs.values()):
        return None
    return {name: mean_confidence(o) for name, o in outputs.items()}


def _numbers(values: np.ndarray) -> str:
    return ",".join(f"{v:.3g}" for v in values)
