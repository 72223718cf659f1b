"""``onnxq eval`` against an independent computation on a small labelled image set."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import tiny
from conftest import save
from PIL import Image

from onnxq.data.images import ImagePreprocessing, list_images
from onnxq.report.evaluate import evaluate

PREP = ImagePreprocessing(size=(16, 16), resize=(16, 16))


def labelled_folder(root, per_class=4, classes=3):
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class_{c}").mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(root / f"class_{c}" / f"{i}.png")
    return root


def independent_top1(model_path, folder) -> tuple[float, np.ndarray]:
    files = list_images(folder)
    x = np.concatenate([PREP.load(f) for f in files])
    labels = np.array([int(f.parent.name.split("_")[1]) for f in files])
    logits = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    return float((logits.argmax(1) == labels).mean() * 100), logits


def test_eval_top1_matches_independent_computation(tmp_path):
    folder = labelled_folder(tmp_path / "data")
    reference = save(tiny.cnn_model(seed=0, classes=3), tmp_path / "ref.onnx")
    other = save(tiny.cnn_model(seed=1, classes=3), tmp_path / "other.onnx")
    result = evaluate(other, reference, folder, PREP, batch_size=5)
    expected, q_logits = independent_top1(other, folder)
    ref_top1, r_logits = independent_top1(reference, folder)
    assert result.samples == 12
    assert np.isclose(result.top1, expected) and np.isclose(result.reference_top1, ref_top1)
    assert result.top5 == 100.0  # three classes: the label is always within the top 5
    assert np.isclose(result.agreement, (q_logits.argmax(1) == r_logits.argmax(1)).mean() * 100)
    noise = ((q_logits.astype(np.float64) - r_logits) ** 2).sum()
    assert np.isclose(result.sqnr_db, 10 * np.log10((r_logits.astype(np.float64) ** 2).sum() / noise))


def test_eval_labels_file_and_cli_json(tmp_path):
    folder = labelled_folder(tmp_path / "data", per_class=2, classes=2)
    (folder / "labels.txt").write_text("\n".join(f"{f.name} {int(f.parent.name[-1])}" for f in list_images(folder)))
    reference = save(tiny.cnn_model(classes=2), tmp_path / "ref.onnx")
    out = subprocess.run([sys.executable, "-m", "onnxq", "eval", reference, "--reference", reference, "--data", folder,
                          "--json", "--image-size", "16x16", "--resize", "16x16"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    figures = json.loads(out.stdout)
    assert figures["agreement"] == 100.0 and figures["top1"] == figures["reference_top1"]
    assert figures["mean_kl"] == 0.0
