"""Fuyu's processing: images cut into patches, and prompts laid out as transformers' FuyuProcessor lays them out.

Pixels (:class:`FuyuImageProcessor`, FuyuImageProcessor's steps and rounding):

1. an image larger than the target ``image_size`` (height, width) on either side is resized down by the one scale
   that fits it (``min(H / h, W / w)``, each side ``int(side * scale)``); a smaller image is never enlarged;
2. it is padded at the bottom and right with ``padding_value`` (in 0-255 pixel units, before rescaling: 1.0 becomes
   almost black), rescaled by 1/255 and normalised;
3. only the patches that cover the image are kept: ``ceil(h / patch) x ceil(w / patch)`` of them (the padding fills
   the last row and column of patches, the rest of the target is dropped), each flattened in (row, column, channel)
   order. An image becomes ``rows x cols`` patches: ``MediaInputs.rows`` (its pixel rows) and ``tokens`` (its
   image tokens), and its placeholder the text ``(|SPEAKER| x cols + |NEWLINE|) x rows`` (``MediaInputs.texts``).

Text, for imported folders (:class:`FuyuLayout`, ``text_mode: whole``), as FuyuProcessor's ``input_ids``:

- with images, the prompt's first image goes before its text and every further image at a ``|SPEAKER|`` in the text
  (the prompt holds one placeholder fewer than it has images; a prompt that starts with a placeholder for its first
  image is read so too); each image's rows are followed by ``<s>`` (BOS), the text by ``<0x04>`` (beginning of the
  answer). What comes before the first ``<s>`` is tokenised without special tokens and its first token dropped
  (the ``▁`` a SentencePiece normaliser puts in front), the rest tokenised without special tokens;
- without images the text alone, tokenised with the tokenizer's special tokens (its BOS, ``|ENDOFTEXT|``), no
  ``<0x04>``;
- a scored continuation is the lmms-eval one: the tokens of prompt + continuation after those of the prompt alone;
- chat: FuyuProcessor has no conversation format; a single user message (or the folder's chat template's text) is
  the prompt; training (``supervised``) takes one question and its answer: prompt, answer, EOS.

vlmkit-trained Fuyu models (``text_mode: segments``, :class:`FuyuSegmentLayout`) use vlmkit's segment layout with
each image's rows in place of its placeholder (``<image>`` or ``|SPEAKER|``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from vlmkit.batch import IGNORE, Encoded, MediaInputs
from vlmkit.config import ProcessorConfig
from vlmkit.errors import ConfigError, DataError
from vlmkit.processing.chat import DATA_PLACEHOLDER
from vlmkit.processing.image import RESAMPLE, ImageProcessor, PreparedPlaceholders
from vlmkit.processing.layouts import SegmentLayout, TemplateLayout


@dataclass
class FuyuProcessorConfig(ProcessorConfig):
    """Fuyu's processor: ``image_size`` is the target (height, width) images are fitted and padded to (multiples of
    ``patch_size``); ``image_seq_len`` is the most image tokens an image can take (a full target)."""

    image_token: str = "|SPEAKER|"
    resample: str = "bilinear"
    patch_size: int = 30
    padding_value: float = 1.0  # in 0-255 pixel units, before rescaling (FuyuImageProcessor's)
    newline_token: str = "|NEWLINE|"  # after each row of patches
    image_end: str = "<s>"  # FuyuProcessor's text after each image's rows (whole layout)
    answer_token: str = "<0x04>"  # FuyuProcessor's beginning of the answer, after the text (whole layout)


def max_patches(cfg: FuyuProcessorConfig) -> int:
    """The image tokens of an image that fills the whole target."""
    h, w = cfg.image_size
    return (h // cfg.patch_size) * (w // cfg.patch_size)


def fitted_size(height: int, width: int, target: tuple[int, int]) -> tuple[int, int]:
    """(height, width) after FuyuImageProcessor's resize: only down, by the one scale that fits the target."""
    th, tw = target
    if height <= th and width <= tw:
        return height, width
    scale = min(th / height, tw / width)
    return int(height * scale), int(width * scale)


def image_text(rows: int, cols: int, image_token: str, newline_token: str) -> str:
    """The text of an image of rows x cols patches: each row's image tokens and a row break."""
    return (image_token * cols + newline_token) * rows


class FuyuImageProcessor(PreparedPlaceholders, ImageProcessor):
    """Images -> patches (module docstring): ``pixel_values`` [total patches, patch x patch x channels], ``rows`` and
    ``tokens`` the patches of each image, ``texts`` each placeholder's rows, ``extra["grid"]`` each image's
    (rows, cols) of patches."""

    def __init__(self, cfg: FuyuProcessorConfig):
        super().__init__(cfg)
        p, (h, w) = cfg.patch_size, cfg.image_size
        if p < 1 or h % p or w % p or h < p or w < p:
            raise ConfigError(f"processor image_size {tuple(cfg.image_size)} must be whole multiples of patch_size "
                              f"{p} (FuyuImageProcessor counts the patches of a padded target)")
        self.patch = p
        self.mean = torch.tensor(cfg.mean, dtype=torch.float32)[:, None, None]
        self.std = torch.tensor(cfg.std, dtype=torch.float32)[:, None, None]
        self.resample = RESAMPLE[cfg.resample]

    @property
    def patch_dim(self) -> int:
        return self.patch * self.patch * 3

    def patches(self, image: Image.Image) -> tuple[torch.Tensor, int, int]:
        """One RGB image -> (its patches [rows * cols, patch_dim], rows, cols)."""
        h, w = fitted_size(image.height, image.width, tuple(self.cfg.image_size))
        if (h, w) != (image.height, image.width):
            image = image.resize((w, h), self.resample)
        p = self.patch
        rows, cols = math.ceil(h / p), math.ceil(w / p)
        x = torch.full((3, rows * p, cols * p), float(self.cfg.padding_value))
        x[:, :h, :w] = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float()
        x = (x / 255.0 - self.mean) / self.std
        patches = x.reshape(3, rows, p, cols, p).permute(1, 3, 2, 4, 0).reshape(rows * cols, p * p * 3)
        return patches, rows, cols

    def __call__(self, images: list[Image.Image]) -> MediaInputs:
        if not images:
            return MediaInputs(torch.zeros(0, self.patch_dim), [], {"grid": torch.zeros(0, 2, dtype=torch.long)},
                               texts=[], rows=[])
        pixels, counts, texts, grids = [], [], [], []
        for image in images:
            patches, rows, cols = self.patches(image)
            pixels.append(patches)
            counts.append(rows * cols)
            grids.append((rows, cols))
            texts.append(image_text(rows, cols, self.cfg.image_token, self.cfg.newline_token))
        return MediaInputs(torch.cat(pixels), list(counts), {"grid": torch.tensor(grids, dtype=torch.long)},
                           texts=texts, rows=list(counts))


def _with_image_token(text: str, image_token: str) -> str:
    return text.replace(DATA_PLACEHOLDER, image_token)


class FuyuSegmentLayout(SegmentLayout):
    """vlmkit's segment layout for Fuyu models trained in vlmkit: ``<image>`` (the data's placeholder) and the image
    token both mark an image, whose rows of image tokens and row breaks take its place."""

    def _mapped(self, messages):
        return [dict(m, content=_with_image_token(m["content"], self.cfg.image_token)) for m in messages]

    def prompt(self, text, media, where="prompt"):
        return super().prompt(_with_image_token(text, self.cfg.image_token), media, where)

    def chat(self, messages, media, where="prompt"):
        return super().chat(self._mapped(messages), media, where)

    def supervised(self, messages, media, where="sample"):
        return super().supervised(self._mapped(messages), media, where)

    def continuation(self, prompt, text, media, where="score"):
        return super().continuation(_with_image_token(prompt, self.cfg.image_token), text, media, where)


class FuyuLayout(TemplateLayout):
    """FuyuProcessor's layout (module docstring)."""

    def laid_out(self, text: str, media: MediaInputs, where: str) -> str:
        """FuyuProcessor's text of a prompt with images, before tokenisation: the first image in front, the others at
        the text's placeholders, each image's rows followed by ``image_end``; ``answer_token`` at the end."""
        self.check_refused(text, where)
        token, n = self.cfg.image_token, len(media)
        count = text.count(token)
        if count == n and text.startswith(token):  # the first image's placeholder written in front: it goes there
            text, count = text[len(token):], count - 1
        if count != n - 1:
            raise DataError(f"{where}: FuyuProcessor puts a prompt's first image before its text and each further "
                            f"image at a {token!r} in the text: {n} image(s) need {n - 1} placeholder(s) in the text "
                            f"(or {n}, the first at its start); it has {count}")
        if media.texts is None:
            raise DataError(f"{where}: fuyu images carry their rows of patches as text (MediaInputs.texts)")
        pieces = text.split(token)
        out = media.texts[0] + self.cfg.image_end
        for k, piece in enumerate(pieces):
            if k:
                out += media.texts[k] + self.cfg.image_end
            out += piece
        return out + self.cfg.answer_token

    def prompt(self, text, media, where="prompt"):
        if not len(media):
            if self.cfg.image_token in text:
                raise DataError(f"{where}: {text.count(self.cfg.image_token)} image placeholder(s) but no images")
            ids = self.tokenizer.encode(text, special=not self.starts_with_bos(text))
        else:
            laid = self.laid_out(self.without_bos(text), media, where)  # the images come first, and no BOS
            head, end, rest = laid.partition(self.cfg.image_end)  # FuyuProcessor: split after the first image
            ids = self.tokenizer.encode(head + end)[1:] + self.tokenizer.encode(rest)
        if ids.count(self.image_token_id) != sum(media.tokens):
            raise DataError(f"{where}: the text tokenised to {ids.count(self.image_token_id)} image tokens, the images "
                            f"fill {sum(media.tokens)}; {self.cfg.image_token!r} must be one token of the tokenizer")
        self.check_length(ids, where)
        return Encoded(ids, None, len(ids), media)

    def question(self, messages: list[dict], media: MediaInputs, where: str) -> str:
        """The prompt text of a chat: its single user message, or the folder's chat template's text; the first
        image's placeholder (and a newline after it) dropped, since FuyuProcessor puts the first image in front;
        without placeholders every image goes before the text."""
        if self.cfg.chat_template_jinja:
            text = self.render(messages, generation=True)
        else:
            text = self.one_question(messages, where, "this family (fuyu)")  # FuyuProcessor has no turns
        text = _with_image_token(text, self.cfg.image_token)
        token = self.cfg.image_token
        if len(media) and text.count(token) == len(media):
            i = text.index(token)
            after = text[i + len(token):]
            text = text[:i] + (after[1:] if after.startswith("\n") else after)
        elif len(media) > 1 and token not in text:  # no placeholders: every image before the text, in order
            text = token * (len(media) - 1) + text
        return text

    def chat(self, messages, media, where="prompt"):
        return self.prompt(self.question(messages, media, where), media, where)

    def supervised(self, messages, media, where="sample"):
        if [m["role"] for m in messages] != ["user", "assistant"]:
            raise DataError(f"{where}: this family (fuyu, FuyuProcessor's layout) trains on one question and its "
                            f"answer; the conversation has turns {[m['role'] for m in messages]}")
        prompt = self.prompt(self.question(messages[:1], media, where), media, where)
        answer = self.tokenizer.encode(messages[1]["content"]) + [self.tokenizer.eos_id]
        ids = prompt.ids + answer
        self.check_length(ids, where)
        return Encoded(ids, [IGNORE] * len(prompt.ids) + answer, len(prompt.ids), media)


__all__ = ["FuyuImageProcessor", "FuyuLayout", "FuyuProcessorConfig", "FuyuSegmentLayout", "fitted_size",
           "image_text", "max_patches"]
