"""IDEFICS' prompt layout, as transformers' IdeficsProcessor's (its images are fixed-size CLIP-style ones).

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

from vlmkit.processing.layouts import TemplateLayout

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


class IdeficsLayout(TemplateLayout):
    """IdeficsProcessor's layout (module docstring), tokenised without the tokenizer's special tokens (the layout
    writes BOS as text). A chat goes through the folder's template, then the layout; without a template the
    question is the prompt (one per request)."""

    def lay_out(self, text: str, spans: list[tuple[int, int]], n_images: int) -> tuple[str, list[tuple[int, int]]]:
        """``text`` (images in front when it places none) laid out, with its character ``spans`` moved along."""
        token = self.cfg.image_token
        if n_images and token not in text:
            text = token * n_images + text
            spans = [(a + len(token) * n_images, b + len(token) * n_images) for a, b in spans]
        laid, where = idefics_layout(text, token, self.tokenizer.bos_token or "")
        return laid, [(where[a], where[b]) for a, b in spans]

    def prompt(self, text, media, where="prompt"):
        laid, _ = self.lay_out(self.without_bos(text), [], len(media))
        return self._prompt_of(self.tokenize(laid, [], media, where, special=False))

    def chat(self, messages, media, where="prompt"):
        if not self.cfg.chat_template_jinja:
            question = self.one_question(messages, where, "this folder has no chat template, so the model")
            return self.prompt(question, media, where)
        return self.prompt(self.render(self.images_in_front(messages, len(media)), generation=True), media, where)

    def supervised(self, messages, media, where="sample"):
        text, spans = self.render_with_spans(messages, where)
        laid, spans = self.lay_out(text, spans, len(media))
        return self.tokenize(laid, spans, media, where, special=False)
