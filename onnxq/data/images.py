"""Turn image files into model inputs with the preprocessing conventions of ``onnxq.data.presets``."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image, ImageEnhance, UnidentifiedImageError

from onnxq.data.presets import DEFAULT_PRESET, DEFAULT_SIZE, RESIZE_MODES, preset_fields
from onnxq.errors import OnnxqError

log = logging.getLogger("onnxq")

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
MAX_SIDE = 8192  # crop and resize sides; a larger request is a typo, refused before any allocation
MAX_PIXELS = MAX_SIDE * MAX_SIDE  # the resized image (before the crop) may not exceed this many pixels
SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}  # how Pillow opens 16-bit greyscale PNGs
CHANNELS = 3
MAX_AUGMENTED = 100_000  # --calib-augment's upper bound (a typo guard)
JITTER = 0.4  # --calib-augment's colour jitter: brightness, contrast and saturation factors from 0.6 to 1.4
CROP_AREA = (0.08, 1.0)  # a random view's share of the image's area (the standard training crop)
MOSAIC_AREA = (0.1, 1.0)  # the same for each tile of a mosaic
LETTERBOX_GREY = 114.0  # the padding value of YOLO's letterbox, on the 0..255 scale
T = TypeVar("T")


@dataclass(frozen=True)
class ImagePreprocessing:
    """Resize, centre-crop (or letterbox), scale, normalise: ``((pixel * scale) - mean) / std`` per channel.

    A field left at None comes from ``preset`` when one is named, else from the model's metadata, else from
    torchvision's convention (``onnxq.data.presets``); :meth:`completed` fills them in. ``size`` None is the
    model's input size (224 x 224 when its height and width are dynamic and nothing else says).
    """

    size: tuple[int, int] | None = None  # (height, width) after the crop: the model's input size
    resize: tuple[int, int] | int | None = None  # int: short side; (h, w): exact; None: size / 0.875
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    scale: float | None = None
    channel_order: str | None = None
    layout: str | None = None
    preset: str | None = None  # a name from onnxq.data.presets.PRESETS
    resize_mode: str | None = None  # crop (default) or letterbox (fit inside, pad with grey)
    augment: int | None = None  # calibration only: a folder of fewer images is expanded to this many samples

    def __post_init__(self) -> None:
        """Refuse settings that cannot describe an image, before any file is read or memory allocated."""
        if self.size is not None:
            _check_sides(self.size, "--image-size")
        if self.resize is not None:
            _check_sides((self.resize,) if isinstance(self.resize, int) else self.resize, "--resize")
        for name, values in (("--mean", self.mean), ("--std", self.std)):
            if values is None:
                continue
            if len(values) not in (1, CHANNELS):
                raise OnnxqError(f"{name} has {len(values)} values; give one per channel ({CHANNELS}, "
                                 "comma-separated) or a single value for all channels")
            if not np.isfinite(np.asarray(values, np.float64)).all():
                raise OnnxqError(f"{name} must be finite numbers, got {','.join(map(str, values))}")
        if self.std is not None and not all(self.std):
            raise OnnxqError("--std must not contain 0 (every value is divided by it)")
        if self.scale is not None and (not np.isfinite(self.scale) or self.scale == 0):
            raise OnnxqError(f"--scale must be a finite, non-zero number, got {self.scale}")
        if (self.channel_order or "RGB").upper() not in ("RGB", "BGR") or \
                (self.layout or "NCHW").upper() not in ("NCHW", "NHWC"):
            raise OnnxqError(f"unknown channel order {self.channel_order!r} or layout {self.layout!r}; use RGB or "
                             "BGR, NCHW or NHWC")
        if self.preset is not None:
            preset_fields(self.preset)
        if self.augment is not None and not 0 <= self.augment <= MAX_AUGMENTED:
            raise OnnxqError(f"--calib-augment {self.augment} is out of range; give 0 to {MAX_AUGMENTED} samples")
        if self.resize_mode is not None and self.resize_mode not in RESIZE_MODES:
            raise OnnxqError(f"unknown resize mode {self.resize_mode!r}; use {' or '.join(RESIZE_MODES)}")

    def completed(self, declared: dict | None = None, model_size: tuple[int, int] | None = None,
                  layout: str | None = None) -> ImagePreprocessing:
        """Every field set: given fields, then the given preset, then what the model declares (``declared``:
        :func:`onnxq.data.presets.from_metadata`), then torchvision. The size: given, the model's static input
        size, the declared one, 224 x 224."""
        declared = declared or {}
        if self.preset is not None:
            name, base = self.preset, preset_fields(self.preset)
        else:
            name = declared.get("preset", DEFAULT_PRESET if not declared else None)
            base = preset_fields(name or DEFAULT_PRESET)
            base.update({k: v for k, v in declared.items() if k in base})
        mine = {k: v for k, v in vars(self).items() if v is not None}
        fields = {**base, "preset": name, "resize_mode": declared.get("resize_mode", "crop"),
                  "layout": layout or "NCHW", **mine}
        fields["size"] = self.size or model_size or _declared_size(declared) or DEFAULT_SIZE
        if fields["preset"] is not None and any(k in mine for k in ("mean", "std", "scale", "channel_order")):
            fields["preset"] = None  # a preset changed by explicit values is no longer that preset
        return ImagePreprocessing(**fields)

    def description(self) -> dict:
        """The fields as plain JSON values (for metadata and cache keys)."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(self).items()}

    def load(self, path: Path) -> np.ndarray:
        """One preprocessed image with a batch dimension of 1, float32."""
        prep = self._ready()
        return prep._normalised(_decoded(path, prep._pixels))

    def load_augmented(self, path: Path, rng: np.random.Generator, jitter: bool = True) -> np.ndarray:
        """One random view of an image, as ``load`` returns it: a random crop of 8-100 % of its area with an
        aspect ratio from 3/4 to 4/3, resized to the input size, flipped left-right half the time (the standard
        training crop), then (``jitter``) its brightness, contrast and saturation each scaled by 0.6-1.4 in a
        random order: a few images then cover the scales, positions and colours a model sees in many."""
        prep = self._ready()
        view = _random_view(_decoded(path, _rgb), prep.size, rng, CROP_AREA)
        return prep._normalised(np.asarray(_colour_jittered(view, rng) if jitter else view, dtype=np.float32))

    def load_mosaic(self, paths: Sequence[Path], rng: np.random.Generator) -> np.ndarray:
        """A 2 x 2 mosaic (YOLO's): the input split at a random point into four tiles, each a random view (10-100 %
        of the area) of a randomly chosen image shrunk into its tile, then colour-jittered as ``load_augmented``.
        Ten images then give pictures of several objects at smaller scales, as a real data set holds: on the demo
        it brings W4 top-1 within 1 point of 256 ImageNet images, where single views stay 1.5 points short."""
        prep = self._ready()
        height, width = prep.size
        split_y = int(rng.integers(height // 4, 3 * height // 4))
        split_x = int(rng.integers(width // 4, 3 * width // 4))
        canvas = Image.new("RGB", (width, height))
        for top, bottom, left, right in ((0, split_y, 0, split_x), (0, split_y, split_x, width),
                                         (split_y, height, 0, split_x), (split_y, height, split_x, width)):
            view = _random_view(_decoded(paths[int(rng.integers(len(paths)))], _rgb), prep.size, rng, MOSAIC_AREA)
            canvas.paste(view.resize((right - left, bottom - top), Image.Resampling.BILINEAR), (left, top))
        return prep._normalised(np.asarray(_colour_jittered(canvas, rng), dtype=np.float32))

    def _ready(self) -> ImagePreprocessing:
        """This preprocessing with every field set (itself when it already is)."""
        fields = (self.size, self.mean, self.std, self.scale, self.channel_order, self.layout, self.resize_mode)
        return self.completed() if None in fields else self

    def _normalised(self, pixels: np.ndarray) -> np.ndarray:
        """(height, width, 3) pixels on the 0..255 scale to the model's layout, order, scale and normalisation."""
        if self.channel_order.upper() == "BGR":
            pixels = pixels[:, :, ::-1]
        values = (pixels * self.scale - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        if self.layout.upper() == "NCHW":
            values = values.transpose(2, 0, 1)
        return np.ascontiguousarray(values[None], dtype=np.float32)

    def _pixels(self, image: Image.Image) -> np.ndarray:
        """Resized and cropped (height, width, 3) float32 pixels on the 0..255 scale of 8-bit images.

        16-bit greyscale (PNG) is scaled by 255/65535 and resized in float, not clipped to 255 by Pillow's
        RGB conversion (which turned such images white)."""
        if image.mode in SIXTEEN_BIT_MODES:
            grey = Image.fromarray(np.asarray(image, dtype=np.float32) * np.float32(255 / 65535))
            if self.resize_mode == "letterbox":
                return letterboxed(np.repeat(np.asarray(grey, np.float32)[:, :, None], CHANNELS, axis=2), self.size)
            grey = self._cropped(self._resized(grey))
            return np.repeat(np.asarray(grey, dtype=np.float32)[:, :, None], CHANNELS, axis=2)
        rgb = image.convert("RGB")
        if self.resize_mode == "letterbox":
            return letterboxed(np.asarray(rgb, dtype=np.float32), self.size)
        return np.asarray(self._cropped(self._resized(rgb)), dtype=np.float32)

    def _resized(self, image: Image.Image) -> Image.Image:
        height, width = self.size
        target = self.resize if self.resize is not None else round(min(height, width) / 0.875)
        if isinstance(target, int):
            ratio = target / min(image.width, image.height)
            new_size = (max(width, round(image.width * ratio)), max(height, round(image.height * ratio)))
        else:
            new_size = (max(width, target[1]), max(height, target[0]))
        if new_size[0] * new_size[1] > MAX_PIXELS:
            raise ValueError(f"resizing its {image.width}x{image.height} pixels to {new_size[0]}x{new_size[1]} "
                             f"exceeds {MAX_PIXELS} pixels")
        return image.resize(new_size, Image.Resampling.BILINEAR)

    def _cropped(self, image: Image.Image) -> Image.Image:
        height, width = self.size
        left, top = (image.width - width) // 2, (image.height - height) // 2
        return image.crop((left, top, left + width, top + height))


def _decoded(path: Path, decode: Callable[[Image.Image], T]) -> T:
    """``decode`` applied to the opened image file; a decompression bomb is refused as an unreadable image."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as image:
            return decode(image)


def _colour_jittered(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Brightness, contrast and saturation each scaled by a random factor in 1 +- JITTER, in a random order
    (torchvision's ColorJitter(0.4, 0.4, 0.4)); on the demo it lifts W4 top-1 by about a point over crops alone."""
    enhancers = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)
    for index in rng.permutation(len(enhancers)):
        image = enhancers[index](image).enhance(rng.uniform(1 - JITTER, 1 + JITTER))
    return image


def _rgb(image: Image.Image) -> Image.Image:
    return image.convert("RGB")


def _random_view(rgb: Image.Image, size: tuple[int, int], rng: np.random.Generator,
                 area: tuple[float, float]) -> Image.Image:
    """A random crop (``area`` fractions of the image, aspect 3/4 to 4/3) resized to ``size`` (height, width),
    flipped left-right half the time."""
    left, top, width, height = _random_crop_box(rgb.width, rgb.height, rng, area)
    view = rgb.crop((left, top, left + width, top + height)).resize(size[::-1], Image.Resampling.BILINEAR)
    return view.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else view


def _random_crop_box(width: int, height: int, rng: np.random.Generator,
                     area: tuple[float, float]) -> tuple[int, int, int, int]:
    """(left, top, width, height) of a random crop: ``area`` fractions of the image, aspect 3/4 to 4/3 (ten tries,
    then the largest centred square)."""
    for _ in range(10):
        target = rng.uniform(*area) * width * height
        aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        crop_w, crop_h = round(np.sqrt(target * aspect)), round(np.sqrt(target / aspect))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            return int(rng.integers(0, width - crop_w + 1)), int(rng.integers(0, height - crop_h + 1)), crop_w, crop_h
    side = min(width, height)
    return (width - side) // 2, (height - side) // 2, side, side


def letterboxed(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The (height, width, 3) pixels scaled to fit inside ``size`` with their aspect ratio kept and centred on a
    grey (114) canvas, as YOLO-style detectors are trained; the whole image is seen, nothing is cropped."""
    height, width = size
    ratio = min(height / pixels.shape[0], width / pixels.shape[1])
    new_h, new_w = max(1, round(pixels.shape[0] * ratio)), max(1, round(pixels.shape[1] * ratio))
    channels = [np.asarray(Image.fromarray(np.ascontiguousarray(pixels[:, :, c])).resize(
        (new_w, new_h), Image.Resampling.BILINEAR), dtype=np.float32) for c in range(pixels.shape[2])]
    canvas = np.full((height, width, pixels.shape[2]), LETTERBOX_GREY, np.float32)
    top, left = (height - new_h) // 2, (width - new_w) // 2
    canvas[top:top + new_h, left:left + new_w] = np.stack(channels, axis=2)
    return canvas


def _declared_size(declared: dict) -> tuple[int, int] | None:
    size = declared.get("size")
    if size is None:
        return None
    size = (size, size) if isinstance(size, int) else tuple(size)
    _check_sides(size, "the model's metadata size")
    return (int(size[0]), int(size[-1]))


def _check_sides(sides: tuple, flag: str) -> None:
    """Each side a whole number from 1 to MAX_SIDE."""
    if len(sides) not in (1, 2) or not all(isinstance(s, int | np.integer) and 1 <= s <= MAX_SIDE for s in sides):
        shown = "x".join(map(str, sides))
        raise OnnxqError(f"{flag} {shown} is not a usable image size; give sides from 1 to {MAX_SIDE} pixels, "
                         "e.g. 224 or 224x224")


def list_images(folder: Path) -> list[Path]:
    """Every image file under ``folder`` (recursively), in a deterministic sorted order."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def read_image(path: Path, preprocessing: ImagePreprocessing) -> np.ndarray | None:
    """The preprocessed image, or None (with a warning naming the reason) when the file cannot be used."""
    try:
        return preprocessing.load(path)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, MemoryError,
            Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        reason = str(err).splitlines()[0][:160] if str(err).strip() else type(err).__name__
        log.warning("skipping %s: not a readable image (%s)", path, reason)
        return None
