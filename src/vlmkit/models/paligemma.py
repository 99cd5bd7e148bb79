"""PaliGemma (Beyer et al. 2024): SigLIP tower -> linear projector -> Gemma LM with prefix-LM attention.

The image tokens and the prompt (the *prefix*) attend to each other bidirectionally; what follows (the
*suffix*: an answer, a caption, generated tokens) attends causally to everything before it. transformers
marks the prefix with ``token_type_ids == 0``; here the batch says which tokens are the prompt (``prompt_mask``:
the layout's prompt when training and scoring, the whole input at a generation's prefill, nothing after it).

PaliGemma 2's Gemma 2 LM has sliding-window layers. transformers' ``PaliGemmaModel`` ORs the prefix into each
mask *after* the window: on a sliding layer the prompt still sees all of itself both ways, however long, and only
the suffix's view is cut to the window (causal AND window, OR both in the prompt). ``attention`` therefore gives
the LM its masks per layer kind (Gemma 3 differs: there the window cuts the image blocks too).

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

from vlmkit.config import VLMConfig
from vlmkit.connectors import build_connector
from vlmkit.encoders.vit import ViTEncoder
from vlmkit.lm.decoder import DecoderLM
from vlmkit.models.init import init_from_scratch
from vlmkit.batch import Batch, Features
from vlmkit.models.vlm import VisionLanguageModel
from vlmkit.nn import KVCache, causal_mask, document_mask, sliding_window, with_prompt


class PaliGemmaModel(VisionLanguageModel):
    """encoder -> connector -> splice into a Gemma ``DecoderLM``, with prefix-LM attention over the prompt
    (``batch.prompt_mask``: what transformers' PaliGemmaProcessor marks with ``token_type_ids == 0``) and
    1-indexed positions."""

    def attention(self, batch: Batch, cache: KVCache | None = None) -> torch.Tensor | dict | None:
        """Causal attention (within each sample of a packed batch), plus the prompt tokens of each row or sample
        attending to each other both ways; with sliding layers (PaliGemma 2) a dict per layer kind, the sliding
        layers' causal part cut to the window before the prompt pairs are added. A decoding step (a filled cache)
        reads no prompt: causal (the LM cuts its sliding layers' view itself)."""
        if batch.document_ids is not None and batch.segment_ids is not None and bool((batch.segment_ids > 0).any()):
            raise ValueError("paligemma: grouped questions (segment_ids) are not supported with prefix-LM "
                             "attention; set data.group_turns: 0")
        offset = cache.length if cache is not None else 0
        if batch.prompt_mask is None or offset:
            return super().attention(batch, cache)
        T = batch.input_ids.shape[1]
        if batch.document_ids is not None:
            base = document_mask(batch.document_ids)
        else:
            base = causal_mask(T, batch.attention_mask, device=batch.input_ids.device)
        full = with_prompt(base, batch.prompt_mask, batch.document_ids, batch.attention_mask)
        if "sliding" not in self.lm.cfg.layer_types:
            return full
        local = sliding_window(base, self.lm.cfg.sliding_window, self.positions(batch, None, cache))
        return {"full": full, "sliding": with_prompt(local, batch.prompt_mask, batch.document_ids,
                                                     batch.attention_mask)}

    def positions(self, batch: Batch, features: Features | None, cache: KVCache | None) -> torch.Tensor:
        """1-indexed positions, counted from each row's first real token (or each sample's own, packed)."""
        if batch.position_ids is not None:
            return batch.position_ids + 1
        B, T = batch.input_ids.shape
        offset = cache.length if cache is not None else 0
        if batch.attention_mask is not None:
            return (batch.attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, offset:offset + T] + 1
        return torch.arange(offset + 1, offset + T + 1, device=batch.input_ids.device)[None].expand(B, T)


def build_paligemma(cfg: VLMConfig, image_token_id: int, init: bool = True) -> PaliGemmaModel:
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
