"""The one Processor used by training, evaluation and serving.

It holds a model's tokenizer and its family's two processing parts (``Family.image_processor`` and
``Family.layout``), and turns images and text into what the model takes: prepared images (MediaInputs), and token
ids laid out by the family's prompt layout (processing/layouts.py) — a raw prompt, a chat, a supervised
conversation with its label mask, a prompt and the continuation to score. Placeholder/image mismatches are refused
here, before any forward pass.

A dual encoder's processor (CLIP, SigLIP) encodes texts for its text tower instead (:meth:`encode_texts`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from vlmkit.batch import Encoded, MediaInputs
from vlmkit.config import ProcessorConfig, to_dict
from vlmkit.errors import ConfigError, DataError
from vlmkit.families import family_of, get_family, processor_config_from_dict
from vlmkit.processing.chat import normalize_messages
from vlmkit.processing.image import load_image
from vlmkit.processing.layouts import check_messages
from vlmkit.processing.tokenizer import TextTokenizer
from vlmkit.utils import atomic_write_json, atomic_write_text


class Processor:
    """``files``: tokenizers a family keeps beside tokenizer.json, by file name (``Family.processor_files``:
    InstructBLIP's Q-Former tokenizer)."""

    def __init__(self, cfg: ProcessorConfig, tokenizer: TextTokenizer, files: dict | None = None):
        if cfg.image_token and cfg.image_seq_len <= 0:
            raise ValueError("ProcessorConfig.image_seq_len must be set from the model (tokens per image)")
        if cfg.text_mode not in ("segments", "whole"):
            raise ConfigError(f"processor text_mode must be 'segments' or 'whole', got {cfg.text_mode!r}")
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.files = dict(files or {})
        self.family = family_of(cfg)
        self.images = self.family.image_processor(cfg)
        self.layout = self.family.layout(cfg, tokenizer, self.files)
        self.image_token_id = tokenizer.token_id(cfg.image_token) if cfg.image_token else None
        # what ends a generation: EOS and the processor's stop_tokens (each must be one token of the tokenizer)
        self.stop_ids = tuple(dict.fromkeys([tokenizer.eos_id, *(tokenizer.token_id(t) for t in cfg.stop_tokens)]))

    @property
    def transform(self):
        return self.images.transform

    # ------------------------------------------------------------------ persistence
    def save(self, folder: str | Path) -> None:
        atomic_write_json(Path(folder) / "processor.json", to_dict(self.cfg))
        self.tokenizer.save(Path(folder) / "tokenizer.json")
        for name, tok in self.files.items():
            atomic_write_text(Path(folder) / name, tok.to_str())

    @classmethod
    def from_pretrained(cls, folder: str | Path, family: str | None = None) -> Processor:
        """The processor saved in ``folder``; ``family`` names the family of a processor.json written before it
        said it (a checkpoint's config.json says it too, and is read when neither does)."""
        from tokenizers import Tokenizer

        folder = Path(folder)
        data = json.loads((folder / "processor.json").read_text())
        if not data.get("family") and not family and (folder / "config.json").is_file():
            family = json.loads((folder / "config.json").read_text()).get("model", {}).get("family")
        cfg = processor_config_from_dict(data, family, where=str(folder / "processor.json"))
        tok = TextTokenizer.from_file(folder / "tokenizer.json", pad_token=cfg.pad_token, eos_token=cfg.eos_token,
                                      bos_token=cfg.bos_token or None)
        files = {}
        for name in get_family(cfg.family).processor_files:
            if (folder / name).is_file():
                files[name] = Tokenizer.from_file(str(folder / name))
        return cls(cfg, tok, files)

    # ------------------------------------------------------------------ images
    def prepare_images(self, images, where: str = "") -> MediaInputs:
        """Paths or PIL images -> MediaInputs (pixels, and how many tokens each image fills)."""
        return self.images([load_image(im, where) for im in images])

    def placeholders(self, images, where: str = "") -> MediaInputs:
        """What a text needs of these images (token counts, texts) without their pixels where the family allows."""
        return self.images.placeholders(list(images), where)

    # ------------------------------------------------------------------ text: the prompt layout
    def prompt(self, text: str, media: MediaInputs, where: str = "prompt") -> Encoded:
        """Raw text (no template) with image placeholders -> ids."""
        return self.layout.prompt(text, media, where)

    def chat(self, messages: list[dict] | str, media: MediaInputs, where: str = "prompt") -> Encoded:
        """A question (str) or a conversation [{"role": system|user|assistant, "content": str}, ...] ending with a
        user turn -> prompt ids ending in the assistant's generation prompt. Image placeholders (``<image>``) mark
        the images in order; without any, the images go before the first user turn's text."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        return self.layout.chat(check_messages(messages, where), media, where)

    def supervised(self, conversation: list, media: MediaInputs, where: str = "sample") -> Encoded:
        """LLaVA/OpenAI-style turns -> ids and labels with the chat template applied; only the assistant replies
        (and the template's end-of-turn markup after them) are supervised."""
        return self.layout.supervised(normalize_messages(conversation, where), media, where)

    def continuation(self, prompt: str, text: str, media: MediaInputs, where: str = "score") -> Encoded:
        """The ids of ``prompt`` followed by ``text``, ``prompt_len`` where ``text``'s tokens start (a scored
        continuation)."""
        if self.cfg.image_token and self.cfg.image_token in text:
            raise DataError(f"{where}: the continuation must not contain image placeholders")
        return self.layout.continuation(prompt, text, media, where)

    def image_prompt(self, text: str, grid: tuple[int, int], unconditional: bool = False,
                     where: str = "prompt") -> list[int]:
        """The ids of ``text`` in image-generation mode, ending with the family's image-start layout for a code
        grid ``grid`` (h, w); ``unconditional``: the family's unconditional prompt (classifier-free guidance)."""
        return self.layout.image_prompt(text, grid, unconditional, where)

    def decode(self, ids) -> str:
        return self.tokenizer.decode(ids)

    # ------------------------------------------------------------------ dual encoders
    def encode_texts(self, texts: list[str], where: str = "texts") -> tuple[torch.Tensor, int]:
        """Texts for a dual encoder's text tower -> (ids [B, T], how many texts were truncated)."""
        return self._texts().encode_texts(texts, where)

    def tokenize_texts(self, texts: list[str], where: str = "texts") -> tuple[list[list[int]], int]:
        return self._texts().tokenize_texts(texts, where)

    def pad_texts(self, rows: list[list[int]]) -> torch.Tensor:
        return self._texts().pad_texts(rows)

    def _texts(self):
        if not self.family.capabilities.embed:
            raise DataError(f"texts are encoded for a dual encoder's text tower; this processor is a "
                            f"{self.family.name} model's (prompt, chat, supervised, continuation)")
        return self.layout


__all__ = ["Processor"]
