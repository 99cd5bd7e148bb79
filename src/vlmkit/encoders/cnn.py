"""A small convolutional image encoder: VGG-style stages of 3x3 conv, BatchNorm, ReLU and 2x2 max pooling.

Convolutional towers are a real branch of the field (CLIP's ResNets, ConvLLaVA's ConvNeXt, FastVLM's
FastViT). Here the point is learning speed from scratch on small data: on ShapesWorld this tower learns the
colour and shape under each cell of its 8x8 grid to 0.95 accuracy in 200 steps of 64 images, where tiny ViTs
(patch or convolutional stem, any positions) reach 0.3-0.4 (docs/design.md). Output: the same
``[B, N, D]`` token grid as a ViT with ``patch_size`` equal to the total stride, so every connector works
unchanged. Positions are added after the convolutions (``sincos2d``: fixed, times ``pos_scale``), because the
LM's own rotary positions are 1D and relative and cannot tell it where a token sits in the image; they must
be about as loud as the content features for the LM to read them quickly (docs/design.md).
"""

from __future__ import annotations

import torch
from torch import nn

from vlmkit.config import VisionConfig
from vlmkit.nn import sincos_2d


def _block(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]


class ConvEncoder(nn.Module):
    """log2(patch_size) stages of (conv-BN-ReLU, 2x2 max pool), then one conv-BN-ReLU at ``width``.

    Stage widths double up to ``width`` (e.g. 32, 64, 128 for width 128 and patch size 8).
    """

    blocks = ()  # no transformer blocks (a ViT tower's ModuleList: scaled at init, sharded by FSDP)

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        n = cfg.patch_size.bit_length() - 1
        if 2**n != cfg.patch_size or n < 1:
            raise ValueError(f"vision.arch 'cnn' needs a power-of-two patch_size (the total stride), "
                             f"got {cfg.patch_size}")
        if cfg.class_token:
            raise ValueError("vision.arch 'cnn' has no class token; set vision.class_token: false")
        self.image_size = tuple(cfg.image_size)
        self.width = cfg.width
        self.grid = cfg.grid
        layers, c_in = [], cfg.channels
        for i in range(n):
            c_out = max(16, cfg.width // 2 ** (n - 1 - i))
            layers += [*_block(c_in, c_out), nn.MaxPool2d(2)]
            c_in = c_out
        layers += _block(c_in, cfg.width)
        self.net = nn.Sequential(*layers)
        gh, gw = self.grid
        if cfg.pos_scale != 1.0 and cfg.pos_embed != "sincos2d":
            raise ValueError(f"vision.pos_scale scales fixed sincos2d positions; pos_embed is {cfg.pos_embed!r}")
        if cfg.pos_embed == "sincos2d":
            pos = sincos_2d(gh, gw, cfg.width) * cfg.pos_scale
            self.register_buffer("pos_embed", pos[None], persistent=False)
        elif cfg.pos_embed == "learned":
            self.pos_embed = nn.Parameter(torch.zeros(1, gh * gw, cfg.width))
        elif cfg.pos_embed == "none":
            self.pos_embed = None
        else:
            raise ValueError(f"vision.pos_embed for arch 'cnn' must be 'sincos2d', 'learned' or 'none', "
                             f"got {cfg.pos_embed!r}")

    @property
    def num_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [B, C, H, W] -> features [B, N, D]."""
        if tuple(pixel_values.shape[-2:]) != self.image_size:
            raise ValueError(f"vision encoder expects images of {self.image_size} (H, W), "
                             f"got {tuple(pixel_values.shape[-2:])}; check the processor's image_size")
        dtype = self.net[0].weight.dtype
        x = self.net(pixel_values.to(dtype)).flatten(2).transpose(1, 2)  # [B, N, D]
        return x + self.pos_embed if self.pos_embed is not None else x.contiguous()
