"""Block-wise scales and zero points count in the stored width the summary prints and in --avg-bits budgets."""

from __future__ import annotations

import numpy as np
import onnx
from conftest import save, tiny
from onnx import TensorProto, helper

import onnxq
from onnxq.export.qdq import keep_used_domains
from onnxq.report.summary import summary


def mlp(tmp_path):
    return save(tiny.mlp_model(features=64, hidden=48, classes=16), tmp_path / "mlp.onnx")


def calib(samples: int = 96):
    rng = np.random.default_rng(0)
    return [{"x": rng.normal(size=(16, 64)).astype(np.float32)} for _ in range(samples // 16)]


def test_stored_bits_follow_the_file(tmp_path):
    path = mlp(tmp_path)
    channel = onnxq.quantize(path, calib(), tmp_path / "c.onnx", bits=4, method="rtn")
    blocked = onnxq.quantize(path, calib(), tmp_path / "b.onnx", bits=4, method="rtn", block_size=16)
    params = sum(r.params for r in blocked.layers)
    assert channel.average_bits(stored=True) == 4.0
    grown = (blocked.average_bits(stored=True) - 4.0) * params / 8  # bytes the summary says the scales take
    file_growth = blocked.output_bytes - channel.output_bytes  # what the file really grew by
    channel_scales = (48 + 16) * (4 + 0.5)  # the per-channel float32 scale and INT4 zero point the blocks replace
    assert abs(grown - (file_growth + channel_scales)) < 100, (grown, file_growth)
    assert grown > 800  # 2.25 bits a weight: 240 blocks of a float32 scale and an INT4 zero point
    assert "6.25 stored (codes plus block-wise scales and zero points)" in summary(blocked)


def test_avg_bits_budget_counts_block_scales(tmp_path):
    result = onnxq.quantize(mlp(tmp_path), calib(160), tmp_path / "m.onnx", avg_bits=5.0, block_size=16,
                            method="rtn", bit_choices=(2, 3, 4, 8), verify_samples=0, clado_samples=32,
                            calib_size=96)
    assert result.average_bits(stored=True) <= 5.0 + 1e-9  # codes alone would have allowed 4 bits (6.25 stored)
    assert min(r.bits for r in result.layers) < 4


def test_output_declares_only_the_domains_it_uses(tmp_path, demo_model, demo_calib):
    out = tmp_path / "q.onnx"
    onnxq.quantize(demo_model, demo_calib, out, bits=4, method="rtn", calib_size=4)
    assert [o.domain for o in onnx.load(out).opset_import] == [""]  # onnxruntime's optimizer had added eight


def test_domains_used_in_subgraphs_are_kept():
    inner = helper.make_graph([helper.make_node("FusedGemm", ["a", "a"], ["b"], domain="com.microsoft")], "branch",
                              [], [helper.make_tensor_value_info("b", TensorProto.FLOAT, [1])])
    node = helper.make_node("If", ["c"], ["y"], then_branch=inner, else_branch=inner)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, 1) for d in
                                                    ("", "ai.onnx.ml", "com.microsoft", "com.microsoft.nchwc")])
    keep_used_domains(model)
    assert [o.domain for o in model.opset_import] == ["", "com.microsoft"]
