"""A text-only language model: the shared decoder (lm/decoder.py) and nothing else, as a GenerativeModel, so that a
plain transformers causal-LM folder (Llama, Mistral, Qwen2, Gemma, Phi, ...) generates, scores, chats, serves,
evaluates and fine-tunes through the same Pipeline, engine and training loop as the vision-language families.

What a model without images is to shared code:

- ``encode_media`` refuses: there is nothing to encode (the family's image processor already refuses images, so
  this is only reached by a caller that builds MediaInputs by hand);
- ``module_groups`` is ``{lm}``; ``image_tower`` refuses (a ``cell_labels`` stage has nothing to pretrain);
- ``reserved_token_ids`` is empty: no placeholder id is kept from sampling;
- attention and positions are the decoder's (causal; packed documents by ``Batch.document_ids``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from vlmkit.batch import Batch, Features, MediaInputs
from vlmkit.config import LanguageConfig, ModelConfig
from vlmkit.errors import DataError
from vlmkit.lm.decoder import DecoderLM
from vlmkit.models.init import init_lm_from_scratch
from vlmkit.models.vlm import GenerativeModel, lm_output
from vlmkit.nn import KVCache


@dataclass
class TextLMConfig(ModelConfig):
    """A text-only LM: its decoder, and the transformers ``model_type`` it was read from ("" for one built in
    vlmkit), which an export writes back (convert/hf/text.py)."""

    family: str = "text"
    lm: LanguageConfig = field(default_factory=LanguageConfig)
    hf_model_type: str = ""


class TextLM(GenerativeModel):
    """A DecoderLM as a GenerativeModel (module docstring)."""

    image_token_id = None

    def __init__(self, lm: DecoderLM, name: str = "text-only language model"):
        super().__init__()
        self.lm = lm
        self.name = name

    def encode_media(self, media: MediaInputs) -> Features:
        raise DataError(f"{self.name} is a text-only language model: it reads no images (got {len(media)})")

    def forward(self, batch: Batch, cache: KVCache | None = None, logits_to_keep: int = 0):
        if self.media_features(batch) is not None:  # refuses any images
            raise DataError(f"{self.name} is a text-only language model: it reads no images")
        hidden = self.lm(self.lm.embed_tokens(batch.input_ids), position_ids=batch.position_ids,
                         attention_mask=batch.attention_mask, mask=self.attention(batch, cache), cache=cache)
        return lm_output(self.lm.lm_head, hidden, batch.labels, logits_to_keep)

    def module_groups(self) -> dict[str, nn.Module]:
        return {"lm": self.lm}

    def image_tower(self) -> nn.Module:
        raise DataError(f"{self.name} is a text-only language model: it has no image tower to pretrain")

    @property
    def reserved_token_ids(self) -> tuple[int, ...]:
        return ()


def build_text_lm(cfg: TextLMConfig, init: bool = True) -> TextLM:
    """A TextLM from its config; ``init``: vlmkit's from-scratch initialisation (GPT-2's std 0.02, residual outputs
    scaled by depth, the head at ``lm.head_init_std`` when set)."""
    if cfg.lm.head_init_std is not None and cfg.lm.tie_embeddings:
        raise ValueError("lm.head_init_std initialises an untied LM head; with lm.tie_embeddings: true the head "
                         "is the token embedding (set tie_embeddings: false, or leave head_init_std unset)")
    model = TextLM(DecoderLM(cfg.lm), cfg.hf_model_type or "text")
    if init and not any(p.is_meta for p in model.parameters()):
        with torch.no_grad():
            init_lm_from_scratch(model.lm, cfg.lm)
    return model


__all__ = ["TextLM", "TextLMConfig", "build_text_lm"]
