"""IDEFICS' processor: fixed-size CLIP-style images, and the prompt layout of transformers' IdeficsProcessor.

IdeficsProcessor takes a prompt as a list of texts and images; vlmkit takes the same prompt as one string with an
``<image>`` placeholder where each image goes: the list is the string's non-empty pieces between placeholders,
with the images in between (a prompt without placeholders has its images in front, as the processor's
``images=..., text=...`` form). The text the processor builds, tokenised *without* the tokenizer's special tokens:

- BOS first, written as text;
- each text piece with its leading and trailing spaces (not newlines) removed;
- each image as ``<fake_token_around_image><image><fake_token_around_image>``; an image right after another
  shares the marker between them (``<image><fake_token_around_image>``).

``<end_of_utterance>``, which the processor inserts between two consecutive *texts* of its list, never arises from
a string (its pieces are always separated by images). Pixels are the base
:class:`~vlmkit.processing.image.ImageProcessor`'s (resize to height x width, rescale, normalise:
IdeficsImageProcessor). A scored continuation is what follows the prompt's tokens when both are laid out and
tokenised (lm-evaluation-harness), and a conversation is laid out the same way, its replies supervised.
"""

from __future__ import annotations

from vlmkit.processing.image import IMAGE_PROCESSORS, ImageProcessor

FAKE_TOKEN = "<fake_token_around_image>"


def idefics_layout(text: str, image_token: str, bos_token: str) -> tuple[str, list[int]]:
    """(IdeficsProcessor's text for ``text`` with ``image_token`` placeholders, where each character offset
    0..len(text) of ``text`` lands in it): a removed space lands where its piece's kept text starts or ends, a
    placeholder's characters where its markup starts."""
    out, where = bos_token, []
    last_was_image = False
    for i, piece in enumerate(text.split(image_token)):
        if i > 0:  # the placeholder before this piece
            where += [len(out)] * len(image_token)
            out += image_token + FAKE_TOKEN if last_was_image else FAKE_TOKEN + image_token + FAKE_TOKEN
            last_was_image = True
        if piece:
            kept = piece.strip(" ")
            lead = len(piece) - len(piece.lstrip(" "))
            start = len(out)
            where += [start + min(max(c - lead, 0), len(kept)) for c in range(len(piece))]
            out += kept
            last_was_image = False
    return out, where + [len(out)]


@IMAGE_PROCESSORS.register("idefics", "fixed-size images, IdeficsProcessor's prompt layout (BOS as text, spaces "
                                      "stripped around images, <fake_token_around_image> markers)")
class IdeficsImageProcessor(ImageProcessor):
    """The fixed-size image processor with IDEFICS' text hooks (see the module docstring)."""

    def format_prompt(self, prompt: str, n_images: int) -> str:
        if n_images and self.cfg.image_token not in prompt:
            prompt = self.cfg.image_token * n_images + prompt
        return idefics_layout(prompt, self.cfg.image_token, self.cfg.bos_token)[0]

    def format_supervised(self, text: str, spans: list[tuple[int, int]],
                          n_images: int) -> tuple[str, list[tuple[int, int]]]:
        if n_images and self.cfg.image_token not in text:
            text = self.cfg.image_token * n_images + text
            spans = [(a + len(self.cfg.image_token) * n_images, b + len(self.cfg.image_token) * n_images)
                     for a, b in spans]
        laid, where = idefics_layout(text, self.cfg.image_token, self.cfg.bos_token)
        return laid, [(where[a], where[b]) for a, b in spans]
