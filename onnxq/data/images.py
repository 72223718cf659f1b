"""Turn image files into model inputs with the preprocessing users know from torchvision and caffe."""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from onnxq.errors import OnnxqError

log = logging.getLogger("onnxq")

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
MAX_SIDE = 8192  # crop and resize sides; a larger request is a typo, refused before any allocation
MAX_PIXELS = MAX_SIDE * MAX_SIDE  # the resized image (before the crop) may not exceed this many pixels
SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}  # how Pillow opens 16-bit greyscale PNGs
CHANNELS = 3


@dataclass(frozen=True)
class ImagePreprocessing:
    """Resize, centre-crop, scale, normalise: ``((pixel * scale) - mean) / std`` per channel."""

    size: tuple[int, int] = (224, 224)  # (height, width) after the crop: the model's input size
    resize: tuple[int, int] | int | None = None  # int: short side; (h, w): exact; None: size / 0.875
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    scale: float = 1 / 255
    channel_order: str = "RGB"
    layout: str = "NCHW"

    def __post_init__(self) -> None:
        """Refuse settings that cannot describe an image, before any file is read or memory allocated."""
        _check_sides(self.size, "--image-size")
        if self.resize is not None:
            _check_sides((self.resize,) if isinstance(self.resize, int) else self.resize, "--resize")
        for name, values in (("--mean", self.mean), ("--std", self.std)):
            if len(values) not in (1, CHANNELS):
                raise OnnxqError(f"{name} has {len(values)} values; give one per channel ({CHANNELS}, "
                                 "comma-separated) or a single value for all channels")
            if not np.isfinite(np.asarray(values, np.float64)).all():
                raise OnnxqError(f"{name} must be finite numbers, got {','.join(map(str, values))}")
        if not all(self.std):
            raise OnnxqError("--std must not contain 0 (every value is divided by it)")
        if not np.isfinite(self.scale) or self.scale == 0:
            raise OnnxqError(f"--scale must be a finite, non-zero number, got {self.scale}")
        if self.channel_order.upper() not in ("RGB", "BGR") or self.layout.upper() not in ("NCHW", "NHWC"):
            raise OnnxqError(f"unknown channel order {self.channel_order!r} or layout {self.layout!r}; use RGB or "
                             "BGR, NCHW or NHWC")

    def load(self, path: Path) -> np.ndarray:
        """One preprocessed image with a batch dimension of 1, float32."""
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # a bomb is an unreadable image
            with Image.open(path) as image:
                pixels = self._pixels(image)
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
            grey = self._cropped(self._resized(grey))
            return np.repeat(np.asarray(grey, dtype=np.float32)[:, :, None], CHANNELS, axis=2)
        rgb = self._cropped(self._resized(image.convert("RGB")))
        return np.asarray(rgb, dtype=np.float32)

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
