"""Zero-shot image-text retrieval recall@K and zero-shot classification top-K accuracy.

Reference: LAION-AI/CLIP_benchmark, ``clip_benchmark/metrics/zeroshot_retrieval.py`` (``evaluate`` and
``recall_at_k``) and ``clip_benchmark/metrics/zeroshot_classification.py`` (``accuracy``), which follow the
CLIP papers:

* Retrieval takes a similarity matrix ``[n_images, n_texts]`` and, for every text, the index of its image
  (COCO / Flickr30k have about 5 captions per image). **image -> text** recall@K: an image is a hit if *any*
  of its captions is among its K most similar texts (CLIP_benchmark's ``text_retrieval_recall@K``, computed
  there as "recall > 0"). **text -> image** recall@K: a caption is a hit if its one image is among its K most
  similar images (CLIP_benchmark's ``image_retrieval_recall@K``). Each is the mean of hits over the queries.
* Classification takes logits ``[n_samples, n_classes]`` and integer labels; top-K accuracy is the share of
  samples whose label is among the K highest logits. ``mean_per_class_recall`` (also reported by
  CLIP_benchmark) averages the top-1 recall of each class present in the labels.

Ties (CLIP_benchmark uses ``torch.topk``, whose order among equal scores is unspecified): here the order is a
stable sort by decreasing score, so among equal scores **the lower index ranks first**. The rank of a target
is ``#(scores > s) + #(scores == s with a lower index)``, 0-based; it is a hit at K when ``rank < K``.
K larger than the number of candidates is clamped to it (every query is then a hit). Non-finite scores
(NaN, inf) are rejected with an error, since their ranking would be arbitrary.

Inputs may be torch tensors, numpy arrays or nested lists; computation is in float64 on the CPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from vlmkit.errors import DataError

_CHUNK = 1024  # queries per block, to bound memory (a COCO 5k x 25k matrix compares block by block)


def _as_matrix(values: Any, name: str, rows: str, cols: str) -> torch.Tensor:
    try:
        matrix = torch.as_tensor(values, dtype=torch.float64, device="cpu")
    except (TypeError, ValueError, RuntimeError) as err:
        raise DataError(f"{name} must be a 2-D array of numbers [{rows}, {cols}]: {err}") from None
    if matrix.ndim != 2 or matrix.shape[0] == 0 or matrix.shape[1] == 0:
        raise DataError(f"{name} must be a non-empty 2-D array [{rows}, {cols}], got shape {tuple(matrix.shape)}")
    if not torch.isfinite(matrix).all():
        raise DataError(f"{name} contains NaN or infinite values; scores must be finite to be ranked")
    return matrix


def _as_indices(values: Any, name: str, length: int, upper: int, what: str) -> torch.Tensor:
    try:
        index = torch.as_tensor(values, device="cpu")
    except (TypeError, ValueError, RuntimeError) as err:
        raise DataError(f"{name} must be a 1-D sequence of integer {what} indices: {err}") from None
    if index.ndim != 1 or len(index) != length:
        raise DataError(f"{name} must hold one {what} index per row/column ({length}), got shape {tuple(index.shape)}")
    if index.is_floating_point() or index.dtype == torch.bool:
        raise DataError(f"{name} must hold integer {what} indices, got dtype {index.dtype}")
    index = index.long()
    bad = (index < 0) | (index >= upper)
    if bad.any():
        where = int(bad.nonzero()[0])
        raise DataError(f"{name}[{where}] = {int(index[where])} is not a valid {what} index (0..{upper - 1})")
    return index


def _target_ranks(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """0-based rank of ``targets[q]`` in row ``scores[q]`` sorted by decreasing score, ties by lower index first."""
    ranks = []
    for start in range(0, len(scores), _CHUNK):
        block, tgt = scores[start:start + _CHUNK], targets[start:start + _CHUNK]
        target_score = block.gather(1, tgt[:, None])
        lower_index = torch.arange(block.shape[1])[None, :] < tgt[:, None]
        ranks.append((block > target_score).sum(1) + ((block == target_score) & lower_index).sum(1))
    return torch.cat(ranks)


def _check_ks(ks: Sequence[int]) -> list[int]:
    ks = list(ks)
    if not ks or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in ks):
        raise DataError(f"ks must be a non-empty list of positive integers, got {ks!r}")
    return ks


def image_to_text_ranks(similarity: Any, text_to_image: Any) -> torch.Tensor:
    """For each image, the best (lowest, 0-based) rank of any of its captions among all texts. Shape [n_images].

    ``similarity`` is ``[n_images, n_texts]``; ``text_to_image[t]`` is the index of caption ``t``'s image.
    Every image needs at least one caption.
    """
    sim = _as_matrix(similarity, "similarity", "n_images", "n_texts")
    owner = _as_indices(text_to_image, "text_to_image", sim.shape[1], sim.shape[0], "image")
    counts = torch.bincount(owner, minlength=sim.shape[0])
    if (counts == 0).any():
        missing = int((counts == 0).nonzero()[0])
        raise DataError(f"image {missing} has no caption in text_to_image; every image needs at least one")
    caption_ranks = _target_ranks(sim[owner], torch.arange(sim.shape[1]))  # each caption within its image's row
    best = torch.full((sim.shape[0],), sim.shape[1], dtype=torch.long)
    return best.scatter_reduce(0, owner, caption_ranks, reduce="amin")


def text_to_image_ranks(similarity: Any, text_to_image: Any) -> torch.Tensor:
    """For each text, the 0-based rank of its image among all images. Shape [n_texts]."""
    sim = _as_matrix(similarity, "similarity", "n_images", "n_texts")
    owner = _as_indices(text_to_image, "text_to_image", sim.shape[1], sim.shape[0], "image")
    return _target_ranks(sim.T, owner)


def retrieval_metrics(similarity: Any, text_to_image: Any, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall@K both ways: keys ``image_to_text_recall@K``, ``text_to_image_recall@K``, ``n_images``, ``n_texts``."""
    ks = _check_ks(ks)
    i2t = image_to_text_ranks(similarity, text_to_image)
    t2i = text_to_image_ranks(similarity, text_to_image)
    out: dict[str, float] = {}
    for k in ks:
        out[f"image_to_text_recall@{k}"] = (i2t < k).double().mean().item()
        out[f"text_to_image_recall@{k}"] = (t2i < k).double().mean().item()
    out["n_images"], out["n_texts"] = float(len(i2t)), float(len(t2i))
    return out


def classification_ranks(logits: Any, labels: Any) -> torch.Tensor:
    """0-based rank of each sample's label among its logits (0 = top-1 correct). Shape [n_samples]."""
    scores = _as_matrix(logits, "logits", "n_samples", "n_classes")
    target = _as_indices(labels, "labels", scores.shape[0], scores.shape[1], "class")
    return _target_ranks(scores, target)


def zero_shot_classification_metrics(logits: Any, labels: Any, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Top-K accuracy (keys ``top{K}_accuracy``), ``mean_per_class_recall`` (top-1 recall averaged over the
    classes present in ``labels``) and ``n``."""
    ks = _check_ks(ks)
    ranks = classification_ranks(logits, labels)
    target = torch.as_tensor(labels).long()
    out = {f"top{k}_accuracy": (ranks < k).double().mean().item() for k in ks}
    hit = (ranks == 0).double()
    per_class = [hit[target == c].mean() for c in torch.unique(target)]
    out["mean_per_class_recall"] = torch.stack(per_class).mean().item()
    out["n"] = float(len(ranks))
    return out
