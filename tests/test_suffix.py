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
from onnxq.graph.bias import bias_slots, output_shift, with_zero_biases
from onnxq.graph.layers import find_layers
from onnxq.graph.prepare import prepare
from onnxq.graph.suffix import SuffixProbes, downstream_nodes, prefix_of, suffix_of
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
