"""Chameleon's processing: images prepared as ChameleonImageProcessor prepares them, prompts laid out as
ChameleonProcessor lays them out.

Pixels (:class:`ChameleonImageProcessor`, its PIL backend's steps and rounding): convert to RGB, resize the shorter
side to ``shortest_edge`` (LANCZOS; the longer one ``int(shortest_edge * long / short)``), centre-crop to
``image_size``, rescale by ``rescale_factor`` (0.0078, not 1/255: in float64, then float32) and normalise with
``mean`` and ``std`` (1.0 each: the pixels land in [-1, 0.989]).

Text (:class:`ChameleonLayout`, ``input_ids`` of ChameleonProcessor):

- each ``<image>`` of the text becomes ``<racm3:break>`` + ``<image>`` x ``image_seq_len`` + ``<eoss>``
  (``image_start``, the image's tokens, ``image_end``); the model puts each image's codes (as vocabulary ids) at
  its ``<image>`` tokens. The whole string is tokenised with the tokenizer's special tokens (its BOS), or without
  them when the text already begins with BOS;
- a raw prompt (``prompt``, ``continuation``) is ChameleonProcessor's text-completion mode
  (``return_for_text_completion=True``); its chat mode appends the tokenizer's ``sep_token`` (``<reserved08706>``)
  to the text, which ``chat`` does after the folder's chat template;
- ``image_prompt``: a prompt for image generation: the text's ids (BOS as a raw prompt's) followed by
  ``<racm3:break>``, where the image's codes begin.

Models trained in vlmkit (``text_mode: segments``, :class:`ChameleonSegmentLayout`): vlmkit's segment layout and
chat template, each ``<image>`` expanding to ``<racm3:break>``, the grid's image slots and ``<eoss>`` (the image
processor's text, as above); image-generation prompts as Janus' segment layout writes them (the text as a user
turn, the generation prompt, then ``<racm3:break>``; unconditional: every token but BOS and ``<racm3:break>`` ->
pad).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from vlmkit.batch import MediaInputs
from vlmkit.config import ProcessorConfig
from vlmkit.errors import DataError
from vlmkit.processing.image import ImageProcessor
from vlmkit.processing.janus import JanusSegmentLayout
from vlmkit.processing.layouts import TemplateLayout


@dataclass
class ChameleonProcessorConfig(ProcessorConfig):
    """ChameleonProcessor's settings (module docstring); ``image_seq_len`` is the VQ grid's codes per image."""

    image_size: tuple[int, int] = (512, 512)
    shortest_edge: int = 512
    resample: str = "lanczos"
    mean: tuple[float, float, float] = (1.0, 1.0, 1.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    rescale_factor: float = 0.0078
    image_start: str = "<racm3:break>"
    image_end: str = "<eoss>"
    sep_token: str = "<reserved08706>"  # ChameleonProcessor's chat mode ends the text with it
    text_mode: str = "whole"


class ChameleonImageProcessor(ImageProcessor):
    """Images -> MediaInputs of [n, 3, H, W] pixels (module docstring); each image's placeholder text is its
    ``image_start``, ``image_seq_len`` image tokens and ``image_end``."""

    def __init__(self, cfg: ChameleonProcessorConfig):
        super().__init__(cfg)
        self.rescale = float(cfg.rescale_factor)

    def pixels(self, image: Image.Image) -> torch.Tensor:
        array = np.asarray(self.transform.resized(image), dtype=np.uint8).transpose(2, 0, 1)
        x = torch.from_numpy((array.astype(np.float64) * self.rescale).astype(np.float32))
        return (x - self.transform.mean) / self.transform.std  # [3, H, W]

    def text(self) -> str:
        c = self.cfg
        return c.image_start + c.image_token * c.image_seq_len + c.image_end

    def __call__(self, images: list[Image.Image]) -> MediaInputs:
        h, w = self.cfg.image_size
        pixels = torch.stack([self.pixels(im) for im in images]) if images else torch.zeros(0, 3, h, w)
        n = len(images)
        return MediaInputs(pixels, [self.cfg.image_seq_len] * n, texts=[self.text()] * n)

    def placeholders(self, images: list, where: str = "") -> MediaInputs:
        n = len(images)
        return MediaInputs(torch.zeros(n, 0), [self.cfg.image_seq_len] * n, texts=[self.text()] * n)


class ChameleonLayout(TemplateLayout):
    """ChameleonProcessor's layout (module docstring)."""

    def chat(self, messages, media, where="prompt"):
        """The folder's chat template's text, then ``sep_token`` (ChameleonProcessor's chat mode)."""
        if not self.cfg.chat_template_jinja:
            raise DataError(f"{where}: this chameleon folder has no chat template (chat_template.jinja); a raw prompt "
                            f"(Pipeline.generate / score) is laid out as ChameleonProcessor's text-completion mode")
        text = self.render(self.images_in_front(messages, len(media)), generation=True) + self.cfg.sep_token
        return self._prompt_of(self.tokenize(text, [], media, where, special=not self.starts_with_bos(text)))

    def image_prompt(self, text: str, grid: tuple[int, int], unconditional: bool = False,
                     where: str = "prompt") -> list[int]:
        """The ids that start an image: ``text`` as a raw prompt (BOS in front unless it holds one), then
        ``image_start``. ``unconditional``: the same with no text (classifier-free guidance's other prompt).
        ``grid`` does not change the layout: Chameleon writes no size into the prompt."""
        start = self.tokenizer.tok.token_to_id(self.cfg.image_start)
        if start is None:
            raise DataError(f"{where}: the tokenizer has no {self.cfg.image_start!r} (the image-start token)")
        if self.cfg.image_token in text:
            raise DataError(f"{where}: an image-generation prompt reads no images; it has {self.cfg.image_token!r}")
        body = "" if unconditional else text
        ids = self.tokenizer.tok.encode(body, add_special_tokens=not self.starts_with_bos(body)).ids
        return list(ids) + [start]


class ChameleonSegmentLayout(JanusSegmentLayout):
    """vlmkit's segment layout with image-generation prompts ending in ``image_start`` (module docstring)."""

    @property
    def boi_id(self) -> int:
        return self.tokenizer.token_id(self.cfg.image_start)


__all__ = ["ChameleonImageProcessor", "ChameleonLayout", "ChameleonProcessorConfig", "ChameleonSegmentLayout"]
