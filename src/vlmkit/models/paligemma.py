"""PaliGemma (Beyer et al. 2024): SigLIP tower -> linear projector -> Gemma LM with prefix-LM attention.

The image tokens and the prompt (the *prefix*) attend to each other bidirectionally; what follows (the
*suffix*: an answer, a caption, generated tokens) attends causally to everything before it. transformers
marks the prefix with ``token_type_ids == 0``; here ``forward(prefix_len=...)`` says where it ends, and
without it the model decides as transformers' processor would mark the tokens (see :meth:`PaliGemmaModel.forward`).

Two details copied from transformers' ``PaliGemmaModel``:

- positions are 1-indexed (rotary angles of positions 1..T, not 0..T-1);
- image features enter the LM exactly as the projector outputs them. transformers 4 divided them by
  sqrt(hidden size) only because its Gemma then multiplied *every* input embedding by sqrt(hidden size);
  transformers 5, like vlmkit's ``ScaledEmbedding``, scales the token lookup alone and does neither.

The parts are the shared ones (``ViTEncoder``, ``LinearConnector``, ``DecoderLM``); only the attention
pattern and the positions differ from :class:`~vlmkit.models.vlm.VisionLanguageModel`.
"""

from __future__ import annotations

import torch

from vlmkit.config import ModelConfig
from vlmkit.connectors import build_connector
from vlmkit.data.collate import document_mask, per_document_cumsum
from vlmkit.encoders.vit import ViTEncoder
from vlmkit.lm.decoder import DecoderLM
from vlmkit.models import MODEL_FAMILIES, init_from_scratch
from vlmkit.models.vlm import ModelOutput, VisionLanguageModel
from vlmkit.nn import KVCache
from vlmkit.processing.image import ImageInputs


def prefix_lm_mask(q_len: int, prefix_len: int | torch.Tensor, attention_mask: torch.Tensor | None = None,
                   offset: int = 0, device=None) -> torch.Tensor:
    """Boolean [B or 1, 1, q_len, offset + q_len] mask (True = may attend): causal, plus every pair of positions
    before ``prefix_len`` (an int, or one per row [B]) sees each other, minus padded keys.

    Positions are absolute (the queries are ``offset .. offset + q_len - 1`` after a KV cache). As
    :func:`~vlmkit.nn.attention.causal_mask`, a query row that is padding keeps its own diagonal so that no row
    is fully masked."""
    if attention_mask is not None:
        device = attention_mask.device
    k_len = offset + q_len
    q_pos = torch.arange(offset, k_len, device=device)[:, None]  # [Tq, 1]
    k_pos = torch.arange(k_len, device=device)[None, :]  # [1, Tk]
    prefix = torch.as_tensor(prefix_len, device=device).reshape(-1, 1, 1, 1)  # [B or 1, 1, 1, 1]
    mask = (k_pos <= q_pos)[None, None] | ((q_pos < prefix) & (k_pos < prefix))  # [B or 1, 1, Tq, Tk]
    if attention_mask is not None:
        keys = attention_mask[:, None, None, :k_len].bool()  # [B, 1, 1, Tk]
        mask = (mask & keys) | (k_pos == q_pos)[None, None]
    return mask


class PaliGemmaModel(VisionLanguageModel):
    """encoder -> connector -> splice into a Gemma ``DecoderLM``, with prefix-LM attention and 1-indexed
    positions. ``prefix_lm = True`` tells ``Pipeline.score`` and ``generate`` to pass ``prefix_len``."""

    prefix_lm = True

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | ImageInputs | None = None,
                attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                cache: KVCache | None = None, image_features: torch.Tensor | None = None,
                logits_to_keep: int = 0, prefix_len: int | torch.Tensor | None = None,
                document_ids: torch.Tensor | None = None, segment_ids: torch.Tensor | None = None) -> ModelOutput:
        """As :meth:`VisionLanguageModel.forward`, with the prefix-LM mask built from ``prefix_len`` (absolute
        index of the first suffix token; an int or one per row). Without it, the prefix is what
        transformers' PaliGemmaProcessor marks with ``token_type_ids == 0``:

        - with ``labels``: each row's tokens before its first supervised label (the processor's ``suffix``);
        - otherwise, with no cached past: the whole input (a prompt, or the prefill of a generation);
        - after a cache is filled: nothing, so each new token attends causally.

        An explicit ``mask`` is used as given; explicit ``position_ids`` too (transformers' convention).

        A packed batch (``document_ids``, data/collate.py) gets each sample's prefix-LM mask by the same rule
        (its tokens before its first label) and its 1-indexed positions: the collated 0-based ones plus one."""
        B, T = input_ids.shape
        offset = cache.length if cache is not None else 0
        if document_ids is not None:
            if position_ids is None:
                raise ValueError("a packed batch (document_ids) needs each sample's position_ids")
            return super().forward(input_ids, pixel_values, attention_mask=attention_mask, labels=labels,
                                   position_ids=position_ids + 1, mask=mask, cache=cache,
                                   image_features=image_features, logits_to_keep=logits_to_keep,
                                   document_ids=document_ids, segment_ids=segment_ids)
        if position_ids is None:  # 1-indexed, counted from each row's first real token
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, offset:offset + T] + 1
            else:
                position_ids = torch.arange(offset + 1, offset + T + 1, device=input_ids.device)[None].expand(B, T)
        if mask is None:
            if prefix_len is None and labels is not None:
                supervised = labels != -100
                first = supervised.long().argmax(-1)  # the first supervised position of each row
                prefix_len = torch.where(supervised.any(-1), first, torch.full_like(first, T))
            elif prefix_len is None and offset == 0:
                prefix_len = T
            if prefix_len is not None:
                mask = prefix_lm_mask(T, prefix_len, attention_mask, offset, device=input_ids.device)
        return super().forward(input_ids, pixel_values, attention_mask=attention_mask, labels=labels,
                               position_ids=position_ids, mask=mask, cache=cache, image_features=image_features,
                               logits_to_keep=logits_to_keep)


    def document_attention(self, document_ids: torch.Tensor, segment_ids: torch.Tensor | None,
                           labels: torch.Tensor | None) -> torch.Tensor:
        """Packed prefix-LM attention: within each sample, its tokens before its first supervised label see
        each other; everything else is causal within the sample; nothing crosses samples."""
        if segment_ids is not None and bool((segment_ids > 0).any()):
            raise ValueError("paligemma: grouped questions (segment_ids) are not supported with prefix-LM "
                             "attention; set data.group_turns: 0")
        supervised = (labels != -100).long() if labels is not None else torch.zeros_like(document_ids)
        prefix = per_document_cumsum(supervised, document_ids) == 0  # [B, T]: before the sample's first label
        same = (document_ids[:, :, None] == document_ids[:, None, :]) & (document_ids[:, None, :] >= 0)
        bidirectional = same & prefix[:, :, None] & prefix[:, None, :]
        return document_mask(document_ids) | bidirectional[:, None]


@MODEL_FAMILIES.register("paligemma", "SigLIP-style ViT -> linear projector -> Gemma LM with prefix-LM attention")
def build_paligemma(cfg: ModelConfig, image_token_id: int, init: bool = True) -> PaliGemmaModel:
    """A PaliGemmaModel from its config; ``init`` applies the from-scratch initialisation of ``build_model``."""
    if cfg.vision.arch != "vit":
        raise ValueError(f"the paligemma family needs vision.arch 'vit', got {cfg.vision.arch!r}")
    if cfg.lm.head_init_std is not None and cfg.lm.tie_embeddings:
        raise ValueError("lm.head_init_std initialises an untied LM head; with lm.tie_embeddings: true the head "
                         "is the token embedding (set tie_embeddings: false, or leave head_init_std unset)")
    model = PaliGemmaModel(ViTEncoder(cfg.vision), build_connector(cfg.connector, cfg.vision.width, cfg.lm.width),
                           DecoderLM(cfg.lm), image_token_id)
    if init:
        init_from_scratch(model, cfg)
    return model
