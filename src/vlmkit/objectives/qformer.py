"""BLIP-2's stage-1 objectives (Li et al. 2023, section 3.2): the Q-Former learns to pull out of a frozen image
tower the visual features most relevant to the text, before any language model is attached.

Three losses share one Q-Former; each uses its own self-attention pattern between the learned queries and the
text (:func:`~vlmkit.connectors.qformer.qformer_self_mask`):

- **ITC**, image-text contrastive, *unimodal* mask: the queries' outputs are the image embeddings, the text's
  first ([CLS]) output the text embedding; similarity is the best-matching query's; InfoNCE both ways.
- **ITM**, image-text matching, *bidirectional* mask: a linear head on the query outputs (averaged over the
  queries) says whether the pair matches. Negatives are hard: for each image a text drawn by its ITC
  similarity (and for each text an image), never one of the same image.
- **ITG**, image-grounded text generation, *multimodal causal* mask: the text, its first token replaced by
  [DEC], is generated from the queries alone (the text never sees the image itself), through BERT's LM head
  with its decoder tied to the Q-Former's word embeddings.

As LAVIS' ``Blip2Qformer``: label smoothing 0.1 on ITC and ITG, the learned temperature starts at 0.07 and is
clamped to [0.001, 0.5]. The three forwards here are the three of LAVIS, except that the contrastive image and
text passes are one pass under the unimodal mask (the same numbers: neither side sees the other) and the
generation pass recomputes the queries instead of reusing their cached keys and values (the same numbers too).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


class QFormerPretrainingHeads(nn.Module):
    """The heads BLIP-2's stage 1 trains on top of the Q-Former and drops afterwards: projections of the query and
    [CLS] outputs into the ``embed_dim``-wide contrastive space, the 2-way matching head, the temperature, and
    BERT's LM prediction head (dense, GELU, LayerNorm, then the word embeddings transposed plus a bias)."""

    def __init__(self, width: int, embed_dim: int, vocab_size: int, eps: float = 1e-12):
        super().__init__()
        self.vision_proj = nn.Linear(width, embed_dim)
        self.text_proj = nn.Linear(width, embed_dim)
        self.itm_head = nn.Linear(width, 2)
        self.temp = nn.Parameter(torch.tensor(0.07))
        self.lm_dense = nn.Linear(width, width)
        self.lm_norm = nn.LayerNorm(width, eps=eps)
        self.lm_bias = nn.Parameter(torch.zeros(vocab_size))

    def lm_logits(self, hidden: torch.Tensor, word_embed: torch.Tensor) -> torch.Tensor:
        """hidden [..., W] -> logits [..., vocab] (BertLMPredictionHead, decoder tied to ``word_embed``)."""
        return F.linear(self.lm_norm(F.gelu(self.lm_dense(hidden))), word_embed, self.lm_bias)


@dataclass
class Stage1Losses:
    loss: torch.Tensor  # itc + itm + itg
    itc: float
    itm: float
    itg: float
    itc_accuracy: float  # image -> text retrieval in the batch (top-1 is the pair's own text)
    itm_accuracy: float  # matching head right on positives and hard negatives


def _in_batch_targets(image_keys: torch.Tensor) -> torch.Tensor:
    """[B, B] True where text j belongs to the image of row i (the same image may come with several captions)."""
    return image_keys[:, None] == image_keys[None, :]


def _itc_loss(connector, queries: torch.Tensor, image: torch.Tensor, text_ids: torch.Tensor,
              text_mask: torch.Tensor, image_keys: torch.Tensor,
              label_smoothing: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """ITC: one pass, queries and text blind to each other; InfoNCE both ways on the best query's similarity.

    Returns the loss, the logits [B_img, B_txt] and the same-image mask [B, B] (ITM draws its hard negatives
    from them) and the image -> text top-1 accuracy."""
    heads = connector.heads
    Q = connector.cfg.num_query_tokens
    B = image.shape[0]
    hidden = connector.qformer(queries, image, text_ids=text_ids, text_mask=text_mask, attention="unimodal")
    image_feats = F.normalize(heads.vision_proj(hidden[:, :Q]), dim=-1)  # [B, Q, E]
    text_feat = F.normalize(heads.text_proj(hidden[:, Q]), dim=-1)  # [B, E] (the [CLS] output)
    sim = torch.einsum("iqe,je->ijq", image_feats, text_feat).amax(-1)  # [B_img, B_txt]: best query
    logits = sim / heads.temp
    same = _in_batch_targets(image_keys)
    # a caption of the same image elsewhere in the batch is a positive too: the target spreads over them (BLIP's
    # sim_targets), then label smoothing
    soft = same.float() / same.float().sum(1, keepdim=True)
    soft = (1 - label_smoothing) * soft + label_smoothing / B
    itc = (-(soft * F.log_softmax(logits, 1)).sum(1).mean() - (soft * F.log_softmax(logits.t(), 1)).sum(1).mean()) / 2
    itc_accuracy = float(same.gather(1, logits.detach().argmax(1, keepdim=True)).float().mean())
    return itc, logits, same, itc_accuracy


def _hard_negatives(logits: torch.Tensor, same: torch.Tensor,
                    generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """For each image a text, and for each text an image, drawn by ITC similarity and never of the same image:
    ITM's hard negatives, indices [B] each (no gradient flows through the draw)."""
    B = logits.shape[0]
    with torch.no_grad():
        weights = F.softmax(logits.detach().masked_fill(same, float("-inf")), dim=1)  # [B_img, B_txt]
        weights_t = F.softmax(logits.detach().t().masked_fill(same, float("-inf")), dim=1)  # [B_txt, B_img]
        # a row whose every candidate is the same image (a batch of one image) draws uniformly among the others
        weights = torch.where(torch.isnan(weights), (~torch.eye(B, dtype=torch.bool, device=logits.device)).float(),
                              weights)
        weights_t = torch.where(torch.isnan(weights_t),
                                (~torch.eye(B, dtype=torch.bool, device=logits.device)).float(), weights_t)
        neg_text = torch.multinomial(weights, 1, generator=generator).squeeze(1)  # [B] a text for each image
        neg_image = torch.multinomial(weights_t, 1, generator=generator).squeeze(1)  # [B] an image for each text
    return neg_text, neg_image


def _itm_loss(connector, image: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor, logits: torch.Tensor,
              same: torch.Tensor, generator: torch.Generator | None) -> tuple[torch.Tensor, float]:
    """ITM: one bidirectional pass over the B pairs, B images with a hard-negative text and B texts with a
    hard-negative image; the matching head on the query outputs, averaged. Returns the loss and the head's
    accuracy on the 3B."""
    Q = connector.cfg.num_query_tokens
    B = image.shape[0]
    neg_text, neg_image = _hard_negatives(logits, same, generator)
    ids_all = torch.cat([text_ids, text_ids[neg_text], text_ids])
    mask_all = torch.cat([text_mask, text_mask[neg_text], text_mask])
    image_all = torch.cat([image, image, image[neg_image]])
    hidden = connector.qformer(connector.query_tokens.expand(3 * B, -1, -1), image_all, text_ids=ids_all,
                               text_mask=mask_all, attention="bidirectional")
    itm_logits = connector.heads.itm_head(hidden[:, :Q]).mean(1)  # [3B, 2]
    itm_labels = torch.cat([torch.ones(B, dtype=torch.long), torch.zeros(2 * B, dtype=torch.long)]).to(image.device)
    itm = F.cross_entropy(itm_logits, itm_labels)
    itm_accuracy = float((itm_logits.detach().argmax(1) == itm_labels).float().mean())
    return itm, itm_accuracy


def _itg_loss(connector, queries: torch.Tensor, image: torch.Tensor, text_ids: torch.Tensor,
              text_mask: torch.Tensor, dec_id: int, label_smoothing: float) -> torch.Tensor:
    """ITG: the caption generated from the queries under the causal mask, [DEC] in place of [CLS]; the
    cross-entropy of each next token (padding ignored)."""
    Q = connector.cfg.num_query_tokens
    qformer = connector.qformer
    dec_ids = text_ids.clone()
    dec_ids[:, 0] = dec_id
    hidden = qformer(queries, image, text_ids=dec_ids, text_mask=text_mask, attention="causal")
    text_hidden = hidden[:, Q:-1]  # [B, T - 1, W]: position t predicts token t + 1
    targets = dec_ids[:, 1:].masked_fill(text_mask[:, 1:] == 0, -100)
    lm_logits = connector.heads.lm_logits(text_hidden, qformer.word_embed.weight)
    return F.cross_entropy(lm_logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100,
                           label_smoothing=label_smoothing)


def blip2_stage1_losses(connector, image: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor,
                        image_keys: torch.Tensor, dec_id: int, generator: torch.Generator | None = None,
                        label_smoothing: float = 0.1) -> Stage1Losses:
    """ITC + ITM + ITG of a batch of B image-caption pairs through ``connector`` (a QFormerConnector with text
    input and pretraining heads).

    image [B, N, D_v] (the frozen tower's features), text_ids / text_mask [B, T] (each text starting with its
    [CLS] token, padded on the right), image_keys [B] (equal for pairs of the same image: they are neither
    contrastive negatives nor drawn as matching negatives), ``dec_id`` the [DEC] token that replaces [CLS] for
    generation. ``generator`` seeds the draw of hard negatives.

    The three passes run in this order (ITC, ITM, ITG): ITM draws its negatives from ITC's similarities."""
    B = image.shape[0]
    if B < 2:
        raise ValueError("the Q-Former's stage-1 objectives need at least 2 pairs per batch (in-batch negatives)")
    queries = connector.query_tokens.expand(B, -1, -1)
    with torch.no_grad():
        connector.heads.temp.clamp_(0.001, 0.5)
    itc, logits, same, itc_accuracy = _itc_loss(connector, queries, image, text_ids, text_mask, image_keys,
                                                label_smoothing)
    itm, itm_accuracy = _itm_loss(connector, image, text_ids, text_mask, logits, same, generator)
    itg = _itg_loss(connector, queries, image, text_ids, text_mask, dec_id, label_smoothing)
    return Stage1Losses(itc + itm + itg, float(itc.detach()), float(itm.detach()), float(itg.detach()),
                        itc_accuracy, itm_accuracy)
