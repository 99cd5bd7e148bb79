"""The model interface every generative family implements, and the splice family's model (LLaVA, Idefics3): encoder
-> connector -> image features spliced into a decoder LM at the image placeholders.

:class:`GenerativeModel` is what shared code (generation, the Pipeline, the serving engine, the training loop)
calls, and all it calls:

- ``encode_media(media) -> Features``: the prepared images encoded, item by item (``Features.split`` / ``cat``
  let a cache or an engine handle them without knowing their layout);
- ``forward(batch, cache=None, logits_to_keep=0) -> ModelOutput``: the loss when ``batch.labels`` is given, else
  logits. The attention pattern is the model's own (:meth:`attention`): causal, packed documents, prefix-LM over
  ``batch.prompt_mask``, cross-attention to images...;
- ``new_cache(batch_size, max_len)``: an empty KV cache for generation;
- ``module_groups()``: what a stage may train, freeze or adapt, by name;
- ``image_tower()``: the module that maps whole images [n, C, H, W] to their patch features [n, N, D] (it has
  ``grid`` and ``width``), which a stage can pretrain alone (``cell_labels``): the tower, or for a model without
  one, a view of the modules that see the image (``Family.image_groups``);
- ``reserved_token_ids``: ids only the processor writes (image placeholders), never sampled.

Composition, not inheritance, builds a model: it receives built parts; a family's ``build`` turns its config into
them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlmkit.batch import Batch, Features, MediaInputs, ModelOutput
from vlmkit.fusion.splice import splice_image_features
from vlmkit.nn import KVCache, document_mask


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


class GenerativeModel(nn.Module):
    """The interface of a generative family's model (module docstring). Subclasses hold ``encoder``,
    ``connector`` and ``lm`` (a DecoderLM or a wrapper of one) unless they override what reads them."""

    image_token_id: int

    def encode_media(self, media: MediaInputs) -> Features:
        raise NotImplementedError

    def forward(self, batch: Batch, cache: KVCache | None = None, logits_to_keep: int = 0) -> ModelOutput:
        raise NotImplementedError

    def new_cache(self, batch_size: int, max_len: int, device=None) -> KVCache:
        return self.lm.new_cache(batch_size, max_len, device)

    def module_groups(self) -> dict[str, nn.Module]:
        return {"vision": self.encoder, "connector": self.connector, "lm": self.lm}

    def image_tower(self) -> nn.Module:
        return self.encoder

    @property
    def reserved_token_ids(self) -> tuple[int, ...]:
        return (self.image_token_id,)

    @property
    def can_decode_codes(self) -> bool:
        """A model that draws (``Capabilities.generate_images``) can turn codes into pixels: False where its VQ has
        no decoder (an imported Chameleon)."""
        return True

    def media_features(self, batch: Batch) -> Features | None:
        """The batch's encoded media: given, or encoded from ``batch.media`` (None without images)."""
        if batch.features is not None:
            return batch.features
        if batch.media is not None and len(batch.media) > 0:
            return self.encode_media(batch.media)
        return None

    def attention(self, batch: Batch, cache: KVCache | None = None) -> torch.Tensor | None:
        """The self-attention mask of ``batch`` [B, 1, T, T_k], or None for causal attention over the real tokens
        (``batch.attention_mask``): a packed or grouped batch gets its block-diagonal mask."""
        if batch.document_ids is not None:
            return document_mask(batch.document_ids, batch.segment_ids)
        return None


class VisionLanguageModel(GenerativeModel):
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

    def encode_media(self, media: MediaInputs) -> Features:
        """Images [n, C, H, W], or tiles with ``media.rows`` per image (or the tower's precomputed output,
        ``media.tower``) -> LM-space features [n, M, D_lm], each image's rows together."""
        states = media.tower if media.tower is not None else self.encoder(media.pixel_values)  # [n, N, D_v]
        return Features(self.connector(states, self.encoder.grid), media.item_rows())  # [n, M, D_lm]

    def embed(self, input_ids: torch.Tensor, features: Features | None) -> torch.Tensor:
        ids = input_ids.masked_fill(input_ids == self.image_token_id, 0)
        embeds = self.lm.embed_tokens(ids)  # [B, T, D]
        return splice_image_features(embeds, input_ids, self.image_token_id,
                                     features.values if features is not None else None)

    def positions(self, batch: Batch, features: Features | None, cache: KVCache | None) -> torch.Tensor | None:
        """Position ids of the batch; None lets the LM count them from each row's first real token."""
        return batch.position_ids

    def forward(self, batch: Batch, cache: KVCache | None = None, logits_to_keep: int = 0) -> ModelOutput:
        """With ``batch.labels`` the loss is the mean next-token cross-entropy over labels != -100, and logits are
        only computed at those positions; else the logits (of the last ``logits_to_keep`` positions)."""
        features = self.media_features(batch)
        embeds = self.embed(batch.input_ids, features)
        hidden = self.lm(embeds, position_ids=self.positions(batch, features, cache),
                         attention_mask=batch.attention_mask, mask=self.attention(batch, cache), cache=cache)
        return lm_output(self.lm.lm_head, hidden, batch.labels, logits_to_keep)


__all__ = ["GenerativeModel", "ModelOutput", "VisionLanguageModel", "lm_output"]
