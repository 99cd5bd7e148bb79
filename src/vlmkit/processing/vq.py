"""A VQ image tokenizer's processing: images only, resized to the model's size and normalised to [-1, 1] (mean and
std 0.5, as taming's and Chameleon's VQ read them); no text.

The checkpoint format keeps a tokenizer.json beside every model, and the Processor holds one; a VQ tokenizer has
no text, so its tokenizer is the smallest one the format takes (:func:`empty_tokenizer`: the pad and end tokens,
nothing else), and its layout refuses every prompt by name (:class:`ImageOnlyLayout`).
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenizers import Tokenizer, models

from vlmkit.config import ProcessorConfig
from vlmkit.processing.layouts import RefusingLayout
from vlmkit.processing.tokenizer import TextTokenizer


@dataclass
class VQProcessorConfig(ProcessorConfig):
    """Images at one size, normalised to [-1, 1]; no image placeholder (no text)."""

    family: str = "vq"
    image_size: tuple[int, int] = (64, 64)
    image_token: str = ""


def empty_tokenizer(pad_token: str = "<pad>", eos_token: str = "<|end|>") -> TextTokenizer:
    """A tokenizer of two special tokens and no text: what a checkpoint of a model without text keeps."""
    tok = Tokenizer(models.WordLevel({pad_token: 0, eos_token: 1}, unk_token=pad_token))
    tok.add_special_tokens([pad_token, eos_token])
    return TextTokenizer(tok, pad_token=pad_token, eos_token=eos_token)


class ImageOnlyLayout(RefusingLayout):
    """The prompt layout of a model that reads no text: every prompt is refused naming what the model does."""

    def why(self, what: str) -> str:
        return (f"{what} needs a model that reads text; this is a VQ image tokenizer ({self.cfg.family}), which "
                f"turns images into codes and back (encode_codes / decode_codes)")


__all__ = ["ImageOnlyLayout", "VQProcessorConfig", "empty_tokenizer"]
