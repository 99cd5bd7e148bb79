"""Image loading and transforms (resize, rescale, normalise) written on PIL + torch.

Hand-written because torchvision does not work with the CPU torch build these machines use; the steps are
the same as the Hugging Face image processors: resize with PIL, rescale by 1/255, normalise per channel.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from vlmkit.errors import DataError

RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}

MAX_IMAGE_PIXELS = 64_000_000


def load_image(source, where: str = "") -> Image.Image:
    """Open a path or pass a PIL image through, as RGB. Missing or corrupt files raise DataError naming them."""
    if isinstance(source, Image.Image):
        return source.convert("RGB")
    path = Path(source)
    ctx = f" ({where})" if where else ""
    if not path.is_file():
        raise DataError(f"image file not found: {path}{ctx}")
    try:
        with Image.open(path) as im:
            if im.width * im.height > MAX_IMAGE_PIXELS:
                raise DataError(f"image {path}{ctx} has {im.width}x{im.height} pixels, more than {MAX_IMAGE_PIXELS}")
            im.load()
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise DataError(f"cannot read image {path}{ctx}: {e}") from e


class ImageTransform:
    """PIL image -> normalised float tensor [C, H, W] of a fixed (height, width)."""

    def __init__(self, size: tuple[int, int], mean, std, resample: str = "bicubic"):
        if resample not in RESAMPLE:
            raise ValueError(f"resample must be one of {', '.join(RESAMPLE)}, got {resample!r}")
        self.size = (int(size[0]), int(size[1]))
        self.mean = torch.tensor(mean, dtype=torch.float32)[:, None, None]
        self.std = torch.tensor(std, dtype=torch.float32)[:, None, None]
        self.resample = RESAMPLE[resample]

    def __call__(self, image: Image.Image) -> torch.Tensor:
        h, w = self.size
        if image.size != (w, h):
            image = image.resize((w, h), self.resample)
        x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
        return (x - self.mean) / self.std  # [3, H, W]
