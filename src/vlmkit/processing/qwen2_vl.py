"""Qwen2-VL dynamic resolution: every image keeps (about) its own size and aspect ratio, and becomes a list of
flattened patches plus its patch grid ``image_grid_thw`` = (frames, rows, columns).

The steps follow transformers' ``Qwen2VLImageProcessorPil``:

1. ``smart_resize``: height and width rounded to multiples of ``patch_size * merge_size``, scaled down (or up)
   with the aspect ratio kept so that ``min_pixels <= height * width <= max_pixels``; resized with PIL;
2. rescale by 1/255 and normalise per channel;
3. cut into patch_size x patch_size patches listed window by window (each merge_size x merge_size window of
   patches together, the order the patch merger folds them in), each patch repeated over
   ``temporal_patch_size`` frames (an image is a one-frame video) and flattened to C * T * p * p values.

``pixel_values`` is [total patches of all images, C * T * p * p]; the placeholder of an image with grid (t, h, w)
fills t * h * w / merge_size**2 LM tokens, as ``Qwen2VLProcessor`` expands ``<|image_pad|>``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import math

import numpy as np
import torch
from PIL import Image

from vlmkit.batch import MediaInputs
from vlmkit.config import ProcessorConfig
from vlmkit.errors import ConfigError, DataError
from vlmkit.processing.image import RESAMPLE, ImageProcessor, PreparedPlaceholders

MAX_ASPECT_RATIO = 200  # transformers refuses images more elongated than this


@dataclass
class NativeResolutionConfig:
    """Qwen2-VL dynamic resolution (image_processor "qwen2_vl"): each image is resized so that height and width
    are multiples of patch_size * merge_size and min_pixels <= height * width <= max_pixels, then cut into
    patch_size patches of temporal_patch_size repeated frames, listed merge_size x merge_size window by window."""

    min_pixels: int = 0
    max_pixels: int = 0
    patch_size: int = 0
    temporal_patch_size: int = 1
    merge_size: int = 1



@dataclass
class Qwen2VLProcessorConfig(ProcessorConfig):
    """Qwen2-VL's processor: images at (about) their own resolution (``native``)."""

    native: NativeResolutionConfig = field(default_factory=NativeResolutionConfig)


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(height, width) as multiples of ``factor`` with min_pixels <= height * width <= max_pixels and the aspect
    ratio kept as closely as possible: transformers' ``smart_resize``, its rounding included."""
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise DataError(f"an image of {width}x{height} pixels has an aspect ratio above {MAX_ASPECT_RATIO}, which "
                        f"Qwen2-VL's image processor refuses")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def patchify(image: torch.Tensor, patch_size: int, merge_size: int, temporal_patch_size: int) -> torch.Tensor:
    """[C, H, W] -> [H/p * W/p, C * T * p * p]: patches in merge-window order, each repeated over T frames
    (transformers' ``patchify``, element for element)."""
    c, h, w = image.shape
    gh, gw, p, m = h // patch_size, w // patch_size, patch_size, merge_size
    x = image.reshape(c, gh // m, m, p, gw // m, m, p).permute(1, 4, 2, 5, 0, 3, 6)  # [gh/m, gw/m, m, m, C, p, p]
    x = x.unsqueeze(5).expand(*x.shape[:5], temporal_patch_size, p, p)  # [..., C, T, p, p]
    return x.reshape(gh * gw, c * temporal_patch_size * p * p)


class Qwen2VLImageProcessor(PreparedPlaceholders, ImageProcessor):
    """Images -> MediaInputs with ``pixel_values`` [total patches, C * T * p * p], ``extra["image_grid_thw"]``
    [n_images, 3] (long) and each image's LM token count."""

    def __init__(self, cfg):
        self.cfg, n = cfg, cfg.native
        for name in ("min_pixels", "max_pixels", "patch_size", "temporal_patch_size", "merge_size"):
            if getattr(n, name) <= 0:
                raise ConfigError(f"processor native.{name} must be positive for the qwen2_vl image processor, got "
                                  f"{getattr(n, name)}")
        if n.min_pixels > n.max_pixels:
            raise ConfigError(f"processor native.min_pixels {n.min_pixels} exceeds native.max_pixels {n.max_pixels}")
        if cfg.resample not in RESAMPLE:
            raise ConfigError(f"processor resample {cfg.resample!r}; valid: {', '.join(RESAMPLE)}")
        self.factor = n.patch_size * n.merge_size
        self.mean = torch.tensor(cfg.mean, dtype=torch.float32)[:, None, None]
        self.std = torch.tensor(cfg.std, dtype=torch.float32)[:, None, None]
        self.transform = self.pixels  # one image -> its normalised [C, H, W] pixels at the size it is patched at

    @property
    def patch_dim(self) -> int:
        return 3 * self.cfg.native.temporal_patch_size * self.cfg.native.patch_size**2

    def pixels(self, image: Image.Image) -> torch.Tensor:
        """Resize (smart_resize), rescale and normalise one RGB image -> [3, H, W]."""
        h, w = smart_resize(image.height, image.width, self.factor, self.cfg.native.min_pixels, self.cfg.native.max_pixels)
        if (w, h) != image.size:
            image = image.resize((w, h), RESAMPLE[self.cfg.resample])
        x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
        return (x - self.mean) / self.std

    def __call__(self, images: list[Image.Image]) -> MediaInputs:
        patches, grids = [], []
        for image in images:
            x = self.pixels(image)
            patches.append(patchify(x, self.cfg.native.patch_size, self.cfg.native.merge_size, self.cfg.native.temporal_patch_size))
            grids.append((1, x.shape[1] // self.cfg.native.patch_size, x.shape[2] // self.cfg.native.patch_size))
        grid_thw = torch.tensor(grids, dtype=torch.long).reshape(-1, 3)
        pixel_values = torch.cat(patches) if patches else torch.zeros(0, self.patch_dim)
        tokens = [int(t * h * w) // self.cfg.native.merge_size**2 for t, h, w in grids]
        rows = [int(t * h * w) for t, h, w in grids]
        return MediaInputs(pixel_values, tokens, {"image_grid_thw": grid_thw}, rows=rows)


