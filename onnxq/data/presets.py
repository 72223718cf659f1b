"""Named image preprocessing conventions, and the model metadata that carries a model's own preprocessing.

Each preset is what the framework that trained the model fed it (values after ``(pixel * scale - mean) / std``):

- ``torchvision``: RGB, [0, 1] then ImageNet mean/std; resize the short side to size/0.875 (256 for 224), centre
  crop. torchvision's classification models, most PyTorch/timm exports.
- ``caffe``: BGR, 0..255 minus the ImageNet BGR pixel mean (104, 117, 123), no scaling; warp to 256x256, centre
  crop. BVLC/Caffe2 models (SqueezeNet, the demo model), Keras' "caffe" mode (VGG, ResNet50).
- ``inception``: RGB scaled to [-1, 1] (x / 127.5 - 1); short side to size/0.875, centre crop. TF-slim Inception
  and MobileNet, Keras' "tf" mode.
- ``tflite``: RGB, (x - 127) / 128; short side to size/0.875, centre crop. TF-Lite models such as EfficientNet-Lite.
- ``unit``: RGB in [0, 1], nothing else; detectors (YOLO), usually with ``--resize-mode letterbox``.
- ``none``: RGB pixels 0..255 as they are.

A model says what it needs in its metadata_props: ``onnxq.preprocess`` holds a preset name, or a JSON object
with any of ``preset``, ``mean``, ``std``, ``scale``, ``channel_order``, ``size`` ([h, w]), ``resize`` (a side or
[h, w]) and ``resize_mode``; ``onnxq.image_size`` ("HxW" or one side) gives the size for a model whose input height
and width are dynamic. onnxq writes the preprocessing it used into the output under these keys, so the quantized
model calibrates and evaluates the same way again.
"""

from __future__ import annotations

import json
from typing import Any

from onnxq.errors import OnnxqError

METADATA_KEY = "onnxq.preprocess"
SIZE_METADATA_KEY = "onnxq.image_size"
RESIZE_MODES = ("crop", "letterbox")
DEFAULT_PRESET = "torchvision"
DEFAULT_SIZE = (224, 224)
CROP_FRACTION = 0.875  # the centre crop keeps 87.5 % of the resized short side (224 of 256)
IMAGENET_MEAN_RGB = (0.485, 0.456, 0.406)  # of 0..1 pixels; also the natural-image statistics the check uses
IMAGENET_STD_RGB = (0.229, 0.224, 0.225)

# name -> field values of onnxq.data.images.ImagePreprocessing (resize None: short side to size / 0.875)
PRESETS: dict[str, dict[str, Any]] = {
    "torchvision": {"mean": IMAGENET_MEAN_RGB, "std": IMAGENET_STD_RGB, "scale": 1 / 255, "channel_order": "RGB",
                    "resize": None},
    "caffe": {"mean": (104.0, 117.0, 123.0), "std": (1.0, 1.0, 1.0), "scale": 1.0, "channel_order": "BGR",
              "resize": (256, 256)},
    "inception": {"mean": (1.0, 1.0, 1.0), "std": (1.0, 1.0, 1.0), "scale": 1 / 127.5, "channel_order": "RGB",
                  "resize": None},
    "tflite": {"mean": (127.0, 127.0, 127.0), "std": (128.0, 128.0, 128.0), "scale": 1.0, "channel_order": "RGB",
               "resize": None},
    "unit": {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0), "scale": 1 / 255, "channel_order": "RGB",
             "resize": None},
    "none": {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0), "scale": 1.0, "channel_order": "RGB", "resize": None},
}
FIELDS = ("preset", "size", "resize", "mean", "std", "scale", "channel_order", "resize_mode")


def preset_fields(name: str) -> dict[str, Any]:
    """The field values of a preset, or a one-line error listing the presets."""
    try:
        return dict(PRESETS[name])
    except KeyError:
        raise OnnxqError(f"unknown preprocessing preset {name!r}; choose one of {', '.join(PRESETS)}") from None


def parse_size(text: str, where: str) -> tuple[int, int]:
    """``"320"`` or ``"320x480"`` (height x width) as (height, width)."""
    try:
        sides = [int(v) for v in str(text).lower().replace(",", "x").split("x")]
    except ValueError:
        sides = []
    if len(sides) not in (1, 2):
        raise OnnxqError(f"{where} {text!r} is not an image size; write 224 or 224x224")
    return (sides[0], sides[-1])


def from_metadata(metadata: dict[str, str]) -> dict[str, Any]:
    """The preprocessing fields a model's metadata_props declare (empty when it declares none)."""
    fields: dict[str, Any] = {}
    raw = metadata.get(METADATA_KEY, "").strip()
    if raw:
        if raw.startswith("{"):
            try:
                declared = json.loads(raw)
            except json.JSONDecodeError as err:
                raise OnnxqError(f"the model's metadata {METADATA_KEY} is not valid JSON ({err}); fix it or pass "
                                 "--preprocess") from err
            unknown = sorted(set(declared) - set(FIELDS)) if isinstance(declared, dict) else ["(not an object)"]
            if unknown:
                raise OnnxqError(f"the model's metadata {METADATA_KEY} has unknown keys {unknown}; use "
                                 f"{', '.join(FIELDS)}")
            fields.update(declared)
        else:
            fields["preset"] = raw
        if "preset" in fields:
            preset_fields(fields["preset"])  # an unknown name is an error here, not at the first image
        for key in ("mean", "std", "size"):
            if isinstance(fields.get(key), list):
                fields[key] = tuple(fields[key])
        if isinstance(fields.get("resize"), list):
            fields["resize"] = tuple(fields["resize"])
    if metadata.get(SIZE_METADATA_KEY, "").strip() and "size" not in fields:
        fields["size"] = parse_size(metadata[SIZE_METADATA_KEY], f"the model's metadata {SIZE_METADATA_KEY}")
    return fields


def to_metadata(fields: dict[str, Any]) -> dict[str, str]:
    """Metadata entries that declare these (complete) preprocessing fields."""
    values = {key: fields[key] for key in FIELDS if fields.get(key) is not None}
    return {METADATA_KEY: json.dumps(values, default=list, separators=(",", ":"))}
