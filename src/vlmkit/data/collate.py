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
- each sample's prompt stays marked (``Batch.prompt_mask``), so a family with prefix-LM attention gives each its own;
  families with their own positions build them per sample from ``document_ids`` (PaliGemma's 1-indexed positions,
  Qwen2-VL's M-RoPE ids).

The loss and the gradients of a packed batch equal those of the same samples padded (tests/unit/test_packing.py
proves it for every generative family, within 1e-5); only the padding, and its compute, is gone.

Samples of :func:`~vlmkit.data.conversations.group_by_image` (independent questions about one image sharing a
prefix) keep their ``segment_ids`` inside their sample, packed or not.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vlmkit.batch import IGNORE, Batch, MediaInputs


@dataclass
class Item:
    """One sample as collate takes it: its ids and labels, its own positions and segments when its questions share a
    prefix (data/conversations.py), how many leading tokens are its prompt, its images (None when a frozen tower's
    cache stands in for them) and their paths."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor | None = None
    segment_ids: torch.Tensor | None = None
    prompt_len: int = 0
    media: MediaInputs | None = None
    image_paths: list = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class PaddingStats:
    """Token slots of the batches seen so far, and how many of them held real tokens."""

    slots: int = 0
    tokens: int = 0

    def add(self, batch: Batch) -> None:
        self.slots += batch.input_ids.numel()
        self.tokens += batch.real_tokens

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


def collate(batch: list[Item], pad_id: int) -> Batch:
    """One sample per row, right-padded: ids (pad_id), labels (-100); images (and their paths) concatenated
    in reading order.

    Samples with independent turns (segment ids > 0, :func:`~vlmkit.data.conversations.share_prefix`) make the
    batch carry ``document_ids`` (0 per real token, -1 for padding), ``segment_ids`` and ``position_ids``, from
    which the model builds their mask; otherwise all three are None (the fast causal path)."""
    grouped = any(b.segment_ids is not None and bool((b.segment_ids > 0).any()) for b in batch)
    return _rows([[b] for b in batch], pad_id, with_documents=grouped)


def collate_packed(batch: list[Item], pad_id: int, pack_length: int) -> Batch:
    """The samples of ``batch`` packed into rows of at most ``pack_length`` tokens (:func:`pack_rows`), with
    ``document_ids``, ``segment_ids`` and ``position_ids`` (see the module docstring)."""
    rows = pack_rows([len(b) for b in batch], pack_length)
    return _rows([[batch[i] for i in row] for row in rows], pad_id, with_documents=True)


def _rows(rows: list[list[Item]], pad_id: int, with_documents: bool) -> Batch:
    T = max(sum(len(b) for b in row) for row in rows)
    B = len(rows)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE, dtype=torch.long)
    docs = torch.full((B, T), -1, dtype=torch.long)
    pos = torch.zeros(B, T, dtype=torch.long)
    seg = torch.zeros(B, T, dtype=torch.long)
    prompt = torch.zeros(B, T, dtype=torch.bool)
    for r, row in enumerate(rows):
        t = 0
        for d, b in enumerate(row):
            n = len(b)
            ids[r, t:t + n] = b.input_ids
            labels[r, t:t + n] = b.labels
            labels[r, t] = IGNORE  # never a target alone (the shift drops it): nor from the previous sample
            docs[r, t:t + n] = d
            pos[r, t:t + n] = b.position_ids if b.position_ids is not None else torch.arange(n)
            if b.segment_ids is not None:
                seg[r, t:t + n] = b.segment_ids
            prompt[r, t:t + b.prompt_len] = True
            t += n
    items = [b for row in rows for b in row]
    media = MediaInputs.cat([b.media for b in items]) if all(b.media is not None for b in items) else None
    out = Batch(ids, labels, prompt_mask=prompt, media=media, n_samples=len(items),
                image_paths=[p for b in items for p in b.image_paths], real_tokens=sum(len(b) for b in items))
    if with_documents:
        out.position_ids, out.document_ids, out.segment_ids = pos, docs, seg
    return out


__all__ = ["Item", "PaddingStats", "collate", "collate_packed", "pack_rows"]
