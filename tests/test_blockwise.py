"""Block-wise grids (one scale and zero point per block of inputs): every pass, the export, the pipeline."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tiny
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import numpy_helper
from test_passes import correlated_layer, gram, non_increasing, weights

from onnxq.errors import OnnxqError
from onnxq.export.qdq import build_quantized_model, save_atomic
from onnxq.graph.layers import find_layers
from onnxq.graph.prepare import prepare
from onnxq.passes import Grid, QuantWeight, comq, gptq, objective, rtn
from onnxq.passes.grid import SUPPORTED_BITS, block_index, block_reduce, minmax_params, n_blocks

pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")

PASSES = {
    "rtn": lambda W, H, g: rtn.quantize(W, H, g),
    "gptq": lambda W, H, g: gptq.quantize(W, H, g),
    "gptq-natural": lambda W, H, g: gptq.quantize(W, H, g, act_order=False, block=5),
    "comq": lambda W, H, g: comq.quantize(W, H, g),
    "comq-rtn-channel": lambda W, H, g: comq.quantize(W, H, g, init="rtn", order="channel"),
    "comq-float-shared": lambda W, H, g: comq.quantize(W, H, g, init="float", order="shared", block=4),
}


def check_blocked(qw: QuantWeight, W: np.ndarray, grid: Grid) -> None:
    """Codes and zero points in range, positive finite (out, n_blocks) scales, dequantize per block."""
    assert qw.scale.shape == qw.zero_point.shape == (W.shape[0], n_blocks(W.shape[1], grid))
    assert qw.codes.shape == W.shape and qw.codes.dtype == np.int8 and qw.zero_point.dtype == np.int8
    assert qw.codes.min() >= grid.qmin and qw.codes.max() <= grid.qmax
    assert qw.zero_point.min() >= grid.qmin and qw.zero_point.max() <= grid.qmax
    assert not grid.symmetric or not qw.zero_point.any()
    assert qw.scale.dtype == np.float32 and np.all(np.isfinite(qw.scale)) and np.all(qw.scale > 0)
    centred = qw.codes.astype(np.float64) - np.repeat(qw.zero_point, grid.block_size, axis=1)[:, : W.shape[1]]
    expected = centred * np.repeat(qw.scale.astype(np.float64), grid.block_size, axis=1)[:, : W.shape[1]]
    np.testing.assert_allclose(qw.dequantize(), expected, rtol=1e-6)


blocked_problems = st.fixed_dictionaries({
    "seed": st.integers(0, 2**32 - 1), "out": st.integers(1, 8), "d": st.integers(1, 40),
    "block": st.sampled_from((1, 4, 7, 16, 64)), "bits": st.sampled_from(SUPPORTED_BITS),
    "symmetric": st.booleans(), "kind": st.sampled_from(("correlated", "rank_deficient", "dead_inputs")),
    "groups": st.sampled_from((1, 2)),
})


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(blocked_problems)
def test_every_pass_keeps_blocked_grid_invariants(p: dict) -> None:
    rng = np.random.default_rng(p["seed"])
    W, H = weights(rng, p["out"] * p["groups"], p["d"]), gram(rng, p["d"], p["kind"], p["groups"])
    grid = Grid(p["bits"], p["symmetric"], p["block"])
    for name, fn in PASSES.items():
        qw = fn(W, H, grid)
        check_blocked(qw, W, grid)
        assert np.isfinite(objective(W, qw.dequantize(), H)), name


@pytest.mark.parametrize("clip", [False, True])
def test_rtn_blocks_are_independent_channels(clip: bool) -> None:
    """Blocked RTN equals per-channel RTN run on each block's columns (ragged last block included)."""
    W = np.random.default_rng(0).standard_t(3, size=(6, 45))
    grid = Grid(4, block_size=16)
    qw = rtn.quantize(W, None, grid, clip=clip)
    for b, start in enumerate(range(0, 45, 16)):
        part = rtn.quantize(W[:, start : start + 16], None, Grid(4), clip=clip)
        np.testing.assert_array_equal(qw.codes[:, start : start + 16], part.codes)
        np.testing.assert_array_equal(qw.scale[:, b], part.scale)
        np.testing.assert_array_equal(qw.zero_point[:, b], part.zero_point)


@pytest.mark.parametrize("name", ["rtn", "gptq", "comq"])
def test_one_block_covering_the_row_equals_per_channel(name: str) -> None:
    W, H = correlated_layer(2, out=12, d=40)
    per_channel, one_block = PASSES[name](W, H, Grid(3)), PASSES[name](W, H, Grid(3, block_size=64))
    np.testing.assert_array_equal(one_block.codes, per_channel.codes)
    np.testing.assert_allclose(one_block.scale[:, 0], per_channel.scale, rtol=1e-6)


def test_block_reduce_handles_a_short_last_block() -> None:
    X = np.arange(10.0)[None]
    np.testing.assert_array_equal(block_reduce(X, Grid(4, block_size=4)), [[6.0, 22.0, 17.0]])
    np.testing.assert_array_equal(block_reduce(X, Grid(4)), [45.0])


@pytest.mark.parametrize("order", ["channel", "shared"])
@pytest.mark.parametrize("init", ["rtn", "gptq", "float"])
def test_blocked_comq_never_raises_objective(order: str, init: str) -> None:
    rng = np.random.default_rng(1)
    W, H = weights(rng, 16, 50), gram(rng, 50, "correlated", groups=2)
    _, trace = comq.comq_trace(W, H, Grid(3, block_size=16), init=init, order=order, sweeps=4)
    assert non_increasing(trace[1:] if init == "float" else trace), trace


def test_block_scale_update_is_the_per_block_least_squares_optimum() -> None:
    """With H = I the blocks decouple, so the update lands on k_b.w_b / k_b.k_b for every block."""
    rng = np.random.default_rng(2)
    W = rng.normal(size=(5, 24))
    grid = Grid(4, symmetric=True, block_size=8)
    qw = comq.quantize(W, np.eye(24), grid, init="rtn", sweeps=1)
    K = qw.codes.astype(np.float64).reshape(5, 3, 8)
    optimum = (K * W.reshape(5, 3, 8)).sum(axis=2) / (K * K).sum(axis=2)
    np.testing.assert_allclose(qw.scale, optimum, rtol=1e-6)


@pytest.mark.parametrize("bits", (3, 4))
def test_blocks_help_and_comq_leads_on_outlier_inputs(bits: int) -> None:
    W, H = correlated_layer(bits, out=32, d=96)
    W[:, :8] *= 6.0  # a few large-weight inputs: a per-channel range wastes levels on the rest
    errors = {}
    for block in (None, 32):
        grid = Grid(bits, block_size=block)
        errors[block] = {n: objective(W, PASSES[n](W, H, grid).dequantize(), H) for n in ("rtn", "gptq", "comq")}
    assert errors[32]["rtn"] < errors[None]["rtn"]
    assert errors[32]["comq"] < errors[32]["gptq"] < errors[32]["rtn"]


def test_grouped_gram_with_blocks_equals_separate_groups() -> None:
    rng = np.random.default_rng(3)
    W, H = weights(rng, 9, 20), gram(rng, 20, "dead_inputs", 3)
    grid = Grid(4, block_size=8)
    for fn in (PASSES["gptq"], PASSES["comq"], PASSES["comq-rtn-channel"]):
        whole = fn(W, H, grid)
        for g in range(3):
            part = fn(W[3 * g : 3 * g + 3], H[g], grid)
            np.testing.assert_array_equal(whole.codes[3 * g : 3 * g + 3], part.codes)
            np.testing.assert_array_equal(whole.scale[3 * g : 3 * g + 3], part.scale)


# --- export: opset-21 blocked DequantizeLinear --------------------------------------------------------


def dequantize_blocked(model: onnx.ModelProto, weight: str) -> np.ndarray:
    """By hand from the stored initializers and the DequantizeLinear's axis and block_size."""
    inits = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    node = next(n for n in model.graph.node if n.name == f"{weight}_DequantizeLinear")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    axis, block = attrs["axis"], attrs["block_size"]
    codes = inits[f"{weight}_quantized"]
    scale = np.repeat(inits[f"{weight}_scale"], block, axis=axis).take(range(codes.shape[axis]), axis=axis)
    zp = np.repeat(inits[f"{weight}_zero_point"], block, axis=axis).take(range(codes.shape[axis]), axis=axis)
    return (codes - zp) * scale


@pytest.mark.parametrize("builder", [tiny.mlp_model, tiny.cnn_model])
@pytest.mark.parametrize("bits", [4, 8])
def test_blocked_export_stores_codes_times_block_scales(tmp_path, builder, bits: int) -> None:
    """MatMul ([in, out], axis 0) and Gemm transB=1 ([out, in], axis 1) with a short last block."""
    model = prepare(builder())
    layers, _ = find_layers(model)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    results = {layer.name: rtn.quantize(layer.matrix(inits[layer.weight]), None,
                                        Grid(bits, block_size=5 if len(layer.shape) == 2 else None))
               for layer in layers}
    path = tmp_path / "q.onnx"
    save_atomic(build_quantized_model(model, layers, results, {}), path)
    loaded = onnx.load(str(path))
    onnx.checker.check_model(loaded)
    assert {o.domain: o.version for o in loaded.opset_import}[""] == 21
    blocked = [layer for layer in layers if len(layer.shape) == 2]
    assert blocked
    for layer in blocked:
        expected = layer.tensor(results[layer.name].dequantize())
        np.testing.assert_allclose(dequantize_blocked(loaded, layer.weight), expected, rtol=1e-6, atol=1e-7)
    fake = onnx.ModelProto()
    fake.CopyFrom(model)
    for init in fake.graph.initializer:
        for layer in layers:
            if init.name == layer.weight:
                init.CopyFrom(numpy_helper.from_array(layer.tensor(results[layer.name].dequantize()), init.name))
    shape = [3, *[d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim][1:]]
    x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    run = lambda m: ort.InferenceSession(m, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]  # noqa: E731
    np.testing.assert_allclose(run(str(path)), run(fake.SerializeToString()), rtol=1e-4, atol=1e-5)


def test_block_wise_conv_weights_are_refused_before_writing():
    """A blocked grid reaching a Conv would give a model onnxruntime refuses (the scale's rank must match)."""
    model = tiny.conv_model()
    layers, _ = find_layers(model)
    W = layers[0].matrix(numpy_helper.to_array(model.graph.initializer[0]))
    qw = rtn.quantize(W, None, Grid(4, False, 16))
    with pytest.raises(OnnxqError, match="2-D weight"):
        build_quantized_model(model, layers, {layers[0].name: qw}, {})


def reference_block_scales(state, W, H, to_work, from_work) -> int:
    """The block-scale update without lazy updates: every block reads a freshly computed (W - Q) H."""
    d, size = W.shape[2], state.grid.block_size
    idx = block_index(d, state.grid)
    codes, scale32, changed = from_work(state.codes), state.scale32.copy(), 0
    K = codes.astype(np.float64) - state.zp[..., idx]
    for b, start in enumerate(range(0, d, size)):
        cols = slice(start, start + size)
        R = np.matmul(W - gptq.dequantize_codes(codes, scale32[..., idx], state.zp[..., idx]), H)
        Kb = K[:, :, cols]
        den = (Kb * np.matmul(Kb, H[:, cols, cols])).sum(axis=2)
        step = comq._block_step(scale32[:, :, b], (Kb * R[:, :, cols]).sum(axis=2), den)
        scale32[:, :, b] = (scale32[:, :, b] + step).astype(np.float32)
        changed += int(np.count_nonzero(step))
    if changed:
        state.scale32 = scale32
        state.coordinate_params()
        state.Q = to_work(gptq.dequantize_codes(codes, scale32[..., idx], state.zp[..., idx]))
    return changed


@pytest.mark.parametrize("order", ["channel", "shared"])
@pytest.mark.parametrize("span", [8, 16, 40, 1000])  # one block per span, several, a span cut by the fan-in
def test_lazy_block_scale_update_equals_the_plain_one(monkeypatch: pytest.MonkeyPatch, order: str, span: int) -> None:
    rng = np.random.default_rng(5)
    W, H = weights(rng, 12, 70), gram(rng, 70, "correlated", groups=2)
    grid = Grid(3, block_size=8)
    monkeypatch.setattr(comq, "SCALE_SPAN", span)
    got = comq.quantize(W, H, grid, init="rtn", order=order, sweeps=3)
    monkeypatch.setattr(comq, "update_block_scales", reference_block_scales)
    ref = comq.quantize(W, H, grid, init="rtn", order=order, sweeps=3)
    np.testing.assert_array_equal(got.codes, ref.codes)
    np.testing.assert_allclose(got.scale, ref.scale, rtol=1e-6)
    assert not np.array_equal(ref.scale, comq.quantize(W, H, grid, init="rtn", order=order, sweeps=3,
                                                       scale_update=False).scale)  # the update did move scales


@pytest.mark.parametrize("grid", [Grid(4), Grid(3, block_size=16), Grid(4, symmetric=True, block_size=32)])
def test_clip_search_in_row_chunks_equals_one_pass(monkeypatch: pytest.MonkeyPatch, grid: Grid) -> None:
    W = np.random.default_rng(6).standard_normal((50, 96)) ** 3  # heavy tails: clipping pays
    whole = rtn.clipped_grid(W, grid)
    monkeypatch.setattr(rtn, "CLIP_CHUNK", 96 * 7)  # 7 rows at a time, the last chunk shorter
    chunked = rtn.clipped_grid(W, grid)
    np.testing.assert_array_equal(chunked[0], whole[0])
    np.testing.assert_array_equal(chunked[1], whole[1])
    lo, hi = rtn.weight_range(W, grid)
    assert (chunked[0] < minmax_params(lo, hi, grid)[0]).any()  # some ranges were shrunk
