"""What a diffusion transformer reads: the timestep as a vector, and a latent grid as a sequence of patches.

:class:`TimestepEmbedding` is DiT's ``TimestepEmbedder`` (Peebles & Xie 2023, "Scalable Diffusion Models with
Transformers"; the sinusoidal embedding of Vaswani et al. 2017 / DDPM, Ho et al. 2020): cos and sin of t at
``freq_dim / 2`` geometrically spaced frequencies (1 .. 1 / ``max_period`` radians per unit), then Linear-SiLU-Linear
to the model's width. DiT's t is an integer step in 0..999; vlmkit's flow-matching t is in [0, 1]
(vlmkit.diffusion.flow), so it is multiplied by 1000 first (``scale``; SD3 likewise feeds its transformer 1000
times its flow-matching t): without it, t in [0, 1] would turn even the fastest frequency by at most one radian
and the slower ones by almost nothing, so most of the embedding would be the same for every t.

:func:`patchify` / :func:`unpatchify`: latents [n, C, h, w] <-> [n, (h/p) * (w/p), C * p * p], patches in
row-major order (left to right, then top to bottom) and each patch's values in (C, p, p) order: the layout a
``Conv2d(C, D, p, stride=p)`` flattens its weight in, so a Linear over patchified latents is DiT's / SD3's
convolutional patch embedding (its weight ``conv.weight.flatten(1)``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from vlmkit.errors import ConfigError

__all__ = ["TimestepEmbedding", "patchify", "timestep_frequencies", "unpatchify"]


def timestep_frequencies(t: torch.Tensor, dim: int, scale: float = 1000.0, max_period: float = 10000.0) -> torch.Tensor:
    """t [n] -> [n, dim]: cat(cos(scale * t * f), sin(scale * t * f)) at f_i = max_period ** (-i / (dim / 2)),
    DiT's ``timestep_embedding`` (a zero column appended when ``dim`` is odd)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = (scale * t.float())[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedding(nn.Module):
    """t [n] in [0, 1] -> [n, width]: the sinusoidal frequencies of 1000 t (module docstring), then
    Linear(freq_dim, width), SiLU, Linear(width, width)."""

    def __init__(self, width: int, freq_dim: int = 256, scale: float = 1000.0, max_period: float = 10000.0):
        super().__init__()
        if width < 1 or freq_dim < 2:
            raise ConfigError(f"the timestep embedding needs width >= 1 and freq_dim >= 2, got {width}, {freq_dim}")
        self.freq_dim, self.scale, self.max_period = freq_dim, scale, max_period
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, device=self.mlp[0].weight.device)
        if t.dim() != 1:
            raise ValueError(f"t must be one timestep per sample [n], got shape {list(t.shape)}")
        freqs = timestep_frequencies(t, self.freq_dim, self.scale, self.max_period)
        return self.mlp(freqs.to(self.mlp[0].weight.dtype))


def _check_grid(h: int, w: int, p: int) -> None:
    if p < 1:
        raise ConfigError(f"the patch size must be >= 1, got {p}")
    if h % p or w % p:
        raise ConfigError(f"latents of height {h} and width {w} do not split into {p}x{p} patches: both must be "
                          f"multiples of the patch size {p}")


def patchify(z: torch.Tensor, p: int) -> torch.Tensor:
    """z [n, C, h, w] -> [n, (h/p) * (w/p), C * p * p]: row-major patches, each patch's values in (C, p, p) order."""
    if z.dim() != 4:
        raise ValueError(f"latents must be [n, C, h, w], got shape {list(z.shape)}")
    n, c, h, w = z.shape
    _check_grid(h, w, p)
    x = z.reshape(n, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)  # [n, h/p, w/p, C, p, p]
    return x.reshape(n, (h // p) * (w // p), c * p * p)


def unpatchify(x: torch.Tensor, p: int, h: int, w: int) -> torch.Tensor:
    """The inverse of :func:`patchify`: x [n, (h/p) * (w/p), C * p * p] -> [n, C, h, w]."""
    _check_grid(h, w, p)
    gh, gw = h // p, w // p
    if x.dim() != 3 or x.shape[1] != gh * gw or x.shape[2] % (p * p):
        raise ValueError(f"patches must be [n, {gh * gw}, C * {p * p}] for a {h}x{w} grid of {p}x{p} patches, got "
                         f"shape {list(x.shape)}")
    n, c = x.shape[0], x.shape[2] // (p * p)
    return x.reshape(n, gh, gw, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(n, c, h, w)
