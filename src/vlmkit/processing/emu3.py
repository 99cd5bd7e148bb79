"""Emu3's processing: images at (about) their own size, and prompts laid out as transformers' Emu3Processor.

Pixels (:class:`Emu3ImageProcessor`, Emu3ImageProcessor's steps): each image is resized (PIL, bicubic by default)
to ``smart_resize``'s size — height and width multiples of the VQ-VAE's spatial factor, ``min_pixels <= H * W <=
max_pixels``, the aspect ratio kept as closely as possible — rescaled by 1/255 and normalised per channel. Its
pixels go flat ([H * W, 3] rows, so that images of different sizes stack) with ``extra["image_sizes"]`` (H, W);
the model encodes each image alone (models/emu3.py says why transformers' padding of a call's images to the
largest is not copied).

Text (:class:`Emu3Layout`, Emu3Processor's ``input_ids``): BOS is written in front of the text (the tokenizer adds
none; a prompt that already begins with BOS gets no second one), and each ``<image>`` becomes

    <|image start|>{h}*{w}<|image token|> + <image> x h * (w + 1) + <|extra_201|><|image end|>

for its h x w grid of codes (the model puts the visual tokens and the row ends at the ``<image>`` tokens).
For image generation (:meth:`Emu3Layout.image_prompt`) a prompt is BOS + text + ``<|image start|>{h}*{w}<|image
token|>`` (Emu3Processor's ``return_for_image_generation``); its unconditional twin for classifier-free guidance
is the same with ``negative_prompt`` as the text (Emu3's released generation example: an empty or negative
prompt in the same layout).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from vlmkit.batch import MediaInputs
from vlmkit.config import ProcessorConfig
from vlmkit.errors import ConfigError, DataError
from vlmkit.processing.image import RESAMPLE, ImageProcessor, PreparedPlaceholders
from vlmkit.processing.layouts import TemplateLayout
from vlmkit.processing.qwen2_vl import MAX_ASPECT_RATIO, smart_resize


@dataclass
class Emu3ProcessorConfig(ProcessorConfig):
    """Emu3's processor: Emu3ImageProcessor's settings and Emu3Processor's tokens. ``image_size`` is not read
    (images keep about their own size): it is the size of a generated image, the model's image_grid of codes times
    ``spatial_factor``, which shared code takes for the model's native size."""

    family: str = "emu3"
    image_token: str = "<image>"
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    min_pixels: int = 512 * 512
    max_pixels: int = 1024 * 1024
    spatial_factor: int = 8  # pixels per code along each side (the VQ-VAE's)
    boi_token: str = "<|image start|>"
    eoi_token: str = "<|image end|>"
    image_wrapper_token: str = "<|image token|>"
    eof_token: str = "<|extra_201|>"
    negative_prompt: str = ""  # the text of the unconditional prompt (classifier-free guidance)


def fitted_size(height: int, width: int, cfg: Emu3ProcessorConfig) -> tuple[int, int]:
    """(H, W) after Emu3ImageProcessor's resize (transformers' smart_resize, its rounding included)."""
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise DataError(f"an image of {width}x{height} pixels has an aspect ratio above {MAX_ASPECT_RATIO}, which "
                        f"Emu3's image processor refuses")
    return smart_resize(height, width, cfg.spatial_factor, cfg.min_pixels, cfg.max_pixels)


def image_text(h: int, w: int, cfg: Emu3ProcessorConfig) -> str:
    """What an image of h x w codes becomes in the text (Emu3Processor's ``replace_image_token``)."""
    return (f"{cfg.boi_token}{h}*{w}{cfg.image_wrapper_token}{cfg.image_token * (h * (w + 1))}"
            f"{cfg.eof_token}{cfg.eoi_token}")


class Emu3ImageProcessor(PreparedPlaceholders, ImageProcessor):
    """Images -> MediaInputs: pixels flat [sum of H * W, 3], ``extra["image_sizes"]`` [n, 2], each image's
    h * (w + 1) placeholder tokens and its text (module docstring)."""

    def __init__(self, cfg: Emu3ProcessorConfig):
        self.cfg = cfg
        if cfg.spatial_factor < 1 or not 0 < cfg.min_pixels <= cfg.max_pixels:
            raise ConfigError(f"processor spatial_factor {cfg.spatial_factor} must be >= 1 and min_pixels "
                              f"{cfg.min_pixels} <= max_pixels {cfg.max_pixels}, both positive")
        if cfg.resample not in RESAMPLE:
            raise ConfigError(f"processor resample {cfg.resample!r}; valid: {', '.join(RESAMPLE)}")
        self.mean = torch.tensor(cfg.mean, dtype=torch.float32)[:, None, None]
        self.std = torch.tensor(cfg.std, dtype=torch.float32)[:, None, None]
        self.transform = self.pixels

    def pixels(self, image: Image.Image) -> torch.Tensor:
        """Resize, rescale and normalise one RGB image -> [3, H, W]."""
        h, w = fitted_size(image.height, image.width, self.cfg)
        if (w, h) != image.size:
            image = image.resize((w, h), RESAMPLE[self.cfg.resample])
        x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
        return (x - self.mean) / self.std

    def __call__(self, images: list[Image.Image]) -> MediaInputs:
        flat, sizes, tokens, texts = [], [], [], []
        f = self.cfg.spatial_factor
        for image in images:
            x = self.pixels(image)
            flat.append(x.flatten(1).t())
            sizes.append(tuple(x.shape[1:]))
            h, w = x.shape[1] // f, x.shape[2] // f
            tokens.append(h * (w + 1))
            texts.append(image_text(h, w, self.cfg))
        pixels = torch.cat(flat) if flat else torch.zeros(0, 3)
        return MediaInputs(pixels, tokens, {"image_sizes": torch.tensor(sizes, dtype=torch.long).reshape(-1, 2)},
                           texts=texts, rows=[h * w for h, w in sizes])


class Emu3Layout(TemplateLayout):
    """Emu3Processor's layout (module docstring): BOS written in front of the text, images expanded in it."""

    def tokenize(self, text, spans, media, where, special=True):
        """The text with BOS in front when the special tokens are asked for (Emu3Processor writes it; the
        tokenizer adds none), then tokenised as a whole."""
        bos = self.tokenizer.bos_token
        if special and bos:
            text, spans = bos + text, [(a + len(bos), b + len(bos)) for a, b in spans]
        return super().tokenize(text, spans, media, where, special=False)

    def image_prompt(self, text: str, grid: tuple[int, int], unconditional: bool = False,
                     where: str = "prompt") -> list[int]:
        """The ids of ``text`` in Emu3's image-generation mode, ending ``<|image start|>h*w<|image token|>``;
        ``unconditional``: the same layout with the processor's ``negative_prompt`` as the text."""
        h, w = (int(v) for v in grid)
        if h < 1 or w < 1:
            raise DataError(f"{where}: an image grid of {h}x{w} codes; both sides must be >= 1")
        body = self.cfg.negative_prompt if unconditional else self.without_bos(text)
        if self.cfg.image_token in body:
            raise DataError(f"{where}: an image-generation prompt reads no images; remove {self.cfg.image_token!r}")
        suffix = f"{self.cfg.boi_token}{h}*{w}{self.cfg.image_wrapper_token}"
        return self.tokenize(body + suffix, [], MediaInputs(torch.zeros(0, 3), []), where).ids


__all__ = ["Emu3ImageProcessor", "Emu3Layout", "Emu3ProcessorConfig", "fitted_size", "image_text"]
