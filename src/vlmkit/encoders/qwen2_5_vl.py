"""Qwen2.5-VL's vision tower (Bai et al. 2025, "Qwen2.5-VL"): Qwen2-VL's tower (encoders/qwen2_vl.py: 3D patch
embedding, 2D RoPE, packed per-image attention) with

- RMSNorm in place of LayerNorm and a SwiGLU MLP (gate / up / down projections, with biases);
- **window attention**: the merged-token grid of every frame is cut into windows of ``window_units`` x
  ``window_units`` merge units (``window_size`` pixels / patch_size / merge_size; windows at the right and bottom
  edges are smaller), and every block attends within its window, but the blocks listed in ``full_blocks``,
  which attend over the whole frame as Qwen2-VL's do.

transformers (``Qwen2_5_VisionTransformerPretrainedModel``) reorders the merge units window by window
(``get_window_index``), runs every block on that order (windows as ``cu_window_seqlens``), applies the patch
merger and puts the merged tokens back in the processor's order. The tower here does the same reordering and
undoes it on its output, before the merger: the merger maps each merge unit on its own, so merging and then
reordering the units is merging the reordered units; the output keeps the contract of Qwen2-VL's tower (patch
features in the processor's order) and Qwen2-VL's model code serves both.
"""

from __future__ import annotations

import torch
from torch import nn

from vlmkit.config import VisionConfig
from vlmkit.encoders.qwen2_vl import Qwen2VLVisionBlock, Qwen2VLVisionEncoder, window_positions
from vlmkit.nn import SwiGLU


def window_order(grid_thw: torch.Tensor, merge_size: int, window_units: int) -> tuple[torch.Tensor, list[int]]:
    """(order [n units], window lengths in patches) of the merge units of every frame of every image listed window
    by window: transformers' ``get_window_index`` (its ``window_index`` and the differences of its
    ``cu_window_seqlens``). Windows are ``window_units`` x ``window_units`` merge units, row-major over the frame's
    merged grid and row-major inside; those at the right and bottom edges hold what is left."""
    order, lengths, offset = [], [], 0
    for t, h, w in grid_thw.tolist():
        lh, lw = h // merge_size, w // merge_size
        index = torch.arange(t * lh * lw).view(t, lh, lw) + offset
        for frame in range(t):
            for r in range(0, lh, window_units):
                for c in range(0, lw, window_units):
                    units = index[frame, r:r + window_units, c:c + window_units].flatten()
                    order.append(units)
                    lengths.append(units.numel() * merge_size**2)
        offset += t * lh * lw
    return (torch.cat(order) if order else torch.zeros(0, dtype=torch.long)), lengths


class Qwen25VLVisionBlock(Qwen2VLVisionBlock):
    """RMSNorm (``vision.norm``), attention as Qwen2-VL's, RMSNorm, SwiGLU MLP with biases."""

    @staticmethod
    def make_mlp(cfg: VisionConfig) -> nn.Module:
        return SwiGLU(cfg.width, cfg.mlp_dim, act=cfg.act, bias=True)


class Qwen25VLVisionEncoder(Qwen2VLVisionEncoder):
    """Flattened patches [N, C * T * p * p] + grid_thw [n, 3] -> patch features [N, width] in the processor's
    order, the blocks attending within windows of ``window_size`` pixels but ``full_blocks``."""

    Block = Qwen25VLVisionBlock

    def __init__(self, cfg: VisionConfig, window_size: int, full_blocks: tuple[int, ...]):
        super().__init__(cfg)
        self.window_units = window_size // cfg.merge_size // cfg.patch_size
        if self.window_units < 1:
            raise ValueError(f"window_size {window_size} is less than one merge unit (patch_size {cfg.patch_size} "
                             f"x merge_size {cfg.merge_size} pixels)")
        bad = [i for i in full_blocks if not 0 <= i < cfg.depth]
        if bad:
            raise ValueError(f"full-attention blocks {bad} are not blocks of a tower of depth {cfg.depth}")
        self.full_blocks = frozenset(full_blocks)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        x = self.embed(pixel_values, grid_thw)
        n, unit = x.shape[0], self.merge_size**2
        order, windows = window_order(grid_thw, self.merge_size, self.window_units)
        order = order.to(x.device)

        def by_window(t: torch.Tensor) -> torch.Tensor:  # [N, ...] in processor order -> window by window
            return t.reshape(n // unit, unit, -1)[order].reshape(n, -1)

        x = by_window(x)
        rope = self.rope.at(by_window(window_positions(grid_thw, self.merge_size).to(x.device)))
        frames = [h * w for t, h, w in grid_thw.tolist() for _ in range(t)]
        for i, block in enumerate(self.blocks):
            x = block(x, rope, frames if i in self.full_blocks else windows)
        return x.reshape(n // unit, unit, -1)[torch.argsort(order)].reshape(n, -1)  # back to processor order
