"""The demo model's report: SqueezeNet 1.1 at ``--avg-bits 3`` (CLADO), written to docs/demo_report.html.

With the shared assets (../shared or $ONNXQ_SHARED), as the other benchmarks: calibration on 256 images of
imagenet-calib1000 (every 4th), sensitivities on the next 128 (held out), top-1 on all 1300 of imagenet-val1300,
and a top-1 against size curve over several budgets and uniform widths. Without them: the ten demo images
for everything, and the curve shows top-1 agreement with the float model instead of top-1.
Also writes docs/demo_report.json (the same numbers) and, when chromium is installed, docs/demo_report.png.

    python bench/report_demo.py [--budgets 2.5,3,4,5] [--uniform 2,4,8]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CALIB, MODELS, RESULTS, ROOT, SHARED, VAL, top1, val_set  # noqa: E402

import onnxq  # noqa: E402

MODEL = ROOT / "models" / "squeezenet1.1.onnx"
DEMO_CALIB = ROOT / "models" / "demo_calib"
DOCS = ROOT / "docs"
PREP = MODELS["squeezenet1.1"]  # the demo flags: --resize 256x256 --channel-order BGR --mean 104,117,123 ...
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def scorer(shared: bool) -> Callable[[Path], dict]:
    """Top-1 on imagenet-val1300 (shared assets) or top-1 agreement on the demo images."""
    if shared:
        x, y = val_set("squeezenet1.1")
        return lambda path: {"top1": top1(path, x, y)}
    return lambda path: {"agreement": onnxq.evaluate(path, MODEL, DEMO_CALIB, preprocessing=PREP).agreement}


def quantize(out: Path, calib: Path, stats: Path, omega: Path, **options) -> onnxq.QuantizationResult:
    start = time.perf_counter()
    mixed = {"sensitivity_cache": omega, "clado_time_limit": 120} if "avg_bits" in options else {}
    result = onnxq.quantize(MODEL, calib, out, stats=stats, preprocessing=PREP, **mixed, **options)
    print(f"{out.name}: {result.average_bits(stored=True):.2f} stored bits, {out.stat().st_size / 1e6:.3f} MB, "
          f"{time.perf_counter() - start:.0f} s", flush=True)
    return result


def curve(tmp: Path, calib: Path, stats: Path, omega: Path, budgets: list[float], uniform: list[int],
          score: Callable[[Path], dict]) -> list[dict]:
    """One point per CLADO budget and per uniform width: file size, average stored bits and accuracy."""
    runs = [("CLADO mixed precision", f"{b:g} bits", {"avg_bits": b}) for b in budgets]
    runs += [("uniform width", f"{b}-bit", {"bits": b}) for b in uniform]
    points = []
    for series, label, options in runs:
        out = tmp / f"curve_{len(points)}.onnx"
        result = quantize(out, calib, stats, omega, **options)
        points.append({"series": series, "label": label, "size_bytes": out.stat().st_size,
                       "avg_bits": result.average_bits(stored=True), **score(out)})
        print(f"  {points[-1]}", flush=True)
    return points


def screenshot(html: Path, png: Path, height: int = 4000) -> bool:
    """Render the page with headless chromium, when it is installed."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        print("chromium not found: no screenshot")
        return False
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--screenshot={png}",
                        f"--window-size=1200,{height}", html.resolve().as_uri()],
                       check=True, capture_output=True, timeout=120)
    return True


def main(budgets: list[float], uniform: list[int], samples: int) -> None:
    shared = (SHARED / "models").is_dir() and CALIB.is_dir() and VAL.is_dir()
    calib, data = (CALIB, VAL) if shared else (DEMO_CALIB, DEMO_CALIB)
    cache = RESULTS / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    stats = cache / ("stats_squeezenet1.1_256.npz" if shared else "stats_squeezenet1.1_demo.npz")
    omega = cache / ("omega_squeezenet1.1_comq_fast_128.npz" if shared else "omega_squeezenet1.1_comq_fast_demo.npz")
    score = scorer(shared)
    DOCS.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        main_model = Path(tmp) / "squeezenet1.1_avg3.onnx"
        result = quantize(main_model, calib, stats, omega, avg_bits=3)
        statistics = onnxq.calibrate(MODEL, calib, stats=stats, preprocessing=PREP)  # the file the run wrote
        evaluation = onnxq.evaluate(main_model, MODEL, data, preprocessing=PREP)
        print(f"eval: {evaluation.as_dict()}", flush=True)
        points = curve(Path(tmp), calib, stats, omega, budgets, uniform, score)
        onnxq.write_report(main_model, MODEL, data, DOCS / "demo_report.html", DOCS / "demo_report.json",
                           evaluation=evaluation, plan=result.mixed, curve=points, statistics=statistics,
                           preprocessing=PREP, samples=samples,
                           title="onnxq report: SqueezeNet 1.1 at 3 bits per weight (CLADO)",
                           quantized="squeezenet1.1 at --avg-bits 3 (not kept)",
                           reference="models/squeezenet1.1.onnx", description=describe(shared, samples))
    print(f"wrote {DOCS / 'demo_report.html'} and {DOCS / 'demo_report.json'}")
    if screenshot(DOCS / "demo_report.html", DOCS / "demo_report.png"):
        print(f"wrote {DOCS / 'demo_report.png'}")


def describe(shared: bool, samples: int) -> str:
    """Where the figures come from, for the page."""
    if shared:
        data = ("Calibration: 256 images of imagenet-calib1000, every 4th (sensitivities on the next 128, verification "
                "on the next 512); accuracy: all 1300 images of imagenet-val1300")
    else:
        data = "Calibration and accuracy: the ten demo images in models/demo_calib"
    return (f"Made by bench/report_demo.py: onnxq quantize models/squeezenet1.1.onnx --avg-bits 3 (COMQ rounding, "
            f"widths 2/3/4/8, fast CLADO sensitivities). {data}; per-layer diagnostics on the first {samples} "
            "evaluation images.")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", default="2.5,3,4,5", help="CLADO --avg-bits budgets for the curve")
    parser.add_argument("--uniform", default="2,4,8", help="uniform widths for the curve")
    parser.add_argument("--samples", type=int, default=16, help="samples for the per-layer diagnostics")
    args = parser.parse_args()
    main([float(v) for v in args.budgets.split(",") if v], [int(v) for v in args.uniform.split(",") if v],
         args.samples)
