"""Reproducible batches of sample indices: the data order is a pure function of (seed, batch position)."""

from __future__ import annotations

import torch


class BatchStream:
    """An endless, reproducible stream of index batches: epoch e is a permutation seeded by (seed, e)."""

    def __init__(self, n: int, batch_size: int, seed: int, position: int = 0):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.position = position  # batches handed out so far
        self._epoch, self._order = -1, None

    def _perm(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n, generator=g)

    def next(self) -> list[int]:
        out = []
        start = self.position * self.batch_size
        for k in range(start, start + self.batch_size):
            epoch, i = divmod(k, self.n)
            if self._epoch != epoch:
                self._epoch, self._order = epoch, self._perm(epoch)
            out.append(int(self._order[i]))
        self.position += 1
        return out
