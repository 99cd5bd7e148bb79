"""Emu3's VQ-VAE (transformers' ``Emu3VQVAE``, from MoVQ: Zheng et al. 2022): an image tokenizer for images and
videos. It differs from the taming-style VQGAN of models/vq.py in three ways, which is why it is its own module:

- time: an image is repeated ``temporal_downsample_factor`` times as a clip; after the 2-D encoder the clip's frames
  go through causal 3-D convolutions (``time_conv``: stride 2 in time, padded 2 frames in front) and 3-D residual
  blocks with BatchNorm (``time_res_stack``), so that the clip becomes one frame of latents; the decoder runs them
  the other way (nearest upsampling in time) and an image is the first decoded frame;
- the decoder's norms are *spatial norms* (:class:`SpatialNorm`, MoVQ): GroupNorm whose scale and shift are 1x1
  convolutions of the quantised latents (nearest-resized to the feature map), so the codes condition every level;
- downsampling pads right and bottom by one before a stride-2 3x3 convolution (taming's), attention is multi-head
  with projections (``q_proj`` ...), and ``quant_conv`` / ``post_quant_conv`` are (3, 1, 1) temporal convolutions.

The modules keep transformers' names (``encoder.down_block.down.0.block.0.norm1``, ``decoder.up_block.up.1``,
``quantize.embedding``, ...), so that a checkpoint maps onto this model under the ``model.vqmodel.`` prefix key by
key (convert/hf/emu3.py). The model is frozen, as Emu3's: it always runs in eval mode (its BatchNorms use their
running statistics) and no gradient reaches it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vlmkit.errors import ConfigError, DataError
from vlmkit.models.vq import Downsample, Upsample

GROUPS, EPS = 32, 1e-6  # every GroupNorm of Emu3's VQ-VAE


@dataclass
class Emu3VQConfig:
    """transformers' Emu3VQVAEConfig, by its names."""

    codebook_size: int = 32768
    embed_dim: int = 4  # the codes' dimension (and the spatial norms' conditioning channels)
    latent_channels: int = 4
    in_channels: int = 3
    out_channels: int = 3
    temporal_downsample_factor: int = 4
    base_channels: int = 256
    channel_multiplier: tuple[int, ...] = (1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (3,)
    hidden_size: int = 1024  # the attention blocks' width: base_channels * channel_multiplier[-1]
    num_attention_heads: int = 1

    def __post_init__(self):
        self.channel_multiplier = tuple(int(m) for m in self.channel_multiplier)
        self.attn_resolutions = tuple(int(a) for a in self.attn_resolutions)
        widths = [self.base_channels * m for m in self.channel_multiplier]
        if any(w % GROUPS for w in widths):
            raise ConfigError(f"vq: base_channels {self.base_channels} x channel_multiplier "
                              f"{list(self.channel_multiplier)} must give multiples of {GROUPS} (GroupNorm groups)")
        need = {widths[-1]} | {widths[i] for i in self.attn_resolutions if i < len(widths)}
        if need != {self.hidden_size}:
            raise ConfigError(f"vq: hidden_size {self.hidden_size} must be the width of the levels with attention "
                              f"and of the middle block ({sorted(need)})")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"vq: hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                              f"{self.num_attention_heads}")
        t = self.temporal_downsample_factor
        if t < 1 or t & (t - 1):
            raise ConfigError(f"vq: temporal_downsample_factor {t} must be a power of 2")

    @property
    def factor(self) -> int:
        """Pixels per code along each side."""
        return 2 ** (len(self.channel_multiplier) - 1)


def group_norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(GROUPS, ch, eps=EPS, affine=True)


def swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


class CausalConv3d(nn.Module):
    """A 3-D convolution padded "same" in space and by 2 frames in front in time (``Emu3VQVAEConv3d``)."""

    def __init__(self, cin: int, cout: int, kernel: tuple[int, int, int], stride: tuple[int, int, int]):
        super().__init__()
        pad = ()
        for k, s in reversed(list(zip(kernel[1:], stride[1:]))):
            p = k - s
            pad += (p // 2 + p % 2, p // 2)
        self.padding = pad + (2, 0)
        self.conv = nn.Conv3d(cin, cout, kernel, stride=stride)

    def forward(self, x):
        return self.conv(F.pad(x, self.padding))


class SpatialNorm(nn.Module):
    """GroupNorm whose scale and shift are 1x1 convolutions of the quantised latents ``q`` (MoVQ)."""

    def __init__(self, q_ch: int, ch: int):
        super().__init__()
        self.norm_layer = group_norm(ch)
        self.conv_y = nn.Conv2d(q_ch, ch, 1)
        self.conv_b = nn.Conv2d(q_ch, ch, 1)

    def forward(self, x, q):
        q = F.interpolate(q, size=x.shape[-2:], mode="nearest")
        return self.norm_layer(x) * self.conv_y(q) + self.conv_b(q)


class PlainNorm(nn.GroupNorm):
    """A GroupNorm that takes (and ignores) the latents, where the encoder's blocks have no spatial norm."""

    def forward(self, x, q=None):
        return super().forward(x)


def norm(ch: int, q_ch: int | None) -> nn.Module:
    return PlainNorm(GROUPS, ch, eps=EPS, affine=True) if q_ch is None else SpatialNorm(q_ch, ch)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, q_ch: int | None = None):
        super().__init__()
        self.norm1, self.norm2 = norm(cin, q_ch), norm(cout, q_ch)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x, q=None):
        h = self.conv1(swish(self.norm1(x, q)))
        h = self.conv2(swish(self.norm2(h, q)))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class TemporalResBlock(nn.Module):
    """BatchNorm3d -> swish -> causal 3x3x3 convolution, twice, plus the input."""

    def __init__(self, ch: int):
        super().__init__()
        self.norm1, self.norm2 = nn.BatchNorm3d(ch), nn.BatchNorm3d(ch)
        self.conv1 = CausalConv3d(ch, ch, (3, 3, 3), (1, 1, 1))
        self.conv2 = CausalConv3d(ch, ch, (3, 3, 3), (1, 1, 1))

    def forward(self, x):
        return x + self.conv2(swish(self.norm2(self.conv1(swish(self.norm1(x))))))


class Attention(nn.Module):
    """Multi-head self-attention over the positions of a feature map [n, C, H, W] (non-causal)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj = nn.Linear(width, width), nn.Linear(width, width)
        self.v_proj, self.out_proj = nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, x):
        n, c, h, w = x.shape
        seq = x.reshape(n, c, h * w).transpose(1, 2)
        q, k, v = (p(seq).view(n, h * w, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj,
                                                                                       self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, h * w, c)
        return self.out_proj(out).reshape(n, h, w, c).permute(0, 3, 1, 2)


class Level(nn.Module):
    """One resolution: residual blocks, each followed by attention (with its own norm) where the level has it."""

    def __init__(self, blocks, attn, attn_norms):
        super().__init__()
        self.block, self.attn, self.attn_norms = nn.ModuleList(blocks), nn.ModuleList(attn), nn.ModuleList(attn_norms)

    def forward(self, x, q=None):
        for i, block in enumerate(self.block):
            x = block(x, q)
            if len(self.attn):
                x = x + self.attn[i](self.attn_norms[i](x, q))
        return x


class Middle(nn.Module):
    def __init__(self, cfg: Emu3VQConfig, ch: int, q_ch: int | None = None):
        super().__init__()
        self.block_1 = ResBlock(ch, ch, q_ch)
        self.attn_1 = Attention(cfg.hidden_size, cfg.num_attention_heads)
        self.attn_norm = norm(ch, q_ch)
        self.block_2 = ResBlock(ch, ch, q_ch)

    def forward(self, x, q=None):
        x = self.block_1(x, q)
        x = x + self.attn_1(self.attn_norm(x, q))
        return self.block_2(x, q)


class Stack(nn.Module):
    """``down`` (encoder) or ``up`` (decoder): the levels, finest first, each but the coarsest with its resampler."""

    def __init__(self, cfg: Emu3VQConfig, decoder: bool):
        super().__init__()
        mult, base, n = cfg.channel_multiplier, cfg.base_channels, len(cfg.channel_multiplier)
        q_ch = cfg.embed_dim if decoder else None
        levels = []
        ch = base * mult[-1] if decoder else base
        for i in (reversed(range(n)) if decoder else range(n)):
            out, blocks, attn, norms = base * mult[i], [], [], []
            for _ in range(cfg.num_res_blocks + (1 if decoder else 0)):
                blocks.append(ResBlock(ch, out, q_ch))
                ch = out
                if i in cfg.attn_resolutions:
                    attn.append(Attention(cfg.hidden_size, cfg.num_attention_heads))
                    norms.append(norm(ch, q_ch))
            level = Level(blocks, attn, norms)
            if decoder and i != 0:
                level.upsample = Upsample(ch, "nearest")
            if not decoder and i != n - 1:
                level.downsample = Downsample(ch)
            levels.insert(0, level) if decoder else levels.append(level)
        setattr(self, "up" if decoder else "down", nn.ModuleList(levels))
        self.decoder = decoder

    def forward(self, x, q=None):
        if not self.decoder:
            for i, level in enumerate(self.down):
                x = level(x)
                if i != len(self.down) - 1:
                    x = level.downsample(x)
            return x
        for i, level in enumerate(reversed(self.up)):
            x = level(x, q)
            if i != len(self.up) - 1:
                x = level.upsample(x)
        return x


class TimeUpsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = CausalConv3d(ch, ch, (3, 3, 3), (1, 1, 1))

    def forward(self, x):  # [n, C, T, H, W] -> [n, C, 2T, H, W], frames repeated
        return self.conv(x.repeat_interleave(2, dim=2))


class TimeDownsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = CausalConv3d(ch, ch, (4, 3, 3), (2, 1, 1))

    def forward(self, x):
        return self.conv(x)


class Encoder(nn.Module):
    def __init__(self, cfg: Emu3VQConfig):
        super().__init__()
        top, z = cfg.base_channels * cfg.channel_multiplier[-1], cfg.latent_channels
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.base_channels, 3, padding=1)
        self.down_block = Stack(cfg, decoder=False)
        self.middle_block = Middle(cfg, top)
        self.norm_out = group_norm(top)
        self.conv_out = nn.Conv2d(top, z, 3, padding=1)
        steps = int(math.log2(cfg.temporal_downsample_factor))
        self.time_conv = nn.ModuleList(TimeDownsample(z) for _ in range(steps))
        self.time_res_stack = nn.ModuleList(TemporalResBlock(z) for _ in range(cfg.num_res_blocks))

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        """Clips [n, T, C, H, W] -> latents [n, C_z, T', h, w]."""
        n, t = clips.shape[:2]
        x = self.middle_block(self.down_block(self.conv_in(clips.flatten(0, 1))))
        x = self.conv_out(swish(self.norm_out(x)))
        x = x.reshape(n, t, *x.shape[1:]).transpose(1, 2)  # [n, C_z, T, h, w]
        for conv in self.time_conv:
            x = swish(conv(x))
        for block in self.time_res_stack:
            x = block(x)
        return x


class Decoder(nn.Module):
    def __init__(self, cfg: Emu3VQConfig):
        super().__init__()
        z, top = cfg.latent_channels, cfg.base_channels * cfg.channel_multiplier[-1]
        self.time_res_stack = nn.ModuleList(TemporalResBlock(z) for _ in range(cfg.num_res_blocks))
        steps = int(math.log2(cfg.temporal_downsample_factor))
        self.time_conv = nn.ModuleList(TimeUpsample(z) for _ in range(steps))
        self.conv_in = nn.Conv2d(z, top, 3, padding=1)
        self.middle_block = Middle(cfg, top, cfg.embed_dim)
        self.up_block = Stack(cfg, decoder=True)
        self.norm_out = SpatialNorm(cfg.embed_dim, cfg.base_channels * cfg.channel_multiplier[0])
        self.conv_out = nn.Conv2d(cfg.base_channels * cfg.channel_multiplier[0], cfg.out_channels, 3, padding=1)

    def forward(self, post: torch.Tensor, quant: torch.Tensor) -> torch.Tensor:
        """post_quant_conv's output and the codes' vectors, both [n, C, T, h, w] -> frames [n * T', C_out, H, W]
        (both go through the temporal blocks together, as one batch, as transformers runs them)."""
        x = torch.cat((post, quant))
        for block in self.time_res_stack:
            x = block(x)
        for conv in self.time_conv:
            x = swish(conv(x))
        x = x.transpose(1, 2)  # [2n, T', C, h, w]
        h, q = (part.flatten(0, 1) for part in x.chunk(2))
        h = self.up_block(self.middle_block(self.conv_in(h), q), q)
        return self.conv_out(swish(self.norm_out(h, q)))


class Emu3VQ(nn.Module):
    """Images [n, 3, H, W] (H, W multiples of ``cfg.factor``) <-> code grids [n, H / f, W / f]."""

    def __init__(self, cfg: Emu3VQConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = nn.Module()
        self.quantize.embedding = nn.Embedding(cfg.codebook_size, cfg.embed_dim)
        self.quant_conv = CausalConv3d(cfg.latent_channels, cfg.embed_dim, (3, 1, 1), (1, 1, 1))
        self.post_quant_conv = CausalConv3d(cfg.embed_dim, cfg.latent_channels, (3, 1, 1), (1, 1, 1))
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True):
        """Frozen: always in eval mode (BatchNorm's running statistics), whatever the model around it does."""
        return super().train(False)

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """Latents [n, C, T, h, w] -> code ids [n, T, h, w] (transformers' distance formula, its argmin)."""
        flat = z.permute(0, 2, 3, 4, 1).reshape(-1, z.shape[1])
        e = self.quantize.embedding.weight
        d = torch.sum(flat**2, dim=1, keepdim=True) + torch.sum(e**2, dim=1) - 2 * torch.matmul(flat, e.t())
        n, _, t, h, w = z.shape
        return d.argmin(dim=1).view(n, t, h, w)

    @torch.no_grad()
    def encode_codes(self, pixels: torch.Tensor) -> torch.Tensor:
        """Images [n, 3, H, W] -> codes [n, H / f, W / f] (each image a clip of T copies of itself)."""
        f = self.cfg.factor
        if pixels.ndim != 4 or pixels.shape[-2] % f or pixels.shape[-1] % f:
            raise DataError(f"emu3 VQ encodes images [n, 3, H, W] with H and W multiples of {f}; got "
                            f"{tuple(pixels.shape)}")
        clips = pixels.unsqueeze(1).expand(-1, self.cfg.temporal_downsample_factor, -1, -1, -1)
        z = self.quant_conv(self.encoder(clips.to(self.quantize.embedding.weight.dtype)))
        return self.nearest(z)[:, 0]

    @torch.no_grad()
    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes [n, h, w] -> images [n, 3, h * f, w * f] (the first frame of the decoded clip; not clamped)."""
        if codes.ndim != 3:
            raise DataError(f"emu3 VQ decodes code grids [n, h, w]; got {tuple(codes.shape)}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.cfg.codebook_size):
            raise DataError(f"emu3 VQ codes must lie in [0, {self.cfg.codebook_size}); got "
                            f"[{int(codes.min())}, {int(codes.max())}]")
        n, h, w = codes.shape
        quant = self.quantize.embedding(codes).permute(0, 3, 1, 2).unsqueeze(2)  # [n, C, 1, h, w]
        frames = self.decoder(self.post_quant_conv(quant), quant)  # [n * T, C_out, H, W]
        return frames.view(n, -1, *frames.shape[1:])[:, 0]


__all__ = ["Emu3VQ", "Emu3VQConfig"]
