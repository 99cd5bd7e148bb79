"""Reproducible batches of sample indices: the data order is a pure function of (seed, batch position)."""

from __future__ import annotations

import torch


class BatchStream:
    """An endless, reproducible stream of index batches: epoch e is a permutation seeded by (seed, e)."""

    def __init__(self, n: int, batch_size: int, seed: int, position: int = 0, drop_last: bool = False):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.position = position  # batches handed out so far
        self._epoch, self._order = -1, None
        # drop_last: each batch lies inside one epoch (the last n % batch_size indices of each epoch's permutation
        # are left out), so no batch holds an index twice; contrastive losses would count a repeat as a negative
        self.drop_last = drop_last
        if drop_last and batch_size > n:
            raise ValueError(f"batch_size {batch_size} > {n} samples: no whole batch per epoch")

    def _perm(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n, generator=g)

    def next(self) -> list[int]:
        if self.drop_last:
            epoch, b = divmod(self.position, self.n // self.batch_size)
            if self._epoch != epoch:
                self._epoch, self._order = epoch, self._perm(epoch)
            self.position += 1
            return self._order[b * self.batch_size:(b + 1) * self.batch_size].tolist()
        out = []
        start = self.position * self.batch_size
        for k in range(start, start + self.batch_size):
            epoch, i = divmod(k, self.n)
            if self._epoch != epoch:
                self._epoch, self._order = epoch, self._perm(epoch)
            out.append(int(self._order[i]))
        self.position += 1
        return out
