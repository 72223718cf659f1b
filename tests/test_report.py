"""Per-layer diagnostics against independent computations, and the HTML/JSON reports built from them."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tiny
from conftest import save
from PIL import Image

import onnxq
from onnxq.allocation.mixed import Budget
from onnxq.calibration.calibrate import calibrate
from onnxq.errors import OnnxqError
from onnxq.graph.layers import find_layers
from onnxq.graph.prepare import prepare
from onnxq.report.diagnostics import layer_diagnostics
from onnxq.report.html_report import report_context, write_report, write_report_json

SECTIONS = ("summary", "accuracy", "widths", "sqnr", "sensitivity", "curve", "layers")
CHROMIUM = Path("/usr/bin/chromium")


def cnn_feeds(count: int = 6, seed: int = 1) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(size=(4, 3, 16, 16)).astype(np.float32)} for _ in range(count)]


def mlp_feeds(count: int = 6, seed: int = 1) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(size=(8, 12)).astype(np.float32)} for _ in range(count)]


def tensor_values(path: Path, tensor: str, feeds: list[dict]) -> np.ndarray:
    """One intermediate tensor of a model file over all feeds, computed without onnxq's helpers."""
    model = onnx.load(str(path))
    del model.graph.output[:]
    model.graph.output.append(onnx.helper.make_tensor_value_info(tensor, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, feed)[0] for feed in feeds]).astype(np.float64)


def independent_sqnr(quantized: Path, reference: Path, tensor: str, feeds: list[dict]) -> float:
    expected, actual = tensor_values(reference, tensor, feeds), tensor_values(quantized, tensor, feeds)
    return float(10 * np.log10((expected**2).sum() / ((actual - expected) ** 2).sum()))


@pytest.fixture(scope="module")
def cnn_run(tmp_path_factory) -> tuple[Path, Path, onnxq.pipeline.QuantizationResult]:
    """The tiny CNN at 3 bits (stored in INT4) with conv1 at 8 and fc at 2, by round-to-nearest."""
    folder = tmp_path_factory.mktemp("cnn")
    reference = save(tiny.cnn_model(), folder / "cnn.onnx")
    result = onnxq.quantize(reference, cnn_feeds(), folder / "q.onnx", bits=3, method="rtn",
                            bits_per_layer={"conv1": 8, "fc": 2})
    return reference, folder / "q.onnx", result


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory) -> tuple[Path, Path, onnxq.pipeline.QuantizationResult]:
    """The tiny CNN with CLADO widths, so a sensitivity matrix is available."""
    folder = tmp_path_factory.mktemp("mixed")
    reference = save(tiny.cnn_model(), folder / "cnn.onnx")
    result = onnxq.quantize(reference, cnn_feeds(), folder / "q.onnx", method="rtn", budget=Budget(avg_bits=3.5),
                            clado_samples=16)
    return reference, folder / "q.onnx", result


@pytest.mark.parametrize("builder, feeds, layer, tensor", [
    (tiny.cnn_model, cnn_feeds, "conv2_grouped", "c2"),
    (tiny.cnn_model, cnn_feeds, "conv1", "bn"),  # BatchNorm folded into conv1: its output is the BN output
    (tiny.mlp_model, mlp_feeds, "matmul/MatMulAddFusion", "h"),  # MatMul + Add fused into a Gemm by prepare
    (tiny.mlp_model, mlp_feeds, "gemm", "logits"),
])
def test_layer_sqnr_matches_independent_computation(tmp_path, builder, feeds, layer, tensor):
    reference = save(builder(), tmp_path / "float.onnx")
    data = feeds()
    onnxq.quantize(reference, data, tmp_path / "q.onnx", bits=4, method="rtn")
    rows = {row["name"]: row for row in layer_diagnostics(tmp_path / "q.onnx", reference, data[:3])}
    assert rows[layer]["output"] == tensor
    assert rows[layer]["samples"] == sum(len(f["x"]) for f in data[:3])
    expected = independent_sqnr(tmp_path / "q.onnx", reference, tensor, data[:3])
    assert 5 < expected < 60
    assert rows[layer]["output_sqnr_db"] == pytest.approx(expected, abs=1e-3)


def test_widths_errors_and_sizes(cnn_run):
    reference, quantized, result = cnn_run
    model = prepare(onnx.load(str(reference)))
    layers, _ = find_layers(model)
    stats = calibrate(model, layers, cnn_feeds())
    grams = {name: s.centred_gram for name, s in stats.items()}  # every layer has a bias: errors are centred
    rows = layer_diagnostics(quantized, reference, cnn_feeds()[:2], grams=grams)
    assert [r["name"] for r in rows] == [r.name for r in result.layers]
    for row, expected in zip(rows, result.layers, strict=True):
        assert (row["bits"], row["stored_bits"]) == (expected.bits, expected.stored_bits)
        assert row["gram_error"] == pytest.approx(expected.relative_error, rel=1e-4)  # from the stored codes
        assert 0 < row["weight_error"] < 1
        assert row["code_bytes"] == -(-expected.params * expected.stored_bits // 8)
        assert row["size_share"] == pytest.approx(row["code_bytes"] / quantized.stat().st_size)
        assert row["sensitivity"] is None
    assert [(r["bits"], r["stored_bits"]) for r in rows] == [(8, 8), (3, 4), (3, 4), (2, 2)]
    # with identity Gram matrices the weighted error is the plain one
    eye = {r["name"]: np.eye(int(np.prod(r["shape"][1:])) if r["op_type"] == "Conv" else r["shape"][1])
           for r in rows}
    for row in layer_diagnostics(quantized, reference, cnn_feeds()[:1], grams=eye):
        assert row["gram_error"] == pytest.approx(row["weight_error"], rel=1e-9)


def test_sensitivity_is_omega_diagonal_at_chosen_width(mixed_run):
    reference, quantized, result = mixed_run
    plan = result.mixed
    rows = layer_diagnostics(quantized, reference, cnn_feeds()[:1], plan=plan)
    diagonal = dict(zip(plan.keys, np.diag(plan.omega), strict=True))
    for row in rows:
        assert row["bits"] == plan.bits[row["name"]]
        assert row["sensitivity"] == pytest.approx(diagonal[(row["name"], row["bits"])])


def full_context(mixed_run) -> dict:
    reference, quantized, result = mixed_run
    rows = layer_diagnostics(quantized, reference, cnn_feeds()[:2], plan=result.mixed)
    evaluation = {"samples": 8, "agreement": 87.5, "mean_kl": 0.0123, "sqnr_db": 17.25, "cosine": 0.99,
                  "max_error": 0.5, "top1": 61.0, "top5": 90.0, "reference_top1": 64.0, "reference_top5": 91.0}
    curve = [{"series": "CLADO", "label": f"{b} bits", "size_bytes": 1000 + 200 * b, "top1": 40.0 + 3 * b}
             for b in (2, 3, 4, 8)]
    return report_context(quantized, reference, rows, evaluation, result.mixed, curve)


def test_html_report_is_self_contained_with_every_section(tmp_path, mixed_run):
    context = full_context(mixed_run)
    write_report(tmp_path / "r.html", context)
    page = (tmp_path / "r.html").read_text()
    assert not re.search(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/", page, re.I)  # nothing fetched from the network
    assert "<link" not in page and "<script" not in page
    for section in SECTIONS:
        assert f'<section id="{section}">' in page
    sources = re.findall(r'src="([^"]*)"', page)
    assert len(sources) == 4  # widths, SQNR, sensitivity heat map, curve
    for source in sources:
        assert source.startswith("data:image/png;base64,")
        assert base64.b64decode(source.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    for row in context["layers"]:
        assert row["name"] in page and f"{row['output_sqnr_db']:.2f}" in page
    assert "61.00" in page and "64.00" in page  # top-1 of the quantized and reference models
    assert not list(tmp_path.glob(".*tmp"))


def test_html_report_without_optional_parts(tmp_path, cnn_run):
    reference, quantized, _ = cnn_run
    context = report_context(quantized, reference, layer_diagnostics(quantized, reference, cnn_feeds()[:1]))
    write_report(tmp_path / "r.html", context)
    page = (tmp_path / "r.html").read_text()
    for section in SECTIONS:
        assert f'<section id="{section}">' in page
    assert len(re.findall(r'src="data:image/png', page)) == 2
    assert "onnxq eval --report" in page and "--avg-bits" in page


def test_json_report_has_the_same_numbers(tmp_path, mixed_run):
    context = full_context(mixed_run)
    write_report_json(tmp_path / "r.json", context)
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["sizes"] == context["sizes"] and data["eval"] == context["eval"] and data["curve"] == context["curve"]
    assert data["average_bits"] == pytest.approx(context["average_bits"])
    for got, row in zip(data["layers"], context["layers"], strict=True):
        for key in ("name", "bits", "stored_bits", "output_sqnr_db", "weight_error", "size_share", "sensitivity"):
            assert got[key] == row[key]
    assert np.array_equal(np.array(data["sensitivity"]["omega"]), context["sensitivity"]["omega"])
    assert data["sensitivity"]["chosen"] == context["sensitivity"]["chosen"]


def test_missing_matplotlib_is_a_clear_error(tmp_path, monkeypatch, cnn_run):
    reference, quantized, _ = cnn_run
    context = report_context(quantized, reference, [])
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # makes the import fail
    with pytest.raises(OnnxqError, match=r"pip install 'onnxq\[report\]'"):
        write_report(tmp_path / "r.html", context)
    assert not list(tmp_path.iterdir())
    write_report_json(tmp_path / "r.json", context)  # the JSON needs no matplotlib


def test_report_into_a_missing_folder(tmp_path, cnn_run):
    reference, quantized, _ = cnn_run
    with pytest.raises(OnnxqError, match="does not exist"):
        write_report_json(tmp_path / "nope" / "r.json", report_context(quantized, reference, []))


def test_eval_cli_writes_both_reports(tmp_path, cnn_run):
    reference, quantized, _ = cnn_run
    data = tmp_path / "data"
    data.mkdir()
    for i, feed in enumerate(cnn_feeds(3, seed=5)):
        np.save(data / f"{i}.npy", feed["x"])
    out = subprocess.run([sys.executable, "-m", "onnxq", "eval", quantized, "--reference", reference, "--data", data,
                          "--report", tmp_path / "r.html", "--report-json", tmp_path / "r.json",
                          "--diagnostic-samples", "12", "-q"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "output SQNR" in out.stdout
    figures = json.loads((tmp_path / "r.json").read_text())
    assert figures["eval"]["samples"] == 12 and figures["layers"][0]["samples"] == 12
    assert [r["bits"] for r in figures["layers"]] == [8, 3, 3, 2]
    # the last layer's output is the model output: the same SQNR as the evaluation's on the same samples
    assert figures["layers"][-1]["output_sqnr_db"] == pytest.approx(figures["eval"]["sqnr_db"], abs=1e-3)
    assert '<section id="sqnr">' in (tmp_path / "r.html").read_text()


@pytest.mark.skipif(not CHROMIUM.exists(), reason="chromium is not installed (apt-get install chromium)")
def test_report_renders_in_a_headless_browser(tmp_path, mixed_run):
    write_report(tmp_path / "r.html", full_context(mixed_run))
    png = tmp_path / "shot.png"
    subprocess.run([str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={png}", "--window-size=1200,2400",
                    (tmp_path / "r.html").as_uri()], capture_output=True, timeout=120, check=True)
    pixels = np.asarray(Image.open(png).convert("RGB")).reshape(-1, 3).astype(np.int32)
    colours = np.unique((pixels[:, 0] << 16) | (pixels[:, 1] << 8) | pixels[:, 2])
    assert len(colours) > 500  # plots, not a blank or text-only page
    saturated = (pixels.max(axis=1) - pixels.min(axis=1)) > 80
    assert saturated.mean() > 0.01  # coloured bars and the heat map are drawn


def test_any_model_two_inputs_no_classifier(tmp_path):
    reference = save(tiny.two_input_model(), tmp_path / "float.onnx")
    rng = np.random.default_rng(0)
    feeds = [{n: rng.normal(size=(5, 6)).astype(np.float32) for n in ("a", "b")} for _ in range(3)]
    onnxq.quantize(reference, feeds, tmp_path / "q.onnx", bits=2, method="rtn")
    rows = layer_diagnostics(tmp_path / "q.onnx", reference, feeds)
    assert [(r["name"], r["output"], r["samples"]) for r in rows] == [("matmul", "y", 15)]
    assert rows[0]["output_sqnr_db"] == pytest.approx(independent_sqnr(tmp_path / "q.onnx", reference, "y", feeds),
                                                      abs=1e-3)
    evaluation = {"samples": 15, "agreement": None, "mean_kl": None, "sqnr_db": 9.0, "cosine": 0.9, "max_error": 1.0}
    write_report(tmp_path / "r.html", report_context(tmp_path / "q.onnx", reference, rows, evaluation))
    page = (tmp_path / "r.html").read_text()
    assert "output SQNR dB" in page and "top-1" not in page


@pytest.mark.parametrize("options", [{"block_size": 16}, {"matmul_nbits": True}])
def test_blocked_and_matmul_nbits_weights(tmp_path, options):
    reference = save(tiny.two_input_model(features=40), tmp_path / "float.onnx")
    rng = np.random.default_rng(0)
    feeds = [{n: rng.normal(size=(8, 40)).astype(np.float32) for n in ("a", "b")} for _ in range(3)]
    result = onnxq.quantize(reference, feeds, tmp_path / "q.onnx", bits=4, method="rtn", **options)
    model = prepare(onnx.load(str(reference)))
    layers, _ = find_layers(model)
    grams = {name: s.normalised_gram for name, s in calibrate(model, layers, feeds).items()}
    [row] = layer_diagnostics(tmp_path / "q.onnx", reference, feeds, grams=grams)
    assert row["gram_error"] == pytest.approx(result.layers[0].relative_error, rel=1e-5)
    assert row["output_sqnr_db"] == pytest.approx(independent_sqnr(tmp_path / "q.onnx", reference, "y", feeds),
                                                  abs=1e-3)
