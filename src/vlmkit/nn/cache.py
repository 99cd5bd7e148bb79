"""The KV cache of a decoder: preallocated per-layer key/value buffers, plus the per-row state a model keeps across
decoding steps (``extra``: M-RoPE offsets, cross-attention image states...).

Besides filling it, a serving engine reshapes it between decoding steps, for any family alike: :meth:`KVCache.stack`
joins two batches' caches aligned on the right (each row keeps its own length through the padding mask),
:meth:`KVCache.select` keeps some rows and drops columns only padding uses, :meth:`KVCache.grow` enlarges the
buffers. The per-row ``extra`` values follow the rows: tensors with rows on dim 0 (or tuples / lists of them, or
None), padded with zeros (False) where two batches' shapes differ.
"""

from __future__ import annotations

import torch


class KVCache:
    """Preallocated per-layer key/value buffers: [B, H_kv, T_max, hd] each.

    ``length`` is the number of positions filled so far; every layer writes the same slice during one forward.
    """

    def __init__(self, layers: int, batch: int, kv_heads: int, head_dim: int, max_len: int, device=None,
                 dtype=torch.float32):
        shape = (batch, kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(layers)]
        self.length = 0
        self.max_len = max_len
        self.extra: dict = {}  # per-sequence state a model keeps across decoding steps (e.g. M-RoPE offsets)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store k, v [B, H_kv, T, hd] after the filled part; return all keys and values so far."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions > max_len {self.max_len}")
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, n: int) -> None:
        self.length += n

    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0] if self.k else 0

    def _like(self, batch: int, max_len: int) -> KVCache:
        k = self.k[0]
        return KVCache(len(self.k), batch, k.shape[1], k.shape[3], max_len, k.device, k.dtype)

    def grow(self, max_len: int) -> KVCache:
        """A cache of the same rows and contents with room for ``max_len`` positions."""
        grown = self._like(self.batch_size, max_len)
        for layer in range(len(self.k)):
            grown.k[layer][:, :, :self.length] = self.k[layer][:, :, :self.length]
            grown.v[layer][:, :, :self.length] = self.v[layer][:, :, :self.length]
        grown.length, grown.extra = self.length, self.extra
        return grown

    @staticmethod
    def stack(a: KVCache, b: KVCache, room: int = 64) -> KVCache:
        """The rows of ``a`` then those of ``b``, both aligned on the right (the shorter one's columns on the left are
        padding, which the caller's attention mask marks), with at least ``room`` free positions after them."""
        C = max(a.length, b.length)
        cap = max(a.max_len - a.length, room) + C
        merged = a._like(a.batch_size + b.batch_size, cap)
        rows = (slice(0, a.batch_size), slice(a.batch_size, None))
        for layer in range(len(a.k)):
            for src, rows_ in zip((a, b), rows):
                merged.k[layer][rows_, :, C - src.length:C] = src.k[layer][:, :, :src.length]
                merged.v[layer][rows_, :, C - src.length:C] = src.v[layer][:, :, :src.length]
        merged.length = C
        merged.extra = {k: merge_rows(a.extra.get(k), b.extra.get(k), a.batch_size, b.batch_size)
                        for k in {**a.extra, **b.extra}}
        return merged

    def select(self, rows: torch.Tensor, drop_columns: int = 0) -> KVCache:
        """The cache of ``rows`` only (in place), without its first ``drop_columns`` positions (columns that only
        padding uses once other rows left)."""
        C, first = self.length, drop_columns
        for layer in range(len(self.k)):
            self.k[layer] = self.k[layer][rows]
            self.v[layer] = self.v[layer][rows]
            if first:
                self.k[layer][:, :, :C - first] = self.k[layer][:, :, first:C].clone()
                self.v[layer][:, :, :C - first] = self.v[layer][:, :, first:C].clone()
        self.extra = {k: take_rows(v, rows) for k, v in self.extra.items()}
        self.length = C - first
        return self


def merge_rows(a, b, rows_a: int, rows_b: int):
    """Two batches' per-row decoding state (tensors with the rows on dim 0, or tuples / lists of them, or None) -> the
    state of the stacked batch. Tensors are zero-padded (False for masks) to the larger size of every other dim:
    padded image keys are masked keys; a side without the state (None) gets zeros, the state of a row with no
    images (M-RoPE delta 0, no image seen)."""
    if a is None and b is None:
        return None
    if isinstance(a, (tuple, list)) or isinstance(b, (tuple, list)):
        n = len(a if a is not None else b)
        merged = [merge_rows(None if a is None else a[i], None if b is None else b[i], rows_a, rows_b)
                  for i in range(n)]
        return type(a if a is not None else b)(merged)
    ref = a if a is not None else b
    a = ref.new_zeros((rows_a, *ref.shape[1:])) if a is None else a
    b = ref.new_zeros((rows_b, *ref.shape[1:])) if b is None else b
    size = [max(x, y) for x, y in zip(a.shape[1:], b.shape[1:])]
    return torch.cat([_pad_to(a, size), _pad_to(b, size)])


def _pad_to(t: torch.Tensor, size: list[int]) -> torch.Tensor:
    """``t`` [B, ...] in the top-left corner of zeros (False) [B, *size]."""
    if list(t.shape[1:]) == size:
        return t
    out = t.new_zeros((t.shape[0], *size))
    out[tuple(slice(0, n) for n in t.shape)] = t
    return out


def take_rows(x, idx: torch.Tensor):
    """Per-row decoding state (as :func:`merge_rows`) of the rows ``idx``."""
    if x is None:
        return None
    if isinstance(x, (tuple, list)):
        return type(x)(take_rows(v, idx) for v in x)
    return x[idx]


__all__ = ["KVCache", "merge_rows", "take_rows"]
