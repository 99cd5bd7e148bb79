"""Image loading and transforms (resize, rescale, normalise) written on PIL + torch.

Hand-written because torchvision does not work with the CPU torch build these machines use; the steps are
the same as the Hugging Face image processors: resize with PIL, rescale by 1/255, normalise per channel.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from vlmkit.batch import MediaInputs
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
    """PIL image -> normalised float tensor [C, H, W] of a fixed (height, width).

    With ``shortest_edge`` the shorter side is resized to it first (the longer one to
    ``int(shortest_edge * long / short)``), then the centre is cropped to (height, width) with the top-left
    corner at ``((H' - height) // 2, (W' - width) // 2)``: CLIP's image processor, to the pixel."""

    def __init__(self, size: tuple[int, int], mean, std, resample: str = "bicubic", shortest_edge: int = 0):
        if resample not in RESAMPLE:
            raise ValueError(f"resample must be one of {', '.join(RESAMPLE)}, got {resample!r}")
        if shortest_edge and shortest_edge < max(size):
            raise ValueError(f"shortest_edge {shortest_edge} is smaller than the crop {tuple(size)}: the crop "
                             f"would need padding; use shortest_edge >= {max(size)}")
        self.shortest_edge = int(shortest_edge)
        self.size = (int(size[0]), int(size[1]))
        self.mean = torch.tensor(mean, dtype=torch.float32)[:, None, None]
        self.std = torch.tensor(std, dtype=torch.float32)[:, None, None]
        self.resample = RESAMPLE[resample]

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = self.resized(image)
        x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
        return (x - self.mean) / self.std  # [3, H, W]

    def resized(self, image: Image.Image) -> Image.Image:
        """The image resized (and cropped) to (height, width), before rescaling."""
        h, w = self.size
        if self.shortest_edge:
            iw, ih = image.size
            short, long = min(iw, ih), max(iw, ih)
            s, l = self.shortest_edge, int(self.shortest_edge * long / short)
            rw, rh = (s, l) if iw <= ih else (l, s)
            if (rw, rh) != (iw, ih):
                image = image.resize((rw, rh), self.resample)
            top, left = (rh - h) // 2, (rw - w) // 2
            image = image.crop((left, top, left + w, top + h))
        elif image.size != (w, h):
            image = image.resize((w, h), self.resample)
        return image


class ImageProcessor:
    """Images -> :class:`MediaInputs` for one family (``Family.image_processor``); the Processor calls it. This base
    resizes every image to the one fixed size of ``ProcessorConfig`` (CLIP/SigLIP-style), each filling
    ``image_seq_len`` tokens. Families that tile or resize dynamically subclass it."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.transform = ImageTransform(cfg.image_size, cfg.mean, cfg.std, cfg.resample, cfg.shortest_edge)

    def __call__(self, images: list[Image.Image]) -> MediaInputs:
        if not images:
            h, w = self.cfg.image_size
            return MediaInputs(torch.zeros(0, 3, h, w), [])
        return MediaInputs(torch.stack([self.transform(im) for im in images]), [self.cfg.image_seq_len] * len(images))

    def placeholders(self, images: list, where: str = "") -> MediaInputs:
        """What the text of a prompt needs of its images — each one's token count and text — without reading their
        pixels where the counts do not depend on them (fixed-size images: ``image_seq_len`` each). A training set
        is encoded this way before (or, with a frozen tower's cache, without) its images are read. Families whose
        counts depend on the image prepare it."""
        return MediaInputs(torch.zeros(len(images), 0), [self.cfg.image_seq_len] * len(images))


class PreparedPlaceholders:
    """Mixin of image processors whose token counts depend on each image: their placeholders are the prepared
    images themselves."""

    def placeholders(self, images: list, where: str = "") -> MediaInputs:
        return self([load_image(im, where) for im in images])
