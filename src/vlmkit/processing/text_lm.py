"""A text-only language model's processing: the folder's tokenizer and chat template laid out as transformers'
tokenizer lays them out (a :class:`~vlmkit.processing.layouts.TemplateLayout` without image placeholders), and an
image processor that refuses images, naming the model.

Transformers' tokenizer adds its special tokens (Llama's BOS) to a raw prompt; a prompt whose text already begins
with the BOS (one rendered by the chat template) is tokenised without them, transformers' documented call for
such text (``add_special_tokens=False``), so no path gives it a second BOS. A chat is tokenised as the tokenizer's
``apply_chat_template`` tokenises it: the template's text without special tokens added (the template writes the
BOS where the model wants one).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlmkit.batch import MediaInputs
from vlmkit.config import ProcessorConfig
from vlmkit.errors import DataError
from vlmkit.processing.chat import TEMPLATES, JinjaTemplate
from vlmkit.processing.layouts import TemplateLayout
from vlmkit.processing.tokenizer import TextTokenizer


@dataclass
class TextLMProcessorConfig(ProcessorConfig):
    """A text-only LM's processor: no image placeholder (``image_token`` ""), the whole text tokenised as
    transformers does (``text_mode`` "whole"). ``source``: what the model is (the folder it was imported from),
    which the refusal of images names."""

    family: str = "text"
    image_token: str = ""
    text_mode: str = "whole"
    source: str = ""


def _refusal(cfg: TextLMProcessorConfig, n: int, where: str) -> DataError:
    what = cfg.source or "this model"
    return DataError(f"{where + ': ' if where else ''}{what} is a text-only language model: it reads no images, and "
                     f"{n} were given; ask it without images (a vision-language model reads them)")


class NoImages:
    """The image processor of a text-only LM: no images, or a clear refusal naming the model."""

    transform = None

    def __init__(self, cfg: TextLMProcessorConfig):
        self.cfg = cfg

    def __call__(self, images: list, where: str = "") -> MediaInputs:
        if images:
            raise _refusal(self.cfg, len(images), where)
        return MediaInputs(torch.zeros(0, 0), [])

    def placeholders(self, images: list, where: str = "") -> MediaInputs:
        return self(list(images), where)


class StringContentTemplate(JinjaTemplate):
    """A text LM's chat template, given each message's content as the string it is (as a tokenizer's
    ``apply_chat_template`` passes it), not as a processor's list of image and text parts."""

    def parts(self, content: str, images_first: int = 0) -> str:
        return content


class TextLMLayout(TemplateLayout):
    """TemplateLayout without images (module docstring). A chat needs the folder's chat template: a base model
    without one refuses chat and supervised conversations by name, as transformers' apply_chat_template does."""

    def __init__(self, cfg: TextLMProcessorConfig, tokenizer: TextTokenizer):
        self.cfg, self.tokenizer = cfg, tokenizer
        self.image_token_id = None
        self.template = TEMPLATES.build(cfg.chat_template)

    def check_placeholders(self, texts: list[str], n_images: int, where: str) -> None:
        if n_images:
            raise _refusal(self.cfg, n_images, where)

    def expand(self, text: str, spans: list[tuple[int, int]], media: MediaInputs, where: str):
        self.check_refused(text, where)
        self.check_placeholders([text], len(media), where)
        return text, spans

    def jinja(self):
        tok = self.tokenizer
        return StringContentTemplate(self.cfg.chat_template_jinja, "", tok.bos_token, tok.eos_token)

    def _templated(self, where: str) -> None:
        if not self.cfg.chat_template_jinja:
            raise DataError(f"{where}: {self.cfg.source or 'this model'} has no chat template (a base model): "
                            f"generate or score a raw prompt, or add a chat_template to its tokenizer_config.json")

    def chat(self, messages, media, where="prompt"):
        self._templated(where)
        text = self.render(messages, generation=True)
        return self._prompt_of(self.tokenize(text, [], media, where, special=False))

    def supervised(self, messages, media, where="sample"):
        self._templated(where)
        text, spans = self.render_with_spans(messages, where)
        return self.tokenize(text, spans, media, where, special=False)


__all__ = ["NoImages", "TextLMLayout", "TextLMProcessorConfig"]
