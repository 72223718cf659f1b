"""Suffix probes give the whole model's output with one layer replaced, on graphs with branches and skips."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import tiny
from test_sequential import branching_model, residual_model
from test_transformer import sample, transformer

from onnxq.allocation.oracle import LossOracle
from onnxq.calibration.capture import CaptureEngine
from onnxq.data.sources import model_inputs
from onnxq.graph import suffix as suffix_module
from onnxq.graph.bias import bias_slots, output_shift, with_zero_biases
from onnxq.graph.layers import find_layers
from onnxq.graph.prepare import prepare
from onnxq.graph.suffix import RowChoice, SuffixProbes, downstream_nodes, prefix_of, row_chunks, suffix_of
from onnxq.passes import Grid, rtn


def random_feeds(model: onnx.ModelProto, rng: np.random.Generator, batches: int = 3) -> list[dict]:
    feeds = []
    for _ in range(batches):
        feed = {}
        for spec in model_inputs(model):
            shape = [4 if d is None else d for d in spec.shape]
            feed[spec.name] = rng.normal(size=shape).astype(spec.dtype)
        feeds.append(feed)
    return feeds


MODELS = {
    "cnn": (lambda: tiny.cnn_model(), None),
    "mlp": (lambda: tiny.mlp_model(), None),
    "two inputs": (lambda: tiny.two_input_model(), None),
    "residual": (residual_model, None),
    "branching": (branching_model, None),
    "masked encoder": (transformer, lambda rng: [sample(rng, 3, 7) for _ in range(2)]),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_each_probe_equals_the_whole_model_with_that_layer_replaced(name):
    build, make_feeds = MODELS[name]
    model = prepare(build())
    layers, _ = find_layers(model)
    model = with_zero_biases(model, layers)
    slots = bias_slots(model, layers)
    rng = np.random.default_rng(0)
    feeds = make_feeds(rng) if make_feeds else random_feeds(model, rng)
    oracle = LossOracle(model, layers, feeds, slots=slots)
    probes, expected = {}, {}
    for layer in layers:
        W = layer.matrix(oracle.float_weights[layer.weight]).astype(np.float64)
        qw = rtn.quantize(W, np.eye(W.shape[-1]), Grid(2, False, None))
        if layer.name in slots:
            qw.bias_shift = output_shift(W, qw.dequantize(), rng.normal(size=(layer.groups, W.shape[1])))
        replaced = oracle.replacement(layer, qw)
        probes[layer.name] = [((layer.name, 2), replaced)]
        expected[(layer.name, 2)] = oracle.outputs(replaced)
    got = dict(SuffixProbes(model, layers, feeds, oracle.reference, oracle.float_weights).outputs(probes))
    assert set(got) == set(expected)
    for key, outputs in expected.items():
        assert not np.allclose(outputs, oracle.reference, rtol=1e-4, atol=1e-5)  # the probe really changes them
        np.testing.assert_allclose(got[key], outputs, rtol=1e-4, atol=1e-5 * np.abs(outputs).max())
    one_thread = SuffixProbes(model, layers, feeds, oracle.reference, oracle.float_weights, threads=1)
    assert one_thread.parallel == 1  # a worker's share of the cores: its probes run one at a time
    for key, outputs in one_thread.outputs(probes):
        np.testing.assert_array_equal(outputs, got[key])


def test_suffix_holds_only_the_downstream_nodes_and_feeds_the_replaced_weight():
    model = prepare(branching_model())
    layers, _ = find_layers(model)
    last = layers[-1]
    suffix = suffix_of(model, last, {last.weight})
    names = [n.name for n in suffix.model.graph.node]
    index = [n.name for n in model.graph.node].index(last.name)
    assert names == [model.graph.node[i].name for i in downstream_nodes(model, index)]
    assert names[0] == last.name and suffix.fed == [last.weight]
    assert last.weight not in {t.name for t in suffix.model.graph.initializer}
    assert last.activation in suffix.boundary


def test_a_capture_prefix_runs_only_the_nodes_its_tensors_need_and_gives_their_values():
    model = prepare(branching_model())
    layers, _ = find_layers(model)
    early = layers[-1].activation
    prefix = prefix_of(model, [early])
    assert 0 < len(prefix.graph.node) < len(model.graph.node)
    feed = random_feeds(model, np.random.default_rng(2), batches=1)[0]
    got = CaptureEngine(prefix, [early]).values(feed)[early]
    np.testing.assert_allclose(got, CaptureEngine(model, [early]).values(feed)[early], rtol=1e-6)


def test_row_chunks_split_batched_values_into_views_and_leave_others_whole():
    values = {"x": np.arange(24.0).reshape(4, 6), "m": np.ones((4, 2))}
    chunks = row_chunks(values, 1)
    assert len(chunks) == 4 and all(np.shares_memory(c["x"], values["x"]) for c in chunks)
    np.testing.assert_array_equal(np.concatenate([c["x"] for c in chunks]), values["x"])
    assert row_chunks(values, None) == [values]  # a session with a fixed leading size
    assert row_chunks(values, 4) == [values]  # nothing to split
    uneven = {"x": values["x"], "shape": np.array([4, 6, 1])}  # not batched along the leading axis
    assert row_chunks(uneven, 1) == [uneven]
    assert row_chunks({"x": values["x"], "scale": np.float32(2.0)}, 1)[0]["scale"].shape == ()  # kept whole


def test_row_choice_tries_both_then_keeps_the_cheaper_per_sample():
    choice = RowChoice(splittable=True)
    assert choice.rows(0) is None and choice.rows(1) == suffix_module.PROBE_ROWS
    choice.record(None, 1.6, 16)
    choice.record(suffix_module.PROBE_ROWS, 1.2, 16)
    assert choice.rows(2) == suffix_module.PROBE_ROWS
    choice.record(None, 0.8, 16)  # a later, cheaper whole batch
    assert choice.rows(3) is None
    fixed = RowChoice(splittable=False)
    assert [fixed.rows(b) for b in range(3)] == [None, None, None]


def conv_only_model() -> onnx.ModelProto:
    """Conv -> Relu -> (Conv 3x3, Conv 1x1) -> Concat -> Conv 1x1 -> Relu -> GlobalAveragePool -> Flatten: every
    suffix computes each sample on its own (the fire-module shape of SqueezeNet)."""
    rng = np.random.default_rng(3)
    h = onnx.helper

    def weight(name, *shape):
        return onnx.numpy_helper.from_array(rng.normal(scale=0.3, size=shape).astype(np.float32), name)

    nodes = [h.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="squeeze", kernel_shape=[1, 1]),
             h.make_node("Relu", ["c1"], ["r1"]),
             h.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="expand3x3", kernel_shape=[3, 3], pads=[1] * 4),
             h.make_node("Conv", ["r1", "w3", "b3"], ["c3"], name="expand1x1", kernel_shape=[1, 1]),
             h.make_node("Concat", ["c2", "c3"], ["cat"], axis=1),
             h.make_node("Conv", ["cat", "w4", "b4"], ["c4"], name="head", kernel_shape=[1, 1], pads=[1] * 4),
             h.make_node("Relu", ["c4"], ["r4"]),
             h.make_node("GlobalAveragePool", ["r4"], ["pool"]),
             h.make_node("Flatten", ["pool"], ["y"])]
    weights = [weight("w1", 8, 6, 1, 1), weight("b1", 8), weight("w2", 12, 8, 3, 3), weight("b2", 12),
               weight("w3", 12, 8, 1, 1), weight("b3", 12), weight("w4", 10, 24, 1, 1), weight("b4", 10)]
    graph = h.make_graph(nodes, "fire", [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 6, 9, 9])],
                         [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], weights)
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 13)])


@pytest.mark.parametrize("name", ["conv only", "cnn", "masked encoder"])
def test_probes_run_sample_by_sample_only_where_that_gives_the_outputs_of_whole_batches(name, monkeypatch):
    build, make_feeds = MODELS[name] if name in MODELS else (conv_only_model, None)
    model = prepare(build())
    layers, _ = find_layers(model)
    rng = np.random.default_rng(1)
    feeds = make_feeds(rng) if make_feeds else random_feeds(model, rng)
    oracle = LossOracle(model, layers, feeds)
    probes = {}
    for layer in layers:
        W = layer.matrix(oracle.float_weights[layer.weight]).astype(np.float64)
        probes[layer.name] = [((layer.name, 2), oracle.replacement(layer, rtn.quantize(W, np.eye(W.shape[-1]),
                                                                                      Grid(2, False, None))))]
    split: list[bool] = []

    def outputs(rows):
        def forced(self, batch):
            split.append(self.splittable)
            return rows if self.splittable else None
        monkeypatch.setattr(RowChoice, "rows", forced)
        return dict(SuffixProbes(model, layers, feeds, oracle.reference, oracle.float_weights).outputs(probes))

    whole, one_by_one = outputs(None), outputs(1)
    assert any(split) == (name == "conv only")  # Gemm / MatMul suffixes never run sample by sample
    for key, value in whole.items():
        np.testing.assert_array_equal(one_by_one[key], value)
