"""Transfusion's processing (models/transfusion.py): images as ``<|boi|>``, ``N`` placeholders, ``<|eoi|>`` around
vlmkit's segment layout.

- **Reading** (conversations): each image becomes ``<|boi|>``, the model's ``N`` patch placeholders and
  ``<|eoi|>`` (the image processor's text per image, ``MediaInputs.texts``, as Show-o's). Its media carry, per
  image, ``t`` = 0, zero ``noise`` [C, h, w] and ``write`` = 0 (read clean, not supervised): the same extras as a
  text-to-image sample's (objectives/latent_pairs.py), so the two kinds concatenate into one batch
  (``MediaInputs.cat`` needs the same extras on every item). That is why the processor knows the latent shape
  (``latent_shape``, set from the VAE by the family's ``configure``).
- **Text-to-image** (:meth:`TransfusionSegmentLayout.image_prompt`): ``caption <|boi|>``; the unconditional
  prompt (classifier-free guidance, the unified objective's condition dropout) is ``<|boi|>`` alone. The image's
  placeholders and ``<|eoi|>`` follow (the sampler and the training pairs add them). No chat template: the caption
  alone, as Show-o's.
- Pixels: the base ``ImageProcessor`` (the VAE's size and normalisation).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlmkit.batch import MediaInputs
from vlmkit.config import ProcessorConfig
from vlmkit.errors import DataError
from vlmkit.processing.image import ImageProcessor
from vlmkit.processing.layouts import SegmentLayout


@dataclass
class TransfusionProcessorConfig(ProcessorConfig):
    """ProcessorConfig, the image boundary tokens and the latent shape (C, h, w) of an image."""

    family: str = "transfusion"
    boi_token: str = "<|boi|>"
    eoi_token: str = "<|eoi|>"
    latent_shape: tuple[int, int, int] = (4, 16, 16)


def reading_extras(n: int, shape) -> dict[str, torch.Tensor]:
    """The extras of ``n`` images read clean: t 0, zero noise, not written."""
    return {"t": torch.zeros(n), "noise": torch.zeros(n, *shape), "write": torch.zeros(n)}


class TransfusionImageProcessor(ImageProcessor):
    """Fixed-size images; each image's text ``<|boi|>`` + placeholders + ``<|eoi|>``; the reading extras."""

    def text(self) -> str:
        c = self.cfg
        return c.boi_token + c.image_token * c.image_seq_len + c.eoi_token

    def _marked(self, media: MediaInputs) -> MediaInputs:
        media.texts = [self.text()] * len(media)
        media.extra = {**media.extra, **reading_extras(len(media), self.cfg.latent_shape)}
        return media

    def __call__(self, images) -> MediaInputs:
        return self._marked(super().__call__(images))

    def placeholders(self, images: list, where: str = "") -> MediaInputs:
        return self._marked(super().placeholders(images, where))


class TransfusionSegmentLayout(SegmentLayout):
    """vlmkit's segment layout with Transfusion's text-to-image prompts (module docstring)."""

    def image_prompt(self, text: str, grid: tuple[int, int], unconditional: bool = False,
                     where: str = "prompt") -> list[int]:
        """``text <|boi|>``; ``unconditional``: ``<|boi|>``. ``grid`` does not change the prompt (one image
        size)."""
        if self.cfg.image_token and self.cfg.image_token in text:
            raise DataError(f"{where}: a text-to-image prompt reads no image; remove {self.cfg.image_token!r}")
        boi = self.tokenizer.tok.token_to_id(self.cfg.boi_token)
        if boi is None:
            raise DataError(f"{where}: the tokenizer has no {self.cfg.boi_token!r}; a Transfusion tokenizer holds "
                            f"{self.cfg.boi_token!r} and {self.cfg.eoi_token!r} as special tokens")
        ids = ([] if unconditional else self.tokenizer.encode(text)) + [boi]
        self.check_length(ids, where)
        return ids


__all__ = ["TransfusionImageProcessor", "TransfusionProcessorConfig", "TransfusionSegmentLayout", "reading_extras"]
