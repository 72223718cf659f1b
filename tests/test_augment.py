"""--calib-augment: a folder of a few images becomes many calibration samples, the same ones on every run."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from onnxq.data.images import ImagePreprocessing
from onnxq.data.sources import InputSpec, feeds_from
from onnxq.errors import OnnxqError


def image_folder(tmp_path, count: int = 3):
    rng = np.random.default_rng(0)
    for index in range(count):
        pixels = rng.integers(0, 256, size=(48 + 8 * index, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / f"{index}.png")
    return tmp_path


def samples(folder, augment: int | None) -> list[np.ndarray]:
    spec = InputSpec("x", np.dtype(np.float32), (1, 3, 16, 16))
    raw, count = feeds_from(folder, [spec], ImagePreprocessing(size=(16, 16), augment=augment))
    arrays = [feed["x"] for feed in raw]
    assert count == len(arrays)
    return arrays


def test_a_small_folder_is_expanded_to_the_asked_count_the_same_way_every_time(tmp_path):
    folder = image_folder(tmp_path)
    plain = samples(folder, None)
    first, second = samples(folder, 12), samples(folder, 12)
    assert len(plain) == 3 and len(first) == 12
    assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))  # seeded: caches stay valid
    assert all(np.array_equal(a, b) for a, b in zip(first[:3], plain, strict=True))  # the images come first
    views = np.stack([s.ravel() for s in first[3:]])
    assert len(np.unique(views, axis=0)) == 9 and all(s.shape == (1, 3, 16, 16) for s in first)


def test_a_folder_with_enough_images_is_not_augmented(tmp_path):
    assert len(samples(image_folder(tmp_path), 2)) == 3


def test_an_absurd_count_is_refused():
    with pytest.raises(OnnxqError, match="--calib-augment"):
        ImagePreprocessing(augment=10**9)
