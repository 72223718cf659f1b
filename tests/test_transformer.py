"""Transformer graphs: token inputs, attention masks, variable lengths, block-wise int4 and MatMulNBits."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxq
from onnxq.calibration.calibrate import calibrate
from onnxq.calibration.capture import capture_model, make_session
from onnxq.data import sources
from onnxq.data.calibration_set import CalibrationSet
from onnxq.data.masking import attention_mask_name, by_length
from onnxq.data.sources import batches, model_inputs
from onnxq.export.nbits import dequantize_nbits, pack_uint4, unpack_uint4
from onnxq.export.qdq import build_quantized_model, save_atomic
from onnxq.graph.layers import find_layers
from onnxq.graph.prepare import prepare
from onnxq.passes import Grid, comq, rtn

VOCAB, D, HIDDEN = 50, 48, 96  # D is not a multiple of 32: the last block is short (and padded for NBits)
WEIGHTS = ("wq", "wk", "wv", "wo", "w1", "w2")


def transformer(seed: int = 0) -> onnx.ModelProto:
    """One encoder block: embedding Gather, single-head attention with a padding mask, LayerNorm, ReLU MLP."""
    rng = np.random.default_rng(seed)
    shapes = {"wq": (D, D), "wk": (D, D), "wv": (D, D), "wo": (D, D), "w1": (D, HIDDEN), "w2": (HIDDEN, D)}
    inits = [numpy_helper.from_array((rng.normal(size=s) / np.sqrt(s[0])).astype(np.float32), n)
             for n, s in shapes.items()]
    inits += [numpy_helper.from_array(rng.normal(size=(VOCAB, D)).astype(np.float32), "emb"),
              numpy_helper.from_array(np.ones(D, np.float32), "ln_g"),
              numpy_helper.from_array(np.zeros(D, np.float32), "ln_b"),
              numpy_helper.from_array(np.float32(-1e4), "neg"), numpy_helper.from_array(np.float32(1.0), "one"),
              numpy_helper.from_array(np.float32(1 / np.sqrt(D)), "inv_sqrt_d"),
              numpy_helper.from_array(np.array([1], np.int64), "axis1")]
    node = helper.make_node
    nodes = [
        node("Gather", ["emb", "input_ids"], ["x0"], name="embed"),
        node("LayerNormalization", ["x0", "ln_g", "ln_b"], ["x"], name="ln0", axis=-1),
        *(node("MatMul", ["x", f"w{c}"], [c], name=f"proj_{c}") for c in "qkv"),
        node("Transpose", ["k"], ["kt"], name="kt", perm=[0, 2, 1]),
        node("MatMul", ["q", "kt"], ["s0"], name="scores"),
        node("Mul", ["s0", "inv_sqrt_d"], ["s1"], name="scale"),
        node("Cast", ["attention_mask"], ["mf"], name="mask_float", to=TensorProto.FLOAT),
        node("Sub", ["one", "mf"], ["pad"], name="pad"),
        node("Mul", ["pad", "neg"], ["bias0"], name="bias"),
        node("Unsqueeze", ["bias0", "axis1"], ["bias1"], name="bias_unsq"),
        node("Add", ["s1", "bias1"], ["s2"], name="masked"),
        node("Softmax", ["s2"], ["p"], name="softmax", axis=-1),
        node("MatMul", ["p", "v"], ["ctx"], name="context"),
        node("MatMul", ["ctx", "wo"], ["o"], name="proj_o"),
        node("Add", ["x", "o"], ["r1"], name="residual1"),
        node("LayerNormalization", ["r1", "ln_g", "ln_b"], ["h"], name="ln1", axis=-1),
        node("MatMul", ["h", "w1"], ["f1"], name="fc1"),
        node("Relu", ["f1"], ["a1"], name="relu"),
        node("MatMul", ["a1", "w2"], ["f2"], name="fc2"),
        node("Add", ["h", "f2"], ["y"], name="residual2"),
    ]
    inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "tokens"])
              for n in ("input_ids", "attention_mask")]
    output = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "tokens", D])
    model = helper.make_model(helper.make_graph(nodes, "encoder", inputs, [output], inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def sample(rng: np.random.Generator, batch: int, tokens: int) -> dict[str, np.ndarray]:
    """Token ids with right padding: every sequence has 1..tokens real tokens."""
    lengths = rng.integers(1, tokens + 1, size=batch)
    mask = (np.arange(tokens)[None, :] < lengths[:, None]).astype(np.int64)
    return {"input_ids": rng.integers(0, VOCAB, size=(batch, tokens)), "attention_mask": mask}


@pytest.fixture(scope="module")
def model() -> onnx.ModelProto:
    return prepare(transformer())


def test_matmul_weights_are_layers_and_attention_matmuls_are_not(model) -> None:
    layers, skipped = find_layers(model)
    assert sorted(layer.weight for layer in layers) == sorted(WEIGHTS)
    assert all(layer.op_type == "MatMul" and layer.channel_axis == 1 and layer.input_axis == 0 for layer in layers)
    assert not skipped  # Q.K^T and P.V have no constant weight: not ours, and nothing to report
    assert attention_mask_name(model_inputs(model)) == "attention_mask"


def test_gram_counts_only_real_tokens(model) -> None:
    layers, _ = find_layers(model)
    feeds = [sample(np.random.default_rng(i), 3, 7) for i in range(3)]
    stats = calibrate(model, layers, feeds)
    tensors = sorted({layer.activation for layer in layers})
    session = make_session(capture_model(model, tensors))
    for layer in layers:
        rows = []
        for feed in feeds:
            values = dict(zip(tensors, session.run(tensors, feed), strict=True))
            rows.append(values[layer.activation][feed["attention_mask"] != 0].astype(np.float64))
        X = np.concatenate(rows)
        assert stats[layer.name].rows == sum(int(f["attention_mask"].sum()) for f in feeds)
        np.testing.assert_allclose(stats[layer.name].gram[0], X.T @ X, rtol=1e-5, atol=1e-4)


def test_padding_tokens_do_not_change_statistics(model) -> None:
    layers, _ = find_layers(model)
    feed = sample(np.random.default_rng(5), 4, 9)
    other = {k: v.copy() for k, v in feed.items()}
    padded = feed["attention_mask"] == 0
    other["input_ids"][padded] = (other["input_ids"][padded] + 17) % VOCAB
    a, b = calibrate(model, layers, [feed]), calibrate(model, layers, [other])
    for layer in layers:
        np.testing.assert_allclose(a[layer.name].gram, b[layer.name].gram, rtol=1e-6, atol=1e-6)
        assert (a[layer.name].act_min, a[layer.name].act_max) == (b[layer.name].act_min, b[layer.name].act_max)


def test_variable_lengths_are_batched_separately(model) -> None:
    rng = np.random.default_rng(2)
    feeds = [sample(rng, 1, t) for t in (5, 5, 8, 8, 8, 3)]
    grouped = list(batches(feeds, model_inputs(model), batch_size=16, limit=None))
    assert [f["input_ids"].shape for f in grouped] == [(2, 5), (3, 8), (1, 3)]
    layers, _ = find_layers(model)
    together, apart = calibrate(model, layers, grouped), calibrate(model, layers, feeds)
    for layer in layers:
        np.testing.assert_allclose(together[layer.name].gram, apart[layer.name].gram, rtol=1e-5, atol=1e-5)


def test_variable_lengths_are_padded_into_one_batch_with_the_same_statistics(model) -> None:
    """With ``pad`` (the calibration set), sentences of any length share a batch: one onnxruntime run instead of
    one per length, and the Grams equal those of the unpadded sentences since padding rows are masked out."""
    rng = np.random.default_rng(2)
    feeds = [sample(rng, 1, t) for t in (5, 5, 8, 8, 8, 3)]
    grouped = list(batches(feeds, model_inputs(model), batch_size=4, limit=None, pad=True))
    assert [f["input_ids"].shape for f in grouped] == [(4, 8), (2, 8)]
    np.testing.assert_array_equal(grouped[0]["attention_mask"][0, 5:], 0)  # padded on the right, mask 0
    layers, _ = find_layers(model)
    together, apart = calibrate(model, layers, grouped), calibrate(model, layers, feeds)
    for layer in layers:
        assert together[layer.name].rows == apart[layer.name].rows
        np.testing.assert_allclose(together[layer.name].gram, apart[layer.name].gram, rtol=1e-5, atol=1e-5)


def test_calibration_set_pads_per_sentence_files(tmp_path, model) -> None:
    rng = np.random.default_rng(7)
    write_npz(tmp_path / "sentences", [sample(rng, 1, t) for t in (4, 9, 2, 9, 6, 3, 7)])
    data = CalibrationSet(tmp_path / "sentences", model_inputs(model), batch_size=4, calib_size=5, held_out=2)
    assert [f["input_ids"].shape[0] for f in data.calibration()] == [4, 1]
    check, held = data.check_batch()
    assert held and check["input_ids"].shape[0] == 2 == check["attention_mask"].shape[0]


def write_npz(folder, feeds) -> None:
    folder.mkdir()
    for i, feed in enumerate(feeds):
        np.savez(folder / f"{i:03d}.npz", **feed)


def write_per_input(folder, feeds) -> None:
    for name in ("input_ids", "attention_mask"):
        (folder / name).mkdir(parents=True)
        for i, feed in enumerate(feeds):
            np.save(folder / name / f"{i:03d}.npy", feed[name][0])  # no batch axis: onnxq adds it


@pytest.mark.parametrize("layout", [write_npz, write_per_input])
def test_multi_input_calibration_layouts_give_the_same_statistics(tmp_path, model, layout) -> None:
    rng = np.random.default_rng(3)
    feeds = [sample(rng, 1, int(t)) for t in rng.integers(4, 10, size=6)]
    layout(tmp_path / "calib", feeds)
    out = tmp_path / "q.onnx"
    path = tmp_path / "m.onnx"
    onnx.save(transformer(), str(path))
    stats = tmp_path / "stats.npz"
    onnxq.quantize(path, tmp_path / "calib", out, onnxq.Config(onnxq.Rounding(method="rtn"),
                                                               data=onnxq.Data(stats=stats, calib_size=None)))
    layers, _ = find_layers(model)
    expected = calibrate(model, layers, feeds)
    with np.load(stats) as cached:
        for index, layer in enumerate(layers):
            np.testing.assert_allclose(cached[f"gram_{index}"], expected[layer.name].gram, rtol=1e-5, atol=1e-5)


def quantized_weights(model, block: int | None, bits: int = 4) -> tuple[list, dict]:
    """COMQ on every layer (float-model statistics from a few padded batches)."""
    layers, _ = find_layers(model)
    stats = calibrate(model, layers, [sample(np.random.default_rng(i), 4, 8) for i in range(4)])
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    results = {layer.name: comq.quantize(layer.matrix(inits[layer.weight]), stats[layer.name].normalised_gram,
                                         Grid(bits, block_size=block)) for layer in layers}
    return layers, results


def fake_quantized(model, layers, results) -> onnx.ModelProto:
    """The float model with every weight replaced by its dequantized value."""
    fake = onnx.ModelProto()
    fake.CopyFrom(model)
    weights = {layer.weight: layer.tensor(results[layer.name].dequantize()) for layer in layers}
    for init in fake.graph.initializer:
        if init.name in weights:
            init.CopyFrom(numpy_helper.from_array(weights[init.name], init.name))
    return fake


def run(model_or_path, feed) -> np.ndarray:
    """onnxruntime's output, with its DQ->MatMul fusion computing in float (by default it fuses 4-bit
    DequantizeLinear + MatMul into MatMulNBits with accuracy_level 4, which quantizes activations to int8)."""
    options = ort.SessionOptions()
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    source = model_or_path.SerializeToString() if isinstance(model_or_path, onnx.ModelProto) else str(model_or_path)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"]).run(None, feed)[0]


@pytest.mark.parametrize("block", [32, None])
@pytest.mark.parametrize("nbits", [False, True])
def test_int4_exports_run_and_equal_the_dequantized_weights(tmp_path, model, block, nbits) -> None:
    layers, results = quantized_weights(model, block)
    path = tmp_path / "q.onnx"
    save_atomic(build_quantized_model(model, layers, results, {}, matmul_nbits=nbits), path)
    loaded = onnx.load(str(path))
    onnx.checker.check_model(loaded)
    ops = [n.op_type for n in loaded.graph.node]
    assert ops.count("MatMulNBits") == (len(layers) if nbits else 0)
    assert ops.count("DequantizeLinear") == (0 if nbits else len(layers))
    inits = {t.name: numpy_helper.to_array(t) for t in loaded.graph.initializer}
    for layer in layers:
        expected = results[layer.name].dequantize()  # (N, K)
        if nbits:
            got = dequantize_nbits(inits[f"{layer.weight}_Q4"], inits[f"{layer.weight}_scales"],
                                   inits[f"{layer.weight}_zero_points"], layer.shape[0])
        else:
            node = next(n for n in loaded.graph.node if n.name == f"{layer.weight}_DequantizeLinear")
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            assert attrs.get("block_size") == block and attrs["axis"] == (0 if block else 1)
            got = layer.matrix(dequantize_reference(loaded, layer.weight))
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
    feed = sample(np.random.default_rng(9), 3, 8)
    np.testing.assert_allclose(run(path, feed), run(fake_quantized(model, layers, results), feed),
                               rtol=1e-4, atol=1e-4)


def dequantize_reference(model: onnx.ModelProto, weight: str) -> np.ndarray:
    """onnx's reference DequantizeLinear on the stored initializers (independent of onnxruntime)."""
    from onnx.reference import ReferenceEvaluator

    node = next(n for n in model.graph.node if n.name == f"{weight}_DequantizeLinear")
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return ReferenceEvaluator(helper.make_model(helper.make_graph(
        [node], "dq", [], [helper.make_tensor_value_info(node.output[0], TensorProto.FLOAT, None)],
        [numpy_helper.from_array(inits[i], i) for i in node.input]),
        opset_imports=[helper.make_opsetid("", 21)])).run(None, {})[0]


@pytest.mark.parametrize(("k", "block", "symmetric"), [(48, 32, False), (100, 16, True), (40, None, False)])
def test_matmul_nbits_output_is_x_times_dequantized_weight(k: int, block: int | None, symmetric: bool) -> None:
    """One MatMulNBits layer, 3-D input: onnxruntime's result equals x @ W_dq (padding contributes nothing)."""
    rng = np.random.default_rng(k)
    W = rng.normal(size=(k, 24)).astype(np.float32)
    x = rng.normal(size=(2, 5, k)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "one",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5, 24])],
                              [numpy_helper.from_array(W, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    layers, _ = find_layers(model)
    qw = rtn.quantize(layers[0].matrix(W), None, Grid(4, symmetric, block))
    out = build_quantized_model(model, layers, {"mm": qw}, {}, matmul_nbits=True)
    assert [n.op_type for n in out.graph.node] == ["MatMulNBits"]
    assert (len(out.graph.node[0].input) == 3) == symmetric  # symmetric: onnxruntime's default zero point 8
    expected = x.astype(np.float64) @ qw.dequantize().T.astype(np.float64)
    np.testing.assert_allclose(run(out, {"x": x}), expected, rtol=1e-4, atol=1e-4)


def test_matmul_nbits_accuracy_level_is_written_and_stays_close() -> None:
    """accuracy_level 4 (int8 activations) is an attribute of the node; the result stays near x @ W_dq."""
    rng = np.random.default_rng(7)
    W = rng.normal(size=(64, 32)).astype(np.float32)
    x = rng.normal(size=(3, 64)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "one",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 32])],
                              [numpy_helper.from_array(W, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    layers, _ = find_layers(model)
    qw = rtn.quantize(layers[0].matrix(W), None, Grid(4, False, 32))
    out = build_quantized_model(model, layers, {"mm": qw}, {}, matmul_nbits=True, nbits_accuracy_level=4)
    assert {a.name: a.i for a in out.graph.node[0].attribute}["accuracy_level"] == 4
    expected = x.astype(np.float64) @ qw.dequantize().T.astype(np.float64)
    np.testing.assert_allclose(run(out, {"x": x}), expected, rtol=0.05, atol=0.05 * np.abs(expected).max())


def test_uint4_packing_round_trips() -> None:
    values = np.random.default_rng(0).integers(0, 16, size=(3, 7))
    packed = pack_uint4(values)
    assert packed.shape == (3, 4) and packed.dtype == np.uint8
    assert packed[0, 0] == values[0, 0] | (values[0, 1] << 4)  # first value in the low nibble
    np.testing.assert_array_equal(unpack_uint4(packed, 7), values)


def test_cli_block_size_and_matmul_nbits(tmp_path) -> None:
    from click.testing import CliRunner

    from onnxq.cli import cli

    path = tmp_path / "m.onnx"
    onnx.save(transformer(), str(path))
    write_npz(tmp_path / "calib", [sample(np.random.default_rng(i), 1, 6 + i % 3) for i in range(6)])
    out = tmp_path / "q.onnx"
    result = CliRunner().invoke(cli, [str(path), "--calib", str(tmp_path / "calib"), "-o", str(out), "--bits", "4",
                                      "--block-size", "32", "--matmul-nbits", "--accuracy-level", "4", "--method",
                                      "comq", "-q"])
    assert result.exit_code == 0, result.output
    loaded = onnx.load(str(out))
    assert sum(n.op_type == "MatMulNBits" for n in loaded.graph.node) == len(WEIGHTS)
    assert all(a.i == 32 for n in loaded.graph.node for a in n.attribute if a.name == "block_size")
    assert all(a.i == 4 for n in loaded.graph.node for a in n.attribute if a.name == "accuracy_level")


def test_sequential_rounding_ignores_padding_tokens(tmp_path, model) -> None:
    """Sequential rounding on a masked encoder (block-wise grid): padding ids change nothing it writes."""
    feed = sample(np.random.default_rng(5), 8, 9)
    other = {k: v.copy() for k, v in feed.items()}
    padded = feed["attention_mask"] == 0
    other["input_ids"][padded] = (other["input_ids"][padded] + 17) % VOCAB
    onnx.save(model, str(tmp_path / "m.onnx"))
    written = []
    for index, feeds in enumerate(([feed], [other])):
        out = tmp_path / f"q{index}.onnx"
        onnxq.quantize(tmp_path / "m.onnx", feeds, out, bits=4, block_size=32, sequential=True)
        written.append({t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer})
    assert written[0].keys() == written[1].keys()
    for name, value in written[0].items():
        np.testing.assert_allclose(value.astype(np.float64), written[1][name].astype(np.float64), atol=1e-5)


def real_sequences(feeds) -> list[tuple[int, ...]]:
    """Every sample's real tokens (mask 1), sorted: which samples the feeds hold, however batched or padded."""
    found = []
    for feed in feeds:
        for ids, mask in zip(feed["input_ids"], feed["attention_mask"], strict=True):
            found.append(tuple(int(i) for i in ids[mask != 0]))
    return sorted(found)


def test_token_samples_are_sorted_by_length_into_batches(model) -> None:
    """Per-sentence feeds are sorted by length before batching: less padding, the same samples, the same Grams."""
    rng = np.random.default_rng(3)
    feeds = [{k: v[:, :t] for k, v in sample(rng, 1, 12).items()} | {"attention_mask": np.ones((1, t), np.int64)}
             for t in (9, 2, 9, 3, 8, 2, 7, 3)]
    grouped = list(batches(feeds, model_inputs(model), batch_size=2, limit=None, pad=True))
    assert [f["input_ids"].shape for f in grouped] == [(2, 2), (2, 3), (2, 8), (2, 9)]  # file order: 9, 9, 8, 7
    assert real_sequences(grouped) == real_sequences(feeds)
    layers, _ = find_layers(model)
    together, apart = calibrate(model, layers, grouped), calibrate(model, layers, feeds)
    for layer in layers:
        assert together[layer.name].rows == apart[layer.name].rows
        np.testing.assert_allclose(together[layer.name].gram, apart[layer.name].gram, rtol=1e-5, atol=1e-5)


def test_length_sorting_keeps_the_calibration_and_held_out_samples(tmp_path, model, monkeypatch) -> None:
    rng = np.random.default_rng(8)
    files = [{k: v[:, :t] for k, v in sample(rng, 1, 12).items()} | {"attention_mask": np.ones((1, t), np.int64)}
             for t in (9, 2, 8, 3, 7, 1, 6, 2, 5, 4, 3)]
    write_npz(tmp_path / "sentences", files)

    def splits() -> tuple[list, list]:
        data = CalibrationSet(tmp_path / "sentences", model_inputs(model), batch_size=2, calib_size=6, held_out=5)
        return list(data.calibration()), data.held_out(5)

    sorted_calibration, sorted_held = splits()
    monkeypatch.setattr(sources, "LENGTH_WINDOW", 0)  # every window one feed: the files' own order
    calibration, held = splits()
    assert real_sequences(sorted_calibration) == real_sequences(calibration)
    assert real_sequences(sorted_held) == real_sequences(held)
    widths = [f["input_ids"].shape[1] for f in sorted_calibration]
    assert widths == sorted(widths) and sum(widths) < sum(f["input_ids"].shape[1] for f in calibration)


def test_by_length_never_moves_a_sample_across_the_boundary() -> None:
    def feed(tokens: int, samples: int = 1) -> tuple[dict, int]:
        return {"attention_mask": np.ones((samples, tokens), np.int64)}, samples

    stream = [feed(5), feed(1), feed(4, samples=3), feed(2), feed(3), feed(1)]  # the 3-sample feed straddles 3
    out = list(by_length(iter(stream), "attention_mask", window=100, boundary=3))
    assert [(f["attention_mask"].shape[1], n) for f, n in out] == [(1, 1), (5, 1), (4, 3), (1, 1), (2, 1), (3, 1)]
