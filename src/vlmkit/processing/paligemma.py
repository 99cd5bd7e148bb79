"""PaliGemma's prompt layout, as transformers' PaliGemmaProcessor's.

Pixels are those of the base :class:`~vlmkit.processing.image.ImageProcessor` (resize to height x width,
rescale, normalise: SiglipImageProcessor). The text is what makes PaliGemma its own family:

- a prompt becomes ``<image>`` x n_images + BOS + prompt + ``"\\n"`` when it has no image placeholder, else
  BOS goes right after its last placeholder and ``"\\n"`` at the end; the string is tokenised *without* the
  tokenizer's special tokens (PaliGemmaProcessor turns ``add_bos_token`` / ``add_eos_token`` off: the BOS is
  in the text). Each placeholder then expands to ``image_seq_len`` image tokens.
- a scored continuation is the processor's ``suffix``: tokenised on its own (transformers passes it as the
  tokenizer's ``text_pair``) with EOS appended, so ``score()`` includes the log-probability of that EOS, as
  the processor's ``labels`` do.

A prompt without images (which transformers' processor refuses) gets BOS + prompt + ``"\\n"``.
"""

from __future__ import annotations

from vlmkit.batch import IGNORE, Encoded
from vlmkit.errors import DataError
from vlmkit.processing.chat import DATA_PLACEHOLDER
from vlmkit.processing.layouts import TemplateLayout


def paligemma_prompt(prompt: str, n_images: int, image_token: str, bos_token: str) -> str:
    """PaliGemmaProcessor's text for ``prompt`` with ``n_images`` images, before placeholder expansion."""
    if image_token in prompt:
        end = prompt.rfind(image_token) + len(image_token)
        return prompt[:end] + bos_token + prompt[end:] + "\n"
    return image_token * n_images + bos_token + prompt + "\n"


class PaliGemmaLayout(TemplateLayout):
    """PaliGemmaProcessor's layout (module docstring): the prompt laid out and tokenised without special tokens, the
    suffix (a reply, a scored continuation) tokenised on its own with EOS appended. One prompt per request: the
    processor has no conversation format."""

    def prompt(self, text, media, where="prompt"):
        laid = paligemma_prompt(self.without_bos(text), len(media), self.cfg.image_token, self.tokenizer.bos_token or "")
        return self._prompt_of(self.tokenize(laid, [], media, where, special=False))

    def chat(self, messages, media, where="prompt"):
        question = self.one_question(messages, where, "this family (paligemma)")
        if not self.cfg.chat_template_jinja:  # no template: the question is the prompt
            return self.prompt(question, media, where)
        return self.prompt(self.render(self.images_in_front(messages, len(media)), generation=True), media, where)

    def suffix(self, text: str) -> list[int]:
        """A reply or continuation as the processor's ``suffix``: tokenised on its own, EOS appended."""
        return self.tokenizer.encode(text + self.cfg.eos_token)

    def supervised(self, messages, media, where="sample"):
        if [m["role"] for m in messages] != ["user", "assistant"]:
            raise DataError(f"{where}: this family (paligemma) trains on one question and its answer (a prompt and "
                            f"a suffix); the conversation has turns {[m['role'] for m in messages]}")
        question = messages[0]["content"]
        for placeholder in {DATA_PLACEHOLDER, self.cfg.image_token}:  # "<image>\n": the image on its own line
            question = question.replace(placeholder + "\n", placeholder).replace(placeholder, self.cfg.image_token)
        prompt = self.prompt(question, media, where)
        suffix = self.suffix(messages[1]["content"])
        ids = prompt.ids + suffix
        self.check_length(ids, where)
        return Encoded(ids, [IGNORE] * len(prompt.ids) + suffix, len(prompt.ids), prompt.media)

    def continuation(self, prompt, text, media, where="score"):
        p = self.prompt(prompt, media, where)
        return Encoded(p.ids + self.suffix(text), None, len(p.ids), p.media)
