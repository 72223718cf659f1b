"""What the quick start's calibration gives: SqueezeNet 1.1 (the demo model) at --bits 4, calibrated on the ten
demo images, on them with --calib-augment 256, and on 256 images of imagenet-calib1000; top-1 and KL on all 1300
images of imagenet-val1300 (the README's quick-start figures).

    python bench/demo_calib.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from common import CALIB, ROOT, logits, model_path, require_shared, save_results, scores, val_set

import onnxq
from onnxq import ImagePreprocessing

DEMO_CALIB = ROOT / "models" / "demo_calib"


def main() -> None:
    require_shared()
    model = model_path("squeezenet1.1")
    x, y = val_set("squeezenet1.1")
    reference = logits(model, x)
    runs = {"ten demo images": (DEMO_CALIB, None), "ten demo images, --calib-augment 256": (DEMO_CALIB, 256),
            "256 imagenet-calib1000 images": (CALIB, None)}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, (calib, augment) in runs.items():
            out = Path(tmp) / "q.onnx"
            onnxq.quantize(model, calib, out, bits=4, calib_size=256,
                           preprocessing=ImagePreprocessing(preset="caffe", augment=augment))
            rows.append({"calibration": label, **scores(out, x, y, reference)})
            print(rows[-1], flush=True)
    table = "| calibration (SqueezeNet 1.1, --bits 4) | top-1 % | KL |\n|---|---|---|\n" + "".join(
        f"| {r['calibration']} | {r['top1']:.2f} | {r['kl']:.4f} |\n" for r in rows)
    print(table)
    save_results("demo_calib", {"squeezenet1.1": round(float((reference.argmax(1) == y).mean() * 100), 2)}, rows,
                 table)


if __name__ == "__main__":
    main()
