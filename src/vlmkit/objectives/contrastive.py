"""Contrastive losses over a batch of image-text pairs, exact under data parallelism.

* ``clip``: the symmetric InfoNCE of CLIP (Radford et al. 2021): cross-entropy of each image over all texts and
  of each text over all images, the matching pair being the target, averaged over both directions.
* ``siglip``: the pairwise sigmoid loss of SigLIP (Zhai et al. 2023): every (image, text) pair is a binary
  classification, positive on the diagonal; ``-sum(log sigmoid(z_ij * logit_ij)) / n_images``.

Data parallelism (open_clip's ``gather_with_grad`` + ``local_loss``): every rank gathers the embeddings of all
ranks with :func:`torch.distributed.nn.functional.all_gather`, whose backward sums the gradients reaching each
rank's own shard, and computes the loss of its *own* rows against *all* columns. The mean of the ranks' losses
is then the loss of one process on the concatenated batch, and DDP's averaging of parameter gradients gives that
process's gradients exactly (tested with two gloo processes in tests/unit/test_contrastive_ddp.py).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

KINDS = ("clip", "siglip")


def gather_embeddings(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(every rank's ``x`` concatenated along dim 0 with gradients flowing back to each shard, this rank's
    offset in it). Ranks must hold the same number of rows."""
    from torch.distributed.nn.functional import all_gather

    parts = all_gather(x.contiguous())
    return torch.cat(parts, dim=0), dist.get_rank() * x.shape[0]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def contrastive_loss(image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor,
                     logit_bias: torch.Tensor | None = None, kind: str = "clip",
                     gather: bool | None = None) -> torch.Tensor:
    """The loss of L2-normalised ``image_embeds`` [B, E] against ``text_embeds`` [B, E] (row i of each is a pair)
    with the log temperature ``logit_scale`` (and SigLIP's ``logit_bias``). ``gather``: compare against every
    rank's batch (default: when torch.distributed is initialised with more than one process); the result is this
    rank's share, whose mean over ranks is the loss of the whole batch."""
    if kind not in KINDS:
        raise ValueError(f"contrastive loss must be one of {', '.join(KINDS)}, got {kind!r}")
    if image_embeds.shape != text_embeds.shape:
        raise ValueError(f"image and text embeddings must pair up row by row, got {tuple(image_embeds.shape)} and "
                         f"{tuple(text_embeds.shape)}")
    if gather is None:
        gather = _distributed()
    if gather:
        all_images, offset = gather_embeddings(image_embeds)
        all_texts, _ = gather_embeddings(text_embeds)
    else:
        all_images, all_texts, offset = image_embeds, text_embeds, 0
    scale = logit_scale.exp()
    n = image_embeds.shape[0]
    if kind == "clip":
        target = torch.arange(offset, offset + n, device=image_embeds.device)
        per_image = scale * image_embeds @ all_texts.t()  # [n, N]: own images against every text
        per_text = scale * text_embeds @ all_images.t()  # [n, N]: own texts against every image
        return (F.cross_entropy(per_image.float(), target) + F.cross_entropy(per_text.float(), target)) / 2
    if logit_bias is None:
        raise ValueError("the sigmoid (siglip) loss needs a learned logit bias")
    logits = scale * image_embeds @ all_texts.t() + logit_bias  # [n, N]
    signs = -torch.ones_like(logits)
    signs[torch.arange(n), torch.arange(offset, offset + n)] = 1.0
    return -F.logsigmoid((signs * logits).float()).sum() / n


__all__ = ["KINDS", "contrastive_loss", "gather_embeddings"]
