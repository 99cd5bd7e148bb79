"""Gemma 3's processor, as transformers' ``Gemma3Processor`` and ``Gemma3ImageProcessor``.

Pixels: every image resized to one fixed size (bilinear), rescaled and normalised: the base
:class:`~vlmkit.processing.image.ImageProcessor`. Pan-and-scan (extra crops of wide or tall images,
``do_pan_and_scan``, off by default) is not implemented and is refused by name.

Text: an image is written ``<start_of_image>`` (the tokenizer's ``boi_token``; vlmkit's ``<image>`` is read as
it), and each one becomes ``"\\n\\n<start_of_image>" + <image_soft_token> x image_seq_len + "<end_of_image>\\n\\n"``
before the whole string is tokenised with the tokenizer's special tokens (BOS), unless a chat template wrote the
BOS itself. The image token the model splices at (``ProcessorConfig.image_token``) is ``<image_soft_token>``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from vlmkit.batch import MediaInputs
from vlmkit.config import ProcessorConfig
from vlmkit.errors import ConfigError
from vlmkit.processing.chat import DATA_PLACEHOLDER
from vlmkit.processing.image import ImageProcessor
from vlmkit.processing.layouts import TemplateLayout


@dataclass
class Gemma3ProcessorConfig(ProcessorConfig):
    """Gemma3Processor's settings: ``image_token`` is the soft token each image fills ``image_seq_len`` times,
    ``boi_token`` / ``eoi_token`` what opens and closes an image (``boi_token`` is also what a prompt writes
    where an image goes). ``do_pan_and_scan``: refused (not implemented)."""

    image_token: str = "<image_soft_token>"
    boi_token: str = "<start_of_image>"
    eoi_token: str = "<end_of_image>"
    do_pan_and_scan: bool = False

    def __post_init__(self):
        if self.do_pan_and_scan:
            raise ConfigError("do_pan_and_scan: true (Gemma 3's extra crops of wide and tall images) is not "
                              "implemented in vlmkit; supported: false (one fixed-size view per image)")


def image_sequence(pcfg: Gemma3ProcessorConfig) -> str:
    """What one image placeholder becomes (Gemma3Processor's ``full_image_sequence``)."""
    return f"\n\n{pcfg.boi_token}{pcfg.image_token * pcfg.image_seq_len}{pcfg.eoi_token}\n\n"


class Gemma3ImageProcessor(ImageProcessor):
    """Fixed-size images (the base processor), each image's text its full image sequence."""

    def __init__(self, cfg: Gemma3ProcessorConfig):
        if cfg.do_pan_and_scan:
            raise ConfigError("gemma3: do_pan_and_scan is not implemented in vlmkit")
        super().__init__(cfg)

    def __call__(self, images) -> MediaInputs:
        media = super().__call__(images)
        media.texts = [image_sequence(self.cfg)] * len(media)
        return media

    def placeholders(self, images: list, where: str = "") -> MediaInputs:
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
