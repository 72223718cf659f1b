"""Shared fixtures: the tiny model builders, the demo model and the optional ../shared assets."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "models"))
SHARED = Path(os.environ.get("ONNXQ_SHARED", ROOT.parent / "shared"))

import tiny  # noqa: E402

requires_shared = pytest.mark.skipif(not (SHARED / "models").is_dir(), reason="../shared assets not present")


def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path))
    return path


@pytest.fixture
def cnn_path(tmp_path: Path) -> Path:
    return save(tiny.cnn_model(), tmp_path / "cnn.onnx")


def cnn_samples(folder: Path, count: int) -> Path:
    """A folder of ``count`` seeded .npy samples for the tiny CNN (the first ones equal whatever the count)."""
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(count):
        np.save(folder / f"{i:03d}.npy", rng.normal(size=(1, 3, 16, 16)).astype(np.float32))
    return folder


@pytest.fixture
def cnn_calib(tmp_path: Path) -> Path:
    """A folder of 20 .npy samples for the tiny CNN."""
    return cnn_samples(tmp_path / "calib", 20)


class SensitivityBar:
    """A progress factory for tests that act during CLADO's sensitivity measurement: it is the bar of the
    "sensitivity" phase (other phases get none); subclasses say what ``update`` does."""

    def __call__(self, total, label):
        from onnxq.report.progress import NoProgress

        return self if label == "sensitivity" else NoProgress()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n: int) -> None:
        raise NotImplementedError


@pytest.fixture
def demo_model() -> Path:
    return ROOT / "models" / "squeezenet1.1.onnx"


@pytest.fixture
def demo_calib() -> Path:
    return ROOT / "models" / "demo_calib"


DEMO_PREPROCESSING = ["--channel-order", "BGR", "--mean", "104,117,123", "--std", "1,1,1", "--scale", "1",
                      "--resize", "256x256"]
