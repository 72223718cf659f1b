"""What the quick start's calibration gives: SqueezeNet 1.1 (the demo model) at --bits 4, calibrated on the ten
demo images, on them with --calib-augment 256, and on 256 images of imagenet-calib1000; top-1, KL, top-1 agreement
and SQNR against the float model on all 1300 images of imagenet-val1300 (what ``onnxq eval`` measures), beside
the check each run printed (the README's figures). bench/demo_augment.py measures the augmentation over seeds.

    python bench/demo_calib.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from common import CALIB, ROOT, kl_to, logits, model_path, require_shared, save_results, val_set

import onnxq
from onnxq import ImagePreprocessing

DEMO_CALIB = ROOT / "models" / "demo_calib"


def against_float(quantized: np.ndarray, reference: np.ndarray, labels: np.ndarray) -> dict:
    """Top-1 (%), and as ``onnxq eval`` reports them: agreement with the float model (%), mean KL, SQNR (dB)."""
    noise = float(((quantized.astype(np.float64) - reference) ** 2).sum())
    return {"top1": round(float((quantized.argmax(1) == labels).mean() * 100), 2),
            "kl": round(kl_to(reference, quantized), 4),
            "agreement": round(float((quantized.argmax(1) == reference.argmax(1)).mean() * 100), 1),
            "sqnr": round(10 * float(np.log10((reference.astype(np.float64) ** 2).sum() / noise)), 1)}


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
            result = onnxq.quantize(model, calib, out, bits=4, calib_size=256,
                                    preprocessing=ImagePreprocessing(preset="caffe", augment=augment))
            check = {"held_out": result.check_held_out, "agreement": round(100 * result.top1_agreement, 1),
                     "kl": round(result.check_kl, 4), "sqnr": round(result.output_sqnr_db, 1)}
            rows.append({"calibration": label, **against_float(logits(out, x), reference, y),
                         "check": check})
            print(rows[-1], flush=True)
    table = ("| calibration (SqueezeNet 1.1, --bits 4) | top-1 % | KL | agreement % | SQNR dB "
             "| printed check: samples, agreement %, KL, SQNR dB |\n|---|---|---|---|---|---|\n")
    for r in rows:
        c = r["check"]
        where = "held out" if c["held_out"] else "calibration batch"
        table += (f"| {r['calibration']} | {r['top1']:.2f} | "
                  f"{r['kl']:.4f} | {r['agreement']:.1f} | {r['sqnr']:.1f} | {where}, {c['agreement']:.1f}, "
                  f"{c['kl']:.4f}, {c['sqnr']:.1f} |\n")
    print(table)
    save_results("demo_calib", {"squeezenet1.1": round(float((reference.argmax(1) == y).mean() * 100), 2)}, rows,
                 table)


if __name__ == "__main__":
    main()
