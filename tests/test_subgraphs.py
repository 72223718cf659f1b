"""Models with If/Loop/Scan bodies: body layers calibrated through the branch taken, weights stored once, a weight
shared with a body or listed as a graph output stays float.

``if_model``: ``h = x @ w_top``; ``If(cond)`` then ``h @ w_branch`` else ``(h @ w_branch) * 2``, where ``w_branch``
is a top-level initializer both bodies read from the enclosing scope (so the two body layers are tied).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxq
from onnxq.export.qdq import build_quantized_model
from onnxq.graph.bodies import share_equal_body_constants
from onnxq.graph.layers import find_layers
from onnxq.graph.model import GraphModel
from onnxq.passes import Grid, rtn

RNG = np.random.default_rng(0)
W_TOP = RNG.normal(size=(8, 8)).astype(np.float32)
W_BRANCH = RNG.normal(size=(8, 4)).astype(np.float32)


def if_model(shared_top: bool = False, weight_output: bool = False) -> onnx.ModelProto:
    value = helper.make_tensor_value_info
    inits = [numpy_helper.from_array(W_TOP, "w_top"), numpy_helper.from_array(W_BRANCH, "w_branch"),
             numpy_helper.from_array(np.array(2.0, np.float32), "two")]
    then_body = helper.make_graph([helper.make_node("MatMul", ["h", "w_branch"], ["t_y"], name="then_mm")],
                                  "then", [], [value("t_y", TensorProto.FLOAT, [1, 4])])
    else_body = helper.make_graph([helper.make_node("MatMul", ["h", "w_branch"], ["e_m"], name="else_mm"),
                                   helper.make_node("Mul", ["e_m", "two"], ["e_y"], name="else_mul")],
                                  "else", [], [value("e_y", TensorProto.FLOAT, [1, 4])])
    nodes = [helper.make_node("MatMul", ["x", "w_top"], ["h"], name="top_mm"),
             helper.make_node("If", ["cond"], ["y"], name="if", then_branch=then_body, else_branch=else_body)]
    outputs = [value("y", TensorProto.FLOAT, [1, 4])]
    if shared_top:
        nodes.append(helper.make_node("MatMul", ["x", "w_branch"], ["z"], name="top_reads_w_branch"))
        outputs.append(value("z", TensorProto.FLOAT, [1, 4]))
    if weight_output:
        outputs.append(value("w_top", TensorProto.FLOAT, [8, 8]))
    graph = helper.make_graph(nodes, "g", [value("x", TensorProto.FLOAT, [1, 8]), value("cond", TensorProto.BOOL, [])],
                              outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def bodies(model: onnx.ModelProto) -> list[onnx.GraphProto]:
    return [a.g for n in model.graph.node for a in n.attribute if a.type == onnx.AttributeProto.GRAPH]


def run(model: onnx.ModelProto, cond: bool) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": np.ones((1, 8), np.float32), "cond": np.array(cond)})


def test_round_trip_keeps_body_weights_in_the_enclosing_graph():
    """onnx-graphsurgeon alone would copy w_branch into both bodies (a 0.986x 'compression' in the field)."""
    model = if_model()
    out = GraphModel(model).to_proto()
    assert out.SerializeToString() == model.SerializeToString()
    assert all(not body.initializer for body in bodies(out))


def test_body_layers_sharing_a_weight_are_tied():
    layers, skipped = find_layers(if_model())
    assert [layer.name for layer in layers] == ["top_mm"]
    assert sorted(skipped) == [
        "else_mm: weight w_branch is shared by 2 uses (else_mm, then_mm); tied weights stay in float",
        "then_mm: weight w_branch is shared by 2 uses (else_mm, then_mm); tied weights stay in float"]


def test_exported_model_stores_each_weight_once_and_runs_both_branches():
    model = if_model()
    layers, _ = find_layers(model)
    qw = rtn.quantize(layers[0].matrix(W_TOP).astype(np.float64), None, Grid(4))
    out = build_quantized_model(model, layers, {"top_mm": qw}, {})
    onnx.checker.check_model(out)
    names = [t.name for t in out.graph.initializer]
    assert names.count("w_branch") == 1 and "w_top" not in names
    assert all(not body.initializer for body in bodies(out))
    h = np.ones((1, 8)) @ layers[0].tensor(qw.dequantize())
    np.testing.assert_allclose(run(out, True)[0], h @ W_BRANCH, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(run(out, False)[0], 2 * h @ W_BRANCH, rtol=1e-4, atol=1e-4)


def test_weight_read_at_top_level_and_in_a_body_stays_float():
    layers, skipped = find_layers(if_model(shared_top=True))
    assert [layer.name for layer in layers] == ["top_mm"]
    assert skipped[-1] == ("top_reads_w_branch: weight w_branch is shared by 3 uses (else_mm, then_mm, "
                           "top_reads_w_branch); tied weights stay in float")


def test_weight_that_is_a_graph_output_stays_float():
    layers, skipped = find_layers(if_model(weight_output=True))
    assert layers == []
    assert skipped[0] == "top_mm: weight w_top is also a graph output; it stays in float"


@pytest.mark.parametrize("shape", [{}, {"shared_top": True}, {"weight_output": True}])
def test_quantize_end_to_end_writes_a_valid_model(tmp_path, shape):
    """Both shapes made the previous export write a model onnxruntime refused (caught by onnxq's own check)."""
    model = if_model(**shape)
    rng = np.random.default_rng(1)
    feeds = [{"x": rng.normal(size=(1, 8)).astype(np.float32), "cond": np.array(bool(i % 2))} for i in range(8)]
    result = onnxq.quantize(model, feeds, tmp_path / "q.onnx", bits=4, allow_empty=True)
    written = onnx.load(str(tmp_path / "q.onnx"))
    onnx.checker.check_model(written)
    assert [t.name for t in written.graph.initializer].count("w_branch") == 1
    assert [layer.name for layer in result.layers] == ([] if shape.get("weight_output") else ["top_mm"])
    for cond in (True, False):
        np.testing.assert_allclose(run(written, cond)[-1], run(model, cond)[-1], rtol=0.2, atol=0.5)


# -- body layers quantized, calibrated through the branch taken ------------------------------------------------------

W_THEN = RNG.normal(size=(8, 4)).astype(np.float32)
W_ELSE = RNG.normal(size=(8, 4)).astype(np.float32)
W_LOOP = (RNG.normal(size=(8, 8)) / 3).astype(np.float32)
W_SCAN = RNG.normal(size=(8, 4)).astype(np.float32)
W_NESTED = (RNG.normal(size=(8, 8)) / 3).astype(np.float32)
STEPS, TIME = 3, 5
value = helper.make_tensor_value_info


def model_of(nodes: list, inputs: list, outputs: list, inits: list) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


def branch_model() -> onnx.ModelProto:
    """``h = x @ w_top``; If(cond) then ``h @ w_then`` (w_then stored in the branch) else ``(h @ w_else) * 2``."""
    then_body = helper.make_graph([helper.make_node("MatMul", ["h", "w_then"], ["t_y"], name="then_mm")], "then", [],
                                  [value("t_y", TensorProto.FLOAT, [1, 4])],
                                  [numpy_helper.from_array(W_THEN, "w_then")])
    else_body = helper.make_graph([helper.make_node("MatMul", ["h", "w_else"], ["e_m"], name="else_mm"),
                                   helper.make_node("Mul", ["e_m", "two"], ["e_y"], name="else_mul")],
                                  "else", [], [value("e_y", TensorProto.FLOAT, [1, 4])])
    nodes = [helper.make_node("MatMul", ["x", "w_top"], ["h"], name="top_mm"),
             helper.make_node("If", ["cond"], ["y"], name="if", then_branch=then_body, else_branch=else_body)]
    inits = [numpy_helper.from_array(W_TOP, "w_top"), numpy_helper.from_array(W_ELSE, "w_else"),
             numpy_helper.from_array(np.array(2.0, np.float32), "two")]
    return model_of(nodes, [value("x", TensorProto.FLOAT, [1, 8]), value("cond", TensorProto.BOOL, [])],
                    [value("y", TensorProto.FLOAT, [1, 4])], inits)


def loop_model(nested: bool = False) -> onnx.ModelProto:
    """A Loop of STEPS iterations carrying ``h -> tanh(h @ w_loop)``; ``nested``: the body also holds an If on the
    outer ``cond`` whose then branch computes ``relu(h @ w_nested)`` (else ``-h``) and adds it."""
    body_nodes = [helper.make_node("Identity", ["c"], ["c_out"], name="loop_cond"),
                  helper.make_node("MatMul", ["h", "w_loop"], ["lm"], name="loop_mm"),
                  helper.make_node("Tanh", ["lm"], ["h_next" if not nested else "lt"], name="loop_tanh")]
    if nested:
        then_body = helper.make_graph([helper.make_node("MatMul", ["h", "w_nested"], ["nm"], name="nested_mm"),
                                       helper.make_node("Relu", ["nm"], ["nr"], name="nested_relu")], "nthen", [],
                                      [value("nr", TensorProto.FLOAT, [1, 8])])
        else_body = helper.make_graph([helper.make_node("Neg", ["h"], ["nn"], name="nested_neg")], "nelse", [],
                                      [value("nn", TensorProto.FLOAT, [1, 8])])
        body_nodes += [helper.make_node("If", ["cond"], ["n_y"], name="nested_if", then_branch=then_body,
                                        else_branch=else_body),
                       helper.make_node("Add", ["lt", "n_y"], ["h_next"], name="loop_add")]
    body = helper.make_graph(body_nodes, "body", [value("i", TensorProto.INT64, []), value("c", TensorProto.BOOL, []),
                                                  value("h", TensorProto.FLOAT, [1, 8])],
                             [value("c_out", TensorProto.BOOL, []), value("h_next", TensorProto.FLOAT, [1, 8])])
    inits = [numpy_helper.from_array(np.array(STEPS, np.int64), "steps"),
             numpy_helper.from_array(np.array(True), "go"), numpy_helper.from_array(W_LOOP, "w_loop"),
             numpy_helper.from_array(W_NESTED, "w_nested")]
    inputs = [value("x", TensorProto.FLOAT, [1, 8]), value("cond", TensorProto.BOOL, [])]
    loop = helper.make_node("Loop", ["steps", "go", "x"], ["y"], name="loop", body=body)
    return model_of([loop], inputs if nested else inputs[:1], [value("y", TensorProto.FLOAT, [1, 8])],
                    inits if nested else inits[:3])


def scan_model() -> onnx.ModelProto:
    """A Scan over axis 1 of ``x`` (1, TIME, 8): ``y_t = x_t @ w_scan``, summed into its state; ys stacked on axis 1."""
    body = helper.make_graph([helper.make_node("MatMul", ["x_t", "w_scan"], ["y_t"], name="scan_mm"),
                              helper.make_node("Add", ["s", "y_t"], ["s_next"], name="scan_add")], "body",
                             [value("s", TensorProto.FLOAT, [1, 4]), value("x_t", TensorProto.FLOAT, [1, 8])],
                             [value("s_next", TensorProto.FLOAT, [1, 4]), value("y_t", TensorProto.FLOAT, [1, 4])])
    scan = helper.make_node("Scan", ["s0", "x"], ["s_end", "ys"], name="scan", body=body, num_scan_inputs=1,
                            scan_input_axes=[1], scan_output_axes=[1])
    inits = [numpy_helper.from_array(np.zeros((1, 4), np.float32), "s0"), numpy_helper.from_array(W_SCAN, "w_scan")]
    return model_of([scan], [value("x", TensorProto.FLOAT, [1, TIME, 8])],
                    [value("s_end", TensorProto.FLOAT, [1, 4]), value("ys", TensorProto.FLOAT, [1, TIME, 4])], inits)


def feeds_for(model: onnx.ModelProto, cond: bool | None = None, count: int = 12) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(2)
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    feeds = [{"x": rng.normal(size=shape).astype(np.float32)} for _ in range(count)]
    return [{**feed, "cond": np.array(cond)} for feed in feeds] if cond is not None else feeds


def gram(rows: list[np.ndarray]) -> np.ndarray:
    """The Gram matrix of the rows, in float64 (the independent reference)."""
    X = np.concatenate([r.reshape(-1, r.shape[-1]) for r in rows]).astype(np.float64)
    return X.T @ X


def dequantized_weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """What each DequantizeLinear of the file computes, by the tensor it writes: (codes - zero point) x scale."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    found = {}
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear":
            codes, scale, zero = (inits[name].astype(np.float64) for name in node.input)
            axis = next(a.i for a in node.attribute if a.name == "axis")
            shape = [1] * codes.ndim
            shape[axis] = -1
            found[node.output[0]] = (codes - zero.reshape(shape)) * scale.reshape(shape)
    return found


def quantized_with_codes(model: onnx.ModelProto, feeds: list, tmp_path, bits: int = 8):
    """Quantize through onnxq's stages; return the written model, the statistics and the pass's codes."""
    with onnxq.open_run(model, feeds, bits=bits) as run:
        statistics = run.calibrate()
        rounded = run.round([bits], statistics)
    result = onnxq.quantize(model, feeds, tmp_path / "q.onnx", bits=bits, statistics=statistics)
    return onnx.load(str(tmp_path / "q.onnx")), statistics, rounded, result


def check_codes_in_file(written: onnx.ModelProto, rounded: dict, layers: list) -> dict[str, np.ndarray]:
    """Each body layer's weight is stored once, as the pass's codes at the top level, and the body reads the
    DequantizeLinear output; returns the dequantized weights by layer."""
    inits = {t.name: numpy_helper.to_array(t) for t in written.graph.initializer}
    dq = dequantized_weights(written)
    by_layer = {}
    for layer in layers:
        qw = rounded[(layer.name, 8)]
        assert layer.weight not in inits
        np.testing.assert_array_equal(inits[f"{layer.weight}_quantized"], layer.tensor(qw.codes))
        by_layer[layer.name] = dq[f"{layer.weight}_DequantizeLinear_Output"]
        np.testing.assert_allclose(by_layer[layer.name], layer.tensor(qw.dequantize()), rtol=1e-6, atol=1e-7)
    assert all(not body.initializer or all(not t.name.startswith("w_") for t in body.initializer)
               for body in bodies(written))
    return by_layer


def test_if_branches_are_quantized_and_calibrated_through_the_branch_taken(tmp_path, caplog):
    model = branch_model()
    layers, skipped = find_layers(model)
    assert [layer.name for layer in layers] == ["top_mm", "else_mm", "then_mm"] and skipped == []
    assert layers[2].where == "inside the then_branch of If if"
    feeds = feeds_for(model, cond=True)
    with caplog.at_level("WARNING", logger="onnxq"):
        written, statistics, rounded, result = quantized_with_codes(model, feeds, tmp_path)
    stats = statistics.layers
    h = [feed["x"].astype(np.float64) @ W_TOP for feed in feeds]
    assert stats["then_mm"].rows == len(feeds) and stats["then_mm"].samples == len(feeds)
    np.testing.assert_allclose(stats["then_mm"].gram[0], gram(h), rtol=1e-5)
    assert stats["else_mm"].rows == 0 and not stats["else_mm"].gram.any()
    assert ("else_mm: inside the else_branch of If if, which the calibration data never ran; rounded to nearest "
            "(weight MSE) without statistics") in caplog.text
    assert "then_mm: inside" not in caplog.text
    assert [r.name for r in result.layers] == ["top_mm", "else_mm", "then_mm"]
    by_layer = check_codes_in_file(written, rounded, find_layers(written)[0] or layers)
    for cond in (True, False):
        x = np.ones((1, 8))
        hq = x @ by_layer["top_mm"]
        expected = hq @ by_layer["then_mm"] if cond else 2 * hq @ by_layer["else_mm"]
        np.testing.assert_allclose(run(written, cond)[0], expected, rtol=1e-4, atol=1e-4)


def test_loop_body_layer_sees_every_iteration(tmp_path):
    model = loop_model()
    feeds = feeds_for(model)
    written, statistics, rounded, result = quantized_with_codes(model, feeds, tmp_path)
    assert [r.name for r in result.layers] == ["loop_mm"]
    rows, h = [], [feed["x"].astype(np.float64) for feed in feeds]
    for _ in range(STEPS):
        rows += h
        h = [np.tanh(x @ W_LOOP) for x in h]
    stats = statistics.layers["loop_mm"]
    assert stats.rows == STEPS * len(feeds)
    np.testing.assert_allclose(stats.gram[0], gram(rows), rtol=1e-5)
    w = check_codes_in_file(written, rounded, find_layers(model)[0])["loop_mm"]
    session = ort.InferenceSession(written.SerializeToString(), providers=["CPUExecutionProvider"])
    x = feeds[0]["x"].astype(np.float64)
    for _ in range(STEPS):
        x = np.tanh(x @ w)
    np.testing.assert_allclose(session.run(None, feeds[0])[0], x, rtol=1e-4, atol=1e-5)


def test_scan_body_layer_sees_every_time_step(tmp_path):
    model = scan_model()
    feeds = feeds_for(model)
    written, statistics, rounded, _ = quantized_with_codes(model, feeds, tmp_path)
    stats = statistics.layers["scan_mm"]
    assert stats.rows == TIME * len(feeds)
    np.testing.assert_allclose(stats.gram[0], gram([feed["x"] for feed in feeds]), rtol=1e-5)
    w = check_codes_in_file(written, rounded, find_layers(model)[0])["scan_mm"]
    session = ort.InferenceSession(written.SerializeToString(), providers=["CPUExecutionProvider"])
    s_end, ys = session.run(None, feeds[0])
    expected = feeds[0]["x"][0].astype(np.float64) @ w
    np.testing.assert_allclose(ys[0], expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(s_end[0], expected.sum(0), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("taken", [True, False])
def test_if_nested_in_a_loop(tmp_path, caplog, taken):
    model = loop_model(nested=True)
    layers, _ = find_layers(model)
    assert [(layer.name, layer.where) for layer in layers] == [
        ("loop_mm", "inside the body of Loop loop"),
        ("nested_mm", "inside the body of Loop loop, inside the then_branch of If nested_if")]
    feeds = feeds_for(model, cond=taken)
    with caplog.at_level("WARNING", logger="onnxq"):
        written, statistics, rounded, _ = quantized_with_codes(model, feeds, tmp_path)
    rows, h = [], [feed["x"].astype(np.float64) for feed in feeds]
    for _ in range(STEPS):
        rows += h
        h = [np.tanh(x @ W_LOOP) + (np.maximum(x @ W_NESTED, 0) if taken else -x) for x in h]
    stats = statistics.layers
    np.testing.assert_allclose(stats["loop_mm"].gram[0], gram(rows), rtol=1e-5)
    if taken:
        assert stats["nested_mm"].rows == STEPS * len(feeds)
        np.testing.assert_allclose(stats["nested_mm"].gram[0], gram(rows), rtol=1e-5)
        assert "never ran" not in caplog.text
    else:
        assert stats["nested_mm"].rows == 0
        assert "nested_mm: inside the body of Loop loop, inside the then_branch of If nested_if, which" in caplog.text
    w = check_codes_in_file(written, rounded, layers)
    session = ort.InferenceSession(written.SerializeToString(), providers=["CPUExecutionProvider"])
    for cond in (True, False):
        x = feeds[0]["x"].astype(np.float64)
        for _ in range(STEPS):
            x = np.tanh(x @ w["loop_mm"]) + (np.maximum(x @ w["nested_mm"], 0) if cond else -x)
        got = session.run(None, {"x": feeds[0]["x"], "cond": np.array(cond)})[0]
        np.testing.assert_allclose(got, x, rtol=1e-4, atol=1e-4)


def test_statistics_of_an_untaken_branch_are_reused_from_the_stats_file(tmp_path, caplog):
    """A layer the data never ran has zero rows; the --stats file keeps it, and a second run reuses the file."""
    model, path = branch_model(), tmp_path / "stats.npz"
    feeds = feeds_for(model, cond=False)
    first = onnxq.quantize(model, feeds, tmp_path / "a.onnx", bits=4, stats=path)
    with caplog.at_level("INFO", logger="onnxq"):
        second = onnxq.quantize(model, feeds, tmp_path / "b.onnx", bits=4, stats=path)
    assert "reusing" in caplog.text.lower()
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    assert [r.name for r in first.layers] == [r.name for r in second.layers] == ["top_mm", "else_mm", "then_mm"]


def test_w8a8_keeps_body_layers_weight_only_and_sequential_refuses_them(tmp_path):
    """Activation Q/DQ goes around top-level layers only; --sequential cuts stages in the top-level graph."""
    model = branch_model()
    feeds = feeds_for(model, cond=True, count=32)
    onnxq.quantize(model, feeds, tmp_path / "q.onnx", bits=8, act_bits=8)
    written = onnx.load(str(tmp_path / "q.onnx"))
    assert "QuantizeLinear" in {n.op_type for n in written.graph.node}
    assert all(n.op_type != "QuantizeLinear" for body in bodies(written) for n in body.node)
    for cond in (True, False):
        np.testing.assert_allclose(run(written, cond)[0], run(model, cond)[0], rtol=0.05, atol=0.05)
    with pytest.raises(onnxq.OnnxqError, match="--sequential cannot round layers inside If/Loop/Scan bodies "
                                               r"\(else_mm, then_mm\)"):
        onnxq.quantize(model, feeds, tmp_path / "s.onnx", bits=4, sequential=True)


def test_equal_constants_folded_into_both_branches_are_stored_once():
    """onnxruntime's constant folding writes a folded weight into every branch that computes it (silero-vad: +1 MB);
    the prepared model keeps one top-level copy that both branches read."""
    big = RNG.normal(size=(8, 64)).astype(np.float32)

    def branch(tag: str) -> onnx.GraphProto:
        return helper.make_graph([helper.make_node("Add", ["h", f"{tag}_c"], [f"{tag}_y"], name=f"{tag}_add")], tag,
                                 [], [value(f"{tag}_y", TensorProto.FLOAT, [8, 64])],
                                 [numpy_helper.from_array(big, f"{tag}_c")])
    model = model_of([helper.make_node("If", ["cond"], ["y"], name="if", then_branch=branch("t"),
                                       else_branch=branch("e"))],
                     [value("h", TensorProto.FLOAT, [8, 64]), value("cond", TensorProto.BOOL, [])],
                     [value("y", TensorProto.FLOAT, [8, 64])], [])
    shared = onnx.ModelProto()
    shared.CopyFrom(model)
    assert share_equal_body_constants(shared) == ["e_c"]
    assert [t.name for t in shared.graph.initializer] == ["e_c"] and all(not b.initializer for b in bodies(shared))
    assert shared.ByteSize() < 0.6 * model.ByteSize()
    feed = {"h": RNG.normal(size=(8, 64)).astype(np.float32)}
    for cond in (True, False):
        got, want = (ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
                     .run(None, {**feed, "cond": np.array(cond)})[0] for m in (shared, model))
        np.testing.assert_array_equal(got, want)


def test_if_whose_branch_changes_between_loop_iterations_is_one_line_error(tmp_path, capfd):
    """The iterations' captured tensors must stack: an If taking its then branch on even iterations only cannot
    be captured; the error names the layer input and the fix, and excluding the layer quantizes the rest."""
    then_body = helper.make_graph([helper.make_node("MatMul", ["m", "w_nested"], ["nm"], name="nested_mm")], "nthen",
                                  [], [value("nm", TensorProto.FLOAT, [1, 8])])
    else_body = helper.make_graph([helper.make_node("Neg", ["m"], ["nn"], name="odd_neg")], "nelse", [],
                                  [value("nn", TensorProto.FLOAT, [1, 8])])
    body = helper.make_graph(
        [helper.make_node("Identity", ["c"], ["c_out"], name="loop_cond"),
         helper.make_node("MatMul", ["h", "w_loop"], ["m"], name="loop_mm"),
         helper.make_node("Mod", ["i", "two"], ["r"], name="mod"),
         helper.make_node("Equal", ["r", "zero"], ["even"], name="even"),
         helper.make_node("If", ["even"], ["h_next"], name="nested_if", then_branch=then_body, else_branch=else_body)],
        "body", [value("i", TensorProto.INT64, []), value("c", TensorProto.BOOL, []),
                 value("h", TensorProto.FLOAT, [1, 8])],
        [value("c_out", TensorProto.BOOL, []), value("h_next", TensorProto.FLOAT, [1, 8])])
    scalars = {"steps": np.array(STEPS, np.int64), "go": np.array(True), "two": np.array(2, np.int64),
               "zero": np.array(0, np.int64), "w_nested": W_NESTED, "w_loop": W_LOOP}
    model = model_of([helper.make_node("Loop", ["steps", "go", "x"], ["y"], name="loop", body=body)],
                     [value("x", TensorProto.FLOAT, [1, 8])], [value("y", TensorProto.FLOAT, [1, 8])],
                     [numpy_helper.from_array(array, name) for name, array in scalars.items()])
    feeds = feeds_for(model)
    with pytest.raises(onnxq.OnnxqError, match=r"cannot capture the inputs of layers inside an If whose branch "
                                               r"changes .* \(nested_mm_input\); keep those layers in float"):
        onnxq.quantize(model, feeds, tmp_path / "q.onnx", bits=4)
    assert "onnxruntime" not in capfd.readouterr().err  # the one line only: onnxruntime's own log stays quiet
    result = onnxq.quantize(model, feeds, tmp_path / "q.onnx", bits=4, nodes_to_exclude=("nested_mm",))
    assert [r.name for r in result.layers] == ["loop_mm"]


def test_report_measures_the_taken_branch_and_leaves_the_other_unknown(tmp_path):
    model = branch_model()
    onnx.save(model, tmp_path / "m.onnx")
    calib = tmp_path / "calib"
    calib.mkdir()
    for i, feed in enumerate(feeds_for(model, True)):
        np.savez(calib / f"{i}.npz", **feed)
    onnxq.quantize(tmp_path / "m.onnx", calib, tmp_path / "q.onnx", bits=4, calib_size=12)
    rows = {row["name"]: row for row in onnxq.write_report(tmp_path / "q.onnx", tmp_path / "m.onnx", calib,
                                                           samples=4)["layers"]}
    assert set(rows) == {"top_mm", "then_mm", "else_mm"}
    assert np.isfinite(rows["then_mm"]["output_sqnr_db"]) and np.isfinite(rows["top_mm"]["output_sqnr_db"])
    assert np.isnan(rows["else_mm"]["output_sqnr_db"])  # never computed on this data: unknown, not exact
