"""Splice fusion: image placeholder tokens in the text are replaced by connector outputs, in order.

Images of a batch are given as one list in reading order (sample 0's images first, then sample 1's, ...);
each occupies ``M`` consecutive placeholder positions. One image or several, anywhere in the text. Features
are [n_images, M, D], or [total tokens, D] when images fill different numbers of tokens (tiling families).
"""

from __future__ import annotations

import torch


def splice_image_features(embeds: torch.Tensor, input_ids: torch.Tensor, image_token_id: int,
                          features: torch.Tensor | None) -> torch.Tensor:
    """embeds [B, T, D], input_ids [B, T], features [n_images, M, D] -> embeds with images in place."""
    is_image = input_ids == image_token_id  # [B, T]
    n_slots = int(is_image.sum())
    n_feats = 0 if features is None else features[..., 0].numel()
    if n_slots != n_feats:
        if features is not None and features.ndim == 3:
            m, n_img = features.shape[1], features.shape[0]
            raise ValueError(f"{n_slots} image placeholder tokens in the batch but {n_img} images x {m} tokens = "
                             f"{n_feats} features; the processor must expand each placeholder to {m} tokens")
        raise ValueError(f"{n_slots} image placeholder tokens in the batch but {n_feats} image features")
    if n_slots == 0:
        return embeds
    flat = features.reshape(-1, features.shape[-1]).to(embeds.dtype)  # [n_images * M, D]
    return embeds.masked_scatter(is_image[..., None], flat)
