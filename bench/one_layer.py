"""One layer quantized, every other layer float: what that layer alone costs on imagenet-val1300.

Uses the CLI's own path (``--nodes_to_exclude`` with a pattern that keeps only the named layer), calibrated on
256 images of imagenet-calib1000 (every 4th). Prints the top-1 and the mean KL divergence of the output from the
float model's. Used in the README for the bound on SqueezeNet's avg-3 budget (conv10 at 2 bits) and for the
effect of Gram shrinkage on MobileNet v1's classifier.

    python bench/one_layer.py --model squeezenet1.1 --layer conv10 --bits 2
    python bench/one_layer.py --model mobilenet_v1_0.75_224 --layer conv_preds --bits 2 [--no-shrinkage]
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import click
from common import CALIB, MODELS, kl_to, logits, model_path, require_shared, val_set

import onnxq


@click.command()
@click.option("--model", "name", default="squeezenet1.1")
@click.option("--layer", default="conv10", help="Node name of the layer to quantize (as in the layer table).")
@click.option("--bits", default=2)
@click.option("--method", default="comq")
@click.option("--shrinkage/--no-shrinkage", default=True)
def main(name: str, layer: str, bits: int, method: str, shrinkage: bool) -> None:
    require_shared()
    x, y = val_set(name)
    reference = logits(model_path(name), x)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "q.onnx"
        onnxq.quantize(model_path(name), CALIB, out, bits=bits, method=method, shrinkage=shrinkage,
                       nodes_to_exclude=[f"(?!{re.escape(layer)}$).*"], preprocessing=MODELS[name])
        quantized = logits(out, x)
    kl = kl_to(reference, quantized)
    top1 = float((quantized.argmax(1) == y).mean() * 100)
    float_top1 = float((reference.argmax(1) == y).mean() * 100)
    click.echo(f"{name}: {layer} alone at {bits} bits ({method}, shrinkage {'on' if shrinkage else 'off'}): "
               f"top-1 {top1:.2f} % (FP32 {float_top1:.2f} %), KL to FP32 {kl:.4f} on imagenet-val1300")


if __name__ == "__main__":
    main()
