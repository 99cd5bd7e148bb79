"""Show-o's processing (models/showo.py): Show-o's task tokens around vlmkit's segment layout.

- **Understanding** (``mmu``): each image of a conversation becomes ``<|mmu|> <|soi|>``, the VQ grid's ``h * w``
  image placeholders and ``<|eoi|>`` (the image processor's text per image, ``MediaInputs.texts``); the model puts
  the embeddings of the image's codes at the placeholders. ShapesWorld's conversations hold one image at the start
  of the first turn, so a sample reads as Show-o's ``<|mmu|> <|soi|> image <|eoi|> text``; the turns around it are
  vlmkit's chat template's.
- **Text-to-image** (``t2i``, :meth:`ShowoSegmentLayout.image_prompt`): ``<|t2i|> caption <|soi|>``, then the
  image's codes and ``<|eoi|>`` (the model's ``image_plan``). The unconditional prompt (classifier-free guidance,
  and the unified objective's condition dropout) is Show-o's: the caption left out, ``<|t2i|> <|soi|>``. No chat
  template: Show-o's generation prompt is the caption alone.
- Pixels: the base ``ImageProcessor`` (resized to the VQ's size, normalised as the VQ checkpoint's processor).
"""

from __future__ import annotations

from dataclasses import dataclass

from vlmkit.batch import MediaInputs
from vlmkit.errors import DataError
from vlmkit.processing.image import ImageProcessor
from vlmkit.config import ProcessorConfig
from vlmkit.processing.layouts import SegmentLayout


@dataclass
class ShowoProcessorConfig(ProcessorConfig):
    """ProcessorConfig and Show-o's task and image-boundary tokens; ``image_seq_len`` is the VQ grid's codes."""

    family: str = "showo"
    t2i_token: str = "<|t2i|>"
    mmu_token: str = "<|mmu|>"
    soi_token: str = "<|soi|>"
    eoi_token: str = "<|eoi|>"

    @property
    def task_tokens(self) -> list[str]:
        return [self.t2i_token, self.mmu_token, self.soi_token, self.eoi_token]


class ShowoImageProcessor(ImageProcessor):
    """Fixed-size images; each image's text ``<|mmu|><|soi|>`` + placeholders + ``<|eoi|>``."""

    def text(self) -> str:
        c = self.cfg
        return c.mmu_token + c.soi_token + c.image_token * c.image_seq_len + c.eoi_token

    def __call__(self, images) -> MediaInputs:
        media = super().__call__(images)
        media.texts = [self.text()] * len(media)
        return media

    def placeholders(self, images: list, where: str = "") -> MediaInputs:
        media = super().placeholders(images, where)
        media.texts = [self.text()] * len(media)
        return media


class ShowoSegmentLayout(SegmentLayout):
    """vlmkit's segment layout with Show-o's text-to-image prompts (module docstring)."""

    def image_prompt(self, text: str, grid: tuple[int, int], unconditional: bool = False,
                     where: str = "prompt") -> list[int]:
        """``<|t2i|> text <|soi|>``; ``unconditional``: ``<|t2i|> <|soi|>``. ``grid`` does not change the prompt (one
        image size)."""
        if self.cfg.image_token and self.cfg.image_token in text:
            raise DataError(f"{where}: a text-to-image prompt reads no image; remove {self.cfg.image_token!r}")
        ids = [self._special(self.cfg.t2i_token, where)]
        if not unconditional:
            ids += self.tokenizer.encode(text)
        ids.append(self._special(self.cfg.soi_token, where))
        self.check_length(ids, where)
        return ids

    def _special(self, token: str, where: str) -> int:
        i = self.tokenizer.tok.token_to_id(token)
        if i is None:
            raise DataError(f"{where}: the tokenizer has no {token!r}; a Show-o tokenizer holds <|t2i|>, <|mmu|>, "
                            f"<|soi|> and <|eoi|> as special tokens")
        return i


__all__ = ["ShowoImageProcessor", "ShowoProcessorConfig", "ShowoSegmentLayout"]
