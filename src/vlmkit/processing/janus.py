"""Janus' processing: images for understanding as a LLaVA's (resized, normalised, one placeholder per image), and a
prompt layout that also writes prompts in image-generation mode: the text as a chat turn, then the
``<begin_of_image>`` marker the codes follow (``image_prompt``). Its unconditional prompt for classifier-free
guidance is Janus': every token but BOS and ``<begin_of_image>`` replaced by the pad token (the same length).

Imported folders (``text_mode: whole``) are processed as transformers' JanusProcessor does: JanusImageProcessor's
images (the longer side resized to the size, at least ``min_size`` on the shorter, then centred on a square of
``background`` colour: :class:`JanusImageTransform`), each image placeholder expanded to ``<begin_of_image>``,
``image_seq_len`` placeholders and ``<end_of_image>`` (``MediaInputs.texts``), the whole text tokenised with the
tokenizer's special tokens; in image-generation mode (``generation_mode="image"``) the raw text and
``<begin_of_image>`` (:class:`JanusLayout`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from vlmkit.batch import MediaInputs
from vlmkit.config import ProcessorConfig
from vlmkit.errors import ConfigError, DataError
from vlmkit.processing.image import RESAMPLE, ImageProcessor
from vlmkit.processing.layouts import SegmentLayout, TemplateLayout


@dataclass
class JanusProcessorConfig(ProcessorConfig):
    """ProcessorConfig and the marker that begins an image in generation mode."""

    family: str = "janus"
    boi_token: str = "<begin_of_image>"
    # JanusImageProcessor's images and JanusProcessor's image text (imported folders): each image's longer side
    # resized to image_size (square), the shorter one at least min_size, the image centred on a square of
    # ``background`` (0-255 per channel); each placeholder -> boi_token, image_seq_len image tokens, eoi_token.
    # False: vlmkit's own models (images resized to image_size, one image token per position)
    pad_square: bool = False
    min_size: int = 14
    background: tuple[int, int, int] = (127, 127, 127)
    eoi_token: str = "<end_of_image>"

    def __post_init__(self):
        if self.pad_square and self.image_size[0] != self.image_size[1]:
            raise ConfigError(f"processor image_size {list(self.image_size)}: pad_square (JanusImageProcessor) "
                              f"makes square images; give equal height and width")
        if len(self.background) != 3 or any(not 0 <= int(c) <= 255 for c in self.background):
            raise ConfigError(f"processor background {list(self.background)}: three values in 0..255")
        if self.min_size < 1:
            raise ConfigError(f"processor min_size {self.min_size}: the shorter side's floor must be >= 1")


def unconditional_ids(ids: list[int], keep: set[int], pad_id: int) -> list[int]:
    """Janus' unconditional prompt of ``ids``: every id not in ``keep`` (BOS, the image-start marker) -> pad."""
    return [i if i in keep else pad_id for i in ids]


class JanusImageTransform:
    """PIL image -> normalised tensor [3, S, S] as JanusImageProcessor (its PIL backend) makes it (module
    docstring)."""

    def __init__(self, cfg: JanusProcessorConfig):
        self.side, self.min_size = int(cfg.image_size[0]), int(cfg.min_size)
        self.background = tuple(int(c) for c in cfg.background)
        self.resample = RESAMPLE[cfg.resample]
        self.mean = torch.tensor(cfg.mean, dtype=torch.float32)[:, None, None]
        self.std = torch.tensor(cfg.std, dtype=torch.float32)[:, None, None]

    def __call__(self, image: Image.Image) -> torch.Tensor:
        w, h = image.size
        scale = self.side / max(h, w)
        nh, nw = max(round(h * scale), self.min_size), max(round(w * scale), self.min_size)
        image = image.resize((nw, nh), self.resample)
        if nh != nw:
            side = max(nh, nw)
            square = Image.new("RGB", (side, side), self.background)
            square.paste(image, ((side - nw) // 2, (side - nh) // 2))
            image = square
        x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
        return (x - self.mean) / self.std


def image_text(cfg: JanusProcessorConfig) -> str:
    """What one image placeholder becomes in JanusProcessor's text."""
    return cfg.boi_token + cfg.image_token * cfg.image_seq_len + cfg.eoi_token


class JanusImageProcessor(ImageProcessor):
    """Fixed-size images as the base processor's, or (``pad_square``) JanusImageProcessor's with each image's
    text ``<begin_of_image>`` + placeholders + ``<end_of_image>``."""

    def __init__(self, cfg: JanusProcessorConfig):
        super().__init__(cfg)
        if cfg.pad_square:
            self.transform = JanusImageTransform(cfg)

    def __call__(self, images) -> MediaInputs:
        return self.with_texts(super().__call__(images))

    def placeholders(self, images: list, where: str = "") -> MediaInputs:
        return self.with_texts(super().placeholders(images, where))

    def with_texts(self, media: MediaInputs) -> MediaInputs:
        if self.cfg.pad_square:
            media.texts = [image_text(self.cfg)] * len(media)
        return media


class JanusLayout(TemplateLayout):
    """JanusProcessor's layout (module docstring) for imported folders: the template layout, each placeholder
    expanded by the image processor's texts; image-generation prompts as ``generation_mode="image"``."""

    def image_prompt(self, text: str, grid: tuple[int, int], unconditional: bool = False,
                     where: str = "prompt") -> list[int]:
        """``text`` + ``<begin_of_image>`` tokenised with the tokenizer's special tokens (BOS as it adds it; a text
        already beginning with BOS gets none), as JanusProcessor(text, generation_mode="image"); ``grid`` does not
        change Janus' prompt. ``unconditional``: Janus' (every token but BOS and BOI -> pad)."""
        if self.cfg.image_token and self.cfg.image_token in text:
            raise DataError(f"{where}: a text-to-image prompt reads no image; remove {self.cfg.image_token!r}")
        self.check_refused(text, where)
        full = text + self.cfg.boi_token
        ids = list(self.tokenizer.tok.encode(full, add_special_tokens=not self.starts_with_bos(full)).ids)
        boi = self.tokenizer.token_id(self.cfg.boi_token)
        if not ids or ids[-1] != boi:
            raise DataError(f"{where}: the prompt does not end with {self.cfg.boi_token!r} once tokenised; it must be "
                            f"a special token of the tokenizer")
        self.check_length(ids, where)
        if not unconditional:
            return ids
        return unconditional_ids(ids, {boi, self.tokenizer.bos_id}, self.tokenizer.pad_id)


class JanusSegmentLayout(SegmentLayout):
    """vlmkit's segment layout (models trained in vlmkit) with Janus' image-generation prompts."""

    def image_prompt(self, text: str, grid: tuple[int, int], unconditional: bool = False,
                     where: str = "prompt") -> list[int]:
        """``text`` as a user turn with the generation prompt, then ``<begin_of_image>`` (``grid`` does not change
        Janus' prompt: its images have one size)."""
        if self.cfg.image_token and self.cfg.image_token in text:
            raise DataError(f"{where}: a text-to-image prompt reads no image; remove {self.cfg.image_token!r}")
        segments = self.template.render([{"role": "user", "content": text}], add_generation_prompt=True)
        ids = [i for s in segments for i in self.tokenizer.encode(s.text)] + [self.boi_id]
        self.check_length(ids, where)
        if not unconditional:
            return ids
        return unconditional_ids(ids, {self.boi_id, self.tokenizer.bos_id}, self.tokenizer.pad_id)

    @property
    def boi_id(self) -> int:
        return self.tokenizer.token_id(self.cfg.boi_token)
