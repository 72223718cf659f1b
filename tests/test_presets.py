"""Preprocessing presets, the model metadata that declares them, letterboxing, dynamic sizes and the check that
warns when the preprocessing looks wrong for the model."""

from __future__ import annotations

import json
import logging

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from conftest import DEMO_PREPROCESSING, save, tiny
from PIL import Image

import onnxq
from onnxq.cli import PRESET_NAMES, cli
from onnxq.data.images import ImagePreprocessing, letterboxed
from onnxq.data.presets import METADATA_KEY, PRESETS, SIZE_METADATA_KEY, from_metadata, to_metadata
from onnxq.data.sources import declared_preprocessing, default_preprocessing, model_inputs
from onnxq.errors import OnnxqError

PIXEL = (200, 100, 50)  # an RGB colour


def solid(path, size=(40, 30), colour=PIXEL):
    Image.new("RGB", size, colour).save(path)
    return path


def image_folder(tmp_path, count=12, size=(40, 30)):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(count):
        pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:02d}.png")
    return folder


def test_cli_lists_every_preset():
    assert set(PRESET_NAMES) == set(PRESETS)


@pytest.mark.parametrize("preset, expected", [
    ("torchvision", [(v / 255 - m) / s for v, m, s in zip(PIXEL, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225),
                                                         strict=True)]),
    ("caffe", [PIXEL[2] - 104, PIXEL[1] - 117, PIXEL[0] - 123]),  # BGR order, minus the BGR mean
    ("inception", [v / 127.5 - 1 for v in PIXEL]),
    ("tflite", [(v - 127) / 128 for v in PIXEL]),
    ("unit", [v / 255 for v in PIXEL]),
    ("none", list(PIXEL)),
])
def test_presets_give_each_conventions_values(tmp_path, preset, expected):
    image = ImagePreprocessing(size=(8, 8), preset=preset).load(solid(tmp_path / "a.png"))
    assert image.shape == (1, 3, 8, 8)
    np.testing.assert_allclose(image[0, :, 4, 4], expected, rtol=1e-5, atol=1e-4)


def test_explicit_values_win_over_the_preset_and_the_preset_over_the_model():
    declared = {"preset": "caffe", "size": (300, 300)}
    done = ImagePreprocessing(preset="inception", std=(2.0, 2.0, 2.0)).completed(declared)
    assert (done.mean, done.std, done.scale, done.channel_order) == ((1.0,) * 3, (2.0,) * 3, 1 / 127.5, "RGB")
    assert done.preset is None  # no longer plain inception
    assert done.size == (300, 300)  # no static model size, so the declared one
    from_model = ImagePreprocessing().completed(declared, model_size=(227, 227))
    assert (from_model.preset, from_model.mean, from_model.size) == ("caffe", (104.0, 117.0, 123.0), (227, 227))
    assert ImagePreprocessing().completed().preset == "torchvision"
    assert ImagePreprocessing().completed().size == (224, 224)


def test_metadata_round_trip_and_errors():
    done = ImagePreprocessing(preset="caffe", size=(227, 227)).completed()
    assert ImagePreprocessing().completed(from_metadata(to_metadata(done.description()))) == done
    assert from_metadata({METADATA_KEY: "tflite"}) == {"preset": "tflite"}
    assert from_metadata({SIZE_METADATA_KEY: "320x480"}) == {"size": (320, 480)}
    for bad in ("{not json", '{"colour": 1}', "yolo"):
        with pytest.raises(OnnxqError, match=METADATA_KEY if bad != "yolo" else "unknown preprocessing preset"):
            from_metadata({METADATA_KEY: bad})


def test_letterbox_keeps_the_whole_image_and_pads_with_grey():
    pixels = np.zeros((10, 20, 3), np.float32)
    pixels[:, :10] = 255.0  # left half white
    boxed = letterboxed(pixels, (16, 16))
    assert boxed.shape == (16, 16, 3)
    np.testing.assert_array_equal(boxed[:3], 114.0)  # 20x10 scaled to 16x8, centred: rows 0-3 and 12-15 padding
    np.testing.assert_array_equal(boxed[12:], 114.0)
    assert boxed[4:12, :7].min() == 255.0 and boxed[4:12, 9:].max() == 0.0  # both halves kept, nothing cropped


def test_letterbox_mode_from_the_flags(tmp_path):
    image = ImagePreprocessing(size=(16, 16), preset="none", resize_mode="letterbox").load(
        solid(tmp_path / "wide.png", size=(32, 8)))
    np.testing.assert_array_equal(image[0, :, 0, 0], [114.0] * 3)  # corner padded
    np.testing.assert_allclose(image[0, :, 8, 8], PIXEL)


def dynamic_cnn(tmp_path, metadata=None):
    model = tiny.cnn_model()
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "H", "W"
    for key, value in (metadata or {}).items():
        model.metadata_props.add(key=key, value=value)
    return save(model, tmp_path / "dynamic.onnx")


def test_dynamic_size_says_which_size_and_takes_the_flag_or_metadata(tmp_path, caplog):
    images = image_folder(tmp_path)
    with caplog.at_level(logging.INFO, logger="onnxq"):
        onnxq.quantize(dynamic_cnn(tmp_path), images, tmp_path / "a.onnx", calib_size=4)
    assert any("dynamic height and width" in r.message and "default 224x224" in r.message and
               r.levelno == logging.WARNING for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="onnxq"):
        onnxq.quantize(dynamic_cnn(tmp_path), images, tmp_path / "b.onnx", calib_size=4,
                       preprocessing=ImagePreprocessing(size=(32, 48), resize_mode="letterbox"))
    said = [r for r in caplog.records if "dynamic height and width" in r.message]
    assert said and "letterboxed to 32x48" in said[0].message and said[0].levelno == logging.INFO
    written = json.loads(dict((p.key, p.value) for p in onnx.load(tmp_path / "b.onnx").metadata_props)[METADATA_KEY])
    assert written["size"] == [32, 48] and written["resize_mode"] == "letterbox"
    declared = declared_preprocessing(onnx.load(dynamic_cnn(tmp_path, {SIZE_METADATA_KEY: "40"})))
    assert default_preprocessing(model_inputs(tiny.cnn_model()), None, declared).size == (16, 16)  # static wins
    dynamic = model_inputs(onnx.load(dynamic_cnn(tmp_path)))
    assert default_preprocessing(dynamic, None, declared).size == (40, 40)


def test_demo_needs_one_flag_and_records_it(tmp_path, demo_model, demo_calib):
    runner = CliRunner()
    one = runner.invoke(cli, [str(demo_model), "--calib", str(demo_calib), "-o", str(tmp_path / "one.onnx"),
                              "--preprocess", "caffe", "--method", "rtn", "-q"])
    five = runner.invoke(cli, [str(demo_model), "--calib", str(demo_calib), "-o", str(tmp_path / "five.onnx"),
                               *DEMO_PREPROCESSING, "--method", "rtn", "-q"])
    assert one.exit_code == 0 and five.exit_code == 0, one.output + five.output
    a, b = onnx.load(tmp_path / "one.onnx"), onnx.load(tmp_path / "five.onnx")
    for x, y in zip(a.graph.initializer, b.graph.initializer, strict=True):
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(x), onnx.numpy_helper.to_array(y))
    assert declared_preprocessing(a)["preset"] == "caffe"
    assert "preset" not in declared_preprocessing(b)  # the same values, written out without a preset name
    assert declared_preprocessing(b)["mean"] == (104.0, 117.0, 123.0)


def test_wrong_preprocessing_is_warned_with_the_preset_to_use(tmp_path, demo_model, demo_calib, caplog):
    with caplog.at_level(logging.WARNING, logger="onnxq"):
        onnxq.quantize(demo_model, demo_calib, tmp_path / "tv.onnx", method="rtn")  # torchvision by default
    warned = [r.message for r in caplog.records if "less confident" in r.message]
    assert warned and "--preprocess caffe" in warned[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="onnxq"):
        onnxq.quantize(demo_model, demo_calib, tmp_path / "caffe.onnx", method="rtn",
                       preprocessing=ImagePreprocessing(preset="caffe"))
        onnxq.quantize(demo_model, demo_calib, tmp_path / "scale.onnx", method="rtn",
                       preprocessing=ImagePreprocessing(scale=1.0))  # torchvision's mean/std on 0..255 pixels
    messages = [r.message for r in caplog.records]
    assert not any("less confident" in m for m in messages)
    assert sum("unlike any preprocessing convention" in m for m in messages) == 1


def test_the_output_metadata_drives_eval(tmp_path, demo_model, demo_calib):
    out = tmp_path / "q.onnx"
    onnxq.quantize(demo_model, demo_calib, out, bits=8, preprocessing=ImagePreprocessing(preset="caffe"))
    runner = CliRunner()
    declared = runner.invoke(cli, ["eval", str(out), "--reference", str(demo_model), "--data", str(demo_calib),
                                   "--json", "-q"])
    given = runner.invoke(cli, ["eval", str(out), "--reference", str(demo_model), "--data", str(demo_calib),
                                "--json", "-q", "--preprocess", "caffe"])
    assert declared.exit_code == 0, declared.output
    assert json.loads(declared.output)["sqnr_db"] == json.loads(given.output)["sqnr_db"]
