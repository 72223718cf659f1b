"""onnxq sweep: several budgets and widths from one calibration and one sensitivity measurement, a table with
the Pareto front, and an HTML report with the heat map and the curve."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnxq.report.sweep import SweepPoint, mark_pareto


def point(label: str, size: int, top1: float) -> SweepPoint:
    return SweepPoint("s", label, Path(label), size, 4.0, 4.0, top1=top1)


def test_the_pareto_front_keeps_points_nothing_beats_on_both_size_and_accuracy():
    points = [point("small", 100, 60.0), point("mid", 200, 70.0), point("dominated", 250, 65.0),
              point("big", 300, 71.0), point("same size worse", 200, 69.0)]
    mark_pareto(points)
    assert {p.label for p in points if p.pareto} == {"small", "mid", "big"}


def test_ties_in_agreement_are_broken_by_sqnr():
    a = SweepPoint("s", "a", Path("a"), 100, 4.0, 4.0, agreement=90.0, sqnr_db=20.0)
    b = SweepPoint("s", "b", Path("b"), 100, 4.0, 4.0, agreement=90.0, sqnr_db=25.0)
    mark_pareto([a, b])
    assert b.pareto and not a.pareto


def test_sweep_writes_every_point_a_table_and_a_report(tmp_path, cnn_path, cnn_calib):
    pytest.importorskip("matplotlib")
    out = tmp_path / "sweep"
    run = subprocess.run([sys.executable, "-m", "onnxq", "sweep", str(cnn_path), "--calib", str(cnn_calib),
                          "-o", str(out), "--budgets", "3,4", "--widths", "2,8", "--method", "rtn",
                          "--clado-samples", "4", "--verify-samples", "0", "--calib-size", "16"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    rows = [line for line in (out / "sweep.md").read_text().splitlines()[2:] if line.startswith("|")]
    assert len(rows) == 4 and any(row.endswith("* |") for row in rows)
    assert "reusing the sensitivity matrix" in run.stderr  # the second budget did not measure again
    assert (out / "statistics.npz").is_file() and (out / "sensitivity.npz").is_file()
    feed = {"x": np.random.default_rng(0).normal(size=(1, 3, 16, 16)).astype(np.float32)}
    for model in out.glob("cnn_*.onnx"):
        ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, feed)
    budget = onnx.load(str(out / "cnn_3_bits.onnx"))
    assert any(p.key == "onnxq.mixed_precision" for p in budget.metadata_props)
    page = (out / "report.html").read_text()
    assert "CLADO sensitivity matrix" in page and "Accuracy against size" in page
    assert page.count("data:image/png") >= 3 and "One point only" not in page
