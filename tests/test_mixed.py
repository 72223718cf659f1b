"""Mixed precision end to end on a tiny CNN: budgets hold, the assignment replays, bad budgets fail clearly."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tiny

import onnxq
from onnxq.allocation.mixed import Budget
from onnxq.allocation.oracle import LossOracle, weights_as_inputs
from onnxq.errors import OnnxqError
from onnxq.graph.layers import find_layers
from onnxq.graph.prepare import prepare


def stored_bits(path) -> dict[str, int]:
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    return {name: entry["stored_bits"] for name, entry in json.loads(meta["onnxq.layers"]).items()}


@pytest.mark.parametrize("estimator", ["fast", "exact", "diagonal"])
def test_avg_bits_budget_is_met(tmp_path, cnn_path, cnn_calib, estimator):
    out = tmp_path / "mixed.onnx"
    result = onnxq.quantize(cnn_path, cnn_calib, out, method="rtn", budget=Budget(avg_bits=3.0),
                            sensitivity=estimator, clado_samples=8, bits_json=tmp_path / "bits.json")
    assert result.average_bits(stored=True) <= 3.0 + 1e-9
    params = {r.name: r.params for r in result.layers}
    stored = stored_bits(out)
    assert sum(params[n] * b for n, b in stored.items()) <= 3.0 * sum(params.values())
    assert result.mixed.status == "optimal"
    replay = tmp_path / "replay.onnx"
    onnxq.quantize(cnn_path, cnn_calib, replay, method="rtn", bits_json=tmp_path / "bits.json")
    assert stored_bits(replay) == stored


def test_size_budget_and_infeasible_budgets(tmp_path, cnn_path, cnn_calib):
    out = tmp_path / "m.onnx"
    float_size = cnn_path.stat().st_size
    result = onnxq.quantize(cnn_path, cnn_calib, out, method="rtn", budget=Budget(size_ratio=0.9), clado_samples=4)
    assert out.stat().st_size <= 0.9 * float_size
    assert result.layers
    with pytest.raises(OnnxqError, match="avg-bits"):
        onnxq.quantize(cnn_path, cnn_calib, tmp_path / "x.onnx", method="rtn", budget=Budget(avg_bits=1.5),
                       bit_choices=(2, 4))
    with pytest.raises(OnnxqError, match="size budget"):
        onnxq.quantize(cnn_path, cnn_calib, tmp_path / "x.onnx", method="rtn", budget=Budget(size_mb=1e-6))
    assert not (tmp_path / "x.onnx").exists()


def test_oracle_weights_as_inputs_reproduce_the_model(tmp_path):
    model = prepare(tiny.cnn_model())
    layers, _ = find_layers(model)
    x = np.random.default_rng(0).normal(size=(6, 3, 16, 16)).astype(np.float32)
    oracle = LossOracle(model, layers, [{"x": x}])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = session.run(None, {"x": x})[0]
    np.testing.assert_allclose(oracle.reference, expected, rtol=1e-5, atol=1e-5)
    assert oracle.loss({}) == pytest.approx(0.0, abs=1e-9)
    zeroed = {layers[-1].weight: np.zeros_like(oracle.float_weights[layers[-1].weight])}
    assert oracle.loss(zeroed) > 0


def test_oracle_sessions_take_the_given_thread_count():
    model = prepare(tiny.cnn_model())
    layers, _ = find_layers(model)
    feeds = [{"x": np.random.default_rng(0).normal(size=(2, 3, 16, 16)).astype(np.float32)}]
    default, single = LossOracle(model, layers, feeds), LossOracle(model, layers, feeds, threads=1)
    for oracle, threads in ((default, 0), (single, 1)):
        assert oracle.session.get_session_options().intra_op_num_threads == threads
        assert oracle.constant_session({}).get_session_options().intra_op_num_threads == threads
    np.testing.assert_array_equal(single.reference, default.reference)


def test_weights_as_inputs_moves_only_initializers_and_keeps_their_types():
    model = prepare(tiny.cnn_model())
    layers, _ = find_layers(model)
    names = [layers[0].weight, "x", "not_a_tensor"]  # a graph input and an unknown name are left alone
    fed = weights_as_inputs(model, names)
    inputs = {v.name: v for v in fed.graph.input}
    assert [v.name for v in fed.graph.input].count("x") == 1 and "not_a_tensor" not in inputs
    weight = next(t for t in model.graph.initializer if t.name == layers[0].weight)
    declared = inputs[weight.name].type.tensor_type
    assert declared.elem_type == weight.data_type
    assert [d.dim_value for d in declared.shape.dim] == list(weight.dims)
    assert weight.name not in {t.name for t in fed.graph.initializer}
    assert len(fed.graph.initializer) == len(model.graph.initializer) - 1


def test_whole_allocations_on_constant_weights_match_the_fed_weights():
    model = prepare(tiny.cnn_model())
    layers, _ = find_layers(model)
    rng = np.random.default_rng(1)
    oracle = LossOracle(model, layers, [{"x": rng.normal(size=(4, 3, 16, 16)).astype(np.float32)} for _ in range(2)])
    replaced = {layer.weight: (oracle.float_weights[layer.weight] * rng.uniform(0.5, 1.5)).astype(np.float32)
                for layer in layers}
    fed = oracle.outputs(replaced)
    assert not np.allclose(fed, oracle.reference, rtol=1e-3)
    np.testing.assert_allclose(oracle.constant_outputs(replaced), fed, rtol=1e-5, atol=1e-5 * np.abs(fed).max())
    assert oracle.constant_loss(replaced) == pytest.approx(oracle.loss(replaced), rel=1e-5)


def test_cli_rejects_two_budgets(tmp_path, cnn_path, cnn_calib):
    import subprocess
    import sys
    out = tmp_path / "o.onnx"
    run = subprocess.run([sys.executable, "-m", "onnxq", str(cnn_path), "--calib", str(cnn_calib), "-o", str(out),
                          "--avg-bits", "3", "--size-mb", "1"], capture_output=True, text=True)
    assert run.returncode != 0 and "one budget" in run.stderr and not out.exists()


def test_size_budgets_hold_with_block_wise_scales(tmp_path):
    """Scales and zero points (one per block of 16 inputs, zero points as wide as the codes) are part of what a
    size budget pays for, so every budget between the smallest and the largest model holds on disk."""
    rng = np.random.default_rng(0)
    inits = [onnx.numpy_helper.from_array(rng.normal(size=(64, 64)).astype(np.float32), f"w{i}") for i in range(3)]
    nodes = [onnx.helper.make_node("MatMul", [f"h{i}", f"w{i}"], [f"h{i + 1}"], name=f"mm{i}") for i in range(3)]
    model = tiny._model(nodes, [onnx.helper.make_tensor_value_info("h0", onnx.TensorProto.FLOAT, ["N", 64])],
                        [onnx.helper.make_tensor_value_info("h3", onnx.TensorProto.FLOAT, ["N", 64])], inits)
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    feeds = [{"h0": rng.normal(size=(16, 64)).astype(np.float32)}]
    sizes = {}
    for bits in (2, 8):
        onnxq.quantize(path, feeds, tmp_path / f"w{bits}.onnx", bits=bits, method="rtn", block_size=16)
        sizes[bits] = (tmp_path / f"w{bits}.onnx").stat().st_size
    for fraction in np.linspace(0.15, 0.95, 7):  # the lowest: W2 plus room for the mixed-precision metadata
        budget = (sizes[2] + fraction * (sizes[8] - sizes[2])) / 1e6
        out = tmp_path / f"b{fraction:.2f}.onnx"
        onnxq.quantize(path, feeds, out, method="rtn", block_size=16, budget=Budget(size_mb=budget),
                       bit_choices=(2, 4, 8), sensitivity="diagonal", clado_samples=16)
        assert out.stat().st_size <= budget * 1e6


def test_verification_keeps_the_allocation_that_measures_best():
    """The quadratic model prefers mixing 2 and 8 bits; if uniform 4 measures better, uniform 4 is kept."""
    from onnxq.allocation.mixed import verify
    from onnxq.passes import clado
    from onnxq.passes.budget import uniform_choices

    cands = clado.Candidates.uniform([2, 4, 8], np.array([[2.0, 4.0, 8.0]] * 3))
    omega = np.diag([0.1, 0.5, 0.0] * 3)  # 4 bits predicted as bad as it can be: the solver mixes 2 and 8
    solved = clado.allocate(omega, cands, 12.0)
    assert sorted(solved.bits) != [4, 4, 4]
    assert set(uniform_choices(cands, 12.0)) == {"uniform 4"}
    assert set(uniform_choices(cands, 11.0)) == {"uniform 2"} and uniform_choices(cands, 5.0) == {}
    measured = []

    def measure(bits):
        measured.append(bits)
        return iter([np.full(4, 1.0 if bits == (4, 4, 4) else 2.0 + sum(b == 2 for b in bits))])

    choice, picked, losses, stopped = verify(solved, cands, 12.0, omega, measure)
    assert picked == "uniform 4" and cands.bits_of(choice) == (4, 4, 4)
    assert losses["uniform 4"] == 1.0 and len(measured) == len(set(measured))  # each allocation measured once
    assert stopped == {}  # 4 samples each: too few to stop any
    tie = verify(solved, cands, 12.0, omega, lambda bits: iter([np.ones(4)]))
    assert tie[1] == "solver"


def test_the_race_drops_only_the_clearly_worse_allocation_and_keeps_full_means_for_the_rest():
    from onnxq.passes.budget import DROP_AFTER, race

    rng = np.random.default_rng(0)
    base = rng.gamma(2.0, 0.1, size=256)  # per-sample losses of the best allocation (skewed, as KL is)
    losses = {"best": base, "close": base * 1.03 + rng.normal(0, 0.01, 256), "far": base * 20 + 0.5}
    pulled = {key: 0 for key in losses}

    def stream(key):
        for start in range(0, 256, 16):
            pulled[key] += 1
            yield losses[key][start:start + 16]

    means, samples = race({key: stream(key) for key in losses})
    assert samples == {"best": 256, "close": 256, "far": DROP_AFTER}
    assert pulled["far"] == DROP_AFTER // 16  # its pass stopped: no more batches were run
    assert means["best"] == losses["best"].mean() and means["close"] == losses["close"].mean()
    assert means["far"] == losses["far"][:DROP_AFTER].mean()


def test_verification_oracle_reuses_the_reference_of_the_samples_it_shares():
    model = prepare(tiny.cnn_model())
    layers, _ = find_layers(model)
    rng = np.random.default_rng(2)
    feeds = [{"x": rng.normal(size=(4, 3, 16, 16)).astype(np.float32)} for _ in range(4)]
    sensitivity = LossOracle(model, layers, feeds[:2])
    verifier, fresh = LossOracle(model, layers, feeds), LossOracle(model, layers, feeds)
    assert verifier.share_reference(sensitivity) == 8
    assert verifier.evaluations == 1  # the two batches left ran once
    np.testing.assert_array_equal(verifier.reference, fresh.reference)
    other = LossOracle(model, layers, feeds[2:])
    assert other.share_reference(sensitivity) == 0
    np.testing.assert_array_equal(other.reference, fresh.reference[8:])


def test_per_sample_losses_average_to_the_loss():
    model = prepare(tiny.cnn_model())
    layers, _ = find_layers(model)
    rng = np.random.default_rng(3)
    feeds = [{"x": rng.normal(size=(4, 3, 16, 16)).astype(np.float32)} for _ in range(3)]
    oracle = LossOracle(model, layers, feeds)
    replaced = {layer.weight: (oracle.float_weights[layer.weight] * 1.3).astype(np.float32) for layer in layers}
    outputs = oracle.constant_outputs(replaced)
    batches = list(oracle.constant_sample_losses(replaced))
    assert [len(b) for b in batches] == [4, 4, 4]
    p = np.exp(oracle.reference.astype(np.float64) - oracle.reference.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    q = np.exp(outputs.astype(np.float64) - outputs.max(1, keepdims=True))
    q /= q.sum(1, keepdims=True)
    expected = (p * (np.log(p) - np.log(q))).sum(1)  # KL(float || perturbed) per sample, computed independently
    np.testing.assert_allclose(np.concatenate(batches), expected, rtol=1e-9, atol=1e-12)
    assert oracle.loss_of_outputs(outputs) == np.concatenate(batches).mean()


def test_verified_plan_is_reported_and_fits(tmp_path, cnn_path, cnn_calib, caplog):
    out = tmp_path / "mixed.onnx"
    with caplog.at_level("WARNING", logger="onnxq"):
        result = onnxq.quantize(cnn_path, cnn_calib, out, method="rtn", budget=Budget(avg_bits=4.0),
                                bit_choices=(2, 4, 8), clado_samples=8)
    assert caplog.text.count("held-out estimate") == 1  # all 20 samples calibrated: one warning for both oracles
    plan = result.mixed
    assert plan.picked in plan.verified and plan.verified[plan.picked] == min(plan.verified.values())
    assert "uniform 4" in plan.verified and result.average_bits(stored=True) <= 4.0 + 1e-9
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(meta["onnxq.mixed_precision"])["picked"] == plan.picked
