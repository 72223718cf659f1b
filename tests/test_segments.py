"""Segments of a model for sequential rounding, and the batch store that keeps the cut between them: the
segments run in order reproduce the whole model's tensors, each node runs once, spilled batches come back
exactly and their file is removed."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import tiny
from onnx import TensorProto, helper

from onnxq.allocation.oracle import weights_as_inputs
from onnxq.calibration.capture import capture_model
from onnxq.data.spill import BatchStore
from onnxq.graph.layers import find_layers
from onnxq.graph.segments import plan_segments, segment_model
from onnxq.rounding.sequential import PairedStats, StageCapture, _skip_error, stage_plan


def skip_model() -> onnx.ModelProto:
    """x -> a -> Relu -> b -> c; c + a (a skip over two stages); times a Constant; reshaped to Shape(x) (int64
    from the graph input, read only by the last stage) -> d."""
    rng = np.random.default_rng(0)
    inits = [tiny._init(n, rng.normal(size=(8, 8)) * 0.5) for n in ("wa", "wb", "wc", "wd")]
    nodes = [helper.make_node("MatMul", ["x", "wa"], ["a"], name="a"),
             helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("MatMul", ["r", "wb"], ["b"], name="b"),
             helper.make_node("MatMul", ["b", "wc"], ["c"], name="c"),
             helper.make_node("Add", ["c", "a"], ["s"]),
             helper.make_node("Constant", [], ["k"], value=helper.make_tensor("kv", TensorProto.FLOAT, [], [0.5])),
             helper.make_node("Mul", ["s", "k"], ["t"]),
             helper.make_node("Shape", ["x"], ["shape"]),
             helper.make_node("Reshape", ["t", "shape"], ["u"]),
             helper.make_node("MatMul", ["u", "wd"], ["y"], name="d")]
    return tiny._model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])], inits)


def test_segments_run_each_node_once_and_carry_what_later_stages_read():
    model = skip_model()
    layers = find_layers(model)[0]
    plan = stage_plan(model, layers)
    assert [stage.needs for stage in plan] == [["x"], ["r"], ["b", "a"], ["u"]]
    weights = {layer.weight for layer in layers}
    segments = plan_segments(weights_as_inputs(model, list(weights)), [stage.needs for stage in plan], weights)
    ran = [index for segment in segments for index in segment.nodes
           if model.graph.node[index].op_type != "Constant"]
    assert sorted(ran) == sorted(set(ran))  # no node twice
    # x (read by Shape in the last segment) and a (the skip) are carried until read; nothing follows the end
    assert [segment.cut for segment in segments] == [["x"], ["x", "a", "r"], ["x", "a", "b"], []]
    assert segments[2].inputs == ["r"] and segments[2].outputs == ["b"]
    assert segments[3].inputs == ["b", "a", "x"] and "Constant" in {model.graph.node[i].op_type
                                                                    for i in segments[3].nodes}


def run_segments(model: onnx.ModelProto, x: np.ndarray, weights: dict[str, np.ndarray]) -> list[dict]:
    """Each stage's tensors, computed segment after segment from the previous cut."""
    layers = find_layers(model)[0]
    plan = stage_plan(model, layers)
    fed = weights_as_inputs(model, list(weights))
    cut, seen = {"x": x}, []
    for stage, segment in zip(plan, plan_segments(fed, [s.needs for s in plan], set(weights)), strict=True):
        types = {name: helper.make_tensor_type_proto(helper.np_dtype_to_tensor_dtype(cut[name].dtype), None)
                 for name in segment.inputs}
        values = dict(cut)
        if segment.outputs:
            session = ort.InferenceSession(segment_model(fed, segment, types, set(weights)).SerializeToString())
            wanted = {v.name for v in session.get_inputs()}
            given = {**{n: cut[n] for n in segment.inputs}, **{k: v for k, v in weights.items() if k in wanted}}
            values.update(zip(segment.outputs, session.run(segment.outputs, given), strict=True))
        seen.append({name: values[name] for name in stage.needs})
        cut = {name: values[name] for name in segment.cut}
    return seen


def test_segments_in_order_give_the_whole_models_tensors():
    model = skip_model()
    rng = np.random.default_rng(1)
    x = rng.normal(size=(5, 8)).astype(np.float32)
    weights = {f"w{n}": rng.normal(size=(8, 8)).astype(np.float32) for n in "abcd"}
    whole = ort.InferenceSession(capture_model(weights_as_inputs(model, list(weights)), list("arbu"))
                                 .SerializeToString())
    expected = dict(zip("arbu", whole.run(list("arbu"), {"x": x, **weights}), strict=True))
    for stage in run_segments(model, x, weights):
        for name, value in stage.items():
            np.testing.assert_array_equal(value, x if name == "x" else expected[name])


def test_capture_with_spilled_boundaries_matches_the_whole_model(tmp_path):
    """Paired statistics per stage (float against replaced weights, the skip's error included), with every
    boundary spilled to disk, equal those of the whole model run on both weight sets."""
    model = skip_model()
    layers = find_layers(model)[0]
    plan = stage_plan(model, layers)
    rng = np.random.default_rng(2)
    feeds = [{"x": rng.normal(size=(4, 8)).astype(np.float32)} for _ in range(3)]
    names = [layer.weight for layer in layers]
    capture = StageCapture(model, names, plan, feeds, tmp_path, store_bytes=0)
    whole = ort.InferenceSession(capture_model(weights_as_inputs(model, names), list("xarbu")).SerializeToString())
    replaced: dict[str, np.ndarray] = {}
    for stage in plan:
        got = capture.paired_stats(stage, replaced)
        assert (capture.float_cut.spilled_bytes > 0) == (stage is not plan[-1])  # to disk (nothing after the end)
        assert len(list(tmp_path.iterdir())) <= 4  # two files per stream, written over stage after stage
        for layer in stage.layers:
            expected = PairedStats.empty(layer)
            for feed in feeds:
                floats = dict(zip("xarbu", whole.run(list("xarbu"), {**feed, **capture.float_tensors}), strict=True))
                quantized = dict(zip("xarbu", whole.run(list("xarbu"), {**feed, **capture.float_tensors, **replaced}),
                                     strict=True))
                skip = stage.skips.get(layer.name)
                error = _skip_error(floats[skip], quantized[skip], quantized[layer.activation], layer) if skip else None
                expected.merge(quantized[layer.activation], floats[layer.activation], layer, None, error)
            assert np.allclose(got[layer.name].gram, expected.gram, rtol=1e-6)
            assert np.allclose(got[layer.name].cross, expected.cross, rtol=1e-6)
            assert (got[layer.name].skip_cross is None) == (expected.skip_cross is None)
            if expected.skip_cross is not None:
                assert np.allclose(got[layer.name].skip_cross, expected.skip_cross, rtol=1e-6)
        for layer in stage.layers:  # "round" the stage: perturb its weight
            replaced[layer.weight] = capture.float_tensors[layer.weight] + 0.1 * rng.normal(size=(8, 8)).astype(
                np.float32)
    assert plan[2].skips == {"c": "a"}
    capture.close()
    assert not any(tmp_path.iterdir())


def test_batch_store_spills_past_its_limit_and_reads_back_exactly(tmp_path):
    rng = np.random.default_rng(3)
    batches = [{"f": rng.normal(size=(2, 3, 5)).astype(np.float32), "i": np.arange(4, dtype=np.int64) + k}
               for k in range(4)]
    store = BatchStore(tmp_path, limit=batches[0]["f"].nbytes + batches[0]["i"].nbytes)
    for batch in batches:
        store.append(batch)
    assert store.in_memory == batches[0]["f"].nbytes + batches[0]["i"].nbytes
    assert store.spilled_bytes == 3 * store.in_memory
    for stored, batch in zip(store, batches, strict=True):
        for name in batch:
            assert stored[name].dtype == batch[name].dtype
            np.testing.assert_array_equal(stored[name], batch[name])
    np.testing.assert_array_equal(store[2]["f"], batches[2]["f"])  # random access
    store.close()
    assert not any(tmp_path.iterdir())


def test_cleared_batch_store_writes_over_its_file(tmp_path):
    """A cleared store forgets its batches and refills its file from the start: the new batches read back
    exactly, and the file does not grow."""
    rng = np.random.default_rng(4)
    store = BatchStore(tmp_path, limit=0)
    for _ in range(4):  # four arrays, each on its own pages, as the refill below
        store.append({"f": rng.normal(size=(4, 5)).astype(np.float32)})
    size = store.path.stat().st_size
    store.clear()
    assert len(store) == 0
    batches = [{"f": rng.normal(size=(4, 5)).astype(np.float32), "i": np.arange(3) * k} for k in range(2)]
    for batch in batches:
        store.append(batch)
    for stored, batch in zip(store, batches, strict=True):
        for name in batch:
            np.testing.assert_array_equal(stored[name], batch[name])
    assert store.path.stat().st_size == size
    store.close()
    assert not any(tmp_path.iterdir())
