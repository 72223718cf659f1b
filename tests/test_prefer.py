"""--prefer speed: 8-bit layers run as W8A8 integer kernels, lower widths stay weight-only, and CLADO trades a
little predicted loss for moving the multiply-add-heavy layers to 8 bits under the same size budget."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

import onnxq
from onnxq.allocation.mixed import Budget, allocate_bits
from onnxq.errors import OnnxqError
from onnxq.graph.layers import Layer
from onnxq.report.kernels import kernel_report


def runs(path) -> dict[str, str]:
    return {row["layer"]: row["runs"] for row in kernel_report(path)}


def test_uniform_speed_makes_only_8_bit_layers_integer(tmp_path, cnn_path, cnn_calib):
    out = tmp_path / "speed.onnx"
    onnxq.quantize(cnn_path, cnn_calib, out, bits=4, first_last_bits=8, method="rtn", act_bits=8,
                   prefer="speed")
    kernels = runs(out)
    assert kernels["conv1"] == kernels["fc"] == "integer"
    assert kernels["conv2_grouped"] != "integer" and kernels["conv3_depthwise"] != "integer"


def test_mixed_speed_keeps_the_budget_and_favours_integer_layers(tmp_path, cnn_path, cnn_calib):
    plans = {}
    for prefer in ("size", "speed"):
        out = tmp_path / f"{prefer}.onnx"
        result = onnxq.quantize(cnn_path, cnn_calib, out, method="rtn", budget=Budget(avg_bits=5.0),
                                bit_choices=(2, 4, 8), sensitivity="diagonal", clado_samples=8,
                                **({"act_bits": 8, "prefer": "speed"} if prefer == "speed" else {}))
        assert result.average_bits(stored=True) <= 5.0 + 1e-9
        plans[prefer] = result.mixed
        meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
        assert json.loads(meta["onnxq.mixed_precision"])["prefer"] == prefer
    speed = plans["speed"]
    assert 0 < speed.integer_mac_share <= 1
    kernels = runs(tmp_path / "speed.onnx")
    assert {name for name, how in kernels.items() if how == "integer"} == {
        name for name, bits in speed.bits.items() if bits == 8}
    assert plans["size"].integer_mac_share is None
    # speed never buys a lower loss (each run measures its own Omega in onnxruntime: same widths differed 1e-4)
    assert speed.predicted_loss >= plans["size"].predicted_loss * (1 - 1e-3)


def layer(name: str, params: int) -> Layer:
    return Layer(name=name, op_type="Gemm", weight=f"{name}_w", activation="x", shape=(params // 8, 8))


def test_speed_term_moves_the_compute_heavy_layer_to_8_bits():
    """Two equal-size layers, room for one at 8 bits: size keeps the more sensitive one at 8 bits, speed the one
    doing almost all the multiply-adds (for 10 % more predicted loss)."""
    layers = [layer("heavy", 64), layer("light", 64)]
    choices = [(4, 8), (4, 8)]
    omega = np.diag([1.0, 0.0, 1.1, 0.0])  # heavy@4, heavy@8, light@4, light@8
    budget = Budget(avg_bits=6.0)
    size = allocate_bits(layers, choices, budget, omega, 0, 1, "fast", 10.0)
    speed = allocate_bits(layers, choices, budget, omega, 0, 1, "fast", 10.0, macs={"heavy": 99.0, "light": 1.0})
    assert size.bits == {"heavy": 4, "light": 8} and size.predicted_loss == pytest.approx(1.0)
    assert speed.bits == {"heavy": 8, "light": 4} and speed.predicted_loss == pytest.approx(1.1)
    assert speed.integer_mac_share == pytest.approx(0.99)


def test_prefer_must_be_known():
    with pytest.raises(OnnxqError, match="--prefer"):
        onnxq.Config.from_options(act_bits=8, prefer="fast")
