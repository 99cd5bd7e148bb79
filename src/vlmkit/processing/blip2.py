"""BLIP-2's and InstructBLIP's prompt layout: fixed-size images whose query tokens go before the prompt.

Pixels are those of the base :class:`~vlmkit.processing.image.ImageProcessor` (resize to height x width, rescale,
normalise: BlipImageProcessor). The text is laid out as transformers' Blip2Processor / InstructBlipProcessor do:
the prompt is tokenised on its own with the tokenizer's special tokens (OPT's and Vicuna's BOS), and each image's
``num_query_tokens`` image tokens are put in front of it, so a prompt carries no image placeholder. InstructBLIP's
instruction (the prompt again, through the Q-Former's tokenizer) is the Processor's
(:meth:`~vlmkit.processing.Processor.instruction`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from vlmkit.batch import IGNORE, Encoded, MediaInputs
from vlmkit.config import ProcessorConfig
from vlmkit.errors import DataError
from vlmkit.processing.layouts import PromptLayout, TemplateLayout


class ImagesFirstLayout(TemplateLayout):
    """Blip2Processor's / InstructBlipProcessor's layout (module docstring): every image's query tokens, then the
    prompt tokenised on its own with the tokenizer's special tokens (not when a chat template wrote BOS itself).
    One prompt per request, and a supervised sample is one question and its answer."""

    def _ids(self, text: str, media: MediaInputs, where: str, special: bool = True) -> Encoded:
        if any(p in text for p in self.placeholders):
            raise DataError(f"{where}: this family's processor writes each image's tokens before the prompt itself; "
                            f"the prompt must not contain {self.cfg.image_token!r}")
        ids = [self.image_token_id] * sum(media.tokens) + self.tokenizer.encode(text, special=special)
        self.check_length(ids, where)
        return Encoded(ids, None, len(ids), media)

    def prompt(self, text, media, where="prompt"):
        return self._ids(text, media, where, special=not self.starts_with_bos(text))

    def chat(self, messages, media, where="prompt"):
        question = self.one_question(messages, where, f"this family ({self.cfg.family})")
        question = without_placeholders(question, self.placeholders)
        if not self.cfg.chat_template_jinja:  # no template: the question is the prompt
            return self._ids(question, media, where)
        text = self.render([{"role": "user", "content": question}], generation=True)
        return self._ids(text, media, where, special=not self.starts_with_bos(text))

    def supervised(self, messages, media, where="sample"):
        """The question (placeholders removed) is the prompt, the reply after a space its continuation (the tokens
        score() scores), then EOS, all supervised (so generation learns where to stop)."""
        if [m["role"] for m in messages] != ["user", "assistant"]:
            raise DataError(f"{where}: this family ({self.cfg.family}) trains on one question and its answer (a "
                            f"prompt and its continuation); the conversation has turns "
                            f"{[m['role'] for m in messages]}")
        question = without_placeholders(messages[0]["content"], self.placeholders)
        reply = messages[1]["content"]
        scored = self.continuation(question, reply if reply[:1].isspace() else " " + reply, media, where)
        ids = scored.ids + [self.tokenizer.eos_id]
        self.check_length(ids, where)
        start = scored.prompt_len
        return Encoded(ids, [IGNORE] * start + ids[start:], start, scored.media)


# ----------------------------------------------------------------------------- InstructBLIP's instruction


def without_placeholders(text: str, placeholders: tuple[str, ...]) -> str:
    """``text`` with its image placeholders (and the newline that puts an image on its own line) removed: the
    images of these families go before the prompt whatever it says."""
    for p in placeholders:
        text = text.replace(p + "\n", "").replace(p, "")
    return text


def conversation_instruction(messages: list[dict], placeholders: tuple[str, ...]) -> str:
    """The instruction of a conversation ({"role", "content"} turns): the text of the user turn that carries the
    image (its first placeholder; without any, the first user turn, before which the images go), placeholders
    removed. For one question and its answer, the question: what InstructBLIP's Q-Former reads."""
    users = [m["content"] for m in messages if m["role"] == "user"]
    turn = next((u for u in users if any(p in u for p in placeholders)), users[0] if users else "")
    return without_placeholders(turn, placeholders)


def instruction_tensors(tokenizer, pad_id: int, text: str, n_images: int, max_length: int,
                        where: str) -> dict[str, torch.Tensor]:
    """``qformer_input_ids`` and ``qformer_attention_mask`` [n_images, max_length]: ``text`` tokenised with the
    Q-Former tokenizer's special tokens (BERT's [CLS] ... [SEP], as InstructBlipProcessor), the same for every
    image, padded on the right. Longer texts are refused, not cut: transformers' processor does not cut them."""
    ids = tokenizer.encode(text, add_special_tokens=True).ids
    if len(ids) > max_length:
        raise DataError(f"{where}: the instruction has {len(ids)} Q-Former tokens, more than the processor's "
                        f"qformer_max_length {max_length}; shorten the prompt")
    row = torch.full((max_length,), pad_id, dtype=torch.long)
    row[:len(ids)] = torch.tensor(ids, dtype=torch.long)
    mask = (torch.arange(max_length) < len(ids)).long()
    return {"qformer_input_ids": row.expand(n_images, -1).clone(),
            "qformer_attention_mask": mask.expand(n_images, -1).clone()}


QFORMER_TOKENIZER = "qformer_tokenizer.json"  # InstructBLIP's second tokenizer, beside tokenizer.json


@dataclass
class InstructBlipProcessorConfig(ProcessorConfig):
    """InstructBLIP's processor: the Q-Former reads the prompt too, tokenised by its own tokenizer
    (qformer_tokenizer.json beside tokenizer.json; without one, the LM's), its ids padded with ``qformer_pad_token``
    ("": the LM's pad token) to ``qformer_max_length`` for every image (``MediaInputs.extra``)."""

    qformer_max_length: int = 0
    qformer_pad_token: str = ""


class InstructionLayout(PromptLayout):
    """Any layout, plus the instruction InstructBLIP's Q-Former reads with each image: the prompt of ``prompt`` and
    ``continuation`` (never the continuation), the question of a chat, the user turn that carries the image in a
    conversation (for one question and answer, the question), written into the media's ``extra``."""

    def __init__(self, inner: PromptLayout, tokenizer, pad_id: int, max_length: int):
        self.inner, self.qformer_tokenizer, self.pad_id, self.max_length = inner, tokenizer, pad_id, max_length
        self.cfg, self.tokenizer = inner.cfg, inner.tokenizer

    def instruct(self, media: MediaInputs, text: str, where: str) -> MediaInputs:
        extra = instruction_tensors(self.qformer_tokenizer, self.pad_id, without_placeholders(text, self.inner.placeholders),
                                    len(media), self.max_length, where)
        return dataclasses.replace(media, extra={**media.extra, **extra})

    def _with(self, enc: Encoded, media: MediaInputs) -> Encoded:
        return dataclasses.replace(enc, media=media)

    def prompt(self, text, media, where="prompt"):
        media = self.instruct(media, text, where)
        return self._with(self.inner.prompt(text, media, where), media)

    def chat(self, messages, media, where="prompt"):
        media = self.instruct(media, conversation_instruction(messages, self.inner.placeholders), where)
        return self._with(self.inner.chat(messages, media, where), media)

    def supervised(self, messages, media, where="sample"):
        media = self.instruct(media, conversation_instruction(messages, self.inner.placeholders), where)
        return self._with(self.inner.supervised(messages, media, where), media)

    def continuation(self, prompt, text, media, where="score"):
        media = self.instruct(media, prompt, where)
        return self._with(self.inner.continuation(prompt, text, media, where), media)
