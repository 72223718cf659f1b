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


@pytest.fixture
def cnn_calib(tmp_path: Path) -> Path:
    """A folder of 20 .npy samples for the tiny CNN."""
    folder = tmp_path / "calib"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(20):
        np.save(folder / f"{i:03d}.npy", rng.normal(size=(1, 3, 16, 16)).astype(np.float32))
    return folder


@pytest.fixture
def demo_model() -> Path:
    return ROOT / "models" / "squeezenet1.1.onnx"


@pytest.fixture
def demo_calib() -> Path:
    return ROOT / "models" / "demo_calib"


DEMO_PREPROCESSING = ["--channel-order", "BGR", "--mean", "104,117,123", "--std", "1,1,1", "--scale", "1",
                      "--resize", "256x256"]
