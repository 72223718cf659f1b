"""Degenerate numbers: constant layer inputs (the data sees nothing), huge values, non-finite statistics."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tiny
from conftest import save
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import numpy_helper

import onnxq
from onnxq.errors import OnnxqError
from onnxq.passes import Grid, comq, gptq, objective, relative_error, rtn
from onnxq.passes.gram import centred_gram, psd_part, scaled_matmul
from onnxq.passes.grid import SUPPORTED_BITS

pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")
PASSES = {"rtn": rtn.quantize, "gptq": gptq.quantize, "comq": comq.quantize,
          "comq-rtn": lambda W, H, g: comq.quantize(W, H, g, init="rtn", order="channel")}


def psd(rng: np.random.Generator, d: int, kind: str) -> np.ndarray:
    """A d x d PSD matrix: zero, rank one, low rank with a constant input, or full rank."""
    if kind == "zero":
        return np.zeros((d, d))
    if kind == "rank_one":
        v = rng.standard_normal(d) * 10.0 ** rng.uniform(-3, 3)
        return np.outer(v, v)
    X = rng.standard_normal((2 if kind == "low_rank" else 3 * d, d))
    X[:, 0] = 1.0  # a constant input: after centring it is exactly dead
    return centred_gram((X.T @ X / len(X))[None], X.mean(axis=0)[None])[0]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2**32 - 1), st.integers(1, 9), st.integers(1, 20), st.sampled_from(SUPPORTED_BITS),
       st.booleans(), st.sampled_from(("zero", "rank_one", "low_rank", "full")))
def test_every_pass_on_any_psd_gram(seed, out, d, bits, symmetric, kind):
    """Finite codes on the grid for every PSD S; COMQ's descent never ends above its start (RTN or GPTQ), and on
    S = 0 (the data sees nothing) every pass is round-to-nearest, the weight-MSE fallback."""
    rng = np.random.default_rng(seed)
    W, H, grid = rng.standard_t(4, size=(out, d)), psd(rng, d, kind), Grid(bits, symmetric)
    results = {name: fn(W, H, grid) for name, fn in PASSES.items()}
    for qw in results.values():
        assert qw.codes.min() >= grid.qmin and qw.codes.max() <= grid.qmax
        assert np.isfinite(qw.dequantize()).all() and (qw.scale > 0).all()
    cost = {name: objective(W, qw.dequantize(), H) for name, qw in results.items()}
    tol = 1e-9 * max(cost["rtn"], 1e-300)
    assert cost["comq-rtn"] <= cost["rtn"] + tol
    assert cost["comq"] <= objective(W, gptq.quantize(W, H, grid).dequantize(), H) + tol
    if kind == "zero":
        for qw in results.values():
            np.testing.assert_array_equal(qw.codes, results["rtn"].codes)


@pytest.mark.parametrize("d", (8, 100))  # the batched and the in-place LAPACK Cholesky
def test_gptq_on_cancellation_noise(d):
    """An indefinite matrix of rounding noise (a centred Gram computed naively) gives GPTQ's RTN, not LinAlgError."""
    rng = np.random.default_rng(d)
    noise = rng.standard_normal((d, d)) * 1e-17
    H = noise + noise.T
    W = rng.standard_normal((6, d))
    assert np.linalg.eigvalsh(H).min() < -0.1 * np.abs(np.diagonal(H)).mean() * d  # beyond any diagonal damping
    qw = gptq.quantize(W, H, Grid(4))
    np.testing.assert_array_equal(qw.codes, rtn.quantize(W, None, Grid(4)).codes)
    assert np.isfinite(comq.quantize(W, H, Grid(4)).dequantize()).all()


def test_psd_part_keeps_signal_and_drops_noise():
    rng = np.random.default_rng(0)
    v = rng.standard_normal(12)
    noise = rng.standard_normal((12, 12)) * 1e-9
    kept = psd_part((np.outer(v, v) + noise + noise.T)[None])[0]
    np.testing.assert_allclose(kept, np.outer(v, v), atol=1e-7)
    assert np.linalg.matrix_rank(kept, tol=1e-6) == 1


def test_centred_gram_zeroes_constant_inputs_only():
    rng = np.random.default_rng(1)
    X = rng.standard_normal((50, 5)).astype(np.float32) + 3.0
    X[:, 2] = 7.25  # constant
    second = (X.astype(np.float32).T @ X.astype(np.float32)).astype(np.float64)[None] / len(X)
    mean = X.astype(np.float64).mean(axis=0)[None]
    C = centred_gram(second, mean)[0]
    assert not C[2].any() and not C[:, 2].any()
    reference = np.cov(X.astype(np.float64).T, bias=True)
    keep = [0, 1, 3, 4]
    np.testing.assert_allclose(C[np.ix_(keep, keep)], reference[np.ix_(keep, keep)], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("magnitude", (1.0, 1e25, 1e36))
def test_scaled_matmul_does_not_overflow(magnitude):
    rng = np.random.default_rng(2)
    X = (rng.standard_normal((300, 7)) * magnitude).astype(np.float32)
    G = scaled_matmul(X.T, X)
    reference = X.astype(np.float64).T @ X.astype(np.float64)
    assert np.isfinite(G).all()
    np.testing.assert_allclose(G, reference, rtol=1e-5, atol=1e-5 * np.abs(reference).max())
    if magnitude == 1.0:  # the ordinary path is the plain float32 GEMM, bit for bit
        np.testing.assert_array_equal(G, X.T @ X)


def test_relative_error_is_scale_free_and_never_silently_zero():
    rng = np.random.default_rng(3)
    W, H = rng.standard_normal((4, 6)), np.cov(rng.standard_normal((6, 40)))
    Q = rtn.quantize(W, None, Grid(3)).dequantize()
    base = relative_error(W, Q, H)
    assert 0 < base < 1
    assert relative_error(W * 1e30, Q.astype(np.float64) * 1e30, H * 1e60) == pytest.approx(base, rel=1e-9)
    assert np.isnan(relative_error(W, Q, np.full_like(H, np.nan)))
    mse = ((W - Q) ** 2).sum() / (W**2).sum()
    assert relative_error(W, Q, np.zeros_like(H)) == pytest.approx(mse)  # unseen: the weight MSE it minimised


# --- end to end ---------------------------------------------------------------------------------------


def cnn_with(scale: dict[str, float] | None = None, model: onnx.ModelProto | None = None) -> onnx.ModelProto:
    """The tiny CNN (or ``model``) with some initializers multiplied by a factor (0 zeroes a layer)."""
    model = model or tiny.cnn_model()
    for tensor in model.graph.initializer:
        if scale and tensor.name in scale:
            values = numpy_helper.to_array(tensor) * np.float32(scale[tensor.name])
            tensor.CopyFrom(numpy_helper.from_array(values.astype(np.float32), tensor.name))
    return model


def sample_folder(path, samples: list[np.ndarray]):
    path.mkdir()
    for i, x in enumerate(samples):
        np.save(path / f"{i:02d}.npy", x)
    return path


def sqnr(path, reference, feed) -> float:
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    want = ort.InferenceSession(reference.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    return 10 * np.log10((want.astype(np.float64) ** 2).sum() / ((got - want).astype(np.float64) ** 2).sum())


@pytest.fixture(scope="module")
def constant_cases(tmp_path_factory):
    """(model, calibration folder, options) for each way a layer's input can be constant on the data."""
    tmp = tmp_path_factory.mktemp("constant")
    rng = np.random.default_rng(4)
    x = rng.standard_normal((1, 3, 16, 16)).astype(np.float32)
    varied = sample_folder(tmp / "varied", [rng.standard_normal((1, 3, 16, 16)).astype(np.float32)
                                            for _ in range(6)])
    return {
        "calib-size 1": (save(cnn_with(), tmp / "cnn.onnx"), varied, {"calib_size": 1}),
        "identical samples": (save(cnn_with(), tmp / "cnn2.onnx"), sample_folder(tmp / "same", [x] * 5), {}),
        "zero conv before gemm": (save(cnn_with({"dw_w": 0.0}), tmp / "zero.onnx"), varied, {}),
    }


@pytest.mark.parametrize("case", ("calib-size 1", "identical samples", "zero conv before gemm"))
@pytest.mark.parametrize("method", ("comq", "gptq", "rtn"))
@pytest.mark.parametrize("sequential", (False, True))
def test_constant_inputs_give_a_model_and_a_warning(constant_cases, tmp_path, caplog, case, method, sequential):
    model_path, calib, extra = constant_cases[case]
    for bits in SUPPORTED_BITS:
        out = tmp_path / f"q{bits}.onnx"
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="onnxq"):
            result = onnxq.quantize(model_path, calib, out, bits=bits, method=method, sequential=sequential,
                                    **extra)
        assert "does not vary any input of 1 layer(s): fc (16 of 16)" in caplog.text
        assert result.output_sqnr_db is not None and result.output_sqnr_db > {2: 0, 3: 5, 4: 10, 8: 25}[bits]
        assert all(np.isfinite(r.relative_error) for r in result.layers)


def test_huge_weights_quantize_like_ordinary_ones(tmp_path, cnn_calib):
    """BatchNorm scale and every bias x1e30 (the folded conv1 weights x1e30, every activation near 1e30, Gram
    entries near 1e60; ReLU keeps the model exactly homogeneous): the same relative errors as the unscaled
    model, and an output as close to the float model's."""
    plain = cnn_with()
    huge = cnn_with({name: 1e30 for name in ("bn_scale", "bn_bias", "c2_b", "dw_b", "fc_b")})
    feed = {"x": np.load(sorted(cnn_calib.iterdir())[0])}
    runs = {}
    for name, model in (("plain", plain), ("huge", huge)):
        out = tmp_path / f"{name}_q.onnx"
        result = onnxq.quantize(save(model, tmp_path / f"{name}.onnx"), cnn_calib, out, method="comq")
        runs[name] = ([r.relative_error for r in result.layers], sqnr(out, model, feed))
    np.testing.assert_allclose(runs["huge"][0], runs["plain"][0], rtol=0.05)
    assert runs["huge"][0][0] > 1e-4  # a real error, not the 0.00 of an overflowed Gram
    assert runs["huge"][1] > runs["plain"][1] - 3.0


def test_inputs_that_overflow_float32_gram_sums(tmp_path):
    """Inputs near 1e25 (biases too, so the model stays homogeneous): x^T x passes float32's range, yet the
    layers round as they do at unit scale."""
    rng = np.random.default_rng(5)
    samples = [rng.standard_normal((1, 12)).astype(np.float32) for _ in range(8)]
    errors = {}
    for scale in (1.0, 1e25):
        model = cnn_with({"mm_b": scale, "gemm_b": scale}, tiny.mlp_model())
        path = save(model, tmp_path / "mlp.onnx")
        folder = sample_folder(tmp_path / f"x{scale:g}", [s * np.float32(scale) for s in samples])
        result = onnxq.quantize(path, folder, tmp_path / "q.onnx", method="gptq")
        errors[scale] = [r.relative_error for r in result.layers]
    np.testing.assert_allclose(errors[1e25], errors[1.0], rtol=1e-3)


@pytest.mark.parametrize("sequential", (False, True))
def test_float_model_that_overflows_is_refused_naming_the_layer(tmp_path, cnn_calib, sequential):
    path = save(cnn_with({"c1_w": 1e30, "c1_b": 1e30, "c2_w": 1e30}), tmp_path / "overflow.onnx")
    with pytest.raises(OnnxqError, match=r"conv3_depthwise \(its input is Inf or NaN on the calibration data\)"):
        onnxq.quantize(path, cnn_calib, tmp_path / "o.onnx", sequential=sequential)
    assert not (tmp_path / "o.onnx").exists()


def test_every_non_finite_weight_is_named(tmp_path, cnn_calib):
    model = cnn_with({"c2_w": np.inf, "fc_w": np.nan})
    with pytest.raises(OnnxqError, match=r"weight c2_w of conv2_grouped, weight fc_w of fc contain NaN or Inf"):
        onnxq.quantize(save(model, tmp_path / "bad.onnx"), cnn_calib, tmp_path / "o.onnx")
    assert not (tmp_path / "o.onnx").exists()
