"""Log lines say what they are (information without a prefix, warnings with one), --log-level and -q choose how
much is shown, and --help carries no benchmark figures (those live in the README)."""

from __future__ import annotations

import logging
import re
import subprocess
import sys

from click.testing import CliRunner

from onnxq.cli import LevelFormatter, cli, log_level
from onnxq.report.progress import without_progress


def test_levels_and_prefixes():
    formatter = LevelFormatter()
    record = logging.LogRecord("onnxq", logging.INFO, __file__, 1, "reusing %s", ("s.npz",), None)
    assert formatter.format(record) == "onnxq: reusing s.npz"
    record.levelno, record.levelname = logging.WARNING, "WARNING"
    assert formatter.format(record) == "onnxq: warning: reusing s.npz"
    assert log_level([]) == logging.INFO
    assert log_level(["-q"]) == logging.WARNING
    assert log_level(["--log-level", "debug", "-q"]) == logging.DEBUG
    assert log_level(["--log-level=error"]) == logging.ERROR


def test_a_reused_cache_is_information_and_quiet_hides_it(tmp_path, cnn_path, cnn_calib):
    stats = tmp_path / "stats.npz"

    def run(*extra):
        args = [str(cnn_path), "--calib", str(cnn_calib), "-o", str(tmp_path / "q.onnx"), "--method", "rtn",
                "--stats", str(stats), *extra]
        done = subprocess.run([sys.executable, "-m", "onnxq", *args], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        return without_progress(done.stderr)

    run()
    assert any(line.startswith("onnxq: reusing calibration statistics") for line in run())
    assert not any("reusing" in line for line in run("-q"))
    assert not any("reusing" in line for line in run("--log-level", "warning"))


def test_help_quotes_no_benchmark_figures():
    runner = CliRunner()
    for command in ([], ["quantize"], ["eval"]):
        text = runner.invoke(cli, [*command, "--help"]).output
        assert not re.search(r"\d+(\.\d+)?\s*(x\b|%|times|s\b)|faster|slower than|minutes", text), text
