"""Mistral 3 / Pixtral processing: every image keeps its own aspect ratio and becomes its patches, laid out in the text
as rows of image tokens, as transformers' ``PixtralImageProcessor`` and ``PixtralProcessor`` do.

Pixels (:class:`PixtralImageProcessor`; the unit ``u`` = ``patch_size * merge_size``, the patches of one LM token):

1. an image larger than ``longest_edge`` on either side is scaled down by ``ratio = max(H, W) / longest_edge``, each
   side ``floor(side / ratio)``; a smaller one keeps its size; then both sides are rounded up to whole multiples of
   ``u`` (``((side - 1) // u + 1) * u``), and the image resized to that with PIL (the processor's filter);
2. rescaled by 1/255 and normalised per channel;
3. cut into patch_size x patch_size patches, row-major, each flattened in (channel, row, col) order (the tower's
   convolution weight order): ``pixel_values`` [total patches, C * p * p], ``extra["image_grid"]`` each image's
   (rows, cols) of patches. transformers pads the images of a call to the largest and gives their ``image_sizes``;
   the patches of each image's unpadded part are these.

Text (PixtralProcessor): each ``[IMG]`` of the prompt becomes its image's rows of LM tokens, ``rows = H / u`` rows of
``cols = W / u`` image tokens, each row followed by ``[IMG_BREAK]`` but the last, which is followed by ``[IMG_END]``
(``MediaInputs.texts``); the whole string is tokenised with the tokenizer's special tokens (the generic
``TemplateLayout``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from vlmkit.batch import MediaInputs
from vlmkit.config import ProcessorConfig
from vlmkit.errors import ConfigError, DataError
from vlmkit.processing.image import RESAMPLE, ImageProcessor, PreparedPlaceholders


@dataclass
class Mistral3ProcessorConfig(ProcessorConfig):
    """PixtralProcessor's settings: images resized to fit ``longest_edge`` in whole ``patch_size * merge_size``
    units; ``image_seq_len`` is the most image tokens an image can take (a square of longest_edge)."""

    image_token: str = "[IMG]"
    longest_edge: int = 1540
    patch_size: int = 14
    merge_size: int = 2
    image_break_token: str = "[IMG_BREAK]"
    image_end_token: str = "[IMG_END]"


def resized_size(height: int, width: int, longest_edge: int, unit: int) -> tuple[int, int]:
    """(height, width) an image is resized to: transformers' ``get_resize_output_image_size`` (module docstring)."""
    ratio = max(height / longest_edge, width / longest_edge)
    if ratio > 1:
        height, width = math.floor(height / ratio), math.floor(width / ratio)
    return ((height - 1) // unit + 1) * unit, ((width - 1) // unit + 1) * unit


def image_text(rows: int, cols: int, cfg: Mistral3ProcessorConfig) -> str:
    """The text of an image of rows x cols LM tokens: each row's image tokens and a row break, the last row's break
    replaced by the image end (PixtralProcessor's ``replace_image_token``)."""
    row = cfg.image_token * cols
    return (row + cfg.image_break_token) * (rows - 1) + row + cfg.image_end_token


def max_image_tokens(cfg: Mistral3ProcessorConfig) -> int:
    side = ((cfg.longest_edge - 1) // (cfg.patch_size * cfg.merge_size) + 1)
    return side * side


class PixtralImageProcessor(PreparedPlaceholders, ImageProcessor):
    """Images -> MediaInputs (module docstring): ``pixel_values`` [total patches, C * p * p], ``rows`` each image's
    patches, ``tokens`` its image tokens, ``texts`` its rows of tokens, ``extra["image_grid"]`` [n, 2] its patch
    grid."""

    def __init__(self, cfg: Mistral3ProcessorConfig):
        self.cfg = cfg
        for name in ("longest_edge", "patch_size", "merge_size"):
            if getattr(cfg, name) <= 0:
                raise ConfigError(f"processor {name} must be positive for the mistral3 image processor, got "
                                  f"{getattr(cfg, name)}")
        if cfg.resample not in RESAMPLE:
            raise ConfigError(f"processor resample {cfg.resample!r}; valid: {', '.join(RESAMPLE)}")
        self.unit = cfg.patch_size * cfg.merge_size
        self.mean = torch.tensor(cfg.mean, dtype=torch.float32)[:, None, None]
        self.std = torch.tensor(cfg.std, dtype=torch.float32)[:, None, None]
        self.transform = self.pixels  # one image -> its normalised [C, H, W] pixels at the size it is patched at

    @property
    def patch_dim(self) -> int:
        return 3 * self.cfg.patch_size**2

    def pixels(self, image: Image.Image) -> torch.Tensor:
        """Resize, rescale and normalise one RGB image -> [3, H, W] (H, W multiples of patch_size * merge_size)."""
        h, w = resized_size(image.height, image.width, self.cfg.longest_edge, self.unit)
        if h <= 0 or w <= 0:
            raise DataError(f"an image of {image.width}x{image.height} pixels is too thin to resize within "
                            f"longest_edge {self.cfg.longest_edge}")
        if (w, h) != image.size:
            image = image.resize((w, h), RESAMPLE[self.cfg.resample])
        x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
        return (x - self.mean) / self.std

    def __call__(self, images: list[Image.Image]) -> MediaInputs:
        p, m = self.cfg.patch_size, self.cfg.merge_size
        patches, grids, texts = [], [], []
        for image in images:
            x = self.pixels(image)
            gh, gw = x.shape[1] // p, x.shape[2] // p
            patches.append(x.reshape(3, gh, p, gw, p).permute(1, 3, 0, 2, 4).reshape(gh * gw, 3 * p * p))
            grids.append((gh, gw))
            texts.append(image_text(gh // m, gw // m, self.cfg))
        grid = torch.tensor(grids, dtype=torch.long).reshape(-1, 2)
        pixel_values = torch.cat(patches) if patches else torch.zeros(0, self.patch_dim)
        tokens = [(h // m) * (w // m) for h, w in grids]
        return MediaInputs(pixel_values, tokens, {"image_grid": grid}, texts=texts, rows=[h * w for h, w in grids])


__all__ = ["Mistral3ProcessorConfig", "PixtralImageProcessor", "image_text", "max_image_tokens", "resized_size"]
