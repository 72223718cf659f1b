"""Issue 7 benchmark: calibration memory does not grow with the calibration set.

Runs the CLI in a fresh process per size (RTN, so the run is dominated by calibration) and records the peak
resident memory (ru_maxrss of the child) for 64 and 1000 images of imagenet-calib1000.

    python bench/calib_memory.py [--model squeezenet1.1] [--sizes 64,1000]
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
from common import CALIB, MODELS, RESULTS, model_path, require_shared


def flags(name: str) -> list[str]:
    """The CLI preprocessing flags equivalent to bench/common.py's MODELS entry."""
    prep = MODELS[name]
    resize = prep.resize if isinstance(prep.resize, int) else f"{prep.resize[0]}x{prep.resize[1]}"
    values = {"--resize": resize, "--mean": prep.mean and ",".join(map(str, prep.mean)),
              "--std": prep.std and ",".join(map(str, prep.std)), "--scale": prep.scale,
              "--channel-order": prep.channel_order}
    return [part for flag, value in values.items() if value is not None for part in (flag, str(value))]


def peak_rss_mb(name: str, size: int) -> tuple[float, float]:
    """Peak RSS (MB) and wall time of one CLI run in a child process."""
    with tempfile.TemporaryDirectory() as tmp:
        script = ("import resource, sys; from onnxq.cli import main; sys.argv = ['onnxq'] + sys.argv[1:]\n"
                  "try:\n    main()\nfinally:\n"
                  "    print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)")
        start = time.perf_counter()
        run = subprocess.run([sys.executable, "-c", script, str(model_path(name)), "--calib", str(CALIB), "-o",
                              str(Path(tmp) / "q.onnx"), "--method", "rtn", "--bits", "8", "--calib-size", str(size),
                              "-q", *flags(name)], capture_output=True, text=True)
        seconds = time.perf_counter() - start
    peak = [line for line in run.stderr.splitlines() if line.startswith("PEAK")]
    if not peak:
        sys.exit(run.stderr)
    return int(peak[-1].split()[1]) / 1024, seconds


@click.command()
@click.option("--model", default="squeezenet1.1")
@click.option("--sizes", default="64,1000")
def main(model: str, sizes: str) -> None:
    require_shared()
    rows = []
    for size in map(int, sizes.split(",")):
        peak, seconds = peak_rss_mb(model, size)
        rows.append({"model": model, "images": size, "peak_rss_mb": round(peak, 1), "seconds": round(seconds, 1)})
        click.echo(json.dumps(rows[-1]))
    growth = rows[-1]["peak_rss_mb"] / rows[0]["peak_rss_mb"] - 1
    summary = {"rows": rows, "growth": round(growth, 4)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "calib_memory.json").write_text(json.dumps(summary, indent=1))
    click.echo(f"peak RSS grows by {100 * growth:.1f} % from {rows[0]['images']} to {rows[-1]['images']} images")


if __name__ == "__main__":
    main()
