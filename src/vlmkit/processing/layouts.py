"""Prompt layouts: how a family's prompts, chats and supervised conversations become token ids.

One interface, one path for training, evaluation, chat, scoring and serving (the Processor calls it):

- ``prompt(text, media)``: raw text with image placeholders, no template (``Pipeline.generate``);
- ``chat(messages, media)``: a conversation ending with a user turn, through the chat template, ending in the
  assistant's generation prompt (``Pipeline.chat``, the server);
- ``supervised(messages, media)``: a conversation with its replies as labels (training);
- ``continuation(prompt, text, media)``: a prompt and a continuation to score after it (``Pipeline.score``).

Each returns an :class:`~vlmkit.batch.Encoded`: ids, labels, how many leading tokens are the prompt, the media with
what the layout added to them. The generic layouts:

- :class:`SegmentLayout`, for models trained in vlmkit (``text_mode: segments``): each text piece between image
  placeholders is tokenised on its own and every placeholder becomes its image's ids, so a token boundary never
  depends on the text around it, and the label mask is exact;
- :class:`TemplateLayout`, for imported families (``text_mode: whole``): the placeholders expand in the text and
  the whole string is tokenised with the tokenizer's special tokens, exactly as a transformers processor does (a
  SentencePiece tokenizer does not tokenise pieces the way it tokenises their concatenation); a supervised token is
  one that starts inside a reply.

Families whose reference processor lays prompts out its own way subclass :class:`TemplateLayout`
(PaliGemma: processing/paligemma.py; BLIP-2: processing/blip2.py; IDEFICS: processing/idefics.py; Mllama:
processing/mllama.py).
"""

from __future__ import annotations

import re

from vlmkit.batch import IGNORE, Encoded, MediaInputs
from vlmkit.config import ProcessorConfig
from vlmkit.errors import DataError
from vlmkit.processing.chat import DATA_PLACEHOLDER, TEMPLATES, Segment, jinja_template
from vlmkit.processing.tokenizer import TextTokenizer


def first_label(labels: list[int]) -> int:
    """The index of the first supervised token (the prompt is what comes before it)."""
    return next((i for i, t in enumerate(labels) if t != IGNORE), len(labels))


def check_messages(messages, where: str) -> list[dict]:
    """A chat request's messages: non-empty, each {"role": system|user|assistant, "content": str}, ending with the
    user's turn (the model answers it)."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: messages must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: messages[{i}] must be {{'role': system|user|assistant, 'content': str}}")
    if messages[-1]["role"] != "user":
        raise DataError(f"{where}: the last message must be the user's (the model answers it)")
    return messages


class PromptLayout:
    """The interface (module docstring); the shared checks and the template of ``cfg`` (vlmkit's code templates by
    name, or the folder's Jinja template)."""

    def __init__(self, cfg: ProcessorConfig, tokenizer: TextTokenizer):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.image_token_id = tokenizer.token_id(cfg.image_token)
        self.template = TEMPLATES.build(cfg.chat_template)

    # -------------------------------------------------------------------------------------------- the interface
    def prompt(self, text: str, media: MediaInputs, where: str = "prompt") -> Encoded:
        raise NotImplementedError

    def chat(self, messages: list[dict], media: MediaInputs, where: str = "prompt") -> Encoded:
        raise NotImplementedError

    def supervised(self, messages: list[dict], media: MediaInputs, where: str = "sample") -> Encoded:
        raise NotImplementedError

    def continuation(self, prompt: str, text: str, media: MediaInputs, where: str = "score") -> Encoded:
        raise NotImplementedError

    def image_prompt(self, text: str, grid: tuple[int, int], unconditional: bool = False,
                     where: str = "prompt") -> list[int]:
        """The ids of ``text`` in image-generation mode, ending with the image-start layout of a ``grid`` (h, w) of
        codes; ``unconditional``: the prompt classifier-free guidance compares with. Layouts of families that
        generate images implement it."""
        raise DataError(f"{where}: this model's prompts do not ask for images (its family does not generate them)")

    # -------------------------------------------------------------------------------------------- shared parts
    @property
    def placeholders(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(p for p in (self.cfg.image_token, DATA_PLACEHOLDER) if p))

    def check_placeholders(self, texts: list[str], n_images: int, where: str) -> None:
        n_ph = sum(t.count(self.cfg.image_token) for t in texts)
        if n_ph != n_images:
            raise DataError(f"image placeholder count {n_ph} != images {n_images} in {where}: put one "
                            f"{self.cfg.image_token!r} in the text for each image")

    def check_length(self, ids: list[int], where: str) -> None:
        if len(ids) > self.cfg.max_length:
            raise DataError(f"{where}: {len(ids)} tokens exceed max_length {self.cfg.max_length} "
                            f"(raise processor max_length or shorten the text)")

    def check_refused(self, text: str, where: str) -> None:
        for refused in self.cfg.refused_placeholders:
            if refused in text:
                raise DataError(f"{where}: {refused!r} is a placeholder of an input kind vlmkit does not implement "
                                f"for this model (images only, with {self.cfg.image_token!r}); remove it")

    def one_question(self, messages: list[dict], where: str, why: str) -> str:
        """The user message of a chat that must be a single one (``why``: what answers one prompt)."""
        if len(messages) != 1:
            raise DataError(f"{where}: {why} answers one prompt; send a single user message")
        return messages[0]["content"]

    def images_in_front(self, messages: list[dict], n_images: int) -> list[dict]:
        """``messages`` with the images before the first user turn's text when no message places them (one
        placeholder and a newline each: how vlmkit's chat() puts images before a question)."""
        if not n_images or any(mark in m["content"] for m in messages for mark in self.placeholders):
            return messages
        first = next(i for i, m in enumerate(messages) if m["role"] == "user")
        return [dict(m, content=(DATA_PLACEHOLDER + "\n") * n_images + m["content"]) if i == first else m
                for i, m in enumerate(messages)]

    def jinja(self):
        tok = self.tokenizer
        return jinja_template(self.cfg.chat_template_jinja, self.cfg.image_token, tok.bos_token, tok.eos_token)

    def starts_with_bos(self, text: str) -> bool:
        bos = self.tokenizer.bos_token
        return bool(bos) and text.startswith(bos)

    def without_bos(self, text: str) -> str:
        """``text`` without the BOS it begins with: for layouts that write BOS themselves (after the images), so
        that a prompt already holding one (rendered by a chat template) does not get BOS twice."""
        return text[len(self.tokenizer.bos_token):] if self.starts_with_bos(text) else text


class SegmentLayout(PromptLayout):
    """vlmkit's own layout (module docstring): segments of text tokenised on their own, placeholders expanded to
    their image's ids (``media.texts`` when the image processor writes an image's layout as text)."""

    def encode_text(self, text: str, media: MediaInputs, first: int) -> list[int]:
        """Ids of ``text``, the placeholders in it being images ``first``, ``first + 1``, ..."""
        ids: list[int] = []
        for i, part in enumerate(text.split(self.cfg.image_token)):
            if i > 0:
                k = first + i - 1
                if media.texts is not None:
                    ids.extend(self.tokenizer.encode(media.texts[k]))
                else:
                    ids.extend([self.image_token_id] * media.tokens[k])
            ids.extend(self.tokenizer.encode(part))
        return ids

    def encode_segments(self, segments, media: MediaInputs, where: str) -> Encoded:
        self.check_placeholders([s.text for s in segments], len(media), where)
        ids: list[int] = []
        labels: list[int] = []
        seen = 0
        for seg in segments:
            seg_ids = self.encode_text(seg.text, media, seen)
            seen += seg.text.count(self.cfg.image_token)
            ids.extend(seg_ids)
            labels.extend(seg_ids if seg.train else [IGNORE] * len(seg_ids))
        self.check_length(ids, where)
        return Encoded(ids, labels, first_label(labels), media)

    def _segments(self, messages: list[dict], generation: bool):
        if self.cfg.chat_template_jinja:
            return [Segment(self.jinja().render(messages, add_generation_prompt=generation))]
        messages = [dict(m, content=m["content"].replace(DATA_PLACEHOLDER, self.cfg.image_token)) for m in messages]
        return self.template.render(messages, add_generation_prompt=generation)

    def prompt(self, text, media, where="prompt"):
        return self._without_labels(self.encode_segments([Segment(text)], media, where))

    def chat(self, messages, media, where="prompt"):
        segments = self._segments(self.images_in_front(messages, len(media)), generation=True)
        return self._without_labels(self.encode_segments(segments, media, where))

    def supervised(self, messages, media, where="sample"):
        return self.encode_segments(self.template.render(messages), media, where)

    def continuation(self, prompt, text, media, where="score"):
        p = self.prompt(prompt, media, where)
        return Encoded(p.ids + self.tokenizer.encode(text), None, len(p.ids), p.media)

    @staticmethod
    def _without_labels(enc: Encoded) -> Encoded:
        return Encoded(enc.ids, None, len(enc.ids), enc.media)


class TemplateLayout(PromptLayout):
    """A transformers processor's layout (module docstring): placeholders expanded in the text, the whole string
    tokenised with the tokenizer's special tokens (not when a chat template wrote BOS itself, as transformers'
    ``apply_chat_template``)."""

    def expand(self, text: str, spans: list[tuple[int, int]], media: MediaInputs, where: str):
        """(``text`` with each placeholder replaced by its image's text — ``media.texts``, or the image token times
        its token count — and the character ``spans`` moved along)."""
        self.check_refused(text, where)
        self.check_placeholders([text], len(media), where)
        token = self.cfg.image_token
        starts = [m.start() for m in re.finditer(re.escape(token), text)]
        expansions = [media.texts[i] if media.texts else token * media.tokens[i] for i in range(len(starts))]

        def moved(pos: int) -> int:  # a position of ``text`` in the expanded text
            return pos + sum(len(e) - len(token) for q, e in zip(starts, expansions) if q < pos)

        pieces, last = [], 0
        for q, e in zip(starts, expansions):
            pieces += [text[last:q], e]
            last = q + len(token)
        pieces.append(text[last:])
        return "".join(pieces), [(moved(a), moved(b)) for a, b in spans]

    def tokenize(self, text: str, spans: list[tuple[int, int]], media: MediaInputs, where: str,
                 special: bool = True) -> Encoded:
        """Ids of ``text`` with its placeholders expanded, and labels: a token's id where the token starts inside
        one of the character ``spans`` of ``text``, -100 elsewhere."""
        expanded, spans = self.expand(text, spans, media, where)
        enc = self.tokenizer.tok.encode(expanded, add_special_tokens=special)
        labels = [t if any(a <= start < b for a, b in spans) and end > start else IGNORE
                  for t, (start, end) in zip(enc.ids, enc.offsets)]
        if enc.ids.count(self.image_token_id) != sum(media.tokens):
            raise DataError(f"{where}: the text tokenised to {enc.ids.count(self.image_token_id)} image tokens, the "
                            f"images fill {sum(media.tokens)}; {self.cfg.image_token!r} must be a special token "
                            f"of the tokenizer")
        self.check_length(enc.ids, where)
        return Encoded(list(enc.ids), labels, first_label(labels), media)

    def render(self, messages: list[dict], generation: bool) -> str:
        """The chat template's text of ``messages`` (placeholders still in it)."""
        if self.cfg.chat_template_jinja:
            return self.jinja().render(messages, add_generation_prompt=generation)
        messages = [dict(m, content=m["content"].replace(DATA_PLACEHOLDER, self.cfg.image_token)) for m in messages]
        return "".join(s.text for s in self.template.render(messages, add_generation_prompt=generation))

    def render_with_spans(self, messages: list[dict], where: str) -> tuple[str, list[tuple[int, int]]]:
        """The conversation's text and the character spans of its replies (with their end-of-turn markup)."""
        if self.cfg.chat_template_jinja:
            return self.jinja().render_with_spans(messages, where)
        text, spans = "", []
        for seg in self.template.render(messages):
            piece = seg.text.replace(DATA_PLACEHOLDER, self.cfg.image_token)
            if seg.train:
                spans.append((len(text), len(text) + len(piece)))
            text += piece
        return text, spans

    def prompt(self, text, media, where="prompt"):
        """A raw prompt's ids; one that already begins with BOS (e.g. rendered by a chat template) is tokenised
        without the special tokens, transformers' documented call for it (``add_special_tokens=False``)."""
        return self._prompt_of(self.tokenize(text, [], media, where, special=not self.starts_with_bos(text)))

    def chat(self, messages, media, where="prompt"):
        text = self.render(self.images_in_front(messages, len(media)), generation=True)
        return self._prompt_of(self.tokenize(text, [], media, where, special=not self.starts_with_bos(text)))

    def supervised(self, messages, media, where="sample"):
        text, spans = self.render_with_spans(messages, where)
        return self.tokenize(text, spans, media, where, special=not self.starts_with_bos(text))

    def continuation(self, prompt, text, media, where="score"):
        """The continuation's tokens are those that follow the prompt's when the two are tokenised together
        (lm-evaluation-harness / lmms-eval)."""
        start = len(self.prompt(prompt, media, where).ids)
        whole = self.prompt(prompt + text, media, where)
        return Encoded(whole.ids, None, start, whole.media)

    @staticmethod
    def _prompt_of(enc: Encoded) -> Encoded:
        return Encoded(enc.ids, None, len(enc.ids), enc.media)


__all__ = ["PromptLayout", "SegmentLayout", "TemplateLayout", "check_messages", "first_label"]


class RefusingLayout:
    """The prompt layout of a model that answers no prompt (a dual encoder, a VQ image tokenizer): each of the four
    calls is refused by name, with ``why`` saying what the model does instead."""

    def __init__(self, cfg, tokenizer):
        self.cfg, self.tokenizer = cfg, tokenizer

    def why(self, what: str) -> str:
        raise NotImplementedError

    def _refuse(self, what: str):
        raise DataError(self.why(what))

    def prompt(self, text, media, where="prompt"):
        self._refuse("a prompt")

    def chat(self, messages, media, where="prompt"):
        self._refuse("chat")

    def supervised(self, messages, media, where="sample"):
        self._refuse("a supervised conversation")

    def continuation(self, prompt, text, media, where="score"):
        self._refuse("score")

    def image_prompt(self, text, grid, unconditional=False, where="prompt"):
        self._refuse("an image-generation prompt")
