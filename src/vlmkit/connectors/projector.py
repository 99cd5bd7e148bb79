"""Projector connectors: vision features [B, N, D_vision] -> LM embeddings [B, M, D_lm].

Linear (LLaVA, M = N), two-layer MLP (LLaVA-1.5, M = N) and pixel shuffle + projection
(Idefics3 / SmolVLM, M = N / s^2). Each states its M through ``num_tokens(n)``.
"""

from __future__ import annotations

import torch
from torch import nn

from vlmkit.nn import activation


class LinearConnector(nn.Module):
    """One linear map per patch (LLaVA)."""

    def __init__(self, d_vision: int, d_lm: int, bias: bool = True):
        super().__init__()
        self.proj = nn.Linear(d_vision, d_lm, bias=bias)

    def num_tokens(self, n: int, grid: tuple[int, int] | None = None) -> int:
        return n

    def forward(self, x: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        return self.proj(x)  # [B, N, D_v] -> [B, N, D_lm]


class MLPConnector(nn.Module):
    """Linear -> GELU -> Linear per patch (LLaVA-1.5 ``mlp2x_gelu``)."""

    def __init__(self, d_vision: int, d_lm: int, act: str = "gelu", bias: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(d_vision, d_lm, bias=bias)
        self.fc2 = nn.Linear(d_lm, d_lm, bias=bias)
        self.act = activation(act)

    def num_tokens(self, n: int, grid: tuple[int, int] | None = None) -> int:
        return n

    def forward(self, x: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))  # [B, N, D_v] -> [B, N, D_lm]


def pixel_shuffle(x: torch.Tensor, grid: tuple[int, int], s: int) -> torch.Tensor:
    """Fold each s x s block of patches into one token: [B, h*w, D] -> [B, (h/s)*(w/s), D*s*s].

    The element order matches Idefics3's ``pixel_shuffle`` so imported weights line up.
    """
    B, N, D = x.shape
    h, w = grid
    if h % s or w % s or h * w != N:
        raise ValueError(f"pixel shuffle needs a patch grid divisible by {s}, got {h}x{w} for {N} tokens")
    x = x.reshape(B, h, w // s, D * s)  # merge s neighbours along a row (reshape: x may be a strided view)
    x = x.permute(0, 2, 1, 3)  # [B, w/s, h, D*s]
    x = x.reshape(B, w // s, h // s, D * s * s)  # merge s neighbours along a column
    x = x.permute(0, 2, 1, 3)  # [B, h/s, w/s, D*s*s]
    return x.reshape(B, (h // s) * (w // s), D * s * s)


class PixelShuffleConnector(nn.Module):
    """Pixel shuffle then a projection: one linear (Idefics3) or an MLP (``layers=2``)."""

    def __init__(self, d_vision: int, d_lm: int, scale_factor: int = 2, layers: int = 1, act: str = "gelu",
                 bias: bool = False):
        super().__init__()
        self.scale = scale_factor
        d_in = d_vision * scale_factor**2
        if layers == 1:
            self.proj = nn.Linear(d_in, d_lm, bias=bias)
        elif layers == 2:
            self.proj = MLPConnector(d_in, d_lm, act=act, bias=bias)
        else:
            raise ValueError(f"connector.layers must be 1 or 2 for pixel_shuffle, got {layers}")

    def num_tokens(self, n: int, grid: tuple[int, int] | None = None) -> int:
        return n // self.scale**2

    def forward(self, x: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        if grid is None:
            side = round(x.shape[1] ** 0.5)
            grid = (side, side)
        return self.proj(pixel_shuffle(x, grid, self.scale))  # [B, N/s^2, D_lm]
