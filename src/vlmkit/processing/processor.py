"""The one Processor used by training, evaluation and serving.

It turns (images, conversation or raw prompt) into model inputs: image tensors, token ids in which every
image placeholder is expanded to exactly the connector's token count, and labels masked so that only
assistant tokens are trained. Placeholder/image mismatches are refused here, before any forward pass.

Two text modes (``ProcessorConfig.text_mode``): vlmkit's own models tokenise segment by segment (an exact
label mask, the same boundaries everywhere); imported Hugging Face families tokenise the whole expanded
string with the tokenizer's special tokens, which is what gives transformers' ``input_ids`` to the id (a
SentencePiece tokenizer does not tokenise pieces the way it tokenises their concatenation).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from vlmkit.config import ProcessorConfig, from_dict, to_dict
from vlmkit.errors import CheckpointError, ConfigError, DataError
from vlmkit.processing.chat import (DATA_PLACEHOLDER, TEMPLATES, Segment, jinja_template, normalize_messages,
                                    render_jinja)
from vlmkit.processing.blip2 import conversation_instruction, instruction_tensors, without_placeholders
from vlmkit.processing.image import IMAGE_PROCESSORS, ImageInputs, load_image
from vlmkit.processing.tokenizer import TextTokenizer
from vlmkit.utils import atomic_write_json, atomic_write_text

IGNORE = -100
QFORMER_TOKENIZER = "qformer_tokenizer.json"  # InstructBLIP's second tokenizer, beside tokenizer.json


class Processor:
    """``image_token`` empty: the processor of a dual encoder (CLIP, SigLIP), whose texts hold no images and are
    encoded by :meth:`encode_texts`."""

    def __init__(self, cfg: ProcessorConfig, tokenizer: TextTokenizer, qformer_tokenizer=None):
        """``qformer_tokenizer`` (a ``tokenizers.Tokenizer``): InstructBLIP's Q-Former tokenizer, used when
        ``cfg.qformer_max_length`` > 0; without one the Q-Former shares the LM's tokenizer."""
        if cfg.image_token and cfg.image_seq_len <= 0:
            raise ValueError("ProcessorConfig.image_seq_len must be set from the model (tokens per image)")
        self.cfg = cfg
        self.tokenizer = tokenizer
        if cfg.text_mode not in ("segments", "whole"):
            raise ConfigError(f"processor text_mode must be 'segments' or 'whole', got {cfg.text_mode!r}")
        if cfg.text_padding not in ("longest", "max_length"):
            raise ConfigError(f"processor text_padding must be 'longest' or 'max_length', got {cfg.text_padding!r}")
        self.template = TEMPLATES.build(cfg.chat_template)
        self.images = IMAGE_PROCESSORS.build(cfg.image_processor, cfg)
        if self.images.images_first and cfg.text_mode != "whole":
            raise ConfigError(f"processor image_processor {cfg.image_processor!r} lays prompts out as transformers' "
                              f"processor does (text_mode: whole); vlmkit's own models place images with "
                              f"placeholders (image_processor: fixed)")
        self.image_token_id = tokenizer.token_id(cfg.image_token) if cfg.image_token else None
        self._truncating = None  # a copy of the tokenizer that truncates to max_length (encode_texts)
        self.qformer_tokenizer = None  # InstructBLIP: the tokenizer of the Q-Former's instruction
        if cfg.qformer_max_length > 0:
            self.qformer_tokenizer = qformer_tokenizer if qformer_tokenizer is not None else tokenizer.tok
            pad = cfg.qformer_pad_token or tokenizer.pad_token
            self.qformer_pad_id = self.qformer_tokenizer.token_to_id(pad)
            if self.qformer_pad_id is None:
                raise CheckpointError(f"processor qformer_pad_token {pad!r} is not in the Q-Former tokenizer's "
                                      f"vocabulary")

    @property
    def transform(self):
        return self.images.transform

    # ------------------------------------------------------------------ persistence
    def save(self, folder: str | Path) -> None:
        atomic_write_json(Path(folder) / "processor.json", to_dict(self.cfg))
        self.tokenizer.save(Path(folder) / "tokenizer.json")
        if self.qformer_tokenizer is not None:
            atomic_write_text(Path(folder) / QFORMER_TOKENIZER, self.qformer_tokenizer.to_str())

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> Processor:
        folder = Path(folder)
        cfg = from_dict(ProcessorConfig, json.loads((folder / "processor.json").read_text()))
        tok = TextTokenizer.from_file(folder / "tokenizer.json", pad_token=cfg.pad_token, eos_token=cfg.eos_token,
                                      bos_token=cfg.bos_token or None)
        qformer = None
        if cfg.qformer_max_length > 0:
            from tokenizers import Tokenizer

            path = folder / QFORMER_TOKENIZER
            if not path.is_file():
                raise CheckpointError(f"{folder}: processor.json has qformer_max_length {cfg.qformer_max_length} "
                                      f"(the Q-Former reads an instruction) but {QFORMER_TOKENIZER} is missing")
            qformer = Tokenizer.from_file(str(path))
        return cls(cfg, tok, qformer)

    # ------------------------------------------------------------------ images
    def prepare_images(self, images, where: str = "") -> ImageInputs:
        """Paths or PIL images -> ImageInputs (pixels, and how many tokens each image fills)."""
        return self.images([load_image(im, where) for im in images])

    def preprocess_images(self, images, where: str = "") -> torch.Tensor:
        """Paths or PIL images -> [n, C, H, W] (fixed-size families; training reads images this way)."""
        return self.prepare_images(images, where).pixel_values

    # ------------------------------------------------------------------ text
    def _encode_text(self, text: str, n_images_left: list[int], where: str) -> list[int]:
        """Tokenise text, expanding each placeholder to image_seq_len image tokens."""
        ids: list[int] = []
        parts = text.split(self.cfg.image_token)
        for i, part in enumerate(parts):
            if i > 0:
                n_images_left[0] -= 1
                ids.extend([self.image_token_id] * self.cfg.image_seq_len)
            ids.extend(self.tokenizer.encode(part))
        return ids

    def check_placeholders(self, texts: list[str], n_images: int, where: str) -> None:
        n_ph = sum(t.count(self.cfg.image_token) for t in texts)
        if n_ph != n_images:
            raise DataError(f"image placeholder count {n_ph} != images {n_images} in {where}: put one "
                            f"{self.cfg.image_token!r} in the text for each image")

    def encode_segments(self, segments: list[Segment], n_images: int, where: str) -> tuple[list[int], list[int]]:
        self.check_placeholders([s.text for s in segments], n_images, where)
        ids: list[int] = []
        labels: list[int] = []
        left = [n_images]
        for seg in segments:
            seg_ids = self._encode_text(seg.text, left, where)
            ids.extend(seg_ids)
            labels.extend(seg_ids if seg.train else [IGNORE] * len(seg_ids))
        if len(ids) > self.cfg.max_length:
            raise DataError(f"{where}: {len(ids)} tokens exceed max_length {self.cfg.max_length} "
                            f"(raise processor max_length or shorten the conversation)")
        return ids, labels

    def encode_whole(self, text: str, images: ImageInputs, where: str, special: bool = True) -> list[int]:
        """Whole-string mode: each placeholder becomes its image's text (``image_token`` x its token count, or
        the family's tiled layout), then the string is tokenised at once, ``special`` adding BOS and the like."""
        return self._encode_supervised(text, [], images, where, special)[0]

    def _as_inputs(self, images: int | ImageInputs, where: str) -> ImageInputs | int:
        if isinstance(images, ImageInputs) or self.cfg.text_mode == "segments":
            return images
        raise DataError(f"{where}: this processor ({self.cfg.image_processor} images, whole-string text) sizes each "
                        f"image's tokens from the image: pass the prepared ImageInputs, not a count")

    def _count(self, images: int | ImageInputs) -> int:
        return images if isinstance(images, int) else len(images)

    def _family_layout(self, text: str, images: int | ImageInputs, where: str,
                       templated: bool = False) -> list[int] | None:
        """Ids of ``text`` laid out by the family's image processor (its ``format_prompt`` hook: PaliGemma puts
        BOS after the images and a newline at the end, and adds no special tokens), or None when the family
        has no layout of its own and the generic path applies. A family whose tokenizer adds its special
        tokens (``prompt_special_tokens``, Mllama) gets them, except on a chat template's text that starts with
        BOS (``templated``), as transformers' apply_chat_template."""
        if not isinstance(images, ImageInputs):
            return None
        bos = self.tokenizer.bos_token
        if self.images.images_first:  # BLIP-2, InstructBLIP: the images' tokens, then the prompt with its BOS
            return self._images_first(text, images, where, special=not (templated and bos and text.startswith(bos)))
        laid_out = self.images.format_prompt(text, len(images))
        if laid_out is None:
            return None
        special = self.images.prompt_special_tokens and not (templated and bos and laid_out.startswith(bos))
        return self.encode_whole(laid_out, images, where, special=special)

    def _images_first(self, text: str, images: ImageInputs, where: str, special: bool = True) -> list[int]:
        """Ids of a family whose processor writes every image's tokens before the prompt (BLIP-2, InstructBLIP):
        the image token x the images' tokens, then ``text`` tokenised on its own with the special tokens (not
        when a chat template wrote BOS itself)."""
        if any(p in text for p in self._placeholders):
            raise DataError(f"{where}: this family's processor writes each image's tokens before the prompt itself; "
                            f"the prompt must not contain {self.cfg.image_token!r}")
        ids = [self.image_token_id] * sum(images.tokens) + self.tokenizer.encode(text, special=special)
        if len(ids) > self.cfg.max_length:
            raise DataError(f"{where}: {len(ids)} tokens exceed max_length {self.cfg.max_length}")
        return ids

    @property
    def _placeholders(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(p for p in (self.cfg.image_token, DATA_PLACEHOLDER) if p))

    def encode_conversation(self, conversations: list, images: int | ImageInputs, where: str = "sample"):
        """LLaVA/OpenAI-style turns -> (input_ids, labels) with the chat template applied; only the assistant
        replies (and the template's end-of-turn markup after them) are supervised.

        Whole-string mode (imported families) tokenises the conversation as the family's processor tokenises a
        prompt, so training sees the ids inference sees: the folder's Jinja template (or the segment template)
        renders the text, the image placeholders expand in it, the whole string is tokenised, and a token is
        supervised when it starts inside a reply. A family with its own layout (PaliGemma) trains on one
        question and its answer as its processor's prompt and ``suffix``; an images-first family (BLIP-2) on one
        question as the prompt and the answer as its continuation. The instruction a Q-Former reads
        (InstructBLIP) goes into ``images.extra`` (:meth:`instruction`)."""
        messages = normalize_messages(conversations, where)
        if self.cfg.text_mode == "segments":
            return self.encode_segments(self.template.render(messages), self._count(images), where)
        images = self._as_inputs(images, where)
        self._instruct(images, conversation_instruction(messages, self._placeholders), where)
        if self.images.images_first:
            return self._encode_images_first(messages, images, where)
        if self.images.format_continuation("") is not None:  # a prompt + suffix family (PaliGemma)
            return self._encode_prompt_suffix(messages, images, where)
        if self.cfg.chat_template_jinja:
            template = jinja_template(self.cfg.chat_template_jinja, self.cfg.image_token, self.tokenizer.bos_token,
                                      self.tokenizer.eos_token)
            text, spans = template.render_with_spans(messages, where)
        else:
            text, spans = "", []
            for seg in self.template.render(messages):
                piece = seg.text.replace(DATA_PLACEHOLDER, self.cfg.image_token)
                if seg.train:
                    spans.append((len(text), len(text) + len(piece)))
                text += piece
        bos = self.tokenizer.bos_token
        special = not (bos and text.startswith(bos))
        if (laid := self.images.format_supervised(text, spans, len(images))) is not None:  # IDEFICS' layout
            (text, spans), special = laid, False
        return self._encode_supervised(text, spans, images, where, special=special)

    def _encode_prompt_suffix(self, messages: list[dict], images: ImageInputs, where: str):
        """(ids, labels) of a prompt + suffix family (PaliGemma): one user turn laid out as the prompt, the reply
        tokenised as the scored continuation is (suffix + EOS) and supervised whole."""
        if [m["role"] for m in messages] != ["user", "assistant"]:
            raise DataError(f"{where}: this family ({self.cfg.image_processor}) trains on one question and its "
                            f"answer (a prompt and a suffix); the conversation has turns "
                            f"{[m['role'] for m in messages]}")
        question = messages[0]["content"]
        for placeholder in {DATA_PLACEHOLDER, self.cfg.image_token}:  # "<image>\n": the image on its own line
            question = question.replace(placeholder + "\n", placeholder).replace(placeholder, self.cfg.image_token)
        prompt = self._family_layout(question, images, where)
        suffix = self.tokenizer.encode(self.images.format_continuation(messages[1]["content"]))
        ids = prompt + suffix
        if len(ids) > self.cfg.max_length:
            raise DataError(f"{where}: {len(ids)} tokens exceed max_length {self.cfg.max_length}")
        return ids, [IGNORE] * len(prompt) + suffix

    def _encode_images_first(self, messages: list[dict], images: ImageInputs, where: str):
        """(ids, labels) of an images-first family (BLIP-2, InstructBLIP): the question (placeholders removed) is
        the prompt, the reply after a space its continuation (the tokens score() scores), then EOS, all
        supervised (so generation learns where to stop)."""
        if [m["role"] for m in messages] != ["user", "assistant"]:
            raise DataError(f"{where}: this family ({self.cfg.image_processor}) trains on one question and its "
                            f"answer (a prompt and its continuation); the conversation has turns "
                            f"{[m['role'] for m in messages]}")
        question = without_placeholders(messages[0]["content"], self._placeholders)
        reply = messages[1]["content"]
        ids, start = self.encode_score(question, reply if reply[:1].isspace() else " " + reply, images, where)
        ids = ids + [self.tokenizer.eos_id]
        if len(ids) > self.cfg.max_length:
            raise DataError(f"{where}: {len(ids)} tokens exceed max_length {self.cfg.max_length}")
        return ids, [IGNORE] * start + ids[start:]

    def _encode_supervised(self, text: str, spans: list[tuple[int, int]], images: ImageInputs, where: str,
                           special: bool) -> tuple[list[int], list[int]]:
        """Whole-string ids of ``text`` with its placeholders expanded, and labels: a token's id where the token
        starts inside one of the character ``spans`` of ``text``, -100 elsewhere."""
        for refused in self.cfg.refused_placeholders:
            if refused in text:
                raise DataError(f"{where}: {refused!r} is a placeholder of an input kind vlmkit does not implement "
                                f"for this model (images only, with {self.cfg.image_token!r}); remove it")
        self.check_placeholders([text], len(images), where)
        token = self.cfg.image_token
        starts = [m.start() for m in re.finditer(re.escape(token), text)]
        expansions = [images.texts[i] if images.texts else token * images.tokens[i] for i in range(len(starts))]

        def moved(pos: int) -> int:  # a position of ``text`` in the expanded text
            return pos + sum(len(e) - len(token) for q, e in zip(starts, expansions) if q < pos)

        expanded, last = [], 0
        for q, e in zip(starts, expansions):
            expanded += [text[last:q], e]
            last = q + len(token)
        expanded.append(text[last:])
        enc = self.tokenizer.tok.encode("".join(expanded), add_special_tokens=special)
        spans = [(moved(a), moved(b)) for a, b in spans]
        labels = [t if any(a <= start < b for a, b in spans) and end > start else IGNORE
                  for t, (start, end) in zip(enc.ids, enc.offsets)]
        if enc.ids.count(self.image_token_id) != sum(images.tokens):
            raise DataError(f"{where}: the text tokenised to {enc.ids.count(self.image_token_id)} image tokens, the "
                            f"images fill {sum(images.tokens)}; {self.cfg.image_token!r} must be a special token "
                            f"of the tokenizer")
        if len(enc.ids) > self.cfg.max_length:
            raise DataError(f"{where}: {len(enc.ids)} tokens exceed max_length {self.cfg.max_length} "
                            f"(raise processor max_length or shorten the text)")
        return list(enc.ids), labels

    def encode_chat_prompt(self, question: str, images: int | ImageInputs, where: str = "prompt") -> list[int]:
        """A single user question -> prompt ids ending in the assistant's generation prompt. Without
        placeholders in the question, the images go before it (one placeholder and a newline each, or the
        template's own image markup)."""
        images = self._as_inputs(images, where)
        n = self._count(images)
        self._instruct(images, question, where)
        if self.images.images_first:  # the images go before the prompt whatever the question or template says
            question, n = without_placeholders(question, self._placeholders), 0
        if self.cfg.chat_template_jinja:
            text = render_jinja(self.cfg.chat_template_jinja, question, n, self.cfg.image_token, self.tokenizer)
            if (ids := self._family_layout(text, images, where, templated=True)) is not None:
                return ids
            bos = self.tokenizer.bos_token
            # as transformers' apply_chat_template: a template that writes BOS itself gets no second one
            special = not (bos and text.startswith(bos))
            if isinstance(images, ImageInputs):
                return self.encode_whole(text, images, where, special)
            return self.encode_segments([Segment(text)], images, where)[0]
        if (ids := self._family_layout(question, images, where)) is not None:  # no template: the family's layout
            return ids
        if n and self.cfg.image_token not in question:
            question = (self.cfg.image_token + "\n") * n + question
        segs = self.template.render([{"role": "user", "content": question}], add_generation_prompt=True)
        if isinstance(images, ImageInputs) and self.cfg.text_mode == "whole":
            return self.encode_whole("".join(s.text for s in segs), images, where)
        return self.encode_segments(segs, self._count(images), where)[0]

    def encode_chat_messages(self, messages: list[dict], images: int | ImageInputs,
                             where: str = "prompt") -> list[int]:
        """A conversation [{"role": "system"|"user"|"assistant", "content": str}, ...] ending with a user turn ->
        prompt ids ending in the assistant's generation prompt (the serving path; one user turn is exactly
        :meth:`encode_chat_prompt`). Image placeholders (``<image>``) mark the images in order; without any, the
        images go before the first user turn's text."""
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: messages must be a non-empty list")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                    or not isinstance(m.get("content"), str):
                raise DataError(f"{where}: messages[{i}] must be {{'role': system|user|assistant, 'content': str}}")
        if messages[-1]["role"] != "user":
            raise DataError(f"{where}: the last message must be the user's (the model answers it)")
        users = [m for m in messages if m["role"] == "user"]
        if len(messages) == 1:
            return self.encode_chat_prompt(messages[0]["content"], images, where)
        images = self._as_inputs(images, where)
        n = self._count(images)
        self._instruct(images, conversation_instruction(messages, self._placeholders), where)
        if isinstance(images, ImageInputs) and (self.images.format_prompt("", 0) is not None
                                                or self.images.images_first):
            raise DataError(f"{where}: this family ({self.cfg.image_processor} processor) answers one prompt; send "
                            f"a single user message")
        marks = (DATA_PLACEHOLDER, self.cfg.image_token)
        if n and not any(mark in m["content"] for m in messages for mark in marks):
            first = users[0]
            messages = [dict(m, content=(DATA_PLACEHOLDER + "\n") * n + m["content"]) if m is first else m
                        for m in messages]
        if self.cfg.chat_template_jinja:
            tok = self.tokenizer
            t = jinja_template(self.cfg.chat_template_jinja, self.cfg.image_token, tok.bos_token, tok.eos_token)
            text = t.render(messages, add_generation_prompt=True)
            bos = tok.bos_token
            special = not (bos and text.startswith(bos))
            if isinstance(images, ImageInputs):
                return self.encode_whole(text, images, where, special)
            return self.encode_segments([Segment(text)], images, where)[0]
        messages = [dict(m, content=m["content"].replace(DATA_PLACEHOLDER, self.cfg.image_token)) for m in messages]
        segs = self.template.render(messages, add_generation_prompt=True)
        if isinstance(images, ImageInputs) and self.cfg.text_mode == "whole":
            return self.encode_whole("".join(s.text for s in segs), images, where)
        return self.encode_segments(segs, self._count(images), where)[0]

    def encode_prompt(self, prompt: str, images: int | ImageInputs, where: str = "prompt") -> list[int]:
        """Raw text (no template) with image placeholders -> ids. The instruction a Q-Former reads (InstructBLIP)
        is the prompt; it goes into ``images.extra`` (:meth:`instruction`)."""
        images = self._as_inputs(images, where)
        self._instruct(images, prompt, where)
        if (ids := self._family_layout(prompt, images, where)) is not None:
            return ids
        if self.cfg.text_mode == "whole":
            return self.encode_whole(prompt, images, where)
        return self.encode_segments([Segment(prompt)], self._count(images), where)[0]

    def encode_score(self, prompt: str, continuation: str, images: int | ImageInputs,
                     where: str = "score") -> tuple[list[int], int]:
        """(ids of prompt + continuation, index of the first continuation token). Whole-string mode tokenises
        the prompt alone and prompt + continuation, and the continuation is what follows the prompt's tokens
        (lm-evaluation-harness / lmms-eval); segment mode appends the continuation's own tokens. A family's
        ``format_continuation`` hook (PaliGemma: the suffix + EOS, tokenised on its own) replaces both."""
        if self.cfg.image_token in continuation:
            raise DataError(f"{where}: the continuation must not contain image placeholders")
        p_ids = self.encode_prompt(prompt, images, where)
        if (suffix := self.images.format_continuation(continuation)) is not None:  # PaliGemma: suffix + EOS
            return p_ids + self.tokenizer.encode(suffix), len(p_ids)
        if self.cfg.text_mode == "whole":
            ids = self._family_layout(prompt + continuation, images, where)  # IDEFICS: laid out as the prompt
            ids = self.encode_whole(prompt + continuation, images, where) if ids is None else ids
        else:
            ids = p_ids + self.tokenizer.encode(continuation)
        return ids, len(p_ids)

    # ------------------------------------------------------------------ InstructBLIP's instruction
    def instruction(self, text: str, n_images: int, where: str = "prompt") -> dict[str, torch.Tensor]:
        """What a Q-Former that reads the instruction (InstructBLIP) takes with each of ``n_images`` images:
        ``text`` (placeholders removed) through the Q-Former tokenizer as ``qformer_input_ids`` and
        ``qformer_attention_mask`` [n_images, qformer_max_length] (right padding: one length, so the images of
        several prompts concatenate). {} for a model that reads none.

        The encode methods put it into the ``ImageInputs`` they are given (``extra``), from the text the processor
        of transformers gives the Q-Former: a raw prompt (generate, score: never the continuation), the question
        (chat), the user turn that carries the image (a conversation; for one question and answer, the question)."""
        if self.qformer_tokenizer is None:
            return {}
        return instruction_tensors(self.qformer_tokenizer, self.qformer_pad_id,
                                   without_placeholders(text, self._placeholders), n_images,
                                   self.cfg.qformer_max_length, where)

    def _instruct(self, images: int | ImageInputs, text: str, where: str) -> None:
        """Write the instruction of ``text`` into ``images.extra``, in place: the caller gives that ImageInputs
        to the model with the ids. Nothing for a model without one, or for an image count (segment mode)."""
        if self.qformer_tokenizer is not None and isinstance(images, ImageInputs):
            images.extra.update(self.instruction(text, len(images), where))

    def with_instruction(self, images: torch.Tensor | ImageInputs, conversations: list,
                         where: str = "sample") -> torch.Tensor | ImageInputs:
        """A training sample's images with the instruction of its conversation (:meth:`instruction`), as a new
        ImageInputs (a pixel tensor [n, C, H, W] becomes one); unchanged for a model that reads none."""
        if self.qformer_tokenizer is None:
            return images
        if not isinstance(images, ImageInputs):
            images = ImageInputs(images, [self.cfg.image_seq_len] * len(images))
        text = conversation_instruction(normalize_messages(conversations, where), self._placeholders)
        return ImageInputs(images.pixel_values, list(images.tokens),
                           {**images.extra, **self.instruction(text, len(images), where)}, images.texts)

    def decode(self, ids) -> str:
        return self.tokenizer.decode(ids)

    # ------------------------------------------------------------------ dual encoders
    def encode_texts(self, texts: list[str], where: str = "texts") -> tuple[torch.Tensor, int]:
        """Texts for a dual encoder's text tower -> (ids [B, T] padded with the pad token, how many texts were
        truncated): :meth:`tokenize_texts`, then :meth:`pad_texts`."""
        rows, truncated = self.tokenize_texts(texts, where)
        return self.pad_texts(rows), truncated

    def tokenize_texts(self, texts: list[str], where: str = "texts") -> tuple[list[list[int]], int]:
        """Each text with the tokenizer's special tokens (CLIP: start and end of text; SigLIP: end of text), cut to
        ``max_length`` (the text tower's context) keeping them, as transformers' tokenizers do with
        ``truncation=True`` -> (ids per text, how many texts were cut)."""
        if self._truncating is None:
            from tokenizers import Tokenizer

            self._truncating = Tokenizer.from_str(self.tokenizer.tok.to_str())
            self._truncating.no_padding()
            self._truncating.enable_truncation(self.cfg.max_length)
        rows, truncated = [], 0
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise DataError(f"{where}[{i}]: expected a string, got {type(text).__name__}")
            enc = self._truncating.encode(text, add_special_tokens=True)
            truncated += bool(enc.overflowing)
            rows.append(list(enc.ids))
        return rows, truncated

    def pad_texts(self, rows: list[list[int]]) -> torch.Tensor:
        """[B, T] ids padded with the pad token on the right: to the longest row (``text_padding: longest``, CLIP)
        or every row to ``max_length`` (SigLIP, which reads the last position)."""
        longest = max((len(r) for r in rows), default=0)
        width = self.cfg.max_length if self.cfg.text_padding == "max_length" else longest
        ids = torch.full((len(rows), width), self.tokenizer.pad_id, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        return ids
