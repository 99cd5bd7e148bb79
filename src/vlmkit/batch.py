"""What crosses between processing, models and the loops, as typed values.

- :class:`MediaInputs`: the prepared images of one prompt or a batch (pixels or tiles or patches, how many LM
  positions each fills, per-item extras), as a family's image processor gives them;
- :class:`Features`: the same items encoded by a model (``Model.encode_media``), split and joined item by item so
  that a cache or a serving engine handles every family's features without knowing their layout;
- :class:`Encoded`: a prompt, chat or supervised conversation as token ids (and labels), from a prompt layout;
- :class:`Batch`: what a model's ``forward`` takes: ids, labels, positions, packing documents and segments, the
  prompt/answer split, media or features, and per-family extras;
- :class:`ModelOutput`: what it returns.

This module sits low in the tree (it imports torch only): models, processing, data and the loops all use it.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field

import torch

IGNORE = -100  # the label of a token that is not trained (PyTorch's cross_entropy ignore_index)


def _rows(n_rows: int, rows: list[int] | None, n_items: int) -> list[int]:
    """Rows of a tensor per item: ``rows`` when given, else one row each (``n_rows`` must equal the items)."""
    if rows is not None:
        return list(rows)
    if n_rows != n_items:
        raise ValueError(f"{n_rows} rows for {n_items} items: give the rows of each item")
    return [1] * n_items


def _split_rows(x: torch.Tensor, rows: list[int]) -> list[torch.Tensor]:
    return list(x.split(rows)) if rows else []


@dataclass
class MediaInputs:
    """The images of one prompt (or a batch of prompts) as the model takes them, in reading order.

    ``pixel_values`` holds every item's rows along dim 0: one [C, H, W] per fixed-size image, or a tiling family's
    tiles, or a native-resolution family's patches; ``rows`` says how many rows each item has (None: one each).
    ``tokens`` is how many LM positions each item fills; ``extra`` holds per-item tensors (dim 0 = items: image
    sizes, grids, a Q-Former's instruction ids...); ``texts``, when a family marks an image's layout in the text
    (Idefics3's row/column markers, Fuyu's row breaks), is what each image placeholder becomes. ``tower`` holds the
    image tower's output for these items when it was computed beforehand (a frozen tower's cache): families that
    can take it (``Capabilities.tower_cache``) then skip the tower."""

    pixel_values: torch.Tensor
    tokens: list[int]
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    texts: list[str] | None = None
    rows: list[int] | None = None
    tower: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.tokens)

    def to(self, device) -> MediaInputs:
        return dataclasses.replace(self, pixel_values=self.pixel_values.to(device),
                                   extra={k: v.to(device) for k, v in self.extra.items()},
                                   tower=None if self.tower is None else self.tower.to(device))

    def item_rows(self) -> list[int]:
        return _rows(len(self.pixel_values), self.rows, len(self))

    def split(self) -> list[MediaInputs]:
        """One MediaInputs per item."""
        rows = self.item_rows()
        pixels = _split_rows(self.pixel_values, rows)
        towers = [None] * len(self) if self.tower is None else list(self.tower.split(1))
        return [MediaInputs(pixels[i], [self.tokens[i]], {k: v[i:i + 1] for k, v in self.extra.items()},
                            None if self.texts is None else [self.texts[i]],
                            None if self.rows is None else [rows[i]], towers[i]) for i in range(len(self))]

    @classmethod
    def cat(cls, items: list[MediaInputs]) -> MediaInputs:
        if not items:
            raise ValueError("MediaInputs.cat needs at least one item")
        texts = None if any(i.texts is None for i in items) else [t for i in items for t in i.texts]
        rows = None if all(i.rows is None for i in items) else [r for i in items for r in i.item_rows()]
        keys = [k for k in items[0].extra if all(k in i.extra for i in items)]
        if any(set(i.extra) != set(keys) for i in items):
            raise ValueError(f"MediaInputs.cat: items carry different extras ({[sorted(i.extra) for i in items]})")
        towers = [i.tower for i in items if len(i)]
        tower = torch.cat(towers) if towers and all(t is not None for t in towers) else None
        return cls(torch.cat([i.pixel_values for i in items]), [t for i in items for t in i.tokens],
                   {k: torch.cat([i.extra[k] for i in items]) for k in keys}, texts, rows, tower)


def item_key(source: str, single: MediaInputs) -> str:
    """A cache key of one prepared item: where it came from (a path, a content hash) and what was prepared with it
    (its token count, rows and per-item extras such as an instruction), so that two prompts share an item's features
    exactly when the model would compute the same ones."""
    h = hashlib.sha256(source.encode())
    h.update(f"{single.tokens}:{single.rows}:{tuple(single.pixel_values.shape)}".encode())
    for k in sorted(single.extra):
        h.update(k.encode())
        h.update(single.extra[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


@dataclass
class Features:
    """Encoded media of a batch, item by item in reading order: ``values`` holds each item's ``rows`` along dim 0
    ([n, M, D] with one row per image, or flat [total tokens, D] with each image's tokens as its rows), ``extra``
    per-item tensors (dim 0 = items: a grid, a tile count). A model reads its own layout; shared code only splits
    items apart (a feature cache, the serving engine) and joins them again."""

    values: torch.Tensor
    rows: list[int]
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def stacked(cls, values: torch.Tensor, **extra: torch.Tensor) -> Features:
        """Features of one row per item ([n, ...])."""
        return cls(values, [1] * len(values), dict(extra))

    def __len__(self) -> int:
        return len(self.rows)

    def to(self, device) -> Features:
        return Features(self.values.to(device), list(self.rows), {k: v.to(device) for k, v in self.extra.items()})

    def split(self) -> list[Features]:
        parts = _split_rows(self.values, self.rows)
        return [Features(parts[i], [self.rows[i]], {k: v[i:i + 1] for k, v in self.extra.items()})
                for i in range(len(self))]

    @classmethod
    def cat(cls, items: list[Features]) -> Features:
        if not items:
            raise ValueError("Features.cat needs at least one item")
        return cls(torch.cat([i.values for i in items]), [r for i in items for r in i.rows],
                   {k: torch.cat([i.extra[k] for i in items]) for k in items[0].extra})

    def select(self, index: list[int]) -> Features:
        """The items at ``index`` (repeats allowed), in that order."""
        parts = self.split()
        return Features.cat([parts[i] for i in index])


@dataclass
class Encoded:
    """A prompt or a conversation as token ids, from a family's prompt layout.

    ``labels`` (supervised conversations): the id where a token is trained, -100 elsewhere. ``prompt_len``: how many
    leading tokens are the prompt the model reads before it answers (a prefix-LM family attends both ways over them;
    a scored continuation starts there). ``media``: the items with whatever the layout added to them (InstructBLIP's
    instruction). ``positions`` / ``segments``: set when questions share a prefix (data/conversations.py)."""

    ids: list[int]
    labels: list[int] | None = None
    prompt_len: int = 0
    media: MediaInputs | None = None
    positions: list[int] | None = None
    segments: list[int] | None = None

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class Batch:
    """What a model's ``forward`` takes.

    - ``input_ids`` [B, T]; ``labels`` [B, T] (-100: not trained) for a loss;
    - ``attention_mask`` [B, T_cache + T]: 1 at real tokens (left padding in generation), None when every token is
      real or the padding is on the right (causal attention never lets a real token see it);
    - ``position_ids``: None to count from each row's first real token; a packed batch gives each sample's own;
    - ``document_ids`` [B, T] (packing: the sample of each token, -1 = padding) and ``segment_ids`` (questions
      sharing a prefix): the model builds its block-diagonal mask from them;
    - ``prompt_mask`` [B, T]: True at the tokens of each row's prompt (the input, as opposed to the answer or the
      continuation being scored). Families with prefix-LM attention attend both ways over them; others ignore it;
    - ``media`` (prepared images) or ``features`` (already encoded, ``Model.encode_media``), in reading order;
    - ``extras``: per-family inputs (e.g. IDEFICS' ``image_attention_mask``)."""

    input_ids: torch.Tensor
    labels: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None
    document_ids: torch.Tensor | None = None
    segment_ids: torch.Tensor | None = None
    prompt_mask: torch.Tensor | None = None
    media: MediaInputs | None = None
    features: Features | None = None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    n_samples: int = 0  # samples behind the rows (packing puts several in a row)
    real_tokens: int = 0  # tokens that are not padding
    image_paths: list | None = None  # where the media came from (a frozen tower's cache looks them up)

    def to(self, device) -> Batch:
        def move(x):
            return x.to(device) if x is not None else None

        return dataclasses.replace(
            self, input_ids=self.input_ids.to(device), labels=move(self.labels),
            attention_mask=move(self.attention_mask), position_ids=move(self.position_ids),
            document_ids=move(self.document_ids), segment_ids=move(self.segment_ids),
            prompt_mask=move(self.prompt_mask), media=move(self.media), features=move(self.features),
            extras={k: v.to(device) for k, v in self.extras.items()})

    def has_media(self) -> bool:
        return (self.features is not None and len(self.features) > 0) or (self.media is not None and len(self.media) > 0)


@dataclass
class ModelOutput:
    logits: torch.Tensor | None = None
    loss: torch.Tensor | None = None
    n_tokens: int = 0  # supervised tokens behind ``loss``
    # a model that predicts two kinds of token (text and image codes: models/janus.py) gives each kind's summed
    # loss and count, {"text": (sum, n), "image": (sum, n)}, for an objective to weight (objectives/unified.py)
    parts: dict[str, tuple[torch.Tensor, int]] | None = None


__all__ = ["IGNORE", "Batch", "Encoded", "Features", "MediaInputs", "ModelOutput", "item_key"]
