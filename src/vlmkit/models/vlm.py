"""VisionLanguageModel: encoder -> connector -> splice into a decoder LM (the LLaVA / Idefics3 family).

Composition, not inheritance: the model receives built parts; :func:`vlmkit.models.build_model` turns a
:class:`~vlmkit.config.ModelConfig` into them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vlmkit.data.collate import document_mask
from vlmkit.fusion.splice import splice_image_features
from vlmkit.nn import KVCache
from vlmkit.processing.image import ImageInputs


@dataclass
class ModelOutput:
    logits: torch.Tensor | None = None
    loss: torch.Tensor | None = None
    n_tokens: int = 0  # supervised tokens behind ``loss``


def lm_output(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor | None,
              logits_to_keep: int = 0) -> ModelOutput:
    """The LM head on final hidden states [B, T, D]: with ``labels``, the mean next-token cross-entropy over labels
    != -100, the head run only at those positions (for small models it is the largest matmul); else the logits
    (of the last ``logits_to_keep`` positions when given)."""
    if labels is not None:
        targets = labels[:, 1:]
        keep = targets != -100
        logits = head(hidden[:, :-1][keep])  # [n_supervised, V]
        loss = F.cross_entropy(logits.float(), targets[keep], reduction="mean")
        return ModelOutput(logits=None, loss=loss, n_tokens=int(keep.sum()))
    if logits_to_keep:
        hidden = hidden[:, -logits_to_keep:]
    return ModelOutput(logits=head(hidden))


class VisionLanguageModel(nn.Module):
    def __init__(self, encoder: nn.Module, connector: nn.Module, lm: nn.Module, image_token_id: int):
        super().__init__()
        self.encoder = encoder
        self.connector = connector
        self.lm = lm
        self.image_token_id = image_token_id

    @property
    def image_seq_len(self) -> int:
        """Tokens each image occupies in the LM sequence (M)."""
        return self.connector.num_tokens(self.encoder.num_tokens, self.encoder.grid)

    def encode_images(self, pixel_values: torch.Tensor | ImageInputs) -> torch.Tensor:
        """pixel_values [n_images, C, H, W] (or the processor's ImageInputs) -> LM-space features
        [n_images, M, D_lm]."""
        if isinstance(pixel_values, ImageInputs):
            pixel_values = pixel_values.pixel_values
        feats = self.encoder(pixel_values)  # [n, N, D_v]
        return self.connector(feats, self.encoder.grid)  # [n, M, D_lm]

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | ImageInputs | None = None,
              image_features: torch.Tensor | None = None) -> torch.Tensor:
        if image_features is None and pixel_values is not None and len(pixel_values) > 0:
            image_features = self.encode_images(pixel_values)
        ids = input_ids.masked_fill(input_ids == self.image_token_id, 0)
        embeds = self.lm.embed_tokens(ids)  # [B, T, D]
        return splice_image_features(embeds, input_ids, self.image_token_id, image_features)

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | ImageInputs | None = None,
                attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                cache: KVCache | None = None, image_features: torch.Tensor | None = None,
                logits_to_keep: int = 0, document_ids: torch.Tensor | None = None,
                segment_ids: torch.Tensor | None = None) -> ModelOutput:
        """Run the model. With ``labels`` the loss is the mean next-token cross-entropy over labels != -100,
        and logits are only computed at those positions (the LM head is the largest matmul for small
        models).

        A packed batch (data/collate.py) gives ``document_ids`` [B, T] (the sample each token belongs to, -1 =
        padding), each sample's own 0-based ``position_ids`` and, for grouped questions, ``segment_ids``; the
        attention mask is then built per sample by :meth:`document_attention`."""
        if document_ids is not None and mask is None:
            mask = self.document_attention(document_ids, segment_ids, labels)
        embeds = self.embed(input_ids, pixel_values, image_features)
        hidden = self.lm(embeds, position_ids=position_ids, attention_mask=attention_mask, mask=mask,
                         cache=cache)  # [B, T, D]
        return lm_output(self.lm.lm_head, hidden, labels, logits_to_keep)

    def document_attention(self, document_ids: torch.Tensor, segment_ids: torch.Tensor | None,
                           labels: torch.Tensor | None) -> torch.Tensor:
        """The attention mask [B, 1, T, T] of a packed batch: causal within each sample (and each grouped
        question's segment), nothing across samples. Families with another pattern override it."""
        return document_mask(document_ids, segment_ids)
