"""Activation calibration matches numpy, and W8A8 models run on onnxruntime's integer kernels close to float."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tiny
from onnx import TensorProto, helper, numpy_helper

from onnxq.calibration.activations import activation_ranges
from onnxq.errors import OnnxqError
from onnxq.export.act_qdq import default_act_layers, plan_qdq, quant_params, quantize_activations
from onnxq.export.qdq import build_quantized_model
from onnxq.graph.layers import find_layers
from onnxq.graph.prepare import prepare
from onnxq.passes import Grid, rtn
from onnxq.passes.histogram import RunningHistogram, choose_range, mse_range, range_mse
from onnxq.report.kernels import kernel_report, kernel_summary, latency, optimized_graph


def streamed(batches: list[np.ndarray]) -> RunningHistogram:
    hist = RunningHistogram()
    for batch in batches:
        hist.add(batch)
    return hist


def growing_batches(seed: int = 0) -> list[np.ndarray]:
    """Batches whose range keeps growing (forcing bin merges), some ReLU-like with many exact zeros."""
    rng = np.random.default_rng(seed)
    batches = []
    for i in range(8):
        x = rng.normal(size=(20, 500)) * (1 + 2 * i) + 0.5
        batches.append((np.maximum(x, 0) if i % 2 else x).astype(np.float32))
    return batches


def uint8_mse(x: np.ndarray, low: float, high: float) -> float:
    """The real squared error of quantizing x to uint8 on [low, high] (as QuantizeLinear/DequantizeLinear do)."""
    scale, zero_point = quant_params(low, high)
    codes = np.clip(np.round(x / scale) + zero_point, 0, 255)
    return float(np.mean(((codes - zero_point) * scale - x) ** 2))


# --- ranges against numpy --------------------------------------------------------------------------------


def test_minmax_is_the_exact_range_widened_to_zero():
    batches = growing_batches()
    data = np.concatenate([b.ravel() for b in batches])
    assert choose_range(streamed(batches), "minmax", 99.999) == (min(data.min(), 0.0), max(data.max(), 0.0))
    positive = [b for b in batches[1::2]]
    assert choose_range(streamed([b + 1 for b in positive]), "minmax", 99.9)[0] == 0.0


def test_streamed_histogram_keeps_every_value():
    batches = growing_batches()
    hist = streamed(batches)
    data = np.concatenate([b.ravel() for b in batches])
    assert hist.total == data.size
    assert hist.zeros == np.count_nonzero(data == 0)
    assert hist.counts.size <= 4096
    nonzero = data[data != 0]
    edges = (np.arange(hist.start, hist.start + hist.counts.size + 1)) * hist.width
    np.testing.assert_allclose(hist.counts, np.histogram(nonzero, edges)[0], atol=2)  # edge rounding only


@pytest.mark.parametrize("q", [0.001, 0.1, 1, 25, 50, 75, 99, 99.9, 99.999])
def test_percentile_matches_numpy_within_one_bin(q):
    batches = growing_batches()
    data = np.concatenate([b.ravel() for b in batches])
    hist = streamed(batches)
    assert abs(hist.quantile(q / 100) - np.percentile(data, q)) <= hist.width


def test_percentile_range_is_two_sided():
    rng = np.random.default_rng(3)
    data = rng.standard_t(3, size=200_000)
    low, high = choose_range(streamed(np.array_split(data, 7)), "percentile", 99.9)
    hist = streamed([data])
    assert abs(low - np.percentile(data, 0.1)) <= hist.width and abs(high - np.percentile(data, 99.9)) <= hist.width


def test_mse_clips_outliers_and_never_loses_to_minmax():
    data = np.random.default_rng(1).laplace(size=200_000).astype(np.float32)  # rare large values on both sides
    hist = streamed(np.array_split(data, 10))
    low, high = mse_range(hist)
    assert 0.5 * data.max() < high < 0.95 * data.max() and 0.5 * data.min() > low > 0.95 * data.min()
    assert range_mse(hist, low, high) < range_mse(hist, data.min(), data.max())
    assert uint8_mse(data, low, high) < 0.9 * uint8_mse(data, data.min(), data.max())  # the real error too


@pytest.mark.parametrize("seed", range(5))
def test_mse_objective_never_worse_than_minmax(seed):
    rng = np.random.default_rng(seed)
    data = np.maximum(rng.normal(size=20_000) * rng.uniform(0.1, 10), 0) if seed % 2 else rng.laplace(size=20_000)
    hist = streamed([data])
    low, high = mse_range(hist)
    assert range_mse(hist, low, high) <= range_mse(hist, data.min(), data.max()) + 1e-15
    assert low <= 0 <= high


def test_activation_ranges_through_a_model():
    model = tiny.conv_model(seed=2)
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.normal(size=(2, 4, 8, 8)).astype(np.float32) * (i + 1)} for i in range(4)]
    ranges = activation_ranges(model, ["x", "y"], iter(feeds), method="minmax")
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    y = np.concatenate([session.run(None, f)[0].ravel() for f in feeds])
    x = np.concatenate([f["x"].ravel() for f in feeds])
    assert ranges["x"] == pytest.approx((x.min(), x.max()))
    assert ranges["y"] == pytest.approx((y.min(), y.max()), rel=1e-6)
    with pytest.raises(OnnxqError, match="unknown calibration method"):
        activation_ranges(model, ["y"], iter(feeds), method="entropy")


# --- W8A8 models --------------------------------------------------------------------------------------------


def branchy_model(seed: int = 0, branch_b: str = "Clip") -> onnx.ModelProto:
    """Conv-Relu-MaxPool, Conv branches (Relu; Clip 0..6 or Relu), Concat, Conv, Add(skip), Relu, GAP, Flatten, Gemm."""
    rng = np.random.default_rng(seed)

    def init(name, *shape, scale=0.3):
        return numpy_helper.from_array((rng.normal(size=shape) * scale).astype(np.float32), name)

    inits = [init("w1", 8, 3, 3, 3), init("b1", 8, scale=0.1), init("wa", 8, 8, 1, 1), init("ba", 8, scale=0.1),
             init("wb", 8, 8, 3, 3, scale=0.2), init("bb", 8, scale=0.1), init("w3", 8, 16, 1, 1),
             init("b3", 8, scale=0.1), init("wf", 10, 8), init("bf", 10, scale=0.1),
             numpy_helper.from_array(np.array(0.0, np.float32), "lo"),
             numpy_helper.from_array(np.array(6.0, np.float32), "hi")]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("MaxPool", ["r1"], ["p1"], name="pool1", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "wa", "ba"], ["ca"], name="conv_a"),
        helper.make_node("Relu", ["ca"], ["ra"], name="relu_a"),
        helper.make_node("Conv", ["p1", "wb", "bb"], ["cb"], name="conv_b", pads=[1, 1, 1, 1]),
        helper.make_node("Clip", ["cb", "lo", "hi"], ["rb"], name="relu6_b") if branch_b == "Clip"
        else helper.make_node(branch_b, ["cb"], ["rb"], name="act_b"),  # Relu, or Identity (negative values)
        helper.make_node("Concat", ["ra", "rb"], ["cat"], name="concat", axis=1),
        helper.make_node("Conv", ["cat", "w3", "b3"], ["c3"], name="conv3"),
        helper.make_node("Add", ["c3", "p1"], ["sum"], name="add"),
        helper.make_node("Relu", ["sum"], ["rs"], name="relu_sum"),
        helper.make_node("GlobalAveragePool", ["rs"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "wf", "bf"], ["logits"], name="fc", transB=1),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])
    graph = helper.make_graph(nodes, "branchy", [x], [helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                                                                     ["N", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def squeezenet_head() -> onnx.ModelProto:
    """SqueezeNet's classifier: Conv -> Relu -> GlobalAveragePool -> Flatten, the logits a graph output."""
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("GlobalAveragePool", ["r"], ["gap"]), helper.make_node("Flatten", ["gap"], ["logits"])]
    weight = numpy_helper.from_array(np.random.default_rng(0).normal(size=(5, 4, 1, 1)).astype(np.float32), "w")
    graph = helper.make_graph(nodes, "head", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 6, 6])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5])], [weight])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def w8a8(float_model: onnx.ModelProto, shape: tuple[int, ...], method: str = "mse", act_layers=None):
    """Prepare, RTN 8-bit symmetric weights, calibrate on random batches, insert activation Q/DQ."""
    model = prepare(float_model)
    layers, _ = find_layers(model)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    results = {layer.name: rtn.quantize(layer.matrix(inits[layer.weight]), None, Grid(8, symmetric=True))
               for layer in layers}
    qmodel = build_quantized_model(model, layers, results, {})
    before = qmodel.SerializeToString()
    batches = [random_feed(model, shape, seed) for seed in range(4)]
    quantized = quantize_activations(model, qmodel, layers, iter(batches), method, act_layers)
    assert qmodel.SerializeToString() == before  # the input model is left untouched
    return model, layers, quantized


def random_feed(model: onnx.ModelProto, shape: tuple[int, ...], seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {v.name: rng.normal(size=shape).astype(np.float32) for v in model.graph.input}


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def run(model: onnx.ModelProto | str, feed: dict) -> np.ndarray:
    source = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"]).run(None, feed)[0]


CASES = [(branchy_model, (8, 3, 16, 16)), (lambda: branchy_model(branch_b="Relu"), (8, 3, 16, 16)),
         (lambda: branchy_model(branch_b="Identity"), (8, 3, 16, 16)), (tiny.cnn_model, (8, 3, 16, 16)),
         (tiny.mlp_model, (16, 12)),
         (squeezenet_head, (4, 4, 6, 6)), (tiny.two_input_model, (16, 6))]


@pytest.mark.parametrize("builder, shape", CASES)
@pytest.mark.parametrize("method", ["minmax", "percentile", "mse"])
def test_w8a8_runs_integer_kernels_close_to_float(tmp_path, builder, shape, method):
    model, layers, quantized = w8a8(builder(), shape, method)
    onnx.checker.check_model(quantized)
    path = tmp_path / "w8a8.onnx"
    onnx.save(quantized, str(path))
    rows = kernel_report(path)
    assert len(rows) == len(layers) and all(row["runs"] == "integer" for row in rows), rows
    feed = random_feed(model, shape, seed=11)
    assert cosine(run(model, feed), run(str(path), feed)) > 0.99


def test_placement_follows_onnxruntime_conventions():
    model, layers, quantized = w8a8(branchy_model(), (8, 3, 16, 16))
    ops = [n.op_type for n in quantized.graph.node]
    assert "Relu" not in ops and "Clip" not in ops  # folded into the Q of their producer
    nodes = {n.name: n for n in quantized.graph.node}
    for tensor in ("x", "r1", "p1", "ra", "rb", "cat", "c3", "rs", "gap", "flat"):
        q, dq = nodes[f"{tensor}_QuantizeLinear"], nodes[f"{tensor}_DequantizeLinear"]
        assert q.output[0] == f"{tensor}_QuantizeLinear_Output" == dq.input[0]
        assert dq.output[0] == f"{tensor}_DequantizeLinear_Output"
    assert nodes["p1_QuantizeLinear"].input[1] == "r1_scale"  # MaxPool keeps its input's scale
    assert nodes["flat_QuantizeLinear"].input[1] == "gap_scale"
    # Concat of a Relu and a Clip(0, 6) branch: one shared range could exceed 6 and undo the folded Clip
    assert [nodes[f"{t}_QuantizeLinear"].input[1] for t in ("ra", "rb", "cat")] == ["ra_scale", "rb_scale", "cat_scale"]
    _, _, relus = w8a8(branchy_model(branch_b="Relu"), (8, 3, 16, 16))
    nodes = {n.name: n for n in relus.graph.node}
    assert {nodes[f"{t}_QuantizeLinear"].input[1] for t in ("ra", "rb", "cat")} == {"ra_scale"}  # one scale: a copy
    assert "logits_QuantizeLinear" not in nodes  # QGemm returns float logits
    fused = [n.op_type for n in optimized_graph(quantized).graph.node]
    assert {"QLinearConcat", "QLinearAdd", "QLinearGlobalAveragePool"} <= set(fused) and "Concat" not in fused
    inits = {t.name: t for t in quantized.graph.initializer}
    assert {inits[f"{t}_zero_point"].data_type for t in ("x", "r1", "ra")} == {TensorProto.UINT8}
    assert numpy_helper.to_array(inits["r1_zero_point"]) == 0  # a ReLU range starts at 0
    assert "lo" not in inits and "hi" not in inits


def test_bias_is_int32_on_input_times_weight_scale():
    model, layers, quantized = w8a8(branchy_model(), (8, 3, 16, 16))
    inits = {t.name: numpy_helper.to_array(t) for t in quantized.graph.initializer}
    floats = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    nodes = {n.name: n for n in quantized.graph.node}
    for layer in layers:
        codes = inits[f"{layer.bias}_quantized"]
        assert codes.dtype == np.int32 and not inits[f"{layer.bias}_zero_point"].any()
        source = nodes[f"{layer.activation}_QuantizeLinear"].input[1]
        expected_scale = inits[source] * inits[f"{layer.weight}_scale"]
        np.testing.assert_array_equal(inits[f"{layer.bias}_scale"], expected_scale)
        np.testing.assert_array_equal(codes, np.round(floats[layer.bias] / expected_scale.astype(np.float64)))
        assert nodes[layer.name].input[2] == f"{layer.bias}_DequantizeLinear_Output"


def test_only_the_chosen_layers_get_activation_qdq(tmp_path):
    model, layers, quantized = w8a8(branchy_model(), (8, 3, 16, 16), act_layers=["conv1", "fc"])
    path = tmp_path / "mixed.onnx"
    onnx.save(quantized, str(path))
    runs = {row["layer"]: row["runs"] for row in kernel_report(path)}
    assert runs["conv1"] == runs["fc"] == "integer"
    assert runs["conv_a"] == runs["conv3"] == "float (dequantized weights)"


def test_plan_calibrates_logits_by_minmax_and_default_layers_are_int8():
    model = prepare(branchy_model())
    layers, _ = find_layers(model)
    plan = plan_qdq(model, layers, [layer.name for layer in layers])
    assert set(plan.folded) == {"relu1", "relu_a", "relu6_b", "relu_sum"} and not plan.exact
    assert plan.source["cat"] == "cat" and "cat" in plan.ranged  # Relu and Clip branches: no shared scale
    relus = prepare(branchy_model(branch_b="Relu"))
    plan = plan_qdq(relus, find_layers(relus)[0], [layer.name for layer in layers])
    assert plan.source["cat"] == plan.source["rb"] == "ra" and "cat" not in plan.ranged  # Concat shares a scale
    assert plan.group_ranges({t: (-1.0, i + 1.0) for i, t in enumerate(plan.calibrated)})["ra"] == (
        -1.0, 1.0 + max(plan.calibrated.index("ra"), plan.calibrated.index("rb")))
    head = prepare(squeezenet_head())
    head_plan = plan_qdq(head, find_layers(head)[0], ["conv"])
    assert head_plan.exact == {"gap", "r"} and head_plan.source["logits"] == "gap"  # logits and their evidence
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    results = {layer.name: rtn.quantize(layer.matrix(inits[layer.weight]), None, Grid(8 if i else 4, True))
               for i, layer in enumerate(layers)}
    qmodel = build_quantized_model(model, layers, results, {})
    assert default_act_layers(qmodel, layers) == [layer.name for layer in layers[1:]]


def test_kernel_report_and_latency_on_float_and_weight_only(tmp_path):
    path = tmp_path / "float.onnx"
    onnx.save(prepare(branchy_model()), str(path))
    rows = kernel_report(path)
    assert [row["runs"] for row in rows] == ["float"] * 5
    assert set(kernel_summary(rows)) <= {"Conv", "FusedConv", "Gemm"} and sum(kernel_summary(rows).values()) == 5
    assert latency(path, batch=2, repeats=3) > 0


def test_clear_errors_for_unknown_layers_and_float_weights():
    model = prepare(branchy_model())
    layers, _ = find_layers(model)
    feeds = [random_feed(model, (2, 3, 16, 16), 0)]
    with pytest.raises(OnnxqError, match="unknown layers"):
        quantize_activations(model, model, layers, iter(feeds), act_layers=["nope"])
    with pytest.raises(OnnxqError, match="not quantized"):
        quantize_activations(model, model, layers, iter(feeds), act_layers=["conv1"])


def test_dead_channel_bias_fits_int32_by_raising_its_weight_scale(tmp_path):
    float_model = branchy_model()
    inits = {t.name: t for t in float_model.graph.initializer}
    w1, b1 = numpy_helper.to_array(inits["w1"]).copy(), numpy_helper.to_array(inits["b1"]).copy()
    w1[0] *= 1e-12  # a BN-folded dead channel: weights ~1e-13 next to a bias ~1
    b1[0] = 1.5
    for name, array in (("w1", w1), ("b1", b1)):
        inits[name].CopyFrom(numpy_helper.from_array(array, name))
    model, layers, quantized = w8a8(float_model, (8, 3, 16, 16))
    q = {t.name: numpy_helper.to_array(t) for t in quantized.graph.initializer}
    assert np.abs(q["b1_quantized"]).max() <= 2**30 and q["b1_quantized"][0] > 0
    dequantized_bias = q["b1_quantized"] * q["b1_scale"]
    np.testing.assert_allclose(dequantized_bias, b1, rtol=0, atol=float(q["b1_scale"].max()))
    assert q["b1_scale"][0] == pytest.approx(q["x_scale"] * q["w1_scale"][0])
    feed = random_feed(model, (8, 3, 16, 16), seed=3)
    assert cosine(run(model, feed), run(quantized, feed)) > 0.99


def test_block_wise_weights_keep_a_float_bias_and_are_not_default_act_layers():
    model = prepare(tiny.mlp_model())  # Gemm layers: onnxruntime runs blocked DQ on 2-D weights
    layers, _ = find_layers(model)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    results = {layer.name: rtn.quantize(layer.matrix(inits[layer.weight]), None, Grid(8, True, block_size=4))
               for layer in layers}
    qmodel = build_quantized_model(model, layers, results, {})
    assert default_act_layers(qmodel, layers) == []
    feeds = [random_feed(model, (16, 12), seed) for seed in range(2)]
    quantized = quantize_activations(model, qmodel, layers, iter(feeds), act_layers=[layer.name for layer in layers])
    assert not any(t.data_type == TensorProto.INT32 for t in quantized.graph.initializer)
    assert any(n.op_type == "QuantizeLinear" for n in quantized.graph.node)
    feed = random_feed(model, (16, 12), seed=7)
    assert cosine(run(model, feed), run(quantized, feed)) > 0.99


def test_concat_never_widens_a_folded_relu_range():
    """Sharing one scale with a signed branch would give the ReLU branch a zero point > 0: no more clamp at 0."""
    model, layers, quantized = w8a8(branchy_model(branch_b="Identity"), (8, 3, 16, 16))
    plan = plan_qdq(model, layers, [layer.name for layer in layers])
    assert plan.source["cat"] == "cat" and plan.source["ra"] == "ra" and "relu_a" in plan.folded
    zero_points = {t.name: numpy_helper.to_array(t) for t in quantized.graph.initializer if "zero_point" in t.name}
    assert zero_points["ra_zero_point"] == 0 and zero_points["cb_zero_point"] > 0  # Identity removed: cb feeds Concat
    feed = random_feed(model, (8, 3, 16, 16), seed=11)
    assert cosine(run(model, feed), run(quantized, feed)) > 0.999


def test_two_bit_layers_keep_float_activations_so_onnxruntime_loads_the_model(tmp_path, cnn_path, cnn_calib):
    """INT2 weights have no QLinear kernel: a W2A8 request writes 2-bit layers weight-only (was: a model
    onnxruntime refused), while 4-bit layers still get their activation Q/DQ."""
    import onnxq

    for bits in (2, 4):
        out = tmp_path / f"w{bits}a8.onnx"
        onnxq.quantize(cnn_path, cnn_calib, out, bits=bits, act_bits=8, method="rtn")
        session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        session.run(None, {"x": np.ones((1, 3, 16, 16), np.float32)})
        quantize_ops = [n for n in onnx.load(str(out)).graph.node if n.op_type == "QuantizeLinear"]
        assert bool(quantize_ops) == (bits == 4)


def test_padding_tokens_do_not_widen_activation_ranges():
    """Token tensors (batch, tokens, ...) drop the positions the attention mask zeroes, as the Gram statistics do;
    tensors of another layout are kept whole."""
    from onnxq.calibration.activations import HistogramObserver

    tokens = np.zeros((2, 3, 4), np.float32)
    tokens[0, 2] = tokens[1, 1:] = 100.0  # what a model computes at padding positions
    tokens[0, 0, 0] = -1.0
    scores = np.full((2, 5, 3, 3), 7.0, np.float32)  # attention scores: leading dims are not the mask's
    feed = {"input_ids": np.ones((2, 3), np.int64), "attention_mask": np.array([[1, 1, 0], [1, 0, 0]])}
    observer = HistogramObserver(["tokens", "scores"], mask_name="attention_mask")
    observer.update({"tokens": tokens, "scores": scores}, feed)
    assert (observer.hists["tokens"].low, observer.hists["tokens"].high) == (-1.0, 0.0)
    assert observer.hists["scores"].high == 7.0
    unmasked = HistogramObserver(["tokens"])
    unmasked.update({"tokens": tokens}, feed)
    assert unmasked.hists["tokens"].high == 100.0
