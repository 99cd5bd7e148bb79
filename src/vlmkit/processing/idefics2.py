"""Idefics2's image processing and prompt layout, as transformers' ``Idefics2ImageProcessorPil`` and
``Idefics2Processor``.

Images (per image, in reading order):

1. with ``split``: the image is cut into its four quarters (top-left, top-right, bottom-left, bottom-right; the
   halves at ``side // 2``) followed by the whole image: five crops; else one crop, the image;
2. each crop is resized (``max_edge`` > 0): a side longer than ``max_edge`` brings the longer side to it and the
   other to ``int(side / aspect)``, then each side below ``min_edge`` is raised to it alone (the aspect is not
   kept there), transformers' ``get_resize_output_image_size``;
3. rescale by 1/255 and normalise.

transformers then pads the crops of a batch to the largest with zeros and a ``pixel_attention_mask``; its model
keeps only the patches wholly inside a crop. vlmkit keeps exactly those: each crop's pixels cut to whole patches
and listed patch by patch (``MediaInputs.pixel_values`` [patches, C, p, p], ``extra["grids"]`` [images, crops, 2]),
so prompts of any image sizes batch together; :meth:`Idefics2ImageProcessor.crops` gives the crops before that
(what transformers pads), for comparison.

Text: each ``<image>`` becomes ``<fake_token_around_image>`` + ``<image>`` x image_seq_len +
``<fake_token_around_image>`` per crop; two fake tokens that meet (adjacent crops or images) become one, and a
space is put after a closing fake token that a character other than whitespace or ``<`` follows.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from vlmkit.batch import MediaInputs
from vlmkit.config import ProcessorConfig
from vlmkit.errors import DataError
from vlmkit.processing.image import RESAMPLE, ImageProcessor
from vlmkit.processing.layouts import TemplateLayout

FAKE_IMAGE_TOKEN = "<fake_token_around_image>"
SPLIT_CROPS = 5  # four quarters and the whole image


@dataclass
class Idefics2ProcessorConfig(ProcessorConfig):
    """Idefics2's processor: ``min_edge`` / ``max_edge`` (Idefics2ImageProcessor's size shortest_edge /
    longest_edge; ``max_edge`` 0: no resize), ``split`` (do_image_splitting), ``patch_size`` (the tower's: crops
    are cut to whole patches). ``image_size`` is not used."""

    min_edge: int = 378
    max_edge: int = 980
    split: bool = False
    patch_size: int = 14

    @property
    def crops_per_image(self) -> int:
        return SPLIT_CROPS if self.split else 1


def resize_size(height: int, width: int, min_edge: int, max_edge: int) -> tuple[int, int]:
    """(height, width) after Idefics2's resize (module docstring, step 2)."""
    aspect = width / height
    if width >= height and width > max_edge:
        width, height = max_edge, int(max_edge / aspect)
    elif height > width and height > max_edge:
        height, width = max_edge, int(max_edge * aspect)
    return max(height, min_edge), max(width, min_edge)


def quarters(image: Image.Image) -> list[Image.Image]:
    """The four quarters and the whole image (transformers' ``split_images``)."""
    w, h = image.size
    mw, mh = w // 2, h // 2
    return [image.crop((0, 0, mw, mh)), image.crop((mw, 0, w, mh)), image.crop((0, mh, mw, h)),
            image.crop((mw, mh, w, h)), image]


class Idefics2ImageProcessor(ImageProcessor):
    """Images -> each crop's whole patches (module docstring); ``tokens`` = crops x image_seq_len per image."""

    def __init__(self, cfg: Idefics2ProcessorConfig):
        self.cfg = cfg
        self.resample = RESAMPLE[cfg.resample]
        self.mean = torch.tensor(cfg.mean, dtype=torch.float32)[:, None, None]
        self.std = torch.tensor(cfg.std, dtype=torch.float32)[:, None, None]

    def crops(self, image: Image.Image) -> list[torch.Tensor]:
        """One RGB image -> its crops, resized, rescaled and normalised ([C, h, w] each, unpadded)."""
        out = []
        for crop in quarters(image) if self.cfg.split else [image]:
            if self.cfg.max_edge:
                h, w = resize_size(crop.height, crop.width, self.cfg.min_edge, self.cfg.max_edge)
                crop = crop.resize((w, h), self.resample)
            x = torch.from_numpy(np.asarray(crop, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
            out.append((x - self.mean) / self.std)
        return out

    def patches(self, crop: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """A crop [C, h, w] -> its whole patches [gh * gw, C, p, p] in reading order, and (gh, gw)."""
        p = self.cfg.patch_size
        c, h, w = crop.shape
        gh, gw = h // p, w // p
        if not gh or not gw:
            raise DataError(f"an image crop of {h}x{w} pixels holds no whole {p}x{p} patch (the tower would see "
                            f"nothing); raise the processor's min_edge")
        x = crop[:, :gh * p, :gw * p].reshape(c, gh, p, gw, p).permute(1, 3, 0, 2, 4)
        return x.reshape(gh * gw, c, p, p), (gh, gw)

    def __call__(self, images: list[Image.Image]) -> MediaInputs:
        k, p = self.cfg.crops_per_image, self.cfg.patch_size
        if not images:
            return MediaInputs(torch.zeros(0, 3, p, p), [], {"grids": torch.zeros(0, k, 2, dtype=torch.long)},
                               rows=[])
        pixels, grids, rows = [], [], []
        for image in images:
            parts = [self.patches(c) for c in self.crops(image)]
            pixels += [x for x, _ in parts]
            grids.append([g for _, g in parts])
            rows.append(sum(len(x) for x, _ in parts))
        return MediaInputs(torch.cat(pixels), [k * self.cfg.image_seq_len] * len(images),
                           {"grids": torch.tensor(grids, dtype=torch.long)}, rows=rows)

    def placeholders(self, images: list, where: str = "") -> MediaInputs:
        """Every image fills crops x image_seq_len tokens, whatever its size."""
        k = self.cfg.crops_per_image
        return MediaInputs(torch.zeros(len(images), 0), [k * self.cfg.image_seq_len] * len(images))


class Idefics2Layout(TemplateLayout):
    """The template layout with Idefics2Processor's expansion of ``<image>`` (module docstring)."""

    def expand(self, text: str, spans: list[tuple[int, int]], media: MediaInputs, where: str):
        self.check_refused(text, where)
        self.check_placeholders([text], len(media), where)
        if FAKE_IMAGE_TOKEN in text:
            raise DataError(f"{where}: the text holds {FAKE_IMAGE_TOKEN!r}, which only the processor writes "
                            f"around images")
        token, fake = self.cfg.image_token, FAKE_IMAGE_TOKEN
        crop = token * self.cfg.image_seq_len + fake
        starts = [m.start() for m in re.finditer(re.escape(token), text)]
        expansions = []
        for i, q in enumerate(starts):
            after = q + len(token)
            first = "" if i and starts[i - 1] + len(token) == q else fake  # the previous image's closing fake
            rest = text[after:after + 1]
            space = " " if rest and not rest.isspace() and rest != "<" else ""
            expansions.append(first + crop * self.cfg.crops_per_image + space)

        def moved(pos: int) -> int:
            return pos + sum(len(e) - len(token) for q, e in zip(starts, expansions) if q < pos)

        pieces, last = [], 0
        for q, e in zip(starts, expansions):
            pieces += [text[last:q], e]
            last = q + len(token)
        pieces.append(text[last:])
        return "".join(pieces), [(moved(a), moved(b)) for a, b in spans]


__all__ = ["FAKE_IMAGE_TOKEN", "Idefics2ImageProcessor", "Idefics2Layout", "Idefics2ProcessorConfig", "quarters",
           "resize_size"]
