"""Sequential, error-compensating rounding: the compensated target against least squares, the paired
statistics against the unfolded inputs, the stage split, and the exported model's output error."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tiny
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

import onnxq
from onnxq.allocation.mixed import Budget
from onnxq.calibration.calibrate import is_pointwise
from onnxq.calibration.unfold import unfold
from onnxq.data.calibration_set import CalibrationSet
from onnxq.data.sources import model_inputs
from onnxq.graph.layers import Layer, find_layers
from onnxq.passes.compensation import compensated_target
from onnxq.rounding.sequential import PairedStats, compensated_bias_shift, residual_skips, stages


def centred_moments(Xq: np.ndarray, Xf: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(cov(X~), cov(X~, X))`` computed directly from rows."""
    cq, cf = Xq - Xq.mean(axis=0), Xf - Xf.mean(axis=0)
    return (cq.T @ cq / len(Xq))[None], (cq.T @ cf / len(Xq))[None]


def noisy_inputs(seed: int, noise: float) -> tuple[np.random.Generator, np.ndarray, np.ndarray, np.ndarray]:
    """``(rng, X, X~, W)``: float rows with a mean, the same rows plus noise, and a weight."""
    rng = np.random.default_rng(seed)
    Xf = rng.normal(size=(300, 6)) + rng.normal(size=6)
    Xq = Xf + noise * rng.normal(size=Xf.shape)
    return rng, Xf, Xq, rng.normal(size=(4, 6))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), noise=st.floats(0.01, 1.0))
def test_target_is_the_least_squares_weight_on_quantized_inputs(seed, noise):
    """Without ridge, W* solves min_Q ||X W^T - X~ Q^T - b||^2 (lstsq on centred rows, an independent path)."""
    _, Xf, Xq, W = noisy_inputs(seed, noise)
    S, C = centred_moments(Xq, Xf)
    target = compensated_target(W, S, C, damp=0.0)
    cq, cf = Xq - Xq.mean(axis=0), Xf - Xf.mean(axis=0)
    expected = np.linalg.lstsq(cq, cf @ W.T, rcond=None)[0].T
    assert np.allclose(target, expected, atol=1e-8 * max(1.0, np.abs(expected).max()))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), noise=st.floats(0.01, 1.0))
def test_residual_target_also_absorbs_the_skip_error(seed, noise):
    """With the skip's error e: W* solves min_Q ||X W^T + e - X~ Q^T - b||^2 (lstsq, independent path)."""
    rng, Xf, Xq, W = noisy_inputs(seed, noise)
    e = Xq[:, :4] * noise + rng.normal(size=(300, 4)) * noise  # partly explained by X~
    S, C = centred_moments(Xq, Xf)
    cq, ce = Xq - Xq.mean(axis=0), e - e.mean(axis=0)
    target = compensated_target(W, S, C, damp=0.0, skip=cq.T @ ce / len(Xq))
    expected = np.linalg.lstsq(cq, (Xf - Xf.mean(axis=0)) @ W.T + ce, rcond=None)[0].T
    assert np.allclose(target, expected, atol=1e-8 * max(1.0, np.abs(expected).max()))


def test_target_is_the_weight_when_the_inputs_are_the_float_ones():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(10, 8))  # fewer rows than inputs: S is singular, the ridge must not move W
    S, C = centred_moments(X, X)
    W = rng.normal(size=(3, 8))
    assert np.array_equal(compensated_target(W, S, C), W)


@pytest.mark.parametrize(("kernel", "group"), [(3, 2), (1, 1)])  # 1x1: the pointwise path, no im2col
def test_paired_stats_match_the_unfolded_inputs(kernel, group):
    model = tiny.conv_model(cin=4, cout=6, group=group, kernel=kernel, pad=kernel // 2)
    layer = find_layers(model)[0][0]
    assert is_pointwise(layer) == (kernel == 1)
    rng = np.random.default_rng(1)
    xf = rng.normal(size=(3, 4, 7, 7)).astype(np.float32)
    xq = (xf + 0.1 * rng.normal(size=xf.shape)).astype(np.float32)
    stats = PairedStats.empty(layer)
    stats.merge(xq, xf, layer, None)
    rq, rf = unfold(layer, xq).astype(np.float64), unfold(layer, xf).astype(np.float64)
    gram, cross = np.matmul(rq.transpose(0, 2, 1), rq), np.matmul(rq.transpose(0, 2, 1), rf)
    assert np.allclose(stats.gram, gram, atol=1e-5 * np.abs(gram).max())  # float32 products, float64 sums
    assert np.allclose(stats.cross, cross, atol=1e-5 * np.abs(cross).max())
    assert np.allclose(stats.mean_quantized, rq.mean(axis=1), atol=1e-6)
    assert stats.rows == rq.shape[1]
    W = rng.normal(size=(6, layer.fan_in))
    Q = W + 0.1
    # the bias shift is the mean of the float output minus the quantized layer's, per channel
    groups = np.repeat(np.arange(group), 6 // group)
    expected = [(rf[g] @ W[o]).mean() - (rq[g] @ Q[o]).mean() for o, g in enumerate(groups)]
    assert np.allclose(compensated_bias_shift(W, Q, stats), expected, atol=1e-5)


@pytest.mark.parametrize("op", ["Conv", "MatMul"])
def test_paired_stats_gather_the_skip_error_per_output_row(op):
    """sum x~ e^T pairs each input pixel (token) with the same output pixel (token); the bias takes mean(e)."""
    rng = np.random.default_rng(3)
    if op == "Conv":
        layer = find_layers(tiny.conv_model(cin=4, cout=6, kernel=1, pad=0))[0][0]
        xq, error = rng.normal(size=(3, 4, 5, 5)), rng.normal(size=(3, 6, 5, 5))
        rows_q, rows_e = xq.transpose(0, 2, 3, 1).reshape(-1, 4), error.transpose(0, 2, 3, 1).reshape(-1, 6)
    else:
        layer = Layer(name="m", op_type="MatMul", weight="w", activation="x", shape=(4, 6), transposed=True)
        xq, error = rng.normal(size=(3, 7, 4)), rng.normal(size=(3, 7, 6))
        rows_q, rows_e = xq.reshape(-1, 4), error.reshape(-1, 6)
    stats = PairedStats.empty(layer)
    stats.merge(xq.astype(np.float32), xq.astype(np.float32), layer, None, error.astype(np.float32))
    cq = rows_q - rows_q.mean(axis=0)
    assert np.allclose(stats.skip_covariance(True), cq.T @ (rows_e - rows_e.mean(axis=0)) / len(rows_q), atol=1e-5)
    W = rng.normal(size=(6, 4))
    assert np.allclose(compensated_bias_shift(W, W, stats), rows_e.mean(axis=0), atol=1e-6)


def residual_model() -> onnx.ModelProto:
    """x -> a -> s; s -> b -> Relu -> c (+ bias Add) -> Add(s) -> d: c's output is added to the skip s."""
    rng = np.random.default_rng(0)
    inits = [tiny._init(n, rng.normal(size=(8, 8)) * 0.5) for n in ("wa", "wb", "wc", "wd")]
    inits.append(tiny._init("bc", rng.normal(size=8)))
    nodes = [helper.make_node("MatMul", ["x", "wa"], ["s"], name="a"),
             helper.make_node("MatMul", ["s", "wb"], ["h"], name="b"),
             helper.make_node("Relu", ["h"], ["hr"]),
             helper.make_node("MatMul", ["hr", "wc"], ["c0"], name="c"),
             helper.make_node("Add", ["c0", "bc"], ["c1"]),
             helper.make_node("Add", ["c1", "s"], ["r"]),
             helper.make_node("MatMul", ["r", "wd"], ["y"], name="d")]
    return tiny._model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])], inits)


def test_residual_layers_are_found_through_a_bias_add():
    model = residual_model()
    assert residual_skips(model, find_layers(model)[0]) == {"c": "s"}
    # two branches of one stage: each is the other's skip (round_sequentially uses a skip only once every
    # layer it depends on is rounded, so neither absorbs the other's error here)
    assert residual_skips(branching_model(), find_layers(branching_model())[0]) == {"a": "b", "b": "a"}
    chain = tiny.mlp_model()
    assert residual_skips(chain, find_layers(chain)[0]) == {}


def test_residual_layer_repairs_the_skip_error(tmp_path, monkeypatch):
    """At 2 bits, c absorbing the error a left in the skip lowers the error of the block output r."""
    model = residual_model()
    model.graph.output.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, ["N", 8]))
    onnx.save(model, tmp_path / "m.onnx")
    x = np.random.default_rng(2).normal(size=(512, 8)).astype(np.float32)
    reference = ort.InferenceSession(str(tmp_path / "m.onnx")).run(["r"], {"x": x})[0]
    energy = {}
    for residual in (False, True):
        if not residual:
            monkeypatch.setattr("onnxq.rounding.sequential.residual_skips", lambda *_: {})
        else:
            monkeypatch.undo()
        out = tmp_path / f"q{int(residual)}.onnx"
        onnxq.quantize(tmp_path / "m.onnx", [{"x": x}], out, bits=2, sequential=True)
        energy[residual] = float(((ort.InferenceSession(str(out)).run(["r"], {"x": x})[0] - reference) ** 2).sum())
    assert energy[True] < 0.85 * energy[False]  # measured 1123 -> 889


def branching_model() -> onnx.ModelProto:
    """x feeds two MatMuls (one stage), whose sum feeds a third (the next stage)."""
    rng = np.random.default_rng(0)
    inits = [tiny._init(n, rng.normal(size=(6, 6))) for n in ("wa", "wb", "wc")]
    nodes = [helper.make_node("MatMul", ["x", "wa"], ["a"], name="a"),
             helper.make_node("MatMul", ["x", "wb"], ["b"], name="b"),
             helper.make_node("Add", ["a", "b"], ["s"], name="add"),
             helper.make_node("MatMul", ["s", "wc"], ["y"], name="c")]
    return tiny._model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6])], inits)


def test_stages_group_layers_that_do_not_feed_each_other():
    model = branching_model()
    assert [[layer.name for layer in stage] for stage in stages(model, find_layers(model)[0])] == [["a", "b"], ["c"]]
    cnn = tiny.cnn_model()
    assert [len(stage) for stage in stages(cnn, find_layers(cnn)[0])] == [1, 1, 1, 1]


def output_error_energy(path, model: onnx.ModelProto, x: np.ndarray) -> float:
    reference = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    quantized = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return float(((quantized.run(None, {"x": x})[0] - reference.run(None, {"x": x})[0]) ** 2).sum())


def test_sequential_rounding_compensates_the_earlier_layers(tmp_path):
    """The first layer sees float inputs either way (same codes); the last one, rounded on the quantized
    model's inputs towards the float outputs, leaves a smaller output error on the calibration data."""
    model = tiny.mlp_model(features=16, hidden=32, classes=8)
    onnx.save(model, tmp_path / "m.onnx")
    x = np.random.default_rng(2).normal(size=(256, 16)).astype(np.float32)
    energy, codes = {}, {}
    for sequential in (False, True):
        out = tmp_path / f"q{int(sequential)}.onnx"
        onnxq.quantize(tmp_path / "m.onnx", [{"x": x}], out, bits=2, sequential=sequential)
        energy[sequential] = output_error_energy(out, model, x)
        written = onnx.load(out)
        inits = {t.name: onnx.numpy_helper.to_array(t) for t in written.graph.initializer}
        codes[sequential] = inits["mm_w_quantized"]
        assert ("onnxq.sequential" in {p.key for p in written.metadata_props}) == sequential
    assert np.array_equal(codes[False], codes[True])
    assert energy[True] < 0.9 * energy[False]


def test_a_budget_verifies_and_keeps_sequentially_rounded_allocations(tmp_path):
    """With a budget, the allocations verification compares are rounded sequentially, the lowest measured loss
    is kept, and the file holds exactly the sequential rounding of the kept widths."""
    model = tiny.mlp_model(features=16, hidden=32, classes=8)
    onnx.save(model, tmp_path / "m.onnx")
    x = np.random.default_rng(2).normal(size=(64, 16)).astype(np.float32)
    result = onnxq.quantize(tmp_path / "m.onnx", [{"x": x}], tmp_path / "q.onnx", budget=Budget(avg_bits=3.0),
                            bit_choices=(2, 4), sequential=True, verify_samples=64, clado_samples=32)
    plan = result.mixed
    assert plan.verified and plan.verified[plan.picked] == min(plan.verified.values())
    assert {r.name: r.bits for r in result.layers} == plan.bits
    assert result.average_bits(stored=True) <= 3.0
    onnxq.quantize(tmp_path / "m.onnx", [{"x": x}], tmp_path / "replay.onnx", bits_per_layer=plan.bits,
                   sequential=True)
    written, replayed = (onnx.load(tmp_path / name) for name in ("q.onnx", "replay.onnx"))
    for a, b in zip(written.graph.initializer, replayed.graph.initializer, strict=True):
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(a), onnx.numpy_helper.to_array(b))


def test_calibration_batches_can_be_read_on_every_pass_from_a_list_or_a_one_shot_generator():
    """Sequential rounding reads the calibration batches once per rounding: the calibration set reads the
    source once (a generator too) and gives the same batches on every pass."""
    model = tiny.mlp_model(features=16, hidden=32, classes=8)
    inputs = model_inputs(model)
    rng = np.random.default_rng(4)
    arrays = [rng.normal(size=(n, 16)).astype(np.float32) for n in (5, 7)]
    for calib in ([{"x": a} for a in arrays], ({"x": a} for a in arrays)):
        data = CalibrationSet(calib, inputs, batch_size=4, calib_size=None, memory_limit=64)
        feeds = data.calibration_batches()
        passes = [np.concatenate([feed["x"] for feed in feeds]) for _ in range(2)]
        for seen in passes:
            np.testing.assert_array_equal(seen, np.concatenate(arrays))
        assert data.samples == 12 and data.reads == 1


def test_sequential_rounding_reads_a_generator_as_it_reads_a_list(tmp_path):
    model = tiny.mlp_model(features=16, hidden=32, classes=8)
    onnx.save(model, tmp_path / "m.onnx")
    x = np.random.default_rng(2).normal(size=(64, 16)).astype(np.float32)
    onnxq.quantize(tmp_path / "m.onnx", [{"x": x}], tmp_path / "list.onnx", bits=2, sequential=True, batch_size=64)
    result = onnxq.quantize(tmp_path / "m.onnx", ({"x": batch} for batch in [x]), tmp_path / "gen.onnx", bits=2,
                            sequential=True, batch_size=64)
    assert result.calibration_samples == 64
    written, replayed = (onnx.load(tmp_path / name) for name in ("list.onnx", "gen.onnx"))
    for a, b in zip(written.graph.initializer, replayed.graph.initializer, strict=True):
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(a), onnx.numpy_helper.to_array(b))
