"""A dual encoder's text processing (CLIP, SigLIP): texts with the tokenizer's special tokens, cut to the text
tower's context as transformers' tokenizers cut them, padded to the longest text or to the context.

A dual encoder's texts hold no image placeholder and no chat: its layout has none of a generative model's prompts,
only :meth:`TextLayout.encode_texts`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlmkit.config import ProcessorConfig
from vlmkit.errors import ConfigError, DataError
from vlmkit.processing.layouts import RefusingLayout
from vlmkit.processing.tokenizer import TextTokenizer


@dataclass
class TextProcessorConfig(ProcessorConfig):
    """A dual encoder's processor: images at one size, texts with no image placeholder (``image_token`` "").
    ``text_padding`` "longest" pads a batch of texts to its longest (CLIP); "max_length" pads every text to
    ``max_length``, the text tower's context (SigLIP, which pools the last position)."""

    image_token: str = ""
    text_padding: str = "longest"

    def __post_init__(self):
        if self.text_padding not in ("longest", "max_length"):
            raise ConfigError(f"processor text_padding must be 'longest' or 'max_length', got {self.text_padding!r}")


class TextLayout(RefusingLayout):
    """Texts -> padded ids for a dual encoder's text tower (module docstring); prompts are refused."""

    def __init__(self, cfg: TextProcessorConfig, tokenizer: TextTokenizer):
        super().__init__(cfg, tokenizer)
        self._truncating = None  # a copy of the tokenizer that truncates to max_length

    def why(self, what: str) -> str:
        return (f"{what} needs a generative model; this is a dual encoder ({self.cfg.family}), which embeds "
                f"images and texts (embed_images / embed_texts)")

    def encode_texts(self, texts: list[str], where: str = "texts") -> tuple[torch.Tensor, int]:
        """Texts -> (ids [B, T] padded with the pad token, how many texts were truncated): :meth:`tokenize_texts`,
        then :meth:`pad_texts`."""
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
        """[B, T] ids padded with the pad token on the right: to the longest row (``text_padding: longest``) or every
        row to ``max_length``."""
        longest = max((len(r) for r in rows), default=0)
        width = self.cfg.max_length if self.cfg.text_padding == "max_length" else longest
        ids = torch.full((len(rows), width), self.tokenizer.pad_id, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        return ids


__all__ = ["TextLayout", "TextProcessorConfig"]
