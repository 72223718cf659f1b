"""The one graph model: lookups by name, derived names, no query mutates, export is byte-faithful."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import tiny
from conftest import SHARED, requires_shared
from onnx import TensorProto, helper, numpy_helper

from onnxq.export.qdq import build_quantized_model
from onnxq.graph.bias import bias_slots, with_zero_biases
from onnxq.graph.layers import find_layers
from onnxq.graph.model import GraphModel, derived_names
from onnxq.graph.prepare import prepare
from onnxq.passes import Grid, rtn


def unnamed(model: onnx.ModelProto) -> onnx.ModelProto:
    for node in model.graph.node:
        node.name = ""
    return model


def quantize(model: onnx.ModelProto, bits: int = 4) -> tuple[list, dict]:
    layers, _ = find_layers(model)
    results = {layer.name: rtn.quantize(layer.matrix(numpy_helper.to_array(
        next(t for t in model.graph.initializer if t.name == layer.weight))).astype(np.float64), None, Grid(bits))
        for layer in layers}
    return layers, results


def test_derived_names_are_unique_and_keep_given_names():
    assert derived_names(["", "MatMul_0", "", "b"], ["MatMul", "Add", "Add", "Relu"]) == \
        ["MatMul_0_", "MatMul_0", "Add_2", "b"]


@pytest.mark.parametrize("builder", [tiny.cnn_model, tiny.mlp_model, lambda: unnamed(tiny.mlp_model())])
def test_import_and_export_round_trip_byte_for_byte(builder):
    model = prepare(builder())
    before = model.SerializeToString()
    assert GraphModel(model).to_proto().SerializeToString() == before
    assert model.SerializeToString() == before


def test_find_layers_leaves_unnamed_nodes_unnamed_and_names_layers_stably():
    model = unnamed(tiny.mlp_model())
    before = model.SerializeToString()
    layers, _ = find_layers(model)
    assert [layer.name for layer in layers] == ["MatMul_0", "Gemm_3"]
    assert model.SerializeToString() == before  # a query: the model is untouched
    assert [layer.name for layer in find_layers(model)[0]] == ["MatMul_0", "Gemm_3"]


def test_export_names_the_layers_it_found():
    """An unnamed layer's node carries its derived name in the written model, so metadata keys find it."""
    model = unnamed(tiny.mlp_model())
    layers, results = quantize(model)
    out = build_quantized_model(model, layers, results, {})
    names = {n.name for n in out.graph.node}
    assert {"MatMul_0", "Gemm_3"} <= names
    assert all(not n.name for n in model.graph.node)


def test_lookups_follow_producers_and_consumers():
    graph = GraphModel(tiny.mlp_model())
    assert graph.producer("mm").name == "matmul"
    assert [n.name for n in graph.consumers("mm")] == ["add"]
    assert graph.constant("mm_w") is not None and graph.constant("mm") is None
    np.testing.assert_array_equal(graph.array("mm_b"), numpy_helper.to_array(
        next(t for t in tiny.mlp_model().graph.initializer if t.name == "mm_b")))
    assert graph.output_names == {"logits"}


def test_zero_biases_is_an_edit_on_a_new_model():
    model = tiny.conv_model(cin=4, cout=6, bias=False)
    before = model.SerializeToString()
    layers, _ = find_layers(model)
    assert bias_slots(model, layers) == {}
    edited = with_zero_biases(model, layers)
    assert model.SerializeToString() == before
    slot = bias_slots(edited, layers)[layers[0].name]
    bias = numpy_helper.to_array(next(t for t in edited.graph.initializer if t.name == slot.tensor))
    np.testing.assert_array_equal(bias, np.zeros(6, np.float32))
    assert with_zero_biases(edited, find_layers(edited)[0]) is edited  # nothing to add: no copy


@pytest.mark.parametrize("nbits", [False, True])
def test_build_quantized_model_leaves_its_input_alone(nbits):
    model = prepare(tiny.mlp_model(features=32, hidden=32))
    before = model.SerializeToString()
    layers, results = quantize(model)
    for qw in results.values():
        qw.bias_shift = np.ones(qw.codes.shape[0])
    out = build_quantized_model(model, layers, results, {"k": "v"}, matmul_nbits=nbits)
    assert model.SerializeToString() == before
    assert {p.key: p.value for p in out.metadata_props}["k"] == "v"
    onnx.checker.check_model(out)


def test_weight_used_twice_is_reported_with_both_users():
    model = tiny.mlp_model(features=6, hidden=6)
    model.graph.node.append(helper.make_node("MatMul", ["logits", "mm_w"], ["again"], name="again"))
    model.graph.output.append(helper.make_tensor_value_info("again", TensorProto.FLOAT, None))
    layers, skipped = find_layers(model)
    assert "again" not in [layer.name for layer in layers]
    assert any("shared by 2 uses (matmul, again)" in line for line in skipped)


@requires_shared
def test_shared_model_round_trips_and_exports_what_the_passes_computed():
    """efficientnet_lite0 (the biggest shared model): import is fast, the round trip byte-faithful, and the
    exported model computes what the float model computes with the dequantized weights put in by hand."""
    import time

    import onnxruntime as ort

    model = prepare(onnx.load(str(SHARED / "models" / "efficientnet_lite0.onnx")))
    start = time.perf_counter()
    graph = GraphModel(model)
    assert time.perf_counter() - start < 2.0
    assert graph.to_proto().SerializeToString() == model.SerializeToString()
    layers, results = quantize(model, bits=8)
    out = build_quantized_model(model, layers, results, {})
    by_hand = onnx.ModelProto()
    by_hand.CopyFrom(model)
    for tensor in by_hand.graph.initializer:
        layer = next((layer for layer in layers if layer.weight == tensor.name), None)
        if layer is not None:
            tensor.CopyFrom(numpy_helper.from_array(layer.tensor(results[layer.name].dequantize()).astype(np.float32),
                                                    tensor.name))
    shape = [d.dim_value or 1 for d in model.graph.input[0].type.tensor_type.shape.dim]
    feed = {model.graph.input[0].name: np.random.default_rng(0).normal(size=shape).astype(np.float32)}
    run = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)[0]
           for m in (out, by_hand)]
    np.testing.assert_allclose(run[0], run[1], rtol=1e-4, atol=1e-4)


def test_raised_weight_scale_replaces_the_stored_codes_and_the_int32_bias_fits():
    """A near-dead channel next to a large bias: the W8A8 edit raises that channel's scale, re-rounds its codes
    and writes both in place of the weight-only ones, so the int32 bias code stays within its headroom."""
    from onnxq.export.act_qdq import BIAS_LIMIT, quantize_activations

    model = tiny.cnn_model()
    for tensor in model.graph.initializer:
        array = numpy_helper.to_array(tensor).copy()
        if tensor.name in ("c2_w", "c2_b"):
            array[0] = array[0] * 1e-12 if tensor.name == "c2_w" else 50.0
            tensor.CopyFrom(numpy_helper.from_array(array, tensor.name))
    model = prepare(model)
    layers, _ = find_layers(model)
    arrays = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    results = {layer.name: rtn.quantize(layer.matrix(arrays[layer.weight]).astype(np.float64), None, Grid(8, True))
               for layer in layers}
    qmodel = build_quantized_model(model, layers, results, {})
    feeds = [{"x": np.random.default_rng(i).normal(size=(2, 3, 16, 16)).astype(np.float32)} for i in range(3)]
    out = quantize_activations(model, qmodel, layers, iter(feeds), act_layers=[layer.name for layer in layers])
    before = {t.name: numpy_helper.to_array(t) for t in qmodel.graph.initializer}
    after = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    assert after["c2_w_scale"][0] > before["c2_w_scale"][0]
    np.testing.assert_array_equal(after["c2_w_scale"][1:], before["c2_w_scale"][1:])
    assert np.abs(after["c2_b_quantized"]).max() <= BIAS_LIMIT
