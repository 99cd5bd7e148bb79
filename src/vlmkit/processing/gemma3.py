"""Gemma 3's processor, as transformers' ``Gemma3Processor`` and ``Gemma3ImageProcessor``.

Pixels: every image resized to one fixed size (bilinear), rescaled and normalised: the base
:class:`~vlmkit.processing.image.ImageProcessor`. With pan-and-scan (``do_pan_and_scan``, off by default) a wide
or tall image (aspect ratio at least ``pan_and_scan_min_ratio_to_activate``) is also cut into 2 ..
``pan_and_scan_max_num_crops`` crops along its long side, each at least ``pan_and_scan_min_crop_size`` pixels,
which follow the whole image as views of their own (:func:`pan_and_scan`, to the pixel).

Text: an image is written ``<start_of_image>`` (the tokenizer's ``boi_token``; vlmkit's ``<image>`` is read as
it), and each one becomes ``"\\n\\n<start_of_image>" + <image_soft_token> x image_seq_len + "<end_of_image>\\n\\n"``
before the whole string is tokenised with the tokenizer's special tokens (BOS), unless a chat template wrote the
BOS itself; an image with crops becomes ``"Here is the original image " + <its sequence> + " and here are some
crops to help you see better " + <one sequence per crop, joined by spaces>``. The image token the model splices at
(``ProcessorConfig.image_token``) is ``<image_soft_token>``.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass

import torch
from PIL import Image

from vlmkit.batch import MediaInputs
from vlmkit.config import ProcessorConfig
from vlmkit.errors import ConfigError
from vlmkit.processing.chat import DATA_PLACEHOLDER
from vlmkit.processing.image import ImageProcessor, load_image
from vlmkit.processing.layouts import TemplateLayout


@dataclass
class Gemma3ProcessorConfig(ProcessorConfig):
    """Gemma3Processor's settings: ``image_token`` is the soft token each image fills ``image_seq_len`` times,
    ``boi_token`` / ``eoi_token`` what opens and closes an image (``boi_token`` is also what a prompt writes
    where an image goes); the pan-and-scan settings are Gemma3ImageProcessor's (module docstring)."""

    image_token: str = "<image_soft_token>"
    boi_token: str = "<start_of_image>"
    eoi_token: str = "<end_of_image>"
    do_pan_and_scan: bool = False
    pan_and_scan_min_crop_size: int = 256
    pan_and_scan_max_num_crops: int = 4
    pan_and_scan_min_ratio_to_activate: float = 1.2

    def __post_init__(self):
        if self.pan_and_scan_min_crop_size < 1 or self.pan_and_scan_max_num_crops < 2 \
                or self.pan_and_scan_min_ratio_to_activate <= 0:
            raise ConfigError(f"processor pan_and_scan_min_crop_size {self.pan_and_scan_min_crop_size} (>= 1), "
                              f"pan_and_scan_max_num_crops {self.pan_and_scan_max_num_crops} (>= 2), "
                              f"pan_and_scan_min_ratio_to_activate {self.pan_and_scan_min_ratio_to_activate} (> 0)")


def image_sequence(pcfg: Gemma3ProcessorConfig, crops: int = 0) -> str:
    """What one image placeholder becomes (Gemma3Processor's ``full_image_sequence``, and its
    ``replace_image_token`` for an image with ``crops`` pan-and-scan crops)."""
    one = f"\n\n{pcfg.boi_token}{pcfg.image_token * pcfg.image_seq_len}{pcfg.eoi_token}\n\n"
    if not crops:
        return one
    return (f"Here is the original image {one} and here are some crops to help you see better "
            + " ".join([one] * crops))


def pan_and_scan(image: Image.Image, min_crop: int, max_crops: int, min_ratio: float) -> list[Image.Image]:
    """Gemma3ImageProcessor's pan-and-scan crops of ``image`` (none unless its aspect ratio is at least
    ``min_ratio``): ``round(ratio)`` crops along the long side, clamped to [2, ``max_crops``] and to crops of at
    least ``min_crop`` pixels, in reading order; the last one is cut at the image's edge, not padded."""
    width, height = image.size
    long, short = max(width, height), min(width, height)
    if long / short < min_ratio:
        return []
    n = min(math.floor(long / min_crop), math.floor(long / short + 0.5))
    n = min(max_crops, max(2, n))
    cols, rows = (n, 1) if width >= height else (1, n)
    crop_w, crop_h = math.ceil(width / cols), math.ceil(height / rows)
    if min(crop_w, crop_h) < min_crop:
        return []
    return [image.crop((x, y, min(x + crop_w, width), min(y + crop_h, height)))
            for y, x in itertools.product(range(0, crop_h * rows, crop_h), range(0, crop_w * cols, crop_w))]


class Gemma3ImageProcessor(ImageProcessor):
    """Fixed-size images (the base processor), each image's text its image sequence; with pan-and-scan each image
    is its whole view followed by its crops (``rows`` views, ``tokens`` = views x image_seq_len)."""

    def crops(self, image: Image.Image) -> list[Image.Image]:
        c = self.cfg
        if not c.do_pan_and_scan:
            return []
        return pan_and_scan(image, c.pan_and_scan_min_crop_size, c.pan_and_scan_max_num_crops,
                            c.pan_and_scan_min_ratio_to_activate)

    def __call__(self, images) -> MediaInputs:
        if not images:
            return super().__call__(images)
        views, rows = [], []
        for image in images:
            crops = self.crops(image)
            views += [image] + crops
            rows.append(1 + len(crops))
        pixels = torch.stack([self.transform(v) for v in views])
        return MediaInputs(pixels, [r * self.cfg.image_seq_len for r in rows],
                           texts=[image_sequence(self.cfg, r - 1) for r in rows], rows=rows)

    def placeholders(self, images: list, where: str = "") -> MediaInputs:
        """Without pan-and-scan every image is one view and its text is known without its pixels; with it, the
        crops depend on the image's size: the images are read."""
        if self.cfg.do_pan_and_scan:
            return self([load_image(im, where) for im in images])
        media = super().placeholders(images, where)
        media.texts = [image_sequence(self.cfg)] * len(media)
        return media


class Gemma3Layout(TemplateLayout):
    """Gemma3Processor's layout: ``<start_of_image>`` (and vlmkit's ``<image>``) mark the images; each becomes its
    full image sequence, then the whole text is tokenised (module docstring)."""

    def expand(self, text, spans, media, where):
        marks = [self.cfg.boi_token, DATA_PLACEHOLDER]
        pattern = re.compile("|".join(re.escape(m) for m in dict.fromkeys(marks) if m))
        token = self.cfg.image_token
        found = [(m.start(), m.end()) for m in pattern.finditer(text)]

        def moved(pos: int) -> int:
            return pos + sum(len(token) - (b - a) for a, b in found if a < pos)

        text = pattern.sub(token, text)
        return super().expand(text, [(moved(a), moved(b)) for a, b in spans], media, where)
