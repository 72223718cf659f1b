"""--calib-augment: a folder of a few images becomes many calibration samples, the same ones on every run."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from PIL import Image

from onnxq.data.calibration_set import CalibrationSet
from onnxq.data.images import ImagePreprocessing
from onnxq.data.sources import CHECK_VIEWS, InputSpec, feeds_from
from onnxq.errors import OnnxqError


def image_folder(tmp_path, count: int = 3):
    rng = np.random.default_rng(0)
    for index in range(count):
        pixels = rng.integers(0, 256, size=(48 + 8 * index, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / f"{index}.png")
    return tmp_path


SPEC = InputSpec("x", np.dtype(np.float32), (None, 3, 16, 16))


def samples(folder, augment: int | None) -> list[np.ndarray]:
    """The calibration samples of the folder (the count ``feeds_from`` reports; held-out views follow them)."""
    raw, count = feeds_from(folder, [SPEC], ImagePreprocessing(size=(16, 16), augment=augment))
    arrays = [feed["x"] for feed in raw]
    assert len(arrays) == count + (CHECK_VIEWS if augment and count == augment else 0)
    return arrays[:count]


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


@pytest.mark.parametrize("calib_size", [256, None])
def test_augmented_views_beyond_the_calibration_ones_are_held_out_for_the_check(tmp_path, calib_size):
    folder = image_folder(tmp_path)
    data = CalibrationSet(folder, [SPEC], ImagePreprocessing(size=(16, 16), augment=12), batch_size=4,
                          calib_size=calib_size, held_out=CHECK_VIEWS)
    calibration = np.concatenate([feed["x"] for feed in data.calibration()])
    check, held_out = data.check_batch()
    assert data.samples == 12 and held_out and len(check["x"]) == CHECK_VIEWS  # the whole held-out set, one run
    assert np.array_equal(calibration, np.concatenate(samples(folder, 12)))  # holding out changes no calibration
    seen = {row.tobytes() for row in calibration}
    assert not any(row.tobytes() in seen for row in check["x"])  # views no statistic saw
    assert len({row.tobytes() for row in check["x"]}) == CHECK_VIEWS


def test_the_statistics_key_names_the_augmentation_so_other_views_are_not_reused(tmp_path, monkeypatch):
    from onnxq.calibration.stats_cache import statistics_key
    from onnxq.config import Config
    from onnxq.data import sources

    folder = image_folder(tmp_path)
    model = onnx.helper.make_model(onnx.helper.make_graph([], "g", [], []))

    def key(augment):
        config = Config.from_options(preprocessing=ImagePreprocessing(size=(16, 16), augment=augment))
        return statistics_key(model, [], folder, [SPEC], config)[0]

    plain, augmented = key(None), key(12)
    monkeypatch.setattr(sources, "AUGMENT_SEED", 7)
    assert "augmentation" not in plain and augmented != key(12)  # another seed: other views, another key


def test_a_mosaic_tiles_several_images_each_solid_colour_staying_one_colour(tmp_path):
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (220, 220, 40)]
    paths = []
    for index, colour in enumerate(colours):
        Image.new("RGB", (40, 30), colour).save(tmp_path / f"{index}.png")
        paths.append(tmp_path / f"{index}.png")
    prep = ImagePreprocessing(size=(32, 32), preset="none")  # pixels as they are: 0..255, RGB
    rng = np.random.default_rng(0)
    counts = []
    for _ in range(20):
        view = prep.load_mosaic(paths, rng)[0].transpose(1, 2, 0)
        tiles = {tuple(view[y, x]) for y in (0, 31) for x in (0, 31)}  # the four corners lie in the four tiles
        counts.append(len({tuple(pixel) for pixel in view.reshape(-1, 3)}))
        assert counts[-1] <= 4 and len(tiles) == counts[-1]  # each tile one image's colour, whole (jitter is global)
    assert np.mean(np.array(counts) >= 2) > 0.8  # several images per view
