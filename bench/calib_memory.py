"""Issues 7 and 17 (goal 5): memory does not grow with the calibration set, in every mode.

Runs the CLI in a fresh process per size and mode and records the peak resident memory (ru_maxrss of the child)
for 64 and 1000 images of imagenet-calib1000 (all it has). Modes: ``rtn`` (W8 round to nearest, so the run is
dominated by calibration), ``default`` (W4, first/last 8), ``sequential`` and ``budget`` (``--avg-bits 3``).

    python bench/calib_memory.py [--model squeezenet1.1] [--sizes 64,1000] [--modes rtn,default,sequential,budget]
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


MODES = {  # the job of each mode: weight-only RTN W8 (calibration alone), the default, sequential, a budget
    "rtn": ["--method", "rtn", "--bits", "8"],
    "default": ["--bits", "4", "--first-last-bits", "8"],
    "sequential": ["--bits", "4", "--first-last-bits", "8", "--sequential"],
    "budget": ["--avg-bits", "3"],
}


def peak_rss_mb(name: str, size: int, mode: str = "rtn") -> tuple[float, float]:
    """Peak RSS (MB) and wall time of one CLI run in a child process."""
    with tempfile.TemporaryDirectory() as tmp:
        script = ("import resource, sys; from onnxq.cli import main; sys.argv = ['onnxq'] + sys.argv[1:]\n"
                  "try:\n    main()\nfinally:\n"
                  "    print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)")
        start = time.perf_counter()
        run = subprocess.run([sys.executable, "-c", script, str(model_path(name)), "--calib", str(CALIB), "-o",
                              str(Path(tmp) / "q.onnx"), *MODES[mode], "--calib-size", str(size),
                              "-q", *flags(name)], capture_output=True, text=True)
        seconds = time.perf_counter() - start
    peak = [line for line in run.stderr.splitlines() if line.startswith("PEAK")]
    if not peak:
        sys.exit(run.stderr)
    return int(peak[-1].split()[1]) / 1024, seconds


@click.command()
@click.option("--model", default="squeezenet1.1")
@click.option("--sizes", default="64,1000")
@click.option("--modes", default="rtn", show_default=True, help=f"Comma-separated, of {', '.join(MODES)}.")
def main(model: str, sizes: str, modes: str) -> None:
    require_shared()
    rows, growth = [], {}
    for mode in modes.split(","):
        ours = []
        for size in map(int, sizes.split(",")):
            peak, seconds = peak_rss_mb(model, size, mode)
            ours.append({"model": model, "mode": mode, "images": size, "peak_rss_mb": round(peak, 1),
                         "seconds": round(seconds, 1)})
            click.echo(json.dumps(ours[-1]))
        growth[mode] = round(ours[-1]["peak_rss_mb"] / ours[0]["peak_rss_mb"] - 1, 4)
        click.echo(f"{mode}: peak RSS grows by {100 * growth[mode]:.1f} % from {ours[0]['images']} to "
                   f"{ours[-1]['images']} images")
        rows += ours
    RESULTS.mkdir(parents=True, exist_ok=True)
    tag = "calib_memory" if modes == "rtn" and model == "squeezenet1.1" else f"calib_memory_{model}"
    (RESULTS / f"{tag}.json").write_text(json.dumps({"rows": rows, "growth": growth}, indent=1))


if __name__ == "__main__":
    main()
