"""Every calibration layout is detected and streamed, and bad data fails with a clear message."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import tiny
from hypothesis import given
from hypothesis import strategies as st
from onnx import numpy_helper
from PIL import Image

from onnxq.data.images import ImagePreprocessing
from onnxq.data.sources import batches, feeds_from, model_inputs, spread_order
from onnxq.errors import OnnxqError


def collect(calib, model, batch_size=4, limit=None, preprocessing=None):
    inputs = model_inputs(model)
    raw, _ = feeds_from(calib, inputs, preprocessing)
    return list(batches(raw, inputs, batch_size, limit))


def test_npy_folder_and_batching(tmp_path):
    model = tiny.mlp_model()
    for i in range(10):
        np.save(tmp_path / f"{i:02d}.npy", np.full((12,), i, np.float32))  # no batch axis: one is added
    out = collect(tmp_path, model, batch_size=4)
    assert [b["x"].shape[0] for b in out] == [4, 4, 2]
    assert out[0]["x"][:, 0].tolist() == [0, 8, 4, 2]  # sorted, then spread: deterministic
    limited = np.concatenate([b["x"][:, 0] for b in collect(tmp_path, model, limit=4)])
    assert sorted(limited.tolist()) == [0, 2, 4, 8]  # a limit takes files from the whole range, not the first ones


@given(count=st.integers(0, 3000), prefix=st.integers(1, 3000))
def test_spread_order_is_a_permutation_whose_prefixes_cover_the_range(count, prefix):
    order = spread_order(count)
    assert sorted(order) == list(range(count))
    taken = sorted(order[:min(prefix, count)])
    if len(taken) > 1:  # bit reversal: the gaps of any prefix stay within 4x the even spacing
        gaps = np.diff([*taken, count + taken[0]])
        assert gaps.max() <= 4 * count / len(taken) + 1


def test_per_input_npy_folders(tmp_path):
    model = tiny.two_input_model()
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        for i in range(3):
            np.save(tmp_path / name / f"s{i}.npy", np.ones((1, 6), np.float32) * (i + (name == "b") * 10))
    out = collect(tmp_path, model)
    assert out[0]["a"][:, 0].tolist() == [0, 2, 1] and out[0]["b"][:, 0].tolist() == [10, 12, 11]  # paired, spread


def test_npz_files_and_single_npz(tmp_path):
    model = tiny.two_input_model()
    for i in range(2):
        np.savez(tmp_path / f"{i}.npz", a=np.ones((3, 6), np.float32), b=np.zeros((3, 6), np.float32))
    assert collect(tmp_path, model, batch_size=100)[0]["a"].shape == (6, 6)
    assert collect(tmp_path / "0.npz", model)[0]["b"].shape == (3, 6)


def test_onnx_test_data_set_layout(tmp_path):
    model = tiny.mlp_model()
    for i in range(3):
        folder = tmp_path / f"test_data_set_{i}"
        folder.mkdir()
        tensor = numpy_helper.from_array(np.full((1, 12), i, np.float32), "x")
        (folder / "input_0.pb").write_bytes(tensor.SerializeToString())
    assert collect(tmp_path, model)[0]["x"][:, 0].tolist() == [0, 2, 1]


def test_reader_and_iterable():
    model = tiny.mlp_model()

    class Reader:
        def __init__(self):
            self.items = iter([{"x": np.ones((2, 12), np.float32)}] * 3)

        def get_next(self):
            return next(self.items, None)

    assert sum(b["x"].shape[0] for b in collect(Reader(), model)) == 6
    assert sum(b["x"].shape[0] for b in collect([{"x": np.ones((1, 12))}] * 5, model)) == 5  # float64 cast


def test_image_folder_preprocessing(tmp_path):
    (tmp_path / "sub").mkdir()
    Image.new("RGB", (40, 30), (255, 0, 0)).save(tmp_path / "sub" / "red.png")
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    model = tiny.cnn_model(size=16)
    prep = ImagePreprocessing(size=(16, 16), mean=(0, 0, 0), std=(1, 1, 1), scale=1.0, channel_order="BGR")
    out = collect(tmp_path, model, preprocessing=prep)
    x = out[0]["x"]
    assert x.shape == (1, 3, 16, 16)
    assert x[0, 2].mean() == pytest.approx(255) and x[0, 0].max() == 0  # BGR: red is the last channel


@pytest.mark.parametrize("array, message", [
    (np.ones((1, 12), np.int64), "dtype"),
    (np.ones((1, 11), np.float32), "shape"),
    (np.full((1, 12), np.nan, np.float32), "NaN"),
])
def test_bad_arrays_are_named(array, message):
    with pytest.raises(OnnxqError, match=message):
        collect([{"x": array}], tiny.mlp_model())


def test_wrong_input_name_and_empty(tmp_path):
    with pytest.raises(OnnxqError, match="missing"):
        collect([{"y": np.ones((1, 12), np.float32)}], tiny.mlp_model())
    with pytest.raises(OnnxqError, match="no calibration data"):
        collect(tmp_path, tiny.mlp_model())
    with pytest.raises(OnnxqError, match="empty"):
        collect([], tiny.mlp_model())
    with pytest.raises(OnnxqError, match="does not exist"):
        collect(tmp_path / "nope", tiny.mlp_model())


def test_all_images_unreadable(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"junk")
    with pytest.raises(OnnxqError, match="none of the calibration images"):
        collect(tmp_path, tiny.cnn_model())


def test_model_inputs_shape():
    spec = model_inputs(onnx.load_model_from_string(tiny.cnn_model().SerializeToString()))[0]
    assert spec.shape == (None, 3, 16, 16) and spec.image_size() == (16, 16)
