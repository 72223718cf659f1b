"""The command line end to end: a working run, and one-line errors with no output file for bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import tiny
from conftest import save

from onnxq.report.progress import without_progress


def run(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "onnxq", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def assert_clean_failure(result: subprocess.CompletedProcess, output: Path, message: str) -> None:
    assert result.returncode != 0
    lines = without_progress(result.stderr)
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr and message in lines[0], lines[0]
    assert not output.exists()
    assert not list(output.parent.glob(f".{output.name}*")), "temporary files left behind"


def test_quantize_end_to_end(tmp_path, cnn_path, cnn_calib):
    out = tmp_path / "q.onnx"
    result = run(cnn_path, "--calib", cnn_calib, "-o", out, "--bits", "4", "--method", "rtn", "--first-last-bits", "8")
    assert result.returncode == 0, result.stderr
    assert "conv2_grouped" in result.stdout and "wrote" in result.stdout
    model = onnx.load(str(out))
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["onnxq.method"] == "rtn"
    types = {t.name: t.data_type for t in model.graph.initializer}
    assert types["c2_w_quantized"] == onnx.TensorProto.INT4 and types["fc_w_quantized"] == onnx.TensorProto.INT8


def initializers_per_flag(tmp_path, cnn_path, cnn_calib, method: str, *flags: str) -> dict[str, dict]:
    """Quantize the tiny CNN to 2 bits once per flag; each output's initializers by name."""
    out_tensors = {}
    for flag in flags:
        out = tmp_path / f"{flag}.onnx"
        result = run(cnn_path, "--calib", cnn_calib, "-o", out, "--bits", "2", "--method", method, flag)
        assert result.returncode == 0, result.stderr
        out_tensors[flag] = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer}
    return out_tensors


def test_bias_correction_flag(tmp_path, cnn_path, cnn_calib):
    """Default: biases shift by the error mean; --no-bias-correction leaves every bias as in the float model."""
    biases = initializers_per_flag(tmp_path, cnn_path, cnn_calib, "rtn", "--bias-correction", "--no-bias-correction")
    original = {t.name: onnx.numpy_helper.to_array(t) for t in tiny.cnn_model().graph.initializer}
    for name in ("c2_b", "dw_b", "fc_b"):
        np.testing.assert_array_equal(biases["--no-bias-correction"][name], original[name])
        assert not np.allclose(biases["--bias-correction"][name], original[name])


def test_shrinkage_flag_changes_the_layer_with_few_rows(tmp_path, cnn_path, cnn_calib):
    """The classifier sees one row per sample (20 rows): shrinkage changes its codes; --no-shrinkage turns it off."""
    codes = initializers_per_flag(tmp_path, cnn_path, cnn_calib, "comq", "--shrinkage", "--no-shrinkage")
    assert not np.array_equal(codes["--shrinkage"]["fc_w_quantized"], codes["--no-shrinkage"]["fc_w_quantized"])


def test_sequential_flag_keeps_the_first_layer_and_changes_later_ones(tmp_path, cnn_path, cnn_calib):
    """The first layer sees float inputs either way; later layers are rounded on the quantized model's inputs."""
    codes = initializers_per_flag(tmp_path, cnn_path, cnn_calib, "comq", "--no-sequential", "--sequential")
    plain, sequential = codes["--no-sequential"], codes["--sequential"]
    np.testing.assert_array_equal(plain["ConvBnFusion_W_c1_w_quantized"], sequential["ConvBnFusion_W_c1_w_quantized"])
    assert not np.array_equal(plain["c2_w_quantized"], sequential["c2_w_quantized"])


def test_exclude_and_op_types(tmp_path, cnn_path, cnn_calib):
    out = tmp_path / "q.onnx"
    result = run(cnn_path, "--calib", cnn_calib, "-o", out, "--method", "rtn", "--nodes_to_exclude", "conv[13].*",
                 "--op_types_to_quantize", "Conv")
    assert result.returncode == 0, result.stderr
    names = {t.name for t in onnx.load(str(out)).graph.initializer}
    assert "c2_w_quantized" in names and "dw_w" in names and "fc_w" in names


def test_stats_are_reused(tmp_path, cnn_path, cnn_calib):
    stats = tmp_path / "stats.npz"
    first = run(cnn_path, "--calib", cnn_calib, "-o", tmp_path / "a.onnx", "--stats", stats, "--method", "rtn")
    assert first.returncode == 0 and stats.exists()
    second = run(cnn_path, "--calib", cnn_calib, "-o", tmp_path / "b.onnx", "--stats", stats,
                 "--method", "rtn", "--bits", "2")
    assert second.returncode == 0, second.stderr
    assert "reusing calibration statistics" in second.stderr


def test_help_explains_flags():
    result = run("quantize", "--help")
    assert result.returncode == 0
    for flag in ("--calib", "--bits", "--method", "--nodes-to-exclude", "--stats", "--calib-size", "--mean"):
        assert flag in result.stdout
    assert "--nodes_to_exclude" not in result.stdout  # accepted (ORT's spelling) but not listed


def test_invalid_combination_is_a_one_line_error_before_any_work(tmp_path, cnn_path, cnn_calib):
    out = tmp_path / "q.onnx"
    result = run(cnn_path, "--calib", cnn_calib, "-o", out, "--accuracy-level", "4")
    assert_clean_failure(result, out, "--accuracy-level needs --matmul-nbits")
    result = run(cnn_path, "--calib", cnn_calib, "-o", out, "--prefer", "speed")
    assert_clean_failure(result, out, "--prefer needs --act-bits 8")


@pytest.mark.parametrize("case", ["missing", "corrupt", "truncated", "not_onnx_dir", "checker"])
def test_bad_model(tmp_path, cnn_calib, case):
    model = tmp_path / "m.onnx"
    if case == "corrupt":
        model.write_bytes(b"\x00garbage" * 10)
    elif case == "truncated":
        data = tiny.cnn_model().SerializeToString()
        model.write_bytes(data[: len(data) // 2])
    elif case == "not_onnx_dir":
        model.mkdir()
    elif case == "checker":  # a node reads a tensor that nothing defines
        broken = tiny.cnn_model()
        broken.graph.node[2].input[0] = "undefined_tensor"
        model.write_bytes(broken.SerializeToString())
    out = tmp_path / "out.onnx"
    result = run(model, "--calib", cnn_calib, "-o", out)
    assert_clean_failure(result, out, "model" if case != "not_onnx_dir" else "folder")


def test_bad_calibration(tmp_path, cnn_path):
    out = tmp_path / "out.onnx"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_clean_failure(run(cnn_path, "--calib", empty, "-o", out), out, "no calibration data")
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    np.save(wrong / "a.npy", np.ones((1, 3, 8, 8), np.float32))
    assert_clean_failure(run(cnn_path, "--calib", wrong, "-o", out), out, "shape")


def test_bad_output(tmp_path, cnn_path, cnn_calib):
    assert_clean_failure(run(cnn_path, "--calib", cnn_calib, "-o", cnn_path), tmp_path / "never.onnx", "is the input")
    assert cnn_path.stat().st_size > 0
    out = tmp_path / "missing" / "out.onnx"
    assert_clean_failure(run(cnn_path, "--calib", cnn_calib, "-o", out), out, "does not exist")
    out = Path("/proc/onnxq-test.onnx")
    assert_clean_failure(run(cnn_path, "--calib", cnn_calib, "-o", out), tmp_path / "x.onnx", "write")


def test_nothing_to_quantize(tmp_path, cnn_calib):
    model = save(tiny.no_weights_model(), tmp_path / "relu.onnx")
    data = tmp_path / "d"
    data.mkdir()
    np.save(data / "a.npy", np.ones((1, 4), np.float32))
    out = tmp_path / "out.onnx"
    assert_clean_failure(run(model, "--calib", data, "-o", out), out, "--allow-empty")
    assert run(model, "--calib", data, "-o", out, "--allow-empty").returncode == 0
    assert out.exists()


def test_already_quantized(tmp_path, cnn_path, cnn_calib):
    first = tmp_path / "q.onnx"
    assert run(cnn_path, "--calib", cnn_calib, "-o", first, "--method", "rtn").returncode == 0
    out = tmp_path / "qq.onnx"
    assert_clean_failure(run(first, "--calib", cnn_calib, "-o", out), out, "already quantized")


def test_w8a8_runs_integer_kernels(tmp_path, cnn_path, cnn_calib):
    from onnxq.report.kernels import kernel_report

    out = tmp_path / "w8a8.onnx"
    result = run(cnn_path, "--calib", cnn_calib, "-o", out, "--bits", "8", "--act-bits", "8", "--method", "rtn",
                 "--kernel-report")
    assert result.returncode == 0, result.stderr
    assert "latency at batch 32" in result.stdout
    kernels = {row["layer"]: row["runs"] for row in kernel_report(out)}
    assert set(kernels.values()) == {"integer"}, kernels
