"""The staged Python API (onnxq.calibrate, onnxq.allocate, onnxq.quantize with statistics and a plan), and the
one calibration pass that W8A8 runs take (Gram statistics and activation histograms together, cached by --stats)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
import tiny
from conftest import cnn_samples, save

import onnxq
import onnxq.calibration.capture
from onnxq import Activations, Config, Data, Layers, MixedPrecision
from onnxq.errors import OnnxqError
from onnxq.export.act_qdq import calibration_candidates, plan_qdq
from onnxq.graph.layers import find_layers
from onnxq.graph.prepare import prepare

RTN = {"method": "rtn"}
BUDGET = MixedPrecision(avg_bits=3, samples=16, verify_samples=16)


@pytest.fixture
def calib40(tmp_path: Path) -> Path:
    """40 samples: 24 to calibrate on, 16 held out for CLADO's oracle and its verification."""
    return cnn_samples(tmp_path / "calib", 40)


@pytest.fixture
def captures(monkeypatch) -> list[int]:
    """The number of tensors each capture pass over a model exposed, one entry per pass."""
    passes: list[int] = []
    original = onnxq.calibration.capture.CaptureEngine.run

    def counted(engine, batches, observers, on_batch=None):
        passes.append(len(engine.captured))
        return original(engine, batches, observers, on_batch)

    monkeypatch.setattr(onnxq.calibration.capture.CaptureEngine, "run", counted)
    return passes


def small(**sections) -> Config:
    return Config(data=Data(calib_size=24), **sections)


def test_the_stages_give_the_file_of_one_call(tmp_path, cnn_path, calib40):
    budget = MixedPrecision(avg_bits=6.5, bit_choices=(4, 8), samples=16, verify_samples=16)  # INT2 + A8: see note
    config = small(mixed=budget, activations=Activations(bits=8), layers=Layers(first_last_bits=8))
    whole = onnxq.quantize(cnn_path, calib40, tmp_path / "whole.onnx", config)
    statistics = onnxq.calibrate(cnn_path, calib40, config)
    plan = onnxq.allocate(cnn_path, calib40, config, statistics=statistics)
    staged = onnxq.quantize(cnn_path, calib40, tmp_path / "staged.onnx", config, statistics=statistics, plan=plan)
    assert plan.bits == whole.mixed.bits and plan.picked == whole.mixed.picked
    assert (tmp_path / "staged.onnx").read_bytes() == (tmp_path / "whole.onnx").read_bytes()
    assert staged.mixed is plan and staged.calibration_samples == whole.calibration_samples == 24


def test_statistics_from_a_proto_and_reused_for_other_widths(tmp_path, cnn_path, calib40, captures):
    config = small()
    statistics = onnxq.calibrate(onnx.load(str(cnn_path)), calib40, config)
    assert isinstance(statistics, onnxq.Statistics) and statistics.samples == 24 and not statistics.activations
    assert len(captures) == 1
    for bits in (2, 8):
        reused = onnxq.quantize(cnn_path, calib40, config=config.with_options(bits=bits), statistics=statistics)
        fresh = onnxq.quantize(cnn_path, calib40, config=config.with_options(bits=bits))
        assert reused.model.SerializeToString() == fresh.model.SerializeToString()
    assert len(captures) == 3  # the two fresh runs calibrated; the reusing runs did not
    assert config == small()  # the caller's config is never changed


@pytest.mark.parametrize("prefer", ["size", "speed"])
def test_a_w8a8_run_calibrates_in_one_pass(tmp_path, cnn_path, calib40, captures, prefer):
    model = prepare(tiny.cnn_model())
    layers, _ = find_layers(model)
    budget = MixedPrecision(avg_bits=6.5, bit_choices=(4, 8), samples=16) if prefer == "speed" else None
    onnxq.quantize(cnn_path, calib40, tmp_path / "q.onnx", small(activations=Activations(bits=8, prefer=prefer),
                                                                 mixed=budget))
    gram_inputs = {layer.activation for layer in layers} - {"x"}
    planned = plan_qdq(model, layers, [layer.name for layer in layers]).calibrated  # --prefer size: every layer
    histogram_tensors = set(calibration_candidates(model, layers) if prefer == "speed" else planned) - {"x"}
    assert captures == [len(gram_inputs | histogram_tensors)]  # one pass exposed both sets of tensors


def test_stats_cover_w8a8_runs(tmp_path, cnn_path, calib40, captures, caplog):
    stats = tmp_path / "stats.npz"
    config = Config(data=Data(calib_size=24, stats=stats), activations=Activations(bits=8))
    weight_only = Config(data=Data(calib_size=24, stats=stats))
    onnxq.quantize(cnn_path, calib40, tmp_path / "w4.onnx", weight_only, **RTN)
    with caplog.at_level(logging.WARNING, logger="onnxq"):
        onnxq.quantize(cnn_path, calib40, tmp_path / "a.onnx", config, **RTN)
    assert "holds no activation statistics" in caplog.text and len(captures) == 2  # measured again, both at once
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="onnxq"):
        onnxq.quantize(cnn_path, calib40, tmp_path / "b.onnx", config, **RTN)
        onnxq.quantize(cnn_path, calib40, tmp_path / "c.onnx", weight_only, **RTN)
    assert caplog.text.count("reusing calibration statistics") == 2 and len(captures) == 2
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    assert (tmp_path / "c.onnx").read_bytes() == (tmp_path / "w4.onnx").read_bytes()


def test_saved_statistics_are_reused_by_a_later_run(tmp_path, cnn_path, calib40, captures):
    config = small(activations=Activations(bits=8, method="percentile"))
    statistics = onnxq.calibrate(cnn_path, calib40, config)
    statistics.save(tmp_path / "s.npz")
    cached = config.with_options(stats=tmp_path / "s.npz")
    again = onnxq.calibrate(cnn_path, calib40, cached)
    assert len(captures) == 1 and again.key == statistics.key
    assert list(again.activations) == list(statistics.activations)
    first = onnxq.quantize(cnn_path, calib40, config=config, statistics=statistics)
    second = onnxq.quantize(cnn_path, calib40, config=cached)
    assert first.model.SerializeToString() == second.model.SerializeToString() and len(captures) == 1


def test_statistics_that_do_not_fit_the_run_are_refused(tmp_path, cnn_path, calib40):
    statistics = onnxq.calibrate(cnn_path, calib40, small())
    with pytest.raises(OnnxqError, match="calib-size"):
        onnxq.quantize(cnn_path, calib40, config=Config(data=Data(calib_size=20)), statistics=statistics)
    other = save(tiny.cnn_model(seed=3), tmp_path / "other.onnx")
    with pytest.raises(OnnxqError, match="the model"):
        onnxq.quantize(other, calib40, config=small(), statistics=statistics)
    with pytest.raises(OnnxqError, match="no activation histograms"):
        onnxq.quantize(cnn_path, calib40, config=small(activations=Activations(bits=8)), statistics=statistics)


def test_a_run_measures_statistics_before_adding_biases(cnn_path, calib40):
    with onnxq.open_run(cnn_path, calib40, small()) as run:
        statistics = run.calibrate()
        rounded = run.round((4, 8), statistics)
        assert set(rounded) == {(layer.name, b) for layer in run.layers for b in (4, 8)}
        with pytest.raises(OnnxqError, match="before rounding"):
            run.calibrate()


def test_allocate_needs_a_budget_and_a_plan_must_fit(tmp_path, cnn_path, calib40):
    with pytest.raises(OnnxqError, match="needs a budget"):
        onnxq.allocate(cnn_path, calib40, small())
    plan = onnxq.allocate(cnn_path, calib40, small(mixed=BUDGET))
    assert isinstance(plan, onnxq.BitPlan) and set(plan.bits.values()) <= {2, 3, 4, 8}
    other = save(tiny.mlp_model(), tmp_path / "mlp.onnx")
    feeds = [{"x": np.ones((4, 12), np.float32)}] * 4
    with pytest.raises(OnnxqError, match="does not fit this model's layers"):
        onnxq.quantize(other, feeds, config=Config(), plan=plan)


@pytest.mark.parametrize("seed", range(5))
def test_calibration_candidates_cover_every_plan(demo_model, seed):
    """Whichever layers end up with activation Q/DQ (--prefer speed picks them after calibration), the tensors
    their plan calibrates were captured in the one pass."""
    model = prepare(onnx.load(str(demo_model)))
    layers, _ = find_layers(model)
    candidates = set(calibration_candidates(model, layers))
    rng = np.random.default_rng(seed)
    chosen = [layer.name for layer in layers if rng.random() < 0.5] if seed else [layer.name for layer in layers]
    assert set(plan_qdq(model, layers, chosen).calibrated) <= candidates


PUBLIC_MODULES = ("onnxq.passes", "onnxq.config")  # the numerical library and the config's vocabularies
NOT_YET_PUBLIC: dict[str, set[str]] = {}  # bench scripts allowed below the API (none left)


def bench_imports(path: Path) -> list[tuple[str, str]]:
    """``(module, name)`` of every onnxq import in a script, and ``("onnxq", attr)`` of every ``onnxq.attr`` use."""
    import ast

    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "onnxq":
            found += [(node.module, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(alias.name, "") for alias in node.names if alias.name.split(".")[0] == "onnxq"]
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "onnxq":
            found.append(("onnxq", node.attr))
    return found


def test_bench_uses_only_the_public_api():
    bench = Path(__file__).resolve().parents[1] / "bench"
    wrong = []
    for script in sorted(bench.glob("*.py")):
        for module, name in bench_imports(script):
            public = (module == "onnxq" and (not name or name in onnxq.__all__ or name in ("passes", "config"))
                      or module.startswith(PUBLIC_MODULES))
            if name.startswith("_") or not (public or module in NOT_YET_PUBLIC.get(script.name, ())):
                wrong.append(f"{script.name}: {module} {name}")
    assert not wrong


def test_evaluate_and_write_report_through_the_api(tmp_path, cnn_path, calib40):
    import json

    import onnxruntime as ort

    quantized = tmp_path / "q.onnx"
    onnxq.quantize(cnn_path, calib40, quantized, small(), bits=2, **RTN)
    result = onnxq.evaluate(quantized, cnn_path, calib40)
    samples = [np.load(f) for f in sorted(calib40.iterdir())]
    outputs = [np.concatenate([ort.InferenceSession(str(p)).run(None, {"x": s})[0] for s in samples])
               for p in (cnn_path, quantized)]
    assert result.samples == 40
    assert result.agreement == pytest.approx(100 * np.mean(outputs[0].argmax(1) == outputs[1].argmax(1)))

    statistics = onnxq.calibrate(cnn_path, calib40, small())
    context = onnxq.write_report(quantized, cnn_path, calib40, json=tmp_path / "r.json", evaluation=result,
                                 statistics=statistics, samples=8, title="T")
    written = json.loads((tmp_path / "r.json").read_text())
    assert written["title"] == context["title"] == "T" and written["eval"]["agreement"] == result.agreement
    assert all(row["gram_error"] is not None and row["gram_error"] > 0 for row in written["layers"])
    plain = onnxq.write_report(quantized, cnn_path, calib40, samples=8)
    assert all(row["gram_error"] is None for row in plain["layers"]) and not (tmp_path / "r.html").exists()
