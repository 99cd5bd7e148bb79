"""Vision-tower features computed once for a stage that freezes the tower.

LLaVA-style recipes train the connector and LM on a frozen vision tower; the tower then maps each image to
the same features every time it is seen, and recomputing them every epoch is pure waste (on the demo it is
about a fifth of a step). With ``train.precompute_frozen_vision: true`` the training loop runs the tower
once over every training image at the start of such a stage and looks the features up afterwards.

The features are computed in a fixed order and fixed chunks (sorted paths), so a resumed run recomputes
them bit for bit and resume stays exact. Memory is ``images x tokens x width x 4`` bytes, logged at the
start; the option is for datasets whose features fit in RAM.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm


class FrozenVisionFeatures:
    """``lookup(paths) -> [n, N, D_vision]``: the frozen tower's output for each image path."""

    def __init__(self, encoder: torch.nn.Module, processor, images: list[Path], batch_size: int = 256,
                 progress: bool = True):
        if encoder.training:
            raise RuntimeError("FrozenVisionFeatures needs the tower in eval mode (set_train_mode freezes it)")
        paths = sorted(set(images))
        self.index = {p: i for i, p in enumerate(paths)}
        self.store: torch.Tensor | None = None
        with torch.no_grad():
            for start in tqdm(range(0, len(paths), batch_size), disable=not progress, desc="vision features",
                              unit="batch", leave=False, dynamic_ncols=True):
                chunk = paths[start:start + batch_size]
                feats = encoder(processor.prepare_images(chunk, str(chunk[0].parent)).pixel_values)
                if self.store is None:
                    self.store = torch.empty(len(paths), *feats.shape[1:], dtype=feats.dtype)
                self.store[start:start + len(chunk)] = feats

    def __len__(self) -> int:
        return len(self.index)

    @property
    def nbytes(self) -> int:
        return 0 if self.store is None else self.store.numel() * self.store.element_size()

    def lookup(self, paths: list[Path]) -> torch.Tensor:
        return self.store[[self.index[p] for p in paths]]
