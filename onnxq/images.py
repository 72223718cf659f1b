"""Turn image files into model inputs with the preprocessing users know from torchvision and caffe."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


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

    def load(self, path: Path) -> np.ndarray:
        """One preprocessed image with a batch dimension of 1, float32."""
        with Image.open(path) as image:
            image = image.convert("RGB")
            image = self._resized(image)
            image = self._cropped(image)
            pixels = np.asarray(image, dtype=np.float32)
        if self.channel_order.upper() == "BGR":
            pixels = pixels[:, :, ::-1]
        values = (pixels * self.scale - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        if self.layout.upper() == "NCHW":
            values = values.transpose(2, 0, 1)
        return np.ascontiguousarray(values[None], dtype=np.float32)

    def _resized(self, image: Image.Image) -> Image.Image:
        height, width = self.size
        target = self.resize if self.resize is not None else round(min(height, width) / 0.875)
        if isinstance(target, int):
            ratio = target / min(image.width, image.height)
            new_size = (max(width, round(image.width * ratio)), max(height, round(image.height * ratio)))
        else:
            new_size = (max(width, target[1]), max(height, target[0]))
        return image.resize(new_size, Image.Resampling.BILINEAR)

    def _cropped(self, image: Image.Image) -> Image.Image:
        height, width = self.size
        left, top = (image.width - width) // 2, (image.height - height) // 2
        return image.crop((left, top, left + width, top + height))


def list_images(folder: Path) -> list[Path]:
    """Every image file under ``folder`` (recursively), in a deterministic sorted order."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def read_image(path: Path, preprocessing: ImagePreprocessing) -> np.ndarray | None:
    """The preprocessed image, or None when the file cannot be decoded."""
    try:
        return preprocessing.load(path)
    except (UnidentifiedImageError, OSError, ValueError):
        return None
