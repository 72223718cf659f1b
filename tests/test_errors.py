"""Ordinary bad input is a user error: one ``onnxq: error:`` line, a non-zero exit, no traceback, nothing written.

Each class of bad input (calibration files, images, models, eval references and labels, flags) has a case of its
own, run through the real CLI entry point (``onnxq.cli.main``) in-process; a few run as a subprocess to check
what a user's terminal shows (stderr free of Python warnings and onnxruntime's log lines).
"""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import onnx
import pytest
import tiny
from conftest import save
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import onnxq
from onnxq.cli import main
from onnxq.data.images import ImagePreprocessing, read_image
from onnxq.data.npz import load_npy, load_npz
from onnxq.errors import OnnxqError
from onnxq.graph.loading import load_model
from onnxq.report.evaluate import evaluate
from onnxq.report.progress import without_progress


def run_main(monkeypatch, capsys, *args: object) -> tuple[int, str, str]:
    """Run ``onnxq ARGS`` through the CLI entry point; return the exit code, stdout and stderr."""
    monkeypatch.setattr(sys, "argv", ["onnxq", *map(str, args)])
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)
    handler = signal.getsignal(signal.SIGTERM)
    try:
        main()
        code = 0
    except SystemExit as done:
        code = done.code
    finally:
        signal.signal(signal.SIGTERM, handler)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_user_error(code: int, err: str, *needles: str) -> None:
    """A non-zero exit with exactly one ``onnxq: error:`` line that names the problem."""
    lines = without_progress(err)
    assert code not in (0, None), err
    assert len(lines) == 1 and lines[0].startswith("onnxq: error: "), err
    assert "Traceback" not in err and "internal error" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture
def mlp_path(tmp_path: Path) -> Path:
    return save(tiny.mlp_model(), tmp_path / "mlp.onnx")


def npy_folder(tmp_path: Path, count: int = 4, shape=(1, 12)) -> Path:
    folder = tmp_path / "calib"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(count):
        np.save(folder / f"{i}.npy", rng.normal(size=shape).astype(np.float32))
    return folder


def quantize_args(model: Path, calib: Path, out: Path, *extra: object) -> list[object]:
    return [model, "--calib", calib, "-o", out, "--method", "rtn", "-q", *extra]


# ---- calibration files ------------------------------------------------------------------------------------


def npy_bytes(array: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=True)
    return buffer.getvalue()


def huge_header() -> bytes:
    """A valid .npy header that claims 10^12 floats, followed by a few bytes."""
    header = "{'descr': '<f4', 'fortran_order': False, 'shape': (1000000, 1000000), }"
    header += " " * (63 - (len(header) + 10) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode() + b"\0" * 64


BAD_NPY = {
    "object": lambda: npy_bytes(np.array([{"a": 1}, None], dtype=object)),
    "truncated": lambda: npy_bytes(np.ones((1, 12), np.float32))[:-20],
    "empty": lambda: b"",
    "huge header": huge_header,
    "text": lambda: b"0.1 0.2 0.3\n",
}


@pytest.mark.parametrize("case", sorted(BAD_NPY))
def test_bad_npy_is_a_user_error(tmp_path, monkeypatch, capsys, mlp_path, case):
    calib = npy_folder(tmp_path)
    (calib / "2.npy").write_bytes(BAD_NPY[case]())
    out = tmp_path / "q.onnx"
    code, _, err = run_main(monkeypatch, capsys, *quantize_args(mlp_path, calib, out))
    assert_user_error(code, err, "2.npy", "not a readable .npy array")
    assert not out.exists()


@pytest.mark.parametrize("content", [b"not a zip at all", npy_bytes(np.ones((1, 12), np.float32)),
                                     b"PK\x03\x04" + b"\0" * 40])
def test_npz_that_is_not_a_zip_is_a_user_error(tmp_path, monkeypatch, capsys, mlp_path, content):
    calib = tmp_path / "calib"
    calib.mkdir()
    np.savez(calib / "0.npz", x=np.ones((1, 12), np.float32))
    (calib / "1.npz").write_bytes(content)
    out = tmp_path / "q.onnx"
    code, _, err = run_main(monkeypatch, capsys, *quantize_args(mlp_path, calib, out))
    assert_user_error(code, err, "1.npz", ".npz")
    assert not out.exists()


def test_corrupt_tensor_proto_is_a_user_error(tmp_path, monkeypatch, capsys, mlp_path):
    folder = tmp_path / "calib" / "test_data_set_0"
    folder.mkdir(parents=True)
    (folder / "input_0.pb").write_bytes(b"\xff" * 50)
    code, _, err = run_main(monkeypatch, capsys, *quantize_args(mlp_path, tmp_path / "calib", tmp_path / "q.onnx"))
    assert_user_error(code, err, "input_0.pb", "TensorProto")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=300), cut=st.integers(0, 400), header=st.booleans())
def test_random_calibration_bytes_load_or_fail_cleanly(tmp_path, data, cut, header):
    """Random bytes, truncations and random bodies behind a real .npy header: an array or an OnnxqError."""
    valid = npy_bytes(np.arange(24, dtype=np.float32).reshape(2, 12))
    content = valid[:cut] + data if header else data
    for name, loader in (("x.npy", load_npy), ("x.npz", load_npz)):
        path = tmp_path / name
        path.write_bytes(content)
        try:
            loader(path)
        except OnnxqError as err:
            assert "\n" not in str(err)


# ---- images -----------------------------------------------------------------------------------------------


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def bomb_png(path: Path, side: int) -> Path:
    """A 1-bit greyscale PNG of side x side zeros: a few KB on disk, side² pixels once decoded."""
    row = b"\0" * (1 + (side + 7) // 8)
    compressor, body = zlib.compressobj(9), []
    for _ in range(side):
        body.append(compressor.compress(row))
    body.append(compressor.flush())
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", b"".join(body))
                     + png_chunk(b"IEND", b""))
    return path


def image_folder(tmp_path: Path, count: int = 4) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


@pytest.mark.parametrize("side", [10_000, 14_000])  # Pillow warns above 89 M pixels and refuses above 179 M
def test_decompression_bomb_is_skipped_with_a_warning(tmp_path, caplog, side):
    bomb = bomb_png(tmp_path / "bomb.png", side)
    assert bomb.stat().st_size < 200_000
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no Pillow DecompressionBombWarning may escape
        assert read_image(bomb, ImagePreprocessing(size=(16, 16))) is None
    assert "skipping" in caplog.text and "bomb.png" in caplog.text


def test_quantize_skips_a_bomb_and_stderr_stays_clean(tmp_path):
    """End to end as a user sees it: one warning line for the bomb, a model written, no paths or colours."""
    calib = image_folder(tmp_path)
    bomb_png(calib / "9_bomb.png", 10_000)
    model = save(tiny.cnn_model(), tmp_path / "cnn.onnx")
    out = tmp_path / "q.onnx"
    run = subprocess.run([sys.executable, "-m", "onnxq", *map(str, quantize_args(model, calib, out))],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    lines = without_progress(run.stderr)
    assert any("skipping" in line and "9_bomb.png" in line for line in lines), run.stderr
    assert all(line.startswith("onnxq: warning: ") for line in lines), run.stderr
    assert "\x1b[" not in run.stderr and ".py:" not in run.stderr
    assert out.exists()


def test_sixteen_bit_png_is_read_at_its_real_range(tmp_path):
    """A 16-bit grey PNG reads like the 8-bit image of the same brightness (it was clipped to white)."""
    ramp16 = np.tile(np.linspace(0, 65535, 16).round().astype(np.uint16), (16, 1))
    Image.fromarray(ramp16).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    ramp8 = np.tile(np.linspace(0, 255, 16).round().astype(np.uint8), (16, 1))
    Image.fromarray(ramp8).save(tmp_path / "flat.png")
    prep = ImagePreprocessing(size=(16, 16), resize=(16, 16), mean=(0,), std=(1,), scale=1 / 255)
    deep, flat = prep.load(tmp_path / "deep.png"), prep.load(tmp_path / "flat.png")
    assert deep.shape == flat.shape == (1, 3, 16, 16)
    np.testing.assert_allclose(deep, flat, atol=0.5 / 255)
    np.testing.assert_allclose(deep[0, 0, 0], np.linspace(0, 1, 16), atol=1e-6)


@pytest.mark.parametrize(("flags", "needle"), [
    (["--image-size", "100000"], "--image-size 100000"),
    (["--image-size", "30000x30000"], "--image-size 30000x30000"),
    (["--image-size", "0x0"], "--image-size 0x0"),
    (["--resize", "99999"], "--resize 99999"),
    (["--mean", "1,2"], "--mean has 2 values"),
    (["--std", "0,1,1"], "--std must not contain 0"),
])
def test_bad_preprocessing_flags_are_refused_up_front(tmp_path, monkeypatch, capsys, flags, needle):
    calib = image_folder(tmp_path)
    model = save(tiny.cnn_model(), tmp_path / "cnn.onnx")
    out = tmp_path / "q.onnx"
    code, _, err = run_main(monkeypatch, capsys, *quantize_args(model, calib, out, *flags))
    assert_user_error(code, err, needle)
    assert "unreadable" not in err and not out.exists()


def test_an_image_that_would_resize_to_a_huge_size_is_skipped(tmp_path, caplog):
    Image.new("RGB", (1, 4000)).save(tmp_path / "strip.png")  # short side 1 -> 256 x 1 024 000 pixels
    assert read_image(tmp_path / "strip.png", ImagePreprocessing(size=(224, 224), resize=256)) is None
    assert "strip.png" in caplog.text


# ---- models -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["device", "fifo", "random bytes", "png", "truncated"])
def test_non_onnx_model_files_are_user_errors(tmp_path, monkeypatch, capsys, kind):
    model = tmp_path / "model.onnx"
    if kind == "device":
        model = Path("/dev/zero")
    elif kind == "fifo":
        os.mkfifo(model)
    elif kind == "random bytes":
        model.write_bytes(np.random.default_rng(0).bytes(5000))
    elif kind == "png":
        model.write_bytes((image_folder(tmp_path) / "0.png").read_bytes())
    else:
        model.write_bytes(tiny.mlp_model().SerializeToString()[:-40])
    out = tmp_path / "q.onnx"
    code, _, err = run_main(monkeypatch, capsys, *quantize_args(model, npy_folder(tmp_path), out))
    assert_user_error(code, err, str(model))
    assert not out.exists()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.integers(0, 2000), junk=st.binary(max_size=64))
def test_truncated_or_garbled_models_load_or_fail_cleanly(tmp_path, cut, junk):
    path = tmp_path / "m.onnx"
    path.write_bytes(tiny.cnn_model().SerializeToString()[:cut] + junk)
    try:
        load_model(path)
    except OnnxqError as err:
        assert "\n" not in str(err)


@pytest.mark.parametrize("location", ["../outside.data", "/tmp/absolute.data", "missing.data"])
def test_external_data_outside_the_model_folder_is_a_user_error(tmp_path, monkeypatch, capsys, location):
    folder = tmp_path / "model"
    folder.mkdir()
    onnx.save(tiny.mlp_model(), str(folder / "m.onnx"), save_as_external_data=True, location="m.data",
              size_threshold=0)
    (tmp_path / "outside.data").write_bytes((folder / "m.data").read_bytes())
    model = onnx.load(str(folder / "m.onnx"), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save(model, str(folder / "evil.onnx"))
    out = tmp_path / "q.onnx"
    code, _, err = run_main(monkeypatch, capsys, *quantize_args(folder / "evil.onnx", npy_folder(tmp_path), out))
    assert_user_error(code, err, "external weights", "evil.onnx")
    assert not out.exists()


def test_invalid_exclusion_regex_is_a_user_error(tmp_path, monkeypatch, capsys, mlp_path):
    out = tmp_path / "q.onnx"
    code, _, err = run_main(monkeypatch, capsys,
                            *quantize_args(mlp_path, npy_folder(tmp_path), out, "--nodes_to_exclude", "mm["))
    assert_user_error(code, err, "'mm['", "regular expression")
    assert not out.exists()


# ---- eval ----------------------------------------------------------------------------------------------------


def labelled_images(root: Path, classes: int = 3, per_class: int = 3) -> Path:
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class_{c}").mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / f"class_{c}" / f"c{c}_{i}.png")  # names unique across classes
    return root


def eval_args(quantized: Path, reference: Path, data: Path, *extra: object) -> list[object]:
    return ["eval", quantized, "--reference", reference, "--data", data, "-q", "--image-size", "16x16",
            "--resize", "16x16", *extra]


def test_eval_with_a_reference_of_another_output_shape(tmp_path, monkeypatch, capsys):
    reference = save(tiny.cnn_model(classes=3), tmp_path / "ref.onnx")
    other = save(tiny.cnn_model(classes=5), tmp_path / "other.onnx")
    code, _, err = run_main(monkeypatch, capsys, *eval_args(other, reference, labelled_images(tmp_path / "d")))
    assert_user_error(code, err, "output has shape", "--reference")


def test_eval_with_a_reference_of_other_inputs(tmp_path, monkeypatch, capsys):
    reference = save(tiny.cnn_model(), tmp_path / "ref.onnx")
    other = save(tiny.mlp_model(), tmp_path / "other.onnx")
    code, _, err = run_main(monkeypatch, capsys, *eval_args(other, reference, labelled_images(tmp_path / "d")))
    assert_user_error(code, err, "takes inputs", "--reference")


def test_eval_missing_labels_file_is_an_error(tmp_path, monkeypatch, capsys):
    reference = save(tiny.cnn_model(classes=3), tmp_path / "ref.onnx")
    data = labelled_images(tmp_path / "d")
    code, _, err = run_main(monkeypatch, capsys, *eval_args(reference, reference, data, "--labels",
                                                           tmp_path / "nope.txt"))
    assert_user_error(code, err, "nope.txt", "does not exist")


def test_eval_labels_outside_the_classes_name_the_range(tmp_path, monkeypatch, capsys):
    reference = save(tiny.cnn_model(classes=3), tmp_path / "ref.onnx")
    data = labelled_images(tmp_path / "d")
    labels = tmp_path / "labels.txt"
    labels.write_text("".join(f"{p.name} {int(p.parent.name[-1]) + 1}\n" for p in sorted(data.rglob("*.png"))))
    code, _, err = run_main(monkeypatch, capsys, *eval_args(reference, reference, data, "--labels", labels))
    assert_user_error(code, err, "from 1 to 3", "3 classes (0 to 2)")


def fixed_batch(model: onnx.ModelProto, batch: int) -> onnx.ModelProto:
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.shape.dim[0].dim_value = batch
    return model


@pytest.mark.parametrize("batch", [1, 4])
def test_eval_runs_a_fixed_batch_model_on_an_image_folder(tmp_path, batch):
    """Slices of the model's fixed batch (the last one padded) give the figures of a dynamic-batch run."""
    data = labelled_images(tmp_path / "d")  # 9 images: not a multiple of 4
    prep = ImagePreprocessing(size=(16, 16), resize=(16, 16))
    dynamic = [save(tiny.cnn_model(seed=s, classes=3), tmp_path / f"dyn{s}.onnx") for s in (0, 1)]
    fixed = [save(fixed_batch(tiny.cnn_model(seed=s, classes=3), batch), tmp_path / f"fix{s}.onnx") for s in (0, 1)]
    expected = evaluate(dynamic[1], dynamic[0], data, prep, batch_size=32)
    got = evaluate(fixed[1], fixed[0], data, prep, batch_size=32)
    assert got.samples == expected.samples == 9
    for field in ("agreement", "mean_kl", "sqnr_db", "top1", "reference_top1"):
        assert np.isclose(getattr(got, field), getattr(expected, field), rtol=1e-5), field


def test_eval_stderr_stays_clean(tmp_path):
    """A real eval run prints its figures and nothing on stderr: no numpy or onnxruntime warnings."""
    reference = save(tiny.cnn_model(classes=3), tmp_path / "ref.onnx")
    other = save(tiny.cnn_model(seed=1, classes=3), tmp_path / "other.onnx")
    run = subprocess.run([sys.executable, "-m", "onnxq", *map(str, eval_args(other, reference,
                                                                              labelled_images(tmp_path / "d")))],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stderr == "" and "top-1" in run.stdout.lower()


@pytest.mark.parametrize("sample", [[np.zeros((1, 12), np.float32)], np.zeros((1, 12), np.float32), "x"])
def test_a_python_sample_that_is_not_a_dict_is_a_user_error(tmp_path, sample):
    path = save(tiny.mlp_model(), tmp_path / "mlp.onnx")
    with pytest.raises(OnnxqError, match=r"not a dict of arrays; give each sample as \{input name: array\}"):
        onnxq.quantize(path, [sample], tmp_path / "q.onnx", method="rtn")
    assert not (tmp_path / "q.onnx").exists()
