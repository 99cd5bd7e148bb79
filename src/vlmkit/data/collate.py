"""Batches of tokenised samples: padded (one sample per row) or packed (several samples per row).

**Padded** (:func:`collate`): one sample per row, right-padded to the longest; causal attention needs no
mask, because real tokens never see the padding after them.

**Packed** (:func:`collate_packed`): the samples of a batch are laid end to end in rows of at most
``pack_length`` tokens (:func:`pack_rows`, first-fit decreasing), and every token carries the index of its
sample in its row (``document_ids``; -1 = padding). The model turns them into a block-diagonal mask, so a
token attends only to its own sample, exactly as if the sample ran alone:

- positions restart at every sample (``position_ids`` are each sample's own);
- each sample's images stay with it: images are concatenated in row order, sample by sample, which is the
  order in which the splice fills the placeholders;
- the first token of every sample is unsupervised, so the next-token shift never predicts one sample's first
  token from the end of the previous one (it is never a target when the sample runs alone either);
- families with their own attention or positions build them per sample (PaliGemma's prefix-LM mask and
  1-indexed positions, Qwen2-VL's M-RoPE ids); see ``VisionLanguageModel.forward(document_ids=...)``.

The loss and the gradients of a packed batch equal those of the same samples padded (tests/unit/test_packing.py
proves it for every generative family, within 1e-5); only the padding, and its compute, is gone.

Samples of :func:`~vlmkit.data.conversations.group_by_image` (independent questions about one image sharing a
prefix) keep their ``segment_ids`` inside their sample, packed or not.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlmkit.processing import IGNORE
from vlmkit.processing.image import ImageInputs


@dataclass
class PaddingStats:
    """Token slots of the batches seen so far, and how many of them held real tokens."""

    slots: int = 0
    tokens: int = 0

    def add(self, batch: dict) -> None:
        self.slots += batch["input_ids"].numel()
        self.tokens += int(batch["attention_mask"].sum())

    @property
    def fraction(self) -> float:
        """Padding fraction: padded slots / all slots (0 = no padding)."""
        return 1.0 - self.tokens / self.slots if self.slots else 0.0


def pack_rows(lengths: list[int], pack_length: int) -> list[list[int]]:
    """Indices of ``lengths`` grouped into rows whose lengths sum to at most ``pack_length``: first-fit
    decreasing (longest first, each into the first row with room; ties by index, so the result is a pure
    function of the input). Rows keep their samples in index order. A sample longer than ``pack_length``
    raises ValueError."""
    too_long = [(i, n) for i, n in enumerate(lengths) if n > pack_length]
    if too_long:
        i, n = too_long[0]
        raise ValueError(f"sample {i} has {n} tokens, more than train.pack_length {pack_length}; raise pack_length "
                         f"(0 = the longest sample of the data)")
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda k: (-lengths[k], k)):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(pack_length - lengths[i])
    return [sorted(r) for r in rows]


def collate(batch: list[dict], pad_id: int) -> dict:
    """One sample per row, right-padded: ids (pad_id), labels (-100); images (and their paths) concatenated
    in reading order.

    Samples with independent turns (segment ids > 0, :func:`~vlmkit.data.conversations.share_prefix`) make the
    batch carry ``document_ids`` (0 per real token, -1 for padding), ``segment_ids`` and ``position_ids``, from
    which the model builds their mask; otherwise all three are None (the fast causal path)."""
    grouped = any("segment_ids" in b and bool((b["segment_ids"] > 0).any()) for b in batch)
    return _rows([[b] for b in batch], pad_id, with_documents=grouped)


def collate_packed(batch: list[dict], pad_id: int, pack_length: int) -> dict:
    """The samples of ``batch`` packed into rows of at most ``pack_length`` tokens (:func:`pack_rows`), with
    ``document_ids``, ``segment_ids`` and ``position_ids`` (see the module docstring)."""
    rows = pack_rows([len(b["input_ids"]) for b in batch], pack_length)
    return _rows([[batch[i] for i in row] for row in rows], pad_id, with_documents=True)


def _rows(rows: list[list[dict]], pad_id: int, with_documents: bool) -> dict:
    T = max(sum(len(b["input_ids"]) for b in row) for row in rows)
    B = len(rows)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE, dtype=torch.long)
    attn = torch.zeros(B, T, dtype=torch.long)
    docs = torch.full((B, T), -1, dtype=torch.long)
    pos = torch.zeros(B, T, dtype=torch.long)
    seg = torch.zeros(B, T, dtype=torch.long)
    for r, row in enumerate(rows):
        t = 0
        for d, b in enumerate(row):
            n = len(b["input_ids"])
            ids[r, t:t + n] = b["input_ids"]
            labels[r, t:t + n] = b["labels"]
            labels[r, t] = IGNORE  # never a target alone (the shift drops it): nor from the previous sample
            attn[r, t:t + n] = 1
            docs[r, t:t + n] = d
            pos[r, t:t + n] = b["position_ids"] if "position_ids" in b else torch.arange(n)
            if "segment_ids" in b:
                seg[r, t:t + n] = b["segment_ids"]
            t += n
    out = {"input_ids": ids, "labels": labels, "attention_mask": attn, "position_ids": None,
           "document_ids": None, "segment_ids": None, "n_samples": sum(len(row) for row in rows)}
    if with_documents:
        out.update(position_ids=pos, document_ids=docs, segment_ids=seg)
    items = [b for row in rows for b in row]
    if all("pixel_values" in b for b in items):
        pixels = [b["pixel_values"] for b in items]
        out["pixel_values"] = ImageInputs.cat(pixels) if isinstance(pixels[0], ImageInputs) else torch.cat(pixels)
    if all("image_paths" in b for b in items):
        out["image_paths"] = [p for b in items for p in b["image_paths"]]
    return out


def document_mask(document_ids: torch.Tensor, segment_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean attention mask [B, 1, T, T] (True = may attend) of a packed batch: causal within each document
    (``document_ids`` >= 0, -1 = padding), nothing across documents; with ``segment_ids``, a token of segment
    k > 0 sees its document's segment 0 (the shared prefix) and its own segment only. Padding rows keep
    their diagonal so that no row is fully masked."""
    T = document_ids.shape[-1]
    q, k = document_ids[:, :, None], document_ids[:, None, :]
    causal = torch.ones(T, T, dtype=torch.bool, device=document_ids.device).tril()
    mask = causal & (q == k) & (k >= 0)
    if segment_ids is not None:
        sq, sk = segment_ids[:, :, None], segment_ids[:, None, :]
        mask &= (sk == 0) | (sk == sq)
    return (mask | torch.eye(T, dtype=torch.bool, device=document_ids.device))[:, None]


def document_starts(document_ids: torch.Tensor) -> torch.Tensor:
    """[B, T] booleans: the first token of each document of a packed batch."""
    prev = torch.nn.functional.pad(document_ids, (1, 0), value=-1)[:, :-1]
    return (document_ids != prev) & (document_ids >= 0)


def per_document_cumsum(x: torch.Tensor, document_ids: torch.Tensor) -> torch.Tensor:
    """Inclusive cumulative sum of ``x`` [B, T] restarting at every document of a packed batch."""
    total = x.cumsum(-1)
    starts = document_starts(document_ids)
    before = torch.where(starts, total - x, torch.zeros_like(total))  # the running sum where each document starts
    return total - before.cummax(-1).values


__all__ = ["PaddingStats", "collate", "collate_packed", "document_mask", "document_starts", "pack_rows",
           "per_document_cumsum"]
