"""Small helpers the tests share: images as a model takes them, and a forward pass from plain tensors."""

from __future__ import annotations

import torch

from vlmkit.batch import Batch, MediaInputs


def fixed_media(pixels: torch.Tensor, tokens: int) -> MediaInputs:
    """Fixed-size images [n, C, H, W], each filling ``tokens`` LM positions."""
    return MediaInputs(pixels, [tokens] * len(pixels))


def forward(model, input_ids, media: MediaInputs | None = None, cache=None, logits_to_keep: int = 0, **fields):
    """``model`` on a Batch of ``input_ids`` (a tensor or a list of ids), ``media`` and any other Batch fields."""
    ids = input_ids if isinstance(input_ids, torch.Tensor) else torch.tensor([input_ids])
    return model(Batch(ids, media=media, **fields), cache=cache, logits_to_keep=logits_to_keep)


def pairs(pixels: torch.Tensor, input_ids: torch.Tensor) -> Batch:
    """A dual encoder's batch: images [B, C, H, W] and their texts [B', T]."""
    return Batch(input_ids, media=MediaInputs(pixels, [0] * len(pixels)))


def slots(processor, n: int) -> MediaInputs:
    """``n`` fixed-size images of ``processor`` as its text sees them (token counts, no pixels)."""
    return processor.placeholders([None] * n)


def encode_prompt(processor, text: str, n_images: int = 0, where: str = "prompt") -> list[int]:
    return processor.prompt(text, slots(processor, n_images), where).ids


def encode_chat(processor, question, n_images: int = 0, where: str = "prompt") -> list[int]:
    return processor.chat(question, slots(processor, n_images), where).ids


def encode_conversation(processor, conversation, n_images: int = 0, where: str = "sample"):
    enc = processor.supervised(conversation, slots(processor, n_images), where)
    return enc.ids, enc.labels
